"""Pretrained weights for backbones: read a state dict safely, unwrap it, and match it to a module or a Graph.

Reading (:func:`read_state_dict`)
    ``.pth``/``.pt``/``.bin``/``.ckpt`` files are read only with ``torch.load(path, map_location="cpu",
    weights_only=True)``: a pickle that carries code or arbitrary Python objects is refused without
    running it (a one-line :class:`FileFormatError` saying how to convert the file to safetensors).
    ``.safetensors`` files are read with the safetensors library, which checks the header's sizes
    against the file before allocating anything.

Unwrapping
    Training checkpoints are unwrapped: a top-level ``state_dict`` entry is used, else ``model``; a
    checkpoint whose only weights are an exponential moving average (``state_dict_ema`` or
    ``model_ema``, as timm writes them) uses those, but EMA weights are never preferred over the
    regular ones. A prefix that every key carries, ``module.`` (DataParallel/DDP) or ``_orig_mod.``
    (``torch.compile``), is stripped. Entries that are not tensors (epoch, optimiser state, ...) are
    ignored.

Matching
    To an ``nn.Module`` (:func:`load_into_module`): by the module's own ``state_dict`` names, before it is
    traced, so the traced IR carries the weights. To a Graph (:func:`load_into_graph`): a key
    ``<node>/<tensor>`` names an IR tensor directly (as ``export_prototxt``/``save_graph`` write them);
    a key ``<module path>.<tensor>`` (a torch state-dict name such as ``layer1.0.conv1.weight``) names
    the node(s) whose recorded ``source`` is that module path (graphs traced with torch.fx), else the node
    torch.fx would have named after that module (``layer1_0_conv1``), which is how the project's
    prototxt exporter names layers.

    Values: a tensor that fills a parameter or floating-point buffer must be float16, bfloat16, float32 or
    float64 with only finite values; one that fills an integer buffer (``num_batches_tracked``) must be an
    integer. Complex, boolean and other tensors, NaN and infinity are a :class:`FileFormatError` naming the
    file and the tensors (:func:`check_values`), never silently cast.

    Missing, unexpected and mis-shaped tensors are reported together in one
    :class:`WeightsMismatchError` naming the file. ``strict=False`` ignores unexpected tensors (e.g. a
    classifier the backbone does not have) but never mis-shaped ones nor tensors the network needs;
    batch-norm ``num_batches_tracked`` may always be absent.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import FileFormatError, ShapeError, require_file
from ..ir.graph import Graph

#: Suffixes read with ``torch.load(weights_only=True)``.
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
#: Every suffix :func:`read_state_dict` reads.
STATE_DICT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")
#: Checkpoint entries holding the weights, in order of preference (EMA only when nothing else is there).
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema")
#: Prefixes a wrapper module adds to every key (DataParallel/DDP, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: The dtypes a tensor filling a parameter or floating-point buffer may have.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: The dtypes a tensor filling an integer buffer may have.
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
#: Tensors a weights file may leave out (batch norm's step counter, only used with momentum=None).
OPTIONAL_TENSORS = ("num_batches_tracked",)
SHOWN = 5


class WeightsMismatchError(FileFormatError, ShapeError):
    """A weights file does not fit the network: tensors are missing, unexpected or mis-shaped.

    It is both a FileFormatError (the file is the culprit) and a ShapeError (mis-shaped tensors).
    """


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a PyTorch state-dict file or a safetensors file as ``{name: tensor}``, unwrapped.

    Never runs code from the file; see the module docstring for the accepted files and wrappings.
    """
    p = require_file(path, "weights file")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(p)
    if suffix in TORCH_SUFFIXES:
        return unwrap_state_dict(_torch_load(p), p)
    raise FileFormatError(f"{p}: unknown weights format '{suffix or 'no suffix'}'; give a PyTorch state_dict "
                          f"({', '.join(TORCH_SUFFIXES)}) or a .safetensors file")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return unwrap_state_dict(load_file(str(path)), path)
    except (SafetensorError, OSError, ValueError) as e:
        raise FileFormatError(f"{path}: corrupt safetensors file ({' '.join(str(e).split())})") from None


