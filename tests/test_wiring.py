"""WiringCheck: unregistered tensors, unshuffled sorted batches, the loss on another layout, framework warnings."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from helpers import TinyModel, blobs, loader, regression_data, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from lightning_recipe import RecipeCheckError, RecipeWarning, WiringCheck
from lightning_recipe.functional.wiring import expected_distinct_classes, shuffle_test


def _fit(tmp_path, model, train, epochs=1, check=None, **kw):
    check = check or WiringCheck(on_fail="warn")
    t = trainer(tmp_path, [check], max_epochs=epochs, **kw)
    with warnings.catch_warnings(record=True):  # shown to a list, not the console (the tap still sees them)
        warnings.simplefilter("always")
        t.fit(model, train)
    return {f.check.split(".")[-1]: f for f in check.findings}


# -- unregistered ----------------------------------------------------------------------------------------------------
class _ListLayers(TinyModel):
    """Hidden layers kept in a Python list: used in forward, never trained."""

    def __init__(self):
        super().__init__()
        self.blocks = [nn.Linear(8, 8), nn.ReLU()]

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.net(x)


class _TensorInForward(TinyModel):
    def forward(self, x):
        scale = torch.ones(8, requires_grad=True)  # meant as a learned scale: a new tensor at every step
        return self.net(x * scale)


class _Healthy(TinyModel):
    """BatchNorm, tensors built in forward without requires_grad, and an input made to require a gradient (a
    gradient penalty on the inputs)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        mask = (torch.arange(8) < 6).float()  # built in forward, no gradient: fine
        return self.net(x * mask + torch.zeros(8))

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.clone().requires_grad_(True)
        out = self(x)
        (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return self.loss_fn(out, y) + 1e-3 * g.pow(2).mean()


def test_unregistered_layers_in_a_list_fail_with_their_path(tmp_path):
    x, y = blobs(128)
    found = _fit(tmp_path, _ListLayers(), loader(x, y))
    f = found["unregistered"]
    assert f.status == "fail" and f.measured == 2.0  # weight and bias of the hidden Linear
    assert "`blocks[0].weight`" in f.message and "`blocks[0].bias`" in f.message and "nn.ModuleList" in f.message
    with pytest.raises(RecipeCheckError, match="WiringCheck.unregistered"):
        trainer(tmp_path, [WiringCheck()], max_epochs=1).fit(_ListLayers(), loader(x, y))


def test_a_tensor_created_with_requires_grad_in_forward_fails(tmp_path):
    x, y = blobs(128)
    f = _fit(tmp_path, _TensorInForward(), loader(x, y))["unregistered"]
    assert f.status == "fail" and f.measured == 1.0 and "(8,) tensor created in forward" in f.message


def test_healthy_models_have_every_leaf_registered(tmp_path):
    x, y = blobs(128)
    f = _fit(tmp_path, _Healthy(), loader(x, y))["unregistered"]
    assert f.status == "pass", f.message
    assert f.details["parameters"] == 6  # two Linear (weight, bias) and the BatchNorm's weight and bias
    assert f.details["leaves"] == 7
    assert "input-like" in f.message  # the batch input made to require a gradient is not counted


class _ListInOptimizer(_ListLayers):
    """The hidden layers are handed to the optimizer by hand: trained, but never saved in a checkpoint."""

    def configure_optimizers(self):
        return torch.optim.Adam([*self.parameters(), *self.blocks[0].parameters()], lr=1e-2)


def test_hidden_layers_held_by_the_optimizer_warn(tmp_path):
    x, y = blobs(128)
    check = WiringCheck(on_fail="raise")  # a warning, not a failure, even in raise mode
    with pytest.warns(RecipeWarning, match="checkpoints leave them out"):
        trainer(tmp_path, [check], max_epochs=1).fit(_ListInOptimizer(), loader(x, y))
    f = next(f for f in check.findings if f.check == "WiringCheck.unregistered")
    assert f.status == "warn" and f.measured == 2.0 and "`blocks[0].weight`" in f.message


# -- shuffle ----------------------------------------------------------------------------------------------------------
def _sorted_blobs(n=512):
    x, y = blobs(n)
    order = torch.argsort(y, stable=True)
    return x[order], y[order]


def test_sorted_unshuffled_batches_fail_against_the_closed_form(tmp_path):
    x, y = _sorted_blobs()
    found = _fit(tmp_path, TinyModel(), loader(x, y, shuffle=False))
    f = found["shuffle"]
    assert f.status == "fail" and "shuffle=True" in f.message
    counts = torch.bincount(y, minlength=4).double()
    n = float(counts.sum())
    # E[D] = sum_c 1 - C(N - n_c, 32) / C(N, 32)
    closed = sum(1 - math.exp(math.lgamma(n - c + 1) - math.lgamma(n - c - 32 + 1) - math.lgamma(n + 1)
                              + math.lgamma(n - 32 + 1)) for c in counts.tolist())
    batches = [len(set(y[i * 32 : (i + 1) * 32].tolist())) for i in range(8)]
    assert f.details["distinct"] == batches and max(batches) <= 2 and batches.count(1) >= 6
    assert f.details["expected_distinct"][0] == pytest.approx(closed, abs=1e-3)
    assert closed == pytest.approx(expected_distinct_classes(counts, 32)) and closed > 3.99
    assert f.measured == pytest.approx(sum(batches) / 8) and f.expected == pytest.approx(closed, abs=1e-3)
    assert f.details["z"] > 6  # far below what a random order gives


def test_well_mixed_sequential_and_balanced_sampler_pass(tmp_path):
    x, y = blobs(512)  # stored in a random order, read sequentially
    f = _fit(tmp_path / "seq", TinyModel(), loader(x, y, shuffle=False))["shuffle"]
    assert f.status == "pass" and "SequentialSampler" in f.message
    assert f.measured == pytest.approx(f.expected, abs=0.5)  # about 4 classes per batch, as a random order gives
    xs, ys = _sorted_blobs()
    weights = 1.0 / torch.bincount(ys).double()[ys]
    sampler = WeightedRandomSampler(weights, num_samples=512, generator=torch.Generator().manual_seed(0))
    dl = DataLoader(TensorDataset(xs, ys), batch_size=32, sampler=sampler)
    f = _fit(tmp_path / "weighted", TinyModel(), dl)["shuffle"]
    assert f.status == "pass" and "WeightedRandomSampler" in f.message


def test_sorted_binary_labels_fail_and_regression_is_skipped(tmp_path):
    x, y = _sorted_blobs()
    yb = (y >= 2).float().unsqueeze(1)
    f = _fit(tmp_path / "bin", TinyModel(out_dim=1, loss_fn=nn.BCEWithLogitsLoss()), loader(x, yb, shuffle=False))
    assert f["shuffle"].status == "fail" and f["shuffle"].details["p_all_single"] < 1e-6
    xr, yr = regression_data(256)
    f = _fit(tmp_path / "reg", TinyModel(out_dim=1, loss_fn=nn.MSELoss()), loader(xr, yr, shuffle=False))
    assert f["shuffle"].status == "skip" and "regression" in f["shuffle"].message


def test_shuffle_test_numbers():
    counts = torch.tensor([300.0, 100.0])
    assert expected_distinct_classes(counts, 1) == pytest.approx(1.0)
    # one batch of 4 from 3:1 classes: P(one class) = (C(300, 4) + C(100, 4)) / C(400, 4)
    p = (math.comb(300, 4) + math.comb(100, 4)) / math.comb(400, 4)
    res = shuffle_test(torch.tensor([[4.0, 0.0]]), counts)
    assert res["p_all_single"] == pytest.approx(p, rel=1e-9) and not res["sorted"]  # single-class batches are common
    assert shuffle_test(torch.tensor([[32.0, 0.0]] * 8), counts)["sorted"]


# -- loss layout -----------------------------------------------------------------------------------------------------
class _Segmenter(TinyModel):
    """A conv segmentation net: (N, 1, 8, 8) images, (N, 3, 8, 8) logits, (N, 8, 8) targets."""

    def __init__(self, permute: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 3, 1))
        self.permute = permute

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        flat = out.permute(0, 2, 3, 1).reshape(-1, 3) if self.permute else out.view(-1, 3)
        return self.loss_fn(flat, y.reshape(-1))


