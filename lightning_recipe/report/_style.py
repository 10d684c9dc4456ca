"""What every figure shares: fixed margins, lean tick locators, log axes that keep their labels, legends that sit
outside the data, and single points that stay visible.

Figures are built with the object API (:class:`matplotlib.figure.Figure`, no pyplot) and without a layout engine:
constrained/tight layout doubles the drawing time of every figure, so margins are set by hand here.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Sequence

import numpy as np

# one label on a log axis per decade is enough from this many decades on; below it the 2x and 5x ticks are labelled
_FEW_DECADES = 3.0


def _figure(width: float = 10.0, height: float = 4.0, right: float = 0.25) -> Any:
    """A figure with fixed margins (``right``: inches right of the axes, room for a legend outside them).

    A layout engine (constrained/tight) doubles the drawing time of every figure.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.85 / width, right=1 - right / width, bottom=0.55 / height, top=1 - 0.45 / height,
                        wspace=0.28, hspace=0.35)
    return fig


def _tick_text(v: float, pos: Any = None) -> str:
    """A tick label without TeX: ``0.02``, ``5``, ``1e-05`` (matplotlib's ``10^{-5}`` goes through its TeX parser)."""
    return f"{v:.3g}" if v > 0 else ""


def log_y(ax: Any, values: Optional[Sequence[float]] = None) -> None:
    """A logarithmic y axis whose tick labels stay readable.

    Over at least ``_FEW_DECADES`` decades one labelled tick per decade (``1e-03``, ``0.01``, ...); over fewer (a
    range that holds one or no power of ten, where matplotlib leaves one label or none) ticks at 1, 2 and 5 times
    each power of ten, all labelled. No minor ticks: on a log axis they are most of the figure's drawing time.
    Callers switch to a log axis only where the data span at least a decade (:func:`_spans_decade`).

    Args:
        ax: the axes.
        values: the data drawn on the axis (positive finite values count); ``None``: one label per decade.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.minorticks_off()
    v = np.asarray(values if values is not None else [], dtype=float).reshape(-1)
    v = v[np.isfinite(v) & (v > 0)]
    decades = math.log10(v.max() / v.min()) if v.size else math.inf
    subs = (1.0,) if decades >= _FEW_DECADES else (1.0, 2.0, 5.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(_tick_text))


def _spans_decade(values: Any, factor: float = 10.0) -> bool:
    """Whether the positive finite ``values`` span at least ``factor`` (a decade by default): where a log axis helps.

    Example::

        >>> _spans_decade([0.5, 2.0]), _spans_decade([0.01, 0.2]), _spans_decade([0.0, 1.0])
        (False, True, False)
    """
    v = np.asarray(values, dtype=float).reshape(-1)
    v = v[np.isfinite(v)]
    if not v.size or v.min() <= 0:
        return False
    return bool(v.max() / v.min() >= factor)


def _lean(fig: Any) -> Any:
    """At most ~6 ticks on each linear axis of ``fig`` (matplotlib's default allows 10 on a wide axis; every tick
    label is laid out and drawn as text, most of a panel's drawing time), and each title pinned at the top of its
    axes (where matplotlib puts it when nothing is drawn above the axes: left to itself, it lays the x tick labels
    out once more at every draw to find that place, ~15 % of a panel's drawing time); a title above a secondary
    axis (the loss curve's epochs) keeps matplotlib's placement. Every MaxN/Log locator then gives only the ticks
    within the view (:func:`_in_view_of`). Returns ``fig``."""
    from matplotlib.ticker import AutoLocator, LogLocator, MaxNLocator

    for ax in fig.axes:
        if ax.get_title() and not ax.child_axes and ax.xaxis.get_label_position() != "top":  # no secondary axis above
            ax.set_title(ax.get_title(), fontsize=ax.title.get_fontsize(), y=1.0)
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "linear" and type(axis.get_major_locator()) is AutoLocator:
                axis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
            if type(axis.get_major_locator()) in (MaxNLocator, LogLocator):
                axis.set_major_locator(_in_view_of(axis.get_major_locator()))
    return fig


def _in_view(locs: Any, lo: float, hi: float) -> list[float]:
    """The tick locations within ``[lo, hi]`` (a relative tolerance of 1e-9 of the span keeps ticks on the edges).

    Example::

        >>> _in_view([-500.0, 0.0, 500.0, 1000.0, 1500.0], 0.0, 1200.0)
        [0.0, 500.0, 1000.0]
    """
    lo, hi = min(lo, hi), max(lo, hi)
    tol = 1e-9 * (hi - lo) if hi > lo else 1e-9 * max(abs(hi), 1e-300)
    return [float(v) for v in locs if lo - tol <= v <= hi + tol]


@functools.cache
def _in_view_locator() -> type:
    """The :class:`matplotlib.ticker.Locator` subclass below, defined once, on first use (matplotlib is imported
    lazily)."""
    from matplotlib.ticker import Locator

    class InView(Locator):
        """The ticks of ``base`` that fall within the view: matplotlib makes a tick object (two lines, a grid line,
        two texts) for every location a locator returns, also those outside the axes that it then does not draw;
        about half of them on a lean axis, a tenth of a figure's drawing time."""

        def __init__(self, base: Any) -> None:
            self.base = base

        def set_axis(self, axis: Any) -> None:
            super().set_axis(axis)
            self.base.set_axis(axis)

        def __call__(self) -> list[float]:
            return _in_view(self.base(), *self.axis.get_view_interval())

        def tick_values(self, vmin: float, vmax: float) -> Any:
            return self.base.tick_values(vmin, vmax)

        def view_limits(self, vmin: float, vmax: float) -> Any:
            return self.base.view_limits(vmin, vmax)

        def nonsingular(self, vmin: float, vmax: float) -> Any:
            return self.base.nonsingular(vmin, vmax)

    return InView


def _in_view_of(base: Any) -> Any:
    """``base`` (a locator), returning only the ticks within the view (see :func:`_in_view_locator`)."""
    return _in_view_locator()(base)


def _integer_x(ax: Any) -> None:
    """Whole numbers on an x axis of steps or batches (a fit of one step would otherwise show 0.25, 0.5, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10], integer=True))


def _legend_outside(ax: Any, fontsize: float = 8, **kwargs: Any) -> Any:
    """The legend to the right of the axes, outside them: it never hides data (``loc="best"`` does, with many lines).
    The figure needs the room on its right (``_figure(..., right=...)``)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=fontsize,
                     frameon=False, **kwargs)


def _point_marker(n: int) -> dict[str, Any]:
    """Line keywords that keep a short series visible: a line of one point draws nothing without a marker."""
    if n <= 1:
        return {"marker": "o", "ms": 7}
    if n < 50:
        return {"marker": "o", "ms": 3}
    return {}


def _colour(i: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab20"](i % 20)
