"""Every example runs (short mode) with no failed finding, and each one's deliberate bug is caught."""

from __future__ import annotations

import glob
import importlib
import json
import math
import os
from typing import Any

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.fixture()
def example(monkeypatch):
    """Import an example's module from ``examples/`` (one torch thread: the tiny models gain nothing from more)."""
    monkeypatch.syspath_prepend(EXAMPLES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield importlib.import_module
    torch.set_num_threads(threads)


def _report(root: Any) -> dict[str, Any]:
    (path,) = glob.glob(os.path.join(str(root), "*", "version_0", "recipe", "report.json"))
    with open(path) as fh:
        return json.load(fh)


def _finding(report: dict[str, Any], check: str) -> dict[str, Any]:
    return next(f for f in report["findings"] if f["check"] == check)


@pytest.mark.parametrize("name", ["digits", "breast_cancer", "diabetes", "charlm"])
def test_example_is_healthy(example, name, tmp_path, capsys):
    code = example(name).main(["--fast", "--root-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = _report(tmp_path)
    assert report["summary"]["fail"] == 0
    statuses = {f["check"]: f["status"] for f in report["findings"]}
    for check in ("HeadBiasInit", "InitialLossCheck", "LossDecreaseCheck", "PredictionDynamics"):
        assert statuses.get(check) == "pass", (check, statuses)
    run = os.path.join(str(tmp_path), name, "version_0")
    assert os.path.join(run, "recipe", "report.html") in out
    for produced in ("recipe/loss_curve.png", "recipe/prediction_dynamics.png", "metrics.csv"):
        assert os.path.exists(os.path.join(run, produced)), produced
    assert glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*"))

    bias, initial = _finding(report, "HeadBiasInit"), _finding(report, "InitialLossCheck")
    if name == "diabetes":  # the head starts at the training mean, the constant loss is the target variance
        from sklearn.datasets import load_diabetes
        from sklearn.model_selection import train_test_split

        _, y = load_diabetes(return_X_y=True, scaled=False)
        y_train = train_test_split(y, test_size=0.25, random_state=0)[0]
        assert bias["details"]["bias"] == [pytest.approx(y_train.mean(), rel=1e-4)]  # ~152
        assert bias["measured"] == pytest.approx(y_train.var(), rel=1e-3)  # ~5,900
        assert bias["expected"] > 4 * bias["measured"]  # E[y^2] at PyTorch's initial bias: ~29,000
    elif name == "breast_cancer":  # log-odds of about 1 positive in 10; the constant loss is the label entropy
        (b,) = bias["details"]["bias"]
        assert -2.6 < b < -2.0
        p = 1 / (1 + math.exp(-b))
        assert bias["measured"] == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)), rel=1e-4)
    elif name == "digits":  # ten nearly balanced classes: the first loss is log(10)
        assert initial["expected"] == pytest.approx(math.log(10), abs=0.02)
        assert initial["measured"] == pytest.approx(math.log(10), abs=0.05)
    else:  # characters: the unigram entropy, far below log(vocabulary size)
        assert bias["measured"] < 0.8 * math.log(len(bias["details"]["bias"]))
        assert initial["measured"] == pytest.approx(bias["measured"], rel=0.1)
    assert initial["details"]["lower"] <= initial["measured"] <= initial["details"]["upper"]


@pytest.mark.parametrize(
    "name, bug, check",
    [
        ("digits", "scale", ("InitialLossCheck",)),
        ("breast_cancer", "no-standardize", ("InitialLossCheck",)),
        ("diabetes", "constant-inputs", ("LossDecreaseCheck", "InputDependenceCheck")),
        ("charlm", "shuffle-targets", ("LossDecreaseCheck", "InputDependenceCheck")),
    ],
)
def test_example_bug_is_caught(example, name, bug, check, tmp_path, capsys):
    code = example(name).main(["--fast", "--root-dir", str(tmp_path), "--break", bug])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "A recipe check stopped the fit" in out and "Likely causes" in out
    report = _report(tmp_path)
    failed = [f for f in report["findings"] if f["status"] == "fail"]
    assert len(failed) == 1 and failed[0]["check"].split(".")[0] in check, failed
    f = failed[0]
    if f["check"] == "InitialLossCheck":  # far above the constant-prediction loss
        assert f["measured"] > f["details"]["upper"] > f["expected"]
    elif f["check"].startswith("InputDependenceCheck"):  # zeroing the inputs changes nothing
        assert "zeroed inputs are not clearly worse" in f["message"]
    else:  # stuck at the loss of the best constant prediction: only the label prior was learned
        assert f["check"] in ("LossDecreaseCheck.decrease", "LossDecreaseCheck.plateau")
        assert f["measured"] == pytest.approx(_finding(report, "HeadBiasInit")["measured"], rel=0.1)
