"""Every check of ``strict()`` on healthy models of each task and shape: no finding may fail.

The broken counterparts of these models are in the per-check test files; here only the absence of false alarms is
asserted, on the same tiny fixtures the rest of the suite uses, trained long enough for every check to run.
"""

import lightning as L
import pytest
import torch
from helpers import TinyModel, blobs, loader, regression_data, trainer
from torch import nn

import lightning_recipe as lr


class _SmallCNN(TinyModel):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Dropout(0.1), nn.Linear(8 * 4 * 4, 4),
        )


class _Sequence(TinyModel):
    """Token ids in, (N, T, C) logits out; the loss flattens them."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(6, 16), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6))

    def compute_loss(self, batch):
        x, y = batch
        return self.loss_fn(self(x).reshape(-1, 6), y.reshape(-1))


class _TimeMajor(_Sequence):
    """(T, N, C) logits (a sequence layer without ``batch_first``); training_step puts the batch first again."""

    def forward(self, x):
        return self.net(x.t())

    def compute_loss(self, batch):
        x, y = batch
        return self.loss_fn(self(x).transpose(0, 1).reshape(-1, 6), y.reshape(-1))


class _FunctionalBCE(TinyModel):
    """No loss module: ``F.binary_cross_entropy_with_logits`` on float 0/1 targets (the loss is inferred)."""

    def __init__(self):
        super().__init__(out_dim=1)
        self.loss_fn = None

    def compute_loss(self, batch):
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x), y)


def _data(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "multiclass":
        x, y = blobs(n=768, priors=[0.5, 0.25, 0.15, 0.1])
        return TinyModel(), x, y
    if kind == "binary":
        x, y = blobs(n=768, classes=2, priors=[0.85, 0.15])
        return TinyModel(out_dim=1, loss_fn=nn.BCEWithLogitsLoss()), x, y.float().unsqueeze(1)
    if kind == "binary_functional":
        x, y = blobs(n=768, classes=2, priors=[0.7, 0.3])
        return _FunctionalBCE(), x, y.float().unsqueeze(1)
    if kind == "multilabel":
        x = torch.randn(768, 8, generator=g)
        y = (x[:, :3] + 0.3 * torch.randn(768, 3, generator=g) > torch.tensor([0.0, 0.5, 1.0])).float()
        return TinyModel(out_dim=3, loss_fn=nn.BCEWithLogitsLoss()), x, y
    if kind == "regression":
        x, y = regression_data(n=768, mean=50.0, scale=1.0)
        return TinyModel(out_dim=1, loss_fn=nn.MSELoss()), x, y
    if kind == "image":
        x, y = blobs(n=768, dim=64)
        return _SmallCNN(), x.reshape(-1, 1, 8, 8), y
    # sequence: the next token is the current one plus one (mod 6)
    x = torch.randint(0, 6, (768, 10), generator=g)
    return (_TimeMajor() if kind == "time_major" else _Sequence()), x, (x + 1) % 6


@pytest.mark.parametrize(
    "kind", ["multiclass", "binary", "binary_functional", "multilabel", "regression", "image", "sequence", "time_major"]
)
def test_strict_raises_nothing_on_healthy_training(tmp_path, kind):
    L.seed_everything(0)
    model, x, y = _data(kind)
    t = trainer(tmp_path, lr.strict(), max_epochs=6)
    t.fit(model, loader(x[:640], y[:640]), loader(x[640:], y[640:], shuffle=False))
    findings = lr.collect_findings(t)
    assert t.state.finished and t.global_step == 6 * 20
    assert not [f for f in findings if f.failed], [f.message for f in findings if f.failed]
    ran = {f.check.split(".")[0] for f in findings if f.status == "pass"}
    if kind == "binary_functional":  # float 0/1 targets and no loss module: inferred as BCE with logits, and said so
        head = next(f for f in findings if f.check == "HeadBiasInit")
        assert "inferred from the targets as BCEWithLogitsLoss (binary)" in head.message
    assert {"HeadBiasInit", "InitialLossCheck", "LossDecreaseCheck", "InputDependenceCheck"} <= ran, ran
