"""``automtl``: a thin click application over the library. It parses, calls, and prints.

Errors (see :class:`_Group`): everything a user can cause - an AutomtlError, a bad option, an OS error on
a path (permission denied, no space, a directory where a file goes), a file that is not text - is one line
on stderr and exit status 2; anything else is a bug, reported as one ``internal error:`` line and exit 1.
``--debug``, anywhere on the command line, prints the traceback before that line (the exit status is the same).
"""

from __future__ import annotations

import errno
import json
import re
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

import click

from automtl_compiler.errors import AutomtlError, one_line
from automtl_compiler.train.launch import (
    check_launch,
    is_rank_zero,
    launch,
    record_worker_error,
    run_training,
    weights_override,
)

#: What to do about an OS error on a path, by errno.
_OS_HINTS = {
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EROFS: "the file system is read-only; choose another path",
    errno.ENOSPC: "the disk is full; free some space or choose another path",
    errno.EDQUOT: "the disk quota is exceeded; free some space or choose another path",
    errno.EISDIR: "it is a directory; give the path of a file",
    errno.ENOTDIR: "a part of the path is a file, not a directory; check the path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EEXIST: "choose another path",
}
#: The name of the temporary file or directory written beside an output before it is moved into place.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")


def _take_debug(argv: list[str]) -> tuple[bool, list[str]]:
    """Remove every ``--debug`` before a ``--`` separator: it is honoured wherever it is written."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return len(kept) != len(argv), kept


def _os_error_line(e: OSError) -> str:
    """One line for an OS error on a path: the path the user named (not a temporary name beside it), the
    system's reason, and what to do."""
    name = e.filename2 if e.filename2 is not None else e.filename
    path = Path(str(name))
    temporary = _TEMPORARY.fullmatch(path.name)
    if temporary:
        path = path.parent / temporary.group("name")
    reason = e.strerror or type(e).__name__
    return f"{path}: {reason} ({_OS_HINTS.get(e.errno or 0, 'check the path')})"


class OneLineErrors:
    """Mixin for a click command or group: every error becomes one readable line and a non-zero exit.

    Exit 2 (one line ``error: ...``): AutomtlError, click's usage errors, an OSError from the system (it
    names the path and what to do), a UnicodeDecodeError (a binary file where text is read). Exit 1 (one
    line ``internal error: ...``): any other exception, a bug. ``--debug`` anywhere prints the traceback first
    (and reaches the commands as ``ctx.obj["debug"]``). In a worker of a distributed run the line is also
    recorded for the launcher, and left to it to print when the launcher is automtl's.
    """

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        debug, argv = _take_debug(list(sys.argv[1:] if args is None else args))
        kwargs["standalone_mode"] = False
        kwargs.setdefault("obj", {"debug": debug})
        try:
            return super().main(argv, *rest, **kwargs)  # type: ignore[misc]
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except (AutomtlError, click.ClickException) as e:
            self._fail(debug, e.format_message() if isinstance(e, click.ClickException) else str(e))
        except OSError as e:
            if e.errno is None:
                self._bug(debug, e)
            self._fail(debug, _os_error_line(e) if e.filename is not None else f"{e.strerror or e} "
                       f"({_OS_HINTS.get(e.errno, 'check the paths given')})")
        except UnicodeDecodeError as e:
            self._fail(debug, f"a file that should be text is binary or not UTF-8 ({one_line(e, 160)}); check the "
                              "paths given")
        except Exception as e:  # noqa: BLE001 - a bug, not bad input: one line, traceback on request
            self._bug(debug, e)

    @staticmethod
    def _fail(debug: bool, message: str) -> NoReturn:
        """A user error: the traceback when ``debug``, then ``error: message`` on one line; exit 2."""
        _report(debug, f"error: {' '.join(message.split())}")
        sys.exit(2)

    @staticmethod
    def _bug(debug: bool, e: BaseException) -> NoReturn:
        """An internal error: the traceback when ``debug``, then one ``internal error:`` line; exit 1."""
        _report(debug, f"internal error: {type(e).__name__}: {one_line(e, 500)} (rerun with --debug for the "
                       "traceback and please report it)")
        sys.exit(1)


