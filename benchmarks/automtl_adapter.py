"""AutoMTL's own code (github.com/zhanglijun95/AutoMTL), imported from a user-given checkout and measured.

Nothing of AutoMTL is copied here: :func:`import_automtl` imports its ``framework`` and ``data`` packages
from the checkout, with two import-time patches and nothing else, so that it imports under current
libraries:

- its generated ``proto/pytorch_pb2.py`` predates protobuf 4, which refuses such files unless the pure-Python
  protobuf implementation is selected (``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python``, set before
  protobuf is first imported, which is why this runs in a fresh process); its ``base_node.py`` then checks
  ``isinstance(x, google.protobuf.pyext._message.RepeatedScalarContainer)``, a module protobuf no longer has:
  a module of that name is registered whose ``RepeatedScalarContainer`` is the pure-Python implementation's
  repeated-scalar container (the class that check is meant to find);
- ``framework/trainer.py`` imports ``torch.utils.tensorboard``, which needs the ``tensorboard`` package; when
  it is not installed a stand-in module is registered whose ``SummaryWriter`` refuses to be created
  (AutoMTL only creates one when given a ``writerPath``, which the benchmark never gives).

Every function below the import runs AutoMTL's code as its README and ``Example.ipynb`` do: ``MTLModel``
over a prototxt with one ``ASPPHeadNode`` per task, ``CityScapesCriterions`` losses, and its ``Trainer``'s
stage methods (``pre_train``, ``alter_train_with_reg``, ``post_train``) over per-task ``DataLoader`` lists.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Files that make a directory an AutoMTL checkout (relative paths).
REQUIRED = ("framework/mtl_model.py", "framework/trainer.py", "framework/base_node.py",
            "data/heads/pixel2pixel.py", "data/metrics/pixel2pixel_loss.py", "proto/pytorch_pb2.py")
#: The prototxt AutoMTL's CityScapes notebook trains (the network of our models/deeplab_resnet34.prototxt).
PROTOTXT = "models/deeplab_resnet34_adashare.prototxt"
#: Feature channels of the DeepLab ResNet-34 trunk (the heads' input).
FEATURE_CHANNELS = 512
#: AutoMTL's loss weights on CityScapes (Example.ipynb: 1 per task, 0.0005 for the policy regulariser).
POLICY_LAMBDA = 0.0005
#: AutoMTL's initial Gumbel temperature (alter_train_with_reg's default).
TAU = 5.0
#: AutoMTL's branches in the order of its policy logits.
BRANCHES = ("share", "specific", "skip")
#: Ignored segmentation pixels in AutoMTL's CityScapes data (its CrossEntropyLoss(ignore_index=-1)).
IGNORE = -1


def checkout_problem(directory: str | Path, prototxt: str = PROTOTXT) -> str | None:
    """Why ``directory`` is not a usable AutoMTL checkout (None when it is)."""
    root = Path(directory)
    if not root.is_dir():
        return f"{root} is not a directory"
    for rel in (*REQUIRED, prototxt):
        if not (root / rel).is_file():
            return f"{root} is not a checkout of AutoMTL (github.com/zhanglijun95/AutoMTL): it has no {rel}"
    try:
        model_src = (root / "framework/mtl_model.py").read_text(errors="replace")
        trainer_src = (root / "framework/trainer.py").read_text(errors="replace")
    except OSError as exc:
        return f"{root}: cannot read AutoMTL's sources ({exc.strerror or exc})"
    if "class MTLModel" not in model_src or "class Trainer" not in trainer_src:
        return f"{root} is not a checkout of AutoMTL: framework/ lacks MTLModel or Trainer"
    return None


def _package(name: str, root: Path) -> None:
    """Bind the top-level package ``name`` to ``root/name`` (AutoMTL's generic names - data, proto - must not
    resolve to another package of that name on sys.path)."""
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    folder = root / name
    init = folder / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:  # a namespace package (AutoMTL's data/ has no __init__.py)
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]  # type: ignore[attr-defined]
        sys.modules[name] = module


def _patch_protobuf() -> None:
    """Select the pure-Python protobuf and give it the ``pyext._message`` name AutoMTL's base_node checks."""
    if "google.protobuf" in sys.modules:
        from google.protobuf.internal import api_implementation

        if api_implementation.Type() != "python":
            raise RuntimeError("protobuf was imported before AutoMTL with the "
                               f"{api_implementation.Type()} implementation; AutoMTL needs a fresh process")
    os.environ["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
    from google.protobuf import pyext
    from google.protobuf.internal import containers

    shim = types.ModuleType("google.protobuf.pyext._message")
    shim.RepeatedScalarContainer = containers.RepeatedScalarFieldContainer  # type: ignore[attr-defined]
    sys.modules[shim.__name__] = shim
    pyext._message = shim  # type: ignore[attr-defined]


def _patch_tensorboard() -> None:
    """A stand-in ``torch.utils.tensorboard`` when the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is not None:
        return

    class SummaryWriter:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("tensorboard is not installed (the benchmark gives AutoMTL no writerPath)")

    stand_in = types.ModuleType("torch.utils.tensorboard")
    stand_in.SummaryWriter = SummaryWriter  # type: ignore[attr-defined]
    sys.modules[stand_in.__name__] = stand_in


def import_automtl(directory: str | Path) -> types.SimpleNamespace:
    """AutoMTL's MTLModel, Trainer, ASPPHeadNode and CityScapesCriterions, imported from ``directory``
    (call once, in a fresh process, before anything imports protobuf)."""
    root = Path(directory).resolve()
    _patch_protobuf()
    _patch_tensorboard()
    sys.path.insert(0, str(root))
    for name in ("proto", "framework", "data"):
        _package(name, root)
    from data.heads.pixel2pixel import ASPPHeadNode  # type: ignore[import-not-found]
    from data.metrics.pixel2pixel_loss import CityScapesCriterions  # type: ignore[import-not-found]
    from framework.mtl_model import MTLModel  # type: ignore[import-not-found]
    from framework.trainer import Trainer  # type: ignore[import-not-found]

    return types.SimpleNamespace(MTLModel=MTLModel, Trainer=Trainer, ASPPHeadNode=ASPPHeadNode,
                                 CityScapesCriterions=CityScapesCriterions, root=root)


# ---------------------------------------------------------------- data
def task_samples(task: str, size: int, classes: int, count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` in-memory samples for one task in AutoMTL's CityScapes format: ``input`` [3, S, S];
    ``label`` [1, S, S] int64 in 0..classes-1 with about 5% ignored (-1) for segmentation, float depth > 0
    for depth; depth samples carry an all-ones ``mask`` (AutoMTL's depth loss without a mask calls
    ``.cuda()``, so on the CPU it needs one; with it the loss is the same L1 over valid pixels)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        image = torch.rand(3, size, size, generator=gen) * 255 - 120
        if task == "segment_semantic":
            label = torch.randint(0, classes, (1, size, size), generator=gen)
            label[torch.rand(1, size, size, generator=gen) < 0.05] = IGNORE
            out.append({"input": image, "label": label})
        else:
            depth = torch.rand(1, size, size, generator=gen) * 50 + 1
            out.append({"input": image, "label": depth, "mask": torch.ones(1, size, size)})
    return out


class PoolDataset:
    """A map-style dataset of ``length`` items cycling over a small pool of samples (memory stays small)."""

    def __init__(self, pool: list[dict[str, Any]], length: int) -> None:
        self.pool, self.length = pool, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.pool[index % len(self.pool)]


# ---------------------------------------------------------------- model-level figures
def build(mods: types.SimpleNamespace, prototxt: str, classes: dict[str, int]) -> Any:
    """AutoMTL's supermodel with one ASPP head per task (as Example.ipynb builds it)."""
    from torch import nn

    heads = nn.ModuleDict({t: mods.ASPPHeadNode(FEATURE_CHANNELS, c) for t, c in classes.items()})
    return mods.MTLModel(str(mods.root / prototxt), heads)


def criteria(mods: types.SimpleNamespace, tasks: list[str]) -> dict[str, Any]:
    """AutoMTL's CityScapes losses per task."""
    return {t: mods.CityScapesCriterions(t) for t in tasks}


def soft_step(model: Any, crit: dict[str, Any], batch: dict[str, dict[str, Any]]) -> None:
    """One soft (policy-training) forward and backward of every task, as ``train_step_with_reg`` runs it
    (one call per task, task loss + 0.0005 x the policy regulariser, backward per task), no optimiser."""
    for task, data in batch.items():
        out = model(data["input"], "mtl", task, TAU, False, None)
        args = (data["mask"],) if "mask" in data else ()
        loss = crit[task](out, data["label"], *args) + POLICY_LAMBDA * model.policy_reg(task, None, TAU, 1)
        loss.backward()
    model.zero_grad(set_to_none=True)


def hard_inference(model: Any, x: Any, tasks: list[str]) -> None:
    """Every task's output in hard mode (the argmax branch of each layer; the initial policy's argmax is
    the shared branch), one call per task as AutoMTL's inference does."""
    for task in tasks:
        model(x, "mtl", task, TAU, True, None)


# ---------------------------------------------------------------- trainer iterations
def sample_policy(model: Any, seed: int) -> dict[str, dict[str, int]]:
    """Fix a policy drawn from softmax(policy logits) per trained layer (the draw of AutoMTL's notebook),
    loaded the way ``post_train(reload=...)`` loads one (``load_state_dict(strict=False)``); returns how
    many layers of each task took each branch."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    drawn = {}
    counts: dict[str, dict[str, int]] = {}
    for name, param in model.named_parameters():
        if "policy" not in name or not bool(param.detach().any()):
            continue  # untrained logits (batch-norm nodes) stay as they are, as in the notebook
        logits = param.detach().double().numpy()
        p = np.exp(logits - logits.max())
        choice = int(rng.choice(3, p=p / p.sum()))
        drawn[name] = torch.nn.functional.one_hot(torch.tensor(choice), 3).float()
        task = name.rsplit(".", 1)[-1]
        counts.setdefault(task, {b: 0 for b in BRANCHES})[BRANCHES[choice]] += 1
    model.load_state_dict(drawn, strict=False)
    return counts


def trainer_iterations(mods: types.SimpleNamespace, prototxt: str, classes: dict[str, int], *, size: int,
                       batch: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """Seconds of each iteration of AutoMTL's Trainer stages, ``steps`` per stage after one warm-up each:
    ``pretrain`` (pre_train), ``network`` and ``policy`` (alter_train_with_reg's two kinds of step: policy
    steps come first in its cycle, so policy_network_iters=(n, n) gives n of each) and ``posttrain``
    (post_train on a policy sampled after policy training), and under ``sampled`` the sampled policy's
    branch counts. An iteration is the Trainer's ``train_step`` / ``train_step_with_reg`` call: every task's
    batch, forward, loss, backward and optimiser step."""
    from torch.utils.data import DataLoader

    n = steps + 1
    tasks = list(classes)
    model = build(mods, prototxt, classes)
    loaders: dict[str, list[Any]] = {}
    for i, t in enumerate(tasks):
        pool = task_samples(t, size, classes[t], 4, seed + i)
        loaders[t] = [DataLoader(PoolDataset(pool, batch * (n + 1)), batch, shuffle=True) for _ in range(3)]
    val = {t: DataLoader(PoolDataset(task_samples(t, size, classes[t], 1, seed), 1), 1) for t in tasks}
    never = 10**9
    trainer = mods.Trainer(model, loaders, val, criteria(mods, tasks), {t: None for t in tasks},
                           print_iters=never, val_iters=never, save_iters=never)
    times: dict[str, list[float]] = {"pretrain": [], "network": [], "policy": [], "posttrain": []}
    stage = {"name": "pretrain"}

    def timed(method: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            kind = kwargs.get("alter_train") or stage["name"]
            start = time.perf_counter()
            result = method(*args, **kwargs)
            times[kind].append(time.perf_counter() - start)
            return result
        return run

    trainer.train_step = timed(trainer.train_step)
    trainer.train_step_with_reg = timed(trainer.train_step_with_reg)
    weights = {t: 1 for t in tasks}
    trainer.pre_train(iters=n, lr=0.0001)
    stage["name"] = "policy"
    trainer.alter_train_with_reg(iters=2 * n, policy_network_iters=(n, n), policy_lr=0.01, network_lr=0.0001,
                                 loss_lambda={**weights, "policy": POLICY_LAMBDA})
    policy = sample_policy(model, seed)
    stage["name"] = "posttrain"
    trainer.post_train(iters=n, lr=0.001, decay_lr_freq=4000, decay_lr_rate=0.5, loss_lambda=weights)
    return {**{k: v[1:] for k, v in times.items()}, "sampled": policy}


# ---------------------------------------------------------------- inference in a child, timed by the parent
_SERVE = "import json, sys; from benchmarks.automtl_adapter import serve_inference; serve_inference(json.loads(sys.argv[1]))"


def serve_inference(spec: dict[str, Any]) -> None:
    """Build AutoMTL's model in this fresh interpreter, then run one hard inference per "run" line on stdin,
    answering "done" on stdout (anything AutoMTL prints goes to stderr)."""
    answer = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import torch

    torch.set_num_threads(spec["threads"])
    mods = import_automtl(spec["directory"])
    torch.manual_seed(0)
    model = build(mods, spec["prototxt"], spec["classes"]).eval()
    x = torch.rand(1, 3, spec["size"], spec["size"])
    answer.write("ready\n")
    with torch.no_grad():
        for line in sys.stdin:
            if line.strip() != "run":
                break
            hard_inference(model, x, list(spec["classes"]))
            answer.write("done\n")


class InferenceChild:
    """AutoMTL's hard inference (batch 1, every task) in an interpreter of its own (AutoMTL must be imported
    before protobuf, which the caller has loaded), run on request: the caller times ``run()`` round-robin
    with its own calls (the child waits while the caller works, and vice versa)."""

    def __init__(self, directory: str | Path, classes: dict[str, int], size: int, threads: int,
                 prototxt: str = PROTOTXT) -> None:
        import json
        import subprocess

        spec = {"directory": str(directory), "classes": classes, "size": size, "threads": threads,
                "prototxt": prototxt}
        self.process = subprocess.Popen([sys.executable, "-c", _SERVE, json.dumps(spec)],
                                        cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        if self.process.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise RuntimeError(f"AutoMTL's inference process did not start (exit code {self.process.poll()})")

    def run(self) -> None:
        self.process.stdin.write("run\n")  # type: ignore[union-attr]
        if self.process.stdout.readline().strip() != "done":  # type: ignore[union-attr]
            raise RuntimeError(f"AutoMTL's inference process stopped (exit code {self.process.poll()})")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.wait(timeout=30)
