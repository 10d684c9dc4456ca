"""Figures checked for content: prediction dynamics per task, the loss curve's reference lines, the jitter index."""

from __future__ import annotations

import csv
import math
import os
import warnings

import lightning_recipe.report.loggers as loggers_module
import numpy as np
import pytest
import torch
from helpers import TinyModel, blobs, loader, regression_data, trainer
from lightning.pytorch.loggers import CSVLogger
from matplotlib.colors import to_rgba
from torch import nn

from lightning_recipe.exceptions import RecipeWarning
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.report.plotting import plot_loss_curve, plot_prediction_dynamics
from lightning_recipe.checks.prediction_dynamics import PredictionDynamics
from lightning_recipe.functional.prediction import jitter_index


@pytest.fixture
def drawn(monkeypatch):
    """Capture what every figure holds when it is sent (``log_figure`` releases it afterwards)."""
    seen: dict[str, dict] = {}
    real = loggers_module.log_figure

    def spy(trainer, tag, figure, step=None, directory=None, close=True):
        seen[tag] = {"step": step, "axes": [_axes_content(ax) for ax in figure.axes]}
        return real(trainer, tag, figure, step, directory, close)

    monkeypatch.setattr(loggers_module, "log_figure", spy)
    return seen


def _axes_content(ax) -> dict:
    return {
        "lines": [(np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float), ln.get_linestyle(),
                   to_rgba(ln.get_color()), ln.get_marker(), ln.get_label()) for ln in ax.get_lines()],
        "offsets": [np.asarray(c.get_offsets()) for c in ax.collections],
        "images": [np.asarray(im.get_array()) for im in ax.get_images()],
        "ylabel": ax.get_ylabel(),
        "title": ax.get_title(),
    }


# -- regression: overfit one batch; the figure's final predictions sit on their targets -------------------------------
def test_regression_overfit_one_batch_figure_shows_predictions_on_their_targets(tmp_path, drawn):
    torch.manual_seed(0)
    x, y = regression_data(n=16, mean=0.0, scale=1.0)
    reps = 120  # one epoch that repeats the same batch of 16: 120 steps, drawn once
    data = loader(x.repeat(reps, 1), y.repeat(reps, 1), batch_size=16, shuffle=False)
    cb = PredictionDynamics(every_n_steps=10, num_samples=16)
    tr = trainer(tmp_path, [cb], max_epochs=1, num_sanity_val_steps=1, limit_val_batches=1)
    # the fixed batch is the first validation batch of the sanity check: the 16 training samples in order
    tr.fit(TinyModel(out_dim=1, loss_fn=nn.MSELoss(), hidden=64, lr=1e-2), data, loader(x, y, 16, shuffle=False))

    arrays = np.load(os.path.join(tmp_path, "recipe", "prediction_dynamics.npz"))
    assert arrays["steps"].tolist() == list(range(0, reps + 1, 10))
    final, targets = arrays["values"][-1, :, 0], arrays["targets"][:, 0]
    np.testing.assert_allclose(targets, y[:16, 0].numpy())
    tol = 0.05 * float(targets.std())  # within 5% of the targets' spread (0.064) after overfitting: measured ~0.003
    assert np.abs(final - targets).max() < tol

    fig = drawn["recipe/prediction_dynamics"]
    assert fig["step"] == reps
    lines_ax, scatter_ax = fig["axes"]
    (offsets,) = scatter_ax["offsets"]
    np.testing.assert_allclose(offsets[:, 0], targets, rtol=1e-6)  # x: target
    np.testing.assert_allclose(offsets[:, 1], final, rtol=1e-6)  # y: final prediction
    assert np.abs(offsets[:, 1] - offsets[:, 0]).max() < tol
    identity = [ln for ln in scatter_ax["lines"] if ln[5].startswith("identity")]
    assert len(identity) == 1 and np.allclose(identity[0][0], identity[0][1])
    solid = [ln for ln in lines_ax["lines"] if ln[2] == "-"]
    dashed = [ln for ln in lines_ax["lines"] if ln[2] == "--"]
    assert len(solid) == len(dashed) == 16
    for i, (pred, target) in enumerate(zip(solid, dashed)):
        assert pred[3] == target[3]  # the target line has the colour of its sample
        np.testing.assert_allclose(target[1], targets[i], rtol=1e-6)
        np.testing.assert_allclose(pred[1], arrays["values"][:, i, 0], rtol=1e-6)
    assert "jitter index" in lines_ax["title"]
    assert os.path.getsize(os.path.join(tmp_path, "recipe", "prediction_dynamics.png")) > 10_000


