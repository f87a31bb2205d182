"""Checkpoints that survive a kill and whose corruption is noticed: safetensors + JSON, no pickle.

A checkpoint is a tensor file (model weights, optimiser tensors) and a JSON index naming it. The index
records the SHA-256 and size of the tensor file and the SHA-256 of its own state, so a resumed run
verifies both. The two newest checkpoints are kept::

    checkpoints/last.json       -> state-<n>.safetensors       the newest
    checkpoints/previous.json   -> previous-<m>.safetensors    the one before it

A save writes ``state-<n>`` (temp file, fsync, rename), hard-links the current newest tensor file to
``previous-<m>``, replaces ``previous.json`` with the current newest index, replaces ``last.json`` (the
index last), then removes files no index names. Every file is written to a temp file, fsynced and
renamed, so whenever the process dies both indexes name complete, verified files.

Resuming reads ``last.json``; when it or its tensor file is corrupt (checksum mismatch, unreadable
safetensors, bad JSON, wrong types, missing keys) the run falls back to ``previous.json`` with a one-line
warning, and the corrupt index is moved aside to ``last.json.corrupt`` so the next save never demotes
it to "previous". With no intact checkpoint left the error names the file.

Checkpoints of version 1 (one ``last.json`` and no checksums) are still read, without verification.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import AutomtlError, FileFormatError, one_line
from .batches import STAGES

FORMAT = "automtl-checkpoint"
VERSION = 2
LAST, PREVIOUS = "last.json", "previous.json"
#: Test-only: seconds to sleep between writing a checkpoint's tensor file and its indexes (and again
#: between the two indexes), to widen the window in which a kill lands mid-write.
PAUSE_ENV = "AUTOMTL_TEST_CHECKPOINT_PAUSE"

_WEIGHTS_NAME = re.compile(r"(state|previous)-([0-9]+)\.safetensors")
#: The trainer's state: key -> accepted types (bool is never accepted as a number).
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "stage": (str,), "step": (int,), "done": (bool,), "tau": (int, float), "policy_steps": (int,),
    "policy": (dict, type(None)),
}
_OPTIONAL_STATE_TYPES: dict[str, tuple[type, ...]] = {"scheduler_stage": (str, type(None)), "candidates": (list,)}


class CheckpointError(FileFormatError):
    """No intact checkpoint is left to resume from."""


@dataclass
class Checkpoint:
    """A verified checkpoint: its index file, the parsed index and its tensors."""

    index: Path
    doc: dict[str, Any]
    tensors: dict[str, torch.Tensor]


# ------------------------------------------------------------------ writing
def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> tuple[str, int]:
    """SHA-256 and size of the file ``path``, read in blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _durable_write(path: Path, data: bytes | Callable[[Path], None]) -> None:
    """Write ``data`` (bytes, or a function writing the file it is given) to a temp file beside ``path``,
    fsync it, rename it onto ``path`` and fsync the folder: ``path`` is never seen half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, bytes):
                    f.write(data)
            if not isinstance(data, bytes):
                data(Path(tmp))
            with open(tmp, "rb+") as f:  # whatever wrote the file, its data reach the disk before the rename
                os.fsync(f.fileno())
        except (OSError, SafetensorError) as e:  # a full disk, a quota: the earlier checkpoint is untouched
            raise AutomtlError(f"could not write checkpoint {path}: {one_line(str(e), 200)}; the checkpoint before it "
                               "is intact: free space and run the same command again to resume") from None
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)


def _durable_link(src: Path, dst: Path) -> None:
    """Make ``dst`` a second name of ``src`` (a hard link, or a durable copy where links are not supported)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        _durable_write(dst, lambda tmp: shutil.copyfile(src, tmp))
        return
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def _pause() -> None:
    seconds = os.environ.get(PAUSE_ENV)
    if seconds:
        time.sleep(float(seconds))


