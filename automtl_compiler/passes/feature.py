"""Feature-node detection and truncation: where the task heads attach to a backbone."""

from __future__ import annotations

from ..errors import GraphError
from ..ir.graph import Graph, Node

_REDUCTIONS = {"mean", "sum", "amax"}


def _reduces_space(graph: Graph, node: Node) -> bool:
    """Whether ``node`` removes the spatial dimensions: global pooling (adaptive to 1x1, or a window over the
    whole unpadded input), a conv whose kernel covers the whole map (a dense layer written as a conv, as
    VGG's and FCN's fc6), a spatial reduction, flatten, a reshape to fewer dimensions or a linear layer on
    flat features."""
    out = node.shape or ()
    if node.op == "flatten" or (node.op in ("reshape", "linear") and len(out) < 4):
        return True
    if node.op in ("adaptive_avgpool2d", "adaptive_maxpool2d"):
        return tuple(node.attrs["output_size"]) == (1, 1)
    if node.op in ("avgpool2d", "maxpool2d", "conv2d"):  # a window over the whole map: a conv is then dense
        src = graph.node(node.inputs[0]).shape or ()
        return len(src) == 4 and src[2] * src[3] > 1 and tuple(node.attrs["kernel_size"]) == tuple(src[2:]) \
            and not any(node.attrs["padding"])
    if node.op in _REDUCTIONS:
        return bool({d % 4 for d in node.attrs["dim"]} & {2, 3})
    return False


def _before_enlarging_pool(graph: Graph, name: str) -> str:
    """An adaptive pool that enlarges its input (timm's VGG pre-logits on a small image) adds nothing: the
    features are its input."""
    node = graph.node(name)
    while node.op in ("adaptive_avgpool2d", "adaptive_maxpool2d"):
        src = graph.node(node.inputs[0])
        if src.shape is None or len(src.shape) != 4 or any(o < i for o, i in zip(node.shape[2:], src.shape[2:])):
            break
        node = src
    return node.name


def find_feature_node(graph: Graph) -> str:
    """The last node with a spatial (4-D) output before global pooling or flatten.

    Walks the graph in order to the first node that removes the spatial dimensions (global pooling,
    a spatial mean, sum or max, flatten, linear) for good - nothing after it is spatial again, which
    rules out the pooling inside squeeze-excitation and selective-kernel blocks - and returns its 4-D
    input; a graph with no such node (a dense backbone such as AutoMTL's DeepLab ResNet) gives its single
    4-D output.
    """
    import networkx as nx

    def spatial(name: str) -> bool:
        shape = graph.node(name).shape or ()
        return len(shape) == 4 and shape[2] * shape[3] > 1

    for node in graph.topological_order():
        if _reduces_space(graph, node) and not any(spatial(d) for d in nx.descendants(graph.nx, node.name)):
            src = graph.node(node.inputs[0])
            if src.shape is None or len(src.shape) != 4:
                raise GraphError(f"{node.where} reduces a non-spatial tensor; name the feature node explicitly")
            return _before_enlarging_pool(graph, src.name)
    spatial_outputs = [o for o in graph.outputs if len(graph.node(o).shape or ()) == 4]
    if len(spatial_outputs) != 1:
        raise GraphError(f"graph '{graph.name}' has no global pooling and {len(spatial_outputs)} spatial outputs; "
                         "name the feature node explicitly (feature_node=...)")
    return spatial_outputs[0]


def truncate(graph: Graph, feature_node: str) -> Graph:
    """A copy of ``graph`` holding only what ``feature_node`` depends on, with that node as the output."""
    node = graph.node(feature_node)
    if node.shape is None or len(node.shape) != 4:
        raise GraphError(f"feature node '{feature_node}' has shape {list(node.shape or ())}; a head needs a "
                         "4-D [N, C, H, W] feature map: pick a node before global pooling")
    import networkx as nx

    keep = nx.ancestors(graph.nx, feature_node) | {feature_node}
    out = Graph(graph.name)
    for n in graph.topological_order():
        if n.name in keep:
            out.add_node(n.name, n.op, n.inputs, n.attrs, params=n.params, buffers=n.buffers, shape=n.shape,
                         source=n.source)
    out.set_outputs([feature_node])
    return out
