"""``python -m automtl_compiler.train CONFIG --out RUN_DIR``: one training process, what torchrun starts.

    torchrun --nproc-per-node 2 -m automtl_compiler.train CONFIG --out RUN_DIR [--set K=V ...] [--resume]

It takes the options of ``automtl train`` except the launcher's (``--nproc-per-node`` and the multi-node
ones: torchrun has them), and reports errors the same way: one line on stderr, exit 2 (1 for a bug);
``--debug`` prints the traceback first.
"""

from __future__ import annotations

import click

from automtl_compiler.cli.main import OneLineErrorsCommand, train_options
from automtl_compiler.train.launch import run_training, weights_override

PROG = "python -m automtl_compiler.train"


@click.command(cls=OneLineErrorsCommand, context_settings={"help_option_names": ["-h", "--help"]})
@train_options
def main(config: str | None, out: str, overrides: tuple[str, ...], baseline: str | None, resume: bool,
         overwrite: bool, quiet: bool, weights: str | None, weights_non_strict: bool) -> None:
    """Train this process's share of a run of CONFIG (YAML; default: the built-in config) into --out.

    In a process started by torchrun it is one rank of a distributed run; alone, a whole run like
    `automtl train`. The same command started again resumes from the last checkpoint.
    """
    for line in run_training(config, [*weights_override(weights, weights_non_strict), *overrides], out,
                             baseline=baseline, resume=resume, overwrite=overwrite, quiet=quiet):
        click.echo(line)


if __name__ == "__main__":
    main(prog_name=PROG)