def _pixels(n=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    return x, (x[:, 0] > 0.5).long() + (x[:, 0] > -0.5).long()


@pytest.mark.parametrize("permute", [True, False])
def test_per_pixel_loss_layout(tmp_path, permute):
    x, y = _pixels()
    f = _fit(tmp_path, _Segmenter(permute), loader(x, y))["loss_layout"]
    if permute:
        assert f.status == "pass" and "class dim 1" in f.message, f.message
    else:
        assert f.status == "fail" and "mixes the scores of different positions" in f.message
        # both numbers are named: training_step's loss and the same loss on the model's own layout
        assert f.measured == pytest.approx(f.details["loss_module_value"], rel=1e-6)
        assert f.expected is not None and f.expected != f.measured


class _Column(TinyModel):
    def __init__(self, squeeze: bool):
        super().__init__(out_dim=1, loss_fn=nn.MSELoss())
        self.squeeze = squeeze

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return self.loss_fn(out.squeeze(1) if self.squeeze else out, y)


@pytest.mark.parametrize("squeeze", [True, False])
def test_n1_predictions_against_n_targets(tmp_path, squeeze):
    x, y = regression_data(128, mean=0.0, scale=1.0)
    f = _fit(tmp_path, _Column(squeeze), loader(x, y[:, 0]))["loss_layout"]
    if squeeze:
        assert f.status == "pass", f.message
    else:
        assert f.status == "fail" and "broadcast to (32, 32)" in f.message
        assert "PyTorch warned" in f.message  # torch's own broadcast warning became part of the finding


class _Sequence(TinyModel):
    """(T, N, C) time-major logits; the broken loss flattens them against batch-major targets."""

    def __init__(self, transpose: bool):
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(6, 16), nn.Linear(16, 6))
        self.transpose = transpose

    def forward(self, x):
        return self.net(x.t())

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        out = out.transpose(0, 1) if self.transpose else out
        return self.loss_fn(out.reshape(-1, 6), y.reshape(-1))


