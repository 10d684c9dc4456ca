"""Model families outside the calibration corpus (``benchmarks/blind.py``) that the conventions once misread: each
test is a small version of a healthy fit that was alarmed or harmed, and asserts what the recipe now does."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers import TinyModel, blobs, loader, trainer
import lightning_recipe as lr
from lightning_recipe._core.conventions import find_loss, run_forward
from lightning_recipe._core.labels import _private_loader


def _fit(tmp_path: Any, model: L.LightningModule, train: Any, val: Any = None, **kw: Any) -> tuple[L.Trainer, list]:
    t = trainer(tmp_path, lr.recommended(), **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, train, val)
    return t, [str(w.message) for w in caught if issubclass(w.category, lr.RecipeWarning)]


class Contrastive(TinyModel):
    """SimCLR-like: batches ``(x, class label)``, the forward gives a 32-d embedding through a ReLU projector, the
    loss is InfoNCE between two noisy views (targets ``arange`` within the batch): the labels are not its targets."""

    def __init__(self) -> None:
        super().__init__(out_dim=32)
        del self.loss_fn  # the loss is computed in training_step: the checks infer a cross-entropy from the labels

    def compute_loss(self, batch: Any) -> torch.Tensor:
        x, _ = batch
        z1 = F.normalize(self(x + 0.1 * torch.randn_like(x)), dim=1)
        z2 = F.normalize(self(x + 0.1 * torch.randn_like(x)), dim=1)
        logits = z1 @ z2.T / 0.2
        return F.cross_entropy(logits, torch.arange(len(x)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.compute_loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass


def test_an_embedding_wider_than_the_label_range_keeps_its_bias(tmp_path: Any) -> None:
    """Under a loss inferred from integer labels, 32 outputs for labels 0..3 are not logits over them: the head bias stays as initialised (before, a log-prior
    of -7.7 on the outputs no label reaches silenced the ReLU projector of a SimCLR fit and left it at chance)."""
    L.seed_everything(0)
    x, y = blobs(n=256, classes=4)
    model = Contrastive()
    bias0 = model.net[-1].bias.detach().clone()
    seen: list[torch.Tensor] = []

    class _AtFirstBatch(L.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if batch_idx == 0:
                seen.append(pl_module.net[-1].bias.detach().clone())

    t = trainer(tmp_path, [*lr.recommended(), _AtFirstBatch()], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, loader(x, y))
    assert torch.equal(seen[0], bias0)  # nothing written before training
    head = next(f for f in lr.collect_findings(t) if f.check == "HeadBiasInit")
    assert head.status == "skip" and "32 outputs for labels in [0, 3]" in head.message
    assert not [str(w.message) for w in caught if issubclass(w.category, lr.RecipeWarning)
                and "HeadBiasInit" in str(w.message)]


def test_a_loss_module_that_needs_a_third_tensor_is_not_taken_for_the_loss() -> None:
    """``GaussianNLLLoss(out, y, var)`` cannot be called as ``loss(out, y)``: it is not the loss the checks use (it
    switched off four checks with a TypeError); a two-argument loss beside it still is."""

    class Hetero(TinyModel):
        def __init__(self) -> None:
            super().__init__(out_dim=2)
            self.nll = nn.GaussianNLLLoss()

    m = Hetero()
    del m.loss_fn
    assert find_loss(m) is None
    m.criterion = nn.MSELoss()
    assert isinstance(find_loss(m), nn.MSELoss)


class _Graphs(Dataset):
    """One whole graph per item, as a dict: a loader with ``batch_size=None`` gives it as it is."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(20, 8, generator=g), "y": torch.randint(0, 3, (20,), generator=g)}


def test_the_private_loader_keeps_automatic_batching_off() -> None:
    """With ``batch_size=None`` each item is a batch: the checks' private loader yields the same items (it yielded
    lists of 32 uncollated dicts, which hid a validation set equal to the training set)."""
    user = DataLoader(_Graphs(), batch_size=None, shuffle=False)
    private = list(_private_loader(user, seed=0))
    assert len(private) == len(user) == 6
    assert all(isinstance(b, dict) and b["x"].shape == (20, 8) for b in private)
    assert sorted(float(b["x"].sum()) for b in private) == sorted(float(b["x"].sum()) for b in user)


@dataclass
class _Output:
    logits: torch.Tensor
    hidden: torch.Tensor


def test_an_output_object_gives_its_logits() -> None:
    """A Hugging Face-style output (a dataclass with ``.logits``) is read like a dict with that key."""

    class HF(TinyModel):
        def forward(self, x: torch.Tensor) -> _Output:  # type: ignore[override]
            h = self.net[:-1](x)
            return _Output(self.net[-1](h), h)

    m = HF()
    x = torch.randn(5, 8)
    assert torch.equal(run_forward(m, x), m.net(x))


def test_labels_offset_in_training_step_are_counted_from_the_smallest(tmp_path: Any) -> None:
    """Labels 5..8 (``y - 5`` in training_step) are four balanced classes: the count starts at 5, no class 0..4 of
    zero examples (before: largest/smallest = inf, a warning)."""

    class Offset(TinyModel):
        def compute_loss(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return self.loss_fn(self(x), y - 5)

    L.seed_everything(0)
    x, y = blobs(n=256, classes=4)
    t, warned = _fit(tmp_path, Offset(), loader(x, y + 5), max_epochs=1)
    balance = next(f for f in lr.collect_findings(t) if f.check == "DataCheck.balance")
    assert balance.status in ("pass", "note") and "5: " in balance.message and "0: " not in balance.message
    assert math.isfinite(balance.details["ratio"]) and balance.details["ratio"] == pytest.approx(
        float(torch.bincount(y).max() / torch.bincount(y).min()))
    assert not [m for m in warned if "balance" in m]


def test_lbfgs_has_no_untrained_first_loss(tmp_path: Any) -> None:
    """LBFGS evaluates the loss many times inside its first step and returns the loss after them: the initial-loss
    check skips, and a convex problem solved in that step is not 'a loss that does not decrease'."""

    class Lbfgs(TinyModel):
        def configure_optimizers(self) -> Any:
            return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=20)

    L.seed_everything(0)
    x, y = blobs(n=128, classes=4)
    t, warned = _fit(tmp_path, Lbfgs(), loader(x, y, batch_size=128, shuffle=False), max_epochs=30)
    findings = {f.check: f for f in lr.collect_findings(t)}
    assert findings["InitialLossCheck"].status == "skip" and "LBFGS" in findings["InitialLossCheck"].message
    assert not [f.message for f in findings.values() if f.failed]
