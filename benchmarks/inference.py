"""Multi-task inference: the compact ONNX model against PyTorch, AutoMTL-style inference and its floor.

Run: ``python -m benchmarks.inference`` (defaults: AutoMTL's DeepLab ResNet-34 from
``models/deeplab_resnet34.prototxt``, 3 tasks with ASPP heads of hidden width 256 - AutoMTL uses 1024, which
takes hours rather than minutes here - inputs 1x3x224x224 and 8x3x224x224, 2 threads, median of 5 timed
round-robin).
``--backbone torchvision:resnet34`` uses torchvision's (undilated) ResNet-34; ``--batches 1`` limits the
batch sizes.

For two policies - all-share, and one that shares the first half of the units and samples the rest from
seeded random logits - every measurement is a median wall time of one call computing every task:
  (a) the compact model (pruned, exported, verified) in onnxruntime, all tasks in one call (for the
      all-share policy this is the file of (e), so (a) = (e) there)
  (b) the same compact model in PyTorch eager
  (c) AutoMTL-style inference: the SuperModel in fixed mode (= hard mode for the all-share policy),
      one call per task
  (d) T independent single-task models (backbone + head) in onnxruntime, one after the other
  (e) one backbone + T heads in onnxruntime (the all-share compact model): the floor for any policy
FLOPs are multiply-accumulates of the trunk (from the IR) plus the heads. Peak resident memory of (a)
and (c) is measured in fresh subprocesses that load the model from disk and run it once: (a) imports only
onnxruntime and numpy, (c) imports automtl_compiler (and so torch); the import-only baselines are shown.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automtl_compiler import build_supermodel, load_backbone
from automtl_compiler.backends.onnx_export import export_onnx
from automtl_compiler.nn.compact import CompactModel, prune
from automtl_compiler.nn.heads import ASPPHead
from automtl_compiler.nn.policy import Policy
from automtl_compiler.nn.supermodel import SuperModel
from automtl_compiler.passes.feature import find_feature_node
from automtl_compiler.runtime import InferenceSession

from .common import median_seconds, print_table

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = ROOT / "models" / "deeplab_resnet34.prototxt"
TASKS = {"segment_semantic": 13, "depth_zbuffer": 1, "normal": 3, "edge": 1, "keypoint": 1}

PEAK = """
def peak_mb():
    # VmHWM: this process's own high-water mark (ru_maxrss would carry over the parent's from before exec)
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

ORT_RSS = PEAK + """
import sys
import numpy as np
import onnxruntime as ort
path, batch, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if path != "-":
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    session.run(None, {"input": x})
print(peak_mb())
"""

TORCH_RSS = PEAK + """
import sys
import torch
from automtl_compiler.nn.policy import Policy
from automtl_compiler.nn.supermodel import SuperModel
directory, policy, batch, size, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
if directory != "-":
    model = SuperModel.load(directory).eval()
    policy = Policy.load(policy)
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        for task in model.tasks:
            model(x, task=task, mode="fixed", policy=policy)
print(peak_mb())
"""


def rss_mb(script: str, *args: object) -> float:
    """Peak RSS (MB) of a fresh Python process running ``script`` with ``args``."""
    res = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                         check=False, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"RSS subprocess failed: {res.stderr.strip()[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def head_macs(head: nn.Module, feature_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of ``head`` on one feature map (conv and linear layers)."""
    total = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += out.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += out.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in head.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            head.eval()(torch.zeros(1, *feature_shape[1:]))
    finally:
        for h in hooks:
            h.remove()
    return total


def task_macs(model: CompactModel, task: str) -> int:
    """Trunk multiply-accumulates of one task's path (what one SuperModel call for that task computes)."""
    graph = model.graph
    return sum(graph.node_flops(graph.node(n)) for n in model.task_nodes(task))


def interleaved_medians(calls: dict[Any, Callable[[], Any]], repeat: int) -> dict[Any, float]:
    """Median wall time of each call, timed round-robin (one warm-up each first), so that a slow spell of
    the machine touches every measurement alike instead of one."""
    for fn in calls.values():
        median_seconds(fn, repeat=1, warmup=0)
    samples: dict[Any, list[float]] = {k: [] for k in calls}
    for _ in range(repeat):
        for key, fn in calls.items():
            samples[key].append(median_seconds(fn, repeat=1, warmup=0))
    return {k: statistics.median(v) for k, v in samples.items()}


