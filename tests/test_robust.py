"""The callbacks never stop a fit over their own problems, errors name the argument to set, what the user reads is
right (relative log folders, reports that do not overwrite each other, warnings said once)."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer
from torch import nn

import lightning_recipe as lr
from lightning_recipe import Recipe, RecipeCheck, RecipeConfigError, RecipeWarning, collect_findings


def _recipe_warnings(record: list) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, RecipeWarning)]


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
    said = [m for m in _recipe_warnings(record) if "returned dict with keys ['foo']" in m]
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
    with pytest.warns(RecipeWarning, match=r"_ConfigAtStart: the probe needs `split_batch=`"):
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
