"""Atrous (dilated) backbones: trade the last strides for dilation, as DeepLab does.

A classification backbone shrinks a 64x64 image to a 2x2 feature map (stride 32), too coarse for dense
tasks. ``set_output_stride(graph, 8)`` keeps every weight but removes the strides that would take the
feature map below 1/8 of the input, and dilates every later convolution by the stride removed before
it, so the receptive fields stay those the weights were trained with. This is the transformation of
torchvision's ``replace_stride_with_dilation`` and of the DeepLab ResNets AutoMTL uses: the conv whose
stride is removed keeps the dilation it had, convs after it get the accumulated rate, and padding grows
with the dilation so that spatial sizes are kept.
"""

from __future__ import annotations

from ..errors import AutomtlError
from ..ir.graph import Graph

STRIDED = ("conv2d", "maxpool2d", "avgpool2d")


def set_output_stride(graph: Graph, output_stride: int) -> Graph:
    """A copy of ``graph`` whose outputs have at most ``output_stride`` times fewer pixels per side."""
    if output_stride < 1 or output_stride & (output_stride - 1):
        raise AutomtlError(f"output_stride must be a power of two (8, 16, 32), got {output_stride}")
    out = graph.copy()
    destrided: list[str] = []
    stride: dict[str, int] = {}
    rate: dict[str, int] = {}
    for node in out.topological_order():
        s_in = max((stride[i] for i in node.inputs), default=1)
        r_in = max((rate[i] for i in node.inputs), default=1)
        s_node = node.attrs.get("stride", (1, 1)) if node.op in STRIDED else (1, 1)
        if node.op == "conv2d" and r_in > 1:
            k = node.attrs["kernel_size"]
            node.attrs["dilation"] = tuple(d * r_in if kk > 1 else d for d, kk in zip(node.attrs["dilation"], k))
            node.attrs["padding"] = tuple(p * r_in if kk > 1 else p for p, kk in zip(node.attrs["padding"], k))
        if s_node[0] != s_node[1]:
            raise AutomtlError(f"{node.where}: output_stride cannot handle unequal strides {tuple(s_node)}")
        if s_node[0] > 1 and s_in * s_node[0] > output_stride:
            node.attrs["stride"] = (1, 1)
            destrided.append(node.name)
            rate[node.name] = r_in * s_node[0]
            stride[node.name] = s_in
        else:
            rate[node.name] = r_in
            stride[node.name] = s_in * s_node[0]
    for node in out.nodes():
        if node.op != "input":
            node.shape = None
    try:
        out.materialise(seed=None)
    except AutomtlError as e:
        raise AutomtlError(f"output_stride {output_stride} does not fit graph '{graph.name}': {e}") from None
    for name in destrided:
        node = out.node(name)
        before = out.node(node.inputs[0]).shape
        if node.shape is None or before is None or tuple(node.shape[2:]) != tuple(before[2:]):
            raise AutomtlError(f"output_stride {output_stride} does not fit graph '{graph.name}': without its stride "
                               f"{node.where} would change the spatial size ({node.op} with kernel "
                               f"{node.attrs.get('kernel_size')}, padding {node.attrs.get('padding')}); use a larger "
                               "output_stride")
    return out
