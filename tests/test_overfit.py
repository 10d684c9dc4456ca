import math
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyModel, blobs, loader, regression_data
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_recipe.overfit import overfit_one_batch


class SoftmaxClassifier(TinyModel):
    """Double softmax: cross-entropy on probabilities cannot go below log(e + C - 1) - 1."""

    def forward(self, x):
        return F.softmax(self.net(x), dim=1)


class IgnoresInput(TinyModel):
    def __init__(self):
        super().__init__()
        self.const = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.const + 0.0 * self.net(x)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_healthy_classifier_fits_and_nothing_changes(tmp_path):
    x, y = blobs(n=64)
    model = TinyModel()
    before = _state(model)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    f = overfit_one_batch(model, loader(x, y), num_examples=8, steps=100, directory=str(tmp_path))
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random state is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # so is the caller's model
    assert f.status == "pass", f.message
    d = f.details
    assert d["accuracy"] == 1.0 and d["num_examples"] == 8 and d["steps"] == 100
    assert d["floor"] == 0.0 and d["threshold"] == pytest.approx(0.05 * d["prior_loss"])
    assert f.measured == d["final_loss"] < d["threshold"] < d["initial_loss"]
    assert len(d["train_losses"]) == 100
    assert os.path.isfile(d["figure"]) and d["figure"].endswith("overfit_one_batch.png")


def test_double_softmax_cannot_overfit(tmp_path):
    x, y = blobs(n=64)
    f = overfit_one_batch(SoftmaxClassifier(), loader(x, y), num_examples=8, steps=100)
    assert f.status == "fail" and "did not reach near its minimum" in f.message
    bound = math.log(math.e + 3) - 1  # cross-entropy of a one-hot probability vector read as logits, C = 4
    assert f.measured >= bound - 1e-4 and f.measured > f.expected
    assert f.details["accuracy"] == 1.0  # the argmax is right: only the loss betrays the bug


def test_model_ignoring_input_cannot_overfit():
    x, y = blobs(n=64)
    f = overfit_one_batch(IgnoresInput(), loader(x, y), num_examples=8, steps=100, lr=0.1)
    assert f.status == "fail" and "predictions do not match the labels" in f.message
    # the best an input-independent model can do is the label prior of these 8 examples
    prior = f.details["prior_loss"]
    assert prior - 1e-5 <= f.measured <= prior + 0.02 and f.details["accuracy"] < 1.0


def test_regression_and_datamodule(tmp_path):
    x, y = regression_data(n=64, mean=5.0, scale=2.0)

    class DM(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(TensorDataset(x, y), batch_size=16)

    f = overfit_one_batch(TinyModel(out_dim=1, loss_fn=nn.MSELoss()), DM(), num_examples=6, steps=100, lr=3e-2,
                          directory=str(tmp_path))
    assert f.status == "pass", f.message
    var = float(y[:6].var(unbiased=False))
    assert f.details["prior_loss"] == pytest.approx(var, rel=1e-4)  # MSE of the mean of these 6 targets
    assert f.details["R²"] >= 0.95 and f.measured <= 0.05 * var


def test_unreadable_batch_is_a_skip():
    f = overfit_one_batch(TinyModel(), {"a": 1})
    assert f.status == "skip"
