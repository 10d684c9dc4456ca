import math

import lightning as L
import pytest
import torch
from helpers import TinyModel, blobs, loader, regression_data, trainer
from torch import nn

from lightning_recipe import HeadBiasInit, InitialLossCheck, RecipeCheckError


def _run(tmp_path, model, dl, cbs=None, **kw):
    cb = InitialLossCheck(**kw)
    trainer(tmp_path, (cbs or []) + [cb], max_steps=1).fit(model, dl)
    return cb.findings[0]


def _zero_bias(m):
    with torch.no_grad():
        m.net[-1].bias.zero_()
    return m


def test_zero_bias_expects_log_c_and_default_init_passes(tmp_path):
    L.seed_everything(0)
    x, y = blobs(n=512, classes=10, priors=[0.5] + [0.5 / 9] * 9)
    f = _run(tmp_path, _zero_bias(TinyModel(out_dim=10)), loader(x, y))
    assert f.expected == pytest.approx(math.log(10), rel=1e-6)  # whatever the labels: zero logits give log C
    assert f.status == "pass"
    assert abs(f.measured - math.log(10)) < 0.3
    f = _run(tmp_path, TinyModel(out_dim=10), loader(x, y))  # default nn.Linear bias, not zero
    assert f.status == "pass"


def test_after_bias_init_expects_label_entropy(tmp_path):
    x, y = blobs(n=256, priors=[0.7, 0.2, 0.05, 0.05])
    p = torch.bincount(y, minlength=4).double() / len(y)
    f = _run(tmp_path, TinyModel(), loader(x, y, batch_size=256, shuffle=False), [HeadBiasInit()])
    assert f.expected == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert f.status == "pass"


def test_regression_expects_second_moment_then_variance(tmp_path):
    x, y = regression_data(n=256, mean=5.0, scale=2.0)
    dl = loader(x, y, batch_size=256, shuffle=False)
    m = _zero_bias(TinyModel(out_dim=1, loss_fn=nn.MSELoss()))
    f = _run(tmp_path, m, dl)
    assert f.expected == pytest.approx(float((y**2).mean()), rel=1e-5) and f.status == "pass"
    f = _run(tmp_path, TinyModel(out_dim=1, loss_fn=nn.MSELoss()), dl, [HeadBiasInit()])
    assert f.expected == pytest.approx(float(y.var(unbiased=False)), rel=1e-4) and f.status == "pass"


def test_fails_high_on_large_last_layer(tmp_path):
    x, y = blobs(n=256, classes=10)
    m = TinyModel(out_dim=10)
    with torch.no_grad():
        m.net[-1].weight.mul_(50)
    with pytest.raises(RecipeCheckError, match="far ABOVE") as err:
        _run(tmp_path, m, loader(x, y))
    assert "last layer initialised too large" in str(err.value)


def test_fails_high_on_unscaled_inputs(tmp_path):
    x, y = blobs(n=256, classes=10)
    cb = InitialLossCheck(on_fail="warn")
    with pytest.warns(UserWarning, match="far ABOVE"):
        trainer(tmp_path, [cb], max_steps=1).fit(TinyModel(out_dim=10), loader(x * 1000, y))
    f = cb.findings[0]
    assert f.status == "fail" and f.measured > 10 * f.expected and f.expected == pytest.approx(
        f.details["expected"]
    )


def test_fails_low_on_label_leak(tmp_path):
    class Leaky(TinyModel):
        """The label is among the inputs and the head is wired to it: information at init."""

        def forward(self, x):
            return self.net(x) + 8.0 * nn.functional.one_hot(x[:, -1].long(), 4).float()

    x, y = blobs(n=256)
    x = torch.cat([x, y.float().unsqueeze(1)], 1)
    with pytest.raises(RecipeCheckError, match="far BELOW"):
        _run(tmp_path, Leaky(in_dim=9), loader(x, y))


def test_fails_low_on_flipped_sign(tmp_path):
    class Flipped(TinyModel):
        def training_step(self, batch, batch_idx):
            return -self.compute_loss(batch)

    x, y = blobs(n=256)
    with pytest.raises(RecipeCheckError, match="sign is flipped"):
        _run(tmp_path, Flipped(), loader(x, y))


def test_gradient_accumulation_measures_the_full_loss(tmp_path):
    x, y = blobs(n=256, classes=10)
    cb = InitialLossCheck()
    trainer(tmp_path, [cb], max_steps=1, accumulate_grad_batches=4).fit(_zero_bias(TinyModel(out_dim=10)), loader(x, y))
    assert cb.findings[0].status == "pass" and cb.findings[0].measured == pytest.approx(math.log(10), abs=0.3)


class _Distilled(TinyModel):
    """A student trained on ``alpha * T**2 * KL(teacher || student at T) + (1 - alpha) * CE``, with the CE held as a
    loss module (a confident teacher makes the first returned loss several times log C)."""

    def __init__(self, sign: float = 1.0, head_scale: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.teacher = nn.Linear(8, 4).requires_grad_(False)
        with torch.no_grad():
            self.teacher.weight.mul_(20)
            self.net[-1].bias.zero_()
            self.net[-1].weight.mul_(head_scale)
        self.sign = sign

    def training_step(self, batch, batch_idx):
        x, y = batch
        s, T = self(x), 4.0
        kd = nn.functional.kl_div(nn.functional.log_softmax(s / T, 1), nn.functional.log_softmax(self.teacher(x) / T, 1),
                                  log_target=True, reduction="batchmean") * T * T
        return self.sign * (0.7 * kd + 0.3 * self.loss_fn(s, y))


def test_a_loss_combined_with_other_terms_judges_the_loss_module_call(tmp_path):
    """training_step returns more than the CrossEntropyLoss call (distillation): the call is judged against log C,
    not the sum; a head scaled by 50 still fails high on its call, and a flipped sign on the returned loss."""
    x, y = blobs(n=256)
    dl = loader(x, y, batch_size=256, shuffle=False)
    L.seed_everything(0)
    f = _run(tmp_path, _Distilled(), dl)
    assert f.status == "pass", f.message
    assert f.expected == pytest.approx(math.log(4), rel=1e-6)
    assert f.details["training_step_loss"] > 3 * math.log(4)  # the sum: far above the range of an untrained CE
    assert abs(f.measured - math.log(4)) < 0.3 and f.details["loss_calls"] == [pytest.approx(f.measured)]
    assert "combines the call with other terms" in f.message
    with pytest.raises(RecipeCheckError, match="far ABOVE"):
        _run(tmp_path, _Distilled(head_scale=50.0), dl)
    with pytest.raises(RecipeCheckError, match="sign flipped"):
        _run(tmp_path, _Distilled(sign=-1.0), dl)