@pytest.mark.parametrize("transpose", [True, False])
def test_time_major_against_batch_major_targets(tmp_path, transpose):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (128, 10), generator=g)
    f = _fit(tmp_path, _Sequence(transpose), loader(x, (x + 1) % 6))["loss_layout"]
    if transpose:
        assert f.status == "pass" and "time-major" in f.message, f.message
    else:
        assert f.status == "fail" and "paired with the targets in another order" in f.message


# -- framework warnings ----------------------------------------------------------------------------------------------
class _NoReturn(TinyModel):
    def training_step(self, batch, batch_idx):
        self.compute_loss(batch)  # `return` forgotten


class _SchedulerFirst(TinyModel):
    """Manual optimization that steps the scheduler before the optimizer."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt, sch = self.optimizers(), self.lr_schedulers()
        sch.step()
        loss = self.compute_loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        warnings.warn("a user warning", UserWarning)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]


def test_training_step_returning_none_fails(tmp_path):
    x, y = blobs(128)
    found = _fit(tmp_path, _NoReturn(), loader(x, y))
    f = found["framework"]
    assert f.status == "fail" and "returned no loss at every one of the first 4 batch(es)" in f.message
    assert found["unregistered"].status == "skip"


def test_scheduler_before_optimizer_warns_and_user_warnings_are_still_shown(tmp_path):
    x, y = blobs(128)
    check = WiringCheck(on_fail="warn")
    t = trainer(tmp_path, [check], max_epochs=1)
    shown: list[str] = []
    real = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda m, *a, **k: shown.append(str(m))
        try:
            t.fit(_SchedulerFirst(), loader(x, y))
        finally:
            warnings.showwarning = real
    f = next(f for f in check.findings if f.check == "WiringCheck.framework")
    assert f.status == "warn" and "scheduler was stepped before its optimizer" in f.message
    assert shown.count("a user warning") == 4  # every warning still reaches the console, the tap only listens
    assert any("Detected call of `lr_scheduler.step()`" in s for s in shown)
    assert warnings.showwarning is real


class _Overflow(TinyModel):
    def training_step(self, batch, batch_idx):
        return self.compute_loss(batch) * float("inf")


def test_grad_scaler_skipping_every_step_fails(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    x, y = blobs(512)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    found = _fit(tmp_path, _Overflow(), loader(x, y), plugins=[plugin])
    f = found["framework"]
    assert f.status == "fail" and "GradScaler skipped all 8 optimizer steps" in f.message
    assert f.measured == 0.0 and f.expected == 8.0


def test_healthy_fit_passes_every_rule(tmp_path):
    x, y = blobs(512)
    found = _fit(tmp_path, TinyModel(), loader(x, y))
    assert {k: f.status for k, f in found.items()} == {
        "unregistered": "pass", "shuffle": "pass", "loss_layout": "pass", "framework": "pass"}
    assert found["framework"].measured == found["framework"].expected == 8.0


# -- observer effect ------------------------------------------------------------------------------------------------
class _Noisy(TinyModel):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))


def test_weights_are_bit_identical_with_and_without_the_check(tmp_path):
    x, y = blobs(256)

    def run(callbacks: list[Any]) -> dict[str, torch.Tensor]:
        L.seed_everything(0, verbose=False)
        model = _Noisy()
        t = trainer(tmp_path, callbacks, max_epochs=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(model, loader(x, y, batch_size=16))
        return {**dict(model.named_parameters()), **dict(model.named_buffers())}

    plain, watched = run([]), run([WiringCheck()])
    assert [k for k in plain if not torch.equal(plain[k], watched[k])] == []


def test_bad_arguments():
    from lightning_recipe import RecipeConfigError

    with pytest.raises(RecipeConfigError, match="`batches` must be a positive int"):
        WiringCheck(batches=0)


def test_preflight_sees_framework_warnings(tmp_path):
    """preflight silences the fit's warnings by recording them, so the tap still sees them."""
    from lightning_recipe.preflight import preflight

    x, y = blobs(320)

    class Model(_SchedulerFirst):
        def train_dataloader(self):
            return loader(x, y)

    result = preflight(Model(), steps=10, overfit_steps=0, output=str(tmp_path))
    f = next(f for f in result.findings if f.check == "WiringCheck.framework")
    assert f.status == "warn" and "Detected call of `lr_scheduler.step()`" in f.message