def _report(debug: bool, line: str) -> None:
    """Print the traceback when ``debug`` and ``line`` on stderr, unless automtl's launcher prints the line."""
    if debug:
        traceback.print_exc()
    if not record_worker_error(line.removeprefix("error: ")):
        click.echo(line, err=True)


class _Group(OneLineErrors, click.Group):
    """The ``automtl`` group (errors as in :class:`OneLineErrors`)."""


class OneLineErrorsCommand(OneLineErrors, click.Command):
    """A stand-alone command with the CLI's error handling (``python -m automtl_compiler.train``)."""


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,3,224,224' -> (1, 3, 224, 224); None stays None."""
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise click.BadParameter(f"'{text}' is not a shape; write it like 1,3,224,224",
                                 param_hint="--input-shape") from None
    if not shape or any(d <= 0 for d in shape):
        raise click.BadParameter(f"'{text}' has a non-positive dimension", param_hint="--input-shape")
    return shape


_SHAPE = click.option("--input-shape", default=None, metavar="N,C,H,W",
                      help="Input shape (overrides the one a file declares; default 1,3,224,224 for modules).")
_TRUST = click.option("--trust-code", is_flag=True,
                      help="Let heads recorded as package.module:Class in the model files be imported (this runs "
                           "their code; only for files you trust).")
_WEIGHTS_FILE = click.option(
    "--weights", type=click.Path(dir_okay=False), default=None, metavar="PATH",
    help="Pretrained weights for SOURCE: a PyTorch state_dict (.pth/.pt/.bin/.ckpt, read safely with "
         "weights_only; checkpoint 'state_dict'/'model' entries and 'module.' prefixes are unwrapped) or "
         ".safetensors, matched by the module's parameter names (layer1.0.conv1.weight) or IR names "
         "(node/tensor); a .caffemodel too for a .prototxt. Not for .onnx (it carries its weights).")
_WEIGHTS_NON_STRICT = click.option(
    "--weights-non-strict", is_flag=True,
    help="Ignore tensors in --weights that the network does not use (e.g. a classifier's fc.*); missing or "
         "mis-shaped tensors are still an error.")


def _WEIGHTS(command: Any) -> Any:
    """The --weights and --weights-non-strict options of every command that loads a backbone."""
    return _WEIGHTS_FILE(_WEIGHTS_NON_STRICT(command))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also accepted after the subcommand).")
@click.version_option(package_name="automtl-compiler")
def main(debug: bool) -> None:
    """automtl: compile CNN backbones into multi-task networks.

    SOURCE arguments accept a .prototxt (AutoMTL or Caffe), an .onnx file, an automtl graph .json,
    torchvision:NAME, timm:NAME or package.module:function; --weights gives them pretrained weights.
    """


def _load(source: str, input_shape: str | None, weights: str | None = None, weights_non_strict: bool = False) -> Any:
    from automtl_compiler import load_backbone

    if weights_non_strict and weights is None:
        raise click.UsageError("--weights-non-strict needs --weights")
    return load_backbone(source, input_shape=parse_shape(input_shape), weights=weights,
                         strict=not weights_non_strict)


@main.command()
@click.argument("source")
@_SHAPE
@_WEIGHTS
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
@_TRUST
def inspect(source: str, input_shape: str | None, weights: str | None, weights_non_strict: bool, as_json: bool,
            trust_code: bool) -> None:
    """Show every node of SOURCE (op, output shape, parameters, FLOPs) and the totals.

    SOURCE may also be a SuperModel directory written by `automtl compile`.
    """
    if (Path(source) / "supermodel.json").is_file():
        from automtl_compiler.nn.supermodel import SuperModel

        model = SuperModel.load(source, trust_code=trust_code)
        click.echo(json.dumps({"tasks": model.tasks, "units": model.unit_names, "depth_levels": model.mt.num_levels,
                               "parameters": model.parameter_counts()}, indent=1) if as_json else model.summary())
        return
    graph = _load(source, input_shape, weights, weights_non_strict)
    if not as_json:
        click.echo(graph.summary())
        return
    nodes = [{"name": n.name, "op": n.op, "inputs": n.inputs, "attrs": {k: list(v) if isinstance(v, tuple) else v
                                                                         for k, v in n.attrs.items()},
              "shape": list(n.shape), "params": n.num_parameters(), "flops": graph.node_flops(n)}
             for n in graph.topological_order()]
    click.echo(json.dumps({"name": graph.name, "inputs": graph.inputs, "outputs": graph.outputs, "nodes": nodes,
                           "total_params": graph.num_parameters(), "total_flops": graph.flops()}, indent=1))