# -- classification figures --------------------------------------------------------------------------------------
def test_multiclass_figure_has_one_line_per_sample_and_the_heatmap_of_the_same_numbers():
    rng = np.random.default_rng(0)
    steps, values, targets = np.arange(0, 50, 10), rng.random((5, 6)), np.array([0, 1, 2, 3, 1, 0])
    fig = plot_prediction_dynamics(steps, values, targets, "multiclass", jitter=0.05)
    lines_ax, heat_ax, _colorbar = fig.axes
    assert len(lines_ax.get_lines()) == 6
    for i, line in enumerate(lines_ax.get_lines()):
        np.testing.assert_array_equal(line.get_ydata(), values[:, i])
    np.testing.assert_array_equal(heat_ax.get_images()[0].get_array(), values.T)
    assert [t.get_text() for t in heat_ax.get_yticklabels()] == [f"{i} (y={t})" for i, t in enumerate(targets)]
    assert lines_ax.get_ylabel() == "p(true class) per sample" and "jitter index 0.05" in lines_ax.get_title()


def test_binary_figure_draws_each_label_as_a_marker_in_its_sample_colour():
    steps, targets = np.arange(4), np.array([1.0, 0.0, 1.0])
    values = np.array([[0.5, 0.5, 0.5], [0.6, 0.4, 0.55], [0.8, 0.2, 0.6], [0.9, 0.1, 0.7]])[:, :, None]
    (ax,) = plot_prediction_dynamics(steps, values, targets, "binary").axes
    curves = [ln for ln in ax.get_lines() if ln.get_marker() in ("None", None, "")]
    markers = [ln for ln in ax.get_lines() if ln.get_marker() in ("o", "x")]
    assert len(curves) == len(markers) == 3
    assert [m.get_marker() for m in markers] == ["o", "x", "o"]
    for curve, mark, t in zip(curves, markers, targets):
        assert mark.get_color() == curve.get_color() and mark.get_ydata()[0] == t
        assert mark.get_xdata()[0] > steps[-1]  # at the right edge, past the last snapshot


def test_multilabel_figure_has_a_panel_per_label_or_a_heatmap_for_many():
    rng = np.random.default_rng(1)
    steps = np.arange(5)
    few = plot_prediction_dynamics(steps, rng.random((5, 4, 3)), rng.integers(0, 2, (4, 3)), "multilabel")
    assert len(few.axes) == 3 and [a.get_title() for a in few.axes] == ["label 0", "label 1", "label 2"]
    assert all(len([ln for ln in a.get_lines() if ln.get_marker() in ("o", "x")]) == 4 for a in few.axes)
    values, targets = rng.random((5, 4, 7)), rng.integers(0, 2, (4, 7))
    many = plot_prediction_dynamics(steps, values, targets, "multilabel")
    assert [a.get_title() for a in many.axes[:3]] == ["label 0", "label 1", "label 2"]
    heat = many.axes[3].get_images()[0].get_array()
    np.testing.assert_allclose(heat, np.abs(values - targets[None]).mean(1).T)  # labels x steps


class _Tagger(TinyModel):
    """A per-token classifier: outputs ``(N, T, C)``; training_step flattens before the loss."""

    def __init__(self) -> None:
        super().__init__(in_dim=4, out_dim=3)

    def compute_loss(self, batch):
        x, y = batch
        return self.loss_fn(self(x).reshape(-1, 3), y.reshape(-1))


