"""Starting training: one process's share of a run, and the launcher that starts several of them.

``run_training`` is what ``automtl train`` and ``python -m automtl_compiler.train`` (the command torchrun
starts) do in one process. ``launch`` starts the worker processes of a distributed run the way torchrun
does, with torch.distributed's own launcher (``elastic_launch``): on one node the workers meet on a free
port of localhost; across nodes every node's launcher meets at ``--rdzv-endpoint`` (static rendezvous, node
0 listening there). A worker that fails stops the others; the launcher raises one line naming its rank and
its error, which the worker recorded in the error file torch gives it (``record_worker_error``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import AutomtlError, one_line

#: The module a training worker runs (``python -m automtl_compiler.train CONFIG --out DIR ...``).
TRAIN_MODULE = "automtl_compiler.train"
#: Set in the workers ``launch`` starts: their launcher prints their error, so they only record it.
LAUNCHED = "AUTOMTL_LAUNCHED"
#: Seconds a stopped run's other workers get between SIGTERM and SIGKILL.
SHUTDOWN_SECONDS = 10
_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
_TORCH_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")


def is_rank_zero() -> bool:
    """True outside a distributed run and in its rank 0: the process that prints a run's results."""
    return os.environ.get("RANK", "0") == "0"


def weights_override(weights: str | None, non_strict: bool) -> list[str]:
    """``--weights PATH [--weights-non-strict]`` as the config overrides they stand for (``backbone_weights``,
    ``backbone_weights_strict``; the path quoted so that YAML reads it back as a string)."""
    if weights is None:
        if non_strict:
            raise AutomtlError("--weights-non-strict needs --weights")
        return []
    return [f"backbone_weights={json.dumps(str(Path(weights)))}", f"backbone_weights_strict={str(not non_strict).lower()}"]


def run_training(config: str | None, overrides: list[str], out: str, *, baseline: str | None = None,
                 resume: bool = False, overwrite: bool = False, quiet: bool = False) -> list[str]:
    """Train (this process's share of) a run and return the lines ``automtl train`` prints: each task's
    metrics, Δm and where the report is; none on ranks other than 0, which would repeat them."""
    from .run import train

    report = train(config, overrides, out, resume=resume, overwrite=overwrite, progress=not quiet, baseline=baseline)
    if not is_rank_zero():
        return []
    lines = [f"{task}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
             for task, metrics in report["tasks"].items()]
    if report.get("delta_m", {}).get("delta_m") is not None:
        lines.append(f"delta_m: {report['delta_m']['delta_m']:+.2f}%")
    lines.append(f"wrote {Path(out) / 'report.json'}")
    return lines