def _torch_load(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers; its failures become one-line errors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        convert = ("if you trust the file, convert it once to safetensors with `safetensors.torch.save_file("
                   "torch.load(PATH, weights_only=False)[\"state_dict\"], \"weights.safetensors\")` (or whichever "
                   "entry holds the weights) and pass that file")
        found = re.search(r"(?i)(?:trying to load )?unsupported [^\n]*", str(e))
        detail = " ".join(found.group(0).split()).rstrip(".")[:160] if found else "refused by weights_only loading"
        if "global" in detail.lower():
            raise FileFormatError(f"{path}: contains code or Python objects that are not plain tensors ({detail}), "
                                  f"so it was not loaded (nothing in it was run); {convert}") from None
        raise FileFormatError(f"{path}: not a PyTorch state_dict file that can be read safely ({detail}): it holds "
                              "code or Python objects that are not plain tensors, or is not a torch.save file at "
                              f"all; nothing in it was run; {convert}") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, AttributeError) as e:
        message = " ".join(str(e).split())[:200]
        raise FileFormatError(f"{path}: not a PyTorch state_dict file ({type(e).__name__}: {message}); give the "
                              "file written by torch.save(model.state_dict(), PATH), or a .safetensors file") from None


def unwrap_state_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict or training checkpoint, keyed without wrapper prefixes.

    ``path`` only names the file in errors.
    """
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise FileFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict ({{name: tensor}}); save "
                              "model.state_dict()")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        entries = ", ".join(repr(k) for k in list(obj)[:SHOWN])
        raise FileFormatError(f"{path}: holds no tensors (entries: {entries or 'none'}); give a state dict "
                              "({name: tensor}) or a checkpoint with a 'state_dict' or 'model' entry")
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k[len(prefix):]: v for k, v in tensors.items()}
                changed = True
    return tensors


def _optional(key: str) -> bool:
    return re.split(r"[./]", key)[-1] in OPTIONAL_TENSORS


def _listing(kind: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN]) + (", ..." if len(keys) > SHOWN else "")
    return f"{kind} {len(keys)} tensor(s): {shown}"


def _prefix(unexpected: list[str], missing: list[str]) -> str | None:
    """A first key component (``backbone.``) that every unexpected key carries and without which some
    missing key would be given: the file holds an enclosing model's weights."""
    heads = {k.split(".", 1)[0] for k in unexpected if "." in k}
    if len(heads) != 1 or not all("." in k for k in unexpected):
        return None
    prefix = f"{heads.pop()}."
    wanted = set(missing)
    for key in unexpected:
        module_path, _, tensor = key[len(prefix):].rpartition(".")
        if {f"{module_path}.{tensor}", f"{fx_name(module_path)}/{tensor}"} & wanted:
            return prefix
    return None


def _report(path: Path, target: str, missing: list[str], unexpected: list[str], misshaped: list[str],
            twice: list[str], strict: bool, hint: str | None = None) -> None:
    """Raise one WeightsMismatchError describing every problem found, or nothing when there is none.

    Unexpected tensors are a problem only when ``strict``; they still help explain missing ones.
    """
    prefix = _prefix(unexpected, missing) if missing and unexpected else None
    if not strict:
        unexpected = []
    if not (missing or unexpected or misshaped or twice):
        return
    parts = []
    if missing:
        parts.append(_listing("missing", missing))
    if unexpected:
        parts.append(_listing("unexpected", unexpected))
    if misshaped:
        parts.append(_listing("mis-shaped", misshaped))
    if twice:
        parts.append(_listing("given twice", twice))
    hints = [hint] if hint else _hints(prefix, unexpected, missing or misshaped)
    raise WeightsMismatchError(f"{path}: weights do not match {target}: " + "; ".join(parts) + " (" +
                               "; ".join(hints) + ")")


