"""HeadBiasInit never makes a healthy model worse: a head whose output is transformed before the loss."""

import math
import warnings

import lightning as L
import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer
from sklearn.datasets import load_diabetes
from torch import nn

from lightning_recipe import (
    HeadBiasInit,
    InitialLossCheck,
    LossDecreaseCheck,
    RecipeConfigError,
    RecipeWarning,
    collect_findings,
    recommended,
    strict,
)


def _diabetes(top: float = 255.0):
    x, y = load_diabetes(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.float32)
    return x, ((y - y.min()) / (y.max() - y.min()) * top).unsqueeze(1)


def _counts(n: int = 512):
    """Poisson counts with a log-linear rate."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, torch.poisson(torch.exp(0.8 * x[:, :1] - 0.5 * x[:, 1:2] + 1.0), generator=g)


def _rates(n: int = 512):
    """Positive continuous targets with a log-linear mean."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    return x, torch.exp(0.5 * x[:, :1] - 0.3 * x[:, 1:2] + 1.0 + 0.2 * torch.randn(n, 1, generator=g))


class _Regressor(L.LightningModule):
    """``out = transform(head(body(x)))``, trained with ``loss_fn``."""

    def __init__(self, transform, loss_fn=None, in_dim: int = 10, lr: float = 3e-3, residual: bool = False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_dim, 32), nn.ReLU())
        self.head = nn.Linear(32, 1)
        self.transform, self.lr = transform, lr
        self.loss_fn = loss_fn if loss_fn is not None else nn.MSELoss()
        if residual:
            self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.transform(self, self.head(self.body(x)), x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


TANH = lambda m, h, x: 127.5 * (1 + torch.tanh(h))  # noqa: E731
SIGMOID_RANGE = lambda m, h, x: 255.0 * torch.sigmoid(h)  # noqa: E731
SOFTPLUS = lambda m, h, x: nn.functional.softplus(h)  # noqa: E731
EXP = lambda m, h, x: torch.exp(h)  # noqa: E731
RESIDUAL = lambda m, h, x: h + x[:, :1] * m.w  # noqa: E731
# a transform no family fits (tanh of the head, then a residual): the constant cannot be mapped
TANH_RESIDUAL = lambda m, h, x: 127.5 * (1 + torch.tanh(h)) + x[:, :1] * m.w  # noqa: E731


def _fit(tmp_path, transform, data, callbacks, steps: int = 60, **kw):
    """Same seed, same data: the model after ``steps`` batches, the trainer, and the full-data loss and R²."""
    x, y = data
    L.seed_everything(0, verbose=False)
    model = _Regressor(transform, in_dim=x.shape[1], **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RecipeWarning)
        t = trainer(tmp_path, callbacks, max_steps=steps, max_epochs=-1)
        t.fit(model, loader(x, y, batch_size=32))
    with torch.no_grad():
        out = model(x)
        loss = float(model.loss_fn(out, y))
        r2 = float(1 - (out - y).pow(2).mean() / y.var(unbiased=False))
    return model, t, loss, r2, [w for w in caught if issubclass(w.category, RecipeWarning)]


def _finding(t, check):
    return next(f for f in collect_findings(t) if f.check == check)


@pytest.mark.parametrize(
    ("transform", "data", "family", "kw"),
    [
        (TANH, _diabetes, "tanh", {}),
        (SIGMOID_RANGE, _diabetes, "sigmoid", {}),
        (SOFTPLUS, _counts, "softplus", {"loss_fn": nn.PoissonNLLLoss(log_input=False), "lr": 1e-2}),
        (EXP, _rates, "exp", {}),
    ],
)
def test_transformed_head_trains_as_well_with_the_callbacks(tmp_path, transform, data, family, kw):
    d = data()
    _, _, base_loss, base_r2, _ = _fit(tmp_path / "plain", transform, d, [], **kw)
    model, t, loss, r2, caught = _fit(tmp_path / "recipe", transform, d, recommended(), **kw)
    # 1.05x the loss without the callbacks (measured from zero: the Poisson loss is negative here)
    assert loss <= base_loss + 0.05 * abs(base_loss) and r2 >= base_r2 - 0.02, (loss, base_loss, r2, base_r2)
    assert not caught, [str(w.message)[:300] for w in caught]
    f = _finding(t, "HeadBiasInit")
    # the transform was identified; the constant went in through its inverse, and the model's loss went down
    assert f.status == "pass" and f.details["mapped"] and f"{family}(head)" in f.details["transform"]
    before, after = f.details["probe_loss_before"], f.details["probe_loss_after"]
    assert math.isfinite(before) and after < before and (f.measured, f.expected) == (after, before)
    # the model's output at the new bias is the loss-optimal constant (the target mean for MSE and Poisson)
    y = d[1]
    assert float(transform(model, torch.tensor(f.details["bias"]), None)) == pytest.approx(float(y.mean()), rel=1e-3)
    init = _finding(t, "InitialLossCheck")
    assert init.status == "skip" and "not the constant the model predicts" in init.message
    assert init.expected == pytest.approx(init.measured, rel=0.05)  # eval-mode probe of the first batch: same loss


def test_tanh_regression_under_strict_is_not_stopped(tmp_path):
    _, _, base_loss, base_r2, _ = _fit(tmp_path / "plain", TANH, _diabetes(), [])
    _, t, loss, r2, caught = _fit(tmp_path / "strict", TANH, _diabetes(), strict())
    assert t.global_step == 60 and not caught and r2 >= base_r2 - 0.02 and loss <= 1.05 * base_loss


def test_residual_after_head_keeps_the_bias_and_the_constant_checks(tmp_path):
    d = _diabetes()
    _, _, base_loss, base_r2, _ = _fit(tmp_path / "plain", RESIDUAL, d, [], residual=True, lr=3e-2)
    model, t, loss, r2, caught = _fit(tmp_path / "recipe", RESIDUAL, d, recommended(), residual=True, lr=3e-2)
    assert loss <= 1.05 * base_loss and r2 >= base_r2 - 0.02 and not caught
    f = _finding(t, "HeadBiasInit")
    # the output moves one for one with the bias: the mean is written as is, and it lowers the loss
    assert f.status == "pass" and not f.details["mapped"] and f.details["transform"] is None
    assert f.details["bias"][0] == pytest.approx(float(d[1].mean()), rel=1e-4)
    assert f.details["probe_loss_after"] < f.details["probe_loss_before"]
    assert _finding(t, "InitialLossCheck").status == "pass"  # the bias is the constant: the usual reference


def test_unmappable_transform_restores_the_bias_exactly(tmp_path):
    d = _diabetes()
    plain, _, base_loss, _, _ = _fit(tmp_path / "plain", TANH_RESIDUAL, d, [], residual=True)
    model, t, loss, _, caught = _fit(tmp_path / "recipe", TANH_RESIDUAL, d, recommended(), residual=True)
    f = _finding(t, "HeadBiasInit")
    assert f.status == "skip" and "transformed before the loss" in f.message
    before, after = f.details["probe_loss_before"], f.details["probe_loss_after"]
    assert after > 2 * before and f"{before:.6g}" in f.message and f"{after:.6g}" in f.message
    assert f.details["bias_tried"] == pytest.approx([float(d[1].mean())], rel=1e-4)  # the mean, into a saturating tanh
    # restored bit for bit, the rest only observes: training is the same as without the callbacks
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters())) and loss == base_loss
    assert not caught
    init = _finding(t, "InitialLossCheck")
    assert init.status == "skip" and "put the old bias back" in init.message


