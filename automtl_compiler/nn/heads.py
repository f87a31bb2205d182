"""Task heads: DeepLab ASPP for pixel tasks (as AutoMTL uses it), a classification head, and your own.

Any ``nn.Module`` that takes the backbone's feature map can serve as a head; these two are the defaults.
:func:`create_head` builds a head by name (``aspp``, ``cls``, a name given to :func:`register_head`) or by
``package.module:Class`` and records its constructor arguments, so that saved models can rebuild it.
"""

from __future__ import annotations

import json
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import limits
from ..classpath import (
    UntrustedCodeError,
    class_path_of,
    construct,
    is_class_path,
    load_class,
)
from ..errors import AutomtlError
from ..registry import Registry


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_sizes(head: str, **sizes: Any) -> None:
    """Each size is a positive int (else ValueError) within MAX_CHANNELS (else LimitError)."""
    for name, value in sizes.items():
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{head} needs a positive integer {name}, got {value!r}")
        limits.check("MAX_CHANNELS", value, f"{name}", head)


class ASPPHead(nn.Module):
    """Atrous spatial pyramid pooling head (DeepLab-v2 style, as in AutoMTL/AdaShare).

    For each rate r: Conv3x3(C -> hidden, padding r, dilation r) -> ReLU -> Dropout(0.5) ->
    Conv1x1(hidden -> hidden) -> ReLU -> Dropout(0.5) -> Conv1x1(hidden -> K); the branch outputs are
    summed. ``hidden=1024`` reproduces AutoMTL (about 23 M parameters on a 512-channel feature); smaller
    values suit CPU work. The output is at the feature resolution unless ``upsample_to_input`` is set, in
    which case ``forward`` takes the input size (bilinear, align_corners=False).
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 1024,
                 rates: Sequence[int] = (6, 12, 18, 24), dropout: float = 0.5,
                 upsample_to_input: bool = False) -> None:
        super().__init__()
        _check_sizes("ASPPHead", in_channels=in_channels, num_classes=num_classes, hidden=hidden)
        if isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence) or not rates \
                or not all(_is_int(r) and 1 <= r <= limits.get("MAX_SPATIAL") for r in rates):
            raise ValueError(f"ASPPHead needs at least one rate, each a positive integer up to MAX_SPATIAL, got "
                             f"{rates!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout <= 1:
            raise ValueError(f"ASPPHead needs a dropout probability in [0, 1], got {dropout!r}")
        branch = in_channels * hidden * 9 + hidden + hidden * hidden + hidden + hidden * num_classes + num_classes
        for shape in ((hidden, in_channels, 3, 3), (hidden, hidden, 1, 1), (num_classes, hidden, 1, 1)):
            limits.check_tensor(shape, "an ASPPHead weight", "ASPPHead")
        limits.check("MAX_PARAMS", branch * len(rates), f"the number of parameters of an ASPPHead (in_channels "
                     f"{in_channels}, hidden {hidden}, {len(rates)} rates, {num_classes} classes)", "ASPPHead")
        self.upsample_to_input = upsample_to_input
        self.spec = {"type": "aspp", "in_channels": in_channels, "num_classes": num_classes, "hidden": hidden,
                     "rates": list(rates), "dropout": dropout, "upsample_to_input": upsample_to_input}
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, hidden, 3, padding=r, dilation=r), nn.ReLU(),
                          nn.Dropout(dropout), nn.Conv2d(hidden, hidden, 1), nn.ReLU(), nn.Dropout(dropout),
                          nn.Conv2d(hidden, num_classes, 1))
            for r in rates)

    def forward(self, x: torch.Tensor, input_size: Sequence[int] | None = None) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.upsample_to_input and input_size is not None:
            out = F.interpolate(out, size=tuple(input_size), mode="bilinear", align_corners=False)
        return out


class ClassificationHead(nn.Module):
    """Global average pooling followed by a linear classifier, for image-level tasks."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        _check_sizes("ClassificationHead", in_channels=in_channels, num_classes=num_classes)
        limits.check_tensor((num_classes, in_channels), "the ClassificationHead weight", "ClassificationHead")
        limits.check("MAX_PARAMS", (in_channels + 1) * num_classes, "the number of parameters of a "
                     "ClassificationHead", "ClassificationHead")
        self.spec = {"type": "cls", "in_channels": in_channels, "num_classes": num_classes}
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def apply_head(head: nn.Module, feature: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Run ``head`` on ``feature``; heads that upsample to the input get the input's spatial size."""
    if getattr(head, "upsample_to_input", False):
        return head(feature, input_size=x.shape[-2:])
    return head(feature)


def head_spec(head: nn.Module) -> dict:
    """The JSON spec of a head, as saved in model files.

    Built-in heads give their constructor arguments; heads made by :func:`create_head` give
    ``{"type": <registered name or package.module:Class>, "in_channels", "num_classes", "options"}``; any
    other module gives ``{"type": "custom", "class": ...}`` and has to be passed in again to load.
    """
    spec = getattr(head, "spec", None)
    kind = spec.get("type") if isinstance(spec, dict) else None
    named = isinstance(kind, str) and not is_class_path(kind)
    if not kind or kind == "custom" or (named and HEAD_TYPES.get(kind) is not type(head)):
        return {"type": "custom", "class": f"{type(head).__module__}.{type(head).__qualname__}"}
    try:
        return json.loads(json.dumps(spec))
    except (TypeError, ValueError) as e:
        raise AutomtlError(f"head {kind} cannot be saved: its options are not JSON values ({e}); give it "
                           "numbers, strings, lists and dicts") from None


def build_heads(specs: dict[str, dict], given: dict[str, nn.Module] | None, where: str,
                trust_code: bool = False) -> dict[str, nn.Module]:
    """Heads from the specs recorded in model file ``where``; ``given`` overrides by task.

    Built-in and registered head types are rebuilt; a ``package.module:Class`` head is imported only with
    ``trust_code`` (a model file must never run code on its own); a ``custom`` head must be given.
    """
    heads: dict[str, nn.Module] = {}
    for task, spec in specs.items():
        if given and task in given:
            heads[task] = given[task]
            continue
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "custom":
            raise AutomtlError(f"{where}: task '{task}' has a custom head ({spec.get('class')}); pass it as "
                               f"heads={{'{task}': module}} to load")
        if is_class_path(kind) and not trust_code and _registered_path(kind) is None:
            raise UntrustedCodeError(f"{where}: task '{task}' has head {kind}, which is code; rerun with "
                                     "--trust-code if you trust this file (or register the head with "
                                     "register_head)")
        if isinstance(kind, str) and not is_class_path(kind) and kind not in HEAD_TYPES:
            raise AutomtlError(f"{where}: task '{task}' has head type '{kind}', which is not registered in this "
                               f"process; call register_head('{kind}', cls) before loading, or pass "
                               f"heads={{'{task}': module}}")
        try:
            heads[task] = make_head(spec, trust_code=trust_code)
        except AutomtlError as e:
            raise AutomtlError(f"{where}: task '{task}': {e}") from None
    return heads


def make_head(spec: dict, *, trust_code: bool = False) -> nn.Module:
    """Build a head from its JSON spec: ``{"type", "in_channels", "num_classes", ...}``.

    Accepts the built-in specs (``aspp``/``cls`` with their constructor arguments at the top level) and
    the specs :func:`create_head` records (options under ``"options"``). A ``package.module:Class`` type
    is imported only with ``trust_code``, since specs usually come from files.
    """
    kind = spec.get("type") if isinstance(spec, dict) else None
    if not isinstance(kind, str) or kind == "custom":
        raise AutomtlError(f"head spec {spec!r} cannot be built: it needs a \"type\" naming a built-in or "
                           "registered head or a package.module:Class")
    if is_class_path(kind) and not trust_code and _registered_path(kind) is None:
        raise UntrustedCodeError(f"head spec names {kind}, which is code; pass trust_code=True if you trust where "
                                 "the spec came from (or register the head with register_head)")
    options = spec.get("options") or {}
    if not isinstance(options, dict):
        raise AutomtlError(f"head {kind}: \"options\" must be a JSON object, got {options!r}")
    args = {k: v for k, v in spec.items() if k not in ("type", "options")}
    missing = [k for k in ("in_channels", "num_classes") if k not in args]
    if missing:
        raise AutomtlError(f"head spec for {kind} lacks {' and '.join(missing)}; record them beside \"type\"")
    return create_head(kind, args.pop("in_channels"), args.pop("num_classes"), **{**args, **options})


# ---------------------------------------------------------------------------------------------- registry

M = TypeVar("M", bound=type[nn.Module])


def _check_head_class(name: str, cls: object) -> None:
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise AutomtlError(f"register_head({name!r}, ...): {cls!r} is not a torch.nn.Module subclass")


BUILTIN_HEADS: dict[str, type[nn.Module]] = {"aspp": ASPPHead, "cls": ClassificationHead}
#: head type -> class: the built-ins and the heads registered with :func:`register_head`
HEAD_TYPES: Registry[type[nn.Module]] = Registry(
    "head type", caller="register_head", check=_check_head_class, builtins_final=True,
    hint=" (or a name given to register_head, or a class path package.module:Class)")
HEAD_TYPES.register("aspp", ASPPHead, builtin=True)
HEAD_TYPES.register("cls", ClassificationHead, builtin=True)


def _registered_path(path: str) -> type[nn.Module] | None:
    """The registered or built-in class whose ``package.module:Class`` path is ``path`` (no import)."""
    for cls in HEAD_TYPES.values():
        if class_path_of(cls) == path:
            return cls
    return None


@overload
def register_head(name: str, cls: None = None, *, replace: bool = False) -> Callable[[M], M]: ...


@overload
def register_head(name: str, cls: M, *, replace: bool = False) -> M: ...


def register_head(name: str, cls: M | None = None, *, replace: bool = False) -> M | Callable[[M], M]:
    """Make the ``nn.Module`` subclass ``cls`` available as ``create_head(name, ...)`` and to model loading.

    Also a class decorator: ``@register_head("fpn")``. The class is built as ``cls(in_channels=...,
    num_classes=..., **options)``. A registered head type loads from model files without ``trust_code``,
    since the running program vouched for it. ``aspp``, ``cls`` and ``custom`` are reserved; a name
    already registered for another class needs ``replace=True``. Returns the class.
    """
    if name == "custom":
        raise AutomtlError("register_head: 'custom' is a built-in name (a head saved without its class); choose "
                           "another name")
    return HEAD_TYPES.register(name, cls, replace=replace)


def head_class(name: str) -> type[nn.Module]:
    """The head class named by ``aspp``, ``cls``, a registered name or ``package.module:Class`` (imported)."""
    if is_class_path(name):
        return _registered_path(name) or load_class(name, nn.Module, "head", "torch.nn.Module")
    return HEAD_TYPES.lookup(name)


def create_head(name: str, in_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """Build head ``name`` for a feature of ``in_channels`` channels predicting ``num_classes`` channels.

    ``name`` is ``aspp``, ``cls``, a registered name or ``package.module:Class`` (imported: only pass
    names that come from the user). The class is built as ``cls(in_channels=, num_classes=, **options)``;
    its ``forward`` takes the feature map (plus ``input_size=`` when it has a true ``upsample_to_input``
    attribute). Heads other than the built-ins get ``head.spec`` recording these arguments, so that saved
    models can rebuild them (see :func:`head_spec`).
    """
    cls = head_class(name)
    head = construct(cls, name, "head", in_channels=in_channels, num_classes=num_classes, **options)
    if cls is not BUILTIN_HEADS.get(name):
        head.spec = {"type": name, "in_channels": in_channels, "num_classes": num_classes, "options": dict(options)}
    return head


def with_heads(body: nn.Module, heads: nn.ModuleDict, tasks: Sequence[str], extra_inputs: int,
               passes_z: bool) -> fx.GraphModule:
    """One module for ``body`` (a generated module: image and ``extra_inputs`` tensors in, one feature per
    task and optionally z out) followed by each task's head, as :func:`apply_head` calls it.

    Its ``forward`` is generated code of its own, so ``torch.compile`` keeps a compile cache per module
    (heads of one class share a code object, and compiling them one by one would evict each other)."""
    root = nn.Module()
    root.body = body
    root.heads = heads
    g = fx.Graph()
    x = g.placeholder("x")
    rest = [g.placeholder(f"in{i}") for i in range(extra_inputs)]
    out = g.call_module("body", (x, *rest))
    size = g.call_function(operator.getitem, (g.call_method("size", (x,)), slice(2, None)))
    results = []
    for i, t in enumerate(tasks):
        feature = g.call_function(operator.getitem, (out, i))
        kwargs = {"input_size": size} if getattr(heads[t], "upsample_to_input", False) else {}
        results.append(g.call_module(f"heads.{t}", (feature,), kwargs))
    if passes_z:
        results.append(g.call_function(operator.getitem, (out, len(tasks))))
    g.output(tuple(results))
    return fx.GraphModule(root, g, class_name="SuperModelCall")