@main.command()
@click.argument("source")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Where to write: .prototxt (+ .safetensors weights), .onnx, or .json (IR + .safetensors).")
@_SHAPE
@_WEIGHTS
@click.option("--opset", type=click.IntRange(13, 21), default=17, show_default=True, help="ONNX opset.")
@click.option("--dialect", type=click.Choice(["automtl", "caffe"]), default="automtl", show_default=True,
              help="For .prototxt: 'automtl' (one-layer batch norms, weights in .safetensors; read back by automtl) "
                   "or 'caffe' (upstream BVLC Caffe's BatchNorm + Scale layers, weights in a .caffemodel).")
def convert(source: str, out: str, input_shape: str | None, weights: str | None, weights_non_strict: bool,
            opset: int, dialect: str) -> None:
    """Convert SOURCE to another format; the output is written only if the conversion succeeds."""
    from automtl_compiler import export_prototxt, save_graph
    from automtl_compiler.backends.onnx_export import export_graph_onnx

    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in (".prototxt", ".onnx", ".json"):
        raise click.BadParameter(f"'{out}' must end in .prototxt, .onnx or .json", param_hint="-o")
    if dialect != "automtl" and suffix != ".prototxt":
        raise click.BadParameter(f"--dialect {dialect} applies to .prototxt outputs only, not '{out}'",
                                 param_hint="--dialect")
    graph = _load(source, input_shape, weights, weights_non_strict)
    if suffix == ".prototxt":
        export_prototxt(graph, path, dialect=dialect)
        sidecar = ".caffemodel" if dialect == "caffe" else ".safetensors"
        click.echo(f"wrote {path} and {path.with_suffix(sidecar)}")
    elif suffix == ".onnx":
        export_graph_onnx(graph, path, opset=opset)
        click.echo(f"wrote {path} (verified against PyTorch with onnxruntime)")
    else:
        save_graph(graph, path)
        click.echo(f"wrote {path} and {path.with_suffix('.safetensors')}")


def parse_task(text: str) -> tuple[str, int]:
    """'segment_semantic:13' -> ('segment_semantic', 13)."""
    name, sep, channels = text.partition(":")
    if not sep or not name:
        raise click.BadParameter(f"'{text}' must be NAME:CHANNELS, e.g. segment_semantic:13", param_hint="--task")
    try:
        count = int(channels)
    except ValueError:
        raise click.BadParameter(f"'{text}': channels '{channels}' is not a whole number", param_hint="--task") from None
    if count <= 0:
        raise click.BadParameter(f"'{text}': a task needs at least one output channel", param_hint="--task")
    return name, count


@main.command(name="compile")
@click.argument("backbone")
@click.option("--task", "tasks", multiple=True, required=True, metavar="NAME:CHANNELS",
              help="A task and its output channels (repeat for each task).")
@click.option("--head", type=click.Choice(["aspp", "cls"]), default="aspp", show_default=True,
              help="Head for every task: ASPP (pixel tasks) or classification.")
@click.option("--head-hidden", type=click.IntRange(1), default=256, show_default=True,
              help="ASPP hidden width (AutoMTL uses 1024).")
@click.option("--feature-node", default=None, help="Node whose output the heads read (default: automatic).")
@_SHAPE
@_WEIGHTS
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
              help="Directory to write the SuperModel to.")