def test_residual_that_predicts_the_target_restores_and_initial_loss_judges_the_actual_output(tmp_path):
    """A forecaster ``out = x_last + head(h)``: the mean of the targets in the bias would double the level."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g)
    y = 100 + 20 * x[:, :1] + 0.5 + torch.randn(400, 1, generator=g)
    fc = lambda m, h, inp: h + 100 + 20 * inp[:, :1]  # noqa: E731  (the last level, de-standardised)
    _, t, _, _, caught = _fit(tmp_path, fc, (x, y), [HeadBiasInit(), InitialLossCheck(), LossDecreaseCheck()],
                              steps=2, lr=1e-3)
    f = _finding(t, "HeadBiasInit")
    assert f.status == "skip" and "residual" in f.message and f.details["probe_loss_after"] > 100 * f.expected
    init = _finding(t, "InitialLossCheck")
    assert init.status == "skip" and "put the old bias back" in init.message and not caught
    ld = next(cb for cb in t.callbacks if isinstance(cb, LossDecreaseCheck))
    assert ld.expected_initial_loss == pytest.approx(f.expected)  # the actual output's loss, not E[(y - bias)^2]


def test_without_head_bias_init_the_leak_is_still_found(tmp_path):
    """The same structure as a label leak (a term after the head that predicts the target): InitialLossCheck alone
    keeps its constant reference and fails low."""
    from lightning_recipe import RecipeCheckError

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    y = 100 + 20 * x[:, :1] + torch.randn(256, 1, generator=g)
    fc = lambda m, h, inp: h + 100 + 20 * inp[:, :1]  # noqa: E731
    with pytest.raises(RecipeCheckError, match="far BELOW"):
        _fit(tmp_path, fc, (x, y), [InitialLossCheck()], steps=1)


def test_plain_classifier_bias_benefit_numbers_unchanged(tmp_path):
    x, y = blobs(n=1000, priors=[0.6, 0.25, 0.1, 0.05])
    m = TinyModel()
    with torch.no_grad():
        m.net[-1].bias.zero_()
    hb, il = HeadBiasInit(), InitialLossCheck()
    t = trainer(tmp_path, [hb, il], max_steps=1)
    t.fit(m, loader(x, y))
    p = torch.bincount(y, minlength=4).double() / len(y)
    f = hb.findings[0]
    assert f.status == "pass" and f.details["transform"] is None and not f.details["mapped"]
    assert f.measured == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)  # label entropy
    assert f.expected == pytest.approx(math.log(4), rel=1e-6)  # log C at zero bias
    assert f.details["probe_loss_after"] < f.details["probe_loss_before"]
    assert il.findings[0].status == "pass"


def test_dropout_and_batchnorm_measured_in_eval_mode(tmp_path):
    class Noisy(TinyModel):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))

    x, y = blobs(n=600, priors=[0.7, 0.1, 0.1, 0.1])
    m = Noisy()
    hb = HeadBiasInit()
    trainer(tmp_path, [hb], max_steps=1).fit(m, loader(x, y))
    p = torch.bincount(y, minlength=4).double() / len(y)
    f = hb.findings[0]
    assert f.status == "pass" and torch.allclose(torch.tensor(hb.prior, dtype=torch.float64), p.log(), atol=1e-5)
    assert f.details["probe_loss_after"] < f.details["probe_loss_before"]


def test_head_outside_the_model_raises_naming_head(tmp_path):
    x, y = blobs(n=64)
    stray = nn.Linear(32, 4)
    old = stray.bias.detach().clone()
    with pytest.raises(RecipeConfigError, match="`head=`.*not a submodule"):
        trainer(tmp_path, [HeadBiasInit(head=stray)], max_steps=1).fit(TinyModel(), loader(x, y))
    assert torch.equal(stray.bias, old)  # not written; the model's own head given as a module works
    m = TinyModel()
    hb = HeadBiasInit(head=m.net[2])
    trainer(tmp_path, [hb], max_steps=1).fit(m, loader(x, y))
    assert hb.findings[0].status == "pass" and hb.findings[0].details["head"] == "net.2"


def test_temperature_and_affine_rescaling_get_the_constant_through_the_inverse(tmp_path):
    class Tempered(TinyModel):
        def forward(self, x):
            return self.net(x) / 2.0  # a softmax temperature after the head

    x, y = blobs(n=800, priors=[0.6, 0.25, 0.1, 0.05])
    hb = HeadBiasInit()
    trainer(tmp_path, [hb], max_steps=1).fit(Tempered(), loader(x, y))
    p = torch.bincount(y, minlength=4).double() / len(y)
    f = hb.findings[0]
    assert f.status == "pass" and f.details["mapped"] and "0.5 * head" in f.details["transform"]
    assert torch.allclose(torch.softmax(torch.tensor(hb.prior, dtype=torch.float64) / 2.0, 0), p, atol=1e-4)
    assert f.details["probe_loss_after"] < f.details["probe_loss_before"]

    class Destandardised(TinyModel):
        def forward(self, x):
            return self.net(x) * 10.0 + 40.0  # the head predicts standardised targets

    g = torch.Generator().manual_seed(0)
    xr = torch.randn(400, 8, generator=g)
    yr = 55.0 + 10.0 * xr[:, :1] + torch.randn(400, 1, generator=g)
    hb = HeadBiasInit()
    trainer(tmp_path, [hb], max_steps=1).fit(Destandardised(out_dim=1, loss_fn=nn.MSELoss()), loader(xr, yr))
    assert hb.findings[0].status == "pass" and hb.findings[0].details["mapped"]
    assert hb.prior[0] == pytest.approx((float(yr.mean()) - 40.0) / 10.0, rel=1e-3)  # not the mean itself


def test_language_model_logits_are_probed_in_bounded_memory(tmp_path):
    """log_softmax after the head (NLLLoss): the output moves one for one with the bias up to a shift per row; the
    probe batch's 4.5M logits are not copied whole to the host."""

    class LM(TinyModel):
        def __init__(self):
            super().__init__(loss_fn=nn.NLLLoss())
            self.net = nn.Sequential(nn.Embedding(1000, 8), nn.Linear(8, 1000))

        def forward(self, x):
            return torch.log_softmax(self.net(x), -1).transpose(1, 2)  # (N, C, T) for NLLLoss

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1000, generator=g) ** 6  # a skewed unigram distribution
    x = torch.multinomial(probs, 128 * 70, replacement=True, generator=g).reshape(128, 70)
    y = torch.roll(x, -1, 1)
    hb = HeadBiasInit()
    trainer(tmp_path, [hb], max_steps=1).fit(LM(), loader(x, y, batch_size=64))
    f = hb.findings[0]
    assert f.status == "pass" and f.details["transform"] is None
    assert f.details["probe_loss_after"] < f.details["probe_loss_before"] - 0.5  # the unigram prior helps a lot
    counts = torch.bincount(y.reshape(-1), minlength=1000).double()
    p = torch.where(counts > 0, counts, torch.full_like(counts, 0.5))
    assert torch.allclose(torch.tensor(hb.prior, dtype=torch.float64), (p / p.sum()).log(), atol=1e-4)


def test_a_bias_put_back_on_a_plain_head_keeps_the_initial_loss_verdict(tmp_path):
    """Raw 0-255 inputs: the outputs spread so far around the bias that the write may not lower the probe loss; the
    head is still the output, so InitialLossCheck keeps its constant reference and fails high."""
    from lightning_recipe import RecipeCheckError

    x, y = blobs(n=512, classes=10)
    x = (x - x.min()) / (x.max() - x.min()) * 255
    hb = HeadBiasInit()
    with pytest.raises(RecipeCheckError, match="far ABOVE"):
        trainer(tmp_path, [hb, InitialLossCheck()], max_steps=1).fit(TinyModel(out_dim=10), loader(x, y))
    f = hb.findings[0]
    assert f.details["transform"] is None and f.details["probe_loss_before"] > 3 * math.log(10)
