"""Each pruning pass on its own, on small hand-built graphs: what it rewrites, what it keeps, that it reports
whether it changed the graph, that it never edits its input and keeps tensors shared by identity; and the
passes composed equal the multi-task graph evaluated with one-hot gates."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from automtl_compiler import build_supermodel
from automtl_compiler.backends.torch_codegen import to_torch
from automtl_compiler.errors import GraphError, ShapeError
from automtl_compiler.ir.graph import Graph
from automtl_compiler.nn.heads import ClassificationHead
from automtl_compiler.passes.fold_bn import fold_batchnorm
from automtl_compiler.passes.infra import run_passes
from automtl_compiler.passes.multitask import BRANCHES
from automtl_compiler.passes.prune import (
    bind_gates,
    common_trunk_end,
    eliminate_common_subexpressions,
    eliminate_dead_code,
    inline_selects,
    plan_of,
    prune_graph,
)
from tests.helpers import Tiny, randomise_bn

X = (2, 4, 6, 6)


def mixed_graph() -> Graph:
    """Two tasks, one unit: branches a (relu), b (sigmoid), c (identity input), mixed per task."""
    g = Graph("mixed")
    g.add_input("x", X)
    g.add_input("gates", (2, 1, 3))
    g.add_node("a", "relu", ["x"])
    g.add_node("b", "sigmoid", ["x"])
    for k in range(2):
        g.add_node(f"m{k}", "mix", ["a", "b", "x", "gates"], {"task": k, "unit": 0})
        g.add_node(f"out{k}", "tanh", [f"m{k}"])
    g.set_outputs(["out0", "out1"])
    return g.materialise()


def test_mix_and_select_compute_their_formulas():
    g = mixed_graph()
    x, gates = torch.randn(X), torch.softmax(torch.randn(2, 1, 3), -1)
    out0, out1 = to_torch(g)(x, gates)
    for k, out in enumerate((out0, out1)):
        w = gates[k, 0]
        torch.testing.assert_close(out, torch.tanh(w[0] * torch.relu(x) + w[1] * torch.sigmoid(x) + w[2] * x))
    bound, changed = bind_gates(g, [["specific"], ["skip"]])
    assert changed and {bound.node(f"m{k}").op for k in range(2)} == {"select"}
    assert "gates" not in bound.node("m0").inputs and not bound.consumers("gates")
    out0, out1 = to_torch(bound)(x, gates)
    torch.testing.assert_close(out0, torch.tanh(torch.sigmoid(x)))
    torch.testing.assert_close(out1, torch.tanh(x))
    assert g.node("m0").op == "mix", "a pass never edits its input"


def test_mix_checks_gate_shape_and_branch_shapes():
    g = Graph("bad")
    g.add_input("x", X)
    g.add_input("gates", (1, 1, 3))
    g.add_node("m", "mix", ["x", "x", "x", "gates"], {"task": 1, "unit": 0})
    g.set_outputs(["m"])
    with pytest.raises(ShapeError, match=r"gates\[1, 0\]"):
        g.materialise()
    with pytest.raises(GraphError, match="choice"):
        Graph("s").add_node("s", "select", [], {"choice": "both"}, check=False)


def test_bind_gates_refuses_a_plan_without_the_entry():
    from automtl_compiler.errors import AutomtlError

    with pytest.raises(AutomtlError, match="no choice for task 1"):
        bind_gates(mixed_graph(), [["share"]])
    assert bind_gates(eliminate_dead_code(mixed_graph())[0], [["share"], ["share"]]).changed
    plain = Graph("plain")
    plain.add_input("x", X)
    plain.add_node("r", "relu", ["x"])
    plain.set_outputs(["r"])
    assert not bind_gates(plain.materialise(), []).changed


def test_inline_selects_reads_the_chosen_branch_and_drops_the_select():
    bound, _ = bind_gates(mixed_graph(), [["share"], ["share"]])
    out, changed = inline_selects(bound)
    assert changed and all(n.op != "select" for n in out.nodes())
    assert out.node("out0").inputs == ["a"] and out.node("out1").inputs == ["a"]
    assert not inline_selects(out).changed


def test_cse_merges_equal_op_attrs_tensors_and_inputs_only():
    g = Graph("cse")
    g.add_input("x", (1, 3, 5, 5))
    weight = torch.randn(4, 3, 3, 3)
    g.add_node("c1", "conv2d", ["x"], {"out_channels": 4, "kernel_size": 3}, params={"weight": weight})
    g.add_node("c2", "conv2d", ["x"], {"out_channels": 4, "kernel_size": 3}, params={"weight": weight})
    g.add_node("c3", "conv2d", ["x"], {"out_channels": 4, "kernel_size": 3}, params={"weight": weight.clone()})
    g.add_node("c4", "conv2d", ["x"], {"out_channels": 4, "kernel_size": 3, "padding": 1}, params={"weight": weight})
    g.add_node("r1", "relu", ["c1"])
    g.add_node("r2", "relu", ["c2"])
    g.set_outputs(["r1", "r2", "c3", "c4"])
    g.materialise()
    out, changed = eliminate_common_subexpressions(g)
    assert changed and {n.name for n in out.nodes()} == {"x", "c1", "c3", "c4", "r1"}
    assert out.outputs == ["r1", "r1", "c3", "c4"]
    assert out.node("c1").params["weight"] is weight, "tensors stay shared by identity"
    x = torch.randn(1, 3, 5, 5)
    for a, b in zip(to_torch(g)(x), to_torch(out)(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not eliminate_common_subexpressions(out).changed


def test_dce_removes_what_no_output_reads_inputs_included():
    g = mixed_graph()
    g.set_outputs(["out1"])
    out, changed = eliminate_dead_code(g)
    assert changed and "out0" not in out and "m0" not in out and "gates" in out
    bound, _ = inline_selects(bind_gates(out, [[], ["specific"]])[0])
    swept, changed = eliminate_dead_code(bound)
    assert changed and {n.name for n in swept.nodes()} == {"x", "b", "out1"}, "the gates and the unused branches go"
    assert not eliminate_dead_code(swept).changed


def test_common_trunk_end_is_the_nearest_node_every_output_path_passes():
    g = Graph("tree")
    g.add_input("x", X)
    g.add_node("a", "relu", ["x"])
    g.add_node("b", "sigmoid", ["a"])
    g.add_node("c", "tanh", ["b"])
    g.add_node("d", "relu", ["b"])
    g.add_node("e", "add", ["a", "d"])
    g.set_outputs(["c", "e"])
    assert common_trunk_end(g.materialise()) == "a", "e also reads a directly"
    g.set_outputs(["c", "d"])
    assert common_trunk_end(g) == "b"
    g.set_outputs(["c"])
    assert common_trunk_end(g) == "c"
    g.set_outputs(["x"])
    assert common_trunk_end(g) is None


def test_fold_batchnorm_reports_a_change_and_keeps_eval_numbers():
    g = Graph("fold")
    g.add_input("x", (2, 3, 5, 5))
    g.add_node("c", "conv2d", ["x"], {"out_channels": 4, "kernel_size": 3})
    g.add_node("bn", "batchnorm2d", ["c"])
    g.set_outputs(["bn"])
    g.materialise(seed=1)
    g.node("bn").buffers["running_mean"].normal_()
    g.node("bn").buffers["running_var"].uniform_(0.5, 2.0)
    out, changed = fold_batchnorm(g)
    assert changed and [n.op for n in out.nodes()] == ["input", "conv2d"]
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(to_torch(out).eval()(x), to_torch(g).eval()(x), rtol=1e-5, atol=1e-5)
    assert not fold_batchnorm(out).changed
    assert run_passes(g, [fold_batchnorm, eliminate_dead_code]).changed


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    sm = build_supermodel(randomise_bn(Tiny()), {t: ClassificationHead(8, 2) for t in ("a", "b")},
                          input_shape=(2, 3, 8, 8)).eval()
    return sm


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(BRANCHES), min_size=4, max_size=4))
def test_composed_passes_equal_the_multitask_graph_under_one_hot_gates(tiny, flat):
    """prune_graph(plan) = the unpruned multi-task graph with gates one-hot at the plan: exactly."""
    mt = tiny.mt
    units = len(mt.units)
    choices = {t: {u.conv: flat[(i * 2 + j) % 4] for j, u in enumerate(mt.units)} for i, t in enumerate(mt.tasks)}
    plan = plan_of(mt, choices)
    gates = torch.zeros(len(mt.tasks), units, 3)
    for k, row in enumerate(plan):
        for u, c in enumerate(row):
            gates[k, u, BRANCHES.index(c)] = 1.0
    x = torch.randn(2, 3, 8, 8)
    full = to_torch(mt.graph.copy()).eval()(x, gates)
    pruned_graph = prune_graph(mt, choices)
    assert "gates" not in pruned_graph and not any(n.op in ("mix", "select") for n in pruned_graph.nodes())
    pruned = to_torch(pruned_graph.copy()).eval()(x)
    for a, b in zip(full, pruned):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_the_multitask_graph_is_valid_ir_with_the_shapes_it_records(tiny):
    """insert_task_branches records shapes instead of inferring them: inference must agree, tensors complete."""
    mt = tiny.mt
    mt.graph.copy().validate()
    assert mt.graph.inputs == [mt.trunk.inputs[0], mt.gates]
    assert len(mt.graph.outputs) == len(mt.tasks)
    ops = [n.op for n in mt.graph.nodes()]
    assert ops.count("mix") == len(mt.tasks) * len(mt.units)
    assert ops.count("conv2d") == len(mt.tasks) * (2 * len(mt.units) + sum(not u.skip.identity for u in mt.units))
