"""The SuperModel: a backbone with per-task share / specific / skip branches, policy logits and heads.

It is what the one code generator (:mod:`automtl_compiler.backends.torch_codegen`) makes of the
multi-task graph (:mod:`automtl_compiler.passes.multitask`): the graph's modules live under
``backbone``/``specific``/``skip``, and for each kind of call - a discrete plan, soft Gumbel gates, or
pre-training - and each set of requested tasks, the model generates one ``torch.fx`` module from a copy of
the graph reduced by the pruning passes (gates bound to the plan, common subexpressions merged, dead
branches removed) and caches it. So whatever tasks share - the image, and every unit before their
policies first differ - runs once in ``forward_all``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..backends.names import check_task_name
from ..backends.fx_checkpoint import checkpoint_mixes
from ..backends.torch_codegen import adopt_tensors, generate, install_modules
from ..errors import AutomtlError
from ..ir.graph import Graph
from ..ir.ops_multitask import mix
from ..passes.infra import run_passes
from ..passes.multitask import BRANCHES, MultiTaskGraph, Unit
from ..passes.prune import (
    bind_gates,
    common_trunk_end,
    eliminate_common_subexpressions,
    eliminate_dead_code,
    inline_selects,
    keep_outputs,
)
from .heads import apply_head, with_heads
from .policy import Policy, gumbel_softmax
from .supermodel_io import load_supermodel, save_supermodel

MODES = ("hard", "soft", "fixed", "pretrain")
REGULARISER_SCALE = 6.0
_CACHE_SIZE = 64


class SuperModel(nn.Module):
    """AutoMTL's supermodel, generated from a :class:`MultiTaskGraph` and a head per task.

    State-dict names say where a tensor belongs: ``backbone.<node>.*`` (shared), ``specific.<conv>.<task>.
    {conv,bn}.*``, ``skip.<conv>.<task>.{conv,bn}.*``, ``policy.<conv>.<task>`` (logits over [share, specific,
    skip]) and ``heads.<task>.*``. ``<node>`` and ``<conv>`` are the nodes' attribute names, made unique
    exactly as in ``to_torch`` (:mod:`automtl_compiler.backends.names`); ``module_names`` maps IR node ->
    attribute.
    """

    def __init__(self, mt: MultiTaskGraph, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        if sorted(heads) != sorted(mt.tasks):
            raise AutomtlError(f"heads are given for {sorted(heads)} but the tasks are {sorted(mt.tasks)}")
        for t in mt.tasks:
            check_task_name(t)
            if not isinstance(heads[t], nn.Module):
                raise AutomtlError(f"the head of task '{t}' is a {type(heads[t]).__name__}, not an nn.Module")
        self.mt = mt
        self.tasks: list[str] = list(mt.tasks)
        self.units: list[Unit] = list(mt.units)
        self.module_names: dict[str, str] = dict(mt.module_names)
        self.backbone = nn.ModuleDict()
        self.specific = nn.ModuleDict()
        self.skip = nn.ModuleDict()
        install_modules(mt.graph, self, mt.module_paths)
        self.policy = nn.ModuleDict({self.module_names[u.conv]: nn.ParameterDict(
            {t: nn.Parameter(torch.zeros(3)) for t in self.tasks}) for u in self.units})
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self._fixed: Policy | None = None
        self._compiled: OrderedDict[Any, fx.GraphModule] = OrderedDict()
        self._backend: str | None = None
        self._checkpointing = False
        self._optimised: dict[Any, Any] = {}
        levels = mt.num_levels
        self.register_buffer("_depth_weight", torch.tensor([(levels - u.depth) / levels for u in self.units]),
                             persistent=False)

    def module_key(self, node: str) -> str:
        """The attribute under which IR node ``node``'s modules live (``backbone.<key>``, ``specific.<key>``...)."""
        if node not in self.module_names:
            raise AutomtlError(f"node '{node}' has no module in this SuperModel (it is an input or a function, or "
                               "not in the trunk); ask for a layer node such as a conv or batch norm")
        return self.module_names[node]

    # ------------------------------------------------------------ parameters and policies
    @property
    def unit_names(self) -> list[str]:
        """The policy-able nodes (conv node names), in topological order."""
        return [u.conv for u in self.units]

    def unit_depths(self) -> dict[str, int]:
        """Unit (conv node) -> its 0-based conv depth along the longest path from the input."""
        return {u.conv: u.depth for u in self.units}

    def node_shape(self, node: str) -> tuple[int, ...]:
        """The shape (batch 1) of a trunk node's value, e.g. of :meth:`trunk_end`."""
        return tuple(self.mt.graph.node(node).shape or ())

    def policy_parameters(self) -> list[nn.Parameter]:
        """The policy logits (what the policy optimiser trains)."""
        return list(self.policy.parameters())

    def network_parameters(self) -> list[nn.Parameter]:
        """Every weight except the policy logits (what the network optimiser trains)."""
        ids = {id(p) for p in self.policy.parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def logits(self, task: str) -> torch.Tensor:
        """Policy logits of ``task`` as an [units, 3] tensor (share, specific, skip)."""
        self._check_task(task)
        return torch.stack([self.policy[self.module_names[u.conv]][task] for u in self.units])

    def policy_distribution(self) -> dict[str, dict[str, list[float]]]:
        """task -> node -> softmax probabilities over [share, specific, skip]."""
        with torch.no_grad():
            return {t: {u.conv: p.tolist() for u, p in zip(self.units, torch.softmax(self.logits(t), -1))}
                    for t in self.tasks}

    def sample_policy(self, strategy: str = "sample", seed: int = 0) -> Policy:
        """Draw a discrete policy: ``sample`` from softmax(logits) (seeded) or take the ``argmax``."""
        if strategy not in ("sample", "argmax"):
            raise AutomtlError(f"unknown sampling strategy '{strategy}'; use 'sample' or 'argmax'")
        gen = torch.Generator().manual_seed(seed)
        choices = {}
        with torch.no_grad():
            for t in self.tasks:
                logits = self.logits(t).detach().cpu()
                idx = (logits.argmax(-1) if strategy == "argmax"
                       else torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)[:, 0])
                choices[t] = {u.conv: BRANCHES[int(i)] for u, i in zip(self.units, idx)}
        return Policy(choices)

    def set_policy(self, policy: Policy) -> None:
        """Fix the policy used by ``mode="fixed"`` when no policy is passed to the call."""
        self._fixed = policy.check(self.tasks, self.unit_names)

    @property
    def fixed_policy(self) -> Policy | None:
        return self._fixed

    def policy_regulariser(self, task: str, tau: float = 5.0, scale: float = REGULARISER_SCALE,
                           generator: torch.Generator | None = None) -> torch.Tensor:
        """AutoMTL's policy regulariser ("design 3") for ``task``.

        R = sum_n ((D - d_n) / D) * [softplus(s (g1 - g0)) + softplus(s (g2 - g0))], g a fresh Gumbel-softmax
        sample of the unit's logits, d_n the unit's 0-based conv depth along the longest path, D the
        number of depth levels and s = 6. Early units weigh most, which pushes them toward sharing.
        """
        g = gumbel_softmax(self.logits(task), tau, generator)
        terms = F.softplus(scale * (g[:, 1] - g[:, 0])) + F.softplus(scale * (g[:, 2] - g[:, 0]))
        return (self._depth_weight.to(terms) * terms).sum()

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, task: str | None = None, mode: str = "hard", tau: float = 5.0,
                policy: Policy | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Output of one task (default: the only task). ``mode``: hard | soft | fixed | pretrain."""
        if task is None:
            if len(self.tasks) != 1:
                raise AutomtlError(f"give task=... (one of {self.tasks}) or call forward_all")
            task = self.tasks[0]
        return self.forward_all(x, mode=mode, tau=tau, policy=policy, tasks=[task], generator=generator)[task]

    def forward_all(self, x: torch.Tensor, mode: str = "hard", tau: float = 5.0, policy: Policy | None = None,
                    tasks: Sequence[str] | None = None, generator: torch.Generator | None = None,
                    feature: bool = False) -> Any:
        """Outputs of several tasks (default: all) in one call; shared work runs once.

        With ``feature=True`` returns ``(outputs, z)``: ``z`` is the end of the trunk the tasks have in
        common - the last tensor that every task consumes and that every path from the input to a task's
        output passes through - or None when there is none (soft and pretrain modes mix per-task branches
        from the first conv on). Gradient schedulers use it: per-task gradients w.r.t. ``z`` cost a pass
        through the task-specific part only.
        """
        tasks = tuple(self.tasks if tasks is None else tasks)
        for t in tasks:
            self._check_task(t)
        if mode == "soft":
            if tau <= 0:
                raise AutomtlError(f"temperature tau must be positive, got {tau}")
            gates = gumbel_softmax(torch.stack([self.logits(t) for t in self.tasks]), tau, generator)
            return self._outputs(("soft", tasks), tasks, feature, x, gates)
        if mode == "pretrain":
            gates = torch.full((len(self.tasks), len(self.units), 3), 1 / 3, device=x.device, dtype=x.dtype)
            return self._outputs(("soft", tasks), tasks, feature, x, gates)
        if mode in ("hard", "fixed"):
            return self._outputs(("plan", self._plan(mode, tasks, policy)), tasks, feature, x)
        raise AutomtlError(f"unknown mode '{mode}'; use one of {MODES}")

    def _outputs(self, key: Any, tasks: tuple[str, ...], feature: bool, x: torch.Tensor, *rest: torch.Tensor) -> Any:
        """``forward_all``'s result for the call ``key``: the generated module, then the heads."""
        gm = self._compiled_for(key)
        has_z = gm.meta["automtl_trunk_end"] is not None
        if self._backend is None:
            out = gm(x, *rest)
            outs = {t: apply_head(self.heads[t], f, x) for t, f in zip(tasks, out)}
        else:
            fn = self._optimised.get(key)
            if fn is None:
                fn = self._optimised[key] = torch.compile(with_heads(gm, self.heads, tasks, len(rest), has_z),
                                                          backend=self._backend)
            out = fn(x, *rest)
            outs = dict(zip(tasks, out))
        z = out[len(tasks)] if has_z else None
        return (outs, z) if feature else outs

    # ------------------------------------------------------------ compilation
    def use_compiler(self, backend: str | None) -> None:
        """Run each kind of call (its generated module and the heads) through ``torch.compile`` with
        ``backend`` (e.g. ``"inductor"``); None runs them eagerly. Compiling one generated module per kind of
        call, not :meth:`forward_all`, keeps Python-side choices (mode, temperature, policy, generators) out
        of the compiled code: only tensors flow in, and each call's code has its own compile cache."""
        if backend != self._backend:
            self._backend, self._optimised = backend, {}

    def use_checkpointing(self, on: bool) -> None:
        """Recompute each unit's branches in the backward of soft and pre-training calls instead of keeping
        their activations (:mod:`~automtl_compiler.backends.fx_checkpoint`): less memory, one more forward
        pass of the branches."""
        if bool(on) != self._checkpointing:
            self._checkpointing = bool(on)
            for key in [k for k in self._compiled if k[0] == "soft"]:
                del self._compiled[key]
                self._optimised.pop(key, None)

    @property
    def checkpointing(self) -> bool:
        """Whether soft and pre-training calls checkpoint their units' branches."""
        return self._checkpointing

    @property
    def compiler_backend(self) -> str | None:
        """The ``torch.compile`` backend in use (None: eager)."""
        return self._backend

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave compiled wrappers behind (they compile again on first use)."""
        state = dict(self.__dict__)
        state["_optimised"] = {}
        return state

    def trunk_end(self, mode: str = "fixed", policy: Policy | None = None, tasks: Sequence[str] | None = None) -> str | None:
        """The node (of ``mt.graph``) whose value is ``z`` of ``forward_all(..., feature=True)`` (None if none)."""
        if mode not in ("hard", "fixed"):
            return None
        tasks = tuple(self.tasks if tasks is None else tasks)
        return self._compiled_for(("plan", self._plan(mode, tasks, policy))).meta["automtl_trunk_end"]

    def _check_task(self, task: str) -> None:
        if task not in self.heads:
            raise AutomtlError(f"unknown task '{task}'; the model's tasks are {self.tasks}")

    def _plan(self, mode: str, tasks: tuple[str, ...], policy: Policy | None) -> tuple[tuple[str, tuple[str, ...]], ...]:
        if mode == "hard":
            with torch.no_grad():
                return tuple((t, tuple(BRANCHES[int(i)] for i in self.logits(t).argmax(-1))) for t in tasks)
        policy = policy.check(self.tasks, self.unit_names) if policy is not None else self._fixed
        if policy is None:
            raise AutomtlError("mode='fixed' needs a policy: pass policy=... or call set_policy first")
        return tuple((t, tuple(policy.choices[t][u.conv] for u in self.units)) for t in tasks)

    def _compiled_for(self, key: Any) -> fx.GraphModule:
        """The generated module for a kind of call (cached, least recently used first out)."""
        gm = self._compiled.get(key)
        if gm is None:
            gm = self._emit(key)
            self._compiled[key] = gm
            if len(self._compiled) > _CACHE_SIZE:
                old, _ = self._compiled.popitem(last=False)
                self._optimised.pop(old, None)
        else:
            self._compiled.move_to_end(key)
        return gm

    def generated_code(self, mode: str = "hard", tasks: Sequence[str] | None = None,
                       policy: Policy | None = None) -> str:
        """The Python source the model runs for a kind of call (for reading and debugging)."""
        tasks = tuple(self.tasks if tasks is None else tasks)
        key = ("plan", self._plan(mode, tasks, policy)) if mode in ("hard", "fixed") else ("soft", tasks)
        return self._compiled_for(key).code

    # ------------------------------------------------------------ code generation
    def call_graph(self, key: Any) -> Graph:
        """The graph a kind of call runs: ``("soft", tasks)`` (gates an input) or ``("plan", ((task,
        choices), ...))`` (gates bound), each reduced to the requested tasks, common work merged."""
        kind, spec = key
        tasks = [t for t, _ in spec] if kind == "plan" else list(spec)
        graph, _ = eliminate_dead_code(keep_outputs(self.mt.graph, [self.tasks.index(t) for t in tasks]))
        passes = [eliminate_common_subexpressions, eliminate_dead_code]
        if kind == "plan":
            plan: list[Sequence[str]] = [()] * len(self.tasks)
            for t, choices in spec:
                plan[self.tasks.index(t)] = choices
            passes = [lambda g: bind_gates(g, plan), inline_selects, *passes]
        graph, _ = run_passes(graph, passes)
        return graph

    def _emit(self, key: Any) -> fx.GraphModule:
        graph = self.call_graph(key)
        end = common_trunk_end(graph) if key[0] == "plan" else None
        outputs = [*graph.outputs, *([end] if end is not None else [])]
        gm = generate(graph, self, paths=self.mt.module_paths, outputs=outputs, as_tuple=True,
                      class_name="SuperModelForward")
        if self._checkpointing and key[0] == "soft":
            checkpoint_mixes(gm, is_mix=lambda n: n.op == "call_function" and n.target is mix,
                             absorbable=lambda n: n.op == "call_function" or (
                                 n.op == "call_module" and n.target.split(".")[0] in ("backbone", "specific", "skip")))
        gm.meta["automtl_trunk_end"] = end
        return gm

    def synced_graph(self) -> MultiTaskGraph:
        """``mt`` with every node holding the current tensors of its module (after ``.to()``, buffers are
        new objects): what pruning and export read, so that they see the trained weights."""
        for node in self.mt.graph.nodes():
            path = self.mt.module_paths.get(node.name)
            if path is not None:
                adopt_tensors(node, self.get_submodule(path))
        return self.mt

    # ------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        """Write the model to a directory: JSON structure + safetensors weights (no pickle)."""
        return save_supermodel(self, directory)

    @classmethod
    def load(cls, directory: str | Path, heads: dict[str, nn.Module] | None = None,
             trust_code: bool = False) -> SuperModel:
        """Read a model written by :meth:`save`; heads made by hand are passed in ``heads``.

        ``trust_code=True`` lets heads recorded as ``package.module:Class`` be imported (only for files
        you trust: importing runs code); built-in and registered heads never need it.
        """
        return load_supermodel(cls, directory, heads, trust_code=trust_code)

    # ------------------------------------------------------------ summaries
    def parameter_counts(self) -> dict[str, int]:
        """Parameters by group: backbone (shared), specific, skip, policy, heads, total."""
        groups = {k: sum(p.numel() for p in getattr(self, k).parameters())
                  for k in ("backbone", "specific", "skip", "policy", "heads")}
        groups["total"] = sum(groups.values())
        return groups

    def summary(self) -> str:
        """A readable summary: units, depth levels, feature node, parameters by group and per task."""
        counts = self.parameter_counts()
        feat = self.mt.trunk.node(self.mt.feature_node)
        skips = sum(not u.skip.identity for u in self.units)
        lines = [f"SuperModel over '{self.mt.trunk.name}': {len(self.tasks)} task(s) {', '.join(self.tasks)}",
                 (f"policy-able units: {len(self.units)} convs ({sum(u.bn is not None for u in self.units)} with "
                  f"batch norm, {skips} with a skip projection), depth levels D = {self.mt.num_levels}"),
                 f"feature node: {feat.name} {list(feat.shape or ())}",
                 "parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items())]
        for t in self.tasks:
            head = self.heads[t]
            kind = getattr(head, "spec", {}).get("type", type(head).__name__)
            head_params = sum(p.numel() for p in head.parameters())
            owned = [self.specific, self.skip]
            task_params = head_params + sum(p.numel() for group in owned for per_task in group.values()
                                            for p in per_task[t].parameters())
            lines.append(f"  task {t}: head {kind} ({head_params:,} parameters), "
                         f"task-owned parameters {task_params:,}")
        return "\n".join(lines)

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}, units={len(self.units)}, depth levels={self.mt.num_levels}"
