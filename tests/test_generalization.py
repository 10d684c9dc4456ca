"""GeneralizationCheck: transfer to validation data, overfitting onset, the bias/variance verdict."""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch
from helpers import TinyModel, loader, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_diabetes, load_digits
from torch import nn

import lightning_recipe as lr
from lightning_recipe.exceptions import RecipeCheckError, RecipeWarning


def _digits(n_train: int = 1200):
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, va = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[va], y[va]


def _fit(tmp_path, check, model, train, val, epochs, extra=(), **kw):
    t = trainer(tmp_path, [check, *extra], max_epochs=epochs, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, loader(*train), loader(*val, shuffle=False))
    return [w for w in caught if issubclass(w.category, RecipeWarning)]


def _by_check(check):
    return {f.check: f for f in check.findings}


def test_healthy_digits_transfers_with_a_note_verdict(tmp_path):
    torch.manual_seed(0)
    xt, yt, xv, yv = _digits()
    check = lr.GeneralizationCheck()
    recipe_warnings = _fit(tmp_path, check, TinyModel(64, 10, hidden=64), (xt, yt), (xv, yv), 4)
    assert not recipe_warnings
    f = _by_check(check)
    assert f["GeneralizationCheck.transfer"].status == "pass"
    verdict = f["GeneralizationCheck.verdict"]
    assert verdict.status == "note" and verdict.details["verdict"] in ("neither", "high variance")
    last = check.history[-1]
    assert last["val_acc"] > 0.9 and last["train_acc"] > 0.9
    # the constant prediction on the validation sample: the training prior's loss, near log(10) for balanced digits
    assert abs(last["val_prior"] - math.log(10)) < 0.05
    # the majority class of the training prior, scored on validation: the share of that class there
    assert abs(last["val_const_acc"] - 0.1) < 0.05
    assert any(p.endswith("generalization.png") for p in check.figures)


def test_labels_mapped_differently_on_validation_fail(tmp_path):
    torch.manual_seed(0)
    xt, yt, xv, yv = _digits()
    check = lr.GeneralizationCheck()
    with pytest.raises(RecipeCheckError, match="does not transfer"):
        _fit(tmp_path, check, TinyModel(64, 10, hidden=64), (xt, yt), (xv, (yv + 1) % 10), 4)
    f = _by_check(check)["GeneralizationCheck.transfer"]
    assert f.status == "fail" and f.details["val_acc"] < 0.2 and f.details["train_acc"] > 0.8


def test_validation_preprocessed_differently_fails(tmp_path):
    # validation standardised with other statistics: every feature offset by 5 of its training range
    torch.manual_seed(0)
    xt, yt, xv, yv = _digits()
    check = lr.GeneralizationCheck(on_fail="warn")
    recipe_warnings = _fit(tmp_path, check, TinyModel(64, 10, hidden=64), (xt, yt), (xv + 5.0, yv), 4)
    assert _by_check(check)["GeneralizationCheck.transfer"].status == "fail"
    assert any("does not transfer" in str(w.message) for w in recipe_warnings)


def test_regression_prior_is_the_validation_spread_around_the_training_mean(tmp_path):
    torch.manual_seed(0)
    d = load_diabetes()
    x = torch.tensor((d.data - d.data.mean(0)) / d.data.std(0), dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.float32).reshape(-1, 1)
    xt, yt, xv, yv = x[:350], y[:350], x[350:], y[350:]
    check = lr.GeneralizationCheck()
    recipe_warnings = _fit(tmp_path, check, TinyModel(10, 1, loss_fn=nn.MSELoss(), lr=3e-2), (xt, yt), (xv, yv), 20)
    assert not recipe_warnings
    last = check.history[-1]
    # closed form: MSE of the training mean on the (first 256) validation targets
    val = yv[:256].numpy().reshape(-1)
    expected = float(np.mean((val - yt.numpy().mean()) ** 2))
    assert last["val_prior"] == pytest.approx(expected, rel=1e-4)
    assert _by_check(check)["GeneralizationCheck.transfer"].status == "pass"
    assert last["val_loss"] < 0.7 * last["val_prior"]  # R^2 > 0.3 on held-out diabetes


