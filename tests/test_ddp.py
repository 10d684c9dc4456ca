"""Distributed safety on CPU: 2 processes (``ddp_spawn``, gloo), each rank with different labels.

* the label counts are reduced across ranks: ``HeadBiasInit`` sets the *global* prior on both ranks;
* a check that fails on one rank only stops both ranks with ``RecipeCheckError`` (no hang);
* the report and the figures are written once (global rank zero).

Each rank builds its own dataset in ``train_dataloader`` (``use_distributed_sampler=False``). What happens inside
the workers is written to small JSON files, since callback objects do not travel back from spawned processes.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from helpers import SpawnDDP, TinyModel, blobs
from lightning_recipe.checks.head_bias import HeadBiasInit
from lightning_recipe.checks.initial_loss import InitialLossCheck
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.checks.prediction_dynamics import PredictionDynamics
from lightning_recipe.presets import Recipe

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

# per-rank label priors: rank 0 mostly class 0, rank 1 mostly class 3
RANK_PRIORS = {0: [0.7, 0.1, 0.1, 0.1], 1: [0.1, 0.1, 0.1, 0.7]}
N = 96


def _rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return blobs(n=N, priors=RANK_PRIORS[rank], seed=rank)


class RankModel(TinyModel):
    """Each rank trains on its own labels; ``scale_rank`` multiplies that rank's inputs (a failure on one rank)."""

    def __init__(self, scale_rank: int = -1) -> None:
        super().__init__()
        self.scale_rank = scale_rank

    def train_dataloader(self) -> DataLoader:
        x, y = _rank_data(self.global_rank)
        if self.global_rank == self.scale_rank:
            x = x * 1000.0
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


