"""Save and load a Graph: structure in JSON, tensors in a safetensors file beside it.

Loading never unpickles: JSON and safetensors carry data only, so a graph file from anyone is safe to open.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import limits
from ..errors import AutomtlError, FileFormatError, require_file
from .graph import Graph

FORMAT = "automtl-graph"
VERSION = 1


def atomic_write(path: str | Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the result onto ``path``; a failure leaves ``path`` untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files owner-only; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: str | Path, what: str, fmt: str, version: int | None = None) -> dict[str, Any]:
    """Read one of our JSON files; a missing, malformed or foreign file is a FileFormatError naming it."""
    path = require_file(path, what)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise FileFormatError(f"{path}: cannot read the {what} ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not valid JSON ({e}); is this a {what}?") from None
    try:
        doc = limits.loads_json(text, str(path))
    except json.JSONDecodeError as e:
        raise FileFormatError(f"{path}: not valid JSON ({e}); is this a {what}?") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise FileFormatError(f"{path}: not an automtl {what} (no \"format\": \"{fmt}\")")
    if version is not None and doc.get("version") != version:
        raise FileFormatError(f"{path}: {what} format version {doc.get('version')} is not supported "
                              f"(this automtl reads version {version})")
    return doc


#: Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 2**20


def check_safetensors(path: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Check a safetensors file's header against the file and the limits, before any tensor is read.

    Every tensor's dtype must be known, its shape's byte size must equal its byte range, the ranges must
    lie inside the file, each tensor within MAX_TENSOR_BYTES and all of them within MAX_PARAMS elements.
    Returns ``{name: (dtype, shape)}``; a bad header is a FileFormatError naming the file and the tensor.
    """
    path = require_file(path, "safetensors file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise FileFormatError(f"{path}: corrupt safetensors file (header of {n:,} bytes in a file of "
                                  f"{size:,} bytes); re-export it")
        raw = f.read(n)
    try:
        header = limits.loads_json(raw, str(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: corrupt safetensors header ({e}); re-export it") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: corrupt safetensors header (not a JSON object); re-export it")
    data_size = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    total = 0
    for name, rec in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor '{name}'"
        if not isinstance(rec, dict):
            raise FileFormatError(f"{where}: corrupt header entry {rec!r}")
        dtype, shape, offsets = rec.get("dtype"), rec.get("shape"), rec.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPES:
            raise FileFormatError(f"{where}: unsupported dtype {dtype!r} (supported: "
                                  f"{', '.join(SAFETENSORS_DTYPES)})")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise FileFormatError(f"{where}: corrupt shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_size):
            raise FileFormatError(f"{where}: byte range {offsets!r} is not inside the file's {data_size:,} data "
                                  "bytes; the file is truncated or corrupt")
        numel = limits.check_tensor(shape, "the tensor", where, itemsize=SAFETENSORS_DTYPES[dtype],
                                    error=limits.FileLimitError)
        if numel * SAFETENSORS_DTYPES[dtype] != offsets[1] - offsets[0]:
            raise FileFormatError(f"{where}: shape {shape} of {dtype} needs {numel * SAFETENSORS_DTYPES[dtype]:,} "
                                  f"bytes but its byte range holds {offsets[1] - offsets[0]:,}; the file is corrupt")
        total += numel
        out[name] = (dtype, tuple(shape))
    limits.check("MAX_PARAMS", total, "the number of values", str(path), error=limits.FileLimitError)
    return out


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file after :func:`check_safetensors`; a corrupt file is a FileFormatError."""
    check_safetensors(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FileFormatError(f"{path}: corrupt safetensors file ({e}); re-export it") from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def weights_path(json_path: str | Path) -> Path:
    """The safetensors file that goes with a graph JSON file."""
    return Path(json_path).with_suffix(".safetensors")


def graph_tensors(graph: Graph) -> dict[str, torch.Tensor]:
    """All tensors of a graph keyed ``node/name`` (contiguous copies, as safetensors needs).

    A tensor held by several nodes (tied weights) appears once, under its first holder's key.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for node in graph.topological_order():
        for key, t in {**node.params, **node.buffers}.items():
            if id(t) not in seen:
                seen.add(id(t))
                out[f"{node.name}/{key}"] = t.detach().cpu().contiguous().clone()
    return out


def tied_keys(graph: Graph) -> dict[str, dict[str, str]]:
    """node -> {tensor name: key of the first holder} for tensors held by more than one node."""
    first: dict[int, str] = {}
    ties: dict[str, dict[str, str]] = {}
    for node in graph.topological_order():
        for key, t in {**node.params, **node.buffers}.items():
            if id(t) in first:
                ties.setdefault(node.name, {})[key] = first[id(t)]
            else:
                first[id(t)] = f"{node.name}/{key}"
    return ties


def save_graph(graph: Graph, path: str | Path, *, tensors: bool = True) -> Path:
    """Write ``graph`` to ``path`` (JSON) and its tensors to ``path`` with suffix ``.safetensors``.

    With ``tensors=False`` only the structure is written (the caller stores the weights elsewhere).
    """
    path = Path(path)
    ties = tied_keys(graph)
    doc = {
        "format": FORMAT, "version": VERSION, "name": graph.name, "outputs": graph.outputs,
        "weights": weights_path(path).name if tensors else None,
        "nodes": [{"name": n.name, "op": n.op, "inputs": n.inputs,
                   "attrs": {k: _jsonable(v) for k, v in n.attrs.items()},
                   "params": sorted(n.params), "buffers": sorted(n.buffers),
                   "shape": list(n.shape) if n.shape is not None else None, "source": n.source,
                   **({"tied": ties[n.name]} if n.name in ties else {})}
                  for n in graph.topological_order()],
    }
    if tensors:
        data = graph_tensors(graph)
        atomic_write(weights_path(path), lambda tmp: save_file(data, str(tmp)))
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))
    return path


def load_graph(path: str | Path) -> Graph:
    """Read a graph written by :func:`save_graph`; a corrupt or foreign file is a FileFormatError.

    A structure-only file (``tensors=False``) gets freshly initialised tensors (seed 0).
    """
    path = Path(path)
    doc = read_json(path, "graph file", FORMAT, VERSION)
    wpath = None
    tensors: dict[str, torch.Tensor] = {}
    if doc.get("weights") is not None:
        wpath = require_file(path.parent / str(doc["weights"]), "graph weights file")
        tensors = load_safetensors(wpath)
    graph = Graph(doc.get("name", path.stem))
    try:
        for rec in doc["nodes"]:
            name = rec["name"]

            tied = rec.get("tied", {})

            def take(keys: list[str]) -> dict[str, torch.Tensor]:
                if wpath is None:
                    return {}
                where = {k: tied.get(k, f"{name}/{k}") for k in keys}
                missing = [k for k, key in where.items() if key not in tensors]
                if missing:
                    raise FileFormatError(f"{wpath}: no tensor(s) {missing} for node '{name}'")
                return {k: tensors[key] for k, key in where.items()}

            graph.add_node(name, rec["op"], rec["inputs"], rec["attrs"], params=take(rec["params"]),
                           buffers=take(rec["buffers"]), shape=rec["shape"], source=rec.get("source"),
                           check=False)
        graph.relink()
        graph.outputs = list(doc["outputs"])
        if wpath is None:
            graph.materialise(seed=0)
        graph.validate()
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise FileFormatError(f"{path}: malformed graph record ({e!r})") from None
    except AutomtlError as e:
        raise type(e)(f"{path}: {e}") from None
    return graph