def _hints(prefix: str | None, unexpected: list[str], mismatched: list[str]) -> list[str]:
    """What to do about a weights file that does not fit a network built from another source."""
    hints = []
    if prefix:
        hints.append(f"the keys the network does not use all start with '{prefix}': the file holds a larger "
                     "model; save the backbone's own state_dict, or strip that prefix from the keys")
    elif unexpected:
        hints.append("strict=False (CLI: --weights-non-strict) ignores tensors the network does not use")
    if mismatched:
        hints.append("check that the file was saved from this architecture")
    return hints


def value_problem(tensor: torch.Tensor, target: torch.dtype = torch.float32) -> str | None:
    """Why ``tensor`` cannot fill a parameter or buffer of dtype ``target``, or None when it can.

    A floating-point target takes finite float16/bfloat16/float32/float64 values, an integer target an integer
    tensor, a boolean target a boolean one.
    """
    dtype = str(tensor.dtype).replace("torch.", "")
    if target == torch.bool:
        return None if tensor.dtype == torch.bool else f"{dtype}, needs bool"
    if not (target.is_floating_point or target.is_complex):
        return None if tensor.dtype in INTEGER_DTYPES else f"{dtype}, needs an integer type"
    if tensor.dtype not in FLOAT_DTYPES:
        return f"{dtype}, needs float16/bfloat16/float32/float64"
    bad = int((~torch.isfinite(tensor)).sum()) if tensor.numel() else 0
    return f"{bad} NaN/inf value(s)" if bad else None


def check_values(path: str | Path, items: Iterable[tuple[str, torch.Tensor, torch.dtype]]) -> None:
    """Raise one FileFormatError naming ``path`` and the tensors of ``items`` (``(key, tensor, target dtype)``)
    whose dtype or values cannot be weights (see :func:`value_problem`)."""
    bad = [f"{key} ({problem})" for key, tensor, target in items
           if (problem := value_problem(tensor, target)) is not None]
    if bad:
        raise FileFormatError(f"{path}: {len(bad)} tensor(s) cannot be loaded as weights: "
                              + ", ".join(bad[:SHOWN]) + (", ..." if len(bad) > SHOWN else "")
                              + "; weights must be finite floating-point numbers (integers only for counters such "
                              "as num_batches_tracked): save the file from a trained float model")


def _shape_text(given: torch.Tensor, want: Iterable[int]) -> str:
    return f"{list(given.shape)} (needs {list(want)})"