def test_sequence_outputs_record_the_mean_true_token_probability_per_sample(tmp_path, drawn):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (128, 5), generator=g)
    embed = torch.randn(3, 4, generator=g)
    x = torch.nn.functional.one_hot(y, 3).float() @ embed + 0.3 * torch.randn(128, 5, 4, generator=g)
    torch.manual_seed(0)
    model = _Tagger()
    cb = PredictionDynamics(every_n_steps=4, num_samples=8)
    tr = trainer(tmp_path, [cb], max_epochs=1, num_sanity_val_steps=1, limit_val_batches=1)
    tr.fit(model, loader(x, y, batch_size=16), loader(x[:8], y[:8], shuffle=False))  # fixed batch: x[:8]
    arrays = np.load(os.path.join(tmp_path, "recipe", "prediction_dynamics.npz"))
    assert arrays["values"].shape == (3, 8) and arrays["steps"].tolist() == [0, 4, 8]
    with torch.no_grad():
        model.eval()
        probs = torch.softmax(model(x[:8]), -1).gather(-1, y[:8, :, None]).squeeze(-1).mean(1)
    np.testing.assert_allclose(arrays["values"][-1], probs.numpy(), rtol=1e-5)  # last snapshot = final model
    lines_ax = drawn["recipe/prediction_dynamics"]["axes"][0]
    assert lines_ax["ylabel"] == "mean p(true token) per sample" and len(lines_ax["lines"]) == 8


# -- loss curve ---------------------------------------------------------------------------------------------------
def test_loss_curve_figure_draws_the_losses_and_both_reference_lines(tmp_path, drawn):
    torch.manual_seed(0)
    x, y = blobs(n=512, classes=4)
    cb = LossDecreaseCheck(warmup_steps=20, check_every_n_steps=8)
    trainer(tmp_path, [cb], max_epochs=2).fit(TinyModel(), loader(x, y))
    assert len(cb.losses) == 32
    freq = torch.bincount(y, minlength=4).double() / len(y)
    entropy = float(-(freq * freq.log()).sum())
    assert cb.prior_loss == pytest.approx(entropy, rel=1e-4)  # label entropy: the best constant prediction's loss
    (ax,) = drawn["recipe/loss_curve"]["axes"]
    curve, expected, prior = ax["lines"][:3]
    np.testing.assert_allclose(curve[1], cb.losses, rtol=1e-6)
    assert expected[2] == ":" and np.allclose(expected[1], cb.expected_initial_loss)
    assert prior[2] == "--" and np.allclose(prior[1], entropy, rtol=1e-4)
    assert abs(cb.expected_initial_loss - math.log(4)) < 0.2  # small random init: close to log(C)
    assert os.path.isfile(os.path.join(tmp_path, "recipe", "loss_curve.png"))


def test_loss_curve_marks_non_finite_losses():
    fig = plot_loss_curve([2.0, 1.5, float("nan"), float("inf")], expected_initial=2.0)
    marks = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "non-finite loss"]
    assert len(marks) == 1 and marks[0].get_xdata().tolist() == [2, 3]


# -- jitter index -------------------------------------------------------------------------------------------------
def test_jitter_index_closed_forms():
    ramp = np.linspace(0, 1, 12)[:, None] * np.array([1.0, -2.0, 0.5])
    assert jitter_index(ramp)["index"] == 0.0  # monotone: no reversal
    saturating = 1 - np.exp(-np.arange(12))[:, None]  # a fast rise and a knee are trend, not jitter
    assert jitter_index(saturating)["index"] == 0.0
    zigzag = np.tile([[0.0], [1.0]], (6, 1))
    j = jitter_index(zigzag, steps=np.arange(12))
    assert j["index"] == 1.0 and j["jitter"] == 1.0 and j["movement"] == 1.0 and j["thrash"]
    # a ramp k/11 whose snapshot 5 jumps 0.1 above snapshot 6: residuals +0.1 (at 5) and -1/11 (at 6, whose
    # running median is snapshot 7), zero at the 8 other interior snapshots
    bump = np.linspace(0, 1, 12)[:, None].copy()
    bump[5] = bump[6] + 0.1
    j = jitter_index(bump)
    assert j["jitter"] == pytest.approx(math.sqrt((0.1**2 + (1 / 11) ** 2) / 10)) and j["movement"] == 1.0
    frozen = jitter_index(np.full((6, 4), 0.3), steps=np.arange(6) * 5)
    assert frozen["frozen"] and frozen["max_change"] == 0.0 and not frozen["thrash"]
    assert not jitter_index(np.full((6, 4), 0.3), steps=np.zeros(6))["frozen"]  # no training step between them
    assert math.isnan(jitter_index(np.ones((2, 3)))["index"])  # too few snapshots
    # a slow trend 0.01 s with a reversal of +-0.05 at every snapshot: residuals +-0.09, travel 0.23 - (-0.04)
    k = np.arange(20)
    wobble = (0.01 * k + 0.05 * (-1.0) ** k)[:, None]
    j = jitter_index(wobble)
    assert j["jitter"] == pytest.approx(0.09) and j["movement"] == pytest.approx(0.27)
    assert j["index"] == pytest.approx(1 / 3) and j["index"] > j["threshold"]  # reverses like noise, but ...
    assert not j["thrash"]  # ... jumps of 9% of the probability scale: minibatch noise, not a thrash
    assert jitter_index(3 * wobble)["thrash"]  # the same shape with jumps of 27%: a thrash
    noise = np.random.default_rng(0).standard_normal((10, 512))
    assert jitter_index(noise)["index"] == pytest.approx(jitter_index(noise)["noise_reference"])


