"""Figures, matplotlib only: arrays in, ``matplotlib.figure.Figure`` out (no pyplot, no display, nothing leaked).

Every function builds a :class:`matplotlib.figure.Figure` with the object API: nothing is registered in pyplot's
figure manager and no GUI backend is touched, so the figures render headless and are freed with their last
reference (:func:`lightning_recipe.report.loggers.log_figure` also clears them once sent).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_recipe.functional.data import _feature_matrix, _is_image

__all__ = ["plot_first_batch", "plot_generalization", "plot_loss_curve", "plot_optimization", "plot_prediction_dynamics",
           "plot_worst_examples"]

_MAX_PANELS = 4  # label panels of a multilabel figure; more labels get a labels x steps heatmap instead


def _figure(width: float = 10.0, height: float = 4.0) -> Any:
    """A figure with fixed margins: a layout engine (constrained/tight) doubles the drawing time of every figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.6 / width, right=1 - 0.25 / width, bottom=0.55 / height, top=1 - 0.45 / height,
                        wspace=0.28, hspace=0.35)
    return fig


def log_y(ax: Any) -> None:
    """A logarithmic y axis without minor ticks (on a log axis they are most of the figure's drawing time), labelled
    ``1e-03``, ``0.01``, ... (matplotlib's default ``10^{-3}`` labels go through its TeX parser: a few ms a label)."""
    from matplotlib.ticker import LogFormatter

    ax.set_yscale("log")
    ax.minorticks_off()
    ax.yaxis.set_major_formatter(LogFormatter())


def _lean(fig: Any) -> Any:
    """At most ~6 ticks on each linear axis of ``fig`` (matplotlib's default allows 10 on a wide axis; every tick
    label is laid out and drawn as text, most of a panel's drawing time). Returns ``fig``."""
    from matplotlib.ticker import AutoLocator, MaxNLocator

    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "linear" and type(axis.get_major_locator()) is AutoLocator:
                axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    return fig


def _colour(i: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)


def plot_loss_curve(
    losses: Sequence[float],
    expected_initial: Optional[float] = None,
    prior_loss: Optional[float] = None,
    epoch_ends: Sequence[int] = (),
) -> Any:
    """Training loss per step with the expected initial loss and the label-prior loss as reference lines.

    A curve that starts far from the dotted line (expected initial loss) points at a bad initialisation; a curve that
    flattens on the dashed line (loss of the best constant prediction) means the model learned only the label
    prior. Non-finite losses are marked with red ticks at the top; epoch ends are faint vertical lines.

    Args:
        losses: training loss per batch.
        expected_initial: the loss expected at the first step (constant prediction of the initial head bias).
        prior_loss: the loss of the best input-independent (constant) prediction.
        epoch_ends: number of losses at each epoch end.

    Returns:
        The figure (one axes; the curve is its first line).

    Example::

        >>> fig = plot_loss_curve([2.3, 1.2, 0.7], expected_initial=2.3026, prior_loss=2.3)
        >>> len(fig.axes), [round(v, 4) for v in fig.axes[0].get_lines()[1].get_ydata()]
        (1, [2.3026, 2.3026])
    """
    fig = _figure(10, 4)
    ax = fig.add_subplot()
    y = np.asarray(losses, dtype=float).reshape(-1)
    x = np.arange(len(y))
    finite = np.isfinite(y)
    ax.plot(x, y, lw=0.8, color="tab:blue", alpha=0.6 if len(y) >= 10 else 1.0, marker="." if len(y) < 50 else None,
            label="training loss (per batch)")
    if expected_initial is not None and np.isfinite(expected_initial):
        ax.axhline(expected_initial, color="tab:red", ls=":", lw=1.5,
                   label=f"expected initial loss {expected_initial:.4g}")
    if prior_loss is not None and np.isfinite(prior_loss):
        ax.axhline(prior_loss, color="tab:orange", ls="--", lw=1.5,
                   label=f"label-prior (constant prediction) loss {prior_loss:.4g}")
    if len(y) >= 10 and finite.sum() >= 10:
        k = max(2, len(y) // 50)
        filled = np.where(finite, y, np.nanmax(np.where(finite, y, np.nan)))
        smooth = np.convolve(filled, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1 :], smooth, color="tab:blue", lw=1.8, label=f"moving mean ({k} batches)")
    if (~finite).any():
        ax.plot(x[~finite], np.ones(int((~finite).sum())), "|", color="red", ms=14, transform=ax.get_xaxis_transform(),
                label="non-finite loss")
    if len(epoch_ends):  # one collection: a line per epoch costs ~1 ms each to draw
        ax.vlines(list(epoch_ends), 0, 1, transform=ax.get_xaxis_transform(), colors="0.85", lw=0.6, zorder=0)
    pos = y[finite]
    if pos.size and pos.min() > 0 and pos.max() / pos.min() > 50:
        log_y(ax)
    ax.set_xlabel("training batch")
    ax.set_ylabel("loss")
    ax.set_title("Training loss with its reference lines")
    ax.legend(loc="upper right", fontsize=8)
    return _lean(fig)


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
        ax.plot(steps, v[:, i], color=_colour(i), lw=1.2, alpha=0.85)
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
            ax.plot(steps, v[:, i, j], color=c, lw=1.1, alpha=0.85)
            if t is not None:
                ax.plot([x_mark], [t[i, j]], marker="o" if t[i, j] > 0.5 else "x", color=c, ms=7, ls="none")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("global step")
        ax.set_ylabel("predicted probability" if j == 0 else "")
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
        fig.colorbar(im, ax=hm)
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
        ax.plot(steps, v[:, i, 0], color=_colour(i), lw=1.2)
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
        sc.legend(fontsize=8, loc="upper left")
    else:
        sc.scatter(np.arange(final.size), final, s=25)
        sc.set_xlabel("sample")
    sc.set_ylabel(f"prediction at step {int(steps[-1])}")
    sc.set_title("Final predictions vs targets", fontsize=10)
    return _lean(fig)


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
    fig = _figure(10, 4)
    ax = fig.add_subplot()
    x = np.asarray(steps, dtype=float)
    tr = np.asarray(train_losses, dtype=float)
    va = np.asarray(val_losses, dtype=float)
    marker = "o" if len(x) <= 60 else None
    ax.plot(x, tr, color="tab:blue", lw=1.6, marker=marker, ms=3, label="training loss (fixed sample, eval mode)")
    ax.plot(x, va, color="tab:green", lw=1.6, marker=marker, ms=3, label="validation loss (fixed sample)")
    if prior_loss is not None and np.isfinite(prior_loss):
        ax.axhline(prior_loss, color="tab:orange", ls="--", lw=1.5,
                   label=f"constant-prediction loss {prior_loss:.4g}")
    if np.isfinite(va).any():
        b = int(np.nanargmin(va))
        where = f"epoch {epochs[b]}" if epochs is not None and len(epochs) > b else f"step {int(x[b])}"
        ax.plot([x[b]], [va[b]], marker="*", ms=14, color="tab:red", ls="none",
                label=f"best validation loss {va[b]:.4g} ({where})")
    both = np.concatenate([tr, va])
    pos = both[np.isfinite(both)]
    if pos.size and pos.min() > 0 and pos.max() / pos.min() > 50:
        log_y(ax)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.set_title("Training vs validation loss (the bias/variance picture)")
    fig.subplots_adjust(left=0.09)  # room for log-axis tick labels such as 1e-01 and the axis label
    ax.legend(loc="best", fontsize=8)
    return _lean(fig)


