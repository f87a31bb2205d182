"""Our training against AutoMTL's own code, on the same network, measured in one run.

Run: ``python -m benchmarks.automtl_side_by_side --automtl DIR`` (DIR: a checkout of
github.com/zhanglijun95/AutoMTL; without ``--automtl`` only our two columns are measured).

Both sides train AutoMTL's CityScapes setting: DeepLab ResNet-34 (AutoMTL's
``models/deeplab_resnet34_adashare.prototxt``, ours ``models/deeplab_resnet34.prototxt``: the same network),
an ASPP head per task (hidden 1024), tasks segment_semantic (19 classes) and depth_zbuffer, input
``--size`` squared, batch ``--batch``, ``--threads`` threads, on in-memory synthetic samples of the right
shapes. AutoMTL is imported from DIR in its own processes (see :mod:`.automtl_adapter` for the two
import-time patches it needs); nothing of it is copied here.

Figures (each measured in fresh processes, AutoMTL and our two variants alternating, ``--repeat`` rounds;
medians):
  build              the supermodel and its heads from the prototxt (AutoMTL: MTLModel(prototxt, heads);
                     ours: train.trainer.build_model, i.e. load_backbone + heads + build_from_specs)
  soft step          fwd + bwd of both tasks in soft (policy-training) mode with the policy regulariser, no
                     optimiser (AutoMTL: one call and backward per task, as train_step_with_reg; ours: the
                     Trainer's Loop.forward on both tasks at once, its losses, backward)
  soft-step peak RSS VmHWM of a fresh process that built the model and ran one soft step (AutoMTL: its soft
                     step, which computes every gradient; ours: the larger of the peaks of the trainer's two
                     soft steps - a network step, whose gates are constants, then, the peak reset, a policy step,
                     which computes no weight gradients - each also shown)
  hard inference     both tasks, every unit shared (the initial policy), batch 1, no_grad (AutoMTL: one hard-mode
                     call per task; ours: one forward_all call as our evaluation runs it, in fp32)
  trainer iteration  one iteration of each stage of the real trainers: AutoMTL's Trainer (pre_train,
                     alter_train_with_reg's network and policy steps, post_train on a sampled policy) and
                     ours as `automtl train` runs it (train.launch.run_training on a config that sets only the
                     model, data, batch size and iteration counts), each timed around its step function
                     (AutoMTL: Trainer.train_step / train_step_with_reg; ours: Loop.train_step), ``--steps``
                     per stage after one warm-up step.
"ours (defaults)" uses every other config key at its default; "ours fp32" also sets fp32, eager (see
:func:`fp32_overrides`). Ratios are ours / AutoMTL (without ``--automtl`` the first is defaults / fp32). The
FLOP floor is the FLOPs of our step (counted with torch.utils.flop_counter on the fp32 variant) over the best
GFLOP/s a large convolution reaches here at that precision.

Every result is logged on stderr as its process ends; SIGTERM or Ctrl-C stops the run and prints the table of
what was measured (exit status 1). Our runs' checkpoints go to a temporary directory (``--workdir``, default
/dev/shm when it has room), deleted after each process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .automtl_adapter import PROTOTXT as AUTOMTL_PROTOTXT
from .automtl_adapter import checkout_problem
from .common import peak_rss_mb, print_table, reset_peak_rss, wall_times

ROOT = Path(__file__).resolve().parent.parent
BACKBONE = ROOT / "models" / "deeplab_resnet34.prototxt"
CLASSES = {"segment_semantic": 19, "depth_zbuffer": 1}
HIDDEN = 1024  # AutoMTL's ASPPHeadNode width (fixed in its code)
TAU = 5.0
STAGES = (("pretrain", "pre-train iteration"), ("network", "policy-train network step"),
          ("policy", "policy step"), ("posttrain", "post-train iteration"))
TARGETS = {"stage": 0.8, "geomean": 0.67, "memory": 0.6}
SYSTEMS = {"automtl": "AutoMTL", "ours": "ours (defaults)", "fp32": "ours fp32"}


# ---------------------------------------------------------------- our in-memory dataset
class MemoryScenes(Dataset):
    """In-memory samples for our trainer (a ``package.module:Class`` dataset of the config): ``length``
    items cycling over ``pool`` random samples; images [3, H, W], ``segment_semantic`` [H, W] int64 in
    0..num_classes-1 with about 5% ignored (255), ``depth_zbuffer`` [1, H, W] float > 0."""

    def __init__(self, split: str = "train", tasks: dict[str, str] | None = None, length: int = 64,
                 resolution: tuple[int, int] = (224, 224), num_classes: int = 19, pool: int = 4) -> None:
        import torch

        self.split, self.length, self.classes = split, int(length), int(num_classes)
        self.tasks = dict(tasks or {t: t for t in CLASSES})
        h, w = int(resolution[0]), int(resolution[1])
        gen = torch.Generator().manual_seed({"train": 0, "val": 1, "policy": 2}.get(split, 3))
        self.pool = []
        for _ in range(pool):
            image = torch.rand(3, h, w, generator=gen)
            targets = {}
            for name, kind in self.tasks.items():
                if kind == "segment_semantic":
                    seg = torch.randint(0, self.classes, (h, w), generator=gen)
                    seg[torch.rand(h, w, generator=gen) < 0.05] = 255
                    targets[name] = seg
                else:
                    targets[name] = torch.rand(1, h, w, generator=gen) * 50 + 1
            self.pool.append((image, targets))

    @property
    def num_classes(self) -> dict[str, int]:
        return {n: self.classes if k == "segment_semantic" else 1 for n, k in self.tasks.items()}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, dict[str, Any]]:
        return self.pool[index % len(self.pool)]


# ---------------------------------------------------------------- our configs
def fp32_overrides() -> dict[str, Any]:
    """The config keys that select plain fp32 eager training, as the config schema names them now:
    ``precision: fp32`` (else the older ``bf16: false``), and ``compile``, ``channels_last`` and
    ``activation_checkpointing`` off when those keys exist."""
    from automtl_compiler.train.config import DEFAULTS

    out: dict[str, Any] = {}
    if "precision" in DEFAULTS:
        out["precision"] = "fp32"
    elif "bf16" in DEFAULTS:
        out["bf16"] = False
    for key in ("compile", "channels_last", "activation_checkpointing"):
        if key in DEFAULTS:
            off = _off_value(key, DEFAULTS[key])
            if off is not None:
                out[key] = off
    return out


def _off_value(key: str, default: Any) -> Any:
    """The value that turns ``key`` off (False for a flag; for a choice, its off-like option)."""
    if isinstance(default, bool) or default is None:
        return False
    from automtl_compiler.train import config

    choices = getattr(config, "_CHOICES", {}).get(key, ())
    return next((c for c in ("off", "false", "none", "no", "eager", "never") if c in choices), None)


def our_config(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """The config of our runs: the model, data, batch size and iteration counts; nothing else unless
    ``variant`` is ``fp32``. ``output_stride: null`` keeps the prototxt's own strides (it is already dilated to
    output stride 8, as AutoMTL's)."""
    n = args.steps + 1
    cfg: dict[str, Any] = {
        "backbone": str(BACKBONE), "output_stride": None,
        "dataset": {"name": f"{__name__}:MemoryScenes",
                    "options": {"length": 64, "resolution": [args.size, args.size], "num_classes": CLASSES["segment_semantic"]},
                    "split_options": {"val": {"length": 2}}},
        "tasks": {t: {"head": "aspp", "hidden": HIDDEN} for t in CLASSES},
        "stages": {"pretrain": {"iters": n}, "policy": {"iters": 2 * n, "network_steps": n, "policy_steps": n},
                   "sample": {"candidates": 1}, "posttrain": {"iters": n}},
        "batch_size": args.batch,
    }
    if variant == "fp32":
        cfg.update(fp32_overrides())
    return cfg