def compile_(backbone: str, tasks: tuple[str, ...], head: str, head_hidden: int, feature_node: str | None,
             input_shape: str | None, weights: str | None, weights_non_strict: bool, out: str) -> None:
    """Compile BACKBONE into a multi-task SuperModel with a head per --task."""
    from automtl_compiler.build import HeadSpec, build_from_specs

    specs = [parse_task(t) for t in tasks]
    names = [n for n, _ in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise click.BadParameter(f"task name(s) {dup} given twice", param_hint="--task")
    options = {"hidden": head_hidden} if head == "aspp" else {}
    graph = _load(backbone, input_shape, weights, weights_non_strict)
    model = build_from_specs(graph, {n: HeadSpec(head, k, options) for n, k in specs}, feature_node=feature_node)
    model.save(out)
    click.echo(model.summary())
    click.echo(f"wrote {out}")


# ---------------------------------------------------------------------------------------------- deployment

def _write_directory(out: Path, save: Any) -> None:
    """Call ``save(tmp_dir)`` in a fresh sibling directory, then move the result to ``out``.

    A failure leaves ``out`` as it was; an existing ``out`` directory gets the new files (each replaced
    atomically) and keeps any others.
    """
    import os
    import shutil
    import tempfile

    if out.exists() and not out.is_dir():
        raise AutomtlError(f"{out} exists and is not a directory; choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save(tmp)
        if out.exists():
            for item in tmp.iterdir():
                os.replace(item, out / item.name)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes the directory owner-only
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@main.command()
@click.argument("supermodel", metavar="SUPERMODEL_DIR")
@click.option("--strategy", type=click.Choice(["sample", "argmax"]), default="sample", show_default=True,
              help="Draw each unit's branch from softmax(logits), or take the most likely one.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --strategy sample.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Policy JSON file to write.")
@_TRUST
def sample(supermodel: str, strategy: str, seed: int, out: str, trust_code: bool) -> None:
    """Draw a discrete policy from a SuperModel's policy logits and write it as JSON."""
    from automtl_compiler.nn.supermodel import SuperModel

    model = SuperModel.load(supermodel, trust_code=trust_code)
    policy = model.sample_policy(strategy, seed=seed)
    policy.save(out)
    for task, counts in policy.counts().items():
        click.echo(f"{task}: " + ", ".join(f"{branch} {n}" for branch, n in counts.items()))
    click.echo(f"wrote {out} ({len(model.unit_names)} units x {len(model.tasks)} tasks, strategy {strategy}"
               + (f", seed {seed})" if strategy == "sample" else ")"))


@main.command(name="prune")
@click.argument("supermodel", metavar="SUPERMODEL_DIR")
@click.option("--policy", "policy_path", required=True, type=click.Path(dir_okay=False),
              help="Policy JSON (from `automtl sample`).")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False),
              help="Directory to write the compact model to.")
@_TRUST
def prune_(supermodel: str, policy_path: str, out: str, trust_code: bool) -> None:
    """Prune SUPERMODEL_DIR to a policy: the compact multi-task model, shared work and weights once."""
    from automtl_compiler.nn.compact import prune
    from automtl_compiler.nn.policy import Policy
    from automtl_compiler.nn.supermodel import SuperModel

    policy = Policy.load(policy_path)
    model = SuperModel.load(supermodel, trust_code=trust_code)
    policy.check(model.tasks, model.unit_names, where=policy_path)
    compact = prune(model, policy)
    _write_directory(Path(out), compact.save)
    click.echo(compact.summary())
    click.echo(f"wrote {out}")


@main.command(name="export")
@click.argument("model_dir", metavar="MODEL_DIR")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="The .onnx file to write (only after it has been verified).")
@click.option("--task", default=None, help="Export only this task's output and the nodes it needs.")
@click.option("--view", type=click.Choice(["soft", "pretrain"]), default=None,
              help="For a SuperModel: 'soft' (default) has a gates input [tasks, units, 3]; 'pretrain' folds "
                   "the gates to 1/3.")
