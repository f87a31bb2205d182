"""The SuperModel: a backbone with per-task share / specific / skip branches, policy logits and heads.

Forward passes run generated code. For each kind of call (a discrete plan, soft Gumbel gates, or
pre-training) and each set of requested tasks, the model emits one ``torch.fx`` graph covering all those
tasks and caches it. While emitting, an expression that applies the same module to the same value is
emitted once (common-subexpression elimination), so whatever tasks share - the image, and every unit
before their policies first differ - runs once in ``forward_all``.
"""

from __future__ import annotations

import copy
import operator
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..backends.names import Namer, check_task_name, module_name
from ..errors import AutomtlError
from ..ir.ops import get_op
from ..passes.multitask import BRANCHES, MultiTaskGraph, SkipSpec, Unit
from .heads import apply_head
from .policy import Policy, gumbel_softmax

MODES = ("hard", "soft", "fixed", "pretrain")
REGULARISER_SCALE = 6.0
_CACHE_SIZE = 64


def mix3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g[0]·a + g[1]·b + g[2]·c: the soft-mode output of a unit."""
    return a * g[0] + b * g[1] + c * g[2]


def mean3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(a + b + c) / 3: the pre-training output of a unit (AutoMTL's ``pre_train_all``)."""
    return (a + b + c) / 3.0


