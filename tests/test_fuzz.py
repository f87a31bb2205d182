"""Fuzzing the loaders: mutated inputs of every kind end in success or an AutomtlError, quickly and in bounded memory.

Each input kind starts from valid inputs (the repo's fixtures, small generated ones, files written by automtl
itself) and applies a few mutations drawn by hypothesis; each case is fed to its loader entry point:

=================  ============================================================  =================================
kind               mutations                                                     entry point
=================  ============================================================  =================================
prototxt           numbers, strings, enums/field names, lines dropped/doubled,   ``load_backbone(.prototxt)``
                   truncation, inserted text; fixtures and generated nets
ONNX               attributes, input dims, initialiser dims/dtypes/data, op      ``load_backbone(.onnx)``
                   types, node inputs, opsets; raw byte flips and truncation
graph JSON         JSON values/keys/nesting; safetensors header (offsets,        ``load_graph``
                   dtypes, shapes, length prefix)
SuperModel dir     supermodel.json, backbone.json, weights.safetensors header    ``SuperModel.load``
CompactModel dir   compact.json, graph.json, graph/heads.safetensors headers     ``CompactModel.load``
policy             JSON values/keys/nesting, raw text                            ``Policy.from_json``/``Policy.load``
YAML config        values/types of DEFAULTS keys, shared values (anchors and     ``load_config``
                   aliases), merge keys, alias bombs, raw text
CLI sample         a few mutated prototxt/ONNX/graph files and model dirs        ``automtl inspect`` / ``sample``
=================  ============================================================  =================================

Each case runs in-process under a wall-clock alarm (:data:`HANG_SECONDS`) and must finish within
:data:`CASE_SECONDS`; memory is bounded by running every case under lowered size limits
(:data:`FUZZ_LIMITS`) and checking the process's peak resident memory (:data:`MAX_RSS_BYTES`); the CLI sample
runs in subprocesses under ``RLIMIT_AS``.

Fast (CI, the default; deterministic: ``derandomize=True``)::

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_fuzz.py

Long (benchmark-style; ``AUTOMTL_FUZZ_EXAMPLES`` cases per kind, and that number / 50 CLI runs)::

    AUTOMTL_FUZZ_EXAMPLES=2000 OMP_NUM_THREADS=1 python -m pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from automtl_compiler import (
    CompactModel,
    Graph,
    Policy,
    SuperModel,
    limits,
    load_backbone,
    load_graph,
    save_graph,
)
from automtl_compiler.errors import AutomtlError
from automtl_compiler.train.config import DEFAULTS, load_config

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

#: Cases per input kind; ``AUTOMTL_FUZZ_EXAMPLES`` overrides it (the long setting).
FAST_EXAMPLES = 300
LONG_EXAMPLES = int(os.environ.get("AUTOMTL_FUZZ_EXAMPLES", "0") or 0)
#: The most seconds one case may take (it fails the test beyond that).
CASE_SECONDS = 5.0
#: A case still running after this many seconds is interrupted as a hang.
HANG_SECONDS = 30
#: Limits every case runs under, so that what a mutated input may allocate stays small.
FUZZ_LIMITS = {"MAX_PARAMS": 2**25, "MAX_TENSOR_BYTES": 2**27, "MAX_FOLD_BYTES": 2**26}
#: How far one case may raise the process's resident peak above what the process held when the case began.
MAX_RSS_BYTES = 3 * 2**30
#: Address space of a CLI subprocess (importing torch needs about 4 GiB of it).
CLI_ADDRESS_SPACE = 6 * 2**30


def examples(fast: int = FAST_EXAMPLES) -> int:
    """The number of cases of one kind: ``fast``, or AUTOMTL_FUZZ_EXAMPLES when it is set."""
    return LONG_EXAMPLES or fast


def fuzz_settings(fast: int = FAST_EXAMPLES) -> settings:
    """Deterministic hypothesis settings with a per-case deadline."""
    return settings(max_examples=examples(fast), deadline=timedelta(seconds=CASE_SECONDS), derandomize=True,
                    database=None, suppress_health_check=list(HealthCheck), print_blob=True,
                    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink])


# ---------------------------------------------------------------- running one case


class CaseHang(BaseException):
    """A case ran past HANG_SECONDS (a BaseException, so that no ``except Exception`` in the library eats it)."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise CaseHang(f"the case ran for more than {HANG_SECONDS} s")


