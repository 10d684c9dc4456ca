"""The ``Recipe`` composite callback from a LightningCLI YAML configuration."""

from __future__ import annotations

import json
import os
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from helpers import TinyModel, blobs, loader
from lightning_recipe.findings import collect_findings
from lightning_recipe.presets import Recipe

pytest.importorskip("jsonargparse")


class BlobsData(L.LightningDataModule):
    """Four imbalanced Gaussian blobs (class priors 0.55/0.25/0.15/0.05)."""

    def __init__(self, n: int = 256, batch_size: int = 32) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> Any:
        x, y = blobs(self.n, priors=[0.55, 0.25, 0.15, 0.05])
        return loader(x, y, batch_size=self.batch_size)


def first_two(batch: Any) -> tuple[Any, Any]:
    """A `split_batch` given by import path in the YAML."""
    return batch[0], batch[1]


def _config(tmp_path, class_path: str, init_args: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""
seed_everything: 0
trainer:
  max_epochs: 13
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  accelerator: cpu
  devices: 1
  default_root_dir: {tmp_path}
  callbacks:
    - class_path: {class_path}
      init_args:
{init_args}
model:
  in_dim: 8
  out_dim: 4
"""
    )
    return str(path)


def test_lightning_cli_fit_runs_the_recipe(tmp_path):
    config = _config(tmp_path, "lightning_recipe.Recipe", "        preset: strict\n        head: net.2")
    cli = LightningCLI(TinyModel, BlobsData, args=["fit", "--config", config], save_config_callback=None)
    (recipe,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, Recipe)]
    assert recipe.preset == "strict" and all(cb.on_fail == "raise" for cb in recipe.callbacks)
    findings = collect_findings(cli.trainer)
    statuses = {f.check: f.status for f in findings}
    for check in ("HeadBiasInit", "InitialLossCheck", "LossDecreaseCheck", "PredictionDynamics"):
        assert statuses.get(check) == "pass", (check, statuses)
    assert not any(f.failed for f in findings)
    assert cli.trainer.global_step == 104
    # the head named in the YAML got the log-prior bias; every check ran on the trainer LightningCLI built
    counts = torch.bincount(blobs(256, priors=[0.55, 0.25, 0.15, 0.05])[1], minlength=4).double()
    prior = torch.tensor(next(cb for cb in recipe.callbacks if type(cb).__name__ == "HeadBiasInit").prior, dtype=torch.float64)
    assert torch.allclose(prior - prior.mean(), counts.log() - counts.log().mean(), atol=1e-4)
    with open(os.path.join(str(tmp_path), "recipe", "report.json")) as fh:
        report = json.load(fh)
    assert report["summary"]["fail"] == 0 and len(report["findings"]) == len(recipe.findings)


@pytest.mark.parametrize("class_path", ["lightning_recipe.Recipe", "lightning_recipe.presets.Recipe"])
def test_lightning_cli_parses_preset_and_overrides(tmp_path, class_path):
    init_args = ("        preset: recommended\n        task: multiclass\n        split_batch: test_cli.first_two\n"
                 "        exclude: [BatchIndependenceCheck, ReproducibilityCheck]")
    cli = LightningCLI(TinyModel, BlobsData, args=["--config", _config(tmp_path, class_path, init_args)], run=False,
                       save_config_callback=None)
    (recipe,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, Recipe)]
    assert [cb.on_fail for cb in recipe.callbacks] == ["warn"] * len(recipe.callbacks) == ["warn"] * 12
    assert not {"BatchIndependenceCheck", "ReproducibilityCheck"} & {type(cb).__name__ for cb in recipe.callbacks}
    assert all(cb._settings.split_batch is first_two and cb._settings.task == "multiclass" for cb in recipe.callbacks)


def test_lightning_cli_rejects_an_unknown_preset(tmp_path, capsys):
    config = _config(tmp_path, "lightning_recipe.presets.Recipe", "        preset: loose")
    with pytest.raises(SystemExit):
        LightningCLI(TinyModel, BlobsData, args=["--config", config], run=False, save_config_callback=None)
    assert "loose" in capsys.readouterr().err