@click.option("--opset", type=click.IntRange(13, 21), default=17, show_default=True, help="ONNX opset.")
@click.option("--dynamic-hw", is_flag=True, help="Make height and width dynamic too (the batch always is).")
@click.option("--static-batch", is_flag=True, help="Fix the batch size to the one of --input-shape.")
@click.option("--no-verify", is_flag=True, help="Skip running the file in onnxruntime against PyTorch (and a "
                                                 "variant against fp32).")
@click.option("--input-shape", default=None, metavar="N,C,H,W",
              help="Example input shape (default: the model's input shape).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="For a compact model: fp16 (for GPUs; float32 inputs and outputs) or int8 (for CPUs; static "
                   "quantization calibrated on training images), each checked against fp32 on the validation split.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="With --precision fp16/int8: the training config whose dataset gives the calibration images and "
                   "the validation split (default: the config.yaml of the automtl run directory holding MODEL_DIR).")
@click.option("--calibration-images", type=click.IntRange(1), default=None, metavar="N",
              help="With --precision int8: how many training images calibrate it (evenly spaced; default 64).")
@click.option("--max-drop", type=click.FloatRange(0), default=None, metavar="POINTS",
              help="With --precision fp16/int8: the largest loss of Δm against fp32, in points, that is accepted "
                   "(default 1.0); a larger one is an error and nothing is written.")
@_TRUST
def export(model_dir: str, out: str, task: str | None, view: str | None, opset: int, dynamic_hw: bool,
           static_batch: bool, no_verify: bool, input_shape: str | None, precision: str, config_path: str | None,
           calibration_images: int | None, max_drop: float | None, trust_code: bool) -> None:
    """Export MODEL_DIR to ONNX: a compact model (from `automtl prune`; one input, one output per task) or a
    SuperModel (a directory with supermodel.json; its soft or pre-training view, one output per task).

    A compact model can also be written as a deployment variant (--precision fp16 or int8)."""
    path = Path(out)
    if path.suffix.lower() != ".onnx":
        raise click.BadParameter(f"'{out}' must end in .onnx", param_hint="-o")
    _check_precision_options(precision, config_path, calibration_images, max_drop)
    report = None
    if (Path(model_dir) / "supermodel.json").is_file():
        if precision != "fp32":
            raise click.BadParameter(f"{model_dir} is a SuperModel; deployment variants are made of compact models "
                                     "(`automtl prune`)", param_hint="--precision")
        tasks = _export_supermodel(model_dir, path, task, view or "soft", opset, dynamic_hw, static_batch,
                                   no_verify, input_shape, trust_code)
        kind = f", {view or 'soft'} view"
    else:
        if view is not None:
            raise click.BadParameter(f"{model_dir} is a compact model (no supermodel.json); --view applies to "
                                     "SuperModel directories only", param_hint="--view")
        from automtl_compiler.backends.onnx_export import export_onnx
        from automtl_compiler.nn.compact import CompactModel

        model = CompactModel.load(model_dir, trust_code=trust_code)
        tasks, kind = [task] if task else list(model.tasks), ""
        options = {"input_shape": parse_shape(input_shape), "opset": opset, "dynamic_batch": not static_batch,
                   "dynamic_hw": dynamic_hw, "task": task}
        if precision == "fp32":
            export_onnx(model, path, verify=not no_verify, **options)
        else:
            report = _export_variant(model, model_dir, path, tasks, precision, config_path, calibration_images,
                                     max_drop, not no_verify, options)
            kind = f", {_variant_kind(report)}"
    size = path.stat().st_size / 2**20
    check = "not verified (--no-verify)" if no_verify else "verified against PyTorch with onnxruntime"
    if report is not None and not no_verify:
        check += (f", then against fp32 on {report.comparison.samples} validation samples" if report.comparison
                  else ", then against fp32 on a random input (no config)")
    click.echo(f"wrote {path} ({size:.1f} MB, opset {opset}{kind}, outputs {', '.join(tasks)}; {check})")


def _check_precision_options(precision: str, config_path: str | None, calibration_images: int | None,
                             max_drop: float | None) -> None:
    """The variant options apply to the variants they are for."""
    given = {"--config": config_path, "--calibration-images": calibration_images, "--max-drop": max_drop}
    if precision == "fp32":
        for name, value in given.items():
            if value is not None:
                raise click.BadParameter(f"{name} applies to --precision fp16 or int8", param_hint=name)
    if precision == "fp16" and calibration_images is not None:
        raise click.BadParameter("--calibration-images applies to --precision int8 (fp16 needs no calibration)",
                                 param_hint="--calibration-images")


def _export_variant(model: Any, model_dir: str, path: Path, tasks: list[str], precision: str, config_path: str | None,
                    calibration_images: int | None, max_drop: float | None, verify: bool, options: dict[str, Any]) -> Any:
    """``automtl export --precision fp16|int8`` of a compact model: print the check's table, return its report."""
    from automtl_compiler.backends.onnx_calibration import DeploymentData, run_config
    from automtl_compiler.backends.onnx_precision import (
        DEFAULT_CALIBRATION_IMAGES,
        DEFAULT_MAX_DROP,
        export_precision,
    )

    config = config_path or run_config(model_dir)
    if config is None and precision == "int8":
        raise click.BadParameter(f"int8 is calibrated on training images: give the training config (--config); "
                                 f"{model_dir} is not in an automtl run directory holding one", param_hint="--config")
    data = DeploymentData.from_config(config, tasks) if config is not None else None
    report = export_precision(model, path, precision=precision, data=data,
                              calibration_images=calibration_images or DEFAULT_CALIBRATION_IMAGES,
                              max_drop=DEFAULT_MAX_DROP if max_drop is None else max_drop, verify=verify, **options)
    for line in report.lines():
        click.echo(line)
    return report


def _variant_kind(report: Any) -> str:
    """How a variant was made, for the ``wrote`` line."""
    d = report.details
    if report.precision == "int8":
        return (f"int8 {d['format']}, {d['calibration']} calibration on {d['calibration_images']} training images"
                + (f", {d['convs_skipping_padding']} convs skip their zero padding" if d["convs_skipping_padding"] else ""))
    blocked = d.get("float32_nodes") or []
    return "fp16 with float32 inputs and outputs" + (f", {len(blocked)} node(s) kept float32" if blocked else "")


def _export_supermodel(model_dir: str, path: Path, task: str | None, view: str, opset: int, dynamic_hw: bool,
                       static_batch: bool, no_verify: bool, input_shape: str | None, trust_code: bool) -> list[str]:
    """``automtl export`` of a SuperModel directory; returns the exported tasks."""
    from automtl_compiler.backends.onnx_supermodel import export_supermodel_onnx
    from automtl_compiler.nn.supermodel import SuperModel

    if dynamic_hw:
        raise click.BadParameter("a SuperModel is exported with a fixed height and width; drop --dynamic-hw",
                                 param_hint="--dynamic-hw")
    model = SuperModel.load(model_dir, trust_code=trust_code)
    tasks = [task] if task else list(model.tasks)
    export_supermodel_onnx(model, path, tasks=tasks, view=view, input_shape=parse_shape(input_shape), opset=opset,
                           dynamic_batch=not static_batch, verify=not no_verify)
    return tasks


@main.command()
@click.argument("models", metavar="MODEL.onnx...", nargs=-1, required=True)
@click.option("--batch", type=click.IntRange(1), default=1, show_default=True, help="Batch size.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "all"]), default="all", show_default=True,
              help="Execution provider(s); 'all' is the CPU plus CUDA when a GPU is usable.")
@click.option("--repeat", type=click.IntRange(1), default=10, show_default=True, help="Timed runs per provider.")
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True, help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(1), default=None, help="onnxruntime intra-op threads.")
def bench(models: tuple[str, ...], batch: int, provider: str, repeat: int, warmup: int, threads: int | None) -> None:
    """Median latency and throughput of ONNX models in onnxruntime, per execution provider.

    With several files (e.g. the fp32, fp16 and int8 variants of one model) they are timed round-robin and
    the table has a row per file and provider, with its precision and its ratio to the first file."""
    from automtl_compiler.errors import require_file
    from automtl_compiler.runtime import benchmark, cuda_status

    for model in models:
        require_file(model, "ONNX model")
    providers = [provider] if provider != "all" else ["cpu"]
    note = ""
    if provider == "all":
        usable, reason = cuda_status()
        if usable:
            providers.append("cuda")
        else:
            note = f"cuda: skipped, {reason}"
    if len(models) > 1:
        _bench_several(models, batch, providers, repeat, warmup, threads)
    else:
        from automtl_compiler.backends.onnx_precision import read_precision

        rows = benchmark(models[0], batch=batch, providers=providers, repeat=repeat, warmup=warmup, threads=threads)
        _print_table(["provider", "batch", "input", "median ms", "images/s"],
                     [[r["provider"], str(r["batch"]), "x".join(map(str, r["input_shape"])), f"{r['median_ms']:.2f}",
                       f"{r['images_per_s']:.1f}"] for r in rows])
        click.echo(f"median of {repeat} runs after {warmup} warm-up runs; {Path(models[0]).name} "
                   f"({read_precision(models[0])})")
    if note:
        click.echo(note)


