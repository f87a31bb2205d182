"""``automtl``: a thin click application over the library. It parses, calls, and prints.

Every user error (an AutomtlError or a bad option) is printed as one line on stderr with exit status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from automtl_compiler.errors import AutomtlError


class _Group(click.Group):
    """A click group that turns every error into one readable line and a non-zero exit."""

    def main(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D401 - click's signature
        kwargs["standalone_mode"] = False
        debug = "--debug" in sys.argv[1:]
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        except (AutomtlError, click.ClickException) as e:
            if debug:
                traceback.print_exc()
            message = e.format_message() if isinstance(e, click.ClickException) else str(e)
            click.echo(f"error: {' '.join(message.split())}" if "\n" not in message.strip()
                       else f"error: {message.strip()}", err=True)
            sys.exit(2)
        except Exception as e:  # a bug, not bad input: still one line, traceback on request
            if debug:
                traceback.print_exc()
            click.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback and "
                       "please report it)", err=True)
            sys.exit(1)


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
_WEIGHTS = click.option("--weights", type=click.Path(dir_okay=False), default=None,
                        help="Safetensors (or .caffemodel) weights for a .prototxt source.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="automtl-compiler")
def main(debug: bool) -> None:
    """automtl: compile CNN backbones into multi-task networks.

    SOURCE arguments accept a .prototxt (AutoMTL or Caffe), an .onnx file, an automtl graph .json, or
    torchvision:NAME (random weights).
    """


def _load(source: str, input_shape: str | None, weights: str | None = None) -> Any:
    from automtl_compiler import load_backbone

    return load_backbone(source, input_shape=parse_shape(input_shape), weights=weights)


@main.command()
@click.argument("source")
@_SHAPE
@_WEIGHTS
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def inspect(source: str, input_shape: str | None, weights: str | None, as_json: bool) -> None:
    """Show every node of SOURCE (op, output shape, parameters, FLOPs) and the totals.

    SOURCE may also be a SuperModel directory written by `automtl compile`.
    """
    if (Path(source) / "supermodel.json").is_file():
        from automtl_compiler.nn.supermodel import SuperModel

        model = SuperModel.load(source)
        click.echo(json.dumps({"tasks": model.tasks, "units": model.unit_names, "depth_levels": model.mt.num_levels,
                               "parameters": model.parameter_counts()}, indent=1) if as_json else model.summary())
        return
    graph = _load(source, input_shape, weights)
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
def convert(source: str, out: str, input_shape: str | None, weights: str | None, opset: int) -> None:
    """Convert SOURCE to another format; the output is written only if the conversion succeeds."""
    from automtl_compiler import export_prototxt, save_graph
    from automtl_compiler.backends.onnx_export import export_graph_onnx

    path = Path(out)
    suffix = path.suffix.lower()
    if suffix not in (".prototxt", ".onnx", ".json"):
        raise click.BadParameter(f"'{out}' must end in .prototxt, .onnx or .json", param_hint="-o")
    graph = _load(source, input_shape, weights)
    if suffix == ".prototxt":
        export_prototxt(graph, path)
        click.echo(f"wrote {path} and {path.with_suffix('.safetensors')}")
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
             input_shape: str | None, weights: str | None, out: str) -> None:
    """Compile BACKBONE into a multi-task SuperModel with a head per --task."""
    from automtl_compiler import build_supermodel
    from automtl_compiler.nn.heads import make_head
    from automtl_compiler.passes.feature import find_feature_node

    specs = [parse_task(t) for t in tasks]
    names = [n for n, _ in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise click.BadParameter(f"task name(s) {dup} given twice", param_hint="--task")
    graph = _load(backbone, input_shape, weights)
    feature = feature_node or find_feature_node(graph)
    if feature not in graph:
        raise AutomtlError(f"feature node '{feature}' is not in {backbone}; see `automtl inspect {backbone}`")
    channels = (graph.node(feature).shape or (0, 0))[1]
    spec = {"type": head, "in_channels": channels}
    heads = {n: make_head({**spec, "num_classes": k, **({"hidden": head_hidden} if head == "aspp" else {})})
             for n, k in specs}
    model = build_supermodel(graph, heads, feature_node=feature)
    model.save(out)
    click.echo(model.summary())
    click.echo(f"wrote {out}")


if __name__ == "__main__":
    main()
