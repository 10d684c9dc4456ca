"""The logger bridge: figures, scalars and the report reach every real logger, are read back, and nothing leaks."""

from __future__ import annotations

import csv
import gc
import glob
import os
import weakref

import lightning as L
import pytest
from helpers import blobs, loader, TinyModel, trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from lightning_recipe.report.loggers import log_figure, log_file, log_scalars, log_text
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.checks.prediction_dynamics import PredictionDynamics

STEPS = 32  # 1 epoch of 1024 samples in batches of 32


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One fit of a healthy classifier with the four real loggers at once (their start-up dominates the cost)."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    root = tmp_path_factory.mktemp("loggers")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(root / "wandb_dir")}
    os.makedirs(env["WANDB_DIR"])
    mp = pytest.MonkeyPatch()
    for k, v in env.items():
        mp.setenv(k, v)
    tb = TensorBoardLogger(str(root / "tb"))
    csv_logger = CSVLogger(str(root / "csv"))
    uri = f"sqlite:///{root}/mlflow.db"
    ml = MLFlowLogger(experiment_name="recipe", tracking_uri=uri)
    wb = WandbLogger(save_dir=env["WANDB_DIR"], offline=True, project="recipe")
    x, y = blobs(n=1024)
    callbacks = [LossDecreaseCheck(warmup_steps=20, check_every_n_steps=16), PredictionDynamics(every_n_steps=4)]
    tr = trainer(root, callbacks, max_epochs=1, logger=[tb, csv_logger, ml, wb], log_every_n_steps=8)
    tr.fit(TinyModel(), loader(x, y))
    html_path = os.path.join(tb.log_dir, "recipe", "report.html")  # sent to the loggers by the last recipe callback
    run_dirs = glob.glob(os.path.join(env["WANDB_DIR"], "wandb", "offline-run-*"))
    wandb.finish()
    mp.undo()
    return {"trainer": tr, "tb": tb, "csv": csv_logger, "mlflow": ml, "uri": uri, "wandb_runs": run_dirs,
            "callbacks": callbacks, "html": html_path}


def test_fit_writes_pngs_under_first_logger_recipe_dir(fitted):
    recipe = os.path.join(fitted["tb"].log_dir, "recipe")  # the first logger's dir is trainer.log_dir
    for name in ("prediction_dynamics.png", "loss_curve.png", "report.html", "report.md", "prediction_dynamics.npz"):
        assert os.path.isfile(os.path.join(recipe, name)), name
    with open(os.path.join(recipe, "prediction_dynamics.png"), "rb") as fh:
        assert _png_size(fh.read()) == (1200, 450)  # 12 x 4.5 inches at 100 dpi
    assert fitted["trainer"].global_step == STEPS


