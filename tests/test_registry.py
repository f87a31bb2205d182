"""The generic Registry: a name -> entry table with aliases, duplicate rules, lazy entries and clear errors."""

from __future__ import annotations

import difflib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from automtl_compiler.errors import AutomtlError, GraphError, ShapeError
from automtl_compiler.registry import Registry

NAMES = st.sampled_from(["a", "b", "ab", "abc", "relu", "relu6", "Relu"])


class Thing:
    """An entry that is neither a class nor a function: identity decides whether it is the same."""


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(NAMES, st.integers(0, 2), st.booleans()), max_size=12))
def test_behaves_like_a_dict_with_duplicate_rules(ops):
    """Each register call either adds, keeps the same entry, or (another entry) needs replace=True."""
    things = [Thing() for _ in range(3)]
    reg: Registry[Thing] = Registry("widget")
    model: dict[str, Thing] = {}
    for name, which, replace in ops:
        entry = things[which]
        if name in model and model[name] is not entry and not replace:
            with pytest.raises(AutomtlError, match=f"register_widget: '{name}' is already registered.*replace=True"):
                reg.register(name, entry, replace=replace)
        else:
            assert reg.register(name, entry, replace=replace) is entry
            model[name] = entry
    assert dict(reg) == model and len(reg) == len(model) and reg.names() == sorted(model)
    assert all(reg.lookup(n) is e and reg[n] is e and n in reg for n, e in model.items())


@settings(max_examples=60, deadline=None)
@given(st.sets(st.text("abcdefgh_", min_size=1, max_size=6), max_size=8), st.text("abcdefgh_", min_size=1,
                                                                                    max_size=6))
def test_unknown_names_say_kind_close_matches_and_all_names(known, query):
    reg: Registry[int] = Registry("gizmo", hint=" (or build one)", error=ShapeError)
    for i, name in enumerate(sorted(known)):
        reg.register(name, i)
    if query in known:
        assert reg.lookup(query) == sorted(known).index(query)
        return
    with pytest.raises(ShapeError) as err:
        reg.lookup(query, where="node 'n'")
    msg = str(err.value)
    assert msg.startswith(f"node 'n': unknown gizmo {query!r}") and msg.endswith(" (or build one)")
    assert f"available: {', '.join(sorted(known)) or 'none'}" in msg
    close = difflib.get_close_matches(query, sorted(known), n=3)
    assert ("did you mean" in msg) == bool(close) and all(repr(c) in msg for c in close)
    assert query not in reg and reg.get(query, "dflt") == "dflt"


def test_decorator_aliases_and_case_folding():
    reg: Registry[type] = Registry("shape", fold_case=True)

    @reg.register("Square", aliases=["quad"])
    class Square:
        pass

    assert reg["SQUARE"] is reg["Quad"] is reg.lookup("quad") is Square
    assert list(reg) == ["square"] and dict(reg.aliases) == {"quad": "square"} and reg.canonical("QUAD") == "square"
    with pytest.raises(AutomtlError, match="alias 'quad' of 'circle' is already taken"):
        reg.register("circle", int, aliases=["quad"])
    with pytest.raises(AutomtlError, match="'quad' is already an alias of 'square'"):
        reg.register("quad", int)
    with pytest.raises(AutomtlError, match=r"unknown shape 'sqare' \(did you mean 'square'\?\); available: quad, "
                                           r"square$"):
        reg.lookup("sqare")


def test_same_class_again_is_fine_and_other_needs_replace():
    reg: Registry[type] = Registry("widget", caller="add_widget")
    reg.register("x", Thing)
    reg.register("x", Thing)
    reloaded = type("Thing", (), {"__module__": Thing.__module__, "__qualname__": Thing.__qualname__})
    assert reg.register("x", reloaded) is reloaded and reg["x"] is reloaded            # a reloaded module
    with pytest.raises(AutomtlError, match=r"add_widget: 'x' is already registered \(tests.test_registry:Thing\)"):
        reg.register("x", int)
    reg.register("x", int, replace=True)
    assert reg["x"] is int