def _dynamics_fit(tmp_path, logger=False, **model_kwargs):
    x, y = blobs(n=1536)
    cb = PredictionDynamics(every_n_steps=2, on_fail="warn")
    torch.manual_seed(1)  # the index of SGD at lr=6 over seeds 0-5: 0.14 to 0.29, all above the threshold 0.111
    model = TinyModel(**model_kwargs)
    trainer(tmp_path, [cb], max_epochs=1, logger=logger).fit(model, loader(x, y))  # 48 steps, 25 snapshots
    return cb


def test_healthy_training_has_low_jitter_and_logs_it(tmp_path):
    csv_logger = CSVLogger(str(tmp_path))
    cb = _dynamics_fit(tmp_path, csv_logger, lr=1e-2)
    eval_mode, finding = cb.findings  # the eval-mode determinism check at the start, the jitter at the end
    assert eval_mode.check == "PredictionDynamics.eval_mode" and eval_mode.status == "pass"
    assert finding.status == "pass" and finding.check == "PredictionDynamics"
    assert finding.expected == pytest.approx(jitter_index(np.random.default_rng(0).standard_normal((25, 512)))[
        "index"] / 2, rel=0.02)
    assert finding.measured < 0.1 * finding.expected  # 0.0 (every prediction rises monotonically) vs 0.111
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("recipe/prediction_jitter")]
    assert float(rows[-1]["recipe/prediction_jitter"]) == pytest.approx(finding.measured)  # the last point: the end's


def test_learning_rate_too_high_thrashes(tmp_path):
    with warnings.catch_warnings():  # a thrash is a note (healthy converged fits reach it too): never a warning
        warnings.simplefilter("error", RecipeWarning)
        cb = _dynamics_fit(tmp_path, lr=6.0, optimizer="sgd")
    eval_mode, finding = cb.findings  # the eval-mode determinism check at the start, the jitter at the end
    assert eval_mode.check == "PredictionDynamics.eval_mode" and eval_mode.status == "pass"
    assert finding.status == "note" and finding.check == "PredictionDynamics.jitter" and "THRASH" in finding.message
    assert finding.measured > 1.5 * finding.expected and finding.details["jitter"] > 0.1  # 0.25 vs 0.111
    assert "learning rate too high: each step overshoots and the next one corrects" in finding.causes


def test_learning_rate_zero_freezes_the_predictions(tmp_path):
    with pytest.warns(RecipeWarning, match="FROZEN"):
        cb = _dynamics_fit(tmp_path, lr=0.0, optimizer="sgd")
    eval_mode, finding = cb.findings  # the eval-mode determinism check at the start, the jitter at the end
    assert eval_mode.check == "PredictionDynamics.eval_mode" and eval_mode.status == "pass"
    assert finding.status == "warn" and finding.measured == 0.0 and finding.details["frozen"]
    assert finding.details["snapshots"] == 25


# -- readability: labels, validation line, epoch markers, one step, coinciding reference lines, log axes, legends -----
@pytest.fixture
def kept(monkeypatch):
    """The figures themselves, as sent (not cleared after sending)."""
    seen: dict = {}
    real = loggers_module.log_figure

    def spy(trainer, tag, figure, step=None, directory=None, close=True):
        seen[tag] = figure
        return real(trainer, tag, figure, step, directory, close=False)

    monkeypatch.setattr(loggers_module, "log_figure", spy)
    return seen


