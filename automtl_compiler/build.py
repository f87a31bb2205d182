"""``build_supermodel``: backbone source + heads -> SuperModel, through the multi-task passes;
``build_from_specs``: the same with heads built from task specs (the ``compile`` command and the trainer)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import AutomtlError
from .frontends import load_backbone
from .ir.graph import Graph
from .nn.heads import create_head
from .nn.supermodel import SuperModel
from .passes.dilate import set_output_stride
from .passes.feature import find_feature_node, truncate
from .passes.multitask import insert_task_branches


def build_supermodel(backbone: Any, heads: dict[str, nn.Module], *, input_shape: tuple[int, ...] | None = None,
                     feature_node: str | None = None, output_stride: int | None = None) -> SuperModel:
    """Compile ``backbone`` (anything :func:`load_backbone` reads, or a Graph) into a SuperModel.

    The graph is cut at ``feature_node`` (default: the last spatial node before global pooling, so a
    classifier is dropped), every conv becomes a unit with share / specific / skip branches for each
    task of ``heads``, and each head reads the feature map. The backbone's tensors are copied.
    ``output_stride`` (8 or 16) first turns the last strides into dilation (DeepLab's atrous backbone),
    so that dense tasks get a finer feature map from the same weights.
    """
    if not isinstance(heads, dict) or not heads:
        raise AutomtlError("heads must be a non-empty dict: task name -> head module")
    graph = backbone if isinstance(backbone, Graph) else load_backbone(backbone, input_shape=input_shape)
    if output_stride is not None:
        graph = set_output_stride(graph, output_stride)
    if feature_node is None:
        feature_node = find_feature_node(graph)
    elif feature_node not in graph:
        spatial = [n.name for n in graph.topological_order() if len(n.shape or ()) == 4][-5:]
        raise AutomtlError(f"feature node '{feature_node}' is not in the backbone; late spatial nodes are "
                           f"{spatial}")
    trunk = truncate(graph, feature_node).copy()
    return SuperModel(insert_task_branches(trunk, list(heads)), heads)


@dataclass(frozen=True)
class HeadSpec:
    """A task's head: a head type (``aspp``, ``cls``, a registered name or ``package.module:Class``), how
    many channels it predicts and its constructor options."""

    kind: str
    out_channels: int
    options: Mapping[str, Any] = field(default_factory=dict)


def build_heads(specs: Mapping[str, HeadSpec], in_channels: int) -> dict[str, nn.Module]:
    """One head per task of ``specs`` (in their order) reading a feature of ``in_channels`` channels."""
    return {task: create_head(s.kind, in_channels, s.out_channels, **dict(s.options)) for task, s in specs.items()}


def build_from_specs(graph: Graph, specs: Mapping[str, HeadSpec], *, feature_node: str | None = None,
                     output_stride: int | None = None) -> SuperModel:
    """A SuperModel of ``graph`` with heads built from ``specs`` on the feature node's channels.

    ``output_stride`` dilates the backbone first; the feature node defaults to the last spatial node before
    global pooling. Heads are created in task order after the backbone is read, so a seeded run builds
    the same initial weights every time.
    """
    if output_stride:
        graph = set_output_stride(graph, output_stride)
    feature = feature_node or find_feature_node(graph)
    if feature not in graph:
        spatial = [n.name for n in graph.topological_order() if len(n.shape or ()) == 4][-5:]
        raise AutomtlError(f"feature node '{feature}' is not in the backbone; late spatial nodes are {spatial} "
                           "(`automtl inspect BACKBONE` lists them all)")
    channels = (graph.node(feature).shape or (0, 0))[1]
    return build_supermodel(graph, build_heads(specs, channels), feature_node=feature)
