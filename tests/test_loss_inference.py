"""Losses without a class-index target: KLDivLoss against soft targets (distillation), and a loss that no constant
minimises (HeadBiasInit must leave the bias alone rather than write NaN)."""

import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyModel, blobs, loader, trainer
from torch import nn

import lightning_recipe as lr


class Distilled(TinyModel):
    """A student trained on a teacher's probabilities with ``KLDivLoss(log_softmax(student), teacher_probs)``."""

    def __init__(self):
        super().__init__(loss_fn=nn.KLDivLoss(reduction="batchmean"))

    def compute_loss(self, batch):
        x, p = batch
        return self.loss_fn(F.log_softmax(self(x), -1), p)


def _soft_targets():
    x, y = blobs(n=512)
    teacher = F.one_hot(y, 4).float() * 0.7 + 0.3 / 4  # a teacher that is 70% sure of the true class
    return x, teacher


def test_distillation_with_kl_divergence_is_left_alone_not_broken(tmp_path):
    """``KLDivLoss`` takes transformed outputs (log-probabilities, often at a temperature) that the checks cannot see:
    on the model's own outputs it is linear, so no constant minimises it. HeadBiasInit leaves the bias alone (it used
    to write NaN), the checks that need the constant prediction skip, the first loss only warns: nothing fails and
    the student trains as it would without the callbacks."""
    L.seed_everything(0)
    x, p = _soft_targets()
    t = trainer(tmp_path, lr.strict(), max_epochs=6)
    model = Distilled()
    t.fit(model, loader(x[:448], p[:448]), loader(x[448:], p[448:], shuffle=False))
    findings = {f.check: f for f in lr.collect_findings(t)}
    assert not [f.message for f in findings.values() if f.failed]
    assert findings["HeadBiasInit"].status == "skip" and "no finite constant minimises" in findings["HeadBiasInit"].message
    assert all(torch.isfinite(q).all() for q in model.parameters())
    assert findings["LossDecreaseCheck"].status == "pass"  # finite, decreasing
    acc = float((model(x[448:]).argmax(1) == p[448:].argmax(1)).float().mean())
    assert acc > 0.9  # the student learned the teacher's classes


def test_a_loss_no_constant_minimises_leaves_the_bias_alone(tmp_path):
    class Unbounded(TinyModel):  # a linear score: unbounded below for a constant output
        def __init__(self):
            super().__init__(out_dim=1, loss_fn=lambda out, y: -(out * y).mean())

    L.seed_everything(0)
    x, y = blobs(n=256)
    model = Unbounded()
    before = model.net[2].bias.detach().clone()
    cb = lr.HeadBiasInit(loss_fn=model.loss_fn, task="regression")
    trainer(tmp_path, [cb], max_steps=1).fit(model, loader(x, y.float().unsqueeze(1)))
    (f,) = cb.findings
    assert f.status == "skip" and "no finite constant minimises" in f.message
    assert torch.isfinite(model.net[2].bias).all()
    assert not torch.equal(model.net[2].bias, before)  # trained one step from the untouched bias, not from NaN


class Focal(TinyModel):
    """A focal loss written in training_step (no loss module), on integer 0/1 labels and one logit per example."""

    def __init__(self):
        super().__init__(out_dim=1)
        self.loss_fn = None

    def compute_loss(self, batch):
        x, y = batch
        logit = self(x).squeeze(-1)
        ce = F.binary_cross_entropy_with_logits(logit, y.float(), reduction="none")
        return ((1 - torch.exp(-ce)) ** 2 * ce).mean()


def test_integer_zero_one_labels_with_one_output_are_binary_and_a_guessed_loss_is_only_a_note(tmp_path):
    L.seed_everything(0)
    x, y = blobs(n=512, classes=2, priors=[0.8, 0.2])
    t = trainer(tmp_path, lr.strict(), max_epochs=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(Focal(), loader(x[:448], y[:448]), loader(x[448:], y[448:], shuffle=False))
    # the focal loss is far below the guessed cross-entropy: a loss of its own, not a bug, so no RecipeWarning
    assert not [str(w.message) for w in caught if issubclass(w.category, lr.RecipeWarning)]
    findings = {f.check: f for f in lr.collect_findings(t)}
    assert not [f.message for f in findings.values() if f.failed]
    head = findings["HeadBiasInit"]
    rate = float(y[:448].float().mean())
    assert head.details["bias"] == pytest.approx([math.log(rate / (1 - rate))], abs=1e-4)  # log-odds: binary
    init = findings["InitialLossCheck"]
    # the guess (BCE at the log-odds) is the label entropy of the first batch; the focal loss there is far below it
    assert init.status == "note" and "inferred" in init.message and init.measured < 0.5 * init.expected
    assert "far BELOW" in init.message


def test_distillation_with_a_temperature_only_warns_at_the_first_loss(tmp_path):
    class Tempered(Distilled):  # the usual recipe: logits / T, loss * T**2
        def compute_loss(self, batch):
            x, p = batch
            return self.loss_fn(F.log_softmax(self(x) / 3.0, -1), p) * 9.0

    L.seed_everything(0)
    x, p = _soft_targets()
    t = trainer(tmp_path, lr.strict(), max_epochs=6)
    t.fit(Tempered(), loader(x[:448], p[:448]), loader(x[448:], p[448:], shuffle=False))
    findings = lr.collect_findings(t)
    assert not [f.message for f in findings if f.failed]
    init = next(f for f in findings if f.check == "InitialLossCheck")
    assert init.status in ("pass", "warn") and init.measured > 0