def _reset_peak_rss() -> bool:
    """Reset the process's resident-memory high-water mark to its current size (Linux ``clear_refs``), so
    that the peak a case reaches is its own and not an earlier test's; False where the kernel does not
    allow it (the case is then measured above the earlier peak)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    """The resident-memory high-water mark in bytes (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def bounded_case(what: str) -> Iterator[None]:
    """Run a case under the fuzz limits and a wall-clock alarm; an AutomtlError is a fine ending, any other
    exception fails, and so does a case slower than CASE_SECONDS or one that raises the peak memory by
    MAX_RSS_BYTES or more."""
    _reset_peak_rss()
    before = _peak_rss()  # after a reset: what the process holds now (a worker keeps earlier tests' heap)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(HANG_SECONDS)
    start = time.monotonic()
    try:
        with limits.override(**FUZZ_LIMITS):
            yield
    except AutomtlError as e:
        assert str(e).strip(), f"{what}: an AutomtlError without a message"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    elapsed = time.monotonic() - start
    assert elapsed < CASE_SECONDS, f"{what}: the case took {elapsed:.1f} s"
    peak = _peak_rss()
    assert peak - before < MAX_RSS_BYTES, \
        f"{what}: peak memory {peak:,} bytes (the process's high-water mark before the case: {before:,})"


def run_case(what: str, call: Callable[[], Any]) -> None:
    """``call()`` as one bounded case (see :func:`bounded_case`)."""
    with bounded_case(what):
        call()


@contextmanager
def workdir() -> Iterator[Path]:
    """A fresh temporary directory (hypothesis cases cannot use pytest's function-scoped tmp_path)."""
    with tempfile.TemporaryDirectory(prefix="automtl-fuzz-") as d:
        yield Path(d)


def one_in(data: st.DataObject, n: int, label: str) -> bool:
    """True about once in ``n`` draws (hypothesis favours the ends of a range, so the rare case is the top)."""
    return data.draw(st.integers(1, n), label=label) == n


# ---------------------------------------------------------------- interesting values

INTS = [0, 1, 2, 3, -1, -2, 7, 1023, 1024, 1025, 32768, 32769, 2**20, 2**20 + 1, 2**31 - 1, 2**31, 2**32,
        2**63 - 1, -(2**63), 10**12]
FLOATS = [0.0, -0.0, 0.5, -0.5, 1.0, -1.0, 1e-30, 1e30, -1e30, 1e308, math.nan, math.inf, -math.inf]
TEXTS = ["", " ", "x", "data", "conv1", "名前", "é", "a b", "a/b", "a.b", "\n", "\t", "\x00", "../../etc/passwd",
         "x" * 2000, "🙂", "\u202e", "null", "1e3", "0x1F", "yes", "~", "2021-02-30"]
NUMBER_TOKENS = ["0", "-1", "1", "2", "3", "-2147483648", "2147483647", "2147483648", "4294967296",
                 "9223372036854775807", "18446744073709551616", "1" + "0" * 40, "1e30", "-1e30", "1e-30", "0.5",
                 "-0.5", "nan", "inf", "-inf", "1e400", "0x10", "007", "1.0", "32769", "1048577", "1025"]
STRING_TOKENS = ['""', '"x"', '"data"', '"blob1"', '"conv1"', '"名前"', '"a b"', '"\\n"', '"\\x00"', '"🙂"',
                 '"' + "y" * 300 + '"', "'single'", '"unterminated']
IDENT_TOKENS = ["MAX", "AVE", "STOCHASTIC", "SUM", "PROD", "CEIL", "FLOOR", "TRAIN", "TEST", "true", "false",
                "num_output", "kernel_size", "stride", "pad", "dilation", "group", "bias_term", "global_pooling",
                "adaptive_output_size", "axis", "end_axis", "coeff", "operation", "eps", "momentum", "affine",
                "track_running_stats", "use_global_stats", "moving_average_fraction", "layer", "layers", "input",
                "input_dim", "input_shape", "bottom", "top", "name", "type", "phase", "include", "exclude",
                "dropout_ratio", "negative_slope", "scale_param", "Convolution", "Pooling", "Bogus", "kernel_h",
                "kernel_w", "pad_h", "stride_w", "num_axes", "concat_dim", "transpose", "inplace"]


def json_values() -> st.SearchStrategy[Any]:
    """Replacement values for JSON documents: edge numbers, odd strings, empty and nested containers."""
    deep: Any = 0
    for _ in range(150):
        deep = [deep]
    return st.one_of(
        st.sampled_from([None, True, False, [], {}, [1, 2], {"a": 1}, [None], [[1, 2], [3]], deep, [-1, 0],
                         [2**40, 1], [1, 3, 8, 8], {"format": "automtl-policy"}]),
        st.sampled_from(INTS), st.sampled_from(FLOATS), st.sampled_from(TEXTS),
        st.integers(-(2**70), 2**70), st.text(max_size=8),
    )


# ---------------------------------------------------------------- text mutations (prototxt, YAML, JSON)

_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[-+]?[0-9][0-9a-zA-Z.+-]*|[A-Za-z_][A-Za-z0-9_]*|\S')


def mutate_text(data: st.DataObject, text: str, identifiers: list[str] = IDENT_TOKENS, rounds: int = 4) -> str:
    """Apply 1..``rounds`` token and line mutations to ``text``."""
    for _ in range(data.draw(st.integers(1, rounds), label="rounds")):
        tokens = [(m.start(), m.end(), m.group()) for m in _TOKEN.finditer(text)]
        kind = data.draw(st.sampled_from(["number", "string", "ident", "retype", "drop_line", "dup_line",
                                          "swap_lines", "truncate", "insert", "delete_token"]), label="mutation")
        lines = text.split("\n")
        if kind in ("number", "string", "ident", "retype", "delete_token") and tokens:
            pools = {"number": [t for t in tokens if t[2][0].isdigit() or t[2][0] in "+-"],
                     "string": [t for t in tokens if t[2][0] in "\"'"],
                     "ident": [t for t in tokens if t[2][0].isalpha() or t[2][0] == "_"]}
            pool = pools.get(kind) or tokens
            start, end, _ = data.draw(st.sampled_from(pool), label="token")
            if kind == "number":
                new = data.draw(st.sampled_from(NUMBER_TOKENS))
            elif kind == "string":
                new = data.draw(st.sampled_from(STRING_TOKENS))
            elif kind == "ident":
                new = data.draw(st.sampled_from(identifiers))
            elif kind == "retype":
                new = data.draw(st.sampled_from(NUMBER_TOKENS + STRING_TOKENS + identifiers + ["{", "}", "[", "]"]))
            else:
                new = ""
            text = text[:start] + new + text[end:]
        elif kind == "drop_line" and lines:
            i = data.draw(st.integers(0, len(lines) - 1))
            text = "\n".join(lines[:i] + lines[i + 1:])
        elif kind == "dup_line" and lines:
            i = data.draw(st.integers(0, len(lines) - 1))
            text = "\n".join(lines[:i + 1] + lines[i:])
        elif kind == "swap_lines" and len(lines) > 1:
            i, j = data.draw(st.integers(0, len(lines) - 1)), data.draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        elif kind == "truncate":
            text = text[:data.draw(st.integers(0, len(text)))]
        elif kind == "insert":
            at = data.draw(st.integers(0, len(text)))
            text = text[:at] + data.draw(st.text(max_size=12)) + text[at:]
    return text


# ---------------------------------------------------------------- JSON document mutations


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def mutate_json(data: st.DataObject, doc: Any, rounds: int = 3) -> Any:
    """Apply 1..``rounds`` mutations to a copy of the JSON document ``doc``: replace a value, delete or add a
    key, duplicate or drop a list element, wrap a value in a list, rename a key."""
    doc = json.loads(json.dumps(doc))
    for _ in range(data.draw(st.integers(1, rounds), label="json rounds")):
        path = data.draw(st.sampled_from(_paths(doc)), label="path")
        kind = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "add_key", "dup", "wrap",
                                          "rename"]), label="json mutation")
        if not path:
            if kind == "replace":
                doc = data.draw(json_values())
            continue
        parent, key = _get(doc, path[:-1]), path[-1]
        if kind == "replace":
            parent[key] = data.draw(json_values(), label="value")
        elif kind == "delete":
            del parent[key]
        elif kind == "add_key" and isinstance(parent[key], dict):
            parent[key][data.draw(st.sampled_from(TEXTS + ["format", "version", "tied", "extra"]))] = \
                data.draw(json_values())
        elif kind == "dup" and isinstance(parent, list):
            parent.insert(key, json.loads(json.dumps(parent[key])))
        elif kind == "wrap":
            parent[key] = [parent[key]]
        elif kind == "rename" and isinstance(parent, dict):
            value = parent.pop(key)
            parent[data.draw(st.sampled_from(TEXTS + [str(key).upper(), f"{key}_"]))] = value
    return doc


