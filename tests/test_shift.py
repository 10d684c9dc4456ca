"""``DataCheck.shift``: validation inputs on another scale than the training inputs, validation labels distributed far
from the training labels; each against its sampling-error bound."""

import math
import warnings

import pytest
import torch
from helpers import TinyModel, loader, trainer
from sklearn import datasets

from lightning_recipe.checks.data import DataCheck
from lightning_recipe.exceptions import RecipeWarning
from lightning_recipe.functional.data import familywise_z, label_shift, scale_shift, standardized_on_itself


def _data(name):
    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _split(n, seed=0):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: int(0.8 * n)], order[int(0.8 * n):]


def _shift(tmp_path, xt, yt, xv, yv, expect_warning=False):
    cb = DataCheck(on_fail="warn", figure=False)
    tr = trainer(tmp_path, [cb], max_steps=1, limit_val_batches=1, num_sanity_val_steps=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr.fit(TinyModel(in_dim=xt.shape[1], out_dim=int(yt.max()) + 1), loader(xt, yt, 64),
               loader(xv, yv, 256, shuffle=False))
    shift_warnings = [w for w in caught if issubclass(w.category, RecipeWarning)
                      and "validation data is distributed differently" in str(w.message)]
    assert bool(shift_warnings) == expect_warning
    return next(f for f in cb.findings if f.check == "DataCheck.shift")


def _judged(x):
    """The features the rule judges: varying in training, not 0/1 only."""
    std = x.double().std(0, unbiased=False)
    return (std > 0) & ~((x == 0) | (x == 1)).all(0)


def test_validation_left_unscaled_fires_with_the_std_ratio_16(tmp_path):
    # digits scaled by 1/16 for training, left raw 0..16 for validation: every spread 16 times the training one
    x, y = _data("digits")
    tr, va = _split(len(y))
    xt, xv = x[tr] / 16, x[va]
    f = _shift(tmp_path, xt, y[tr], xv, y[va], expect_warning=True)
    assert f.status == "warn" and "inputs on another scale" in f.message
    assert "validation scaled with its own statistics" in f.causes[0] and "forgot to scale" in f.causes[1]
    keep = _judged(xt)
    # closed form: std_v / std_t = 16 std(raw val) / std(raw train), per feature
    closed = 16 * x[va].double().std(0, unbiased=False)[keep] / x[tr].double().std(0, unbiased=False)[keep]
    got = torch.tensor(f.details["inputs"]["std_ratios"], dtype=torch.float64)
    assert got.shape == closed[:64].shape and torch.allclose(got, closed[:64], rtol=1e-4)
    informative = closed > 0  # pixels not constant in validation
    assert f.details["inputs"]["std_ratio_median"] == pytest.approx(float(closed.median()), rel=1e-4)
    assert abs(math.log(float(closed[informative].median()) / 16)) < 0.05  # ~16: the raw data's spread is the same
    # the pixels whose spread a few values decide (n / kurtosis < 10 in a sample) are left to their means
    kt = lambda t: ((t - t.mean(0)) ** 4).mean(0) / t.var(0, unbiased=False).clamp_min(1e-300) ** 2  # noqa: E731
    carried = (min(len(tr), len(va)) / torch.maximum(kt(xt.double()), kt(xv.double())).clamp_min(1) >= 10)[keep]
    assert f.details["inputs"]["judged"] == int(keep.sum()) and 0 < int(carried.sum()) < int(keep.sum())
    assert f.details["inputs"]["large"] >= 0.9 * int(carried.sum())
    assert f.measured == f.details["inputs"]["large_fraction"] > 0.5 == f.expected


def test_validation_standardized_on_itself_fires(tmp_path):
    # validation from another distribution (x3 + 5), standardized with its own statistics: the shift is hidden
    x, y = _data("breast_cancer")
    tr, va = _split(len(y))
    mean, std = x[tr].mean(0), x[tr].std(0)
    other = x[va] * 3 + 5
    xv = (other - other.mean(0)) / other.std(0)
    f = _shift(tmp_path, (x[tr] - mean) / std, y[tr], xv, y[va], expect_warning=True)
    assert f.status == "warn" and "standardized with their own statistics" in f.message
    assert f.details["inputs"]["standardized_on_itself"] == ["inputs"]
    # float32 rounding leaves means of ~4e-5; the rule allows 1% of the sampling error 1/sqrt(n_v)
    assert float(xv.double().mean(0).abs().max()) < 0.01 / math.sqrt(len(va)) < float(
        ((x[va] - mean) / std).double().mean(0).abs().max())
    # the same validation data scaled with the training statistics is on another scale: std ratio 3 (closed form)
    f = _shift(tmp_path, (x[tr] - mean) / std, y[tr], (other - mean) / std, y[va], expect_warning=True)
    closed = 3 * x[va].double().std(0, unbiased=False) / x[tr].double().std(0, unbiased=False)
    assert f.details["inputs"]["std_ratio_median"] == pytest.approx(float(closed.median()), rel=1e-4)
    assert f.details["inputs"]["standardized_on_itself"] == []


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "wine"])
def test_healthy_random_split_passes_within_sampling_error(tmp_path, name):
    x, y = _data(name)
    tr, va = _split(len(y))
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-8)
    xt, xv = (x[tr] - mean) / std, (x[va] - mean) / std
    f = _shift(tmp_path, xt, y[tr], xv, y[va])
    assert f.status == "pass"
    inp, lab = f.details["inputs"], f.details["labels"]
    assert inp["large"] == inp["moderate"] == 0 and inp["judged"] == int(_judged(xt).sum())
    w = inp["worst"]
    # the worst feature's standardized mean difference, recomputed, is within its familywise sampling limit
    j = w["index"]
    a, b = xt[:, j].double(), xv[:, j].double()
    smd = float((b.mean() - a.mean()) / a.std(unbiased=False))
    assert w["smd"] == pytest.approx(smd, rel=1e-6, abs=1e-9)
    z = familywise_z(inp["judged"])
    assert w["z"] == pytest.approx(z) and abs(smd) < z * w["se_smd"]
    assert w["se_smd"] >= math.sqrt(1 / len(tr) + 1 / len(va)) - 1e-12
    # labels: total variation distance, recomputed, under the chi-square bound of 3 sigma
    pt = torch.bincount(y[tr], minlength=int(y.max()) + 1).double() / len(tr)
    pv = torch.bincount(y[va], minlength=int(y.max()) + 1).double() / len(va)
    k = len(pt)
    bound = 0.5 * math.sqrt((k - 1 + 3 * math.sqrt(2 * (k - 1))) * (1 / len(tr) + 1 / len(va)))
    assert lab["tv"] == pytest.approx(0.5 * float((pt - pv).abs().sum())) and lab["bound"] == pytest.approx(bound)
    assert lab["tv"] < bound and lab["status"] == "pass" and lab["missing"] == []