def policies(sm: SuperModel, seed: int, half_by: str = "units") -> dict[str, Policy]:
    """all-share, and the first half of the network shared + the rest sampled from seeded random logits.

    ``half_by="units"`` shares the first half of the units (convs); ``"flops"`` shares the units that start
    before half of the backbone's multiply-accumulates are done.
    """
    units = sm.unit_names
    shared = len(units) // 2
    if half_by == "flops":
        graph = sm.mt.trunk
        total, done, before = graph.flops(), 0, {}
        for node in graph.topological_order():
            before[node.name] = done
            done += graph.node_flops(node)
        shared = sum(before[u] < total / 2 for u in units)
    share = Policy({t: {u: "share" for u in units} for t in sm.tasks})
    gen = torch.Generator().manual_seed(seed)
    saved = [p.detach().clone() for p in sm.policy_parameters()]
    with torch.no_grad():
        for p in sm.policy_parameters():
            p.copy_(torch.randn(3, generator=gen))
        sampled = sm.sample_policy("sample", seed=seed)
        for p, s in zip(sm.policy_parameters(), saved):
            p.copy_(s)
    half = Policy({t: {u: ("share" if i < shared else sampled.choices[t][u]) for i, u in enumerate(units)}
                   for t in sm.tasks})
    return {"all-share": share, "half-shared": half}