def _print_table(header: list[str], cells: list[list[str]]) -> None:
    """A markdown table of ``cells`` under ``header``."""
    widths = [max(len(c) for c in col) for col in zip(header, *cells)]
    for line in [header, *cells]:
        click.echo("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
        if line is header:
            click.echo("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def _bench_several(models: tuple[str, ...], batch: int, providers: list[str], repeat: int, warmup: int,
                   threads: int | None) -> None:
    """``automtl bench A.onnx B.onnx ...``: one table, a row per file and provider, timed round-robin."""
    from automtl_compiler.backends.onnx_latency import compare_latency

    rows = compare_latency(models, providers=providers, batch=batch, repeat=repeat, warmup=warmup, threads=threads)
    _print_table(["file", "precision", "provider", "batch", "input", "median ms", "images/s", "ratio"],
                 [[Path(r["file"]).name, r["precision"], r["provider"], str(r["batch"]),
                   "x".join(map(str, r["input_shape"])), f"{r['median_ms']:.2f}", f"{r['images_per_s']:.1f}",
                   f"{r['ratio']:.2f}"] for r in rows])
    click.echo(f"median of {repeat} runs after {warmup} warm-up runs, the files timed round-robin; ratio: median ms "
               f"against {Path(models[0]).name} on the same provider")


_SET = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                    help="Override a config key (dotted), e.g. --set stages.pretrain.iters=10. Repeatable.")
_OVERWRITE = click.option(
    "--overwrite", is_flag=True,
    help="Replace the automtl run in --out (kept aside until the new run's first checkpoint, put back if it fails "
         "before); a directory that is not an automtl run is never replaced.")
