"""Figures, matplotlib only: arrays in, ``matplotlib.figure.Figure`` out (no pyplot, no display, nothing leaked).

Every function builds a :class:`matplotlib.figure.Figure` with the object API: nothing is registered in pyplot's
figure manager and no GUI backend is touched, so the figures render headless and are freed with their last
reference (:func:`lightning_recipe.report.loggers.log_figure` also clears them once sent).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from lightning_recipe.report._style import (_colour, _figure, _integer_x, _lean, _legend_outside, _point_marker,
                                            _spans_decade, log_y)
from lightning_recipe.report.samples import plot_first_batch, plot_worst_examples

__all__ = ["plot_first_batch", "plot_generalization", "plot_loss_curve", "plot_optimization", "plot_prediction_dynamics",
           "plot_worst_examples"]

_MAX_PANELS = 4  # label panels of a multilabel figure; more labels get a labels x steps heatmap instead


def plot_loss_curve(
    losses: Sequence[float],
    expected_initial: Optional[float] = None,
    prior_loss: Optional[float] = None,
    epoch_ends: Sequence[int] = (),
    val_steps: Sequence[float] = (),
    val_losses: Sequence[float] = (),
    val_label: str = "validation loss",
) -> Any:
    """Training loss per step with the validation loss, the expected initial loss and the label-prior loss.

    A curve that starts far from the dotted line (expected initial loss) points at a bad initialisation; a curve that
    flattens on the dashed line (loss of the best constant prediction) means the model learned only the label
    prior; validation (green markers) rising away from training is overfitting. When the expected initial loss and
    the prior loss are equal (within 0.1%, as after ``HeadBiasInit``), the dotted line is drawn on top of the wider
    dashed one and its label says so: both stay visible. Non-finite losses are marked with red ticks at the top.
    Epoch ends are faint vertical lines with the epoch number on a top axis, at most ten of them (every k-th epoch
    over a long fit: no comb of lines at 100 epochs). A fit of one step draws its loss as a large marker. The y axis
    is logarithmic only when the losses span 50x (a flat or narrow curve keeps a linear axis with labelled ticks);
    the legend sits right of the axes, never over the data.

    Args:
        losses: training loss per batch (drawn at x = 0, 1, ...).
        expected_initial: the loss expected at the first step (constant prediction of the initial head bias).
        prior_loss: the loss of the best input-independent (constant) prediction.
        epoch_ends: number of losses at each epoch end.
        val_steps: where each validation loss is drawn, on the same axis as the training batches.
        val_losses: the validation loss at each of ``val_steps``.
        val_label: the validation line's legend entry; with no ``val_losses`` and a label other than the default,
            the label alone goes to the legend (e.g. to say that a validation loop ran but logged no loss).

    Returns:
        The figure (one axes; the training curve is its first line, then the expected initial loss, the prior loss,
        the moving mean and the validation line, each when present).

    Example::

        >>> fig = plot_loss_curve([2.3, 1.2, 0.7], expected_initial=2.3026, prior_loss=2.3, val_steps=[2],
        ...                       val_losses=[0.9])
        >>> ax = fig.axes[0]; [round(v, 4) for v in ax.get_lines()[1].get_ydata()], ax.get_lines()[-1].get_ydata()
        ([2.3026, 2.3026], array([0.9]))
    """
    fig = _figure(12, 4.2, right=3.3)
    ax = fig.add_subplot()
    y = np.asarray(losses, dtype=float).reshape(-1)
    x = np.arange(len(y))
    finite = np.isfinite(y)
    ax.plot(x, y, lw=0.8, color="tab:blue", alpha=0.6 if len(y) >= 10 else 1.0, label="training loss (per batch)",
            **_point_marker(len(y)))
    same = (expected_initial is not None and prior_loss is not None and np.isfinite(expected_initial)
            and np.isfinite(prior_loss) and abs(expected_initial - prior_loss) <= 1e-3 * max(abs(prior_loss), 1e-12))
    if expected_initial is not None and np.isfinite(expected_initial):
        # on top of the prior line (zorder), narrower and dotted: both stay visible when they coincide
        ax.axhline(expected_initial, color="tab:red", ls=":", lw=1.6, zorder=4,
                   label=f"expected initial loss {expected_initial:.4g}" + (" (= label-prior loss)" if same else ""))
    if prior_loss is not None and np.isfinite(prior_loss):
        ax.axhline(prior_loss, color="tab:orange", ls="--", lw=3.0, alpha=0.8, zorder=3,
                   label=f"label-prior (constant prediction) loss {prior_loss:.4g}")
    if len(y) >= 10 and finite.sum() >= 10:
        k = max(2, len(y) // 50)
        filled = np.where(finite, y, np.nanmax(np.where(finite, y, np.nan)))
        smooth = np.convolve(filled, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1 :], smooth, color="tab:blue", lw=1.8, label=f"moving mean ({k} batches)")
    vx = np.asarray(val_steps, dtype=float).reshape(-1)
    vy = np.asarray(val_losses, dtype=float).reshape(-1)
    if vy.size:
        ax.plot(vx, vy, color="tab:green", lw=1.4, marker="o", ms=7 if vy.size == 1 else 4, zorder=5,
                label=val_label)
    elif val_label != "validation loss":
        ax.plot([], [], color="none", label=val_label)  # a legend entry only: no line to draw
    if (~finite).any():
        ax.plot(x[~finite], np.ones(int((~finite).sum())), "|", color="red", ms=14, transform=ax.get_xaxis_transform(),
                label="non-finite loss")
    if len(epoch_ends):
        _epoch_axis(ax, epoch_ends)
        fig.subplots_adjust(top=1 - 0.85 / fig.get_figheight())  # room for the epoch axis above the axes
    shown = np.concatenate([y[finite], vy[np.isfinite(vy)]])
    if _spans_decade(shown, 50.0):
        log_y(ax, shown)
    _integer_x(ax)
    if len(y) <= 1:
        ax.set_xlim(-0.6, max(1.0, float(vx.max()) if vx.size else 1.0) + 0.6)
    ax.set_xlabel("training batch")
    ax.set_ylabel("loss")
    ax.set_title("Training loss" + (" and validation loss" if vy.size else "") + " with the reference lines")
    _legend_outside(ax)
    return _lean(fig)


_MAX_EPOCH_MARKS = 10


def _epoch_axis(ax: Any, epoch_ends: Sequence[int]) -> None:
    """Faint lines at the ends of at most ``_MAX_EPOCH_MARKS`` epochs (every 1st, 2nd, 5th, 10th, 20th, ... epoch),
    labelled with the epoch number on a top axis; the last epoch is always marked."""
    ends = [int(e) for e in epoch_ends]
    n = len(ends)
    stride = next(s for m in (1, 10, 100, 1000, 10**4, 10**5) for s in (m, 2 * m, 5 * m) if n / s <= _MAX_EPOCH_MARKS)
    picked = [i for i in range(n) if (i + 1) % stride == 0]
    if n - 1 not in picked:
        picked = [i for i in picked if (n - (i + 1)) >= stride / 2] + [n - 1]  # no two labels on top of each other
    xs = [ends[i] - 0.5 for i in picked]  # between the epoch's last batch and the next epoch's first
    ax.vlines(xs, 0, 1, transform=ax.get_xaxis_transform(), colors="0.8", lw=0.8, zorder=0)
    top = ax.secondary_xaxis("top")
    top.set_xticks(xs, [str(i + 1) for i in picked], fontsize=7)
    top.tick_params(length=3, pad=1)
    top.set_xlabel("epochs completed" + (f" (every {stride})" if stride > 1 else ""), fontsize=8, labelpad=2)


def plot_prediction_dynamics(
    steps: np.ndarray,
    values: np.ndarray,
    targets: Optional[np.ndarray],
    task: str,
    jitter: Optional[float] = None,
    sequence: bool = False,
    what: Optional[str] = None,
) -> Any:
    """Labels and predictions of a fixed batch over training, in one figure.

    * multiclass (``values``: ``(S, N)`` probability of the true class): one line per sample, and a samples × steps
      heatmap of the same numbers; with ``sequence=True`` (outputs ``(N, T, C)``) the value is the mean true-token
      probability of each sample;
    * binary/multilabel (``values``: ``(S, N, L)`` probabilities): per label, each sample's probability over steps
      with its label drawn as a marker at the right edge (``o`` = 1, ``x`` = 0); with more than four labels, the
      first three and a labels × steps heatmap of the mean distance ``|p - y|``;
    * regression (``values``: ``(S, N, D)``): each sample's prediction over steps with its target as a dashed line of
      the same colour, and the final predictions against the targets with the identity line (first output shown
      over steps; every output in the scatter).

    Args:
        steps: global step of each snapshot, ``(S,)``.
        values: the recorded summaries, ``(S, N, ...)``.
        targets: targets of the fixed batch (``(N, ...)``).
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"``.
        jitter: the jitter index, shown in the title.
        sequence: the outputs have a position axis (per-sample means).
        what: the name of the value drawn (multiclass: default ``"p(true class)"``, ``"mean p(true token)"`` with
            ``sequence``, e.g. ``"mean p(true label) over positions"`` for a per-pixel sigmoid; regression: default
            ``"prediction"``, e.g. ``"mean prediction over positions"``).

    Returns:
        The figure. Regression: ``axes[0]`` holds one line per sample then one dashed target line per sample,
        ``axes[1]`` the scatter (``collections[0]``: x = target, y = final prediction).

    Example::

        >>> rng = np.random.default_rng(0)
        >>> fig = plot_prediction_dynamics(np.arange(3), rng.random((3, 4)), np.array([0, 1, 2, 1]), "multiclass")
        >>> len(fig.axes)  # lines, heatmap, colour bar
        3
    """
    steps = np.asarray(steps).reshape(-1)
    values = np.asarray(values, dtype=float)
    n = values.shape[1] if values.ndim >= 2 else 0
    tgt = np.asarray(targets) if targets is not None and np.size(targets) else None
    title = "Prediction dynamics on a fixed batch" + (f" (jitter index {jitter:.3g})" if jitter is not None else "")
    if task == "multiclass":
        return _plot_multiclass(steps, values.reshape(len(steps), n), tgt, title, sequence, what)
    if task in ("binary", "multilabel"):
        return _plot_labels(steps, values.reshape(len(steps), n, -1), tgt, title)
    return _plot_regression(steps, values.reshape(len(steps), n, -1), tgt, title, what)


def _plot_multiclass(
    steps: np.ndarray, v: np.ndarray, targets: Optional[np.ndarray], title: str, sequence: bool,
    what: Optional[str] = None,
) -> Any:
    what = what or ("mean p(true token)" if sequence else "p(true class)")
    fig = _figure(12, 4.5)
    ax, hm = fig.subplots(1, 2, width_ratios=[3, 2])
    for i in range(v.shape[1]):
        ax.plot(steps, v[:, i], color=_colour(i), lw=1.2, alpha=0.85, **_few_points(steps))
    _step_axis(ax, steps)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("global step")
    ax.set_ylabel(what + " per sample")
    ax.set_title(title, fontsize=10)
    right = steps[-1] if len(steps) > 1 and steps[-1] > steps[0] else steps[0] + 1
    im = hm.imshow(v.T, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest",
                   extent=(steps[0], right, v.shape[1] - 0.5, -0.5))
    hm.set_xlabel("global step")
    hm.set_title(f"{what}: samples x steps", fontsize=10)
    if targets is not None and targets.ndim == 1 and v.shape[1] <= 32 and not sequence:
        hm.set_yticks(range(v.shape[1]), [f"{i} (y={int(t)})" for i, t in enumerate(targets)], fontsize=7)
        hm.set_ylabel("sample (label)")
    else:
        hm.set_ylabel("sample")
    fig.colorbar(im, ax=hm, label=what)
    return _lean(fig)


def _plot_labels(steps: np.ndarray, v: np.ndarray, targets: Optional[np.ndarray], title: str) -> Any:
    n, n_labels = v.shape[1], v.shape[2]
    t = targets.reshape(n, -1).astype(float) if targets is not None and targets.size == n * n_labels else None
    many = n_labels > _MAX_PANELS
    shown = _MAX_PANELS - 1 if many else n_labels
    fig = _figure(4.5 * (shown + many) + 1.5, 4)
    axes = list(np.atleast_1d(fig.subplots(1, shown + many)))
    x_mark = steps[-1] + 0.03 * max(1, steps[-1] - steps[0])
    for j, ax in enumerate(axes[:shown]):
        for i in range(n):
            c = _colour(i)
            ax.plot(steps, v[:, i, j], color=c, lw=1.1, alpha=0.85, **_few_points(steps))
            if t is not None:
                ax.plot([x_mark], [t[i, j]], marker="o" if t[i, j] > 0.5 else "x", color=c, ms=7, ls="none")
        ax.set_ylim(-0.05, 1.05)
        _step_axis(ax, steps)
        ax.set_xlabel("global step")
        ax.set_ylabel("predicted probability")
        ax.set_title(f"label {j}" if n_labels > 1 else title, fontsize=9)
    if many:
        hm = axes[-1]
        dist = np.abs(v - t[None]).mean(1) if t is not None else v.mean(1)
        right = steps[-1] if len(steps) > 1 and steps[-1] > steps[0] else steps[0] + 1
        im = hm.imshow(dist.T, aspect="auto", vmin=0, vmax=1, cmap="magma_r", interpolation="nearest",
                       extent=(steps[0], right, n_labels - 0.5, -0.5))
        hm.set_xlabel("global step")
        hm.set_ylabel("label")
        hm.set_title(f"all {n_labels} labels: mean |p - y| over samples" if t is not None else "mean p", fontsize=9)
        fig.colorbar(im, ax=hm, label="mean |p - y|" if t is not None else "mean p")
    if n_labels > 1:
        fig.suptitle(title + "  (markers: labels; o = 1, x = 0)", fontsize=10)
    elif t is not None:
        axes[0].set_title(title + "\n(markers: labels; o = 1, x = 0)", fontsize=9)
    return _lean(fig)


def _plot_regression(steps: np.ndarray, v: np.ndarray, targets: Optional[np.ndarray], title: str,
                     what: Optional[str] = None) -> Any:
    n, d = v.shape[1], v.shape[2]
    t = targets.reshape(n, -1).astype(float) if targets is not None and targets.size == n * d else None
    fig = _figure(12, 4.5)
    ax, sc = fig.subplots(1, 2, width_ratios=[3, 2])
    for i in range(n):
        ax.plot(steps, v[:, i, 0], color=_colour(i), lw=1.2, **_few_points(steps))
    _step_axis(ax, steps)
    if t is not None:
        for i in range(n):
            ax.axhline(t[i, 0], color=_colour(i), ls="--", lw=0.9)
    ax.set_xlabel("global step")
    ax.set_ylabel(f"{what or 'prediction'} (dashed: target)" + (f", output 0 of {d}" if d > 1 else ""))
    ax.set_title(title, fontsize=10)
    final = v[-1].reshape(-1)
    if t is not None:
        tt = t.reshape(-1)
        finite = np.concatenate([tt[np.isfinite(tt)], final[np.isfinite(final)]])
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        pad = 0.05 * (hi - lo or 1.0)
        sc.scatter(tt, final, c=[_colour(i) for i in range(n) for _ in range(d)], s=25, zorder=3)
        ends = [lo - pad, hi + pad]
        sc.plot(ends, ends, color="0.5", ls="--", label="identity (prediction = target)")
        sc.set_xlabel("target")
    else:
        sc.scatter(np.arange(final.size), final, s=25)
        sc.set_xlabel("sample")
    sc.set_ylabel(f"prediction at step {int(steps[-1])}")
    # the identity line is named in the title: a legend in the corner would sit on the points there
    sc.set_title("Final predictions vs targets" + (" (dashed: prediction = target)" if t is not None else ""),
                 fontsize=10)
    return _lean(fig)


def _few_points(steps: np.ndarray) -> dict[str, Any]:
    """Markers on the lines of a series of one or two snapshots (a line of one point draws nothing)."""
    return {"marker": "o", "ms": 5} if len(steps) <= 2 else {}


def _step_axis(ax: Any, steps: np.ndarray) -> None:
    """Whole steps on the x axis, and room around a single snapshot (not an axis from -0.05 to 0.05)."""
    _integer_x(ax)
    if len(steps) and np.ptp(steps) == 0:
        ax.set_xlim(steps[0] - 1, steps[0] + 1)


def plot_generalization(
    steps: Sequence[int],
    train_losses: Sequence[float],
    val_losses: Sequence[float],
    prior_loss: Optional[float] = None,
    epochs: Optional[Sequence[int]] = None,
) -> Any:
    """Training and validation loss on fixed samples at each validation, with the constant-prediction line and the
    best validation loss marked.

    Validation rising while training falls is overfitting (the best epoch is where to stop); validation at or above
    the dashed line (the loss of the best constant prediction) while training is far below means the model does not
    transfer.

    Args:
        steps: the training step of each evaluation.
        train_losses: loss on the fixed training sample at each evaluation.
        val_losses: loss on the fixed validation sample at each evaluation.
        prior_loss: the loss of the best constant prediction (label prior).
        epochs: the epoch of each evaluation (named at the best point).

    Returns:
        The figure (one axes: training line, validation line, then the reference line).

    Example::

        >>> fig = plot_generalization([10, 20, 30], [1.0, 0.5, 0.2], [1.1, 0.7, 0.9], prior_loss=2.3, epochs=[0, 1, 2])
        >>> ax = fig.axes[0]; [ln.get_ydata().tolist() for ln in ax.get_lines()[:2]], ax.get_xlabel()
        ([[1.0, 0.5, 0.2], [1.1, 0.7, 0.9]], 'training step')
    """
    fig = _figure(12, 4.2, right=3.3)
    ax = fig.add_subplot()
    x = np.asarray(steps, dtype=float)
    tr = np.asarray(train_losses, dtype=float)
    va = np.asarray(val_losses, dtype=float)
    ms = 7 if len(x) == 1 else 3
    few = len(x) <= 60
    # validation dashed with squares over solid training with dots: both show where the two losses agree
    ax.plot(x, tr, color="tab:blue", lw=1.6, label="training loss (fixed sample, eval mode)",
            **({"marker": "o", "ms": ms} if few else {}))
    ax.plot(x, va, color="tab:green", lw=1.4, ls="--", label="validation loss (fixed sample)",
            **({"marker": "s", "ms": ms + 1, "mfc": "none"} if few else {}))
    if prior_loss is not None and np.isfinite(prior_loss):
        ax.axhline(prior_loss, color="tab:orange", ls="--", lw=1.5,
                   label=f"constant-prediction loss {prior_loss:.4g}")
    if np.isfinite(va).any():
        b = int(np.nanargmin(va))
        where = f"epoch {epochs[b]}" if epochs is not None and len(epochs) > b else f"step {int(x[b])}"
        ax.plot([x[b]], [va[b]], marker="*", ms=14, color="tab:red", ls="none", zorder=5, alpha=0.8,
                label=f"best validation loss {va[b]:.4g} ({where})")
    both = np.concatenate([tr, va])
    if _spans_decade(both, 50.0):
        log_y(ax, both)
    _integer_x(ax)
    if len(x) == 1:
        ax.set_xlim(x[0] - 1, x[0] + 1)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title("Training vs validation loss (the bias/variance picture)")
    _legend_outside(ax)
    return _lean(fig)


def plot_optimization(
    lrs: list[list[float]],
    layer_history: list[tuple[int, list[float]]],
    layer_names: list[str],
    grad_norms: list[float],
    clip_val: Optional[float] = None,
    weight_history: Optional[list[tuple[int, float, float]]] = None,
    planned_steps: Optional[float] = None,
    schedule_fraction: float = 0.25,
    grad_every: int = 1,
    update_ratios: Optional[list[tuple[int, list[float]]]] = None,
    update_ratio_names: Optional[list[str]] = None,
):  # noqa: ANN201
    """Learning rate per batch, mean RMS gradient per layer per window, pre-clip gradient norm per step with the clip
    value, and weight norm and window loss relative to their first read (both on one axis: shrinking weights with a
    flat loss is what weight decay that is too strong looks like); with ``update_ratios``, a bottom row with the
    update ratio per tensor (:func:`~lightning_recipe.report.update_ratio_plot.update_ratio_panel`).

    Example::

        >>> fig = plot_optimization([[0.1], [0.05]], [(10, [1e-3, 1e-1])], ["net.0", "net.2"], [1.0, 2.0], 0.5,
        ...                         [(10, 3.0, 2.3)], 100)
        >>> len(fig.axes) >= 4
        True
    """
    from matplotlib.figure import Figure

    rows = 3 if update_ratios else 2
    fig = Figure(figsize=(12, 3.5 * rows))
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.16 / rows, top=1 - 0.12 / rows, wspace=0.25, hspace=0.42)
    a_lr, a_layer, a_clip, a_w = (fig.add_subplot(rows, 2, i) for i in range(1, 5))  # an axes costs ~5 ms
    if update_ratios:
        from lightning_recipe.report.update_ratio_plot import update_ratio_panel

        update_ratio_panel(fig.add_subplot(rows, 2, 5), update_ratios, update_ratio_names or [])
    lr = np.asarray(lrs, dtype=float) if lrs else np.zeros((0, 1))
    for j in range(min(lr.shape[1] if lr.ndim == 2 else 0, 6)):
        # the values in the legend: a flat line on a log axis falls between two labelled decades
        a_lr.plot(lr[:, j], lw=1.2, **_few_points(lr), label=f"group {j}: {lr[0, j]:.3g} -> {lr[-1, j]:.3g}")
    if planned_steps:
        a_lr.axvline(schedule_fraction * planned_steps, color="tab:red", ls=":", label=f"{schedule_fraction:g} of plan")
    positive = lr[lr > 0] if lr.size else lr
    if positive.size and positive.max() / positive.min() > 10:  # a log axis only where the rate spans a decade
        log_y(a_lr, positive)
    a_lr.set_xlabel("training batch", fontsize=8)
    a_lr.set_ylabel("learning rate", fontsize=8)
    a_lr.set_title("learning rate per batch", fontsize=9)
    a_lr.legend(fontsize=7)
    if layer_history:
        steps = [s for s, _ in layer_history]
        mark = "o" if len(steps) <= 30 else None  # markers on long series cost more to draw than they show
        vals = np.asarray([v for _, v in layer_history], dtype=float)
        shown = range(vals.shape[1]) if vals.shape[1] <= 10 else np.linspace(0, vals.shape[1] - 1, 10).astype(int)
        for i in shown:
            v = np.where(vals[:, i] > 0, vals[:, i], np.nan)
            a_layer.plot(steps, v, marker=mark, ms=3, lw=1, label=layer_names[i] if i < len(layer_names) else str(i))
        if _spans_decade(vals[vals > 0]):  # a log axis only where the layers span a decade
            log_y(a_layer, vals[vals > 0])
        a_layer.legend(fontsize=7, ncol=2)
    a_layer.set_title("RMS gradient per layer (window mean)", fontsize=9)
    a_layer.set_xlabel("training batch", fontsize=8)
    a_layer.set_ylabel("RMS gradient", fontsize=8)
    if grad_norms:
        g = np.asarray(grad_norms, dtype=float)
        a_clip.plot(np.arange(g.size) * grad_every, g, lw=0.8, label="pre-clip gradient norm", **_few_points(g))
        if clip_val:
            a_clip.axhline(float(clip_val), color="tab:red", ls="--", label=f"gradient_clip_val={float(clip_val):g}")
        pos = g[np.isfinite(g) & (g > 0)]
        if pos.size and pos.max() / pos.min() > 10:  # a log axis only where the norm spans a decade
            log_y(a_clip, pos)
        if clip_val:  # a legend of the norm alone would repeat the axis label (and cost ~10 ms to draw)
            a_clip.legend(fontsize=7)
    a_clip.set_title(f"gradient norm (every {grad_every} optimizer steps)" if grad_every > 1 else
                     "gradient norm per optimizer step", fontsize=9)
    a_clip.set_xlabel("optimizer step", fontsize=8)
    a_clip.set_ylabel("gradient norm (pre-clip)", fontsize=8)
    if weight_history:  # one axis, both relative to the first read (a twin axis would double the drawing time)
        s = [h[0] for h in weight_history]
        mark = "o" if len(s) <= 30 else None
        w = np.asarray([h[1] for h in weight_history], dtype=float)
        loss = np.asarray([h[2] for h in weight_history], dtype=float)
        if w[0] > 0:
            # dashed, hollow squares: both ratios start at 1 and stay there when nothing moves (the loss on top)
            a_w.plot(s, w / w[0], marker="s" if mark else None, ms=7, mfc="none", ls="--", color="tab:green",
                     label=f"weight norm / {w[0]:.4g}")
        first = next((v for v in loss if np.isfinite(v) and v != 0), None)
        if first is not None:
            a_w.plot(s, loss / first, marker=mark, ms=3, color="tab:blue", label=f"window mean loss / {first:.4g}")
        a_w.axhline(1.0, color="0.7", lw=0.8)
        a_w.legend(fontsize=7)
    a_w.set_title("weight norm and loss, relative to the first read", fontsize=9)
    a_w.set_xlabel("training batch", fontsize=8)
    a_w.set_ylabel("ratio to the first read", fontsize=8)
    for ax in (a_lr, a_layer, a_clip, a_w):  # whole steps; room around a single read
        xs = np.concatenate([np.asarray(ln.get_xdata(), float).reshape(-1) for ln in ax.get_lines()
                             if ln.get_transform() == ax.transData] or [np.zeros(0)])
        _step_axis(ax, xs[np.isfinite(xs)])
    return _lean(fig)