def _noisy_small(seed: int = 0):
    """Few examples with 40% of the training labels flipped: a wide MLP memorises the noise."""
    xt, yt, xv, yv = _digits()
    g = torch.Generator().manual_seed(seed)
    xt, yt = xt[:150].clone(), yt[:150].clone()
    flip = torch.rand(len(yt), generator=g) < 0.4
    yt[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    return (xt, yt), (xv[:256], yv[:256])


def test_overfitting_warns_without_a_checkpoint_and_notes_with_one(tmp_path):
    train, val = _noisy_small()
    torch.manual_seed(0)
    check = lr.GeneralizationCheck(on_fail="warn")
    recipe_warnings = _fit(tmp_path / "a", check, TinyModel(64, 10, hidden=256, lr=1e-2), train, val, 30)
    f = _by_check(check)["GeneralizationCheck.overfit"]
    assert f.status == "warn" and any("overfits" in str(w.message) for w in recipe_warnings)
    best = f.details["best_epoch"]
    assert f.details["best_val_loss"] == pytest.approx(min(h["val_loss"] for h in check.history))
    assert check.history[-1]["val_loss"] > f.details["best_val_loss"] and best < check.history[-1]["epoch"]

    torch.manual_seed(0)
    check = lr.GeneralizationCheck(on_fail="warn")
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss")
    recipe_warnings = _fit(tmp_path / "b", check, TinyModel(64, 10, hidden=256, lr=1e-2), train, val, 30,
                           extra=[ckpt], enable_checkpointing=True)
    f = _by_check(check)["GeneralizationCheck.overfit"]
    assert f.status == "note" and "ModelCheckpoint(monitor='val_loss')" in f.message
    assert not any("overfits" in str(w.message) for w in recipe_warnings)


def test_without_validation_the_verdict_skips(tmp_path):
    torch.manual_seed(0)
    xt, yt, _, _ = _digits()
    check = lr.GeneralizationCheck()
    t = trainer(tmp_path, [check], max_epochs=1)
    t.fit(TinyModel(64, 10), loader(xt, yt))
    f = _by_check(check)["GeneralizationCheck.verdict"]
    assert f.status == "skip" and "val_dataloaders" in f.message


def test_bias_variance_closed_forms():
    from lightning_recipe.functional.generalization import bias_variance

    assert bias_variance(0.2, 0.3) == "neither"
    assert bias_variance(0.8, 0.85) == "high bias"
    assert bias_variance(0.1, 0.5) == "high variance"
    assert bias_variance(0.7, 1.2) == "high bias and high variance"


def test_state_round_trip():
    check = lr.GeneralizationCheck()
    check.history = [{"epoch": 0, "val_loss": 1.0}]
    check._transfer_done = True
    other = lr.GeneralizationCheck()
    other.load_state_dict(check.state_dict())
    assert other.history == check.history and other._transfer_done


def test_bad_arguments():
    with pytest.raises(lr.RecipeConfigError, match="patience"):
        lr.GeneralizationCheck(patience=0)
    with pytest.raises(lr.RecipeConfigError, match="min_rise"):
        lr.GeneralizationCheck(min_rise=0)


def test_worst_examples_find_flipped_validation_labels(tmp_path):
    torch.manual_seed(0)
    xt, yt, xv, yv = _digits()
    xv, yv = xv[:256], yv[:256].clone()
    flipped = torch.randperm(256, generator=torch.Generator().manual_seed(1))[:10]
    yv[flipped] = (yv[flipped] + 1) % 10
    check = lr.GeneralizationCheck(on_fail="warn")
    recipe_warnings = _fit(tmp_path, check, TinyModel(64, 10, hidden=64), (xt, yt), (xv, yv), 6)
    assert not recipe_warnings
    f = _by_check(check)["GeneralizationCheck.worst"]
    assert f.status == "note" and f.details["split"] == "validation" and len(f.details["losses"]) == 8
    found = set(f.details["label_issues"]) & set(flipped.tolist())
    assert len(found) >= 8, (f.details["label_issues"], flipped.tolist())
    # mislabelled examples carry the highest losses: at least 6 of the 8 worst are flipped ones
    assert len(set(f.details["positions"]) & set(flipped.tolist())) >= 6
    y0, pred0 = f.details["captions"][0].split()[:2]
    assert y0 != pred0.replace("pred", "y")  # the worst one is misclassified
    assert f.details["losses"] == sorted(f.details["losses"], reverse=True)
    assert any(p.endswith("worst_examples.png") for p in check.figures)