def test_validation_with_two_of_ten_classes_fires(tmp_path):
    x, y = _data("digits")
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-8)
    tr, va = _split(len(y))
    va = va[y[va] >= 8]  # the held-out rows of classes 8 and 9 only
    f = _shift(tmp_path, x[tr], y[tr], x[va], y[va], expect_warning=True)
    lab = f.details["labels"]
    assert f.status == "warn" and lab["status"] == "warn" and "classes absent from the validation data" in f.message
    pt = torch.bincount(y[tr], minlength=10).double() / len(tr)
    pv = torch.bincount(y[va], minlength=10).double() / len(va)
    # closed form: the mass of classes 0-7 in training, plus what classes 8 and 9 gained
    tv = 0.5 * (float(pt[:8].sum()) + float((pv[8:] - pt[8:]).abs().sum()))
    assert lab["tv"] == pytest.approx(tv) and f.measured == pytest.approx(tv) and tv > 0.75
    assert lab["missing"] == list(range(8)) and lab["tv"] > lab["bound"]
    assert "a split by position of data sorted by class" in " ".join(f.causes)


def test_stratified_split_passes(tmp_path):
    x, y = _data("wine")
    x = (x - x.mean(0)) / x.std(0)
    # every fifth row of each class to validation: proportions equal up to rounding
    va = torch.cat([torch.nonzero(y == c).reshape(-1)[::5] for c in range(3)])
    tr = torch.tensor(sorted(set(range(len(y))) - set(va.tolist())))
    f = _shift(tmp_path, x[tr], y[tr], x[va], y[va])
    lab = f.details["labels"]
    pt = torch.bincount(y[tr]).double() / len(tr)
    pv = torch.bincount(y[va]).double() / len(va)
    assert lab["tv"] == pytest.approx(0.5 * float((pt - pv).abs().sum())) and lab["tv"] < 0.02 < lab["bound"]
    assert lab["status"] == "pass" and f.status in ("pass", "note")  # features: a position-based subsample