@pytest.mark.parametrize("name", ["", "a:b", "two words", "tab\there", 3])
def test_names_are_plain_words(name):
    reg: Registry[int] = Registry("widget")
    with pytest.raises(AutomtlError, match="is not a widget name; use a plain name without ':'"):
        reg.register(name, 1)
    assert name not in reg


def test_builtins_final_unregister_and_snapshot():
    reg: Registry[int] = Registry("widget", builtins_final=True)
    reg.register("core", 1, aliases=["c"], builtin=True)
    aliases = reg.aliases
    for name in ("core", "c"):
        with pytest.raises(AutomtlError, match=f"'{name}' is a built-in name"):
            reg.register(name, 2, replace=True)
    with pytest.raises(AutomtlError, match="built-in widget; it cannot be removed"):
        reg.unregister("core")
    with reg.snapshot():
        reg.register("extra", 3, aliases=["e"])
        assert reg["e"] == 3 and aliases["e"] == "extra"
        reg.unregister("extra")
        assert "extra" not in reg and "e" not in aliases
        reg.register("extra", 4)
    assert list(reg) == ["core"] and dict(aliases) == {"c": "core"} and reg.is_builtin("c")
    with pytest.raises(AutomtlError, match="unknown widget 'extra'"):
        reg.unregister("extra")
    open_reg: Registry[int] = Registry("widget")
    open_reg.register("core", 1, builtin=True)
    open_reg.register("core", 2, replace=True)
    assert open_reg["core"] == 2 and not open_reg.is_builtin("core")


def test_check_runs_on_register_and_on_lazy_resolution():
    seen = []

    def check(name: str, entry: object) -> None:
        seen.append(name)
        if not (isinstance(entry, type) and issubclass(entry, Exception)):
            raise AutomtlError(f"{name}: not an exception class")

    reg: Registry[type] = Registry("error", check=check)
    with pytest.raises(AutomtlError, match="x: not an exception class"):
        reg.register("x", int)
    reg.register_lazy("graph", "automtl_compiler.errors:GraphError")
    reg.register_lazy("bad", "automtl_compiler.errors:brief")
    assert seen == ["x"] and sorted(reg) == ["bad", "graph"]                        # nothing resolved yet
    assert reg.lookup("graph") is GraphError and reg.lookup("graph") is GraphError
    assert seen == ["x", "graph"]                                                    # resolved once
    with pytest.raises(AutomtlError, match="bad: not an exception class"):
        reg.lookup("bad")


@pytest.mark.parametrize("target", ["os.path:join", "json:loads", "automtl_compiler.errors", "automtl_compilerx:a"])
def test_lazy_entries_are_our_modules_only(target):
    with pytest.raises(ValueError, match="is not a module:attr path inside automtl_compiler"):
        Registry("widget").register_lazy("w", target)


@pytest.mark.parametrize("module", ["os", "json", "automtl_compilerx"])
def test_plugins_are_our_modules_only(module):
    with pytest.raises(ValueError, match="is not a module of automtl_compiler"):
        Registry("widget", plugins=[module])


def test_the_five_registries_share_the_idiom():
    from automtl_compiler.data import get_dataset
    from automtl_compiler.ir import REGISTRY as OPS
    from automtl_compiler.ir import get_op
    from automtl_compiler.nn.heads import create_head
    from automtl_compiler.tasks import get_task
    from automtl_compiler.train.schedulers import create

    assert {"conv2d", "tensor", "softplus", "mix"} <= set(OPS)                        # ops of every plugin module
    cases = [(lambda: create("imlt", ["a", "b"]), "unknown scheduler 'imlt' (did you mean 'imtl'?)"),
             (lambda: get_task("dpth"), "unknown task kind 'dpth' (did you mean 'depth'"),
             (lambda: get_dataset("nyu"), "unknown dataset 'nyu' (did you mean 'nyuv2'?)"),
             (lambda: create_head("asp", 8, 2), "unknown head type 'asp' (did you mean 'aspp'?)"),
             (lambda: get_op("conv3d", "node 'c'"), "node 'c': unknown op 'conv3d' (did you mean 'conv2d'?)")]
    for call, text in cases:
        with pytest.raises(AutomtlError) as err:
            call()
        assert text in str(err.value) and "available: " in str(err.value)
    with pytest.raises(GraphError):
        get_op("conv3d")
