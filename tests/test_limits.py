"""Bounded cost for hostile input: every finding of the hardening issue as a tiny file or spec.

Each must end quickly in one clear AutomtlError naming the place and (for size limits) the limit and how to
raise it, without allocating what the input asks for; real models must still load.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from automtl_compiler import limits
from automtl_compiler.errors import (
    AutomtlError,
    FileFormatError,
    GraphError,
    ParseError,
)
from automtl_compiler.frontends.onnx import load_onnx
from automtl_compiler.frontends.prototxt import load_prototxt
from automtl_compiler.ir import Graph, load_graph, save_graph
from automtl_compiler.ir.serialize import check_safetensors, read_json
from automtl_compiler.limits import FileLimitError, LimitError
from automtl_compiler.nn.heads import ASPPHead, ClassificationHead, make_head

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- helpers


def _onnx_model(nodes: list, inputs: list, outputs: list, initializers: list | None = None) -> object:
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers or [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def constant_of_shape_bomb(path: Path, n: int = 10**10) -> Path:
    """A tiny ONNX file whose ConstantOfShape would make ``n`` float32 values when evaluated at load."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    size = numpy_helper.from_array(np.array([n], dtype=np.int64), "size")
    nodes = [helper.make_node("ConstantOfShape", ["size"], ["big"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=1),
             helper.make_node("Add", ["x", "s"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    onnx.save(_onnx_model(nodes, [x], [y], [size]), path)
    return path


def relu_model(path: Path, shape: list[int]) -> Path:
    """An ONNX file with one Relu on an input of ``shape``."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    onnx.save(_onnx_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y]), path)
    return path


def conv_prototxt(path: Path, conv: str, input_dims: str = "dim: 1 dim: 3 dim: 16 dim: 16") -> Path:
    """A one-convolution prototxt with ``conv`` as the body of its convolution_param."""
    path.write_text(textwrap.dedent(f"""\
        name: "t"
        layer {{
          name: "data"
          type: "Input"
          top: "data"
          input_param {{ shape {{ {input_dims} }} }}
        }}
        layer {{
          name: "conv1"
          type: "Convolution"
          bottom: "data"
          top: "conv1"
          convolution_param {{ {conv} }}
        }}
        """))
    return path


def graph_json(tmp_path: Path, nodes: list[dict], outputs: list[str], *, name: str = "g.json") -> Path:
    """A structure-only graph file (no weights: they would be initialised on load)."""
    path = tmp_path / name
    path.write_text(json.dumps({"format": "automtl-graph", "version": 1, "name": "g", "outputs": outputs,
                                "weights": None, "nodes": nodes}))
    return path


def _input(shape: list[int]) -> dict:
    return {"name": "x", "op": "input", "inputs": [], "attrs": {"shape": shape}, "params": [], "buffers": [],
            "shape": None}


def _conv(attrs: dict) -> dict:
    return {"name": "conv", "op": "conv2d", "inputs": ["x"], "attrs": attrs, "params": [], "buffers": [],
            "shape": None}


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text.strip(), text
    return text


def run_bounded(code: str, timeout: float = 60) -> tuple[str, int]:
    """Run ``code`` in a fresh interpreter; returns (its output, its peak RSS growth in MiB after imports)."""
    prog = textwrap.dedent("""\
        import resource, sys
        import automtl_compiler, automtl_compiler.frontends.onnx, automtl_compiler.frontends.prototxt
        import onnx.reference, onnxruntime
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
        {body}
        except automtl_compiler.errors.AutomtlError as e:
            print(type(e).__name__ + ": " + str(e))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("GROWTH", (peak - base) // 1024)
        """).format(body=textwrap.indent(textwrap.dedent(code), "    "))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=timeout, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    return "\n".join(lines[:-1]), int(lines[-1].split()[1])


# ---------------------------------------------------------------- the limits module


def test_limits_are_documented_and_raisable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in limits.NAMES:
        assert isinstance(getattr(limits, name), int) and getattr(limits, name) > 0
        assert name in (limits.__doc__ or "") or "MAX_" in name
    assert limits.get("MAX_PARAMS") == 2_000_000_000
    monkeypatch.setenv("AUTOMTL_MAX_PARAMS", "5e9")
    assert limits.get("MAX_PARAMS") == 5_000_000_000
    with limits.override(MAX_PARAMS=7):
        assert limits.get("MAX_PARAMS") == 7
    assert limits.get("MAX_PARAMS") == 5_000_000_000
    monkeypatch.setenv("AUTOMTL_MAX_PARAMS", "lots")
    with pytest.raises(AutomtlError, match="AUTOMTL_MAX_PARAMS"):
        limits.get("MAX_PARAMS")


def test_limit_error_names_limit_value_and_remedy() -> None:
    with pytest.raises(LimitError) as e:
        limits.check("MAX_CHANNELS", 10**7, "the channel count", "node 'c'")
    text = one_line(e)
    for part in ("node 'c'", "10,000,000", "MAX_CHANNELS=1,048,576", "AUTOMTL_MAX_CHANNELS", "override("):
        assert part in text


def test_json_depth_is_found_without_recursion() -> None:
    assert limits.json_depth('{"a": [1, {"b": "[[[[{{{"}]}') == 3
    deep = "[" * 200_000 + "]" * 200_000
    start = time.perf_counter()
    assert limits.json_depth(deep) == 200_000
    assert time.perf_counter() - start < 5


# ---------------------------------------------------------------- ONNX


def test_onnx_constant_of_shape_bomb_is_refused_before_evaluation(tmp_path: Path) -> None:
    path = constant_of_shape_bomb(tmp_path / "bomb.onnx")
    assert path.stat().st_size < 1000
    out, growth = run_bounded(f"automtl_compiler.frontends.onnx.load_onnx({str(path)!r})")
    assert out.startswith("LimitError: ") and "\n" not in out, out
    for part in (str(path), "ConstantOfShape", "40,000,000,000", "MAX_FOLD_BYTES", "AUTOMTL_MAX_FOLD_BYTES"):
        assert part in out, out
    assert growth < 200, f"peak RSS grew by {growth} MiB"


@pytest.mark.parametrize("op", ["Expand", "Tile", "Range"])
def test_onnx_other_expanding_folds_are_bounded(tmp_path: Path, op: str) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def i64(name: str, v: object) -> object:
        return numpy_helper.from_array(np.array(v, dtype=np.int64), name)

    if op == "Expand":
        inits = [numpy_helper.from_array(np.ones((1, 1), np.float32), "a"), i64("b", [10**6, 10**6])]
    elif op == "Tile":
        inits = [numpy_helper.from_array(np.ones((2, 2), np.float32), "a"), i64("b", [10**6, 10**6])]
    else:
        inits = [i64("a", 0), i64("b", 10**12), i64("c", 1)]
    names = [i.name for i in inits]
    nodes = [helper.make_node(op, names, ["big"]), helper.make_node("Relu", ["x"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8, 8])
    onnx.save(_onnx_model(nodes, [x], [y], inits), tmp_path / "m.onnx")
    start = time.perf_counter()
    with pytest.raises(LimitError, match=f"op {op}.*MAX_FOLD_BYTES") as e:
        load_onnx(tmp_path / "m.onnx")
    one_line(e)
    assert time.perf_counter() - start < 5


def test_onnx_huge_input_is_refused(tmp_path: Path) -> None:
    path = relu_model(tmp_path / "big.onnx", [1, 3, 100000, 100000])
    with pytest.raises(LimitError, match=r"big\.onnx.*100,000.*MAX_SPATIAL") as e:
        load_onnx(path)
    one_line(e)
    with pytest.raises(LimitError, match="MAX_SPATIAL"):
        load_onnx(relu_model(tmp_path / "ok.onnx", [1, 3, 8, 8]), input_shape=(1, 3, 100000, 100000))


def test_bench_cli_refuses_a_huge_input_with_one_line(tmp_path: Path) -> None:
    path = relu_model(tmp_path / "big.onnx", [1, 3, 100000, 100000])
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "automtl_compiler.cli.main", "bench", str(path), "--provider",
                          "cpu", "--repeat", "1", "--warmup", "0"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=tmp_path, check=False)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert "100,000" in lines[0] and "MAX_SPATIAL" in lines[0] and str(path) in lines[0]
    assert time.perf_counter() - start < 60


def test_session_refuses_onnxruntime_constant_folding_bomb(tmp_path: Path) -> None:
    path = constant_of_shape_bomb(tmp_path / "bomb.onnx")
    out, growth = run_bounded(f"""\
        from automtl_compiler.runtime import InferenceSession
        InferenceSession({str(path)!r}, provider="cpu")""")
    assert out.startswith("LimitError: ") and "MAX_FOLD_BYTES" in out and str(path) in out, out
    assert growth < 200, f"peak RSS grew by {growth} MiB"


def test_example_input_is_checked_before_allocating(tmp_path: Path) -> None:
    from automtl_compiler.runtime import InferenceSession

    session = InferenceSession(relu_model(tmp_path / "m.onnx", ["N", 3, 8, 8]), provider="cpu")
    assert session.example_input(2).shape == (2, 3, 8, 8)
    with pytest.raises(LimitError, match="MAX_TENSOR_BYTES"):
        session.example_input(10**8)


def test_session_metadata_too_deep_is_a_file_error(tmp_path: Path) -> None:
    import onnx

    from automtl_compiler.runtime import InferenceSession

    path = relu_model(tmp_path / "m.onnx", [1, 3, 8, 8])
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"automtl.tasks": "[" * 100_000 + "]" * 100_000})
    onnx.save(model, path)
    with pytest.raises(FileLimitError, match="MAX_JSON_DEPTH"):
        InferenceSession(path, provider="cpu")


# ---------------------------------------------------------------- prototxt


def test_prototxt_num_output_4e9_is_refused_before_allocation(tmp_path: Path) -> None:
    path = conv_prototxt(tmp_path / "big.prototxt", "num_output: 4000000000 kernel_size: 3")
    out, growth = run_bounded(f"automtl_compiler.frontends.prototxt.load_prototxt({str(path)!r})")
    assert out.startswith("LimitError: ") and "\n" not in out, out
    for part in (f"{path}:9", "conv1", "out_channels", "4,000,000,000", "MAX_CHANNELS"):
        assert part in out, out
    assert growth < 100


@pytest.mark.parametrize("conv, attr", [
    ("num_output: 8 kernel_size: 3 dilation: 0", "dilation"),
    ("num_output: 8 kernel_size: 3 stride: 0", "stride"),
    ("num_output: 8 kernel_size: 3 group: 0", "groups"),
    ("num_output: 0 kernel_size: 3", "out_channels"),
    ("num_output: 8 kernel_size: 3 group: 3", "groups"),
    ("num_output: 8 kernel_size: 5000", "kernel_size"),
])
def test_prototxt_bad_convolution_attributes(tmp_path: Path, conv: str, attr: str) -> None:
    path = conv_prototxt(tmp_path / "bad.prototxt", conv)
    with pytest.raises(AutomtlError) as e:
        load_prototxt(path)
    text = one_line(e)
    assert isinstance(e.value, (GraphError, ParseError, LimitError)), type(e.value)
    assert f"{path}:9" in text and "conv1" in text and attr in text, text


def test_prototxt_huge_input_is_refused(tmp_path: Path) -> None:
    path = conv_prototxt(tmp_path / "in.prototxt", "num_output: 8 kernel_size: 3",
                         "dim: 1 dim: 3 dim: 100000 dim: 100000")
    with pytest.raises(LimitError, match=r"MAX_SPATIAL") as e:
        load_prototxt(path)
    assert str(path) in one_line(e)
    path = conv_prototxt(tmp_path / "ok.prototxt", "num_output: 8 kernel_size: 3")
    with pytest.raises(LimitError, match=r"MAX_SPATIAL") as e:
        load_prototxt(path, input_shape=(1, 3, 100000, 100000))
    assert str(path) in one_line(e)


def test_prototxt_group_that_does_not_divide_the_input(tmp_path: Path) -> None:
    path = conv_prototxt(tmp_path / "g.prototxt", "num_output: 8 kernel_size: 3 group: 2")
    with pytest.raises(GraphError, match="divisible by groups=2") as e:
        load_prototxt(path)
    assert f"{path}:9" in one_line(e)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "models").glob("*.prototxt")))
def test_repo_prototxt_models_still_load(name: str) -> None:
    graph = load_prototxt(REPO / "models" / name)
    assert graph.num_parameters() > 1_000_000


# ---------------------------------------------------------------- graph JSON


def test_graph_json_with_1e12_channels(tmp_path: Path) -> None:
    path = graph_json(tmp_path, [_input([1, 3, 8, 8]), _conv({"out_channels": 10**12, "kernel_size": 3})], ["conv"])
    out, growth = run_bounded(f"automtl_compiler.ir.load_graph({str(path)!r})")
    assert out.startswith("LimitError: ") and str(path) in out and "MAX_CHANNELS" in out, out
    assert growth < 100


def test_graph_json_params_over_the_total_limit_are_refused_before_init(tmp_path: Path) -> None:
    nodes = [_input([1, 3, 8, 8]), _conv({"out_channels": 1024, "kernel_size": 3})]
    path = graph_json(tmp_path, nodes, ["conv"])
    with limits.override(MAX_PARAMS=1000), pytest.raises(LimitError, match=r"27,648.*MAX_PARAMS=1,000") as e:
        load_graph(path)
    assert str(path) in one_line(e)
    with limits.override(MAX_TENSOR_BYTES=1000), pytest.raises(LimitError, match="MAX_TENSOR_BYTES"):
        load_graph(path)


@pytest.mark.parametrize("attrs, attr", [
    ({"out_channels": 8, "kernel_size": 3, "stride": float("inf")}, "stride"),
    ({"out_channels": 8, "kernel_size": 3, "padding": -1}, "padding"),
    ({"out_channels": -8, "kernel_size": 3}, "out_channels"),
    ({"out_channels": 8, "kernel_size": 3, "dilation": 0}, "dilation"),
    ({"out_channels": 8, "kernel_size": 3, "groups": 0}, "groups"),
    ({"out_channels": 8, "kernel_size": 3, "groups": True}, "groups"),
    ({"out_channels": 8.0, "kernel_size": 3}, "out_channels"),
    ({"out_channels": 8, "kernel_size": [3, 2.5]}, "kernel_size"),
    ({"out_channels": 8, "kernel_size": "3"}, "kernel_size"),
])
def test_graph_json_bad_conv_attributes(tmp_path: Path, attrs: dict, attr: str) -> None:
    path = graph_json(tmp_path, [_input([1, 3, 8, 8]), _conv(attrs)], ["conv"])
    with pytest.raises(GraphError) as e:
        load_graph(path)
    text = one_line(e)
    assert str(path) in text and "node 'conv'" in text and f"'{attr}'" in text, text


@pytest.mark.parametrize("op, attrs, attr", [
    ("batchnorm2d", {"eps": float("inf")}, "eps"),
    ("batchnorm2d", {"eps": 0}, "eps"),
    ("batchnorm2d", {"momentum": float("nan")}, "momentum"),
    ("dropout", {"p": -0.5}, "p"),
    ("leaky_relu", {"negative_slope": float("-inf")}, "negative_slope"),
    ("gelu", {"approximate": "erf"}, "approximate"),
    ("clip", {"min": 1.0, "max": 0.0}, "min"),
    ("clip", {"min": float("nan"), "max": 1.0}, "min"),
    ("maxpool2d", {"kernel_size": 0}, "kernel_size"),
    ("adaptive_avgpool2d", {"output_size": [0, 1]}, "output_size"),
])
def test_graph_json_infinity_and_negative_attributes(tmp_path: Path, op: str, attrs: dict, attr: str) -> None:
    node = {"name": "n", "op": op, "inputs": ["x"], "attrs": attrs, "params": [], "buffers": [], "shape": None}
    path = graph_json(tmp_path, [_input([1, 3, 8, 8]), node], ["n"])
    with pytest.raises(GraphError) as e:
        load_graph(path)
    text = one_line(e)
    assert str(path) in text and "node 'n'" in text and f"'{attr}'" in text, text


def test_graph_json_input_shape_limits(tmp_path: Path) -> None:
    path = graph_json(tmp_path, [_input([1, 3, 100000, 100000]),
                                 {"name": "r", "op": "relu", "inputs": ["x"], "attrs": {}, "params": [],
                                  "buffers": [], "shape": None}], ["r"])
    with pytest.raises(LimitError, match="MAX_SPATIAL"):
        load_graph(path)
    path = graph_json(tmp_path, [_input([1, 0, 8, 8])], ["x"], name="zero.json")
    with pytest.raises(GraphError, match="'shape'"):
        load_graph(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_graph_json_integer_or_bool_weights(tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    g = Graph("g")
    g.add_input("x", (1, 3, 8, 8))
    g.add_node("conv", "conv2d", ["x"], {"out_channels": 4, "kernel_size": 3})
    g.set_outputs(["conv"])
    path = save_graph(g.materialise(), tmp_path / "g.json")
    wpath = path.with_suffix(".safetensors")
    tensors = load_file(str(wpath))
    tensors["conv/weight"] = tensors["conv/weight"].to(dtype)
    save_file(tensors, str(wpath))
    with pytest.raises(GraphError, match=f"tensor 'weight' has dtype {str(dtype)[6:]}") as e:
        load_graph(path)
    assert str(path) in str(e.value) and "node 'conv'" in str(e.value)


def test_graph_json_deeply_nested(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text('{"format": "automtl-graph", "version": 1, "nodes": ' + "[" * 200_000 + "]" * 200_000 + "}")
    start = time.perf_counter()
    with pytest.raises(FileFormatError) as e:
        load_graph(path)
    assert isinstance(e.value, FileLimitError)
    text = one_line(e)
    assert str(path) in text and "MAX_JSON_DEPTH" in text and "200,001" in text
    with pytest.raises(FileFormatError, match="MAX_JSON_DEPTH"):
        read_json(path, "policy file", "automtl-policy")
    assert time.perf_counter() - start < 5


def test_graph_json_real_file_round_trips(tmp_path: Path) -> None:
    from automtl_compiler.frontends.fx import from_module
    from tests.helpers import Tiny

    path = save_graph(from_module(Tiny(), input_shape=(1, 3, 16, 16)), tmp_path / "tiny.json")
    assert load_graph(path).num_parameters() > 0


# ---------------------------------------------------------------- safetensors headers


def _safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("header, data, match", [
    ({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, b"\0" * 16, "MAX_TENSOR_BYTES"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4 * 10**9]}}, b"\0" * 16, "byte range"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "needs 12 bytes"),
    ({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16, "unsupported dtype"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, "corrupt shape"),
])
def test_safetensors_header_checked_against_file(tmp_path: Path, header: dict, data: bytes, match: str) -> None:
    path = _safetensors(tmp_path / "w.safetensors", header, data)
    with pytest.raises(FileFormatError, match=match) as e:
        check_safetensors(path)
    assert str(path) in one_line(e)


def test_safetensors_header_length_beyond_file(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(FileFormatError, match="corrupt safetensors"):
        check_safetensors(path)


# ---------------------------------------------------------------- heads


def test_aspp_head_hidden_1e6_is_refused_before_construction() -> None:
    start = time.perf_counter()
    with pytest.raises(LimitError, match="MAX_TENSOR_BYTES") as e:
        ASPPHead(512, 21, hidden=10**6)
    one_line(e)
    with pytest.raises(LimitError, match="MAX_PARAMS"):
        make_head({"type": "aspp", "in_channels": 2048, "num_classes": 21, "hidden": 8192,
                   "rates": list(range(1, 41))})
    with pytest.raises(LimitError, match="MAX_CHANNELS"):
        ClassificationHead(512, 10**7)
    with pytest.raises(AutomtlError, match="positive integer hidden"):
        make_head({"type": "aspp", "in_channels": 512, "num_classes": 21, "hidden": 0})
    assert time.perf_counter() - start < 5
    head = ASPPHead(512, 21, hidden=1024)
    assert 20_000_000 < sum(p.numel() for p in head.parameters()) < 30_000_000


# ---------------------------------------------------------------- real models still load


def test_resnet50_through_fx_and_onnx(tmp_path: Path) -> None:
    import torchvision

    from automtl_compiler.frontends.fx import from_module

    model = torchvision.models.resnet50(weights=None).eval()
    graph = from_module(model, input_shape=(1, 3, 224, 224))
    assert graph.num_parameters() == sum(p.numel() for p in model.parameters())
    path = tmp_path / "r50.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 224, 224),), str(path), opset_version=17, dynamo=False)
    from automtl_compiler.runtime import folding_check

    assert folding_check(path)  # onnxruntime keeps its constant folding for ordinary models
    loaded = load_onnx(path)  # the exporter folds batch norms into the convolutions
    assert loaded.num_parameters() > 25_000_000
    assert loaded.node(loaded.outputs[0]).shape == (1, 1000)


def test_large_backbones_at_1024x2048_are_within_limits() -> None:
    import torchvision

    from automtl_compiler.frontends.fx import from_module

    for name in ("resnet152", "efficientnet_b7"):
        graph = from_module(torchvision.models.get_model(name, weights=None), input_shape=(1, 3, 1024, 2048))
        assert graph.num_parameters() < limits.MAX_PARAMS
        assert max(math.prod(n.shape) for n in graph.nodes()) * 4 < limits.MAX_TENSOR_BYTES
    # ConvNeXt (permute/layer norm) has no fx mapping; its sizes are what the limits bound
    model = torchvision.models.convnext_large(weights=None)
    assert sum(p.numel() for p in model.parameters()) < limits.MAX_PARAMS
    assert max(p.numel() for p in model.parameters()) * 4 < limits.MAX_TENSOR_BYTES
    assert max(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)) < limits.MAX_CHANNELS
    ASPPHead(2048, 40, hidden=1024)