def test_tensorboard_event_file_holds_the_images_text_and_jitter(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(fitted["tb"].log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"recipe/prediction_dynamics", "recipe/loss_curve"} <= set(tags["images"])
    loss_imgs = acc.Images("recipe/loss_curve")
    assert [e.step for e in loss_imgs] == [STEPS]
    assert (loss_imgs[0].width, loss_imgs[0].height) == (1200, 420)
    assert _png_size(loss_imgs[0].encoded_image_string) == (1200, 420)
    # the prediction figure is drawn at the epoch end (and not redrawn at fit end: nothing changed)
    assert [e.step for e in acc.Images("recipe/prediction_dynamics")] == [STEPS]
    assert "recipe/report/text_summary" in tags["tensors"]
    report = acc.Tensors("recipe/report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "# lightning_recipe report" in report and "PredictionDynamics" in report
    jitter = acc.Scalars("recipe/prediction_jitter")
    assert [e.step for e in jitter] == [STEPS]
    assert jitter[0].value == pytest.approx(fitted["callbacks"][1].findings[-1].measured, rel=1e-6)


def test_mlflow_sqlite_run_holds_the_artifacts(fitted, tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=fitted["uri"])
    run_id = fitted["mlflow"].run_id
    files = {a.path for a in client.list_artifacts(run_id, "recipe/prediction_dynamics")}
    assert files == {f"recipe/prediction_dynamics/step_{STEPS:07d}.png"}
    assert {a.path for a in client.list_artifacts(run_id, "recipe/loss_curve")} == {
        f"recipe/loss_curve/step_{STEPS:07d}.png"}
    local = client.download_artifacts(run_id, f"recipe/loss_curve/step_{STEPS:07d}.png", str(tmp_path))
    with open(local, "rb") as fh:
        assert _png_size(fh.read()) == (1200, 420)
    report = client.download_artifacts(run_id, "recipe/report.md", str(tmp_path))
    with open(report) as fh:
        assert fh.read().startswith("# lightning_recipe report")
    page = client.download_artifacts(run_id, "recipe/report.html", str(tmp_path))
    with open(page) as fh, open(fitted["html"]) as orig:
        assert fh.read() == orig.read()
    run = client.get_run(run_id)
    assert run.data.metrics["recipe/prediction_jitter"] == pytest.approx(fitted["callbacks"][1].findings[-1].measured)
    assert run.info.status == "FINISHED"


def test_wandb_offline_run_dir_holds_the_media(fitted):
    (run_dir,) = fitted["wandb_runs"]
    media = os.path.join(run_dir, "files", "media")
    pred = glob.glob(os.path.join(media, "images", "recipe", "prediction_dynamics_*.png"))
    loss = glob.glob(os.path.join(media, "images", "recipe", "loss_curve_*.png"))
    assert len(pred) == 1 and len(loss) == 1
    with open(loss[0], "rb") as fh:
        assert _png_size(fh.read()) == (1200, 420)
    assert glob.glob(os.path.join(media, "table", "recipe", "report_*.table.json"))
    (page,) = glob.glob(os.path.join(media, "html", "recipe", "report_html_*.html"))
    with open(page) as fh:
        assert "lightning_recipe report" in fh.read()


def test_csv_logger_folder_holds_the_pngs_and_the_jitter_metric(fitted):
    log_dir = fitted["csv"].log_dir
    assert log_dir != fitted["tb"].log_dir
    for name in ("prediction_dynamics.png", "loss_curve.png", "report.md", "report.html"):
        assert os.path.isfile(os.path.join(log_dir, "recipe", name)), name
    with open(os.path.join(log_dir, "metrics.csv")) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("recipe/prediction_jitter")]
    assert [int(r["step"]) for r in rows] == [STEPS]
    assert float(rows[0]["recipe/prediction_jitter"]) == pytest.approx(fitted["callbacks"][1].findings[-1].measured)


class _ListLogger(Logger):
    """A logger Lightning does not know: the bridge falls back to files in its log_dir."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root, self.metrics = root, []

    @property
    def name(self) -> str:
        return "list"

    @property
    def version(self) -> int:
        return 0

    @property
    def log_dir(self) -> str:
        return self.root

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def _small_figure(value: float = 1.0) -> Figure:
    """A 50 x 50 px figure with one line and no axes (axes ticks dominate the render time of tiny figures)."""
    fig = Figure(figsize=(0.5, 0.5), dpi=100)
    fig.add_artist(Line2D([0.1, 0.9], [0.1, 0.1 + 0.8 * (value % 100) / 100]))
    return fig


def test_unknown_logger_gets_png_and_markdown_files_and_scalars(tmp_path):
    other = _ListLogger(str(tmp_path / "other"))
    tr = L.Trainer(logger=[other], default_root_dir=str(tmp_path), enable_progress_bar=False)
    path = log_figure(tr, "recipe/demo", _small_figure(), step=7, directory=str(tmp_path / "recipe"))
    assert path == str(tmp_path / "recipe" / "demo.png")
    with open(tmp_path / "other" / "recipe" / "demo.png", "rb") as a, open(path, "rb") as b:
        data = a.read()
        assert data == b.read() and _png_size(data) == (50, 50)
    log_scalars(tr, {"recipe/x": 1.5}, step=3)
    assert other.metrics == [(3, {"recipe/x": 1.5})]
    log_text(tr, "recipe/report", "# hello")
    assert (tmp_path / "other" / "recipe" / "report.md").read_text() == "# hello"


class CometLogger(_ListLogger):
    """Stands in for Lightning's CometLogger (comet_ml is optional): the bridge dispatches on the class name."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.calls = []
        outer = self

        class Experiment:
            def __getattr__(self, name):
                return lambda *args, **kwargs: outer.calls.append((name, args, kwargs))

        self._experiment = Experiment()

    @property
    def experiment(self):
        return self._experiment


def test_comet_gets_the_png_the_text_and_the_file(tmp_path):
    comet = CometLogger(str(tmp_path / "comet"))
    tr = L.Trainer(logger=[comet], default_root_dir=str(tmp_path), enable_progress_bar=False)
    seen = []
    comet._experiment.log_image = lambda path, name, step: seen.append((open(path, "rb").read(), name, step))
    log_figure(tr, "recipe/demo", _small_figure(), step=5, directory=None)  # no directory: through a temp file
    ((png, name, step),) = seen
    assert _png_size(png) == (50, 50) and (name, step) == ("recipe/demo", 5)
    log_text(tr, "recipe/report", "# r", step=5)
    (tmp_path / "report.html").write_text("<html></html>")
    log_file(tr, "recipe/report_html", str(tmp_path / "report.html"))
    assert [c[0] for c in comet.calls] == ["log_text", "log_asset"]
    assert comet.calls[0][1] == ("# r",) and comet.calls[1][2]["file_name"] == "report.html"
    assert not (tmp_path / "comet").exists()  # Comet keeps its own copies: no fallback files


def test_a_failing_logger_warns_and_the_png_is_still_written(tmp_path):
    class Broken(_ListLogger):
        @property
        def log_dir(self) -> str:
            return "\0bad"  # writing there fails

    tr = L.Trainer(logger=[Broken(str(tmp_path))], default_root_dir=str(tmp_path), enable_progress_bar=False)
    with pytest.warns(UserWarning, match="could not send figure 'recipe/demo' to Broken"):
        path = log_figure(tr, "recipe/demo", _small_figure(), 0, str(tmp_path))
    assert os.path.isfile(path)


def test_ranks_other_than_zero_render_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    tr = L.Trainer(logger=CSVLogger(str(tmp_path)), enable_progress_bar=False)
    assert log_figure(tr, "recipe/demo", _small_figure(), 0, str(tmp_path / "recipe")) is None
    log_scalars(tr, {"recipe/x": 1.0})
    assert not (tmp_path / "recipe").exists() and not glob.glob(str(tmp_path / "**" / "*.png"), recursive=True)


def test_a_thousand_renders_leave_no_open_figure(tmp_path):
    import matplotlib.pyplot as plt

    tr = L.Trainer(logger=False, enable_progress_bar=False)
    plt.close("all")
    alive: list[weakref.ref] = []
    for i in range(1000):
        fig = _small_figure(float(i))
        alive.append(weakref.ref(fig))
        log_figure(tr, "recipe/loop", fig, i, str(tmp_path))
        del fig
        assert plt.get_fignums() == []
    # a figure made with pyplot is closed in pyplot's registry too
    fig = plt.figure(figsize=(0.5, 0.5))
    fig.add_subplot().plot([0, 1])
    log_figure(tr, "recipe/pyplot", fig, 0, str(tmp_path))
    assert plt.get_fignums() == []
    del fig
    gc.collect()
    assert sum(r() is not None for r in alive) == 0  # every figure was freed
    with open(tmp_path / "loop.png", "rb") as fh:
        assert _png_size(fh.read()) == (50, 50)


def test_log_figure_keeps_the_figure_when_asked(tmp_path):
    fig = _small_figure()
    log_figure(L.Trainer(logger=False), "recipe/keep", fig, 0, str(tmp_path), close=False)
    assert len(fig.artists) == 1
    log_figure(L.Trainer(logger=False), "recipe/keep", fig, 0, str(tmp_path))
    assert fig.artists == []
    with open(tmp_path / "keep.png", "rb") as fh:
        assert _png_size(fh.read()) == (50, 50)
