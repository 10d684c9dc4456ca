"""The update-ratio panel of the optimization-health figure: ``||dw|| / ||w||`` per tensor per measured step."""

from __future__ import annotations

from typing import Any

import numpy as np


def update_ratio_panel(ax: Any, update_ratios: list[tuple[int, list[float]]], names: list[str]) -> None:
    """Draw on ``ax``: the median over the tensors of the update ratio at each measured optimizer step, the band
    between the tensors' 10th and 90th percentiles, the tensors with the smallest and the largest median ratio (two
    each, named) and the ``1e-3`` rule of thumb, on a log axis with decade labels; the legend outside the axes.

    Example::

        >>> from matplotlib.figure import Figure
        >>> ax = Figure().subplots()
        >>> update_ratio_panel(ax, [(0, [1e-3, 1e-7, 2e-3]), (10, [2e-3, 1e-7, float("nan")])], ["a", "b", "c"])
        >>> ax.get_yscale(), len(ax.get_legend().get_texts())
        ('log', 6)
    """
    from matplotlib.ticker import LogFormatter

    steps = np.asarray([s for s, _ in update_ratios], dtype=float)
    r = np.asarray([row for _, row in update_ratios], dtype=float)
    r = np.where(np.isfinite(r) & (r > 0), r, np.nan)
    live = [i for i in range(r.shape[1]) if np.isfinite(r[:, i]).any()] if r.ndim == 2 else []
    if not live:
        ax.text(0.5, 0.5, "no update ratio measured", ha="center", va="center", transform=ax.transAxes)
        return
    r = r[:, live]
    mark = "o" if len(steps) <= 30 else None
    lo, med, hi = _nan_quantiles(r, (0.1, 0.5, 0.9))
    (per,) = _nan_quantiles(r.T, (0.5,))
    ax.fill_between(steps, lo, hi, color="0.85", label="10-90 % of the tensors")
    ax.plot(steps, med, color="k", lw=1.5, marker=mark, ms=3, label="median tensor")
    order = np.argsort(per)
    extremes = list(dict.fromkeys([*order[:2], *order[::-1][:2]]))
    for k in extremes:
        name = names[live[k]] if live[k] < len(names) else str(live[k])
        ax.plot(steps, r[:, k], lw=1, marker=mark, ms=3, label=f"{name} (median {per[k]:.2g})")
    ax.axhline(1e-3, color="tab:red", ls=":", lw=1, label="1e-3 (rule of thumb)")
    ax.set_yscale("log")
    ax.minorticks_off()
    ax.yaxis.set_major_formatter(LogFormatter())
    ax.set_xlabel("optimizer step", fontsize=8)
    ax.set_ylabel("||dw|| / ||w|| per step", fontsize=8)
    ax.set_title("update ratio per tensor (sampled; smallest and largest named)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _nan_quantiles(r: Any, qs: tuple[float, ...]) -> list[Any]:
    """Per row of ``r``, the quantiles ``qs`` of its non-NaN values (NaN for a row with none), as
    ``np.nanquantile(r, q, axis=1)`` computes them (linear interpolation), in one sort instead of numpy's loop over
    the rows that hold a NaN (milliseconds per figure on a long fit).

    Example::

        >>> [q.tolist() for q in _nan_quantiles(np.array([[1.0, np.nan, 3.0, 2.0], [np.nan] * 4]), (0.5, 0.9))]
        [[2.0, nan], [2.8, nan]]
    """
    a = np.sort(np.asarray(r, dtype=float), axis=1)  # a 2-d array; NaN sorts last
    n = (~np.isnan(a)).sum(1)
    out = []
    rows = np.arange(len(a))
    for q in qs:
        pos = np.maximum(n - 1, 0) * q
        below = np.floor(pos).astype(int)
        above = np.minimum(below + 1, np.maximum(n - 1, 0))
        if a.shape[1]:
            v = a[rows, below] + (pos - below) * (a[rows, above] - a[rows, below])
        else:
            v = np.full(len(a), np.nan)
        out.append(np.where(n > 0, v, np.nan))
    return out