def run(args: argparse.Namespace) -> str:
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size, batches, repeat = args.size, args.batches, args.repeat
    graph = load_backbone(args.backbone, input_shape=(1, 3, size, size))
    feature = find_feature_node(graph)
    channels = graph.node(feature).shape[1]
    names = list(TASKS)[:args.tasks]
    heads = {t: ASPPHead(channels, TASKS[t], hidden=args.hidden) for t in names}
    sm = build_supermodel(graph, heads, feature_node=feature).eval()
    pols = policies(sm, args.seed, args.half_by)
    feature_shape = sm.mt.trunk.node(sm.mt.feature_node).shape
    macs_heads = sum(head_macs(h, feature_shape) for h in heads.values())

    rows: list[list[str]] = []
    info: list[str] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        compact: dict[str, CompactModel] = {}
        files: dict[str, Path] = {}
        for name, policy in pols.items():
            compact[name] = prune(sm, policy).eval()
            files[name] = export_onnx(compact[name], tmp / f"{name}.onnx", input_shape=(1, 3, size, size))
            policy.save(tmp / f"{name}.json")
        singles = []
        for t in names:
            one = build_supermodel(graph, {t: heads[t]}, feature_node=feature).eval()
            model = prune(one, Policy({t: {u: "share" for u in one.unit_names}})).eval()
            singles.append(export_onnx(model, tmp / f"single_{t}.onnx", input_shape=(1, 3, size, size)))
            del one, model
        info.append(f"built and exported in {time.perf_counter() - start:.0f} s")

        def ort_session(path: Path) -> InferenceSession:
            return InferenceSession(path, provider="cpu", threads=args.threads)

        sessions = {name: ort_session(p) for name, p in files.items()}
        single_sessions = [ort_session(p) for p in singles]
        times: dict[tuple[str, str], dict[int, float]] = {}
        for b in batches:
            x = torch.randn(b, 3, size, size)
            xn = x.numpy()
            calls = {("e", "all-share"): lambda xn=xn: sessions["all-share"].run(xn),
                     ("d", ""): lambda xn=xn: [s.run(xn) for s in single_sessions]}
            for name, policy in pols.items():
                if name != "all-share":  # (a) of the all-share policy is (e): the same file
                    calls[("a", name)] = lambda xn=xn, name=name: sessions[name].run(xn)
                calls[("b", name)] = lambda x=x, name=name: compact[name](x)
                calls[("c", name)] = lambda x=x, policy=policy: [sm(x, task=t, mode="fixed", policy=policy)
                                                                 for t in names]
            with torch.no_grad():
                for key, seconds in interleaved_medians(calls, repeat).items():
                    times.setdefault(key, {})[b] = seconds
            times.setdefault(("a", "all-share"), {})[b] = times[("e", "all-share")][b]
            print(f"  B={b} timed ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

        labels = {"e": f"(e) backbone once + {len(names)} heads, onnxruntime (floor)",
                  "d": f"(d) {len(names)} single-task models, onnxruntime",
                  "a": "(a) compact model, onnxruntime, all tasks",
                  "b": "(b) compact model, PyTorch eager, all tasks",
                  "c": "(c) SuperModel fixed, one call per task (AutoMTL)"}

        def ms(key: tuple[str, str]) -> list[str]:
            return [f"{times[key][b] * 1e3:.0f}" for b in batches]

        def ratio(num: tuple[str, str], den: tuple[str, str]) -> list[str]:
            return [f"{times[num][b] / times[den][b]:.2f}" for b in batches]

        rows.append([labels["e"], "all-share", *ms(("e", "all-share"))])
        rows.append([labels["d"], "", *ms(("d", ""))])
        flops_share = compact["all-share"].graph.flops() + macs_heads
        for name in pols:
            for k in "abc":
                rows.append([labels[k], name, *ms((k, name))])
        for name in pols:
            flops_ratio = (compact[name].graph.flops() + macs_heads) / flops_share
            a_e = [times[("a", name)][b] / times[("e", "all-share")][b] for b in batches]
            rows.append(["ratio (a)/(e)", name, *[f"{r:.2f}" for r in a_e]])
            rows.append(["ratio FLOPs(compact)/FLOPs(all-share)", name, *[f"{flops_ratio:.2f}"] * len(batches)])
            rows.append(["target (a)/(e) <= 1.1 x FLOPs ratio", name,
                         *["met" if r <= 1.1 * flops_ratio else "missed" for r in a_e]])
            rows.append(["ratio (c)/(a) (target >= 2 for half-shared)", name, *ratio(("c", name), ("a", name))])
            per_task = sum(task_macs(compact[name], t) for t in names) + macs_heads
            rows.append(["ratio FLOPs (c)/(a)", name,
                         *[f"{per_task / (compact[name].graph.flops() + macs_heads):.2f}"] * len(batches)])
            rows.append(["ratio (b)/(a)", name, *ratio(("b", name), ("a", name))])
            rows.append(["ratio (d)/(a)", name, *ratio(("d", ""), ("a", name))])

        if not args.no_rss:
            b = batches[0]
            sm_dir = tmp / "sm"
            sm.save(sm_dir)
            base_ort = rss_mb(ORT_RSS, "-", b, size, args.threads)
            base_torch = rss_mb(TORCH_RSS, "-", "-", b, size, args.threads)
            pad = ["-"] * (len(batches) - 1)
            for name in pols:
                rss_a = rss_mb(ORT_RSS, files[name], b, size, args.threads)
                rss_c = rss_mb(TORCH_RSS, sm_dir, tmp / f"{name}.json", b, size, args.threads)
                rows.append([f"peak RSS MB (a), onnxruntime process, B={b}", name, f"{rss_a:.0f}", *pad])
                rows.append([f"peak RSS MB (c), PyTorch process, B={b}", name, f"{rss_c:.0f}", *pad])
                rows.append(["ratio peak RSS (a)/(c)", name, f"{rss_a / rss_c:.2f}", *pad])
            info.append(f"import-only peak RSS: onnxruntime {base_ort:.0f} MB, automtl_compiler + torch "
                        f"{base_torch:.0f} MB")

    counts = {n: p.counts() for n, p in pols.items()}
    half = counts["half-shared"]
    print(f"Inference benchmark: {Path(args.backbone).name} (feature {feature} {list(feature_shape)}), "
          f"{len(names)} tasks {', '.join(names)}, ASPP hidden {args.hidden}, input {size}x{size}, {args.threads} "
          f"threads, median of {repeat}; half-shared policy (first half of the {args.half_by} shared): "
          + "; ".join(f"{t} " + ", ".join(f"{k} {v}" for k, v in c.items()) for t, c in half.items()))
    print(f"trunk MACs: all-share {compact['all-share'].graph.flops() / 1e9:.2f} G, half-shared "
          f"{compact['half-shared'].graph.flops() / 1e9:.2f} G; heads {macs_heads / 1e9:.2f} G (per image); "
          + "; ".join(info))
    table = print_table(["measurement (ms unless stated)", "policy", *[f"B={b}" for b in batches]], rows)
    print(f"({time.perf_counter() - start:.0f} s)")
    return table


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=str(BACKBONE),
                        help="prototxt path or torchvision:NAME (e.g. torchvision:resnet34)")
    parser.add_argument("--tasks", type=int, default=3, choices=range(1, len(TASKS) + 1))
    parser.add_argument("--hidden", type=int, default=256, help="ASPP hidden width (AutoMTL: 1024)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8],
                        help="comma-separated batch sizes, e.g. 1 or 1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--half-by", choices=["units", "flops"], default="units",
                        help="the half-shared policy shares the first half of the units, or of the backbone FLOPs")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocesses")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
