"""Frontend coverage over timm's CNN families: does each model round-trip to the same numbers?

Run: ``python -m benchmarks.coverage`` (about 20 minutes on 2 cores; ``--models`` for a subset,
``--json FILE`` to keep the results). For every model (random weights, batch norms given non-trivial
statistics, eval mode) it checks, at rtol 1e-3 / atol 1e-4 against the timm module itself:

- **fx**: ``load_backbone(module)`` then ``to_torch``; the compile time (trace -> IR -> module, median of 3)
  is printed too;
  the tolerance's absolute part scales with the largest output (see ``_compare``);
- **onnx-ts** / **onnx-dynamo**: ``torch.onnx.export`` with ``dynamo=False`` and ``dynamo=True``, then
  ``load_backbone(file.onnx)``;
- **prototxt**: the fx graph exported with ``export_prototxt`` and read back, after folding weight
  standardisation into the conv weights (``passes.fold_weights``; Caffe has no layer for some ops: such a
  model fails with the op named);
- **multi-task**: ``build_supermodel`` with two heads; the all-share model equal to the module's
  ``forward_features`` + head, and how many of the convs ``forward_features`` runs became policy-able units.

A failing cell holds the error, which names the op or node; the table pastes into the README.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MODELS = [
    "resnet18", "resnet26d", "resnext26ts", "seresnet18", "seresnext26d_32x4d", "skresnet18", "resnest14d",
    "res2net50_14w_8s", "regnetx_002", "regnety_002", "efficientnet_b0", "efficientnet_lite0",
    "tf_efficientnet_b0", "mobilenetv2_050", "mobilenetv3_small_050", "mobilenetv4_conv_small", "mnasnet_100",
    "spnasnet_100", "ghostnet_100", "ghostnetv2_100", "densenet121", "dla34", "dpn68", "hrnet_w18_small",
    "vgg11", "repvgg_a0", "mobileone_s0", "cspresnet50", "cspdarknet53", "darknet17", "rexnet_100", "tinynet_e",
    "mixnet_s", "fbnetc_100", "ese_vovnet19b_dw", "selecsls42b", "inception_v3", "nf_resnet26", "hardcorenas_a",
    "lcnet_050", "convnext_atto", "gernet_s",
]
RTOL, ATOL = 1e-3, 1e-4


def randomised(name: str) -> torch.nn.Module:
    """The timm model with random weights and batch norms that are not the identity."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _compare(got: torch.Tensor, want: torch.Tensor) -> str:
    """``ok (largest difference relative to the output's scale)`` or why not. The absolute tolerance scales
    with the largest output: random-weight logits of deep nets reach 1e10 (Inception), where float32
    rounding alone is far above 1e-4."""
    if got.shape != want.shape:
        return f"FAIL: shape {list(got.shape)} vs {list(want.shape)}"
    scale = max(1.0, want.abs().max().item())
    diff = (got - want).abs().max().item() / scale
    ok = torch.allclose(got, want, rtol=RTOL, atol=ATOL * scale)
    return f"ok ({diff:.0e})" if ok else f"FAIL: max diff {diff:.2e} of the output's scale"


def _cell(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001  (the table records every kind of failure, with its message)
        text = " ".join(str(e).split())
        return f"FAIL: {type(e).__name__}: {text[:150]}"


def check(name: str, shape: tuple[int, ...], tmp: Path) -> dict[str, Any]:
    """All columns for one model."""
    from automtl_compiler import (
        build_supermodel,
        export_prototxt,
        load_backbone,
        to_torch,
    )
    from automtl_compiler.nn.heads import ASPPHead, ClassificationHead
    from automtl_compiler.passes.fold_weights import fold_weight_standardisation

    from .common import median_seconds

    model = randomised(name)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    convs: list[torch.nn.Module] = []  # the convs forward_features runs: each should become a unit
    hooks = [m.register_forward_hook(lambda m, i, o: convs.append(m)) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        feats = model.forward_features(x)
        for h in hooks:
            h.remove()
        want = model(x)
    row: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in model.parameters())}
    graph: dict[str, Any] = {}

    def fx() -> str:
        graph["g"] = load_backbone(model, input_shape=shape)
        module = to_torch(graph["g"]).eval()
        row["compile_ms"] = round(median_seconds(lambda: to_torch(load_backbone(model, input_shape=shape)),
                                                 repeat=3) * 1e3)
        with torch.no_grad():
            return _compare(module(x), want)

    def onnx(dynamo: bool) -> str:
        path = tmp / f"{name}-{'dynamo' if dynamo else 'ts'}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kwargs: dict[str, Any] = {"dynamo": dynamo, "opset_version": 17 if not dynamo else 18}
            if dynamo:
                kwargs["verbose"] = False
            torch.onnx.export(model, (x,), str(path), **kwargs)
        with torch.no_grad():
            return _compare(to_torch(load_backbone(path)).eval()(x), want)

    def prototxt() -> str:
        if "g" not in graph:
            return "n/a (fx failed)"
        folded, _ = fold_weight_standardisation(graph["g"])  # Caffe has no weight standardisation
        path = export_prototxt(folded, tmp / f"{name}.prototxt")
        back = load_backbone(path, weights=path.with_suffix(".safetensors"))
        with torch.no_grad():
            return _compare(to_torch(back).eval()(x), want)

    def multitask() -> str:
        if "g" not in graph:
            return "n/a (fx failed)"
        heads = {"seg": ASPPHead(feats.shape[1], 3, hidden=4, rates=(1,)), "cls": ClassificationHead(feats.shape[1], 5)}
        sm = build_supermodel(graph["g"], heads).eval()
        with torch.no_grad():
            got = _compare(sm(x, task="seg"), heads["seg"](feats))
        return got + f", {len(sm.units)}/{len(convs)} convs are units"

    row["fx"] = _cell(fx)
    row["onnx-ts"] = _cell(lambda: onnx(False))
    row["onnx-dynamo"] = _cell(lambda: onnx(True))
    row["prototxt"] = _cell(prototxt)
    row["multi-task"] = _cell(multitask)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--size", type=int, default=96, help="input height and width (inception_v3 needs >= 75)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from .common import print_table

    columns = ["fx", "onnx-ts", "onnx-dynamo", "prototxt", "multi-task"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row = check(name, (1, 3, args.size, args.size), Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    table = [[r["model"], f"{r['params'] / 1e6:.1f}M", *(r[c] for c in columns), r.get("compile_ms", "")]
             for r in rows]
    print_table(["model", "params", *columns, "fx compile ms"], table)
    passed = {c: sum(r[c].startswith("ok") for r in rows) for c in columns}
    print("passed: " + ", ".join(f"{c} {n}/{len(rows)}" for c, n in passed.items()))


if __name__ == "__main__":
    main()