# ---------------------------------------------------------------- fresh processes
def _child_entry(name: str, spec: dict[str, Any], out: Any) -> None:
    """Run ``CHILDREN[name](spec)`` in this fresh process and put its result (or its error) on ``out``."""
    os.environ["OMP_NUM_THREADS"] = str(spec["threads"])
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a CPU benchmark: both sides pick the CPU
    try:
        if name.startswith("automtl"):
            from .automtl_adapter import import_automtl

            spec["mods"] = import_automtl(spec["automtl"])
        import torch

        torch.set_num_threads(spec["threads"])
        result = CHILDREN[name](spec)
    except BaseException as exc:  # noqa: BLE001 - reported by the parent in one line
        import traceback

        where = traceback.extract_tb(exc.__traceback__)[-1]
        result = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
                           f"({Path(where.filename).name}:{where.lineno})"}
    out.put(result)


def in_child(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The result dict of ``CHILDREN[name](spec)`` run in a fresh (spawned) process."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_child_entry, args=(name, spec, results))
    proc.start()
    result: dict[str, Any] | None = None
    try:
        while result is None:
            try:
                result = results.get(timeout=2.0)
            except queue.Empty:
                if not proc.is_alive():
                    try:
                        result = results.get(timeout=2.0)
                    except queue.Empty:
                        result = {"error": f"the measuring process ended without a result (exit code {proc.exitcode})"}
    except BaseException:  # interrupted: stop the child this call started
        proc.terminate()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        raise
    proc.join()
    return result


# ---------------------------------------------------------------- AutoMTL's children
def _automtl_batch(size: int, batch: int) -> dict[str, dict[str, Any]]:
    import torch

    from .automtl_adapter import task_samples

    out = {}
    for i, (t, c) in enumerate(CLASSES.items()):
        samples = task_samples(t, size, c, batch, i)
        out[t] = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    image = out["segment_semantic"]["input"]
    for data in out.values():
        data["input"] = image  # one batch for every task, as in our soft step
    return out


def automtl_model(spec: dict[str, Any]) -> dict[str, Any]:
    """AutoMTL's build, soft step, its peak RSS and hard inference, in this fresh process."""
    import torch

    from . import automtl_adapter as am

    mods, steps = spec["mods"], spec["steps"]
    model = am.build(mods, spec["automtl_prototxt"], CLASSES)
    crit = am.criteria(mods, list(CLASSES))
    batch = _automtl_batch(spec["size"], spec["batch"])
    model.train()
    am.soft_step(model, crit, batch)
    rss = peak_rss_mb()
    soft = wall_times(lambda: am.soft_step(model, crit, batch), steps)
    model.eval()
    x1 = torch.rand(1, 3, spec["size"], spec["size"])
    with torch.no_grad():
        infer = wall_times(lambda: am.hard_inference(model, x1, list(CLASSES)), steps + 1, warmup=1)
    build = wall_times(lambda: am.build(mods, spec["automtl_prototxt"], CLASSES), steps)
    return {"build": build, "soft": soft, "rss": [rss], "infer": infer}


def automtl_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    """One iteration per stage of AutoMTL's Trainer, in this fresh process."""
    import contextlib
    import io

    from . import automtl_adapter as am

    with contextlib.redirect_stdout(io.StringIO()):  # its progress prints
        out = am.trainer_iterations(spec["mods"], spec["automtl_prototxt"], CLASSES, size=spec["size"],
                                    batch=spec["batch"], steps=spec["steps"])
    out["policies"] = [policy_text(out.pop("sampled"))]
    return out


# ---------------------------------------------------------------- our children
def _our_trainer_object(spec: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Our Trainer for the config at ``spec['config']``, made as ``automtl train`` makes it."""
    from automtl_compiler.train.config import load_config
    from automtl_compiler.train.run import (
        make_datasets,
        make_task_types,
        resolve_input_size,
    )
    from automtl_compiler.train.trainer import Trainer

    cfg = load_config(spec["config"], [])
    datasets = make_datasets(cfg)
    resolve_input_size(cfg, datasets)
    types = make_task_types(cfg, datasets["train"])
    trainer = Trainer(cfg, spec["out"], datasets=datasets, task_types=types, progress=False)
    return trainer, {"datasets": datasets, "types": types}


def _our_soft_step(trainer: Any, x: Any, targets: dict[str, Any], kind: str = "all") -> None:
    """Both tasks in soft mode through the Trainer's own forward and losses, plus the regulariser; backward.
    ``kind``: "all" computes every gradient (as AutoMTL's step does); "network" and "policy" compute what the
    trainer's network and policy steps compute (the other parameters frozen, as ``train.stages.policy``
    freezes them)."""
    import contextlib

    import torch

    from automtl_compiler.train.stages import frozen

    loop, model = trainer.loop, trainer.model
    fixed = {"all": [], "network": model.policy_parameters(), "policy": model.network_parameters()}[kind]
    with frozen(fixed) if fixed else contextlib.nullcontext():
        gen = torch.Generator().manual_seed(0)
        losses = loop.losses(loop.forward(x, mode="soft", tau=TAU, generator=gen), targets)
        total = sum(losses.values())
        if kind != "network":
            reg = sum(model.policy_regulariser(t, tau=TAU, generator=gen) for t in loop.tasks)
            total = total + trainer.settings.stages.policy.reg_weight * reg
        total.backward()
    model.zero_grad(set_to_none=True)


def _our_inference(trainer: Any, x: Any) -> Any:
    """Both tasks in hard mode (the initial policy: every unit shared) in one call, as the Trainer's
    evaluation runs the model (in fp32 whatever the training precision)."""
    return trainer.model.forward_all(x, mode="hard")


def ours_model(spec: dict[str, Any]) -> dict[str, Any]:
    """Our build, soft step, its peak RSS and hard inference, in this fresh process."""
    import torch

    from automtl_compiler.data import collate
    from automtl_compiler.train.trainer import build_model

    trainer, parts = _our_trainer_object(spec)
    train = parts["datasets"]["train"]
    x, targets = collate([train[i] for i in range(spec["batch"])])
    trainer.model.train()
    _our_soft_step(trainer, x, targets, "network")  # the larger of the trainer's two soft steps first
    rss = {"rss_network": [peak_rss_mb()]}
    if reset_peak_rss():
        _our_soft_step(trainer, x, targets, "policy")
        rss["rss_policy"] = [peak_rss_mb()]
    rss["rss"] = [max(v[0] for v in rss.values())]
    _our_soft_step(trainer, x, targets)  # warm-up of the timed step
    steps = spec["steps"]
    soft = wall_times(lambda: _our_soft_step(trainer, x, targets), steps)
    trainer.model.eval()
    x1 = x[:1].clone()
    with torch.no_grad():
        infer = wall_times(lambda: _our_inference(trainer, x1), steps + 1, warmup=1)
        dtype = str(next(iter(trainer.loop.forward(x1, mode="hard").values())).dtype).replace("torch.", "")
    build = wall_times(lambda: build_model(trainer.settings, parts["types"]), steps)
    result: dict[str, Any] = {"build": build, "soft": soft, **rss, "infer": infer, "dtype": dtype}
    if spec["floors"]:
        result.update(_floor_counts(trainer, x, x1, targets))
    return result


def _floor_counts(trainer: Any, x: Any, x1: Any, targets: dict[str, Any]) -> dict[str, Any]:
    """FLOPs of one soft step and one inference, and the GFLOP/s a large convolution reaches here."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    trainer.model.train()
    with FlopCounterMode(display=False) as counter:
        _our_soft_step(trainer, x, targets)
    soft = counter.get_total_flops()
    trainer.model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        _our_inference(trainer, x1)
    return {"flops": {"soft": soft, "infer": counter.get_total_flops()},
            "gflops": {"float32": conv_gflops(None), "bfloat16": conv_gflops(torch.bfloat16)}}


def conv_gflops(autocast: Any) -> float:
    """Best GFLOP/s of forward + backward of a 3x3 convolution, 512 -> 512 channels on 2x512x28x28 (the
    shape of the network's late layers and ASPP heads), in fp32 or under CPU autocast to ``autocast``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    conv = torch.nn.Conv2d(512, 512, 3, padding=1)
    x = torch.randn(2, 512, 28, 28, requires_grad=True)

    def step() -> None:
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            y = conv(x)
        y.float().sum().backward()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    best = min(wall_times(step, 3, warmup=1))
    return flops / best / 1e9


def ours_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    """One iteration per stage of our trainer as `automtl train` runs it, in this fresh process: the run is
    started with train.launch.run_training and Loop.train_step is timed (and, for the warm-up step of each
    kind, its FLOPs counted when ``spec['floors']``)."""
    import inspect

    from automtl_compiler.train import loop as loop_module
    from automtl_compiler.train.launch import run_training

    original = loop_module.Loop.train_step
    signature = inspect.signature(original)
    times: dict[str, list[float]] = {kind: [] for kind, _ in STAGES}
    flops: dict[str, int] = {}

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs).arguments
        kind = ("policy" if bound["opt"] is self.opts.get("policy") else
                {"pretrain": "pretrain", "policy": "network", "posttrain": "posttrain"}[bound["stage"]])
        if spec["floors"] and not times[kind] and kind not in flops:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                result = original(self, *args, **kwargs)
            flops[kind] = counter.get_total_flops()
            times[kind].append(float("nan"))
            return result
        start = time.perf_counter()
        result = original(self, *args, **kwargs)
        times[kind].append(time.perf_counter() - start)
        return result

    loop_module.Loop.train_step = timed
    try:
        run_training(spec["config"], [], spec["out"], quiet=True)
    finally:
        loop_module.Loop.train_step = original
    out: dict[str, Any] = {k: v[1:] for k, v in times.items()}
    report = json.loads((Path(spec["out"]) / "report.json").read_text())
    out["policies"] = [policy_text(report.get("policy", {}))]
    arithmetic = report.get("arithmetic")
    if isinstance(arithmetic, dict):
        out["arithmetic"] = ", ".join(f"{k} {v}" for k, v in arithmetic.items())
    if flops:
        out["flops"] = flops
    return out


def policy_text(counts: dict[str, dict[str, int]]) -> str:
    """``task share/specific/skip`` for every task of a policy's unit counts."""
    return ", ".join(f"{t} {c.get('share', 0)}/{c.get('specific', 0)}/{c.get('skip', 0)}" for t, c in counts.items())


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "automtl_model": automtl_model, "automtl_trainer": automtl_trainer,
    "ours_model": ours_model, "ours_trainer": ours_trainer}


# ---------------------------------------------------------------- the run
class Interrupted(Exception):
    """SIGTERM or Ctrl-C: the run stops and reports what it measured so far."""


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


def measure(args: argparse.Namespace, systems: list[str], work: Path) -> dict[str, dict[str, Any]]:
    """Every figure of every system: ``--repeat`` rounds, each a fresh process per system and kind of
    measurement, the systems' order rotated every round. Each result is logged on stderr as it comes; an
    interruption (SIGTERM, Ctrl-C) ends the rounds early and leaves ``figures['_interrupted']`` set."""
    configs = {}
    import yaml

    for variant in ("ours", "fp32"):
        path = work / f"{variant}.yaml"
        path.write_text(yaml.safe_dump(our_config(args, variant), sort_keys=False))
        configs[variant] = str(path)
    figures: dict[str, dict[str, Any]] = {s: {} for s in systems}
    try:
        _rounds(args, systems, work, configs, figures)
    except (Interrupted, KeyboardInterrupt) as exc:
        figures["_interrupted"] = {"why": str(exc) or "Ctrl-C"}
    return figures


def _rounds(args: argparse.Namespace, systems: list[str], work: Path, configs: dict[str, str],
            figures: dict[str, dict[str, Any]]) -> None:
    for r in range(args.repeat):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        for kind in ("model", "trainer"):
            for system in order:
                spec = {"threads": args.threads, "size": args.size, "batch": args.batch, "steps": args.steps,
                        "automtl": args.automtl, "automtl_prototxt": args.automtl_prototxt,
                        "floors": args.floors and system == "fp32", "out": str(work / f"run-{system}-{r}")}
                if system in configs:
                    spec["config"] = configs[system]
                start = time.perf_counter()
                name = f"{'automtl' if system == 'automtl' else 'ours'}_{kind}"
                result = in_child(name, spec)
                shutil.rmtree(spec["out"], ignore_errors=True)
                status = result.get("error") or _summary(result)
                print(f"[round {r + 1}/{args.repeat}] {SYSTEMS[system]} {kind}: {status} "
                      f"({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
                _merge(figures[system], result)


def _summary(result: dict[str, Any]) -> str:
    """One child's figures in one line (medians in seconds; rss in MB)."""
    parts = [f"{k} {statistics.median(v):.3g}" for k, v in result.items()
             if isinstance(v, list) and v and all(isinstance(x, float) and not math.isnan(x) for x in v)]
    return ", ".join(parts) or "ok"


def _merge(into: dict[str, Any], result: dict[str, Any]) -> None:
    for key, value in result.items():
        if isinstance(value, list):
            into.setdefault(key, []).extend(v for v in value if not (isinstance(v, float) and math.isnan(v)))
        elif isinstance(value, dict):
            into.setdefault(key, {}).update(value)
        elif key == "error":
            into.setdefault("errors", []).append(value)
        else:
            into[key] = value


def _median(figures: dict[str, Any], key: str) -> float | None:
    values = figures.get(key) or []
    return statistics.median(values) if values else None


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "ms":
        return f"{value * 1e3:.0f} ms"
    if unit == "GB":
        return f"{value / 1024:.2f} GB"
    return f"{value:.2f} s"


def _ratio(ours: float | None, ref: float | None) -> float | None:
    return ours / ref if ours is not None and ref else None


def table(figures: dict[str, dict[str, Any]], args: argparse.Namespace) -> tuple[str, dict[str, dict[str, float | None]]]:
    """The table (printed) and each variant's ratios by figure."""
    rows_spec = [("build", "build supermodel + heads", "s"),
                 ("soft", f"soft step (fwd+bwd both tasks + regulariser), B={args.batch}", "s"),
                 ("rss", "soft step peak RSS (fresh process; ours: the larger of the next two)", "GB"),
                 ("rss_network", "  ours: the trainer's network step (policy frozen)", "GB"),
                 ("rss_policy", "  ours: the trainer's policy step (weights frozen)", "GB"),
                 ("infer", "hard inference both tasks, all-share, B=1", "ms")]
    rows_spec += [(k, f"trainer: {label}, B={args.batch}", "s") for k, label in STAGES]
    ref = figures.get("automtl", {})
    ratios: dict[str, dict[str, float | None]] = {"ours": {}, "fp32": {}}
    rows = []
    floors = figures.get("fp32", {})
    alone = "automtl" not in figures  # then the first ratio is ours (defaults) / ours fp32
    for key, label, unit in rows_spec:
        a = _median(ref, key)
        row = [label, "skipped" if alone else _fmt(a, unit)]
        for variant in ("ours", "fp32"):
            value = _median(figures.get(variant, {}), key)
            base = _median(figures.get("fp32", {}), key) if alone and variant == "ours" else a
            ratios[variant][key] = _ratio(value, base)
            row += [_fmt(value, unit), "-" if ratios[variant][key] is None else f"{ratios[variant][key]:.2f}"]
        row.append(_floor_text(key, floors, figures.get("ours", {})))
        rows.append(row)
    means = {}
    for variant in ("ours", "fp32"):
        stage = [ratios[variant][k] for k, _ in STAGES]
        means[variant] = (math.exp(sum(math.log(r) for r in stage) / len(stage))  # type: ignore[arg-type]
                          if all(r for r in stage) else None)
        ratios[variant]["geomean"] = means[variant]
    rows.append(["geometric mean of the 4 trainer-iteration ratios", "", "",
                 "-" if means["ours"] is None else f"{means['ours']:.2f}", "",
                 "-" if means["fp32"] is None else f"{means['fp32']:.2f}", ""])
    header = ["figure", SYSTEMS["automtl"], SYSTEMS["ours"], "ratio", SYSTEMS["fp32"], "ratio",
              "FLOP floor (defaults / fp32)"]
    return print_table(header, rows), ratios


def _floor_text(key: str, fp32: dict[str, Any], ours: dict[str, Any]) -> str:
    """Our step's FLOPs over the best conv GFLOP/s at each variant's precision."""
    flops = (fp32.get("flops") or {}).get(key)
    rates = fp32.get("gflops") or {}
    if not flops or not rates:
        return ""
    slow = rates.get("float32")
    fast = slow if key == "infer" else rates.get(ours.get("dtype", "float32"), slow)
    if key == "infer":
        return f"{flops / fast / 1e6:.0f} / {flops / slow / 1e6:.0f} ms ({flops / 1e9:.0f} GFLOP)"
    return f"{flops / fast / 1e9:.2f} / {flops / slow / 1e9:.2f} s ({flops / 1e9:.0f} GFLOP)"


def verdict(ratios: dict[str, dict[str, float | None]]) -> list[str]:
    """One line per variant: the targets met or not."""
    lines = []
    for variant in ("ours", "fp32"):
        r = ratios[variant]
        stage = [r.get(k) for k, _ in STAGES]
        if any(v is None for v in stage):
            continue
        worst = max(stage)  # type: ignore[type-var]
        met = "met" if worst <= TARGETS["stage"] else "NOT met"
        parts = [f"every stage ratio <= {TARGETS['stage']}: {met} (worst {worst:.2f})"]
        g = r["geomean"]
        parts.append(f"geomean <= {TARGETS['geomean']}: {'met' if g <= TARGETS['geomean'] else 'NOT met'} ({g:.2f})")
        m = r.get("rss")
        if m is not None:
            parts.append(f"soft-step peak memory ratio <= {TARGETS['memory']}: "
                         f"{'met' if m <= TARGETS['memory'] else 'NOT met'} ({m:.2f})")
        lines.append(f"targets, {SYSTEMS[variant]}: " + "; ".join(parts))
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.automtl_side_by_side", description=__doc__.splitlines()[0])
    p.add_argument("--automtl", metavar="DIR", default=None,
                   help="A checkout of github.com/zhanglijun95/AutoMTL (without it only our columns are measured).")
    p.add_argument("--automtl-prototxt", default=AUTOMTL_PROTOTXT, help="AutoMTL's prototxt, relative to DIR.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--size", type=int, default=224, help="Input height and width.")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="Rounds of fresh processes (alternating the systems).")
    p.add_argument("--steps", type=int, default=2, help="Timed steps per figure and process, after one warm-up.")
    p.add_argument("--no-floors", dest="floors", action="store_false", help="Skip the FLOP floor column.")
    p.add_argument("--workdir", default=None,
                   help="Where our runs' temporary directories go (default: /dev/shm when it has 8 GB free, else the "
                        "temp dir).")
    return p


def _default_workdir() -> str | None:
    """/dev/shm when it has room (our runs' checkpoints, about 3 GB at 224x224, then never touch the disk),
    else the temp dir."""
    try:
        return "/dev/shm" if shutil.disk_usage("/dev/shm").free > 8 << 30 else None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    for name in ("threads", "size", "batch", "repeat", "steps"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be at least 1", file=sys.stderr)
            sys.exit(2)
    systems = ["ours", "fp32"]
    if args.automtl is not None:
        problem = checkout_problem(args.automtl, args.automtl_prototxt)
        if problem is not None:
            print(f"error: --automtl: {problem}", file=sys.stderr)
            sys.exit(2)
        args.automtl = str(Path(args.automtl).resolve())
        systems.insert(0, "automtl")
    start, load = time.perf_counter(), os.getloadavg()[0]
    signal.signal(signal.SIGTERM, _interrupt)
    work = Path(tempfile.mkdtemp(prefix="automtl-sbs-", dir=args.workdir or _default_workdir()))
    try:
        figures = measure(args, systems, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    interrupted = figures.pop("_interrupted", None)
    if interrupted:
        print(f"INTERRUPTED ({interrupted['why']}): the figures below are those measured before it")
    print(f"AutoMTL side by side: DeepLab ResNet-34, {', '.join(f'{t} ({c} out)' for t, c in CLASSES.items())}, "
          f"ASPP hidden {HIDDEN}, input {args.size}x{args.size}, batch {args.batch}, {args.threads} threads; "
          f"medians over {args.repeat} rounds of fresh processes x {args.steps} steps; "
          f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end (the machine is shared)")
    if "automtl" not in systems:
        print("AutoMTL column skipped: no --automtl DIR given; the first ratio is ours (defaults) / ours fp32")
    dtype = figures.get("ours", {}).get("dtype")
    print(f"ours (defaults): every config key at its default (computes in {dtype or '?'}); ours fp32: "
          f"{', '.join(f'{k}: {v}' for k, v in fp32_overrides().items())}")
    _, ratios = table(figures, args)
    for line in verdict(ratios) if "automtl" in systems else []:  # the targets are against AutoMTL
        print(line)
    print("post-train policies sampled after the short policy training (units share/specific/skip per task):")
    for system in systems:
        print(f"  {SYSTEMS[system]}: " + "; ".join(figures[system].get("policies", [])))
    if figures.get("ours", {}).get("arithmetic"):
        print(f"ours (defaults) trained with: {figures['ours']['arithmetic']}")
    for system in systems:
        for error in figures[system].get("errors", []):
            print(f"error in {SYSTEMS[system]}: {error}")
    print(f"({time.perf_counter() - start:.0f} s)")
    if interrupted:
        sys.exit(1)


if __name__ == "__main__":
    main()
