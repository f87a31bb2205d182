"""IR -> PyTorch: generate a ``torch.fx.GraphModule``.

The forward is generated Python code (one line per node), not an interpreter walking the graph, so the
compiled module runs as fast as a hand-written one, trains (parameters and batch-norm buffers are real
module state), and is itself traceable by torch.fx and exportable by ``torch.onnx.export``.
"""

from __future__ import annotations

import re

from torch import fx, nn

from ..ir.graph import Graph
from ..ir.ops import get_op
from .names import Namer, module_name


def to_torch(graph: Graph, *, class_name: str | None = None) -> fx.GraphModule:
    """Compile ``graph`` to a GraphModule whose forward takes the graph inputs in order.

    Returns a single tensor when the graph has one output, else a tuple in output order. A tensor that
    several nodes hold (tied weights, e.g. a shared conv on two branches) becomes one Parameter. As in torch.fx,
    the module's parameters and buffers are the graph's tensors, not copies: compiling is cheap, and
    training the module updates the graph (save it afterwards to keep the trained weights). Compile
    ``graph.copy()`` for an independent module.

    Modules are attributes named by :class:`~automtl_compiler.backends.names.Namer` (unique, valid, never a
    torch attribute); ``gm.meta["automtl_module_names"]`` maps each node that has a module to its attribute.
    """
    fxg = fx.Graph()
    modules: dict[str, nn.Module] = {}
    tied: dict[int, nn.Parameter] = {}
    values: dict[str, fx.Node] = {}
    names = Namer()
    arguments = Namer(taken=("self",))
    for node in graph.topological_order():
        if node.op == "input":
            values[node.name] = fxg.placeholder(arguments(node.name))
            continue
        opdef = get_op(node.op, node.where)
        lowering = opdef.lower(node.attrs, node.params, node.buffers)
        args = tuple(values[i] for i in node.inputs)
        if lowering.module is not None:
            for key, tensor in node.params.items():  # a tensor on several nodes is one Parameter (tied)
                if id(tensor) in tied:
                    setattr(lowering.module, key, tied[id(tensor)])
                else:
                    tied[id(tensor)] = getattr(lowering.module, key)
            mname = names(node.name)
            modules[mname] = lowering.module
            value = fxg.create_node("call_module", mname, args, {}, name=module_name(node.name))
        else:
            value = fxg.create_node("call_function", lowering.function, args, dict(lowering.kwargs),
                                    name=module_name(node.name))
        value.meta["automtl_node"] = node.name
        values[node.name] = value
    outs = [values[o] for o in graph.outputs]
    fxg.output(outs[0] if len(outs) == 1 else tuple(outs))
    root = nn.Module()
    for mname, mod in modules.items():
        root.add_module(mname, mod)
    gm = fx.GraphModule(root, fxg, class_name or re.sub(r"\W", "_", graph.name) or "Compiled")
    gm.meta = {"automtl_outputs": list(graph.outputs), "automtl_module_names": dict(names.mapping)}
    return gm


__all__ = ["module_name", "to_torch"]
