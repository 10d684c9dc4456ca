import math

import pytest
import torch
from torch import nn

from lightning_recipe.functional import (
    LabelStats,
    constant_loss,
    decrease_test,
    diverged,
    entropy,
    log_odds,
    log_prior,
    noise_band,
    numeric_constant,
    optimal_constant,
    plateau_test,
)


def test_log_prior_is_log_class_frequency():
    counts = torch.tensor([70.0, 20.0, 10.0])
    assert torch.allclose(log_prior(counts), torch.tensor([0.7, 0.2, 0.1]).log())


def test_log_prior_absent_class_is_finite():
    c = log_prior(torch.tensor([10.0, 0.0, 10.0]))
    assert torch.isfinite(c).all()
    assert c[1] < c[0] - 2.5  # 0.5 pseudo-count vs 10: log(0.5/10.0) ~ -3.0 below


def test_log_prior_with_weights_and_smoothing_minimise_the_loss():
    y = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    counts = torch.bincount(y, minlength=3).float()
    for loss, kw in [
        (nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 5.0])), dict(weight=torch.tensor([1.0, 2.0, 5.0]))),
        (nn.CrossEntropyLoss(label_smoothing=0.2), dict(label_smoothing=0.2)),
    ]:
        c = log_prior(counts, **kw)
        numeric = numeric_constant(loss, y, torch.zeros(3))
        assert constant_loss(loss, c, y) == pytest.approx(constant_loss(loss, numeric, y), abs=1e-5)
        # and it is the minimum: nudging any logit makes it worse
        for j in range(3):
            bumped = c.clone()
            bumped[j] += 0.05
            assert constant_loss(loss, bumped, y) > constant_loss(loss, c, y)


def test_log_odds_closed_form_and_pos_weight():
    assert log_odds(torch.tensor([10.0]), 100).item() == pytest.approx(math.log(0.1 / 0.9), rel=1e-6)
    # pos_weight w: optimum sigma = w p / (w p + 1 - p)
    y = torch.tensor([[1.0]] * 10 + [[0.0]] * 90)
    pw = torch.tensor([4.0])
    c = log_odds(torch.tensor([10.0]), 100, pw)
    assert c.item() == pytest.approx(math.log(4 * 0.1 / 0.9), rel=1e-6)
    num = numeric_constant(nn.BCEWithLogitsLoss(pos_weight=pw), y, torch.zeros(1))
    assert c.item() == pytest.approx(num.item(), abs=1e-3)


def test_entropy_and_constant_loss_match_closed_forms():
    y = torch.tensor([0] * 70 + [1] * 20 + [2] * 10)
    counts = torch.bincount(y).float()
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert entropy(counts) == pytest.approx(h, rel=1e-9)
    ce = nn.CrossEntropyLoss()
    assert constant_loss(ce, log_prior(counts), y) == pytest.approx(h, rel=1e-5)
    assert constant_loss(ce, torch.zeros(3), y) == pytest.approx(math.log(3), rel=1e-6)


def test_optimal_constant_regression_mean_median_huber():
    y = torch.tensor([[1.0], [2.0], [3.0], [10.0]])
    stats = LabelStats("regression", 4, y, mean=y.mean(0), var=y.var(0, unbiased=False))
    c, how = optimal_constant("regression", stats, nn.MSELoss(), "MSELoss")
    assert (how, c.item()) == ("mean", pytest.approx(4.0))
    assert constant_loss(nn.MSELoss(), c, y) == pytest.approx(y.var(unbiased=False).item(), rel=1e-6)
    c, how = optimal_constant("regression", stats, nn.L1Loss(), "L1Loss")
    assert how == "median" and 2.0 <= c.item() <= 3.0
    c, how = optimal_constant("regression", stats, nn.HuberLoss(delta=1.0), "HuberLoss")
    assert how == "numeric" and 2.0 < c.item() < 4.0  # between median and mean
    grad_free = constant_loss(nn.HuberLoss(delta=1.0), c, y)
    assert grad_free <= constant_loss(nn.HuberLoss(delta=1.0), c + 0.01, y)
    assert grad_free <= constant_loss(nn.HuberLoss(delta=1.0), c - 0.01, y)


def test_noise_band_matches_mse_closed_form():
    y = torch.randn(2000, 1, generator=torch.Generator().manual_seed(0))
    mean, sd = noise_band(nn.MSELoss(), torch.zeros(1), y, sigma=2.0, draws=64)
    # E[(y - e)^2] = E[y^2] + sigma^2
    assert mean == pytest.approx(float((y**2).mean()) + 4.0, rel=0.02)
    assert sd > 0
    before = torch.random.get_rng_state()
    noise_band(nn.MSELoss(), torch.zeros(1), y, sigma=1.0)
    assert torch.equal(before, torch.random.get_rng_state())  # no global RNG draw


def test_decrease_diverge_plateau_tests():
    flat = torch.full((20,), 2.3) + 0.01 * torch.randn(20, generator=torch.Generator().manual_seed(0))
    assert not decrease_test(flat[:10], flat[10:], floor=0.0)["decreased"]
    assert decrease_test(torch.full((10,), 2.3), torch.full((10,), 2.0), floor=0.0)["decreased"]
    assert diverged(1.0, torch.full((10,), 3.0), floor=0.0)["diverged"]
    assert not diverged(1.0, torch.tensor([1.5, 3.0, 2.5]), floor=0.0)["diverged"]
    assert plateau_test(torch.full((10,), math.log(4)), math.log(4), floor=0.0)["plateau"]
    assert not plateau_test(torch.full((10,), 0.5), math.log(4), floor=0.0)["plateau"]
