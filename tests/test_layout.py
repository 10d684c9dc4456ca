"""The package's layout keeps its rules: modules under 600 lines, no check importing another, no import cycle, no
import of a module that moved away."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import layout  # noqa: E402


def test_the_layout_keeps_its_rules():
    table, problems = layout.check()
    assert problems == []
    names = [row.split()[1] for row in table]
    # the rooms of the house: conventions, pure math, checks, report
    for room in ("lightning_recipe._core", "lightning_recipe.functional", "lightning_recipe.checks",
                 "lightning_recipe.report"):
        assert room in names


def test_the_rules_catch_a_long_module_a_check_importing_a_check_a_cycle_and_a_stale_path(tmp_path):
    pkg = tmp_path / "lightning_recipe"
    (pkg / "checks").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "checks" / "__init__.py").write_text("")
    (pkg / "checks" / "a.py").write_text("from lightning_recipe.checks.b import X\n")
    (pkg / "checks" / "b.py").write_text("from lightning_recipe.findings import Y\nX = 1\n")
    (pkg / "checks" / "c.py").write_text("def f():\n    from lightning_recipe.data_checks import DataCheck\n")
    (pkg / "findings.py").write_text("from lightning_recipe.checks import b\n" + "Y = 1\n" * 601)
    _, problems = layout.check(str(tmp_path))
    assert any("findings: 602 lines" in p for p in problems)
    assert any("checks.a imports the check module lightning_recipe.checks.b" in p for p in problems)
    assert any(p.startswith("import cycle") and "findings" in p for p in problems)
    assert any("checks.c imports lightning_recipe.data_checks, which is not a module" in p for p in problems)


def test_preflight_finds_the_checks_it_looks_up_by_module_path():
    from lightning_recipe import BatchIndependenceCheck, InputDependenceCheck
    from lightning_recipe.preflight import preflight_callbacks

    callbacks = preflight_callbacks(100, causal=True)
    (batch,) = [cb for cb in callbacks if isinstance(cb, BatchIndependenceCheck)]
    (inputs,) = [cb for cb in callbacks if isinstance(cb, InputDependenceCheck)]
    assert batch.causal is True  # the short run's own settings, not the preset's
    assert inputs.after_steps == 100
