"""Checkpoints that survive a kill: tensors in safetensors, everything else in JSON, no pickle.

A checkpoint is ``state-<n>.safetensors`` (model weights and optimiser tensors) plus ``last.json``
naming it. The tensor file is written first, then ``last.json`` is replaced atomically, then older
tensor files are removed: whenever the process dies, ``last.json`` names a complete tensor file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import FileFormatError
from ..ir.serialize import atomic_write

FORMAT = "automtl-checkpoint"


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


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizers: dict[str, Any],
                    schedulers: dict[str, Any], state: dict[str, Any],
                    modules: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write a checkpoint of ``model``, ``optimizers`` (name -> optimiser), LR ``schedulers``, ``state`` and
    other ``modules`` with learnable state (a gradient scheduler's)."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    for name, module in (modules or {}).items():
        tensors.update({f"module/{name}/{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
    opt_meta = {}
    for name, opt in optimizers.items():
        t, meta = _split_optimizer(name, opt)
        tensors.update(t)
        opt_meta[name] = meta
    previous = _read_index(directory)
    serial = (previous or {}).get("serial", 0) + 1
    weights = directory / f"state-{serial}.safetensors"
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp)))
    doc = {"format": FORMAT, "version": 1, "serial": serial, "weights": weights.name, "state": state,
           "optimizers": opt_meta, "schedulers": {k: s.state_dict() for k, s in schedulers.items()}}
    atomic_write(directory / "last.json", lambda tmp: tmp.write_text(json.dumps(doc)))
    for old in directory.glob("state-*.safetensors"):
        if old.name != weights.name:
            old.unlink(missing_ok=True)
    return weights


def _read_index(directory: Path) -> dict[str, Any] | None:
    path = directory / "last.json"
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: corrupt checkpoint index ({e}); remove the run directory or use "
                              "--overwrite") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FileFormatError(f"{path}: not an automtl checkpoint index")
    return doc


def has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds a checkpoint."""
    return (directory / "last.json").exists()


def peek_state(directory: Path) -> dict[str, Any] | None:
    """The ``state`` of the last checkpoint in ``directory`` without loading any tensor (None if none)."""
    doc = _read_index(directory)
    return None if doc is None else doc["state"]


def load_checkpoint(directory: Path, model: torch.nn.Module, optimizers: dict[str, Any],
                    schedulers: dict[str, Any], modules: dict[str, torch.nn.Module] | None = None) -> dict[str, Any]:
    """Restore ``model``, ``optimizers``, ``schedulers`` and ``modules`` in place; return the saved ``state``."""
    doc = _read_index(directory)
    if doc is None:
        raise FileFormatError(f"{directory}: no checkpoint (last.json) to resume from")
    wpath = directory / doc["weights"]
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as e:
        raise FileFormatError(f"{wpath}: corrupt checkpoint weights ({e}); use --overwrite to start again") from None
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
    return doc["state"]