def record_worker_error(message: str) -> bool:
    """In a worker of a distributed run, write ``message`` (one line) to the error file torch's launcher
    reads; return True when the launcher is ours, which prints it (the worker should then not)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    try:
        Path(path).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    except OSError:
        return False
    return os.environ.get(LAUNCHED) == "1"


def check_launch(nproc: int, nnodes: int = 1, node_rank: int | None = None, rdzv_endpoint: str | None = None) -> None:
    """Refuse launcher options that cannot work, with what to write instead."""
    if nproc < 1:
        raise AutomtlError(f"--nproc-per-node {nproc}: give 1 or more worker processes per node")
    if nnodes < 1:
        raise AutomtlError(f"--nnodes {nnodes}: give 1 or more nodes")
    if "RANK" in os.environ and (nproc > 1 or nnodes > 1):
        raise AutomtlError(f"this process is already rank {os.environ['RANK']} of a distributed run; start it "
                           "without --nproc-per-node/--nnodes (torchrun or automtl started the workers)")
    if nproc == 1 and nnodes == 1 and (node_rank is not None or rdzv_endpoint is not None):
        raise AutomtlError("--node-rank and --rdzv-endpoint apply when workers are started (--nproc-per-node or "
                           "--nnodes 2 or more)")
    if nnodes > 1 and (node_rank is None or rdzv_endpoint is None):
        raise AutomtlError(f"--nnodes {nnodes} needs --node-rank (0 to {nnodes - 1}, 0 on the node at the endpoint) "
                           "and --rdzv-endpoint HOST:PORT (node 0's address), the same on every node")
    if node_rank is not None and not 0 <= node_rank < nnodes:
        raise AutomtlError(f"--node-rank {node_rank}: give 0 to {nnodes - 1} for --nnodes {nnodes}")
    if rdzv_endpoint is not None:
        _check_endpoint(rdzv_endpoint)


def _check_endpoint(text: str) -> None:
    host, _, port = text.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise AutomtlError(f"--rdzv-endpoint '{one_line(text, 80)}': write HOST:PORT, e.g. node0.example.org:29500")


def launch(nproc: int, target_args: list[str], *, module: str = TRAIN_MODULE, nnodes: int = 1,
           node_rank: int | None = None, rdzv_endpoint: str | None = None) -> None:
    """Run ``python -m module *target_args`` in ``nproc`` worker processes on this node (of ``nnodes``)
    with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and wait for them.

    One node meets on a free port of localhost unless ``rdzv_endpoint`` names one; several nodes need
    ``node_rank`` and ``rdzv_endpoint`` (node 0's HOST:PORT). Returns when every worker has succeeded;
    raises AutomtlError with one line naming the failing rank and its error otherwise, after the other
    workers have been stopped (SIGTERM, then SIGKILL after ``SHUTDOWN_SECONDS``). Workers are not restarted:
    the same command run again resumes from the last checkpoint.
    """
    check_launch(nproc, nnodes, node_rank, rdzv_endpoint)
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing import (
        DefaultLogsSpecs,
        SignalException,
    )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rendezvous: dict[str, Any]
    if rdzv_endpoint is None:
        rendezvous = {"rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0", "run_id": uuid.uuid4().hex}
    else:
        rendezvous = {"rdzv_backend": "static", "rdzv_endpoint": rdzv_endpoint, "run_id": "automtl",
                      "rdzv_configs": {"rank": node_rank or 0}}
    with tempfile.TemporaryDirectory(prefix="automtl-launch-") as logs, _launcher_state(nproc):
        config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=nproc, max_restarts=0,
                              logs_specs=DefaultLogsSpecs(log_dir=logs), shutdown_timeout=SHUTDOWN_SECONDS,
                              role="automtl", **rendezvous)
        try:
            elastic_launch(config, sys.executable)("-u", "-m", module, *target_args)
        except ChildFailedError as e:
            raise AutomtlError(_failure_line(e.failures, nproc * nnodes)) from None
        except SignalException as e:
            raise AutomtlError(f"stopped by {e.sigval.name}; the workers were stopped (the same command resumes "
                               "from the last checkpoint)") from None
        except (RendezvousError, DistError) as e:
            where = rdzv_endpoint or "localhost"
            raise AutomtlError(f"the workers could not meet at {where}: {one_line(e, 200)} (check that "
                               "--rdzv-endpoint names node 0 and a free port, --nnodes and --node-rank, and that every "
                               "node was started)") from None


def _failure_line(failures: dict[int, Any], world_size: int) -> str:
    """One line for a failed run: the rank that caused it and its error. A rank killed by a signal (other than
    SIGTERM, which is how the launcher stops the others) comes first: the ranks that were talking to it then
    fail with a connection error, which is not the cause; then a recorded message, then an exit status."""
    def order(item: tuple[int, Any]) -> tuple[int, int, int]:
        rank, failure = item
        if failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM:
            kind = 0
        elif failure.error_file_data.get("message") not in (None, "<NONE>"):
            kind = 1
        else:
            kind = 2 if failure.exitcode > 0 else 3
        return (kind, failure.timestamp, rank)

    rank, failure = min(failures.items(), key=order)
    if order((rank, failure))[0] == 1:
        message = failure.message
    elif failure.exitcode > 0:
        message = f"exit status {failure.exitcode} (its output is above)"
    else:
        message = f"killed by {failure.signal_name()}"
    return f"rank {rank} of {world_size} failed: {' '.join(str(message).split())}; the other workers were stopped"


@contextmanager
def _launcher_state(nproc: int) -> Iterator[None]:
    """What launching changes in this process, undone afterwards: the workers' environment (``LAUNCHED``;
    OMP_NUM_THREADS, when unset, this node's cores shared among the workers), the signal handlers torch's
    launcher installs, and its log lines, which repeat the one error line (kept when LOGLEVEL is set)."""
    saved_env = {k: os.environ.get(k) for k in (LAUNCHED, "OMP_NUM_THREADS")}
    os.environ[LAUNCHED] = "1"
    if saved_env["OMP_NUM_THREADS"] is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    main_thread = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(getattr(signal, s)) for s in _SIGNALS if hasattr(signal, s)} if main_thread else {}
    quiet = "LOGLEVEL" not in os.environ
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n.startswith(_TORCH_LOGGERS)] if quiet else []
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for name, handler in handlers.items():
            signal.signal(getattr(signal, name), handler)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
