"""SuperModel -> ONNX with the policy gates as an input (soft view) or folded to 1/3 (pre-training view).

The exported graph is what ``SuperModel.forward_all`` runs in soft mode - every unit's share, specific
and skip branches mixed by ``gates[task, unit]`` - followed by each task's head, so the whole supernet
can be opened in Netron or run in onnxruntime with any gates. As for compact models, the file appears at
its path only after onnxruntime has run it and matched PyTorch; a failed export leaves no file behind
and never touches an existing file at that path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from ..errors import AutomtlError, one_line
from ..ir.ops_multitask import BRANCHES
from ..ir.serialize import atomic_write
from ..nn.heads import apply_head
from .onnx_export import (
    DEFAULT_OPSET,
    METADATA_PREFIX,
    OPSET_RANGE,
    _dedupe_initialisers,
    _torch_export,
    check_outputs,
    save_checked,
)
from .torch_codegen import generate

VIEWS = ("soft", "pretrain")
METADATA_FORMAT = "automtl-onnx-supermodel"
INPUT = "input"
GATES = "gates"


class _SuperModelView(nn.Module):
    """The SuperModel as torch.onnx sees it: (image[, gates]) -> one tensor per task, heads applied.

    ``body`` is the generated soft-mode module (gates an input, common work merged) over the SuperModel's
    own modules; without a gates argument the gates are the constant 1/3 of pre-training.
    """

    def __init__(self, body: nn.Module, heads: Sequence[nn.Module], gates_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.body = body
        self.heads = nn.ModuleList(heads)
        self.gates_shape = gates_shape

    def forward(self, x: torch.Tensor, gates: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if gates is None:
            gates = torch.full(self.gates_shape, 1 / 3, dtype=x.dtype, device=x.device)
        feats = self.body(x, gates)
        return tuple(apply_head(head, f, x) for head, f in zip(self.heads, feats))


def export_supermodel_onnx(sm: Any, path: str | Path, *, tasks: Sequence[str] | None = None, view: str = "soft",
                           input_shape: Sequence[int] | None = None, opset: int | None = None,
                           dynamic_batch: bool = True, verify: bool = True, atol: float = 1e-4,
                           seed: int = 0) -> Path:
    """Write a :class:`~automtl_compiler.nn.supermodel.SuperModel` as one ONNX graph and verify it.

    Inputs: ``input`` (N, C, H, W) and, for ``view="soft"``, ``gates`` of shape [T, U, 3] - T the model's
    tasks (all of them, in ``sm.tasks`` order, whichever are exported), U its units (``sm.unit_names``
    order), the last axis the weights of the share, specific and skip branches (usually a softmax; a
    one-hot row selects one branch). ``view="pretrain"`` has no gates input: they are the constant 1/3 of
    pre-training. Outputs: one per task of ``tasks`` (default all), named after the task, heads applied,
    in the order given. ``input_shape`` defaults to the SuperModel's input shape; the batch axis is
    dynamic unless ``dynamic_batch=False``.

    ``metadata_props`` (values JSON, keys prefixed ``automtl.``) record ``format``, ``view``, ``tasks``,
    ``model_tasks`` (gates axis 0), ``units`` (axis 1), ``branches`` (axis 2), ``input_shape``,
    ``gates_shape`` (null for pretrain), ``output_shapes`` and ``opset``. The model is exported in eval
    mode; every submodule's mode is restored afterwards. With ``verify`` the file is run in onnxruntime
    (CPU) on seeded random images (batch 1 and 3 when the batch is dynamic) and seeded random softmax
    gates, and each output must satisfy ``max |onnx - torch| <= atol * max(1, max |torch|)`` against the
    PyTorch model. Any failure raises AutomtlError and leaves no file at ``path``.
    """
    path = Path(path)
    opset = DEFAULT_OPSET if opset is None else opset
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise AutomtlError(f"ONNX opset {opset!r} is not supported; use {OPSET_RANGE[0]} to {OPSET_RANGE[1]} "
                           f"(default {DEFAULT_OPSET})")
    _check_supermodel(sm)
    if view not in VIEWS:
        raise AutomtlError(f"unknown view {view!r}; use 'soft' (gates an input) or 'pretrain' (gates 1/3)")
    names_out = _check_tasks(sm, tasks)
    shape = _input_shape(sm, input_shape)
    gates_shape = (len(sm.tasks), len(sm.units), len(BRANCHES))
    body = generate(sm.call_graph(("soft", tuple(names_out))), sm, paths=sm.mt.module_paths, as_tuple=True,
                    class_name="SuperModelSoft")
    wrapper = _SuperModelView(body, [sm.heads[t] for t in names_out], gates_shape)
    names_in = [INPUT, GATES] if view == "soft" else [INPUT]
    device = next(iter(sm.parameters())).device
    gen = torch.Generator().manual_seed(seed)
    example = [torch.randn(*shape, generator=gen).to(device)]
    if view == "soft":
        example.append(_random_gates(gates_shape, gen).to(device))
    axes = {n: {0: "batch"} for n in [INPUT, *names_out]} if dynamic_batch else None
    modes = {m: m.training for m in sm.modules()}
    try:
        wrapper.eval()  # torch.onnx restores the wrapper's mode after export, recursively: keep it eval
        try:
            with torch.no_grad():
                ref = wrapper(*example)
        except (RuntimeError, ValueError) as e:
            raise AutomtlError(f"the SuperModel cannot run on an input of shape {list(shape)} "
                               f"({one_line(e)}); choose another input shape") from None
        meta = _metadata(sm, view, names_out, shape, gates_shape, ref, dynamic_batch, opset)

        def write(tmp: Path) -> None:
            _torch_export(wrapper, tuple(example), tmp, opset, names_out, axes, True, False, names_in)
            proto = onnx.load(str(tmp))
            _dedupe_initialisers(proto)
            _declare_output_shapes(proto, json.loads(meta[METADATA_PREFIX + "output_shapes"]))
            _describe(proto, sm, view)
            save_checked(proto, meta, tmp, path)
            if verify:
                _verify(tmp, wrapper, shape, gates_shape if view == "soft" else None, names_out, dynamic_batch,
                        seed, atol, device, path)

        atomic_write(path, write)
    finally:
        for module, training in modes.items():
            module.training = training
    return path


def _check_supermodel(sm: Any) -> None:
    from ..nn.supermodel import SuperModel

    if not isinstance(sm, SuperModel):
        raise AutomtlError(f"export_supermodel_onnx takes a SuperModel (build_supermodel or SuperModel.load), not "
                           f"a {type(sm).__name__}; for a compact model use export_onnx")


def _check_tasks(sm: Any, tasks: Sequence[str] | str | None) -> list[str]:
    if tasks is None:
        return list(sm.tasks)
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise AutomtlError(f"no tasks to export; give some of {list(sm.tasks)} or None for all")
    for t in names:
        if t not in sm.tasks:
            raise AutomtlError(f"unknown task {t!r}; the model's tasks are {list(sm.tasks)}")
    dup = sorted({t for t in names if names.count(t) > 1})
    if dup:
        raise AutomtlError(f"task(s) {dup} given more than once; each output is named after its task")
    return names


def _input_shape(sm: Any, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    trunk = sm.mt.trunk
    declared = tuple(int(d) for d in (trunk.node(trunk.inputs[0]).shape or ()))
    if input_shape is None:
        if len(declared) != 4:
            raise AutomtlError("the SuperModel records no (N, C, H, W) input shape; pass input_shape=(N, C, H, W)")
        return declared
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise AutomtlError(f"input_shape {input_shape!r} is not a shape; give (N, C, H, W)") from None
    if len(shape) != 4 or any(d <= 0 for d in shape):
        raise AutomtlError(f"input_shape {list(shape)} must be four positive numbers (N, C, H, W)")
    if len(declared) == 4 and shape[1] != declared[1]:
        raise AutomtlError(f"input_shape {list(shape)} has {shape[1]} channels but the model takes {declared[1]}")
    return shape


def _random_gates(shape: tuple[int, int, int], gen: torch.Generator) -> torch.Tensor:
    """Softmax of seeded normal logits (scaled so that rows are far from uniform): gates as training sees them."""
    return torch.softmax(3 * torch.randn(*shape, generator=gen), dim=-1)


def _metadata(sm: Any, view: str, names: list[str], shape: tuple[int, ...], gates_shape: tuple[int, int, int],
              ref: tuple[torch.Tensor, ...], dynamic_batch: bool, opset: int) -> dict[str, str]:
    from ..version import __version__

    def dims(t_shape: Sequence[int]) -> list[int | str]:
        return ["batch" if dynamic_batch and i == 0 else int(d) for i, d in enumerate(t_shape)]

    fields: dict[str, Any] = {
        "format": {"name": METADATA_FORMAT, "version": 1},
        "view": view,
        "tasks": names,
        "model_tasks": list(sm.tasks),
        "units": list(sm.unit_names),
        "branches": list(BRANCHES),
        "input_name": INPUT,
        "input_shape": dims(shape),
        "example_input_shape": list(shape),
        "gates_name": GATES if view == "soft" else None,
        "gates_shape": list(gates_shape) if view == "soft" else None,
        "output_shapes": {n: dims(r.shape) for n, r in zip(names, ref)},
        "example_output_shapes": {n: list(r.shape) for n, r in zip(names, ref)},
        "opset": opset,
        "automtl_version": __version__,
    }
    return {METADATA_PREFIX + k: json.dumps(v) for k, v in fields.items()}


def _declare_output_shapes(proto: onnx.ModelProto, shapes: dict[str, list[int | str]]) -> None:
    """Give each output its known shape: torch leaves the height and width of a head that resizes to the
    input's size symbolic (it reads them from the input's shape), although only the batch axis varies."""
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shapes[value.name]):
            continue
        for dim, size in zip(dims, shapes[value.name]):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def _describe(proto: onnx.ModelProto, sm: Any, view: str) -> None:
    """Doc strings that Netron shows: what the graph is and what the gates axes mean."""
    proto.doc_string = (f"AutoMTL SuperModel over '{sm.mt.trunk.name}', {view} view: every unit's share, specific "
                        "and skip branches " + ("mixed by the gates input" if view == "soft"
                                                else "averaged (gates 1/3, pre-training)"))
    for value in proto.graph.input:
        if value.name == GATES:
            value.doc_string = (f"gates [tasks, units, 3]: tasks {list(sm.tasks)}, units in automtl.units order, "
                                f"last axis {list(BRANCHES)}")


def _verify(path: Path, wrapper: nn.Module, shape: tuple[int, ...], gates_shape: tuple[int, int, int] | None,
            names: list[str], dynamic_batch: bool, seed: int, atol: float, device: torch.device,
            shown_as: Path) -> None:
    """Run ``path`` in onnxruntime on seeded images (and gates) and compare each output with ``wrapper``.

    The tolerance is verify_compact_onnx's: ``max |onnx - torch| <= atol * max(1, max |torch|)``.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
        raise AutomtlError(f"onnxruntime cannot load the exported model ({one_line(e, 300)}); {shown_as} was not "
                           "written") from None
    gen = torch.Generator().manual_seed(seed + 1)
    n, c, h, w = shape
    for batch in ([1, 3] if dynamic_batch else [n]):
        inputs = [torch.randn(batch, c, h, w, generator=gen)]
        if gates_shape is not None:
            inputs.append(_random_gates(gates_shape, gen))
        with torch.no_grad():
            want = wrapper(*(t.to(device) for t in inputs))
        try:
            got = session.run(names, {k: t.numpy() for k, t in zip([INPUT, GATES], inputs)})
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            raise AutomtlError(f"ONNX verification failed: onnxruntime cannot run the model on an input of shape "
                               f"{list(inputs[0].shape)} ({one_line(e, 300)}); {shown_as} was not written") from None
        check_outputs(names, got, want, atol=atol, input_shape=tuple(inputs[0].shape), where=shown_as)


__all__ = ["VIEWS", "export_supermodel_onnx"]
