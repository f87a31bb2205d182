"""Fold weight standardisation into plain conv weights, for inference and for exporters without it."""

from __future__ import annotations

import torch

from ..ir.graph import Graph
from ..ir.modules import standardised_weight


def fold_weight_standardisation(graph: Graph) -> tuple[Graph, bool]:
    """A copy of ``graph`` where each conv2d with ``weight_std`` is a plain conv2d holding the standardised weight.

    Returns the new graph and whether anything changed. The result computes the same function in
    inference; training it no longer standardises (the weights are then ordinary weights).
    """
    out = Graph(graph.name)
    changed = False
    for node in graph.topological_order():
        attrs, params = node.attrs, node.params
        if node.op == "conv2d" and attrs["weight_std"] is not None:
            with torch.no_grad():
                w = standardised_weight(params["weight"], attrs["weight_std"], attrs["weight_scale"],
                                        params.get("gain"))
            params = {k: v for k, v in params.items() if k != "gain"} | {"weight": w}
            attrs = {**attrs, "weight_std": None, "weight_gain": False, "weight_scale": 1.0}
            changed = True
        out.add_node(node.name, node.op, node.inputs, attrs, params=params, buffers=node.buffers, shape=node.shape,
                     source=node.source)
    out.set_outputs(graph.outputs)
    return out, changed