def load_into_module(module: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Copy the tensors of the weights file ``path`` into ``module``'s parameters and buffers, in place.

    Keys are the module's own ``state_dict`` names; every problem is reported at once before anything is
    copied, so a failure leaves ``module`` as it was.
    """
    p = require_file(path, "weights file")
    copy_into_module(module, read_state_dict(p), p, strict=strict)


def copy_into_module(module: nn.Module, given: Mapping[str, torch.Tensor], path: Path, *, strict: bool = True,
                     counters_optional: bool = True, hint: str | None = None) -> None:
    """Copy ``given`` (keyed by ``module``'s state-dict names, read from ``path``) into ``module`` in place.

    Missing, unexpected (when ``strict``) and mis-shaped tensors and values that do not fit their target
    are reported together, naming ``path``, before anything is copied. ``counters_optional`` lets a file
    leave out batch-norm ``num_batches_tracked`` counters (files from other tools often do); ``hint``
    replaces the advice for pretrained-weights files in the error.
    """
    have = module.state_dict(keep_vars=True)
    missing = sorted(k for k in have if k not in given and not (counters_optional and _optional(k)))
    unexpected = sorted(k for k in given if k not in have)
    misshaped = sorted(f"{k} {_shape_text(v, have[k].shape)}" for k, v in given.items()
                       if k in have and tuple(v.shape) != tuple(have[k].shape))
    _report(path, f"{type(module).__name__}", missing, unexpected, misshaped, [], strict, hint)
    check_values(path, ((k, v, have[k].dtype) for k, v in given.items() if k in have))
    with torch.no_grad():
        for key, value in given.items():
            if key in have:
                have[key].copy_(value)


def fx_name(module_path: str) -> str:
    """The name torch.fx gives the node calling the submodule at ``module_path`` (``layer1.0.conv1`` ->
    ``layer1_0_conv1``); the prototxt exporter names layers after these nodes."""
    name = re.sub(r"(?<=[a-z])([A-Z])", r"_\1", module_path).lower()
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", name) or "_unnamed"
    return f"_{name}" if name[0].isdigit() else name


def _graph_targets(graph: Graph, key: str, have: Mapping[str, Any], by_source: Mapping[str, list[str]]) -> list[str]:
    """The IR tensor keys (``node/tensor``) a weights-file key names; empty when it names none.

    ``by_source`` maps a recorded ``source`` (a module path for traced graphs) to its nodes.
    """
    if "/" in key:
        return [key] if key in have else []
    module_path, _, tensor = key.rpartition(".")
    if not module_path:
        return []
    nodes = by_source.get(module_path) or ([fx_name(module_path)] if fx_name(module_path) in graph else [])
    return [f"{n}/{tensor}" for n in nodes if f"{n}/{tensor}" in have]


def assign_to_graph(graph: Graph, given: Mapping[str, torch.Tensor], path: str | Path, *, strict: bool = True,
                    optional: Iterable[str] = (), squeeze_ok: bool = False) -> None:
    """Set the tensors of ``graph`` (shapes inferred) from ``given``, matched as the module docstring says.

    ``optional`` lists further ``node/tensor`` keys the file may omit; ``squeeze_ok`` accepts a tensor whose
    shape differs from the needed one only by size-1 dimensions (Caffe blobs). Every problem is reported
    at once, before anything is set.
    """
    path = Path(path)
    have: dict[str, tuple[tuple[int, ...], bool]] = {}
    for name, (params, buffers) in graph.tensor_specs().items():
        have.update({f"{name}/{k}": (tuple(shape), False) for k, shape in params.items()})
        have.update({f"{name}/{k}": (tuple(shape), True) for k, shape in buffers.items()})
    optional = set(optional)
    by_source: dict[str, list[str]] = {}
    for node in graph.nodes():
        if node.source:
            by_source.setdefault(node.source, []).append(node.name)
    chosen: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    unexpected, misshaped, twice = [], [], []
    for key, value in given.items():
        targets = _graph_targets(graph, key, have, by_source)
        if not targets:
            unexpected.append(key)
        for target in targets:
            if target in source_of:
                twice.append(f"{target} (as {source_of[target]} and {key})")
                continue
            source_of[target] = key
            want = have[target][0]
            if tuple(value.shape) != want:
                squeezed = [d for d in value.shape if d != 1] == [d for d in want if d != 1]
                if not (squeeze_ok and squeezed):
                    label = target if target == key else f"{key} -> {target}"
                    misshaped.append(f"{label} {_shape_text(value, want)}")
                    continue
                value = value.reshape(want)
            chosen[target] = value
    missing = sorted(k for k in have if k not in source_of and k not in optional and not _optional(k))
    _report(path, f"network '{graph.name}'", missing, sorted(unexpected), sorted(misshaped), twice, strict)
    dtypes = {t: torch.long if t.rsplit("/", 1)[1] == "num_batches_tracked" else torch.float32 for t in chosen}
    check_values(path, ((target, value, dtypes[target]) for target, value in chosen.items()))
    for target, value in chosen.items():
        name, tensor = target.rsplit("/", 1)
        node = graph.node(name)
        dtype = dtypes[target]
        (node.buffers if have[target][1] else node.params)[tensor] = value.to(dtype).contiguous()


def load_into_graph(graph: Graph, path: str | Path, *, strict: bool = True, optional: Iterable[str] = ()) -> None:
    """Read the state-dict or safetensors file ``path`` and set ``graph``'s tensors from it (see
    :func:`assign_to_graph`)."""
    p = require_file(path, "weights file")
    assign_to_graph(graph, read_state_dict(p), p, strict=strict, optional=optional)


__all__ = ["FLOAT_DTYPES", "INTEGER_DTYPES", "STATE_DICT_SUFFIXES", "TORCH_SUFFIXES", "WeightsMismatchError",
           "assign_to_graph", "check_values", "fx_name", "load_into_graph", "load_into_module", "read_state_dict",
           "unwrap_state_dict", "value_problem"]
