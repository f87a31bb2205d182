"""IR -> PyTorch: the one code generator, making a ``torch.fx.GraphModule`` of a graph.

The forward is generated Python code (one line per node), not an interpreter walking the graph, so the
compiled module runs as fast as a hand-written one, trains (parameters and batch-norm buffers are real
module state), and is itself traceable by torch.fx and exportable by ``torch.onnx.export``.

Two callers: :func:`to_torch` compiles a graph into a fresh module (every module named by
:class:`~automtl_compiler.backends.names.Namer`); a SuperModel first installs the modules of its
multi-task graph at fixed paths (:func:`install_modules`) and then generates, for each kind of call, code
over a pruned or bound copy of that graph whose nodes call those modules (:func:`generate` with ``paths``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from torch import fx, nn

from ..errors import AutomtlError
from ..ir.graph import Graph, Node
from ..ir.ops import get_op
from .names import Namer, module_name


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at dotted ``path`` under ``root``, creating ``nn.ModuleDict`` s on the way."""
    *parents, leaf = path.split(".")
    here = root
    for part in parents:
        if part not in here._modules:
            here.add_module(part, nn.ModuleDict())
        here = here._modules[part]  # type: ignore[assignment]
    here.add_module(leaf, module)


def adopt_tensors(node: Node, module: nn.Module) -> None:
    """Make ``node`` hold ``module``'s parameters and buffers (the same objects)."""
    node.params = {k: getattr(module, k) for k in node.params}
    node.buffers = {k: getattr(module, k) for k in node.buffers}


def install_modules(graph: Graph, root: nn.Module, paths: Mapping[str, str]) -> None:
    """Lower every node of ``graph`` that ``paths`` names into ``root`` at its path (once per path).

    Nodes with the same path share one module (a backbone layer that several tasks run); afterwards each
    such node holds that module's tensors, so the graph and the module are the same weights. Modules are
    added in the graph's insertion order (so a builder decides the order of the state dict).
    """
    installed: dict[str, nn.Module] = {}
    for node in graph.nodes():
        path = paths.get(node.name)
        if path is None:
            continue
        if path not in installed:
            lowering = get_op(node.op, node.where).lower(node.attrs, node.params, node.buffers)
            if lowering.module is None:
                raise AutomtlError(f"{node.where}: op '{node.op}' is a function, it cannot live at '{path}'")
            _set_submodule(root, path, lowering.module)
            installed[path] = lowering.module
        adopt_tensors(node, installed[path])


def generate(graph: Graph, root: nn.Module, *, paths: Mapping[str, str] | None = None,
             outputs: Sequence[str] | None = None, as_tuple: bool = False,
             class_name: str = "Generated") -> fx.GraphModule:
    """Code for ``graph`` over ``root``: nodes named in ``paths`` call the module already at that path;
    other nodes are lowered (functions inline, modules added to ``root`` under a unique attribute).

    The module returns ``outputs`` (default: the graph's), one tensor alone unless ``as_tuple``. A tensor
    that several lowered nodes hold (tied weights) becomes one Parameter. ``gm.meta["automtl_module_names"]``
    maps each lowered node that has a module to its attribute.
    """
    fxg = fx.Graph()
    tied: dict[int, nn.Parameter] = {}
    values: dict[str, fx.Node] = {}
    names = Namer(taken=tuple(root._modules))
    arguments = Namer(taken=("self",))
    paths = paths or {}
    for node in graph.topological_order():
        if node.op == "input":
            values[node.name] = fxg.placeholder(arguments(node.name))
            continue
        args = tuple(values[i] for i in node.inputs)
        if node.name in paths:
            value = fxg.create_node("call_module", paths[node.name], args, {}, name=module_name(node.name))
        else:
            lowering = get_op(node.op, node.where).lower(node.attrs, node.params, node.buffers)
            if lowering.module is not None:
                for key, tensor in node.params.items():  # a tensor on several nodes is one Parameter (tied)
                    if id(tensor) in tied:
                        setattr(lowering.module, key, tied[id(tensor)])
                    else:
                        tied[id(tensor)] = getattr(lowering.module, key)
                target = names(node.name)
                root.add_module(target, lowering.module)
                value = fxg.create_node("call_module", target, args, {}, name=module_name(node.name))
            else:
                value = fxg.create_node("call_function", lowering.function, args, dict(lowering.kwargs),
                                        name=module_name(node.name))
        value.meta["automtl_node"] = node.name
        values[node.name] = value
    outs = [values[o] for o in (graph.outputs if outputs is None else outputs)]
    fxg.output(tuple(outs) if as_tuple or len(outs) != 1 else outs[0])
    gm = fx.GraphModule(root, fxg, class_name)
    gm.meta = {"automtl_outputs": list(graph.outputs if outputs is None else outputs),
               "automtl_module_names": dict(names.mapping)}
    return gm


def to_torch(graph: Graph, *, class_name: str | None = None) -> fx.GraphModule:
    """Compile ``graph`` to a GraphModule whose forward takes the graph inputs in order.

    Returns a single tensor when the graph has one output, else a tuple in output order. As in torch.fx,
    the module's parameters and buffers are the graph's tensors, not copies: compiling is cheap, and
    training the module updates the graph (save it afterwards to keep the trained weights). Compile
    ``graph.copy()`` for an independent module. Modules are attributes named by
    :class:`~automtl_compiler.backends.names.Namer` (unique, valid, never a torch attribute).
    """
    return generate(graph, nn.Module(), class_name=class_name or re.sub(r"\W", "_", graph.name) or "Compiled")


__all__ = ["adopt_tensors", "generate", "install_modules", "module_name", "to_torch"]