def _labelled_ticks(axis, lo: float, hi: float) -> list[str]:
    """The non-empty tick labels of ``axis`` inside ``[lo, hi]`` (what a reader sees)."""
    fmt = axis.get_major_formatter()
    locs = [v for v in axis.get_major_locator()() if lo <= v <= hi]
    fmt.set_locs(locs)
    return [t for t in (fmt(v) for v in locs) if t]


def _assert_labelled(fig) -> None:
    for ax in fig.axes:
        if not ax.axison:  # an image grid drawn with its axis off (first batch, worst examples)
            continue
        if ax.get_label() == "<colorbar>":
            assert ax.get_ylabel() or ax.get_xlabel(), "a colour bar without its label"
            continue
        assert ax.get_xlabel() and ax.get_ylabel(), (ax.get_title(), ax.get_xlabel(), ax.get_ylabel())


def _dynamics_args(task, s=4, n=5, d=3):
    rng = np.random.default_rng(0)
    if task == "multiclass":
        return np.arange(s), rng.random((s, n)), rng.integers(0, 3, n), task
    if task == "regression":
        return np.arange(s), rng.random((s, n, 1)), rng.random((n, 1)), task
    return np.arange(s), rng.random((s, n, d)), rng.integers(0, 2, (n, d)), task


@pytest.mark.parametrize("labels", [1, 3, 7])
def test_every_panel_of_every_figure_has_axis_labels(labels):
    from lightning_recipe.report.plotting import plot_first_batch, plot_generalization, plot_optimization

    figures = [
        plot_loss_curve([2.3, 1.0, 0.5], 2.3, 2.2, [3], val_steps=[2], val_losses=[0.7]),
        plot_generalization([1, 2], [1.0, 0.5], [1.1, 0.8], prior_loss=2.3),
        plot_optimization([[0.1], [0.05]], [(10, [1e-3, 1e-1])], ["a", "b"], [1.0, 2.0], 0.5, [(10, 3.0, 2.3)], 100),
        plot_first_batch(torch.randn(16, 5), torch.randn(16)),
        plot_prediction_dynamics(*_dynamics_args("multiclass")),
        plot_prediction_dynamics(*_dynamics_args("regression")),
        plot_prediction_dynamics(*_dynamics_args("multilabel" if labels > 1 else "binary", d=labels)),
    ]
    for fig in figures:
        _assert_labelled(fig)
    assert len(figures[-1].axes) == (labels if labels <= 4 else 5)  # 7 labels: 3 panels, a heatmap and its colour bar


def test_loss_curve_draws_the_logged_validation_loss_at_each_validation(tmp_path, kept):
    torch.manual_seed(0)
    x, y = blobs(n=192, classes=4)
    csv = CSVLogger(str(tmp_path))
    cb = LossDecreaseCheck(on_fail="warn")
    tr = trainer(tmp_path, [cb], max_epochs=3, logger=csv, log_every_n_steps=1, num_sanity_val_steps=1)
    tr.fit(TinyModel(), loader(x, y), loader(x[:64], y[:64], shuffle=False))  # 6 batches an epoch
    with open(os.path.join(csv.log_dir, "metrics.csv")) as fh:
        header, *rows = [line.split(",") for line in fh.read().splitlines()]
    col = header.index("val_loss")
    logged = [float(r[col]) for r in rows if r[col]]
    assert len(logged) == 3  # one per validation epoch; the sanity check is not drawn
    (ax,) = kept["recipe/loss_curve"].axes
    (val,) = [ln for ln in ax.get_lines() if ln.get_label().startswith("validation loss")]
    assert val.get_label() == "validation loss (`val_loss`, logged)" and val.get_marker() == "o"
    np.testing.assert_allclose(val.get_ydata(), logged, rtol=1e-6)
    assert val.get_xdata().tolist() == [5, 11, 17]  # after the last training batch of each epoch
    assert len(cb.losses) == 18 and ax.get_title().startswith("Training loss and validation loss")


class _SilentValidation(TinyModel):
    def validation_step(self, batch, batch_idx):  # a validation loop that logs no loss
        return None


