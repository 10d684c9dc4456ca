"""strict(), recommended() and the composite ``Recipe`` callback."""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from helpers import TinyModel, blobs, loader, trainer
from lightning_recipe.exceptions import RecipeCheckError, RecipeConfigError, RecipeWarning
from lightning_recipe.findings import collect_findings
from lightning_recipe.checks.head_bias import HeadBiasInit
from lightning_recipe._core.base import RecipeCheck
from lightning_recipe.presets import Recipe, _hooks, recommended, strict


class _Recorder(Callback):
    """Records every hook Lightning calls, with the stage for setup/teardown."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        self.calls.append("state_dict")
        return {"n": len(self.calls)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.calls.append(f"load_state_dict:{state_dict['n']}")


def _recording(hook: str):
    def record(self: _Recorder, trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> None:
        stage = kwargs.get("stage", args[0] if args else "")
        self.calls.append(f"{hook}:{stage}" if hook in ("setup", "teardown") else hook)

    return record


for _h in _hooks():
    setattr(_Recorder, _h, _recording(_h))


class _Model(TinyModel):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.compute_loss(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def _run_all_stages(tmp_path, callback: Callback) -> None:
    x, y = blobs(64)
    model = _Model()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    t = trainer(tmp_path, [callback, ckpt], max_epochs=2, limit_val_batches=1, enable_checkpointing=True)
    t.fit(model, loader(x, y), loader(x, y, shuffle=False))
    t = trainer(tmp_path, [callback], max_epochs=3, limit_val_batches=1)
    t.fit(model, loader(x, y), loader(x, y, shuffle=False), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    t.validate(model, loader(x, y, shuffle=False), verbose=False)
    t.test(model, loader(x, y, shuffle=False), verbose=False)
    t.predict(model, loader(x, y, shuffle=False))

    def boom(*args: Any) -> None:
        raise ValueError("boom")

    model.training_step = boom  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="boom"):
        trainer(tmp_path, [callback], max_epochs=1).fit(model, loader(x, y))


def test_recipe_forwards_every_hook_like_a_direct_callback(tmp_path):
    direct = _Recorder()
    _run_all_stages(tmp_path / "direct", direct)
    child = _Recorder()
    recipe = Recipe(callbacks=[child])
    _run_all_stages(tmp_path / "nested", recipe)
    assert child.calls == direct.calls
    # every hook of Lightning's Callback, checkpoint state and the exception path included, reached the child
    called = {c.split(":")[0] for c in child.calls}
    assert called == set(_hooks()) | {"state_dict", "load_state_dict"}
    assert child.log == recipe.log  # the Trainer's `log` reaches the children


def _fit(tmp_path, callbacks, model=None, epochs=13, seed=0):
    L.seed_everything(seed, verbose=False)
    x, y = blobs(256, priors=[0.55, 0.25, 0.15, 0.05])
    model = model or TinyModel()
    t = trainer(tmp_path, callbacks, max_epochs=epochs)
    t.fit(model, loader(x, y))
    return t, model, y


def test_recipe_equals_the_strict_list_and_writes_the_report(tmp_path):
    t_list, _, _ = _fit(tmp_path / "list", Recipe("strict").callbacks)  # the same checks as separate callbacks
    recipe = Recipe(preset="strict")
    t_rec, model, y = _fit(tmp_path / "recipe", [recipe])
    listed, nested = collect_findings(t_list), collect_findings(t_rec)
    assert [(f.check, f.status) for f in nested] == [(f.check, f.status) for f in listed]
    assert [f.measured for f in nested] == [f.measured for f in listed]
    assert {f.check for f in nested} >= {"HeadBiasInit", "InitialLossCheck", "LossDecreaseCheck", "PredictionDynamics"}
    assert not any(f.failed for f in nested)
    # the bias was set to the log class frequencies (up to a shared constant)
    counts = torch.bincount(y, minlength=4).double()
    prior = torch.tensor(next(cb for cb in recipe.callbacks if type(cb).__name__ == "HeadBiasInit").prior, dtype=torch.float64)
    assert torch.allclose(prior - prior.mean(), counts.log() - counts.log().mean(), atol=1e-4)
    report = json.load(open(tmp_path / "recipe" / "recipe" / "report.json"))
    assert [f["check"] for f in report["findings"]] == [f.check for f in nested]
    assert report["summary"]["fail"] == 0
    assert any(p.endswith("loss_curve.png") for p in recipe.figures)
    assert (tmp_path / "recipe" / "recipe" / "report.html").exists()


def _broken_head() -> TinyModel:
    L.seed_everything(1, verbose=False)
    model = TinyModel()
    with torch.no_grad():
        model.net[2].weight.mul_(200.0)  # initial logits far too large
    return model


def test_recipe_strict_raises_and_still_writes_the_report(tmp_path):
    with pytest.raises(RecipeCheckError, match="InitialLossCheck"):
        _fit(tmp_path / "recipe", [Recipe()], model=_broken_head(), epochs=1)
    with pytest.raises(RecipeCheckError, match="InitialLossCheck"):
        _fit(tmp_path / "list", Recipe("strict").callbacks, model=_broken_head(), epochs=1)
    report = json.load(open(tmp_path / "recipe" / "recipe" / "report.json"))
    failed = [f for f in report["findings"] if f["status"] == "fail"]
    assert [f["check"] for f in failed] == ["InitialLossCheck"]
    assert failed[0]["measured"] > 4 * math.log(4)
    # the same report as the list of callbacks writes on the exception path
    listed = json.load(open(tmp_path / "list" / "recipe" / "report.json"))
    assert report["meta"]["state"] == listed["meta"]["state"]
    assert [(f["check"], f["status"], f["measured"]) for f in report["findings"]] == [
        (f["check"], f["status"], f["measured"]) for f in listed["findings"]
    ]


def test_recipe_recommended_warns_and_goes_on(tmp_path):
    recipe = Recipe(preset="recommended")
    with pytest.warns(RecipeWarning, match="InitialLossCheck"):
        t, _, _ = _fit(tmp_path, [recipe], model=_broken_head(), epochs=2)
    assert t.global_step == 16
    assert [f.check for f in recipe.findings if f.failed] == ["InitialLossCheck"]
    assert all(cb.on_fail == "warn" for cb in recommended()[0].callbacks)


def test_recipe_state_round_trip_resumes_tracking(tmp_path):
    x, y = blobs(128)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = Recipe()
    t = trainer(tmp_path, [first, ckpt], max_epochs=2, enable_checkpointing=True)
    t.fit(TinyModel(), loader(x, y))
    saved = torch.load(str(tmp_path / "ckpt" / "last.ckpt"), weights_only=False)["callbacks"][first.state_key]
    assert set(saved["children"]) >= {"HeadBiasInit", "InitialLossCheck", "LossDecreaseCheck", "PredictionDynamics"}
    assert len(saved["children"]["LossDecreaseCheck"]["losses"]) == 8
    second = Recipe()
    t = trainer(tmp_path, [second], max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RecipeWarning)
        t.fit(TinyModel(), loader(x, y), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    head = next(cb for cb in second.callbacks if isinstance(cb, HeadBiasInit))
    decrease = next(cb for cb in second.callbacks if type(cb).__name__ == "LossDecreaseCheck")
    assert isinstance(head, HeadBiasInit) and head.done
    assert [f.status for f in head.findings] == ["skip"]  # the bias is not set again on a resume
    assert len(decrease.losses) == 12  # 8 restored + 4 of the third epoch


def test_recipe_overrides_reach_every_child():
    split = lambda batch: (batch[0], batch[1])  # noqa: E731
    recipe = Recipe(preset="recommended", split_batch=split, head="net.2", task="multiclass")
    for cb in recipe.callbacks:
        assert cb.on_fail == "warn"
        assert cb._settings.split_batch is split and cb._settings.head == "net.2" and cb._settings.task == "multiclass"
    for cb in strict(head=nn.Linear(2, 2))[0].callbacks:
        assert cb.on_fail == "raise" and isinstance(cb._settings.head, nn.Linear)


def test_recipe_rejects_conflicting_arguments():
    with pytest.raises(RecipeConfigError, match="`callbacks` was given together with `preset`"):
        Recipe("strict", callbacks=[HeadBiasInit()])
    with pytest.raises(RecipeConfigError, match="`preset` must be one of"):
        Recipe("loose")  # type: ignore[arg-type]
    assert Recipe().preset == "strict"


def test_presets_are_one_recipe_holding_every_check():
    from lightning_recipe.presets import _CHECKS

    for preset, on_fail in ((strict, "raise"), (recommended, "warn")):
        (recipe,) = preset()
        assert isinstance(recipe, Recipe)
        assert [type(cb) for cb in recipe.callbacks] == list(_CHECKS) and len(set(_CHECKS)) == len(_CHECKS) >= 13
        assert {cb.on_fail for cb in recipe.callbacks} == {on_fail}


def test_exclude_leaves_checks_out_by_class_or_name():
    from lightning_recipe.checks.batch_independence import BatchIndependenceCheck

    from lightning_recipe.presets import _CHECKS

    kinds = [type(cb).__name__ for cb in strict(exclude=[BatchIndependenceCheck, "HeadBiasInit"])[0].callbacks]
    assert len(kinds) == len(_CHECKS) - 2 and "BatchIndependenceCheck" not in kinds and "HeadBiasInit" not in kinds
    with pytest.raises(RecipeConfigError, match="`exclude` names \\['HeadBias'\\]"):
        recommended(exclude=["HeadBias"])
    with pytest.raises(RecipeConfigError, match="together with `exclude`"):
        Recipe(callbacks=[HeadBiasInit()], exclude=["HeadBiasInit"])


class _Counting(Callback):
    def __init__(self) -> None:
        self.n = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.n += 1


def test_recipe_calls_only_the_children_that_implement_a_hook(tmp_path):
    """Lightning dispatches each hook once to the Recipe, which calls only the children that implement it."""
    counting, idle = _Counting(), Callback()
    recipe = Recipe(callbacks=[idle, counting])
    x, y = blobs(64)
    t = trainer(tmp_path, [recipe], max_epochs=1)
    t.fit(TinyModel(), loader(x, y))
    assert counting.n == t.global_step == 2  # 64 examples, batches of 32
    assert recipe._plan["on_train_batch_end"] == [counting]
    assert recipe._plan["on_before_zero_grad"] == []
    assert recipe.state_key == Recipe("recommended", exclude=["HeadBiasInit"]).state_key == "Recipe"  # stable
    # a hook replaced on a child, or set to None, is honoured at the next call (Lightning skips a None hook too)
    seen: list[str] = []
    counting.on_train_batch_end = lambda *a: seen.append("replaced")  # type: ignore[method-assign]
    recipe.on_train_batch_end(t, t.lightning_module, None, None, 0)
    counting.on_train_batch_end = None  # type: ignore[assignment]
    recipe.on_train_batch_end(t, t.lightning_module, None, None, 0)
    assert seen == ["replaced"]
    from lightning_recipe.presets import _CHECKS

    assert len(strict(exclude="HeadBiasInit")[0].callbacks) == len(_CHECKS) - 1  # one check given alone


def test_recipe_writes_the_report_once_on_the_exception_path(tmp_path, monkeypatch):
    import lightning_recipe._core.base as base

    writes: list[str] = []
    real = base._write_reports
    monkeypatch.setattr(base, "_write_reports", lambda *a, **k: writes.append("report") or real(*a, **k))
    with pytest.raises(RecipeCheckError, match="InitialLossCheck"):
        _fit(tmp_path, [Recipe("strict")], model=_broken_head(), epochs=1)
    assert writes == ["report"]
    assert json.load(open(tmp_path / "recipe" / "report.json"))["meta"]["state"] == "stopped by an error"


def test_recipe_resumes_from_a_checkpoint_of_separate_checks(tmp_path):
    """A checkpoint written with the checks as separate callbacks (each under its own key) resumes a Recipe."""
    x, y = blobs(128)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    t = trainer(tmp_path, [*Recipe("strict").callbacks, ckpt], max_epochs=2, enable_checkpointing=True)
    t.fit(TinyModel(), loader(x, y))
    resumed = Recipe("recommended")  # another preset: the same key
    t = trainer(tmp_path, [resumed], max_epochs=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(TinyModel(), loader(x, y), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    decrease = next(cb for cb in resumed.callbacks if type(cb).__name__ == "LossDecreaseCheck")
    head = next(cb for cb in resumed.callbacks if isinstance(cb, HeadBiasInit))
    assert len(decrease.losses) == 12  # 8 restored + 4 of the third epoch
    assert head.done and [f.status for f in head.findings] == ["skip"]


def test_checks_done_with_their_steps_leave_the_per_batch_hooks(tmp_path):
    """A check whose per-batch work is over sets the hook to None; a per-batch hook left with no child is None on the
    Recipe, so Lightning skips it (no call, no profiler context); the next fit gets every hook back."""
    (recipe,) = recommended()
    by = {type(cb).__name__: cb for cb in recipe.callbacks}
    calls = {"start": 0, "backward": 0}
    real_start, real_backward = recipe.on_train_batch_start, recipe.on_before_backward
    x, y = blobs(256)
    t = trainer(tmp_path, [recipe], max_epochs=2)  # 16 steps
    t.fit(TinyModel(), loader(x, y))
    assert by["InitialLossCheck"].on_train_batch_start is None and by["InitialLossCheck"].on_train_batch_end is None
    assert by["ParameterUpdateCheck"].on_before_backward is None  # after its 5 steps
    assert by["LossDecreaseCheck"].on_train_batch_start is None  # only the first batch
    assert recipe.on_after_backward is None and recipe.on_before_zero_grad is None  # no child implements them
    assert recipe.on_train_batch_start is None and recipe.on_before_backward is None  # every child retired
    assert recipe._plan["on_before_optimizer_step"] == [by["OptimizationHealthCheck"]]
    assert by["LossDecreaseCheck"] in recipe._plan["on_train_batch_end"] and len(by["LossDecreaseCheck"].losses) == 16

    # Lightning calls a None hook no more: count the calls of the Recipe's own forwarders on a second model's fit,
    # which starts every check afresh (the first-step checks run again, so their hooks are back)
    def counted(key: str, fn: Any) -> Any:
        def hook(*args: Any, **kwargs: Any) -> None:
            calls[key] += 1
            fn(*args, **kwargs)
        return hook

    type(recipe).on_train_batch_start, type(recipe).on_before_backward = (
        counted("start", real_start.__func__), counted("backward", real_backward.__func__))
    try:
        t = trainer(tmp_path, [recipe], max_epochs=2)
        t.fit(TinyModel(), loader(x, y))
    finally:
        type(recipe).on_train_batch_start, type(recipe).on_before_backward = real_start.__func__, real_backward.__func__
    # the initial-loss check's first batch and the parameter check's 5 steps, plus the call at which the Recipe finds
    # the children's hooks None and leaves the hook
    assert calls == {"start": 2, "backward": 6}
    assert [f.status for f in by["InitialLossCheck"].findings] == ["pass"]


class _Breaks(RecipeCheck):
    """A check with a bug: it raises at its third training batch."""

    def __init__(self, on_fail: str = "warn") -> None:
        super().__init__(on_fail)
        self.batches = 0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        if self.batches == 3:
            raise ZeroDivisionError("a bug")

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.batches += 100  # never reached once switched off

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.torn_down = stage  # still reached: it releases what it holds


def test_an_internal_error_of_a_warn_check_switches_it_off_and_training_goes_on(tmp_path):
    from lightning_recipe import LossDecreaseCheck

    broken, decrease = _Breaks(), LossDecreaseCheck(on_fail="warn")
    recipe = Recipe(callbacks=[broken, decrease])
    x, y = blobs(256)
    with pytest.warns(RecipeWarning, match=r"_Breaks: switched off .* `on_train_batch_end` at test_presets.py:\d+: "
                                           "ZeroDivisionError: a bug"):
        t = trainer(tmp_path, [recipe], max_epochs=2)
        t.fit(TinyModel(), loader(x, y))
    assert t.global_step == 16 and broken.batches == 3  # training finished; the broken check was not called again
    assert broken.torn_down == "fit"
    assert [f.status for f in broken.findings] == ["skip"] and broken.findings[0].details["hook"] == "on_train_batch_end"
    assert len(decrease.losses) == 16 and decrease.findings  # the other check went on
    assert any(f["check"] == "_Breaks" for f in json.load(open(tmp_path / "recipe" / "report.json"))["findings"])
    # in "raise" mode (and a Recipe's own verdicts) the error is raised as it is
    with pytest.raises(ZeroDivisionError, match="a bug"):
        trainer(tmp_path, [Recipe(callbacks=[_Breaks(on_fail="raise")])], max_epochs=1).fit(TinyModel(), loader(x, y))