def test_functional_closed_forms():
    # two classes 50/50 vs 100/0: TV 0.5; bound 0.5 sqrt((1 + 3 sqrt 2)(1/100 + 1/100))
    r = label_shift(torch.tensor([50.0, 50.0]), torch.tensor([100.0, 0.0]))
    assert r["tv"] == 0.5 and r["bound"] == pytest.approx(0.5 * math.sqrt((1 + 3 * math.sqrt(2)) * 0.02))
    assert r["missing"] == [1]
    # labels per position: fewer independent examples than labels widen the bound
    assert label_shift(torch.tensor([50.0, 50.0]), torch.tensor([60.0, 40.0]), 10, 10)["bound"] > r["bound"]
    # familywise z: one test keeps z; D tests keep the total tail at that of one z-sigma event
    z64 = familywise_z(64)
    assert familywise_z(1) == 3.0 and 64 * math.erfc(z64 / math.sqrt(2)) == pytest.approx(math.erfc(3 / math.sqrt(2)))
    # a x16 spread: ratio exactly 16; a constant training feature is not judged
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 3, generator=g, dtype=torch.float64), torch.randn(300, 3, generator=g, dtype=torch.float64)
    a[:, 2] = 1.0
    b = b * 16
    kurt = lambda t: ((t - t.mean(0)) ** 4).mean(0) / t.var(0, unbiased=False).clamp_min(1e-300) ** 2  # noqa: E731
    r = scale_shift(a.mean(0), a.std(0, unbiased=False), kurt(a), 1000, b.mean(0), b.std(0, unbiased=False), kurt(b), 300)
    ratio = b.std(0, unbiased=False) / a.std(0, unbiased=False)
    assert torch.allclose(r["ratio"][:2], ratio[:2]) and r["large"].tolist() == [True, True, False]
    assert r["judged"].tolist() == [True, True, False]
    # a sparse feature (nonzero in 1 of 1000 training rows) absent from 300 validation rows: within sampling error
    s = torch.zeros(1000, dtype=torch.float64)
    s[0] = 1.0
    v = torch.zeros(300, dtype=torch.float64)
    r = scale_shift(s.mean().reshape(1), s.std(unbiased=False).reshape(1), kurt(s.reshape(-1, 1)), 1000,
                    v.mean().reshape(1), v.std(unbiased=False).reshape(1), torch.ones(1), 300)
    assert r["ratio"].item() == 0.0 and not r["significant"].item()
    # a pixel nonzero in 2 of 1347 training rows and 6 of 450 validation rows (a digits border pixel, random split):
    # a few values decide its spread (ratio ~3), where the normal approximation of its error does not hold (n / κ
    # under 10): not a shift; a dense feature at the same ratio is a large one
    t = torch.zeros(1347, 2, dtype=torch.float64)
    t[:2, 0] = 1.0
    t[:, 1] = torch.randn(1347, generator=g, dtype=torch.float64)
    v = torch.zeros(450, 2, dtype=torch.float64)
    v[:6, 0] = 1.0
    v[:, 1] = 3.0 * torch.randn(450, generator=g, dtype=torch.float64)
    r = scale_shift(t.mean(0), t.std(0, unbiased=False), kurt(t), 1347, v.mean(0), v.std(0, unbiased=False), kurt(v), 450)
    assert 2.5 < r["ratio"][0].item() < 3.5 and 2.5 < r["ratio"][1].item() < 3.5
    assert 450 / kurt(t)[0].item() < 10 <= 450 / kurt(t)[1].item()
    assert r["judged"].tolist() == [True, True] and r["significant"].tolist() == [False, True]
    assert r["large"].tolist() == [False, True]
    # standardized on itself: exact means 0 / stds 1 (population or sample std); training statistics are not exact
    z = (b - b.mean(0)) / b.std(0)
    assert standardized_on_itself(z.mean(0), z.std(0, unbiased=False), 300)
    t = (b - a.mean(0)) / a.std(0).clamp_min(1e-8)
    assert not standardized_on_itself(t.mean(0), t.std(0, unbiased=False), 300)


def test_token_inputs_are_not_compared_for_scale(tmp_path):
    from lightning_recipe._core.scan import _Scan

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 30, (400, 12), generator=g)
    y = torch.randint(0, 4, (400,), generator=g)
    t, v = _Scan("auto"), _Scan("auto")
    t.add(ids[:300], y[:300], ids[:300])
    v.add(ids[300:] * 3, y[300:], ids[300:] * 3)  # other ids: not a scale
    t.finish()
    v.finish()
    f = DataCheck()._shift(t, v, 0)
    assert "inputs" not in f.details and f.details["labels"]["status"] == "pass" and f.status == "pass"