def test_loss_curve_says_when_validation_logged_no_loss(tmp_path, kept):
    torch.manual_seed(0)
    x, y = blobs(n=128, classes=4)
    trainer(tmp_path, [LossDecreaseCheck(on_fail="warn")], max_epochs=2).fit(_SilentValidation(), loader(x, y),
                                                                            loader(x[:32], y[:32]))
    (ax,) = kept["recipe/loss_curve"].axes
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "validation ran; no `val_loss`-like metric logged" in labels
    assert not any(len(ln.get_xdata()) for ln in ax.get_lines() if ln.get_label().startswith("validation"))


def test_loss_curve_of_a_single_step_is_a_visible_marker(tmp_path, kept):
    torch.manual_seed(0)
    x, y = blobs(n=64, classes=4)
    cb = LossDecreaseCheck(on_fail="warn")
    trainer(tmp_path, [cb], max_steps=1).fit(TinyModel(), loader(x, y))
    (ax,) = kept["recipe/loss_curve"].axes
    curve = ax.get_lines()[0]
    assert curve.get_ydata().tolist() == pytest.approx(cb.losses) and len(cb.losses) == 1
    assert curve.get_marker() == "o" and curve.get_markersize() >= 6
    lo, hi = ax.get_xlim()
    assert lo < 0 < hi and hi - lo >= 1  # the point inside an axis of whole batches, not -0.05 .. 0.05
    assert all(float(t).is_integer() for t in ax.xaxis.get_major_locator()() if lo <= t <= hi)


def test_expected_initial_and_prior_lines_both_show_when_they_coincide(tmp_path, kept):
    from lightning_recipe import HeadBiasInit

    torch.manual_seed(0)
    x, y = blobs(n=256, classes=4, priors=[0.55, 0.25, 0.15, 0.05])
    cb = LossDecreaseCheck(on_fail="warn")
    trainer(tmp_path, [HeadBiasInit(), cb], max_steps=3).fit(TinyModel(), loader(x, y))
    # the bias set to the log priors: the untrained network predicts the prior, its loss is the label entropy
    assert cb.expected_initial_loss == pytest.approx(cb.prior_loss, rel=1e-3)
    (ax,) = kept["recipe/loss_curve"].axes
    expected = next(ln for ln in ax.get_lines() if ln.get_label().startswith("expected initial loss"))
    prior = next(ln for ln in ax.get_lines() if ln.get_label().startswith("label-prior"))
    assert "(= label-prior loss)" in expected.get_label()
    assert expected.get_linestyle() != prior.get_linestyle()  # ':' over '--'
    assert expected.get_zorder() > prior.get_zorder() and expected.get_linewidth() < prior.get_linewidth()
    apart = plot_loss_curve([2.0, 1.0], expected_initial=2.0, prior_loss=1.5).axes[0].get_lines()[1]
    assert "=" not in apart.get_label()  # 2.0 vs 1.5: two separate lines, no combined label


@pytest.mark.parametrize(("epochs", "marks"), [(7, 7), (100, 10), (23, 5), (1000, 10)])
def test_epoch_markers_stay_few_over_many_epochs(epochs, marks):
    ends = [3 * (e + 1) for e in range(epochs)]
    (ax,) = plot_loss_curve(np.linspace(2, 1, 3 * epochs), 2.0, 2.0, ends).axes
    (top,) = ax.child_axes  # the epoch axis above the plot
    labels = [t.get_text() for t in top.get_xticklabels()]
    assert len(labels) == marks <= 10 and labels[-1] == str(epochs)  # the last epoch is always marked
    (lines,) = [c for c in ax.collections if len(c.get_segments()) == marks]  # one faint line per labelled epoch
    assert top.get_xlabel().startswith("epochs completed")


