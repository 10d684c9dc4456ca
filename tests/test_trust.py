"""Severity by measurement: no RecipeWarning on healthy fits of families unlike the other tests' MLPs on blobs.

``fail`` = a bug with near certainty, ``warn`` = a likely problem, calibrated never to fire on healthy fits, anything
else a ``note``: in the report and ``collect_findings``, never a warning, never an exception.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from _trust_models import MaskedTransformer, broken_fixtures, digits, healthy_fixtures, sequences
from _trust_models import loader as seq_loader
from helpers import TinyModel, blobs, loader, trainer
from torch import nn

from lightning_recipe import DataCheck, HeadBiasInit, PredictionDynamics, RecipeWarning, collect_findings
from lightning_recipe.findings import status_counts


class _NoWarnings:
    def __enter__(self):
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", RecipeWarning)

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)


def _dynamics(tmp_path, model, x, y, epochs=3, every=3, seed=0):
    torch.manual_seed(seed)
    split = int(0.85 * len(y))
    cb = PredictionDynamics(every_n_steps=every, num_samples=32, on_fail="raise")
    tr = trainer(tmp_path, [cb], max_epochs=epochs, num_sanity_val_steps=1, limit_val_batches=1)
    tr.fit(model, seq_loader(x[:split], y[:split]), seq_loader(x[split:], y[split:], shuffle=False))
    eval_mode, jitter = cb.findings
    assert eval_mode.status == "pass"  # dropout and BatchNorm are deterministic in eval
    return jitter


# -- PredictionDynamics.jitter ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(healthy_fixtures()))
def test_healthy_fits_of_other_families_never_warn_about_jitter(tmp_path, name):
    model, x, y = healthy_fixtures()[name]
    with _NoWarnings():
        f = _dynamics(tmp_path, model, x, y)
    assert f.status in ("pass", "note") and f.details["snapshots"] >= 25
    assert f.expected == pytest.approx(f.details["noise_reference"] / 2)


def test_a_healthy_transformer_that_thrashes_is_a_note_not_a_warning(tmp_path):
    """The false alarm this level exists for: a transformer at Adam 3e-3 (78-88% accuracy) jitters like a too-high
    learning rate once converged (index 0.18-0.22 against 0.107, jitter 0.13-0.15)."""
    x, y = sequences(n=512, padded=True)
    with _NoWarnings():
        f = _dynamics(tmp_path, MaskedTransformer(lr=3e-3), x, y, epochs=12, every=6)
    assert f.status == "note" and f.check == "PredictionDynamics.jitter" and "THRASH" in f.message
    assert f.measured > 1.5 * f.expected and f.details["jitter"] > 0.1
    assert "Healthy fits that have converged reach this too" in f.message


@pytest.mark.parametrize("name", list(broken_fixtures()))
def test_too_high_learning_rates_thrash_as_a_note(tmp_path, name):
    """SGD lr=0.5 with momentum 0.9 on an MLP, Adam lr=0.3 on an LSTM: index 0.22-0.25 against 0.10-0.11."""
    model, x, y = broken_fixtures()[name]
    with _NoWarnings():
        f = _dynamics(tmp_path, model, x, y)
    assert f.status == "note" and "THRASH" in f.message and f.failed is False
    assert f.measured > 1.5 * f.expected and f.details["jitter"] > 0.15
    assert "learning rate too high: each step overshoots and the next one corrects" in f.causes


# -- DataCheck.scale ------------------------------------------------------------------------------------------------
def _data(tmp_path, model, x, y, callbacks=(), **kw):
    cb = DataCheck(figure=False, **kw)
    tr = trainer(tmp_path, [*callbacks, cb], max_steps=1, limit_val_batches=0, num_sanity_val_steps=0)
    tr.fit(model, loader(x, y, 64))
    return {f.check.split(".")[-1]: f for f in cb.findings}, tr


def test_digits_scaled_to_unit_range_are_on_scale(tmp_path):
    x, y = digits()  # /16: border pixels nearly always 0 (pixel 56: mean 4.6e-05, std 0.0017)
    with _NoWarnings():
        f, _ = _data(tmp_path, TinyModel(in_dim=64, out_dim=10), x, y)
    s = f["scale"]
    std = x.double().std(0, unbiased=False)
    judged = int((std > 0).sum())
    assert s.status == "pass" and s.details["judged"] == judged == 61 and s.details["off"] == []
    assert float(std[std > 0].min()) < 0.01  # the old rule (std < 1 / factor**2) judged these off scale
    # the worst feature is a border pixel whose values reach 1/16: judged by its magnitude, well on scale
    assert s.details["worst"]["max_abs"] == 0.0625 and s.details["worst"]["std"] < 0.01
    assert s.details["min"] == 0.0 and s.details["max"] == 1.0


def test_raw_digits_and_raw_pixels_and_mixed_units_still_warn(tmp_path):
    x, y = digits(scaled=False)  # 0..16: 8 pixels have a mean above 10 (up to 12.09)
    with pytest.warns(RecipeWarning, match="far from a standardised scale"):
        f, _ = _data(tmp_path, TinyModel(in_dim=64, out_dim=10), x, y)
    mean, std = x.double().mean(0), x.double().std(0, unbiased=False)
    judged = int(((std > 0) & ~((x == 0) | (x == 1)).all(0)).sum())  # not constant, not 0/1 only
    assert f["scale"].status == "warn" and len(f["scale"].details["off"]) == int((mean > 10).sum()) == 8
    assert f["scale"].details["judged"] == judged == 58 and f["scale"].measured == pytest.approx(8 / 58)
    # measured: an MLP on these raw values reaches 36-46% validation accuracy with SGD + momentum (lr 0.05), 96% on
    # digits / 16 (Adam copes: 94%); so a person should standardise, and the warning stays
    with pytest.warns(RecipeWarning, match="far from a standardised scale"):  # 0..255 pixels, flattened
        f, _ = _data(tmp_path, TinyModel(in_dim=64, out_dim=10), (x * 16).clamp(max=255), y)
    assert f["scale"].status == "warn" and f["scale"].details["worst"]["max_abs"] == 255.0
    g = torch.Generator().manual_seed(0)
    age, income = 40 + 12 * torch.randn(512, generator=g), 5e4 + 2e4 * torch.randn(512, generator=g)
    with pytest.warns(RecipeWarning, match="far from a standardised scale"):
        f, _ = _data(tmp_path, TinyModel(in_dim=2, out_dim=2), torch.stack([age, income], 1), (age > 40).long())
    assert f["scale"].details["off"] == ["0", "1"] and f["scale"].details["worst"]["index"] == 1  # income


def test_a_feature_in_a_wrong_small_unit_still_warns(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 4, generator=g)
    x[:, 2] *= 1e-4  # every value under 0.01: a feature in the wrong unit
    with pytest.warns(RecipeWarning, match="far from a standardised scale"):
        f, _ = _data(tmp_path, TinyModel(in_dim=4, out_dim=2), x, (x[:, 0] > 0).long())
    s = f["scale"]
    assert s.details["off"] == ["2"] and s.details["worst"]["index"] == 2
    assert s.details["worst"]["max_abs"] == pytest.approx(float(x[:, 2].abs().max())) and s.measured == 0.25


def test_one_hot_and_sparse_columns_are_on_scale(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 2000
    cont = torch.randn(n, 3, generator=g)
    cat = torch.multinomial(torch.tensor([0.6, 0.3, 0.095, 0.005]), n, replacement=True, generator=g)
    one_hot = nn.functional.one_hot(cat, 4).float()  # a rare category: 0.5% ones
    sparse_binary = (torch.rand(n, 2, generator=g) < 0.01).float()
    sparse_scaled = 0.1 * (torch.rand(n, 1, generator=g) < 0.002).float()  # a rare count scaled: std ~0.004
    sparse_scaled[0] = 0.1  # at least one non-zero value
    x = torch.cat([cont, one_hot, sparse_binary, sparse_scaled], 1)
    assert 0 < float(sparse_scaled.std(unbiased=False)) < 0.01
    with _NoWarnings():
        f, _ = _data(tmp_path, TinyModel(in_dim=10, out_dim=2), x, (cont[:, 0] > 0).long())
    s = f["scale"]
    assert s.status == "pass" and s.details["judged"] == 4  # binary columns are not judged; the scaled count is
    assert "9" not in s.details["off"] and s.details["worst"]["score"] < 10  # the sparse count: max |x| 0.1 >= 0.01


# -- DataCheck.balance ----------------------------------------------------------------------------------------------
def _multilabel(n=1000, rates=(0.5, 0.3, 0.2, 0.1, 0.05), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (torch.rand(n, len(rates), generator=g) < torch.tensor(rates)).float()
    return x, y


@pytest.mark.parametrize("bias_init", [False, True])
def test_multilabel_rare_label_is_a_note(tmp_path, bias_init):
    x, y = _multilabel()
    pos = y.sum(0)
    ratio = float(((y.shape[0] - pos) / pos).max())  # the rarest label: about 19:1
    model = TinyModel(out_dim=5, loss_fn=nn.BCEWithLogitsLoss())
    with _NoWarnings():
        f, tr = _data(tmp_path, model, x, y, [HeadBiasInit()] if bias_init else [])
    b = f["balance"]
    assert b.status == "note" and b.measured == pytest.approx(ratio) and 15 < ratio < 25
    assert b.details["multilabel"] and b.details["head_bias_init"] is bias_init
    assert b in collect_findings(tr) and status_counts(collect_findings(tr))["note"] == 1


def test_imbalance_with_head_bias_init_is_a_note_and_without_it_warns(tmp_path):
    x, y = blobs(n=1000, classes=3, priors=[0.9, 0.08, 0.02])
    counts = torch.bincount(y, minlength=3).double()
    with _NoWarnings():  # strict: a note never raises either
        f, _ = _data(tmp_path, TinyModel(out_dim=3), x, y, [HeadBiasInit()], on_fail="raise")
    b = f["balance"]
    assert b.status == "note" and b.measured == pytest.approx(float(counts.max() / counts.min()))
    assert b.details["head_bias_init"] and b.details["rarest_examples"] == float(counts.min()) >= 10
    assert "HeadBiasInit sets the head bias to the class prior" in b.message
    with pytest.warns(RecipeWarning, match="No HeadBiasInit sets the head bias"):
        f, _ = _data(tmp_path, TinyModel(out_dim=3), x, y)
    assert f["balance"].status == "warn" and not f["balance"].details["head_bias_init"]
    with pytest.warns(RecipeWarning, match="No HeadBiasInit"):  # HeadBiasInit(skip=True) sets nothing
        f, _ = _data(tmp_path, TinyModel(out_dim=3), x, y, [HeadBiasInit(skip=True)])
    assert f["balance"].status == "warn"


@pytest.mark.parametrize("case", ["few_examples", "ratio_over_1000"])
def test_extreme_imbalance_warns_even_with_head_bias_init(tmp_path, case):
    g = torch.Generator().manual_seed(0)
    rare = 5 if case == "few_examples" else 11
    n = 1000 if case == "few_examples" else 12_000
    y = torch.zeros(n, dtype=torch.long)
    y[torch.randperm(n, generator=g)[:rare]] = 1
    x = torch.randn(n, 8, generator=g) + y[:, None].float()
    ratio = (n - rare) / rare
    match = "fewer than 10" if case == "few_examples" else "Beyond 1000:1"
    with pytest.warns(RecipeWarning, match=match):
        f, _ = _data(tmp_path, TinyModel(out_dim=2), x, y, [HeadBiasInit()], on_fail="warn", max_batches=200)
    b = f["balance"]
    assert b.status == "warn" and b.measured == pytest.approx(ratio) and b.details["rarest_examples"] == rare
    assert b.details["head_bias_init"]


# -- other rules: demoted where healthy fits trip them ------------------------------------------------------------
def test_a_tiny_clip_value_under_adam_is_a_note(tmp_path):
    """Adam divides by the gradient's running scale: a clip value far below the gradient norm is meaningless but
    harmless (a note); under SGD the same clip value fails (tests/test_optimization.py)."""
    from lightning_recipe import OptimizationHealthCheck

    x, y = blobs(n=512)
    cb = OptimizationHealthCheck(on_fail="raise", check_every_n_steps=10)
    with _NoWarnings():
        trainer(tmp_path, [cb], max_steps=40, gradient_clip_val=1e-4).fit(TinyModel(lr=1e-2), loader(x, y))
    f = next(f for f in cb.findings if f.check.endswith("clipping"))
    assert f.status == "note" and f.details["clipped_fraction"] == 1.0 and f.measured >= 100
    assert "the clip value is meaningless" in f.message


def test_recommended_on_a_healthy_unseeded_fit_emits_no_recipe_warning(tmp_path, monkeypatch):
    """SGD + momentum on digits in [0, 1], no seed: before the note level it warned twice (no seed; jitter 0.123
    against 0.111). Every rule of the bundle runs; what is worth a look is in the report as notes."""
    import lightning_recipe as lr

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    model, x, y = healthy_fixtures()["mlp_sgd_momentum"]
    tr = trainer(tmp_path, lr.recommended(), max_epochs=3)
    with _NoWarnings():
        tr.fit(model, seq_loader(x[:1500], y[:1500]), seq_loader(x[1500:], y[1500:], shuffle=False))
    findings = collect_findings(tr)
    counts = status_counts(findings)
    assert counts["fail"] == counts["warn"] == 0 and counts["pass"] >= 15
    assert "ReproducibilityCheck.seed" in [f.check for f in findings if f.status == "note"]
    report = json.loads((tmp_path / "recipe" / "report.json").read_text())
    assert report["summary"] == counts


def test_preflight_prints_a_note_with_its_own_label_and_count():
    import io

    from lightning_recipe.findings import Finding
    from lightning_recipe.preflight import PreflightResult, print_result

    result = PreflightResult([Finding("DataCheck.balance", "note", "DataCheck: class imbalance: 19.8:1; a note"),
                              Finding("InitialLossCheck", "pass", "InitialLossCheck: matches")])
    out = io.StringIO()
    print_result(result, file=out)
    text = out.getvalue()
    assert "NOTE" in text and "NOTE DataCheck.balance" in text and "class imbalance: 19.8:1" in text
    assert "0 fail, 0 warn, 1 note, 1 pass, 0 skip" in text.splitlines() and not result.failed
