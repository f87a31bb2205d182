"""The main job: backbone -> trained, pruned, exported, verified and benchmarked multi-task model.

``run(config, out)`` trains single-task references (unless told not to), runs AutoMTL's stages on the
SuperModel, saves it, prunes it to the sampled policy, exports the compact model to ONNX (verified in
onnxruntime against PyTorch) and times it against the tasks run one by one. Every intermediate lands in
the run directory under the name the single-stage commands use, so each step can be redone alone:

    RUN_DIR/references/      single-task references (``automtl train --baseline single-task``)
    RUN_DIR/checkpoints/     the training run (``automtl train``), with config.yaml, metrics.jsonl
    RUN_DIR/supermodel/      the trained SuperModel (``automtl sample`` / ``automtl prune`` read it)
    RUN_DIR/policy.json      the sampled policy
    RUN_DIR/compact/         the pruned model (``automtl prune``)
    RUN_DIR/model.onnx       every task in one graph (``automtl export``); tasks/<task>.onnx one each
    RUN_DIR/report.json      metrics, Δm, parameters, policy, latency; RUN_DIR/policy.png the policy per task and unit
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from .errors import AutomtlError
from .ir.serialize import atomic_write

#: What ``--quick`` changes: every stage runs, with fewer and smaller steps.
QUICK = ["stages.pretrain.iters=10", "stages.policy.iters=20",
         "stages.policy.network_steps=10", "stages.policy.policy_steps=5", "stages.policy.tau_every=5",
         "stages.sample.candidates=4", "stages.sample.calibration_batches=2", "stages.posttrain.iters=20", "batch_size=4", "eval_every=0",
         "eval_batches=2", "checkpoint_every=10"]
#: ... and, for the built-in synthetic scenes only, smaller splits.
QUICK_SYNTHETIC = ["dataset.options.length=256"]


def quick_overrides(config: str | Path | None, overrides: list[str]) -> list[str]:
    """The ``--quick`` overrides for this config (the scene count only where the data are synthetic)."""
    from .train.config import load_config

    synthetic = load_config(config, overrides)["dataset"]["name"] == "synthetic"
    return QUICK + (QUICK_SYNTHETIC if synthetic else [])


def _say(text: str, quiet: bool) -> None:
    if not quiet:
        print(f"[run] {text}", file=sys.stderr, flush=True)


def run(config: str | Path | None, out: str | Path, *, quick: bool = False, overrides: list[str] = (),  # type: ignore[assignment]
        references: bool = True, overwrite: bool = False, progress: bool = True, latency_repeat: int = 20) -> dict[str, Any]:
    """Run the whole pipeline for ``config`` (None: the built-in default) into ``out``; return the report.

    Re-running the same command resumes: finished training is not repeated, the later steps are redone.
    A directory holding a run of another config is an error unless ``overwrite``, which replaces only an
    automtl run directory (the old run is put back when the new one fails before its first checkpoint).
    """
    import torch

    from .backends.onnx_export import export_onnx
    from .nn.compact import prune
    from .train.config import dump_config, load_config
    from .train.distributed import context_from_env
    from .train.run import (
        make_datasets,
        make_task_types,
        resolve_input_size,
        run_directory,
        train_single_task_references,
    )
    from .train.scoring import read_baseline
    from .train.trainer import Trainer

    cfg = load_config(config, [*(quick_overrides(config, list(overrides)) if quick else []), *overrides])
    out = Path(out)
    train_references = references and not cfg["baselines"]
    if train_references:
        cfg["baselines"] = str(out / "references" / "report.json")
    datasets = make_datasets(cfg)
    resolve_input_size(cfg, datasets)
    ctx, _ = context_from_env(cfg["device"])
    # the marker first, then config.yaml: a replaced run (--overwrite) waits aside until the first checkpoint
    with run_directory(out, cfg, resume=False, overwrite=overwrite, kind="run", ctx=ctx) as run_dir:
        if ctx.is_main:
            (out / "config.yaml").write_text(dump_config(cfg))
        quiet = not progress or not ctx.is_main
        types = make_task_types(cfg, datasets["train"])
        tasks = list(cfg["tasks"])

        if train_references:
            _say(f"training {len(tasks)} single-task references with the same budget -> {out / 'references'}", quiet)
            train_single_task_references(cfg, out / "references", datasets=datasets, task_types=types,
                                         progress=progress, on_checkpoint=run_dir.commit)

        _say("training the multi-task SuperModel (pre-train, policy-train, sample, post-train)", quiet)
        trainer = Trainer(cfg, out, datasets=datasets, task_types=types, progress=progress)
        trainer.on_checkpoint = run_dir.commit
        report = trainer.run()
        if not ctx.is_main:  # training is shared; pruning, export and timing are rank 0's
            return report
        model = trainer.model.cpu().eval()
        policy = model.fixed_policy
        if policy is None:
            raise AutomtlError(f"{out}: the training run ended without a policy; run again with another --out")
        model.save(out / "supermodel")  # policy.json was written by the sample stage

        _say("pruning to the sampled policy and exporting to ONNX (verified in onnxruntime)", quiet)
        compact = prune(model, policy)
        compact.save(out / "compact")
        h, w = cfg["input_size"]
        onnx_path = export_onnx(compact, out / "model.onnx", input_shape=(1, 3, h, w))
        singles = {t: export_onnx(compact, out / "tasks" / f"{t}.onnx", input_shape=(1, 3, h, w), task=t) for t in tasks}

        _say("timing the exported model in onnxruntime", quiet)
        torch.manual_seed(cfg["seed"])
        report["onnx"] = latency(onnx_path, singles, repeat=latency_repeat)
        report["files"] = {"model.onnx": str(onnx_path), "report.json": str(out / "report.json"),
                           "policy.png": str(out / "policy.png"), "supermodel": str(out / "supermodel"),
                           "compact": str(out / "compact")}
        if cfg["baselines"]:
            report["references"] = read_baseline(Path(cfg["baselines"]), tasks)
        text = json.dumps(report, indent=1)
        atomic_write(out / "report.json", lambda tmp: tmp.write_text(text))
        return report


def latency(model: Path, singles: dict[str, Path], *, repeat: int = 20, threads: int | None = None) -> dict[str, Any]:
    """Median onnxruntime latency (batch 1) of ``model`` (all tasks in one call) and of the per-task files
    run one after the other.

    Sessions are timed in blocks (a session's runs back to back) for three rounds, with onnxruntime's
    thread spinning off: spinning workers of one session would otherwise take the cores of the next.
    """
    import statistics
    import time

    from .runtime import InferenceSession

    sessions = {"all": InferenceSession(model, threads=threads, spin=False)}
    sessions.update({t: InferenceSession(p, threads=threads, spin=False) for t, p in singles.items()})
    x = sessions["all"].example_input(1)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(3):
        for key, s in sessions.items():
            for _ in range(2):
                s.run(x)
            for _ in range(max(1, repeat // 3)):
                start = time.perf_counter()
                s.run(x)
                times[key].append(time.perf_counter() - start)
    all_ms = statistics.median(times["all"]) * 1e3
    per_task = {t: statistics.median(times[t]) * 1e3 for t in singles}
    return {"provider": sessions["all"].device, "batch": 1, "all_tasks_ms": all_ms,
            "one_by_one_ms": sum(per_task.values()), "per_task_ms": per_task, "runs": 3 * max(1, repeat // 3)}


def summary(report: dict[str, Any]) -> str:
    """The table ``automtl run`` ends with: metrics against the references, Δm, parameters, policy, latency."""
    lines = []
    refs = report.get("references") or {}
    per_task = (report.get("delta_m") or {}).get("per_task") or {}
    directions = report.get("directions") or {}
    rows = [("task", "metric", "multi-task", "single-task", "gain")]
    for task, metrics in report["tasks"].items():
        for k, v in metrics.items():
            ref = refs.get(task, {}).get(k)
            sign = 1 if directions.get(task, {}).get(k, True) else -1  # + is better for every metric
            change = f"{sign * (v - ref) / abs(ref):+.1%}" if ref not in (None, 0) else ""
            rows.append((task, k, f"{v:.4g}", "" if ref is None else f"{ref:.4g}", change))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    dm = (report.get("delta_m") or {}).get("delta_m")
    if dm is not None:
        parts = ", ".join(f"{t} {v:+.2f}%" for t, v in per_task.items())
        lines.append(f"Δm vs single-task references: {dm:+.2f}% ({parts}; gains are positive when better)")
    p = report["parameters"]
    if p.get("single_task_params"):
        lines.append(f"parameters: compact model {p['compact']:,} vs {len(report['tasks'])} single-task models "
                     f"{p['single_task_params']:,} ({p['compact'] / p['single_task_params']:.2f}x)")
    macs = report.get("macs")
    if macs:
        lines.append(f"multiply-accumulates: all tasks in one call {macs['all_tasks'] / 1e6:,.1f} M = {macs['ratio']:.2f}x "
                     f"the tasks one by one ({macs['one_by_one'] / 1e6:,.1f} M; smaller is better)")
    lines.append("policy (units shared / specific / skipped): " + "; ".join(
        f"{t} {c['share']}/{c['specific']}/{c['skip']}" for t, c in report["policy"].items()))
    seen = report.get("evaluated") or {}
    if seen:
        lines.append(f"evaluated on {seen['samples']:,} of {seen['split_samples']:,} validation samples"
                     + (" (the whole split)" if seen["whole_split"] else " (capped by eval_batches)"))
    o = report.get("onnx")
    if o:
        lines.append(f"onnxruntime latency ({o['provider']}, batch 1): all tasks in one call {o['all_tasks_ms']:.2f} ms = "
                     f"{o['all_tasks_ms'] / o['one_by_one_ms']:.2f}x the tasks one by one ({o['one_by_one_ms']:.2f} ms; "
                     "smaller is better)")
    for name, path in (report.get("files") or {}).items():
        if name in ("model.onnx", "report.json", "policy.png"):
            lines.append(f"{name}: {path}")
    return "\n".join(lines)