def test_titles_clear_what_is_drawn_above_the_axes():
    """Titles are pinned at the top of their axes (no per-draw placement pass), except above a secondary axis: the
    loss curve's title stays above its epoch axis and that axis' label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from lightning_recipe.report.plotting import plot_generalization

    fig = plot_loss_curve(np.linspace(2, 1, 60), 2.0, 2.0, [20, 40, 60])
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    (ax,) = fig.axes
    (top,) = ax.child_axes
    assert ax.title.get_window_extent(renderer).y0 >= top.get_tightbbox(renderer).y1 - 1  # above "epochs completed"
    plain = plot_generalization([1, 2, 3], [1.0, 0.9, 0.8], [1.1, 1.0, 0.95])
    FigureCanvasAgg(plain).draw()
    (gax,) = plain.axes
    assert gax.title.get_position()[1] == 1.0
    assert gax.title.get_window_extent(plain.canvas.get_renderer()).y0 >= gax.get_window_extent().y1


def test_log_axes_only_over_a_decade_and_with_labelled_ticks():
    from lightning_recipe.report.plotting import plot_generalization, plot_optimization

    flat = plot_loss_curve(2.3 + 0.001 * np.sin(np.arange(60)), 2.3, 2.3).axes[0]
    assert flat.get_yscale() == "linear" and len(_labelled_ticks(flat.yaxis, *flat.get_ylim())) >= 3
    narrow = plot_loss_curve(np.geomspace(2.3, 0.03, 60), 2.3, 2.3).axes[0]  # 77x: log, under two decades
    assert narrow.get_yscale() == "log"
    assert len(_labelled_ticks(narrow.yaxis, 0.03, 2.3)) >= 5  # 0.05, 0.1, 0.2, 0.5, 1, 2 (1 and 2 x 10^k alone: 2)
    wide = plot_loss_curve(np.geomspace(2.3, 1e-4, 60)).axes[0]
    assert wide.get_yscale() == "log" and len(_labelled_ticks(wide.yaxis, 1e-4, 2.3)) >= 4  # one per decade
    gen = plot_generalization([1, 2, 3], [1.0, 0.9, 0.8], [1.1, 1.0, 0.95]).axes[0]
    assert gen.get_yscale() == "linear"
    # frozen layers: RMS gradients within 4x of each other (before: a log axis with no label at all)
    opt = plot_optimization([[0.0]] * 3, [(10, [1e-3, 2e-3, 4e-3])], ["a", "b", "c"], [0.3, 0.4, 0.35])
    layer = opt.axes[1]
    assert layer.get_yscale() == "linear" and len(_labelled_ticks(layer.yaxis, *layer.get_ylim())) >= 3
    spread = plot_optimization([[0.1]] * 3, [(10, [1e-4, 1e-3, 3e-3])], ["a", "b", "c"], [0.3, 0.4, 0.35]).axes[1]
    assert spread.get_yscale() == "log" and len(_labelled_ticks(spread.yaxis, 1e-4, 3e-3)) >= 3


def test_legends_sit_outside_the_data():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from lightning_recipe.report.plotting import plot_generalization

    many = plot_loss_curve(np.r_[np.geomspace(2.3, 0.01, 80), np.nan], 2.3, 2.3, [40, 81], val_steps=[39, 80],
                           val_losses=[1.0, 0.5])
    gen = plot_generalization([1, 2, 3], [1.0, 0.5, 0.2], [1.1, 0.7, 0.9], prior_loss=2.3, epochs=[0, 1, 2])
    for fig in (many, gen):
        renderer = FigureCanvasAgg(fig).get_renderer()
        ax = fig.axes[0]
        legend, box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
        assert legend.x0 >= box.x1  # right of the axes: it covers no data
        assert legend.x1 <= fig.bbox.x1 and legend.y0 >= 0  # and inside the figure
    assert len(many.axes[0].get_legend().get_texts()) == 6  # curve, 2 references, moving mean, validation, non-finite
    train, val = gen.axes[0].get_lines()[:2]  # equal losses at the start: neither line hides the other
    assert train.get_linestyle() != val.get_linestyle() and train.get_marker() != val.get_marker()


def test_single_snapshot_prediction_lines_have_markers_and_worst_images_wrap():
    from lightning_recipe.report.plotting import plot_worst_examples

    for task in ("multiclass", "regression", "binary"):
        fig = plot_prediction_dynamics(*_dynamics_args(task, s=1, d=1))
        curves = [ln for ln in fig.axes[0].get_lines() if len(ln.get_xdata()) == 1 and ln.get_linestyle() == "-"]
        assert curves and all(ln.get_marker() == "o" for ln in curves)
        lo, hi = fig.axes[0].get_xlim()
        assert hi - lo >= 2
    fig = plot_worst_examples(torch.rand(8, 1, 8, 8), [f"y={i} pred=0 loss=1.0" for i in range(8)], "worst")
    ys = sorted({round(t.get_position()[1], 3) for t in fig.axes[0].texts})
    assert len(ys) == 2 and fig.get_figwidth() <= 10  # two rows of four: captions readable in a 1200 px page


def test_lean_axes_make_only_the_ticks_they_draw():
    """The locators of a lean figure return the ticks inside the view (matplotlib makes a tick object for every
    location a locator gives, also those it does not draw), and the drawn tick labels are those of the plain
    locator: on a linear axis, a log axis over a few decades and over many."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogLocator, MaxNLocator

    from lightning_recipe.report._style import _lean, log_y

    def build(values, lean):
        fig = Figure()
        ax = fig.add_subplot()
        ax.plot(np.arange(len(values)) * 37.0, values)
        if np.ptp(values) and min(values) > 0 and max(values) / min(values) > 10:
            log_y(ax, values)
        if lean:
            _lean(fig)
        else:  # the same locators as _lean sets, without the view clipping
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
            if ax.get_yscale() == "linear":
                ax.yaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
        FigureCanvasAgg(fig).draw()
        return ax

    for values in (np.linspace(2.0, 0.3, 80), np.geomspace(2.3, 0.03, 80), np.geomspace(2.3, 1e-5, 80)):
        plain, lean = build(values, False), build(values, True)
        for p_axis, l_axis in ((plain.xaxis, lean.xaxis), (plain.yaxis, lean.yaxis)):
            lo, hi = sorted(l_axis.get_view_interval())
            locs = l_axis.get_majorticklocs()
            assert all(lo - 1e-9 * (hi - lo) <= v <= hi + 1e-9 * (hi - lo) for v in locs)  # nothing outside the view
            assert len(l_axis.get_major_ticks()) == len(locs)  # no tick object made for a location outside it
            drawn = lambda axis: [t.label1.get_text() for t in axis.get_major_ticks()
                                  if axis.get_view_interval().min() - 1e-9 <= t.get_loc()
                                  <= axis.get_view_interval().max() + 1e-9 and t.label1.get_text()]
            assert drawn(l_axis) == drawn(p_axis) and len(drawn(l_axis)) >= 2
        assert lean.get_yscale() == plain.get_yscale()
    assert isinstance(lean.yaxis.get_major_locator().base, LogLocator)


