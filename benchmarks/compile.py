"""Compile time: source -> IR -> ``to_torch`` module, for each frontend and several backbones.

Run: ``python -m benchmarks.compile`` (2 threads by default). Each figure is the median of several runs;
the reference measured in the same run is constructing the torchvision model itself (random init), so a
ratio below 1 means compiling is cheaper than building the model in plain PyTorch.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torchvision

from automtl_compiler import export_prototxt, load_backbone, to_torch
from automtl_compiler.backends.onnx_export import export_graph_onnx

from .common import median_seconds, print_table

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mnasnet1_0", "efficientnet_b0", "densenet121"]


def run(models: list[str], repeat: int, threads: int) -> str:
    """Measure every (model, frontend) pair and print the table."""
    torch.set_num_threads(threads)
    shape = (1, 3, 224, 224)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            module = torchvision.models.get_model(name, weights=None).eval()
            graph = load_backbone(module, input_shape=shape)
            onnx_path = export_graph_onnx(graph, Path(tmp) / f"{name}.onnx", verify=False)
            proto_path = export_prototxt(graph, Path(tmp) / f"{name}.prototxt")
            weights = proto_path.with_suffix(".safetensors")
            ref = median_seconds(lambda: torchvision.models.get_model(name, weights=None), repeat=repeat)
            sources = {"fx": lambda: load_backbone(module, input_shape=shape),
                       "onnx": lambda: load_backbone(onnx_path),
                       "prototxt": lambda: load_backbone(proto_path, weights=weights)}
            row = [name, f"{ref * 1e3:.0f}"]
            for load in sources.values():
                t = median_seconds(lambda: to_torch(load()), repeat=repeat)
                row += [f"{t * 1e3:.0f}", f"{t / ref:.2f}"]
            rows.append(row)
    header = ["model", "torchvision build ms", "fx ms", "fx ratio", "onnx ms", "onnx ratio", "prototxt ms",
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