class Probe(Callback):
    """Writes, per rank, the head bias after the recipe callbacks' ``on_train_start``, and counts report/figure
    writes (patched in each worker)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def _log(self, rank: int, event: str) -> None:
        with open(os.path.join(self.out, f"events{rank}.txt"), "a") as f:
            f.write(event + "\n")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        import matplotlib.figure

        import lightning_recipe._core.base as base

        rank, probe = trainer.global_rank, self
        write_reports, savefig = base._write_reports, matplotlib.figure.Figure.savefig

        def counted_reports(*args: Any, **kwargs: Any) -> Any:
            probe._log(rank, "report")
            return write_reports(*args, **kwargs)

        def counted_savefig(fig: Any, *args: Any, **kwargs: Any) -> Any:
            probe._log(rank, "figure")
            return savefig(fig, *args, **kwargs)

        base._write_reports = counted_reports
        matplotlib.figure.Figure.savefig = counted_savefig

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        with open(os.path.join(self.out, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"bias": pl_module.net[-1].bias.detach().tolist()}, f)


def _fit(tmp_path: Any, model: RankModel, on_fail: str = "raise", nested: bool = False) -> L.Trainer:
    checks: list[Callback] = [
        HeadBiasInit(on_fail=on_fail),  # type: ignore[arg-type]
        InitialLossCheck(on_fail=on_fail),  # type: ignore[arg-type]
        LossDecreaseCheck(on_fail=on_fail, check_every_n_steps=3, warmup_steps=6),  # type: ignore[arg-type]
        PredictionDynamics(on_fail=on_fail, every_n_steps=3),  # type: ignore[arg-type]
    ]
    # nested: held by one Recipe, as the presets hold their checks
    callbacks = [*([Recipe(callbacks=checks)] if nested else checks), Probe(str(tmp_path))]
    t = L.Trainer(
        callbacks=callbacks, strategy=SpawnDDP(), accelerator="cpu", devices=2, max_epochs=2,
        use_distributed_sampler=False,
        default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    L.seed_everything(0)
    t.fit(model)
    return t


def _global_prior() -> list[float]:
    counts = sum(torch.bincount(_rank_data(r)[1], minlength=4).double() for r in (0, 1))
    return torch.log(counts / counts.sum()).tolist()


def _events(tmp_path: Any, rank: int) -> list[str]:
    p = os.path.join(tmp_path, f"events{rank}.txt")
    return open(p).read().split() if os.path.exists(p) else []


def test_global_prior_and_single_writer(tmp_path: Any) -> None:
    t = _fit(tmp_path, RankModel())
    prior = _global_prior()
    for r in (0, 1):
        local = torch.log(torch.bincount(_rank_data(r)[1], minlength=4).double() / N).tolist()
        bias = json.load(open(os.path.join(tmp_path, f"rank{r}.json")))["bias"]
        assert bias == pytest.approx(prior, abs=1e-5)  # the global prior on every rank
        assert max(abs(a - b) for a, b in zip(bias, local)) > 0.5  # not the rank's own
    report = json.load(open(os.path.join(tmp_path, "recipe", "report.json")))
    checks = [f["check"] for f in report["findings"]]
    assert checks.count("HeadBiasInit") == 1 and checks.count("InitialLossCheck") == 1  # rank zero's findings
    assert _events(tmp_path, 1) == []  # rank 1 wrote nothing
    events0 = _events(tmp_path, 0)
    assert events0.count("report") == 1 and events0.count("figure") >= 1
    assert os.path.exists(os.path.join(tmp_path, "recipe", "prediction_dynamics.png"))
    # the parent's callbacks get rank zero's findings back (the fit ran on copies of them in the workers)
    from lightning_recipe.findings import collect_findings

    got = [(f.check, f.status, f.measured) for f in collect_findings(t)]
    assert got and got == [(f["check"], f["status"], f["measured"]) for f in report["findings"]]
    assert [f.status for f in t.callbacks[0].findings] == ["pass"]  # HeadBiasInit's own list, in the parent
    assert collect_findings(t) == collect_findings(t)  # read back once, kept


@pytest.mark.parametrize("nested", [False, True], ids=["callbacks", "recipe"])
def test_failure_on_one_rank_stops_both(tmp_path: Any, nested: bool) -> None:
    with pytest.raises(Exception, match="RecipeCheckError") as err:
        _fit(tmp_path, RankModel(scale_rank=1), nested=nested)
    assert "InitialLossCheck" in str(err.value)
    # both ranks ran HeadBiasInit with the global prior before the failure; rank zero saved the report
    for r in (0, 1):
        bias = json.load(open(os.path.join(tmp_path, f"rank{r}.json")))["bias"]
        assert bias == pytest.approx(_global_prior(), abs=1e-5)
    report = json.load(open(os.path.join(tmp_path, "recipe", "report.json")))
    initial = [f for f in report["findings"] if f["check"] == "InitialLossCheck"]
    # rank zero's own finding (it passed there) and rank one's failure, which stopped the fit
    assert [f["status"] for f in initial] == ["pass", "fail"]
    assert initial[1]["message"].startswith("(on rank 1) InitialLossCheck:") and initial[1]["measured"] > initial[0]["measured"]
    assert _events(tmp_path, 1) == [] and _events(tmp_path, 0).count("report") == 1


def test_mlflow_run_folder_under_ddp(tmp_path: Any) -> None:
    """Under DDP with an MLflow first logger, the report goes to the run's own folder,
    ``<save_dir>/<experiment id>/<run id>/recipe``, named by rank zero (the run exists there only) and written once;
    the shared ``<save_dir>/recipe`` is not used."""
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLFlowLogger(experiment_name="ddp", tracking_uri=uri, save_dir=str(tmp_path))
    t = L.Trainer(
        callbacks=[LossDecreaseCheck(check_every_n_steps=3, warmup_steps=6), Probe(str(tmp_path))],
        strategy=SpawnDDP(), accelerator="cpu", devices=2, max_epochs=2, use_distributed_sampler=False,
        default_root_dir=str(tmp_path), logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    L.seed_everything(0)
    t.fit(RankModel())
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("ddp")
    (run,) = client.search_runs([experiment.experiment_id])
    reports = sorted(glob.glob(os.path.join(str(tmp_path), "**", "report.json"), recursive=True))
    assert reports == [os.path.join(str(tmp_path), experiment.experiment_id, run.info.run_id, "recipe", "report.json")]
    assert _events(tmp_path, 1) == [] and _events(tmp_path, 0).count("report") == 1