def test_nan_quantiles_match_numpy():
    """The update-ratio panel's per-step band and median: numpy's nanpercentile (linear interpolation) per row,
    rows of NaN included, in one vectorised pass."""
    from lightning_recipe.report.update_ratio_plot import _nan_quantiles

    rng = np.random.default_rng(0)
    r = rng.lognormal(-7, 1, (200, 9))
    r[rng.random(r.shape) < 0.3] = np.nan
    r[5] = np.nan  # a step of another optimizer: no value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = [np.nanpercentile(r, q, axis=1) for q in (10, 50, 90)]
    got = _nan_quantiles(r, (0.1, 0.5, 0.9))
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g, e, rtol=1e-12, equal_nan=True)
    assert np.isnan(got[1][5]) and np.isfinite(got[1][:5]).all()
    assert _nan_quantiles(np.array([[4.0, 1.0, np.nan]]), (0.5,))[0][0] == 2.5  # the median of {1, 4}


def test_figures_are_drawn_with_the_collector_paused_and_freed_after():
    """A figure built and drawn under ``paused_gc`` never reaches the older generations (which could start a full
    collection of the whole process in the middle of a figure) and is freed when the block ends; the collector is
    on again after it, nested blocks leave it paused until the outer one ends, and a collector the user switched
    off stays off."""
    import gc
    import weakref

    from lightning_recipe._core.memory import paused_gc
    from lightning_recipe.report.loggers import _render_png

    assert gc.isenabled()
    with paused_gc():
        fig = plot_loss_curve(np.geomspace(2.3, 0.05, 300), 2.3, 2.3, [100, 200, 300])
        png = _render_png(fig)
        ref = weakref.ref(fig)
        with paused_gc():
            pass
        assert not gc.isenabled()  # the inner block ended: still paused
        del fig
        assert ref() is not None  # matplotlib's artists reference each other: refcounting alone does not free it
    assert gc.isenabled() and ref() is None and png.startswith(b"\x89PNG")
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
