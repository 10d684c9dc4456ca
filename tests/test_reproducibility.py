import warnings

import lightning as L
import numpy as np
import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer
from torch import nn

from lightning_recipe.exceptions import RecipeCheckError, RecipeWarning
from lightning_recipe.checks.reproducibility import ReproducibilityCheck


def _fit(tmp_path, model, dl, cb, steps=3):
    trainer(tmp_path, [cb], max_steps=steps).fit(model, dl)
    return {f.check.split(".")[-1]: f for f in cb.findings}


class _Dropout(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.net.insert(2, nn.Dropout(0.5))

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.log("train_loss", loss)  # dropped on the copies
        return loss


class _Unseeded(TinyModel):
    """Noise from numpy's OS-seeded generator: not controlled by any seed."""

    def training_step(self, batch, batch_idx):
        noise = float(np.random.default_rng().normal()) * 1e-3
        return self.compute_loss(batch) + noise


def test_no_seed_is_a_note_and_seed_passes(tmp_path, monkeypatch):
    x, y = blobs(128)
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    with warnings.catch_warnings():  # most healthy fits run unseeded: a note, never a warning
        warnings.simplefilter("error", RecipeWarning)
        f = _fit(tmp_path, TinyModel(), loader(x, y), ReproducibilityCheck())
    assert f["seed"].status == "note" and f["seed"].details["seed"] is None
    assert "no random seed was set" in f["seed"].message
    L.seed_everything(7, verbose=False)
    f = _fit(tmp_path, TinyModel(), loader(x, y), ReproducibilityCheck())
    assert f["seed"].status == "pass" and f["seed"].measured == 7.0


def test_verify_passes_for_seeded_dropout_and_is_bitwise(tmp_path):
    L.seed_everything(3, verbose=False)
    x, y = blobs(256)
    f = _fit(tmp_path, _Dropout(), loader(x, y), ReproducibilityCheck(verify=True))
    v = f["verify"]
    assert v.status == "pass" and v.measured == 0.0 and v.details["bitwise_identical"] and v.details["seed"] == 3
    # full batch without dropout: the verified loss is the model's loss on the whole (permuted) data at init
    L.seed_everything(3, verbose=False)
    model = TinyModel()
    expected = float(model.compute_loss((x, y)))
    f = _fit(tmp_path, model, loader(x, y, batch_size=256), ReproducibilityCheck(verify=True), steps=1)
    assert f["verify"].details["loss_a"] == pytest.approx(expected, rel=1e-6)


def test_verify_fails_for_unseeded_randomness(tmp_path):
    L.seed_everything(3, verbose=False)
    x, y = blobs(256)
    cb = ReproducibilityCheck(verify=True)
    with pytest.raises(RecipeCheckError, match="the same seed does not give the same first step") as err:
        _fit(tmp_path, _Unseeded(), loader(x, y), cb)
    v = cb.findings[-1]
    a, b = v.details["loss_a"], v.details["loss_b"]
    assert v.status == "fail" and v.measured >= abs(a - b) / max(abs(a), abs(b)) > 1e-6
    assert "numpy.random.default_rng()" in str(err.value)


def test_verify_leaves_training_bit_identical(tmp_path):
    x, y = blobs(256)
    weights = []
    for cbs in ([], [ReproducibilityCheck(verify=True)]):
        L.seed_everything(0, verbose=False)
        model = _Dropout()
        trainer(tmp_path, cbs, max_steps=5).fit(model, loader(x, y))
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))