def plot_worst_examples(inputs: Any, captions: Sequence[str], title: str, max_items: int = 8) -> Any:
    """The examples with the highest loss, each with its caption (label, prediction, loss).

    Image-like inputs (``(N, C, H, W)`` or ``(N, H, W)`` floats) are drawn as a row of tiles on one colour scale;
    anything else as one line of text per example (the first values of its features or token ids).

    Args:
        inputs: the examples, worst first (a tensor; anything else gets the text form with its captions only).
        captions: one caption per example.
        title: the figure's title.
        max_items: how many examples at most.

    Returns:
        The figure.

    Example::

        >>> import torch
        >>> fig = plot_worst_examples(torch.rand(3, 1, 8, 8), ["y=1 pred=2", "y=0 pred=3", "y=4 pred=4"], "worst")
        >>> [t.get_text() for t in fig.axes[0].texts]
        ['y=1 pred=2', 'y=0 pred=3', 'y=4 pred=4']
    """
    import torch

    n = min(len(captions), max_items)
    x = inputs.detach().float().cpu()[:n] if isinstance(inputs, torch.Tensor) else None
    image = x is not None and x.ndim in (3, 4) and x.shape[-1] >= 4 and x.shape[-2] >= 4
    if image:
        imgs = (x[:, 0] if x.ndim == 4 else x).numpy()
        h, w = imgs.shape[1], imgs.shape[2]
        canvas = np.full((h, n * (w + 1) - 1), np.nan)
        for i in range(n):
            canvas[:, i * (w + 1):i * (w + 1) + w] = imgs[i]
        fig = _figure(max(2.2 * n, 4), 2.9)
        ax = fig.add_axes((0.01, 0.02, 0.98, 0.72))
        import matplotlib

        cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
        ax.imshow(canvas, cmap=cmap, interpolation="nearest", aspect="equal")
        ax.axis("off")
        for i in range(n):
            ax.text(i * (w + 1) + w / 2, -0.8, captions[i], ha="center", va="bottom", fontsize=7)
    else:
        fig = _figure(12, 0.35 * n + 1.0)
        ax = fig.add_axes((0.01, 0.01, 0.98, 1 - 0.6 / fig.get_figheight()))
        ax.axis("off")
        for i in range(n):
            values = ""
            if x is not None and x.ndim >= 2:
                row = x[i].reshape(-1)[:10].tolist()
                values = "  x=[" + ", ".join(f"{v:.3g}" for v in row) + (", ...]" if x[i].numel() > 10 else "]")
            ax.text(0, 1 - (i + 0.5) / max(n, 1), f"{captions[i]}{values}"[:160], va="center", family="monospace",
                    fontsize=8, transform=ax.transAxes)
    fig.suptitle(title, fontsize=9)
    return fig


