"""Figures of examples: the first batch as the network sees it and the examples with the highest loss.

Arrays in, :class:`matplotlib.figure.Figure` out (object API, no pyplot); re-exported by
:mod:`lightning_recipe.report.plotting`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_recipe.functional.data import _feature_matrix, _is_image
from lightning_recipe.report._style import _figure

__all__ = ["plot_first_batch", "plot_worst_examples"]

_WORST_COLUMNS = 4


def plot_worst_examples(inputs: Any, captions: Sequence[str], title: str, max_items: int = 8) -> Any:
    """The examples with the highest loss, each with its caption (label, prediction, loss).

    Image-like inputs (``(N, C, H, W)`` or ``(N, H, W)`` floats) are drawn as tiles on one colour scale, four to a
    row (eight in one row shrink to unreadable captions in the HTML report, whose page is 1200 pixels wide);
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
        cols = min(n, _WORST_COLUMNS)
        rows = math.ceil(n / cols)
        gap = max(1, math.ceil(0.25 * h))  # room above each tile for its caption
        canvas = np.full((rows * (h + gap), cols * (w + 1) - 1), np.nan)
        for i in range(n):
            r, c = divmod(i, cols)
            canvas[r * (h + gap) + gap:(r + 1) * (h + gap), c * (w + 1):c * (w + 1) + w] = imgs[i]
        width = 2.4 * cols
        fig = _figure(max(width, 4), width * canvas.shape[0] / canvas.shape[1] + 0.5)
        ax = fig.add_axes((0.01, 0.01, 0.98, 1 - 0.02 - 0.45 / fig.get_figheight()))
        import matplotlib

        cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
        ax.imshow(canvas, cmap=cmap, interpolation="nearest", aspect="auto")
        ax.axis("off")
        for i in range(n):
            r, c = divmod(i, cols)
            ax.text(c * (w + 1) + w / 2, r * (h + gap) + gap - 0.6, captions[i], ha="center", va="bottom",
                    fontsize=8)
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
    fig.suptitle(title, fontsize=10)
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
    ax.set_ylabel("count", fontsize=7, labelpad=1)
    ax.set_xlabel(f"value: {v.min():.3g} .. {v.max():.3g}" if v.size else "value (none finite)", fontsize=7,
                  labelpad=1)
