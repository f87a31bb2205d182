"""export_prototxt lowers ``sum`` (Slice + Eltwise SUM [+ Reshape]) and integer nearest ``resize``
(a depthwise all-ones Deconvolution) to upstream Caffe layers: both dialects read back to the same numbers
as torch's own sum / nearest interpolation, and what Caffe cannot express is still refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from automtl_compiler.proto import caffe_pb2
from google.protobuf import text_format
from safetensors.torch import load_file

from automtl_compiler import Graph, export_prototxt, load_backbone, to_torch
from automtl_compiler.errors import UnsupportedOpError

#: dialect -> the weights file it writes by default.
SUFFIXES = {"automtl": ".safetensors", "caffe": ".caffemodel"}
#: The upstream layer types the lowering may use (besides the Input layer).
LOWERED_TYPES = {"Input", "Slice", "Eltwise", "Reshape", "Deconvolution"}


def graph_of(shape: tuple[int, ...], *nodes: tuple[str, dict]) -> Graph:
    """A chain of nodes ``n0``, ``n1``, ... (ops with attributes) on an input ``x`` of ``shape``."""
    g = Graph("lowering")
    g.add_input("x", shape)
    src = "x"
    for i, (op, attrs) in enumerate(nodes):
        src = g.add_node(f"n{i}", op, [src], attrs).name
    g.set_outputs([src])
    return g.materialise(seed=0)


def round_trip(g: Graph, tmp_path: Path, dialect: str) -> tuple[Graph, caffe_pb2.NetParameter]:
    """Export ``g`` in ``dialect``, read it back with its weights; also return the parsed prototxt."""
    path = export_prototxt(g, tmp_path / f"{dialect}.prototxt", dialect=dialect)
    back = load_backbone(path, weights=path.with_suffix(SUFFIXES[dialect]))
    return back, text_format.Parse(path.read_text(), caffe_pb2.NetParameter())


def outputs(g: Graph, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return to_torch(g).eval()(x)


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.parametrize("dialect", sorted(SUFFIXES))
@pytest.mark.parametrize("shape,dims,keepdim", [
    ((2, 3, 4, 5), (1,), True), ((2, 3, 4, 5), (1,), False), ((2, 3, 4, 5), (2, 3), False),
    ((2, 3, 4, 5), (-1, -2), True), ((2, 1, 4, 5), (1,), False), ((2, 6), (1,), False),
])
def test_sum_round_trips_as_slice_and_eltwise(tmp_path, dialect, shape, dims, keepdim):
    g = graph_of(shape, ("sum", {"dim": list(dims), "keepdim": keepdim}))
    back, net = round_trip(g, tmp_path, dialect)
    assert {layer.type for layer in net.layer} <= LOWERED_TYPES
    slices = [layer for layer in net.layer if layer.type == "Slice"]
    assert [len(s.top) for s in slices] == [shape[d] for d in sorted(d % len(shape) for d in dims) if shape[d] > 1]
    assert "sum" not in {n.op for n in back.nodes()}
    x = torch.randn(shape)
    ref = x.sum(dim=dims, keepdim=keepdim)
    assert_matches(outputs(back, x), ref)
    assert_matches(outputs(g, x), ref)


@pytest.mark.parametrize("dialect", sorted(SUFFIXES))
def test_split_attention_sum_after_a_5d_reshape(tmp_path, dialect):
    """As SK / split attention does: [N, 2C, H, W] -> [N, 2, C, H, W] -> sum over the 2 branches."""
    n, c, h, w = 2, 3, 4, 4
    g = graph_of((n, 2 * c, h, w), ("reshape", {"shape": [2, c, h, w]}), ("sum", {"dim": [1], "keepdim": False}))
    back, _ = round_trip(g, tmp_path, dialect)
    x = torch.randn(n, 2 * c, h, w)
    assert_matches(outputs(back, x), x[:, :c] + x[:, c:])


@pytest.mark.parametrize("dialect", sorted(SUFFIXES))
@pytest.mark.parametrize("scale", [(2, 2), (2, 4), (1, 3)])
def test_integer_nearest_resize_is_an_all_ones_deconvolution(tmp_path, dialect, scale):
    shape = (2, 3, 4, 5)
    size = [shape[2] * scale[0], shape[3] * scale[1]]
    g = graph_of(shape, ("resize", {"size": size, "mode": "nearest"}))
    back, net = round_trip(g, tmp_path, dialect)
    (deconv,) = [layer for layer in net.layer if layer.type == "Deconvolution"]
    p = deconv.convolution_param
    assert (p.num_output, p.group, p.bias_term) == (3, 3, False)
    assert back.node("n0").op == "conv_transpose2d"
    weight = back.node("n0").params["weight"]
    assert weight.shape == (3, 1, *scale) and torch.equal(weight, torch.ones_like(weight))
    if dialect == "automtl":
        stored = load_file(str(tmp_path / "automtl.safetensors"))["n0/weight"]
        assert torch.equal(stored, torch.ones(3, 1, *scale))
    x = torch.randn(shape)
    ref = x.repeat_interleave(scale[0], dim=2).repeat_interleave(scale[1], dim=3)
    torch.testing.assert_close(F.interpolate(x, size=size, mode="nearest"), ref, rtol=0, atol=0)
    assert_matches(outputs(back, x), ref)
    assert_matches(outputs(g, x), ref)


@pytest.mark.parametrize("shape,node,match", [
    ((1, 2, 3, 3), ("resize", {"size": [6, 6], "mode": "bilinear"}), "bilinear mode"),
    ((1, 2, 3, 3), ("resize", {"size": [5, 5]}), r"from \[3, 3\] to \[5, 5\]"),
    ((1, 2, 6, 6), ("resize", {"size": [3, 3]}), r"from \[6, 6\] to \[3, 3\]"),
    ((2, 2, 3, 3), ("sum", {"dim": [0, 1]}), "batch axis 0"),
])
def test_what_caffe_cannot_express_is_refused(tmp_path, shape, node, match):
    g = graph_of(shape, node)
    for dialect in SUFFIXES:
        with pytest.raises(UnsupportedOpError, match=match) as info:
            export_prototxt(g, tmp_path / "x.prototxt", dialect=dialect)
        message = str(info.value)
        assert "node 'n0'" in message and f"op '{node[0]}'" in message
        if node[0] == "resize":
            assert "Caffe has no resize layer" in message
    assert not list(tmp_path.iterdir())
