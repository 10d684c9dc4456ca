"""The callbacks never stop a fit over their own problems, errors name the argument to set, what the user reads is
right (relative log folders, reports that do not overwrite each other, warnings said once)."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from helpers import TinyModel, blobs, loader, trainer
from torch import nn

import lightning_recipe as lr
from lightning_recipe import Recipe, RecipeCheck, RecipeConfigError, RecipeSkipNotice, RecipeWarning, collect_findings


def _recipe_warnings(record: list) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RecipeWarning)]


def _skip_notices(record: list) -> list[str]:
    """A check that cannot run here says so once, as a RecipeSkipNotice (not a RecipeWarning: it is no alarm)."""
    return [str(w.message) for w in record if issubclass(w.category, RecipeSkipNotice)]


class _DictForward(TinyModel):
    """``forward`` returns a dict with a key no convention knows; the model has an ``nn.ReLU``."""

    def forward(self, x: torch.Tensor) -> dict:
        return {"foo": self.net(x)}

    def compute_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x)["foo"], y)


def test_recommended_never_stops_a_fit_whose_forward_gives_an_unknown_dict(tmp_path):
    x, y = blobs(256)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = trainer(tmp_path, lr.recommended(), max_steps=12)
        t.fit(_DictForward(), loader(x, y))
    assert t.global_step == 8  # one epoch of 256 / 32 batches: the fit ran to its end
    findings = {f.check: f for f in collect_findings(t)}
    # the dead-ReLU probe skips alone, naming the argument; the other optimisation checks went on
    assert findings["OptimizationHealthCheck.dead_relu"].status == "skip"
    assert "`forward=" in findings["OptimizationHealthCheck.dead_relu"].message
    assert findings["OptimizationHealthCheck.lr_schedule"].status == "pass"
    skipped = [f for f in collect_findings(t) if f.status == "skip" and "returned dict with keys ['foo']" in f.message]
    assert len(skipped) >= 6  # every check that needs the forward records its own skip
    said = [m for m in _skip_notices(record) if "returned dict with keys ['foo']" in m]
    assert not [m for m in _recipe_warnings(record) if "returned dict" in m]
    assert len(said) == 1  # ... and the user reads the reason once
    # strict() stops it at fit start instead, naming the argument
    with pytest.raises(RecipeConfigError, match="`forward="):
        trainer(tmp_path, lr.strict(), max_steps=12).fit(_DictForward(), loader(x, y))


class _ConfigAtStart(RecipeCheck):
    """A check whose fit-start probe raises a configuration error outside ``_context``."""

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        raise RecipeConfigError("the probe needs `split_batch=`")

    def on_train_batch_end(self, *args: Any) -> None:
        self.after = True  # never reached: switched off


def test_a_configuration_error_in_any_hook_of_a_warn_check_is_a_skip_finding(tmp_path):
    from lightning_recipe import LossDecreaseCheck

    probe, decrease = _ConfigAtStart(on_fail="warn"), LossDecreaseCheck(on_fail="warn")
    x, y = blobs(256)
    with pytest.warns(RecipeSkipNotice, match=r"_ConfigAtStart: the probe needs `split_batch=`"):
        t = trainer(tmp_path, [Recipe(callbacks=[probe, decrease])], max_steps=8)
        t.fit(TinyModel(), loader(x, y))
    assert t.global_step == 8 and not hasattr(probe, "after")
    assert [(f.status, f.message) for f in probe.findings] == [("skip", "_ConfigAtStart: the probe needs `split_batch=`")]
    assert len(decrease.losses) == 8
    with pytest.raises(RecipeConfigError, match="`split_batch=`"):  # in "raise" mode it stops the fit, as it should
        trainer(tmp_path, [Recipe(callbacks=[_ConfigAtStart(on_fail="raise")])], max_steps=8).fit(
            TinyModel(), loader(x, y))


@pytest.mark.parametrize("preset", ["strict", "recommended"])
def test_an_unwritable_recipe_folder_is_one_warning_and_the_checks_go_on(tmp_path, preset):
    (tmp_path / "recipe").write_text("a file where the folder should be")
    x, y = blobs(256)
    healthy = tmp_path / "healthy"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        t = trainer(tmp_path, getattr(lr, preset)(exclude=["ReproducibilityCheck"]), max_steps=8)
        t.fit(TinyModel(), loader(x, y))
        ok = trainer(healthy, lr.recommended(exclude=["ReproducibilityCheck"]), max_steps=8)
        ok.fit(TinyModel(), loader(x, y))
    said = [m for m in _recipe_warnings(record) if "cannot write" in m]
    assert len(said) == 1 and f"`{tmp_path / 'recipe'}`" in said[0]  # once, naming the path
    assert t.global_step == 8
    findings = collect_findings(t)
    # the same checks ran to the same conclusions as in a writable folder
    assert [(f.check, f.status) for f in findings] == [(f.check, f.status) for f in collect_findings(ok)]
    assert not any("switched off" in f.message for f in findings)
    assert (healthy / "recipe" / "report.json").exists() and (tmp_path / "recipe").is_file()


# -- 8: configuration problems name the argument, before the first step -------------------------------------------
class _Counting(TinyModel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps_run = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        return super().training_step(batch, batch_idx)


class _NoReduction(_Counting):
    def __init__(self) -> None:
        super().__init__(loss_fn=nn.CrossEntropyLoss(reduction="none"))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return self.loss_fn(self(x), y).mean()


class _TwoInputs(_Counting):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.net(torch.cat([a, b], 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        (a, b), y = batch
        return self.loss_fn(self(a, b), y)


class _ListOfDicts(_Counting):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        return self.loss_fn(self(torch.stack([e["x"] for e in batch])), torch.stack([e["y"] for e in batch]))


class _Strings(_Counting):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        return self(torch.randn(len(batch), 8)).sum()


def _bad_cases() -> dict[str, tuple]:
    from torch.utils.data import DataLoader

    x, y = blobs(128)

    def vector_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, t, reduction="none")

    return {
        "reduction_none": (_NoReduction, lambda: loader(x, y), {}, r"reduction='none'.*`loss_fn=`"),
        "vector_loss_fn": (_Counting, lambda: loader(x, y), {"loss_fn": vector_loss}, r"shape \(32,\).*`loss_fn=`"),
        "two_inputs": (_TwoInputs, lambda: DataLoader([((a[:4], a[4:]), b) for a, b in zip(x, y)], batch_size=32),
                       {}, r"missing 1 required positional argument.*`forward=lambda module, inputs: module\(\*inputs\)`"),
        "list_of_dicts": (_ListOfDicts, lambda: DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=32,
                                                           collate_fn=list), {}, r"list of 32 dicts.*`split_batch="),
        "strings": (_Strings, lambda: DataLoader(["a b c"] * 64, batch_size=32), {}, r"list of 32 strings.*`split_batch="),
        "task_contradicts_loss": (_Counting, lambda: loader(x, y), {"task": "regression"},
                                  r"`task='regression'` was given, but the loss CrossEntropyLoss is a multiclass"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_configuration_stops_strict_before_any_step_naming_the_argument(tmp_path, case):
    cls, make_loader, overrides, match = _bad_cases()[case]
    model = cls(in_dim=8) if cls is _TwoInputs else cls()
    bias = model.net[-1].bias.detach().clone()
    with pytest.raises(RecipeConfigError, match=match):
        trainer(tmp_path, lr.strict(**overrides), max_steps=4).fit(model, make_loader())
    assert model.steps_run == 0
    assert torch.equal(model.net[-1].bias.detach(), bias)  # nothing written before the error


class _BiasAtStart(Callback):
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.bias = pl_module.net[-1].bias.detach().clone()


def test_recommended_leaves_the_bias_alone_when_the_loss_is_unusable(tmp_path):
    x, y = blobs(128)
    model, seen = _NoReduction(), _BiasAtStart()
    bias = model.net[-1].bias.detach().clone()
    with pytest.warns(RecipeSkipNotice, match="reduction='none'"):
        t = trainer(tmp_path, [*lr.recommended(), seen], max_steps=4)
        t.fit(model, loader(x, y))
    assert torch.equal(seen.bias, bias)  # the finding says skipped, and the bias was indeed not rewritten
    head = [f for f in collect_findings(t) if f.check == "HeadBiasInit"]
    assert [f.status for f in head] == ["skip"] and model.steps_run == 4


def test_a_skip_reason_shared_by_several_checks_is_warned_once_per_fit(tmp_path):
    from torch.utils.data import DataLoader

    x, y = blobs(128)
    batches = DataLoader([{"pixels": a, "cls": b} for a, b in zip(x, y)], batch_size=32)

    class DictModel(TinyModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.loss_fn(self(batch["pixels"]), batch["cls"])

    for _ in range(2):  # a second fit of the same trainer warns again: the cache is per fit
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            t = trainer(tmp_path, lr.recommended(), max_steps=4)
            t.fit(DictModel(), batches)
        said = [m for m in _skip_notices(record) if "Cannot find inputs and targets" in m]
        assert len(said) == 1
        skipped = {f.check for f in collect_findings(t) if "Cannot find inputs and targets" in f.message}
        assert len(skipped) >= 7  # each check still records its skip


# -- 9: a preset nested in the callbacks list ------------------------------------------------------------------------
def test_a_preset_nested_in_the_callbacks_list_is_refused_at_construction_saying_to_unpack_it(tmp_path):
    import pickle

    from lightning.pytorch.callbacks import ModelCheckpoint

    with pytest.raises(RecipeConfigError, match=r"Lightning does not flatten nested lists.*\*lr\.strict\(\)"):
        trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path), lr.strict()], enable_checkpointing=True)
    # unpacked, alone, or joined with `+` it is the plain list it always was
    preset = lr.recommended()
    joined = trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path), *preset], enable_checkpointing=True)
    assert [type(cb).__name__ for cb in joined.callbacks if type(cb).__name__ in ("Recipe", "ModelCheckpoint")] == [
        "Recipe", "ModelCheckpoint"]
    assert isinstance(preset + [ModelCheckpoint()], list) and len(preset + [ModelCheckpoint()]) == 2
    assert not hasattr(preset, "no_such_attribute")
    assert [type(cb).__name__ for cb in pickle.loads(pickle.dumps(preset))] == ["Recipe"]
    x, y = blobs(128)
    alone = trainer(tmp_path, lr.recommended(exclude=["ReproducibilityCheck"]), max_steps=4)
    alone.fit(TinyModel(), loader(x, y))
    assert collect_findings(alone)


# -- 10: a relative log folder ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("logger", ["tensorboard", "none"])
def test_report_html_inlines_every_figure_with_a_relative_log_folder(tmp_path, monkeypatch, logger):
    from lightning.pytorch.loggers import TensorBoardLogger

    monkeypatch.chdir(tmp_path)
    x, y = blobs(256)
    kw: dict = {"logger": TensorBoardLogger("logs")} if logger == "tensorboard" else {"default_root_dir": "logs"}
    t = trainer("unused", lr.recommended(exclude=["ReproducibilityCheck"]), max_steps=16, **kw)
    t.fit(TinyModel(), loader(x, y))
    reports = list(tmp_path.rglob("report.html"))
    assert len(reports) == 1
    pngs = list(reports[0].parent.glob("*.png"))
    page = reports[0].read_text()
    assert len(pngs) >= 3 and page.count("data:image/png;base64") == len(pngs)
    assert "missing figure" not in page


def test_render_html_finds_figures_given_relative_to_the_working_directory_or_the_report(tmp_path, monkeypatch):
    from lightning_recipe.report.html import render_html

    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs" / "recipe").mkdir(parents=True)
    (tmp_path / "logs" / "recipe" / "a.png").write_bytes(b"\x89PNG a")
    (tmp_path / "logs" / "recipe" / "b.png").write_bytes(b"\x89PNG b")
    page = render_html([], ["logs/recipe/a.png", "b.png"], {}, "logs/recipe")
    assert page.count("data:image/png;base64") == 2 and "missing figure" not in page


# -- 15: what the user reads is right ---------------------------------------------------------------------------------
def test_a_second_fit_of_the_same_model_says_why_the_bias_is_kept(tmp_path):
    from lightning_recipe import HeadBiasInit

    x, y = blobs(128)
    model, init = TinyModel(), HeadBiasInit()
    trainer(tmp_path, [init], max_steps=2).fit(model, loader(x, y))
    assert [f.status for f in init.findings] == ["pass"]
    trainer(tmp_path, [init], max_steps=2).fit(model, loader(x, y))
    [skip] = init.findings
    assert skip.status == "skip" and "already set in an earlier fit of this model" in skip.message
    assert "checkpoint" not in skip.message  # none was used


def test_report_md_makes_html_from_names_inert():
    from lightning_recipe.findings import Finding
    from lightning_recipe.report.writers import render_markdown

    name = "<script>alert(1)</script>"
    md = render_markdown([Finding(f"Check{name}", "warn", f"key {name} is odd", causes=[name])], [f"/x/{name}.png"],
                         {"seed": name})
    assert "<script>" not in md and "&lt;script>alert(1)&lt;/script>" in md
    assert md.count("&lt;script>") == 6  # meta, the table's check and message, the heading, the message, the cause


def test_a_second_fit_into_the_same_folder_keeps_the_first_report(tmp_path, caplog):
    import logging

    x, y = blobs(128)
    first = trainer(tmp_path, lr.recommended(exclude=["ReproducibilityCheck"]), max_steps=2)
    first.fit(TinyModel(), loader(x, y))
    report = tmp_path / "recipe" / "report.json"
    before = report.read_text()
    with caplog.at_level(logging.INFO):
        second = trainer(tmp_path, lr.recommended(exclude=["ReproducibilityCheck"]), max_steps=3)
        second.fit(TinyModel(), loader(x, y))
    assert report.read_text() == before  # not overwritten
    again = json.loads((tmp_path / "recipe_1" / "report.json").read_text())
    assert again["meta"]["global_step"] == 3 and json.loads(before)["meta"]["global_step"] == 2
    assert all(str(tmp_path / "recipe_1") in p for p in again["figures"]) and again["figures"]
    said = [r.getMessage() for r in caplog.records if "report at" in r.getMessage()]
    assert said and "recipe_1" in said[-1] and "keeps the report of an earlier fit" in said[-1]


def test_a_standalone_warn_check_never_stops_a_fit_over_its_own_error(tmp_path):
    class Breaks(RecipeCheck):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            raise ZeroDivisionError("a bug at fit start")

        def on_train_batch_end(self, *args: Any) -> None:
            self.after = True  # never reached: switched off

    from lightning_recipe import LossDecreaseCheck

    broken, decrease = Breaks(on_fail="warn"), LossDecreaseCheck(on_fail="warn")
    x, y = blobs(256)
    with pytest.warns(RecipeWarning, match=r"Breaks: switched off .* `on_train_start` at test_robust.py:\d+: "
                                           "ZeroDivisionError: a bug at fit start"):
        t = trainer(tmp_path, [broken, decrease], max_steps=8)
        t.fit(TinyModel(), loader(x, y))
    assert t.global_step == 8 and not hasattr(broken, "after")
    assert [f.status for f in broken.findings] == ["skip"] and broken.findings[0].details["hook"] == "on_train_start"
    assert len(decrease.losses) == 8
    assert (tmp_path / "recipe" / "report.json").exists()  # the last check wrote the report
    # a probe forward that gives no tensor, in a standalone warn-mode check: a skip naming `forward=`, the fit goes on
    opt = lr.OptimizationHealthCheck(on_fail="warn", figure=False)
    t = trainer(tmp_path / "dict", [opt], max_steps=8)
    t.fit(_DictForward(), loader(x, y))
    assert t.global_step == 8 and "`forward=" in {f.check: f for f in opt.findings}[
        "OptimizationHealthCheck.dead_relu"].message
    # in "raise" mode the error stops the fit as before
    with pytest.raises(ZeroDivisionError):
        trainer(tmp_path / "raise", [Breaks(on_fail="raise")], max_steps=8).fit(TinyModel(), loader(x, y))