def _plain_figure(width: float, height: float):  # noqa: ANN202
    """A plain figure: no constrained layout (it costs seconds for a grid of small panels)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.04, right=0.98, bottom=0.06, top=0.88, wspace=0.15, hspace=0.45)
    return fig


def plot_first_batch(
    inputs: Tensor,
    targets: Optional[Tensor] = None,
    layout: str = "auto",
    decode: Optional[Callable[[list[int]], str]] = None,
    max_items: int = 16,
    max_features: int = 8,
):  # noqa: ANN201
    """The first batch exactly as it goes into the network.

    Image-like inputs (``(N, C, H, W)``, ``(N, H, W)``): a grid of up to ``max_items`` images (tiles of one image, so
    it draws as fast as one panel) with their labels above, one colour scale for the whole batch (its range in the title, so that unscaled values show); RGB when
    ``C == 3``, else the first channel. Integer 2-D inputs (token ids): the first rows, decoded with ``decode`` when
    given, else the ids. Anything else: a histogram per feature (up to ``max_features``) with its mean and std, and
    one of the targets.

    Example::

        >>> fig = plot_first_batch(torch.rand(8, 1, 6, 6) * 255, torch.arange(8))
        >>> [t.get_text() for t in fig.axes[0].texts][:3]
        ['y=0', 'y=1', 'y=2']
    """
    x = inputs.detach().cpu()
    y = targets.detach().cpu() if isinstance(targets, Tensor) else None

    def label(i: int) -> str:
        if y is None or y.ndim == 0 or i >= y.shape[0]:
            return ""
        v = y[i]
        return f"y={v.item():.4g}" if v.numel() == 1 else f"y={v.reshape(-1)[:4].tolist()}"

    if x.dtype != torch.bool and not x.is_floating_point() and x.ndim == 2 and x.dtype != torch.uint8:
        rows = min(x.shape[0], 8)
        fig = _plain_figure(12, 0.6 * rows + 1)
        ax = fig.add_subplot()
        ax.axis("off")
        lines = []
        for i in range(rows):
            ids = x[i].tolist()
            text = decode(ids) if decode is not None else " ".join(str(t) for t in ids[:48]) + (" ..." if len(ids) > 48 else "")
            lines.append(f"[{i}] {label(i)}  {text!s}"[:200])
        ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=8, transform=ax.transAxes)
        ax.set_title("First batch: " + ("decoded token ids" if decode is not None else "token ids (pass `decode=` for text)"))
        return fig
    xf = x.float()
    if _is_image(x, layout) and x.ndim in (3, 4):
        imgs = (xf if x.ndim == 3 else (xf.permute(0, 2, 3, 1) if x.shape[1] == 3 else xf[:, 0])).numpy()
        n = min(imgs.shape[0], max_items)
        cols = min(n, 4) if n else 1
        rows = max(1, math.ceil(n / cols))
        lo, hi = float(xf.min()), float(xf.max())
        # one image of tiles on one axes (a grid of axes costs ~30 ms a panel to draw); the gap above a tile holds
        # its label
        h, w = imgs.shape[1], imgs.shape[2]
        gap = max(1, math.ceil(0.2 * h))
        rgb = imgs.ndim == 4
        canvas = np.full((rows * (h + gap), cols * (w + 1) + 1) + ((3,) if rgb else ()), 1.0 if rgb else np.nan)
        for i in range(n):
            r, c = divmod(i, cols)
            tile = np.clip((imgs[i] - lo) / max(hi - lo, 1e-12), 0, 1) if rgb else imgs[i]
            canvas[r * (h + gap) + gap:(r + 1) * (h + gap), c * (w + 1) + 1:(c + 1) * (w + 1)] = tile
        fig = _plain_figure(1.8 * cols, (1.8 * cols) * canvas.shape[0] / canvas.shape[1] + 0.6)
        ax = fig.add_axes((0.01, 0.01, 0.98, 1 - 0.02 - 0.5 / fig.get_figheight()))
        ax.axis("off")
        if rgb:
            ax.imshow(canvas, interpolation="nearest", aspect="auto")
        else:
            import matplotlib

            cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
            ax.imshow(canvas, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest", aspect="auto")
        for i in range(n):
            r, c = divmod(i, cols)
            ax.text(c * (w + 1) + 1 + w / 2, r * (h + gap) + gap - 0.5, label(i), ha="center", va="bottom", fontsize=8)
        fig.suptitle(f"First batch as the network sees it: {tuple(x.shape)} {str(x.dtype).replace('torch.', '')}, "
                     f"values in [{lo:.4g}, {hi:.4g}], mean {float(xf.mean()):.3g}, std {float(xf.std()):.3g}", fontsize=9)
        return fig
    m = _feature_matrix(xf, layout)
    k = min(m.shape[1], max_features)
    extra = 1 if y is not None and y.numel() else 0
    cols = min(k + extra, 4)
    rows = max(1, math.ceil((k + extra) / cols))
    fig = _plain_figure(3 * cols, 2.2 * rows + 0.6)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for j, ax in enumerate(axes):
        if j < k:
            v = m[:, j].numpy()
            v = v[np.isfinite(v)]
            _histogram(ax, v, f"feature {j}: mean {v.mean() if v.size else float('nan'):.3g}, std "
                       f"{v.std() if v.size else float('nan'):.3g}", "tab:blue")
        elif j == k and extra:
            _histogram(ax, y.float().reshape(-1).numpy(), "targets", "tab:orange")
        else:
            ax.axis("off")
    fig.suptitle(f"First batch as the network sees it: {tuple(x.shape)}, {m.shape[1]} features"
                 + (f" (first {k} shown)" if k < m.shape[1] else ""), fontsize=9)
    return fig


def _histogram(ax: Any, v: np.ndarray, title: str, color: str) -> None:
    """A histogram panel without ticks (they cost most of a panel's drawing time): the range is written under it."""
    ax.hist(v, bins=20, color=color, histtype="stepfilled")  # one patch, not one per bin
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    if v.size:
        ax.set_xlabel(f"{v.min():.3g} .. {v.max():.3g}", fontsize=7, labelpad=1)


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
    (a_lr, a_layer), (a_clip, a_w) = fig.subplots(rows, 2)[:2]
    if update_ratios:
        from lightning_recipe.report.update_ratio_plot import update_ratio_panel

        for ax in fig.axes[4:]:
            ax.remove()
        update_ratio_panel(fig.add_subplot(rows, 2, (5, 5)), update_ratios, update_ratio_names or [])
    lr = np.asarray(lrs, dtype=float) if lrs else np.zeros((0, 1))
    for j in range(min(lr.shape[1] if lr.ndim == 2 else 0, 6)):
        # the values in the legend: a flat line on a log axis falls between two labelled decades
        a_lr.plot(lr[:, j], lw=1.2, label=f"group {j}: {lr[0, j]:.3g} -> {lr[-1, j]:.3g}")
    if planned_steps:
        a_lr.axvline(schedule_fraction * planned_steps, color="tab:red", ls=":", label=f"{schedule_fraction:g} of plan")
    positive = lr[lr > 0] if lr.size else lr
    if positive.size and positive.max() / positive.min() > 10:  # a log axis only where the rate spans a decade
        log_y(a_lr)
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
        if np.nanmax(np.where(vals > 0, vals, np.nan)) > 0:
            log_y(a_layer)
        a_layer.legend(fontsize=6, ncol=2)
    a_layer.set_title("RMS gradient per layer (window mean)", fontsize=9)
    a_layer.set_xlabel("training batch", fontsize=8)
    a_layer.set_ylabel("RMS gradient", fontsize=8)
    if grad_norms:
        g = np.asarray(grad_norms, dtype=float)
        a_clip.plot(np.arange(g.size) * grad_every, g, lw=0.8, label="pre-clip gradient norm")
        if clip_val:
            a_clip.axhline(float(clip_val), color="tab:red", ls="--", label=f"gradient_clip_val={float(clip_val):g}")
        pos = g[np.isfinite(g) & (g > 0)]
        if pos.size and pos.max() / pos.min() > 10:  # a log axis only where the norm spans a decade
            log_y(a_clip)
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
            a_w.plot(s, w / w[0], marker=mark, ms=3, color="tab:green", label=f"weight norm / {w[0]:.4g}")
        first = next((v for v in loss if np.isfinite(v) and v != 0), None)
        if first is not None:
            a_w.plot(s, loss / first, marker=mark, ms=3, color="tab:blue", label=f"window mean loss / {first:.4g}")
        a_w.axhline(1.0, color="0.7", lw=0.8)
        a_w.legend(fontsize=7)
    a_w.set_title("weight norm and loss, relative to the first read", fontsize=9)
    a_w.set_xlabel("training batch", fontsize=8)
    a_w.set_ylabel("ratio to the first read", fontsize=8)
    return _lean(fig)
