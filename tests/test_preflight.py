"""``lightning-recipe preflight``: exit 0 on a healthy module, 1 on a broken one, 2 on a usage error."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from lightning_recipe.__main__ import main as cli_main
from lightning_recipe.findings import Finding
from lightning_recipe.preflight import _apply_overrides, _headline, _init_args, _load_configs, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "examples", "preflight_demo.py")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.chdir(ROOT)  # `examples.preflight_demo:Model` resolves from the folder the command runs in
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _report(out) -> dict:
    with open(os.path.join(str(out), "recipe", "report.json")) as fh:
        return json.load(fh)


def _run(tmp_path, *args: str) -> int:
    return main([*args, "--output", str(tmp_path), "--accelerator", "cpu"])


def test_healthy_module_passes(tmp_path, capsys):
    code = _run(tmp_path, f"{DEMO}:Model", f"{DEMO}:DataModule", "--steps", "50", "--overfit-steps", "100")
    out = capsys.readouterr().out
    assert code == 0, out
    report = _report(tmp_path)
    checks = {f["check"]: f["status"] for f in report["findings"]}
    assert report["summary"]["fail"] == 0
    for check in ("overfit_one_batch", "HeadBiasInit", "InitialLossCheck", "BatchIndependenceCheck",
                  "LossDecreaseCheck", "InputDependenceCheck"):
        assert checks.get(check) == "pass", (check, checks)
    initial = next(f for f in report["findings"] if f["check"] == "InitialLossCheck")
    assert initial["expected"] == pytest.approx(math.log(3), abs=0.1)  # ~label entropy of three wine cultivars
    assert "preflight passed" in out and "report: " in out and "report.html" in out
    # the seed is set before the classes are built: a second run gives the same numbers
    assert _run(tmp_path / "again", f"{DEMO}:Model", f"{DEMO}:DataModule", "--steps", "50", "--overfit-steps", "100") == 0
    again = _report(tmp_path / "again")
    assert [(f["check"], f["measured"]) for f in again["findings"]] == [(f["check"], f["measured"]) for f in report["findings"]]


def test_broken_module_fails_with_the_check_that_catches_it(tmp_path, capsys):
    # default bug: a `view` that mixes the examples of a batch
    code = _run(tmp_path, "examples.preflight_demo:BrokenModel", "examples.preflight_demo:DataModule",
                "--steps", "20", "--overfit-steps", "0")
    out = capsys.readouterr().out
    assert code == 1, out
    failed = {f["check"]: f for f in _report(tmp_path)["findings"] if f["status"] == "fail"}
    assert "BatchIndependenceCheck" in failed
    assert failed["BatchIndependenceCheck"]["measured"] > 0.5  # leak relative to the example's own gradient
    assert "FAIL BatchIndependenceCheck" in out and "Likely causes:" in out and "preflight FAILED" in out


def test_overrides_and_config_file(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        "seed_everything: 3\n"
        "model:\n  class_path: examples.preflight_demo.BrokenModel\n  init_args:\n    bug: mix-batch\n    hidden: 16\n"
        "data:\n  class_path: examples.preflight_demo.DataModule\n  init_args:\n    batch_size: 32\n"
    )
    code = _run(tmp_path / "run", "--config", str(config), "--model.init_args.bug=head-scale", "--steps", "20",
                "--overfit-steps", "0")
    out = capsys.readouterr().out
    assert code == 1, out
    failed = [f for f in _report(tmp_path / "run")["findings"] if f["status"] == "fail"]
    initial = next(f for f in failed if f["check"] == "InitialLossCheck")
    assert initial["measured"] > initial["details"]["upper"] > initial["expected"]  # a 100x head: far above log 3
    # the config, then the command line (later wins); values parsed as YAML
    cfg = _load_configs([str(config)])
    _apply_overrides(cfg, ["--model.init_args.bug=head-scale", "--data.init_args.batch_size", "8", "--model.lr=0.5"])
    assert _init_args(cfg["model"]) == {"bug": "head-scale", "hidden": 16, "lr": 0.5}
    assert _init_args(cfg["data"]) == {"batch_size": 8}


@pytest.mark.parametrize(
    "args, message",
    [
        (["nowhere.module:Model"], "cannot import 'nowhere.module'"),
        ([f"{DEMO}:Nope"], "has no attribute 'Nope'"),
        ([f"{DEMO}:Model", "--model.init_args.width=3"], "cannot build the model Model(width)"),
        ([f"{DEMO}:Model", "--bogus=1"], "unknown argument '--bogus=1'"),
        ([], "MODEL is missing"),
        ([f"{DEMO}:Model"], "Model has no train_dataloader(): pass a LightningDataModule as DATA"),
    ],
)
def test_usage_errors_exit_2(tmp_path, capsys, args, message):
    assert _run(tmp_path, *args) == 2
    assert message in capsys.readouterr().err


def test_command_dispatch(capsys):
    assert cli_main(["--help"]) == 0
    assert "preflight MODEL [DATA]" in capsys.readouterr().out
    assert cli_main([]) == 2
    assert cli_main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


def test_headline_keeps_the_sentence_before_the_details():
    f = Finding("InitialLossCheck", "fail", "InitialLossCheck: the first training loss is far ABOVE the loss of the "
                "constant prediction: measured 40, expected 2.3 (log(10): 2.3)")
    assert _headline(f) == "the first training loss is far ABOVE the loss of the constant prediction"
    f = Finding("InitialLossCheck", "pass", "InitialLossCheck: measured 2.31, expected 2.30 (the loss of predicting "
                "the bias (CrossEntropyLoss, 10 outputs) on the first batch); healthy range [2.0, 4.8]")
    assert _headline(f) == "measured 2.31, expected 2.30"


def test_python_dash_m_exits_nonzero_on_a_broken_module(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_recipe", "preflight", "examples/preflight_demo.py:BrokenModel",
         "examples/preflight_demo.py:DataModule", "--model.init_args.bug=head-scale", "--steps", "10",
         "--overfit-steps", "0", "--output", str(tmp_path), "--accelerator", "cpu"],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "InitialLossCheck" in proc.stdout
    assert os.path.exists(os.path.join(str(tmp_path), "recipe", "report.html"))


_DICT_MODULE = '''
import torch, lightning as L
from torch import nn
from torch.utils.data import DataLoader


class Model(L.LightningModule):
    """Healthy, but its batches are dicts with keys no convention knows."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        return self.loss_fn(self(batch["pixels"]), batch["cls"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 3, (256,), generator=g)
        x = torch.randn(256, 8, generator=g) + 2 * y[:, None].float()
        return DataLoader([{"pixels": a, "cls": b} for a, b in zip(x, y)], batch_size=32)