_QUIET = click.option("--quiet", is_flag=True, help="No progress output.")


def train_options(command: Any) -> Any:
    """The arguments and options of one training process: ``automtl train`` and ``python -m
    automtl_compiler.train`` (what torchrun starts) both take them."""
    for option in reversed([
        click.argument("config", required=False, type=click.Path(dir_okay=False)),
        click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Run directory."),
        _SET,
        click.option("--baseline", type=click.Choice(["single-task", "all-share"]), default=None,
                     help="Train a reference with the same budget instead (for Δm)."),
        click.option("--resume", is_flag=True, help="Require an earlier run of the same config in --out to resume "
                                                     "(it resumes without this too)."),
        _OVERWRITE, _QUIET, _WEIGHTS,
    ]):
        command = option(command)
    return command


def _launch_options(command: Any) -> Any:
    """--nproc-per-node and the multi-node options of the commands that can train on several processes."""
    for option in reversed([
        click.option("--nproc-per-node", "nproc", type=click.IntRange(1), default=1, show_default=True,
                     help="Worker processes on this node (torchrun's machinery; one per GPU, or CPU processes)."),
        click.option("--nnodes", type=click.IntRange(1), default=1, show_default=True,
                     help="Nodes taking part; start the same command on each with its --node-rank."),
        click.option("--node-rank", type=click.IntRange(0), default=None,
                     help="This node's rank, 0 to --nnodes minus 1 (0: the node at --rdzv-endpoint)."),
        click.option("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                     help="Where the nodes meet: node 0's address and a free port, the same on every node."),
    ]):
        command = option(command)
    return command


def _launching(nproc: int, nnodes: int, node_rank: int | None, rdzv_endpoint: str | None) -> bool:
    """True when the command starts worker processes; the launcher options checked either way."""
    check_launch(nproc, nnodes, node_rank, rdzv_endpoint)
    return nproc > 1 or nnodes > 1


def _flags(**options: Any) -> list[str]:
    """Options as a worker's command line: ``--name value`` (repeated for a list), ``--name`` for True."""
    args: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            args.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                args += [flag, str(item)]
        elif value not in (None, False):
            args += [flag, str(value)]
    if (click.get_current_context().obj or {}).get("debug"):
        args.append("--debug")
    return args


@main.command()
@train_options
@_launch_options
def train(config: str | None, out: str, overrides: tuple[str, ...], baseline: str | None, resume: bool,
          overwrite: bool, quiet: bool, weights: str | None, weights_non_strict: bool, nproc: int, nnodes: int,
          node_rank: int | None, rdzv_endpoint: str | None) -> None:
    """Train a compiled SuperModel through AutoMTL's stages (CONFIG: YAML; default: the built-in config).

    Started again with the same command after a crash or kill, a run resumes from its last checkpoint.
    With --nproc-per-node N (and --nnodes), N worker processes per node train together, as under torchrun.
    """
    settings = [*weights_override(weights, weights_non_strict), *overrides]
    if _launching(nproc, nnodes, node_rank, rdzv_endpoint):
        from automtl_compiler.train.config import load_config

        load_config(config, settings)  # a bad config is one error here, not one per worker
        args = [config] if config is not None else []
        launch(nproc, [*args, *_flags(out=out, set=settings, baseline=baseline, resume=resume, overwrite=overwrite,
                                      quiet=quiet)],
               nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
        return
    for line in run_training(config, settings, out, baseline=baseline, resume=resume, overwrite=overwrite,
                             quiet=quiet):
        click.echo(line)


@main.command(name="run")
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Run directory (default: runs/run-<date>-<time>).")
@click.option("--quick", is_flag=True, help="Every step with fewer iterations (a couple of minutes on a laptop CPU).")
@_SET
@click.option("--no-references", is_flag=True, help="Do not train the single-task references (no Δm).")
@_OVERWRITE
@_QUIET
@_WEIGHTS
@_launch_options
def run(config: str | None, out: str | None, quick: bool, overrides: tuple[str, ...], no_references: bool,
        overwrite: bool, quiet: bool, weights: str | None, weights_non_strict: bool, nproc: int, nnodes: int,
        node_rank: int | None, rdzv_endpoint: str | None) -> None:
    """Backbone to verified ONNX in one command: train, sample, prune, export, benchmark.

    CONFIG is a YAML training config (default: the built-in one - ResNet-18 and three dense tasks on the
    synthetic scenes). Run again with the same arguments, it resumes where it stopped. With
    --nproc-per-node N (and --nnodes), N worker processes per node train together, as under torchrun.
    """
    import time

    from automtl_compiler.pipeline import run as run_pipeline
    from automtl_compiler.pipeline import summary

    settings = [*weights_override(weights, weights_non_strict), *overrides]
    out = out or str(Path("runs") / time.strftime("run-%Y%m%d-%H%M%S"))
    if _launching(nproc, nnodes, node_rank, rdzv_endpoint):
        from automtl_compiler.train.config import load_config

        load_config(config, settings)
        args = [config] if config is not None else []
        launch(nproc, ["run", *args, *_flags(out=out, quick=quick, set=settings, no_references=no_references,
                                             overwrite=overwrite, quiet=quiet)],
               module="automtl_compiler.cli.main", nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
        return
    report = run_pipeline(config, out, quick=quick, overrides=settings, references=not no_references,
                          overwrite=overwrite, progress=not quiet)
    if is_rank_zero():
        click.echo(summary(report))


if __name__ == "__main__":
    main()
