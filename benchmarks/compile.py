"""Compile time: source -> IR -> ``to_torch`` module, for each frontend and several backbones.

Run: ``python -m benchmarks.compile`` (2 threads by default). Each figure is the median of several runs;
the reference measured in the same run is constructing the model itself in its library (torchvision, or
timm for ``timm:NAME``; random init), so a ratio below 1 means compiling is cheaper than building the model
in plain PyTorch. A source that cannot express a model (Caffe has no layer norm, say) shows its error.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from automtl_compiler import Graph, export_prototxt, load_backbone, to_torch
from automtl_compiler.backends.onnx_export import export_graph_onnx
from automtl_compiler.errors import AutomtlError

from .common import median_seconds, print_table

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mnasnet1_0", "efficientnet_b0", "densenet121", "timm:resnet50",
          "timm:efficientnet_b0", "timm:regnety_002", "timm:convnext_atto", "timm:nf_resnet26"]


def factory(name: str) -> Callable[[], torch.nn.Module]:
    """How to build ``name`` with random weights: ``timm:NAME`` from timm, anything else from torchvision."""
    if name.startswith("timm:"):
        import timm

        return lambda: timm.create_model(name[5:], pretrained=False)
    return lambda: torchvision.models.get_model(name, weights=None)


def _sources(module: torch.nn.Module, graph: Graph, stem: Path,
             shape: tuple[int, ...]) -> dict[str, Callable[[], Graph] | str]:
    """A loader per frontend, after writing the model's ONNX and prototxt files; a string says why a
    format cannot hold the model."""
    out: dict[str, Callable[[], Graph] | str] = {"fx": lambda: load_backbone(module, input_shape=shape)}
    try:
        onnx_path = export_graph_onnx(graph, stem.with_suffix(".onnx"), verify=False)
        out["onnx"] = lambda: load_backbone(onnx_path)
    except AutomtlError as e:
        out["onnx"] = str(e)[:80]
    try:
        proto = export_prototxt(graph, stem.with_suffix(".prototxt"))
        out["prototxt"] = lambda: load_backbone(proto, weights=proto.with_suffix(".safetensors"))
    except AutomtlError as e:
        out["prototxt"] = str(e)[:80]
    return out


def run(models: list[str], repeat: int, threads: int) -> str:
    """Measure every (model, frontend) pair and print the table."""
    torch.set_num_threads(threads)
    shape = (1, 3, 224, 224)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            build = factory(name)
            module = build().eval()
            graph = load_backbone(module, input_shape=shape)
            stem = Path(tmp) / name.replace(":", "_")
            ref = median_seconds(build, repeat=repeat)
            row = [name, f"{ref * 1e3:.0f}"]
            for load in _sources(module, graph, stem, shape).values():
                if isinstance(load, str):
                    row += ["n/a", load]
                    continue
                t = median_seconds(lambda load=load: to_torch(load()), repeat=repeat)
                row += [f"{t * 1e3:.0f}", f"{t / ref:.2f}"]
            rows.append(row)
    header = ["model", "library build ms", "fx ms", "fx ratio", "onnx ms", "onnx ratio", "prototxt ms",
              "prototxt ratio"]
    print(f"compile time, source -> to_torch module, median of {repeat}, {threads} threads, input {list(shape)}")
    return print_table(header, rows)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run(args.models, args.repeat, args.threads)


if __name__ == "__main__":
    main()
