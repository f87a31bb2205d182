"""Writes a Graph in the AutoMTL prototxt dialect (the format of AutoMTL's own model files).

Test-only: it lets the tests build a full-size AutoMTL-dialect file (legacy ``input`` + ``input_dim``, a
first layer reading ``data``, ``batch_norm_param { track_running_stats }``, ``relu_param { inplace }``,
``round_mode: CEIL``) without shipping AutoMTL's own file.
"""

from __future__ import annotations

from automtl_compiler import Graph


def _conv(n) -> str:
    a = n.attrs
    return (f"  convolution_param {{\n    num_output: {a['out_channels']}\n    bias_term: {str(a['bias']).lower()}\n"
            f"    pad: {a['padding'][0]}\n    kernel_size: {a['kernel_size'][0]}\n    group: {a['groups']}\n"
            f"    stride: {a['stride'][0]}\n    weight_filler {{\n      type: \"xavier\"\n    }}\n"
            f"    dilation: {a['dilation'][0]}\n  }}\n")


def _body(n) -> tuple[str, str]:
    a = n.attrs
    if n.op == "conv2d":
        return "Convolution", _conv(n)
    if n.op == "batchnorm2d":
        return "BatchNorm", f"  batch_norm_param {{\n    track_running_stats: true\n    eps: {a['eps']}\n  }}\n"
    if n.op == "relu":
        return "ReLU", "  relu_param {\n    inplace: 1\n  }\n"
    if n.op == "maxpool2d":
        return "Pooling", (f"  pooling_param {{\n    pool: MAX\n    kernel_size: {a['kernel_size'][0]}\n"
                           f"    stride: {a['stride'][0]}\n    pad: {a['padding'][0]}\n"
                           f"    round_mode: {'CEIL' if a['ceil_mode'] else 'FLOOR'}\n  }}\n")
    if n.op == "add":
        return "Eltwise", "  eltwise_param {\n    operation: SUM\n  }\n"
    raise ValueError(f"op {n.op} is not written by this test helper")


def write_automtl_dialect(graph: Graph, input_shape: tuple[int, ...]) -> str:
    """The text of ``graph`` in AutoMTL's dialect; blob names are the IR node names."""
    (first_input,) = graph.inputs
    lines = [f'name: "{graph.name}"\ninput: "blob1"\n' + "".join(f"input_dim: {d}\n" for d in input_shape)]
    for n in graph.topological_order():
        if n.op == "input":
            continue
        kind, body = _body(n)
        bottoms = "".join(f'  bottom: "{"data" if i == first_input else i}"\n' for i in n.inputs)
        lines.append(f'layer {{\n  name: "{n.name}"\n  type: "{kind}"\n{bottoms}  top: "{n.name}"\n{body}}}\n')
    return "".join(lines)