def _split_optimizer(name: str, opt: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entries in state["state"].items():
        record = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"opt/{name}/{idx}/{key}"] = value.detach().cpu().contiguous()
                record[key] = {"tensor": f"opt/{name}/{idx}/{key}"}
            else:
                record[key] = value
        meta["state"][str(idx)] = record
    return tensors, meta


def _state_digest(doc: dict[str, Any]) -> str:
    """SHA-256 of what an index records besides its tensor file (canonical JSON, keys sorted)."""
    body = {k: doc.get(k) for k in ("serial", "state", "optimizers", "schedulers")}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _serials(directory: Path) -> list[int]:
    found = [int(m.group(2)) for p in directory.iterdir() if (m := _WEIGHTS_NAME.fullmatch(p.name))]
    for name in (LAST, PREVIOUS):
        doc = _parse_index(directory / name)
        if isinstance(doc, dict) and isinstance(doc.get("serial"), int):
            found.append(doc["serial"])
    return found


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizers: dict[str, Any],
                    schedulers: dict[str, Any], state: dict[str, Any],
                    modules: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write a checkpoint of ``model``, ``optimizers`` (name -> optimiser), LR ``schedulers``, ``state`` and
    other ``modules`` with learnable state (a gradient scheduler's); the checkpoint it replaces becomes
    the previous one. Returns the new tensor file."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, module in (modules or {}).items():
        tensors.update({f"module/{name}/{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    opt_meta = {}
    for name, opt in optimizers.items():
        t, meta = _split_optimizer(name, opt)
        tensors.update(t)
        opt_meta[name] = meta
    current = _current_index(directory)
    serial = max([0, *_serials(directory)]) + 1
    weights = directory / f"state-{serial}.safetensors"
    _durable_write(weights, lambda tmp: save_file(tensors, str(tmp)))
    digest, size = _sha256(weights)
    _pause()
    doc = {"format": FORMAT, "version": VERSION, "serial": serial, "weights": weights.name,
           "weights_sha256": digest, "weights_bytes": size,
           # through JSON and back, so that the digest is that of what a reader will parse
           "state": json.loads(json.dumps(state)), "optimizers": json.loads(json.dumps(opt_meta)),
           "schedulers": json.loads(json.dumps({k: s.state_dict() for k, s in schedulers.items()}))}
    doc["state_sha256"] = _state_digest(doc)
    keep = {weights.name}
    if current is not None:  # the current newest becomes the previous checkpoint
        older = dict(current)
        older["weights"] = f"previous-{current['serial']}.safetensors"
        if older["weights"] != current["weights"]:
            _durable_link(directory / current["weights"], directory / older["weights"])
        _durable_write(directory / PREVIOUS, json.dumps(older).encode())
        keep.add(older["weights"])
        _pause()
    _durable_write(directory / LAST, json.dumps(doc).encode())
    for path in directory.iterdir():
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        if stale_tmp or (_WEIGHTS_NAME.fullmatch(path.name) and path.name not in keep):
            path.unlink(missing_ok=True)
    return weights


def _current_index(directory: Path) -> dict[str, Any] | None:
    """The newest index that a save should keep as the previous checkpoint: ``last.json`` (or, after it
    was moved aside as corrupt, ``previous.json``) when it is well-formed and names an existing file."""
    for name in (LAST, PREVIOUS):
        doc = _parse_index(directory / name)
        if doc is not None and _check_index(doc) is None and (directory / doc["weights"]).is_file():
            return doc
    return None


# ------------------------------------------------------------------ reading
def _parse_index(path: Path) -> Any:
    """The parsed JSON of ``path`` (None when missing or not JSON)."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_state(state: Any) -> str | None:
    if not isinstance(state, dict):
        return "'state' is not an object"
    for key, types in (_STATE_TYPES | _OPTIONAL_STATE_TYPES).items():
        if key not in state:
            if key in _STATE_TYPES:
                return f"'state.{key}' is missing"
            continue
        value = state[key]
        numeric = all(t in (int, float) for t in types)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types) or (
                numeric and not math.isfinite(value)):
            return f"'state.{key}' is {value!r}, not of type {'/'.join(t.__name__ for t in types)}"
    if state["stage"] not in STAGES:
        return f"'state.stage' is {state['stage']!r}, not one of {', '.join(STAGES)}"
    if state["step"] < 0 or state["policy_steps"] < 0:
        return "'state.step' or 'state.policy_steps' is negative"
    return None


def _check_optimizers(optimizers: Any) -> str | None:
    if not isinstance(optimizers, dict):
        return "'optimizers' is not an object"
    for name, meta in optimizers.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("param_groups"), list) or not isinstance(
                meta.get("state"), dict):
            return f"'optimizers.{name}' lacks 'param_groups' (a list) or 'state' (an object)"
        if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in meta["param_groups"]):
            return f"'optimizers.{name}.param_groups' has a group without a 'params' list"
        for idx, record in meta["state"].items():
            if not idx.isdigit() or not isinstance(record, dict):
                return f"'optimizers.{name}.state.{idx}' is not an entry of a parameter index"
    return None


def _check_index(doc: Any) -> str | None:
    """Why the parsed index ``doc`` is unusable (None when it is well-formed)."""
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.get("format") != FORMAT:
        return f"no \"format\": \"{FORMAT}\""
    version = doc.get("version")
    if not _is_int(version) or version not in (1, VERSION):
        return f"format version {version!r} is not supported (this automtl reads 1 and {VERSION})"
    for key in ("serial", "weights", "state", "optimizers", "schedulers"):
        if key not in doc:
            return f"'{key}' is missing"
    if not _is_int(doc["serial"]) or doc["serial"] < 1:
        return f"'serial' is {doc['serial']!r}, not a positive whole number"
    if not isinstance(doc["weights"], str) or not _WEIGHTS_NAME.fullmatch(doc["weights"]):
        return f"'weights' is {doc['weights']!r}, not a checkpoint tensor file name"
    reason = _check_state(doc["state"]) or _check_optimizers(doc["optimizers"])
    if reason:
        return reason
    if not isinstance(doc["schedulers"], dict) or not all(isinstance(v, dict) for v in doc["schedulers"].values()):
        return "'schedulers' is not an object of objects"
    if version >= 2:
        for key in ("weights_sha256", "state_sha256"):
            if not isinstance(doc.get(key), str) or not re.fullmatch(r"[0-9a-f]{64}", doc[key]):
                return f"'{key}' is missing or not a SHA-256"
        if not _is_int(doc.get("weights_bytes")) or doc["weights_bytes"] < 0:
            return "'weights_bytes' is missing or not a whole number"
        if _state_digest(doc) != doc["state_sha256"]:
            return "the state does not match its SHA-256 (the file was changed or damaged)"
    return None


def _verify(index: Path) -> Checkpoint | str:
    """The checkpoint of ``index`` with its tensors, or why it cannot be used."""
    if not index.exists():
        return "missing"
    try:
        doc = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"not valid JSON ({' '.join(str(e).split())})"
    reason = _check_index(doc)
    if reason:
        return reason
    weights = index.parent / doc["weights"]
    try:
        digest, size = _sha256(weights)
    except OSError as e:
        return f"its tensor file {weights.name} cannot be read ({e.strerror or e})"
    if doc["version"] >= 2:
        if size != doc["weights_bytes"]:
            return f"its tensor file {weights.name} has {size} bytes, the index says {doc['weights_bytes']}"
        if digest != doc["weights_sha256"]:
            return f"its tensor file {weights.name} does not match its SHA-256 (the file was changed or damaged)"
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        return f"its tensor file {weights.name} is not readable safetensors ({' '.join(str(e).split())})"
    if not any(k.startswith("model/") for k in tensors):
        return f"its tensor file {weights.name} holds no model weights"
    for name, meta in doc["optimizers"].items():
        for idx, record in meta["state"].items():
            for key, value in record.items():
                if isinstance(value, dict) and value.get("tensor") not in tensors:
                    return f"'optimizers.{name}.state.{idx}.{key}' names a tensor that {weights.name} lacks"
    return Checkpoint(index, doc, tensors)


def _select(directory: Path) -> Checkpoint | None:
    """The newest intact checkpoint in ``directory`` (None when there is none at all).

    A corrupt ``last.json`` with an intact ``previous.json`` gives a one-line warning and is moved aside
    to ``last.json.corrupt``; with no intact checkpoint the error names the files and what to do.
    """
    last, previous = directory / LAST, directory / PREVIOUS
    if not last.exists() and not previous.exists():
        return None
    newest = _verify(last)
    if isinstance(newest, Checkpoint):
        return newest
    older = _verify(previous)
    if isinstance(older, Checkpoint):
        if last.exists():
            aside = last.with_name(LAST + ".corrupt")
            os.replace(last, aside)
            _fsync_dir(directory)
            state = older.doc["state"]
            print(f"warning: checkpoint {last} is corrupt ({newest}); resuming from the one before it, {previous} "
                  f"({state['stage']} step {state['step']}); the corrupt index was moved to {aside.name}",
                  file=sys.stderr, flush=True)
        return older
    if older == "missing":
        raise CheckpointError(f"{last}: checkpoint is corrupt ({newest}) and there is no earlier one to fall back "
                              "to; keep this directory to inspect it and start the run again with another --out")
    if newest == "missing":
        raise CheckpointError(f"{previous}: checkpoint is corrupt ({older}) and there is no other one; keep this "
                              "directory to inspect it and start the run again with another --out")
    raise CheckpointError(f"{last}: checkpoint is corrupt ({newest}), and so is the one before it, {previous} "
                          f"({older}); keep this directory to inspect it and start the run again with another --out")


def has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint (intact or not: resuming checks that)."""
    return (directory / LAST).exists() or (directory / PREVIOUS).exists()


def peek_state(directory: Path) -> dict[str, Any] | None:
    """The ``state`` of the checkpoint a resume would load (the newest intact one; None if none)."""
    found = _select(directory)
    return None if found is None else found.doc["state"]


def load_checkpoint(directory: Path, model: torch.nn.Module, optimizers: dict[str, Any],
                    schedulers: dict[str, Any], modules: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Restore ``model``, ``optimizers``, ``schedulers`` and ``modules`` in place from the newest intact
    checkpoint; return its saved ``state``."""
    found = _select(directory)
    if found is None:
        raise CheckpointError(f"{directory}: no checkpoint ({LAST}) to resume from")
    doc, tensors = found.doc, found.tensors
    wpath = found.index.parent / doc["weights"]
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    result = model.load_state_dict(model_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FileFormatError(f"{wpath}: checkpoint does not match the model (missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}); was the config changed?")
    for name, module in (modules or {}).items():
        prefix = f"module/{name}/"
        result = module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                        strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise FileFormatError(f"{wpath}: the {name} state does not match (missing {result.missing_keys[:3]}, "
                                  f"unexpected {result.unexpected_keys[:3]}); was the config changed?")
    try:
        for name, opt in optimizers.items():
            meta = doc["optimizers"].get(name)
            if meta is None:
                continue
            state = {int(idx): {k: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                                for k, v in rec.items()} for idx, rec in meta["state"].items()}
            opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        for name, sched in schedulers.items():
            if name in doc["schedulers"]:
                sched.load_state_dict(doc["schedulers"][name])
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise FileFormatError(f"{found.index}: the optimiser or LR-schedule state does not match this run "
                              f"({type(e).__name__}: {e}); was the config changed?") from None
    return doc["state"]