def write_json(path: Path, doc: Any) -> None:
    """Write ``doc`` as JSON (NaN and infinities as Python's json writes them)."""
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8", errors="surrogatepass")


# ---------------------------------------------------------------- safetensors header mutations


def mutate_safetensors(data: st.DataObject, path: Path) -> None:
    """Mutate the header of the safetensors file ``path`` in place: a tensor's dtype, shape or byte range, an
    entry dropped or added, the metadata, or the 8-byte header length; or flip bytes of the file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    kind = data.draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "add", "metadata", "length", "header",
                                      "flip", "truncate"]), label="safetensors mutation")
    if kind in ("dtype", "shape", "offsets", "drop") and names:
        name = data.draw(st.sampled_from(names), label="tensor")
        rec = header[name]
        if kind == "dtype":
            rec["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3",
                                                      "I32", "F32", "C64", "f32", "", None, 4]))
        elif kind == "shape":
            rec["shape"] = data.draw(st.one_of(st.lists(st.sampled_from(INTS), max_size=5), json_values()))
        elif kind == "offsets":
            begin, end = rec["data_offsets"]
            rec["data_offsets"] = data.draw(st.one_of(
                st.sampled_from([[end, begin], [begin, end + 4], [begin - 4, end], [0, len(body) + 1],
                                 [begin, 2**64 - 1], [-1, end], [begin], [begin, end, end], None, "0-4",
                                 [float(begin), end], [0, 0]]),
                st.lists(st.sampled_from(INTS), min_size=2, max_size=2)))
        else:
            del header[name]
    elif kind == "add":
        header[data.draw(st.sampled_from(TEXTS + ["extra/weight", "x.weight"]))] = data.draw(st.one_of(
            json_values(), st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "I64"]),
                                                  "shape": st.lists(st.sampled_from(INTS), max_size=3),
                                                  "data_offsets": st.lists(st.sampled_from(INTS), min_size=2,
                                                                           max_size=2)})))
    elif kind == "metadata":
        header["__metadata__"] = data.draw(json_values())
    elif kind == "header":
        header = data.draw(json_values())
    text = json.dumps(header).encode()
    if kind == "length":
        n2 = data.draw(st.sampled_from([0, 1, 7, len(text) - 1, len(text) + 1, 2**32, 2**63, 2**64 - 1]))
        path.write_bytes(struct.pack("<Q", max(n2, 0) % 2**64) + text + body)
        return
    out = bytearray(struct.pack("<Q", len(text)) + text + body)
    if kind == "flip" and out:
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(out) - 1))
            out[i] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        out = out[:data.draw(st.integers(0, len(out)))]
    path.write_bytes(bytes(out))


# ================================================================ prototxt

PROTOTXT_FIXTURES = {p.name: p.read_text() for p in sorted(FIXTURES.glob("*.prototxt"))}


@st.composite
def generated_prototxt(draw: Callable[..., Any]) -> str:
    """A small Caffe network: an Input layer and a chain of 1..6 layers with drawn parameters."""
    small = st.integers(0, 5)
    c, h, w = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 12))
    legacy = draw(st.booleans())
    if legacy:
        lines = ['name: "gen"', 'input: "data"', "input_dim: 1", f"input_dim: {c}", f"input_dim: {h}",
                 f"input_dim: {w}"]
    else:
        lines = ['name: "gen"', ('layer { name: "data" type: "Input" top: "data" '
                                 f'input_param {{ shape {{ dim: 1 dim: {c} dim: {h} dim: {w} }} }} }}')]
    blobs, prev = ["data"], "data"
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["Convolution", "BatchNorm", "Scale", "ReLU", "Pooling", "Eltwise", "Concat",
                                     "InnerProduct", "Flatten", "Dropout", "Sigmoid", "ReLU6", "Swish", "Clip",
                                     "Split", "Silence", "GELU", "StochasticDepth", "Identity"]))
        name, top = f"l{i}", draw(st.sampled_from([f"b{i}", prev]))
        if kind == "Convolution":
            body = (f"convolution_param {{ num_output: {draw(st.integers(1, 8))} kernel_size: {draw(small)} "
                    f"stride: {draw(small)} pad: {draw(small)} dilation: {draw(st.integers(1, 3))} "
                    f"group: {draw(st.integers(1, 2))} bias_term: {draw(st.sampled_from(['true', 'false']))} }}")
        elif kind == "BatchNorm":
            body = draw(st.sampled_from(["batch_norm_param { use_global_stats: true }",
                                         "batch_norm_param { eps: 0.001 momentum: 0.1 affine: true }",
                                         "batch_norm_param { moving_average_fraction: 0.9 }", ""]))
        elif kind == "Scale":
            body = draw(st.sampled_from(["scale_param { bias_term: true }", ""]))
        elif kind == "Pooling":
            body = draw(st.sampled_from([
                f"pooling_param {{ pool: MAX kernel_size: {draw(small)} stride: {draw(small)} pad: {draw(small)} }}",
                f"pooling_param {{ pool: AVE kernel_size: {draw(small)} round_mode: FLOOR }}",
                "pooling_param { pool: AVE global_pooling: true }",
                (f"pooling_param {{ pool: MAX global_pooling: true adaptive_output_size: {draw(small)} "
                 f"adaptive_output_size: {draw(small)} }}")]))
        elif kind == "InnerProduct":
            body = f"inner_product_param {{ num_output: {draw(st.integers(1, 8))} }}"
        elif kind == "Eltwise":
            body = draw(st.sampled_from(["eltwise_param { operation: SUM coeff: 1 coeff: -1 }",
                                         "eltwise_param { operation: PROD }", "eltwise_param { operation: MAX }"]))
        elif kind == "Clip":
            body = "clip_param { min: 0 max: 6 }"
        elif kind in ("Dropout", "StochasticDepth"):
            body = "dropout_param { dropout_ratio: 0.2 }"
        elif kind == "Flatten":
            body = f"flatten_param {{ axis: {draw(st.integers(-2, 3))} }}"
        else:
            body = ""
        bottoms = [prev] + ([draw(st.sampled_from(blobs))] if kind in ("Eltwise", "Concat") else [])
        tops = [] if kind == "Silence" else [top] + ([f"{top}_2"] if kind == "Split" else [])
        lines.append(f'layer {{ name: "{name}" type: "{kind}" '
                     + " ".join(f'bottom: "{b}"' for b in bottoms) + " "
                     + " ".join(f'top: "{t}"' for t in tops) + f" {body} }}")
        if tops:
            prev = tops[0]
            blobs.append(prev)
    return "\n".join(lines) + "\n"


def prototxt_texts() -> st.SearchStrategy[str]:
    """A fixture or a generated net, before mutation."""
    return st.one_of(st.sampled_from(sorted(PROTOTXT_FIXTURES.values())), generated_prototxt())


def input_shapes(data: st.DataObject) -> tuple[int, ...] | None:
    """Mostly None (the file's own shape); sometimes an ``input_shape=`` override with edge values."""
    if not one_in(data, 4, "input_shape?"):
        return None
    return tuple(data.draw(st.lists(st.sampled_from([1, 3, 8, 0, -1, 2**20, 32769, 10**12]), max_size=5)))


def load_source(content: str | bytes, directory: Path, name: str, input_shape: tuple[int, ...] | None = None) -> None:
    """Write ``content`` as ``directory / name`` (a .prototxt text or .onnx bytes) and load it as a backbone."""
    path = directory / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    load_backbone(path, input_shape=input_shape)


def load_prototxt_text(text: str, directory: Path, input_shape: tuple[int, ...] | None = None) -> None:
    load_source(text, directory, "net.prototxt", input_shape)


def test_prototxt_fixtures_load() -> None:
    """The unmutated starting points are valid."""
    for text in PROTOTXT_FIXTURES.values():
        with workdir() as d:
            load_prototxt_text(text, d)


@fuzz_settings()
@given(data=st.data(), base=prototxt_texts())
def test_fuzz_prototxt(data: st.DataObject, base: str) -> None:
    text = base if one_in(data, 10, "unmutated") else mutate_text(data, base)
    shape = input_shapes(data)
    with workdir() as d:
        run_case(f"prototxt (input_shape={shape}):\n{text}", lambda: load_prototxt_text(text, d, shape))


# ================================================================ ONNX


def _onnx_bases() -> dict[str, bytes]:
    """Small valid ONNX models (serialized): a conv net, shape arithmetic, constant folding, activation patterns."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name: str, *shape: int) -> Any:
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    def ints(name: str, values: list[int]) -> Any:
        return numpy_helper.from_array(np.array(values, dtype=np.int64), name)

    def model(nodes: list, inits: list, out_shape: list | None, opset: int = 17, in_shape: list | None = None) -> bytes:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape or ["N", 3, 8, 8])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
        m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m.SerializeToString()

    N = helper.make_node
    conv = model([
        N("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1],
          dilations=[1, 1], group=1),
        N("BatchNormalization", ["c", "s", "sh", "m", "v"], ["bn"], name="bn", epsilon=1e-5),
        N("Relu", ["bn"], ["r"], name="relu"),
        N("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        N("GlobalAveragePool", ["p"], ["g"], name="gap"),
        N("Flatten", ["g"], ["f"], name="flat", axis=1),
        N("Gemm", ["f", "fw", "fb"], ["y"], name="fc", transB=1),
    ], [init("w", 4, 3, 3, 3), init("b", 4), init("s", 4), init("sh", 4), init("m", 4),
        numpy_helper.from_array(np.ones(4, np.float32), "v"), init("fw", 5, 4), init("fb", 5)], ["N", 5])
    shape = model([
        N("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[1, 1], group=1),
        N("Shape", ["c"], ["s"], name="shape"),
        N("Gather", ["s", "zero"], ["b"], name="gather", axis=0),
        N("Concat", ["b", "minus"], ["t"], name="target", axis=0),
        N("Reshape", ["c", "t"], ["y"], name="reshape"),
    ], [init("w", 4, 3, 1, 1), ints("zero", [0]), ints("minus", [-1])], [1, 256])
    fold = model([
        N("ConstantOfShape", ["size"], ["big"], name="cos",
          value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
        N("ReduceSum", ["big", "axes"], ["s"], name="sum", keepdims=1),
        N("Expand", ["s", "eshape"], ["e"], name="expand"),
        N("Add", ["x", "e"], ["y"], name="add"),
    ], [ints("size", [4, 4]), ints("axes", [0, 1]), ints("eshape", [1, 3, 8, 8])], [1, 3, 8, 8],
        in_shape=[1, 3, 8, 8])
    acts = model([
        N("Sigmoid", ["x"], ["sg"], name="sig"),
        N("Mul", ["x", "sg"], ["silu"], name="silu"),
        N("HardSigmoid", ["silu"], ["hs"], name="hsig", alpha=1 / 6, beta=0.5),
        N("Mul", ["silu", "hs"], ["hsw"], name="hswish"),
        N("AveragePool", ["hsw"], ["ap"], name="avg", kernel_shape=[3, 3], pads=[1, 1, 1, 1], ceil_mode=1),
        N("Clip", ["ap", "lo", "hi"], ["cl"], name="clip"),
        N("ReduceMean", ["cl", "axes"], ["rm"], name="mean", keepdims=0),
        N("MatMul", ["rm", "mw"], ["mm"], name="mm"),
        N("Add", ["mm", "mb"], ["y"], name="bias"),
    ], [numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi"),
        ints("axes", [2, 3]), init("mw", 3, 2), init("mb", 2)], ["N", 2], opset=18)
    return {"conv": conv, "shape": shape, "fold": fold, "acts": acts}


ONNX_BASES = _onnx_bases()
ONNX_OPS = ["Conv", "Relu", "MaxPool", "AveragePool", "Gemm", "MatMul", "Reshape", "Flatten", "Squeeze",
            "Unsqueeze", "ConstantOfShape", "Expand", "Tile", "Range", "Slice", "Concat", "Gather", "Shape",
            "Add", "Mul", "Div", "Sub", "Sum", "Max", "BatchNormalization", "GlobalAveragePool", "Clip",
            "ReduceMean", "ReduceSum", "Identity", "Cast", "Dropout", "Loop", "If", "Softmax", "NonZero", "Foo", ""]
ONNX_ATTRS = ["kernel_shape", "pads", "strides", "dilations", "group", "axis", "auto_pad", "ceil_mode", "transB",
              "transA", "alpha", "beta", "epsilon", "keepdims", "axes", "value", "to", "allowzero", "storage_order",
              "count_include_pad", "approximate"]


def _attribute_value(data: st.DataObject, current: Any) -> Any:
    """A replacement attribute value: of the current kind with edge values, or of another kind."""
    from onnx import TensorProto, helper

    int64 = st.sampled_from([v for v in INTS if -(2**63) <= v < 2**63])
    same = st.nothing()
    if isinstance(current, int):
        same = int64
    elif isinstance(current, float):
        same = st.sampled_from(FLOATS)
    elif isinstance(current, (list, tuple)):
        same = st.lists(int64, max_size=6)
    return data.draw(st.one_of(
        same, int64, st.sampled_from(FLOATS), st.lists(int64, max_size=6), st.sampled_from([b"SAME_UPPER", b"VALID",
                                                                                           b"NOTSET", b"bogus", b""]),
        st.just(helper.make_tensor("t", TensorProto.FLOAT, [2], [1.0, 2.0])),
        st.just(helper.make_tensor("t", TensorProto.INT64, [1], [2**40]))), label="attribute value")


def _make_attribute(name: str, value: Any) -> Any:
    """An AttributeProto; an empty list is taken as an empty list of ints."""
    from onnx import AttributeProto, helper

    if isinstance(value, list) and not value:
        return helper.make_attribute(name, value, attr_type=AttributeProto.INTS)
    return helper.make_attribute(name, value)


def mutate_onnx(data: st.DataObject, raw: bytes) -> bytes:
    """Apply 1..3 structural mutations to the serialized model ``raw``, or flip/truncate its bytes."""
    import onnx
    from onnx import helper

    if one_in(data, 6, "bytes"):
        out = bytearray(raw)
        if data.draw(st.booleans()):
            return bytes(out[:data.draw(st.integers(0, len(out)))])
        for _ in range(data.draw(st.integers(1, 16))):
            i = data.draw(st.integers(0, len(out) - 1))
            out[i] ^= data.draw(st.integers(1, 255))
        return bytes(out)
    m = onnx.ModelProto()
    m.ParseFromString(raw)
    g = m.graph
    for _ in range(data.draw(st.integers(1, 3), label="onnx rounds")):
        kind = data.draw(st.sampled_from(["attr", "attr", "add_attr", "input_dim", "init_dims", "init_dtype",
                                          "init_data", "op", "node_input", "drop_node", "opset", "output"]),
                         label="onnx mutation")
        node = data.draw(st.sampled_from(list(g.node)), label="node") if len(g.node) else None
        if kind == "attr" and node is not None and len(node.attribute):
            i = data.draw(st.integers(0, len(node.attribute) - 1))
            name = node.attribute[i].name
            value = _attribute_value(data, helper.get_attribute_value(node.attribute[i]))
            del node.attribute[i]
            node.attribute.append(_make_attribute(name, value))
        elif kind == "add_attr" and node is not None:
            name = data.draw(st.sampled_from(ONNX_ATTRS))
            for i, a in enumerate(node.attribute):
                if a.name == name:
                    del node.attribute[i]
                    break
            node.attribute.append(_make_attribute(name, _attribute_value(data, None)))
        elif kind == "input_dim":
            dims = g.input[0].type.tensor_type.shape.dim
            if len(dims):
                d = dims[data.draw(st.integers(0, len(dims) - 1))]
                choice = data.draw(st.one_of(st.sampled_from([v for v in INTS if -(2**63) <= v < 2**63]),
                                             st.sampled_from(["H", ""])))
                if isinstance(choice, str):
                    d.dim_param = choice
                else:
                    d.dim_value = choice
            if data.draw(st.booleans()):
                dims.add().dim_value = data.draw(st.sampled_from([1, 3, 0]))
        elif kind in ("init_dims", "init_dtype", "init_data") and len(g.initializer):
            t = data.draw(st.sampled_from(list(g.initializer)))
            if kind == "init_dims":
                t.dims[:] = data.draw(st.lists(st.sampled_from([v for v in INTS if -(2**63) <= v < 2**63]),
                                               max_size=5))
            elif kind == "init_dtype":
                t.data_type = data.draw(st.sampled_from(list(range(24)) + [99]))
            else:
                t.raw_data = t.raw_data[:data.draw(st.integers(0, len(t.raw_data)))] if t.raw_data else b"\x00" * 3
        elif kind == "op" and node is not None:
            node.op_type = data.draw(st.sampled_from(ONNX_OPS))
        elif kind == "node_input" and node is not None and len(node.input):
            i = data.draw(st.integers(0, len(node.input) - 1))
            node.input[i] = data.draw(st.sampled_from(["", "x", "nope", node.output[0] if len(node.output) else "y",
                                                       *[t.name for t in g.initializer]]))
        elif kind == "drop_node" and node is not None:
            g.node.remove(node)
        elif kind == "opset":
            m.opset_import[0].version = data.draw(st.sampled_from([1, 12, 13, 14, 18, 20, 21, 22, 99]))
        elif kind == "output" and len(g.output):
            g.output[0].name = data.draw(st.sampled_from(["x", "nope", "", "c", "s"]))
    return m.SerializeToString()


def load_onnx_bytes(raw: bytes, directory: Path, input_shape: tuple[int, ...] | None = None) -> None:
    load_source(raw, directory, "model.onnx", input_shape)


def test_onnx_bases_load() -> None:
    for raw in ONNX_BASES.values():
        with workdir() as d:
            load_onnx_bytes(raw, d)


@fuzz_settings()
@given(data=st.data(), base=st.sampled_from(sorted(ONNX_BASES)))
def test_fuzz_onnx(data: st.DataObject, base: str) -> None:
    raw = mutate_onnx(data, ONNX_BASES[base])
    shape = input_shapes(data)
    with workdir() as d:
        run_case(f"onnx ({base}, input_shape={shape}): {raw!r}"[:4000], lambda: load_onnx_bytes(raw, d, shape))


# ================================================================ graph JSON + safetensors


def _small_graph() -> Graph:
    g = Graph("fuzz")
    g.add_input("x", (1, 3, 9, 9))
    g.add_node("conv", "conv2d", ["x"], {"out_channels": 4, "kernel_size": 3, "padding": 1, "bias": True})
    g.add_node("bn", "batchnorm2d", ["conv"])
    g.add_node("act", "relu6", ["bn"])
    g.add_node("res", "add", ["act", "conv"], {"coeffs": [1.0, -0.5]})
    g.add_node("pool", "maxpool2d", ["res"], {"kernel_size": 3, "stride": 2, "ceil_mode": True})
    g.add_node("avg", "avgpool2d", ["res"], {"kernel_size": 2, "stride": 2, "padding": 1})
    g.add_node("se", "adaptive_avgpool2d", ["pool"], {"output_size": 1})
    g.add_node("gate", "sigmoid", ["se"])
    g.add_node("scaled", "mul", ["pool", "gate"])
    g.add_node("cat", "concat", ["scaled", "pool"], {"dim": 1})
    g.add_node("gap", "mean", ["cat"], {"dim": [2, 3]})
    g.add_node("fc", "linear", ["gap"], {"out_features": 3})
    g.add_node("flat", "flatten", ["avg"], {"start_dim": 1})
    g.set_outputs(["fc", "flat"])
    return g.materialise(seed=0)


@pytest.fixture(scope="module")
def graph_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A graph saved with its safetensors sidecar, and one saved as structure only."""
    root = tmp_path_factory.mktemp("graphs")
    graph = _small_graph()
    with_tensors = root / "with" / "graph.json"
    bare = root / "bare" / "graph.json"
    save_graph(graph, with_tensors)
    save_graph(graph, bare, tensors=False)
    return {"with": with_tensors.parent, "bare": bare.parent}


def _mutate_graph_dir(data: st.DataObject, directory: Path) -> str:
    """Mutate graph.json or (when present) graph.safetensors in ``directory``; returns what was mutated."""
    sidecar = directory / "graph.safetensors"
    target = data.draw(st.sampled_from(["json", "json", "text"] + (["safetensors"] if sidecar.exists() else [])),
                       label="graph target")
    meta = directory / "graph.json"
    if target == "json":
        write_json(meta, mutate_json(data, json.loads(meta.read_text())))
    elif target == "text":
        meta.write_text(mutate_text(data, meta.read_text(), identifiers=["null", "true", "[", "{", "NaN",
                                                                         "Infinity", '"conv"', '"x"']),
                        encoding="utf-8", errors="surrogatepass")
    else:
        mutate_safetensors(data, sidecar)
    return target


@fuzz_settings()
@given(data=st.data(), which=st.sampled_from(["with", "with", "bare"]))
def test_fuzz_graph_json(graph_files: dict[str, Path], data: st.DataObject, which: str) -> None:
    with workdir() as d:
        directory = d / "g"
        shutil.copytree(graph_files[which], directory)
        target = _mutate_graph_dir(data, directory)
        run_case(f"graph ({which}, {target})", lambda: load_graph(directory / "graph.json"))


# ================================================================ SuperModel and CompactModel directories


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SuperModel (with a fixed policy), a policy file and the CompactModel it prunes to."""
    from automtl_compiler import build_supermodel, prune
    from automtl_compiler.nn.heads import make_head
    from tests.helpers import Tiny

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    heads = {"seg": make_head({"type": "aspp", "in_channels": 8, "num_classes": 3, "hidden": 4}),
             "cls": make_head({"type": "cls", "in_channels": 8, "num_classes": 2})}
    model = build_supermodel(load_backbone(Tiny(), input_shape=(1, 3, 8, 8)), heads, feature_node="bn2")
    policy = model.sample_policy("sample", seed=3)
    model.set_policy(policy)
    model.save(root / "sm")
    policy.save(root / "policy.json")
    prune(model, policy).save(root / "cm")
    return {"sm": root / "sm", "cm": root / "cm", "policy": root / "policy.json"}


def _mutate_model_dir(data: st.DataObject, directory: Path) -> str:
    """Mutate one file of a model directory (JSON documents as JSON, safetensors files in their header)."""
    files = sorted(p.name for p in directory.iterdir())
    name = data.draw(st.sampled_from(files), label="file")
    path = directory / name
    if name.endswith(".safetensors"):
        mutate_safetensors(data, path)
    elif not one_in(data, 5, "as text"):
        write_json(path, mutate_json(data, json.loads(path.read_text())))
    else:
        path.write_text(mutate_text(data, path.read_text(), identifiers=["null", "true", "[", "{", "NaN"]),
                        encoding="utf-8", errors="surrogatepass")
    if one_in(data, 20, "remove"):
        path.unlink()
        return f"{name} (removed)"
    return name


def test_model_dirs_load(model_dirs: dict[str, Path]) -> None:
    SuperModel.load(model_dirs["sm"])
    CompactModel.load(model_dirs["cm"])
    Policy.load(model_dirs["policy"])


@fuzz_settings()
@given(data=st.data())
def test_fuzz_supermodel_dir(model_dirs: dict[str, Path], data: st.DataObject) -> None:
    with workdir() as d:
        directory = d / "sm"
        shutil.copytree(model_dirs["sm"], directory)
        name = _mutate_model_dir(data, directory)
        run_case(f"supermodel ({name})", lambda: SuperModel.load(directory))


@fuzz_settings()
@given(data=st.data())
def test_fuzz_compact_dir(model_dirs: dict[str, Path], data: st.DataObject) -> None:
    with workdir() as d:
        directory = d / "cm"
        shutil.copytree(model_dirs["cm"], directory)
        name = _mutate_model_dir(data, directory)
        run_case(f"compact ({name})", lambda: CompactModel.load(directory))


# ================================================================ policy


@fuzz_settings()
@given(data=st.data(), as_file=st.booleans())
def test_fuzz_policy(model_dirs: dict[str, Path], data: st.DataObject, as_file: bool) -> None:
    text = model_dirs["policy"].read_text()
    doc = mutate_json(data, json.loads(text))
    if not as_file:
        run_case(f"policy {doc!r}"[:4000], lambda: Policy.from_json(doc, "policy"))
        return
    with workdir() as d:
        path = d / "policy.json"
        if not one_in(data, 4, "as text"):
            write_json(path, doc)
        else:
            path.write_text(mutate_text(data, text, identifiers=["share", "specific", "skip", "null", "["]),
                            encoding="utf-8", errors="surrogatepass")
        run_case(f"policy file {path.read_bytes()!r}"[:4000], lambda: Policy.load(path))


# ================================================================ YAML configs


def _dotted(doc: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in doc.items():
        path = f"{prefix}{key}"
        out.append(path)
        if isinstance(value, dict):
            out += _dotted(value, f"{path}.")
    return out


CONFIG_KEYS = _dotted(DEFAULTS)
CONFIG_ANCHORED = """\
stages:
  pretrain: &stage {iters: 5, lr: 0.001, betas: &betas [0.5, 0.999], weight_decay: 0.0001}
  posttrain: {<<: *stage, step_size: 10, gamma: 0.5, init: policy, betas: *betas}
tasks:
  segment_semantic: &task {head: aspp, hidden: 8, weight: 1.0}
  depth_zbuffer: {<<: *task, weight: 2.0}
  normal: *task
batch_size: &b 2
eval_every: *b
"""
CONFIG_BOMB = "a: &a [1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n" \
              "c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c]\n" \
              "dataset: {options: {x: [*d, *d, *d, *d, *d, *d, *d, *d]}}\n"
YAML_VALUES = st.one_of(json_values(), st.sampled_from([
    "1e-3", "0x1F", "0o17", "yes", "no", "~", ".inf", "-.nan", "2021-02-30", "12:30:45", "!!binary AAAA",
    [0.5], [0.5, 0.999, 1.0], {"name": None}, {"head": "aspp", "hidden": 10**12}, {"type": "os:system"}]))


def _set_dotted(doc: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[last] = value


def config_text(data: st.DataObject) -> str:
    """A YAML config: DEFAULTS with mutated keys (values shared between keys become anchors and aliases), the
    anchored example, or an alias bomb; then, sometimes, text mutations."""
    base = data.draw(st.sampled_from(["defaults", "defaults", "defaults", "anchored", "bomb", "empty"]),
                     label="config base")
    if base == "defaults":
        doc = json.loads(json.dumps(DEFAULTS))
        for _ in range(data.draw(st.integers(1, 4), label="config rounds")):
            path = data.draw(st.sampled_from(CONFIG_KEYS), label="key")
            kind = data.draw(st.sampled_from(["value", "value", "share", "delete", "unknown"]))
            if kind == "value":
                _set_dotted(doc, path, data.draw(YAML_VALUES, label="value"))
            elif kind == "share":
                shared = data.draw(st.sampled_from([[0.5, 0.999], {"head": "aspp", "hidden": 8}, {"iters": 3}]))
                _set_dotted(doc, path, shared)
                _set_dotted(doc, data.draw(st.sampled_from(CONFIG_KEYS)), shared)
            elif kind == "delete":
                _set_dotted(doc, path, None)
            else:
                _set_dotted(doc, f"{path}.{data.draw(st.sampled_from(TEXTS))}", 1)
        text = yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)
    else:
        text = {"anchored": CONFIG_ANCHORED, "bomb": CONFIG_BOMB, "empty": ""}[base]
    if base != "defaults" or one_in(data, 4, "text mutations"):
        text = mutate_text(data, text, identifiers=["&a", "*a", "*stage", "&x", "<<:", "!!python/object:os.system",
                                                    "!!str", "null", "[", "{", "-", ":", "\t", "? "])
    return text


def test_config_bases_load() -> None:
    with workdir() as d:
        (d / "a.yaml").write_text(CONFIG_ANCHORED)
        cfg = load_config(d / "a.yaml")
        assert cfg["tasks"]["normal"]["hidden"] == 8 and cfg["stages"]["posttrain"]["iters"] == 5


@pytest.mark.parametrize("text", ["stages: {policy: {network_steps: null}}\n",
                                  "stages: {policy: {policy_steps: null}}\n", "batch_size: null\n"])
def test_regression_config_null_values(text: str) -> None:
    """Found by the fuzzer: null for a key with a default used to pass validation (a TypeError later)."""
    with workdir() as d:
        (d / "c.yaml").write_text(text)
        with pytest.raises(AutomtlError, match="must not be null"):
            load_config(d / "c.yaml")


@fuzz_settings()
@given(data=st.data())
def test_fuzz_config(data: st.DataObject) -> None:
    text = config_text(data)
    with workdir() as d:
        path = d / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        run_case(f"config:\n{text}"[:4000], lambda: load_config(path))


# ================================================================ CLI sample


#: Runs the CLI (its arguments follow) in a process whose address space is CLI_ADDRESS_SPACE bytes.
CLI_UNDER_RLIMIT = ("import resource, runpy, sys; "
                    f"resource.setrlimit(resource.RLIMIT_AS, ({CLI_ADDRESS_SPACE}, {CLI_ADDRESS_SPACE})); "
                    "sys.argv = ['automtl', *sys.argv[1:]]; "
                    "runpy.run_module('automtl_compiler.cli.main', run_name='__main__')")


def test_fuzz_cli_sample(graph_files: dict[str, Path], model_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A few mutated inputs through the real CLI (``inspect`` for backbones, ``sample`` for SuperModel
    directories), run concurrently in subprocesses with a bounded address space: each exits 0, or 2 with one
    ``error:`` line."""
    runs = max(2, examples() // 50 if LONG_EXAMPLES else 2)
    commands: list[list[str]] = []

    @settings(max_examples=runs, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data(), kind=st.sampled_from(["prototxt", "onnx", "graph", "supermodel"]))
    def collect(data: st.DataObject, kind: str) -> None:
        case = Path(tempfile.mkdtemp(prefix="case", dir=tmp_path))
        if kind == "prototxt":
            (case / "net.prototxt").write_text(mutate_text(data, data.draw(prototxt_texts())), encoding="utf-8",
                                               errors="surrogatepass")
            commands.append(["inspect", str(case / "net.prototxt")])
        elif kind == "onnx":
            (case / "m.onnx").write_bytes(mutate_onnx(data, ONNX_BASES[data.draw(st.sampled_from(sorted(ONNX_BASES)))]))
            commands.append(["inspect", str(case / "m.onnx")])
        elif kind == "graph":
            shutil.copytree(graph_files["with"], case / "g")
            _mutate_graph_dir(data, case / "g")
            commands.append(["inspect", str(case / "g" / "graph.json")])
        else:
            shutil.copytree(model_dirs["sm"], case / "sm")
            _mutate_model_dir(data, case / "sm")
            commands.append(["sample", str(case / "sm"), "--out", str(case / "policy.json")])

    collect()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           **{f"AUTOMTL_{k}": str(v) for k, v in FUZZ_LIMITS.items()},
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    failures = []
    batch = 4
    for i in range(0, len(commands), batch):
        procs = [(cmd, subprocess.Popen([sys.executable, "-c", CLI_UNDER_RLIMIT, *cmd], cwd=tmp_path, env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                 for cmd in commands[i:i + batch]]
        for cmd, proc in procs:
            try:
                _, err = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                failures.append(f"{cmd}: hung")
                continue
            lines = err.strip().splitlines()
            if proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "):
                continue
            if proc.returncode != 0 or "Traceback" in err:
                failures.append(f"{cmd}: exit {proc.returncode}: {err[-1500:]}")
    assert not failures, "\n".join(failures)
    assert len(commands) >= runs


# ================================================================ regressions (findings of the fuzzer)


def test_regression_onnx_hardsigmoid_tensor_alpha() -> None:
    """A HardSigmoid gate whose ``alpha`` is a tensor attribute made the x * HardSigmoid(x) pattern matcher
    (frontends/onnx.py ``_match_gated``) raise a TypeError; now the node is reported as malformed."""
    import onnx
    from onnx import TensorProto, helper

    m = onnx.ModelProto()
    m.ParseFromString(ONNX_BASES["acts"])
    gate = next(n for n in m.graph.node if n.op_type == "HardSigmoid")
    del gate.attribute[:]
    gate.attribute.append(helper.make_attribute("alpha", helper.make_tensor("t", TensorProto.FLOAT, [2], [1, 2])))
    with workdir() as d, pytest.raises(AutomtlError, match="hsig"):
        load_onnx_bytes(m.SerializeToString(), d)


@pytest.mark.parametrize(("node", "inputs"), [("conv", []), ("bn", []), ("act", ""), ("se", [])])
def test_regression_graph_node_without_inputs(graph_files: dict[str, Path], node: str, inputs: Any) -> None:
    """A structure-only graph file whose node lost its inputs made ``materialise`` index an empty input list
    (an IndexError from the op's shape rule); now it is a GraphError naming the node and its arity."""
    with workdir() as d:
        shutil.copytree(graph_files["bare"], d / "g")
        path = d / "g" / "graph.json"
        doc = json.loads(path.read_text())
        next(n for n in doc["nodes"] if n["name"] == node)["inputs"] = inputs
        write_json(path, doc)
        with pytest.raises(AutomtlError, match=f"node '{node}'.*input"):
            load_graph(path)
