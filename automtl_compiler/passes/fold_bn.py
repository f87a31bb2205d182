"""Fold each batch norm into the conv before it, for inference.

In eval mode a batch norm is a per-channel affine map, so conv -> batchnorm equals one conv with scaled
weights and a bias: w' = w * g / sqrt(v + eps), b' = (b - m) * g / sqrt(v + eps) + beta. A conv/bn pair
whose tensors are shared by several nodes (tied weights) folds to one shared pair of tensors.
"""

from __future__ import annotations

import torch

from ..ir.graph import Graph
from .infra import PassResult


def fold_batchnorm(graph: Graph) -> PassResult:
    """A copy of ``graph`` where every conv2d -> batchnorm2d pair (the conv read only by the bn) is one conv."""
    out = Graph(graph.name)
    folded: dict[tuple[int, ...], dict[str, torch.Tensor]] = {}
    rename: dict[str, str] = {}
    skip: set[str] = set()
    for node in graph.topological_order():
        users = graph.consumers(node.name)
        if node.op == "conv2d" and node.attrs["weight_std"] is None and len(users) == 1 \
                and graph.node(users[0]).op == "batchnorm2d" and node.name not in graph.outputs:
            bn = graph.node(users[0])
            if "running_mean" in bn.buffers:
                key = tuple(id(t) for t in (*node.params.values(), *bn.params.values(), *bn.buffers.values()))
                if key not in folded:
                    folded[key] = _fold(node.params, bn.params, bn.buffers, bn.attrs["eps"])
                out.add_node(bn.name, "conv2d", [rename.get(i, i) for i in node.inputs],
                             {**node.attrs, "bias": True}, params=folded[key], shape=bn.shape, source=node.source)
                rename[node.name] = bn.name
                skip.add(bn.name)
                continue
        if node.name in skip:
            continue
        out.add_node(node.name, node.op, [rename.get(i, i) for i in node.inputs], node.attrs, params=node.params,
                     buffers=node.buffers, shape=node.shape, source=node.source)
    out.set_outputs([rename.get(o, o) for o in graph.outputs])
    return PassResult(out.materialise(seed=None), bool(rename))


def _fold(conv: dict[str, torch.Tensor], bn: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
          eps: float) -> dict[str, torch.Tensor]:
    w = conv["weight"].detach()
    scale = torch.rsqrt(buffers["running_var"].double() + eps)
    if "weight" in bn:
        scale = scale * bn["weight"].double()
    bias = conv["bias"].detach().double() if "bias" in conv else torch.zeros(w.shape[0], dtype=torch.float64)
    bias = (bias - buffers["running_mean"].double()) * scale
    if "bias" in bn:
        bias = bias + bn["bias"].double()
    return {"weight": (w.double() * scale[:, None, None, None]).to(w.dtype), "bias": bias.to(w.dtype)}