class SkipProjection(nn.Module):
    """The skip branch of a unit whose shape changes: shift/crop onto the conv's grid, 1x1 conv, batch norm."""

    def __init__(self, spec: SkipSpec, bn_eps: float = 1e-5, bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.pad = tuple(spec.pad) if any(spec.pad) else None
        self.conv = nn.Conv2d(spec.in_channels, spec.out_channels, 1, stride=spec.stride, bias=False)
        self.bn = nn.BatchNorm2d(spec.out_channels, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        sh, sw = self.conv.stride
        if (sh, sw) != (1, 1):
            # the same function, but oneDNN's strided 1x1 weight-gradient kernel writes past its buffer on
            # channels_last inputs with fewer than 16 channels (oneDNN issue 6035): subsample, then stride 1
            return self.bn(F.conv2d(x[:, :, ::sh, ::sw], self.conv.weight))
        return self.bn(self.conv(x))


class SuperModel(nn.Module):
    """AutoMTL's supermodel, compiled from a :class:`MultiTaskGraph` and a head per task.

    State-dict names say where a tensor belongs: ``backbone.<node>.*`` (shared), ``specific.<conv>.<task>.
    {conv,bn}.*``, ``skip.<conv>.<task>.*``, ``policy.<conv>.<task>`` (logits over [share, specific, skip])
    and ``heads.<task>.*``. ``<node>`` and ``<conv>`` are the nodes' attribute names, made unique exactly as
    in ``to_torch`` (:mod:`automtl_compiler.backends.names`); ``module_names`` maps IR node -> attribute.
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
        self._unit_of_output = {u.output: u for u in self.units}
        self._unit_of_conv = {u.conv: u for u in self.units}
        self._in_unit = {u.bn for u in self.units if u.bn}
        self._in_unit_only = {u.conv for u in self.units if u.bn}  # convs whose unit output is their BN
        self.backbone = nn.ModuleDict()
        self._functions: dict[str, tuple[Any, dict[str, Any]]] = {}
        names = Namer()
        for node in mt.graph.topological_order():
            if node.op == "input":
                continue
            lowering = get_op(node.op, node.where).lower(node.attrs, node.params, node.buffers)
            if lowering.module is not None:
                self.backbone[names(node.name)] = lowering.module
            else:
                self._functions[node.name] = (lowering.function, lowering.kwargs)
        self.module_names: dict[str, str] = dict(names.mapping)
        self.specific = nn.ModuleDict()
        self.skip = nn.ModuleDict()
        self.policy = nn.ModuleDict()
        for u in self.units:
            key = self.module_names[u.conv]
            self.specific[key] = nn.ModuleDict({t: self._specific_branch(u) for t in self.tasks})
            if not u.skip.identity:
                bn = self.backbone[self.module_names[u.bn]] if u.bn else None
                self.skip[key] = nn.ModuleDict({
                    t: SkipProjection(u.skip, *((bn.eps, bn.momentum) if bn is not None else ()))
                    for t in self.tasks})
            self.policy[key] = nn.ParameterDict({t: nn.Parameter(torch.zeros(3)) for t in self.tasks})
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self._fixed: Policy | None = None
        self._compiled: OrderedDict[Any, fx.GraphModule] = OrderedDict()
        levels = mt.num_levels
        self.register_buffer("_depth_weight", torch.tensor([(levels - u.depth) / levels for u in self.units]),
                             persistent=False)

    def _specific_branch(self, u: Unit) -> nn.ModuleDict:
        branch = nn.ModuleDict({"conv": copy.deepcopy(self.backbone[self.module_names[u.conv]])})
        if u.bn:
            branch["bn"] = copy.deepcopy(self.backbone[self.module_names[u.bn]])
        return branch

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
        z = None
        if mode == "soft":
            if tau <= 0:
                raise AutomtlError(f"temperature tau must be positive, got {tau}")
            gates = gumbel_softmax(torch.stack([self.logits(t) for t in self.tasks]), tau, generator)
            feats = self._compiled_for(("soft", tasks))(x, gates)
        elif mode == "pretrain":
            feats = self._compiled_for(("pretrain", tasks))(x)
        elif mode in ("hard", "fixed"):
            *feats, z = self._compiled_for(("plan", self._plan(mode, tasks, policy)))(x)
        else:
            raise AutomtlError(f"unknown mode '{mode}'; use one of {MODES}")
        outs = {t: apply_head(self.heads[t], f, x) for t, f in zip(tasks, feats)}
        return (outs, z) if feature else outs

    def trunk_end(self, mode: str = "fixed", policy: Policy | None = None, tasks: Sequence[str] | None = None) -> str | None:
        """The backbone node whose output is ``z`` of ``forward_all(..., feature=True)`` (None if there is none)."""
        if mode not in ("hard", "fixed"):
            return None
        tasks = tuple(self.tasks if tasks is None else tasks)
        return self._common_cut(dict(self._plan(mode, tasks, policy)))

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
        gm = self._compiled.get(key)
        if gm is None:
            gm = self._emit(key)
            self._compiled[key] = gm
            if len(self._compiled) > _CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return gm

    def generated_code(self, mode: str = "hard", tasks: Sequence[str] | None = None,
                       policy: Policy | None = None) -> str:
        """The Python source the model runs for a kind of call (for reading and debugging)."""
        tasks = tuple(self.tasks if tasks is None else tasks)
        key = ("plan", self._plan(mode, tasks, policy)) if mode in ("hard", "fixed") else (mode, tasks)
        return self._compiled_for(key).code

    # ------------------------------------------------------------ code generation
    def _emit(self, key: Any) -> fx.GraphModule:
        kind = key[0]
        if kind == "plan":
            tasks = tuple(t for t, _ in key[1])
            plans: dict[str, tuple[str, ...] | None] = {t: choice for t, choice in key[1]}
        else:
            tasks = key[1]
            plans = {t: None for t in tasks}
        emitter = _Emitter()
        x = emitter.graph.placeholder("x")
        gates = emitter.graph.placeholder("gates") if kind == "soft" else None
        outputs: list[fx.Node | None] = []
        envs: list[dict[str, fx.Node]] = []
        for t in tasks:
            env: dict[str, fx.Node] = {}
            for node in self.mt.graph.topological_order():
                if node.op == "input":
                    env[node.name] = x
                elif node.name in self._unit_of_conv:
                    u = self._unit_of_conv[node.name]
                    env[u.output] = self._emit_unit(emitter, u, t, env[node.inputs[0]], kind, plans[t], gates)
                elif node.name in self._in_unit:
                    continue
                elif node.name in self._functions:
                    fn, kwargs = self._functions[node.name]
                    env[node.name] = emitter.function(fn, tuple(env[i] for i in node.inputs), kwargs, node.name)
                else:
                    env[node.name] = emitter.module(f"backbone.{self.module_names[node.name]}",
                                                   tuple(env[i] for i in node.inputs), node.name)
            outputs.append(env[self.mt.feature_node])
            envs.append(env)
        if kind == "plan":
            cut = self._common_cut(plans)  # type: ignore[arg-type]
            outputs.append(envs[0][cut] if cut is not None else None)
        emitter.graph.output(tuple(outputs))
        gm = fx.GraphModule(self, emitter.graph, "SuperModelForward")
        return gm

    def _common_cut(self, plans: dict[str, tuple[str, ...]]) -> str | None:
        """The last node on every input-to-feature path whose value is the same for all planned tasks.

        A node is common when every unit it depends on is shared by all tasks; among the nodes that
        dominate the feature node (every path passes through them) the one nearest the feature is the cut.
        """
        g = self.mt.graph
        inputs = g.inputs
        if len(inputs) != 1 or not plans:
            return None
        choices = {u.conv: {plans[t][i] for t in plans} for i, u in enumerate(self.units)}
        common = ({"share"}, {"skip"})
        private = {u.output for u in self.units
                   if len(plans) > 1 and (choices[u.conv] not in common or (choices[u.conv] == {"skip"} and not u.skip.identity))}
        idom = nx.immediate_dominators(g.nx, inputs[0])
        tainted: set[str] = set()
        for node in g.topological_order():
            if node.name in private or any(i in tainted for i in node.inputs):
                tainted.add(node.name)
        node_name = self.mt.feature_node
        while node_name != inputs[0]:
            if node_name not in tainted and node_name not in self._in_unit_only:
                return node_name
            node_name = idom[node_name]
        return None

    def _emit_unit(self, em: _Emitter, u: Unit, task: str, x: fx.Node, kind: str,
                   plan: tuple[str, ...] | None, gates: fx.Node | None) -> fx.Node:
        key = self.module_names[u.conv]
        index = self.units.index(u)
        wanted = (plan[index],) if plan is not None else BRANCHES
        values = {}
        if "share" in wanted:
            v = em.module(f"backbone.{key}", (x,), u.conv)
            values["share"] = em.module(f"backbone.{self.module_names[u.bn]}", (v,), u.bn) if u.bn else v
        if "specific" in wanted:
            v = em.module(f"specific.{key}.{task}.conv", (x,), f"{u.conv}_{task}")
            values["specific"] = em.module(f"specific.{key}.{task}.bn", (v,), f"{u.bn}_{task}") if u.bn else v
        if "skip" in wanted:
            values["skip"] = x if u.skip.identity else em.module(f"skip.{key}.{task}", (x,), f"{u.conv}_skip_{task}")
        if plan is not None:
            return values[plan[index]]
        a, b, c = (values[k] for k in BRANCHES)
        if kind == "pretrain":
            return em.function(mean3, (a, b, c), {}, f"{u.output}_{task}")
        assert gates is not None
        gate = em.function(operator.getitem, (gates, (self.tasks.index(task), index)), {}, f"g_{key}_{task}")
        return em.function(mix3, (a, b, c, gate), {}, f"{u.output}_{task}")

    # ------------------------------------------------------------ files
    def save(self, directory: str | Path) -> Path:
        """Write the model to a directory: JSON structure + safetensors weights (no pickle)."""
        from .supermodel_io import save_supermodel

        return save_supermodel(self, directory)

    @classmethod
    def load(cls, directory: str | Path, heads: dict[str, nn.Module] | None = None,
             trust_code: bool = False) -> SuperModel:
        """Read a model written by :meth:`save`; heads made by hand are passed in ``heads``.

        ``trust_code=True`` lets heads recorded as ``package.module:Class`` be imported (only for files
        you trust: importing runs code); built-in and registered heads never need it.
        """
        from .supermodel_io import load_supermodel

        return load_supermodel(directory, heads, trust_code=trust_code)

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
        feat = self.mt.graph.node(self.mt.feature_node)
        skips = sum(not u.skip.identity for u in self.units)
        lines = [f"SuperModel over '{self.mt.graph.name}': {len(self.tasks)} task(s) {', '.join(self.tasks)}",
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


class _Emitter:
    """Builds one fx graph, emitting each (target, arguments) expression at most once."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.memo: dict[Any, fx.Node] = {}

    def module(self, target: str, args: tuple[Any, ...], name: str) -> fx.Node:
        key = ("module", target, args)
        if key not in self.memo:
            self.memo[key] = self.graph.create_node("call_module", target, args, {}, name=module_name(name))
        return self.memo[key]

    def function(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> fx.Node:
        key = ("function", fn, args, tuple(sorted(kwargs.items())))
        if key not in self.memo:
            self.memo[key] = self.graph.create_node("call_function", fn, args, kwargs, name=module_name(name))
        return self.memo[key]
