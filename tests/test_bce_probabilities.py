"""``nn.BCELoss`` on a model that applies its own sigmoid: the head is the layer before it, constants are log-odds."""

import math

import lightning as L
import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer
from torch import nn

from lightning_recipe import HeadBiasInit, InitialLossCheck, OutputRangeCheck, collect_findings, strict
from lightning_recipe.exceptions import RecipeCheckError


class SigmoidBCE(TinyModel):
    """A sigmoid in forward and ``nn.BCELoss``: the textbook binary classifier."""

    def __init__(self, sigmoids: int = 1) -> None:
        super().__init__(out_dim=1, loss_fn=nn.BCELoss())
        self.sigmoids = sigmoids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(x)
        for _ in range(self.sigmoids):
            z = torch.sigmoid(z)
        return z


def _data(n: int = 1000, p: float = 0.2):
    x, y = blobs(n=n, classes=2, priors=[1 - p, p])
    return x, y.float().unsqueeze(1)


def _bce(p: float, q: float) -> float:
    """Binary cross-entropy of the constant probability ``p`` on labels whose positive fraction is ``q``."""
    return -(q * math.log(p) + (1 - q) * math.log(1 - p))


def test_bias_is_log_odds_before_the_sigmoid_and_first_loss_is_label_entropy(tmp_path):
    x, y = _data()
    p = y.mean().item()
    bias, outputs, initial = HeadBiasInit(), OutputRangeCheck(), InitialLossCheck()
    model = SigmoidBCE()
    trainer(tmp_path, [bias, outputs, initial], max_steps=1).fit(model, loader(x, y, shuffle=False))
    set_to = bias.findings[0]
    assert set_to.status == "pass" and set_to.details["method"] == "log-odds"
    assert set_to.measured == pytest.approx(_bce(p, p), rel=1e-5)  # the label entropy: the loss of the constant p
    assert outputs.findings[0].status == "pass" and 0 < outputs.findings[0].details["min"] <= 1
    first = initial.findings[0]
    assert first.status == "pass"
    assert first.expected == pytest.approx(_bce(p, y[:32].mean().item()), rel=1e-5)  # constant p on the first batch
    # the head is the linear layer before the sigmoid; one Adam step (lr 1e-2) moved its bias from the log-odds
    assert model.net[-1].bias.item() == pytest.approx(math.log(p / (1 - p)), abs=1.1e-2)


def test_double_sigmoid_before_bceloss_fails_and_a_healthy_fit_passes_strict(tmp_path):
    x, y = _data(512, 0.4)
    with pytest.raises(RecipeCheckError, match="double sigmoid"):
        trainer(tmp_path / "double", [OutputRangeCheck()], max_steps=1).fit(SigmoidBCE(sigmoids=2), loader(x, y))
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path / "healthy", strict(), max_epochs=8)
    t.fit(SigmoidBCE(), loader(x, y))
    findings = collect_findings(t)
    assert [f for f in findings if f.status in ("fail", "warn")] == []
    decrease = next(f for f in findings if f.check == "LossDecreaseCheck")
    q = y.mean().item()
    assert decrease.expected == pytest.approx(_bce(q, q), rel=1e-5)  # the prior loss: the label entropy
    assert decrease.measured < 0.5 * decrease.expected  # the model learned


class _LogitsThenSigmoidInStep(TinyModel):
    """forward returns logits; training_step applies the sigmoid before ``nn.BCELoss`` (also common)."""

    def __init__(self) -> None:
        super().__init__(out_dim=1, loss_fn=nn.BCELoss())

    def compute_loss(self, batch):
        x, y = batch
        return self.loss_fn(torch.sigmoid(self(x)), y)


def test_bceloss_on_logits_returned_by_forward(tmp_path):
    x, y = _data()
    p = y.mean().item()
    model = _LogitsThenSigmoidInStep()
    with torch.no_grad():
        model.net[-1].bias.fill_(0.5)
        model.net[-1].weight.mul_(1e-3)  # every initial logit near 0.5: inside [0, 1], yet logits
    bias, outputs, initial = HeadBiasInit(), OutputRangeCheck(), InitialLossCheck()
    trainer(tmp_path, [bias, outputs, initial], max_steps=1).fit(model, loader(x, y, shuffle=False))
    assert outputs.findings[0].status == "pass" and "training_step applies the sigmoid" in outputs.findings[0].message
    assert bias.findings[0].measured == pytest.approx(_bce(p, p), rel=1e-5)
    assert initial.findings[0].status == "pass"
    assert initial.findings[0].expected == pytest.approx(_bce(p, y[:32].mean().item()), rel=1e-5)
