import json
import warnings

import lightning as L
import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer

import lightning_recipe as lr
from lightning_recipe import RecipeCheckError, RecipeWarning, collect_findings


def _broken():
    m = TinyModel(out_dim=4)
    with torch.no_grad():
        m.net[-1].weight.mul_(50)
    return m


def test_strict_raises_and_still_writes_the_report(tmp_path):
    x, y = blobs(n=256)
    t = trainer(tmp_path, lr.strict(), max_epochs=2)
    with pytest.raises(RecipeCheckError, match="InitialLossCheck"):
        t.fit(_broken(), loader(x, y))
    report = json.loads((tmp_path / "recipe" / "report.json").read_text())
    statuses = {f["check"]: f["status"] for f in report["findings"]}
    assert statuses["HeadBiasInit"] == "pass" and statuses["InitialLossCheck"] == "fail"
    assert report["summary"]["fail"] == 1
    md = (tmp_path / "recipe" / "report.md").read_text()
    assert "| InitialLossCheck | fail |" in md and "last layer initialised too large" in md
    assert (tmp_path / "recipe" / "report.html").exists()
    assert t.global_step == 1  # stopped after the first step


def test_recommended_warns_and_training_completes(tmp_path):
    x, y = blobs(n=256)
    t = trainer(tmp_path, lr.recommended(), max_epochs=2)
    with pytest.warns(RecipeWarning, match="far ABOVE"):
        t.fit(_broken(), loader(x, y))
    assert t.state.finished and t.global_step == 16
    assert [f.status for f in collect_findings(t) if f.check == "InitialLossCheck"] == ["fail"]


def test_healthy_strict_fit_has_no_failure(tmp_path):
    L.seed_everything(0)
    x, y = blobs(n=1024, priors=[0.5, 0.3, 0.15, 0.05])
    t = trainer(tmp_path, lr.strict(), max_epochs=5)
    t.fit(TinyModel(), loader(x[128:], y[128:]), loader(x[:128], y[:128], shuffle=False))
    findings = collect_findings(t)
    assert not [f for f in findings if f.status == "fail"], findings
    assert {f.check for f in findings} >= {"HeadBiasInit", "InitialLossCheck", "LossDecreaseCheck", "PredictionDynamics"}
    report = json.loads((tmp_path / "recipe" / "report.json").read_text())
    assert len(report["findings"]) == len(findings)
    assert {p.split("/")[-1] for p in report["figures"]} >= {"loss_curve.png", "prediction_dynamics.png"}


def test_strict_fit_reports_an_imbalance_as_a_note_and_never_raises_or_warns_for_it(tmp_path):
    """A 45:1 imbalance with HeadBiasInit in the bundle: a note in report.json and report.md, no exception."""
    L.seed_everything(0)
    x, y = blobs(n=1200, classes=3, priors=[0.9, 0.08, 0.02])
    counts = torch.bincount(y[200:], minlength=3).double()
    t = trainer(tmp_path, lr.strict(), max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(TinyModel(out_dim=3), loader(x[200:], y[200:]), loader(x[:200], y[:200], shuffle=False))
    assert not [w for w in caught if issubclass(w.category, RecipeWarning) and "imbalance" in str(w.message)]
    notes = [f for f in collect_findings(t) if f.status == "note"]
    assert "DataCheck.balance" in [f.check for f in notes]
    report = json.loads((tmp_path / "recipe" / "report.json").read_text())
    balance = next(f for f in report["findings"] if f["check"] == "DataCheck.balance")
    assert balance["status"] == "note" and balance["measured"] == pytest.approx(float(counts.max() / counts.min()))
    assert report["summary"]["note"] == len(notes) and report["summary"]["fail"] == 0
    md = (tmp_path / "recipe" / "report.md").read_text()
    assert "| DataCheck.balance | note |" in md and "### DataCheck.balance (note)" in md