def split(batch):
    return batch["pixels"], batch["cls"]
'''


def test_preflight_is_not_passed_when_the_core_checks_could_not_run(tmp_path, capsys):
    module = tmp_path / "dict_batches.py"
    module.write_text(_DICT_MODULE)
    code = _run(tmp_path / "bare", f"{module}:Model", "--steps", "20", "--overfit-steps", "50")
    out = capsys.readouterr().out
    assert code == 1, out
    assert "preflight INCOMPLETE" in out and "--split-batch module:function" in out
    report = _report(tmp_path / "bare")
    skipped = {f["check"] for f in report["findings"] if f["status"] == "skip"}
    assert {"overfit_one_batch", "InitialLossCheck", "BatchIndependenceCheck"} <= skipped
    assert report["summary"]["fail"] == 0  # nothing failed: the verdict is "could not check", not "broken"
    # with the argument the hint names, the same module passes
    code = _run(tmp_path / "split", f"{module}:Model", "--steps", "20", "--overfit-steps", "200",
                "--split-batch", f"{module}:split")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "preflight passed" in out


_SIDE_EFFECT_MODULE = '''
import os
import torch, lightning as L
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def side_effect(**kwargs):
    open(os.environ["MARKER"], "w").write("ran")


class Model(L.LightningModule):
    def __init__(self, extra=None):
        super().__init__()
        self.extra = extra
        self.net = nn.Linear(8, 3)

    def forward(self, x):
        return self.net(x)
'''


def test_config_builds_only_what_lightning_cli_would_build(tmp_path, capsys, monkeypatch):
    from lightning_recipe.preflight import _build
    from lightning_recipe.exceptions import RecipeConfigError

    module = tmp_path / "side.py"
    module.write_text(_SIDE_EFFECT_MODULE)
    marker = tmp_path / "marker"
    monkeypatch.setenv("MARKER", str(marker))
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  class_path: {module}:Model\n  init_args:\n    extra:\n"
                      f"      class_path: {module}:side_effect\n")
    assert _run(tmp_path / "run", "--config", str(config), "--steps", "10") == 2
    assert "preflight builds only what LightningCLI would" in capsys.readouterr().err
    assert not marker.exists()  # the callable never ran
    with pytest.raises(RecipeConfigError, match="class_path 'os.getcwd'"):
        _build({"class_path": "os.getcwd"})
    built = _build({"class_path": "torch.nn.Linear", "init_args": {"in_features": 2, "out_features": 3}})
    assert isinstance(built, torch.nn.Linear) and built.out_features == 3
    # the top-level classes are checked before they are built
    assert _run(tmp_path / "top", f"{module}:side_effect", "--steps", "10") == 2
    assert "MODEL must be a LightningModule class" in capsys.readouterr().err and not marker.exists()


_PL_MODULE = '''
import torch, pytorch_lightning as PL
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Model(PL.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, i):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-2)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 3, (256,), generator=g)
        x = torch.randn(256, 8, generator=g) + 2 * y[:, None].float()
        return DataLoader(TensorDataset(x, y), batch_size=32)
'''


def test_pytorch_lightning_modules_are_accepted(tmp_path, capsys):
    pytest.importorskip("pytorch_lightning")
    module = tmp_path / "pl_module.py"
    module.write_text(_PL_MODULE)
    code = _run(tmp_path / "run", f"{module}:Model", "--steps", "20", "--overfit-steps", "200")
    out = capsys.readouterr().out
    assert code == 0, out
    checks = {f["check"]: f["status"] for f in _report(tmp_path / "run")["findings"]}
    assert checks["overfit_one_batch"] == "pass" and checks["InitialLossCheck"] == "pass"
