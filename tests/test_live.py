"""Live logging: the recipe's scalars as series and its figures redrawn during training, the findings counts on the
run, one folder per run; read back from real TensorBoard, MLflow (sqlite) and W&B (offline) files."""

from __future__ import annotations

import glob
import json
import os
import re

import lightning as L
import pytest
from helpers import TinyModel, blobs, loader, trainer
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_recipe as lr
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.exceptions import RecipeConfigError
from lightning_recipe.report import live

STEPS = 600  # 2048 examples in batches of 64: 32 batches an epoch, 18.75 epochs
FIGURES = ("recipe/loss_curve", "recipe/prediction_dynamics", "recipe/optimization_health", "recipe/generalization")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One 600-step fit under ``recommended()`` that warns (learning rate zero: nothing learns), logged to MLflow
    (first logger: the run's own folder), TensorBoard and W&B at once; live redraws every 5 reads, no time bound."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    root = tmp_path_factory.mktemp("live")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("WANDB_DIR", str(root / "wandb"))
    os.makedirs(root / "wandb")
    previous = live.set_live_figures(every_n_reads=5, time_fraction=None)
    ml = MLFlowLogger(experiment_name="live", tracking_uri=f"sqlite:///{root}/mlflow.db")
    tb = TensorBoardLogger(str(root / "tb"))
    wb = WandbLogger(save_dir=str(root / "wandb"), offline=True, project="live")
    L.seed_everything(0, verbose=False)  # the frozen network's loss depends on its initial weights
    x, y = blobs(n=2048)
    xv, yv = blobs(n=128, seed=1)
    # the preset with its prediction records every 50 batches (12 reads, like the other checks'), so that the test
    # draws each figure 3 or 4 times and stays fast
    callbacks = [*lr.recommended(exclude=["PredictionDynamics"]), lr.PredictionDynamics(50, on_fail="warn")]
    tr = trainer(root, callbacks, max_epochs=-1, max_steps=STEPS, logger=[ml, tb, wb], log_every_n_steps=50,
                 check_val_every_n_epoch=6, num_sanity_val_steps=1)
    try:
        with pytest.warns(lr.RecipeWarning):
            tr.fit(TinyModel(lr=0.0), loader(x, y, batch_size=64), loader(xv, yv, batch_size=64, shuffle=False))
    finally:
        live.set_live_figures(**previous)
    spent = live.spent(tr)
    wb_run = wb.experiment.id
    run_dirs = glob.glob(os.path.join(root, "wandb", "wandb", "offline-run-*"))
    wandb.finish()
    mp.undo()
    return {"trainer": tr, "root": root, "mlflow": ml, "tb": tb, "wandb_id": wb_run, "wandb_runs": run_dirs,
            "uri": f"sqlite:///{root}/mlflow.db", "live": spent}


def _counts(tr) -> tuple[int, int]:
    findings = lr.collect_findings(tr)
    return sum(f.status == "fail" for f in findings), sum(f.status == "warn" for f in findings)


def test_the_broken_fit_has_a_warn_and_a_fail(fitted):
    fail, warn = _counts(fitted["trainer"])
    assert fitted["trainer"].global_step == STEPS
    assert warn >= 1 and fail >= 1  # frozen predictions (warn), a loss that does not decrease (fail, warned)


def test_tensorboard_has_each_live_figure_at_several_steps_and_the_series(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(fitted["tb"].log_dir, size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    for tag in FIGURES:
        steps = sorted({e.step for e in acc.Images(tag)})
        assert len(steps) >= 3, (tag, steps)
        last = STEPS if tag != "recipe/generalization" else 576  # the last evaluation (epochs 6, 12, 18)
        assert steps[-1] == last and steps[0] < STEPS // 2, (tag, steps)  # drawn during the fit, and at its end
    series = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"] if tag.startswith("recipe/")}
    long = {tag for tag, points in series.items() if len({p.step for p in points}) >= 5}
    assert {"recipe/lr", "recipe/grad_norm", "recipe/loss_to_constant", "recipe/fail", "recipe/warn",
            "recipe/prediction_jitter"} <= long, sorted(long)
    assert all(p.value == 0.0 for p in series["recipe/lr"])  # the learning rate of this fit
    # nothing is learned: the frozen network's loss over the constant prediction's stays where it started, up to the
    # noise of the batches a read averages
    ratios = [p.value for p in series["recipe/loss_to_constant"]]
    assert min(ratios) > 0.9 and max(ratios) / min(ratios) < 1.1  # measured: 1.213 to 1.217 (seed 0)
    check = next(cb for cb in fitted["trainer"].callbacks[0].callbacks if isinstance(cb, LossDecreaseCheck))
    whole = sum(check.losses) / len(check.losses) / check.prior_loss  # the floor of the cross-entropy is 0
    assert sorted(ratios)[len(ratios) // 2] == pytest.approx(whole, rel=0.01)
    fail, warn = _counts(fitted["trainer"])
    last = series["recipe/warn"][-1]  # written last (a count that changed at the last step has two points there)
    assert (last.step, last.value) == (STEPS, warn)
    assert series["recipe/fail"][-1].value == fail
    assert series["recipe/warn"][0].value <= warn  # counted as the findings came


def test_mlflow_run_has_series_tags_report_json_and_figures_per_step(fitted, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=fitted["uri"])
    run_id = fitted["mlflow"].run_id
    history = client.get_metric_history(run_id, "recipe/loss_to_constant")
    assert len({m.step for m in history}) >= 5
    assert len(client.get_metric_history(run_id, "recipe/grad_norm")) >= 5
    fail, warn = _counts(fitted["trainer"])
    tags = client.get_run(run_id).data.tags
    assert (tags["recipe/fail"], tags["recipe/warn"]) == (str(fail), str(warn))
    assert "recipe/report.json" in {a.path for a in client.list_artifacts(run_id, "recipe")}
    local = client.download_artifacts(run_id, "recipe/report.json", str(tmp_path))
    with open(local) as fh:
        report = json.load(fh)
    assert len(report["findings"]) == len(lr.collect_findings(fitted["trainer"]))
    for tag in FIGURES:
        files = [a.path for a in client.list_artifacts(run_id, tag)]
        steps = sorted(int(re.search(r"step_(\d+)\.png$", f).group(1)) for f in files)
        assert len(steps) >= 3 and steps[-1] == (STEPS if tag != "recipe/generalization" else 576), (tag, steps)


def test_mlflow_first_logger_gives_the_run_its_own_folder(fitted):
    ml, tr = fitted["mlflow"], fitted["trainer"]
    # sqlite tracking: no local save_dir, so the run's folder is under default_root_dir, named as ModelCheckpoint's
    folder = os.path.join(str(fitted["root"]), ml.experiment_id, ml.run_id, "recipe")
    assert os.path.isfile(os.path.join(folder, "report.json"))
    assert os.path.isfile(os.path.join(folder, "loss_curve.png"))
    assert not os.path.exists(os.path.join(str(fitted["root"]), "recipe"))
    figures = [p for cb in tr.callbacks if hasattr(cb, "figures") for p in cb.figures]
    assert len(figures) >= 4 and {os.path.dirname(p) for p in figures} == {folder}  # every check writes there


def test_wandb_offline_run_has_summary_and_images_at_several_steps(fitted):
    (run_dir,) = fitted["wandb_runs"]
    fail, warn = _counts(fitted["trainer"])
    summary: dict = {}
    for kind, items in _wandb_records(run_dir):
        if kind == "summary":  # the run's summary as the run file records it (offline runs write no summary json)
            summary.update(items)
    assert (summary["recipe/fail"], summary["recipe/warn"]) == (fail, warn)
    images = os.path.join(run_dir, "files", "media", "images", "recipe")
    history = [items for kind, items in _wandb_records(run_dir) if kind == "history"]
    for tag in FIGURES:
        name = tag.split("/")[-1]
        steps = sorted(h["trainer/global_step"] for h in history if f"{tag}/filenames" in h)  # log_image's x-axis
        assert len(set(steps)) >= 3 and steps[0] < STEPS // 2, (tag, steps)
        assert len(glob.glob(os.path.join(images, f"{name}_*.png"))) == len(steps)  # one media file each
    assert os.path.isfile(os.path.join(run_dir, "files", "recipe", "report.json"))  # synced with the run


def _wandb_records(run_dir: str) -> list[tuple[str, dict]]:
    """The summary and history records of an offline run's ``run-<id>.wandb`` file (a LevelDB-style log of protobuf
    records: 32 KiB blocks, each record with a 7-byte header, split across blocks as first/middle/last parts)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    with open(path, "rb") as fh:
        data = fh.read()
    pos, block, part, records = 7, 32768, b"", []  # after the file header (":W&B", magic, version)
    while pos + 7 <= len(data):
        left = block - pos % block
        n, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if left < 7 or (kind == 0 and n == 0):  # block trailer
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            part = chunk if kind == 2 else part + chunk
        elif kind == 4:
            records.append(part + chunk)
    out = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind in ("summary", "history"):
            items = record.summary.update if kind == "summary" else record.history.item
            out.append((kind, {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}))
    return out


def test_two_mlflow_fits_into_one_save_dir_keep_two_folders(tmp_path):
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    x, y = blobs(n=256)
    folders = []
    for _ in range(2):
        ml = MLFlowLogger(experiment_name="two", tracking_uri=uri)
        cb = LossDecreaseCheck(on_fail="warn", warmup_steps=4, check_every_n_steps=4)
        trainer(tmp_path, [cb], logger=ml).fit(TinyModel(), loader(x, y))
        folders.append(os.path.join(str(tmp_path), ml.experiment_id, ml.run_id, "recipe"))
        assert os.path.isfile(os.path.join(folders[-1], "report.json"))
    assert folders[0] != folders[1]
    assert sorted(glob.glob(str(tmp_path / "*" / "*" / "recipe" / "report.json"))) == sorted(
        os.path.join(f, "report.json") for f in folders)
    # the same logger (one run) for a second fit: the run's folder keeps the first report, the second goes next to it
    trainer(tmp_path, [LossDecreaseCheck(on_fail="warn")], logger=ml).fit(TinyModel(), loader(x, y))
    assert os.path.isfile(os.path.join(folders[1] + "_1", "report.json"))


def test_wandb_first_logger_gives_the_run_its_own_folder(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    wb = WandbLogger(save_dir=str(tmp_path), offline=True, project="proj")
    x, y = blobs(n=128)
    try:
        trainer(tmp_path, [LossDecreaseCheck(on_fail="warn")], logger=wb).fit(TinyModel(), loader(x, y))
        run_id = wb.experiment.id
    finally:
        wandb.finish()
    assert os.path.isfile(os.path.join(str(tmp_path), "proj", run_id, "recipe", "report.json"))


class _Clock:
    """A fake trainer's clock for :func:`live.tick`: each drawing takes ``cost`` seconds of the fake time."""

    def __init__(self, cost: float) -> None:
        self.now, self.cost, self.drawn = 0.0, cost, []

    def draw(self, trainer) -> None:
        self.drawn.append(self.now)
        self.now += self.cost


class _FakeTrainer:
    is_global_zero = True
    loggers: list = []
    callbacks: list = []


def test_the_time_budget_bounds_the_redraws(monkeypatch):
    clock = _Clock(cost=0.2)
    monkeypatch.setattr(live.time, "perf_counter", lambda: clock.now)
    tr = _FakeTrainer()
    previous = live.set_live_figures(every_n_reads=5, time_fraction=0.01)
    try:
        live.new_fit(tr)
        for _ in range(2000):  # a read every second of training
            clock.now += 1.0
            live.tick(tr, "recipe/x", clock.draw)
    finally:
        live.set_live_figures(**previous)
    spent = live.spent(tr)
    # 2,000 s of training, 1% of it = 20 s of drawing at 0.2 s each: at most 100 drawings, each only once the
    # elapsed time pays for it (the first after its expected cost, 0.5 s before any was measured, / 1% = 50 s)
    assert spent["spent_s"] <= 0.01 * spent["elapsed_s"] + 1e-9
    assert 95 <= len(clock.drawn) <= 100
    assert clock.drawn[0] >= 50.0
    gaps = [b - a for a, b in zip(clock.drawn, clock.drawn[1:])]
    assert min(gaps) >= 5.0  # never two drawings closer than every_n_reads reads


def test_live_settings_are_checked():
    with pytest.raises(RecipeConfigError, match="every_n_reads"):
        live.set_live_figures(every_n_reads=-1)
    with pytest.raises(RecipeConfigError, match="time_fraction"):
        live.set_live_figures(time_fraction=2.0)
