"""``build_supermodel``: backbone source + heads -> SuperModel, through the multi-task passes."""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import AutomtlError
from .frontends import load_backbone
from .ir.graph import Graph
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
