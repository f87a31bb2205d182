"""``python -m benchmarks`` runs the benchmarks and gathers their rows into one table."""

from __future__ import annotations

import pytest

from automtl_compiler.errors import AutomtlError
from automtl_compiler.frontends import load_backbone
from benchmarks.__main__ import main, rows_of


def test_rows_of_reads_a_markdown_table() -> None:
    table = "| a | b |\n|---|---|\n| x | 1 |\n| y | 2 |"
    assert rows_of("note\n" + table + "\n(3 s)") == [["x", "1"], ["y", "2"]]


def test_runner_prints_one_combined_table(capsys) -> None:
    main(["--quick", "--only", "compile"])
    out = capsys.readouterr().out
    combined = out[out.index("## all benchmarks"):]
    rows = rows_of(combined)
    assert rows and all(r[0] == "compile" for r in rows)
    assert rows[0][1] == "resnet18"


def test_python_entry_backbone_errors_are_clear() -> None:
    with pytest.raises(AutomtlError, match="cannot import no_such_module_xyz"):
        load_backbone("no_such_module_xyz:build")
    with pytest.raises(AutomtlError, match="has no function nothing_here"):
        load_backbone("tests.helpers:nothing_here")
    with pytest.raises(AutomtlError, match=r"failing_entry\(\) raised ValueError: no backbone today"):
        load_backbone("tests.test_benchmarks_runner:failing_entry")  # the user's function fails: one line
    with pytest.raises(AutomtlError, match="torch:randn"):
        load_backbone("torch:randn")  # a built-in is not a backbone builder: refused before it is called
    with pytest.raises(AutomtlError, match=r"returned a Tensor, not an nn\.Module"):
        load_backbone("tests.test_benchmarks_runner:not_a_module")


def failing_entry():
    """A backbone entry whose own code fails."""
    raise ValueError("no backbone today")


def not_a_module():
    """A backbone entry that returns the wrong thing."""
    import torch

    return torch.zeros(1)
