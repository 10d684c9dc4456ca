"""Live scalars and figures during training, at the checks' periodic reads, for a bounded cost.

The checks already read their device-side histories on the host every few dozen batches (the losses, the gradient
norms, the prediction records). At those reads they hand what they read to this module:

* :func:`publish` sends scalars (plain floats already on the host: no further sync) to every logger as series
  (``log_metrics`` at the read's global step), together with ``recipe/fail`` and ``recipe/warn``, the counts of
  ``fail`` and ``warn`` findings of every recipe callback of the trainer so far. When a count changes, the MLflow run's
  tags and the W&B run's summary are updated too (:func:`~lightning_recipe.report.loggers.log_tags`).
* :func:`tick` counts the reads of one figure and redraws it (the same method that draws it at the end of the fit) at
  every ``every_n_reads``-th read, but only while the time spent on live redraws of the whole fit, plus the expected
  cost of this one (its last measured cost; before any, the largest measured so far, or 0.5 s), stays within
  ``time_fraction`` of the fit's elapsed wall time (since ``setup``). A long fit therefore spends at most
  ``time_fraction`` of its time on live figures (plus, at worst, the error of one estimate), however many reads it
  has; a fit shorter than ``0.5 s / time_fraction`` (100 s at the default 0.5%) draws only at its end, as without
  live figures. TensorBoard gets every redraw at its global step (the image slider), MLflow an artifact
  ``recipe/<figure>/step_XXXXXXX.png`` per redraw, W&B ``log_image`` at the step; the PNG under the recipe folder is
  overwritten with the latest one.

Measured on a CPU (the digits CNN of ``benchmarks/overhead.py``, 600 steps, on a shared 2-core machine under a load
of ~6): a redraw costs 0.16 (loss curve) to 0.47 s (optimization health, four panels) with PNG files only, 0.33 to
0.95 s with a TensorBoard logger too (the image is decoded and written to the event file). At the default 0.5%, a
one-hour fit spends at most 18 s redrawing: a few dozen redraws, each figure every few minutes. The series cost no
host sync (they are values a read already brought to the host) and nothing without a logger.

Everything here runs on global rank zero only, with no collective. :func:`set_live_figures` changes the defaults
(``every_n_reads=5``, ``time_fraction=0.005``) for every fit that follows.
"""

from __future__ import annotations

import math
import time
import weakref
from typing import Any, Callable, Optional

from lightning_recipe._core.memory import paused_gc
from lightning_recipe.exceptions import RecipeConfigError

__all__ = ["publish", "set_live_figures", "tick"]

_SETTINGS: dict[str, Any] = {"every_n_reads": 5, "time_fraction": 0.005}
_FIRST_GUESS_S = 0.5  # the expected cost of the fit's first redraw (measured: 0.1-0.3 s on a quiet CPU, 0.6-0.9 s busy)


class _LiveFit:
    """What one fit of one trainer has spent on live figures, and what it last published."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.spent = 0.0  # seconds in live redraws
        self.costs: dict[str, float] = {}  # tag -> seconds of its last redraw
        self.reads: dict[str, int] = {}  # tag -> reads since its last redraw
        self.redraws: dict[str, int] = {}  # tag -> live redraws so far
        self.counts: Optional[tuple[int, int]] = None  # (fail, warn) last published
        self.counts_step: Optional[int] = None
        self.steps: dict[str, int] = {}  # series -> the step of its last point (one point per step)


_FITS: "weakref.WeakKeyDictionary[Any, _LiveFit]" = weakref.WeakKeyDictionary()


def set_live_figures(every_n_reads: int = 5, time_fraction: Optional[float] = 0.005) -> dict[str, Any]:
    """Set how often the recipe's figures are redrawn during training (for the fits that follow).

    Args:
        every_n_reads: redraw a figure at every ``every_n_reads``-th periodic read of its check (``0``: only at the
            end of the fit).
        time_fraction: the most the live redraws of a fit may take, as a fraction of its elapsed wall time
            (``None``: no bound, every ``every_n_reads``-th read redraws).

    Returns:
        The previous settings, to restore them with ``set_live_figures(**previous)``.

    Raises:
        RecipeConfigError: If ``every_n_reads`` is not an int >= 0 or ``time_fraction`` not in (0, 1] nor ``None``.

    Example::

        >>> previous = set_live_figures(every_n_reads=10, time_fraction=0.005)
        >>> _ = set_live_figures(**previous)
    """
    if isinstance(every_n_reads, bool) or not isinstance(every_n_reads, int) or every_n_reads < 0:
        raise RecipeConfigError(f"set_live_figures: `every_n_reads` must be an int >= 0, got {every_n_reads!r}.")
    if time_fraction is not None and not (isinstance(time_fraction, (int, float)) and 0 < time_fraction <= 1):
        raise RecipeConfigError(f"set_live_figures: `time_fraction` must be in (0, 1] or None, got {time_fraction!r}.")
    previous = dict(_SETTINGS)
    _SETTINGS.update(every_n_reads=every_n_reads, time_fraction=time_fraction)
    return previous


def new_fit(trainer: Any) -> None:
    """Start the live bookkeeping of a new fit of ``trainer`` (its clock for the time budget starts now)."""
    _FITS[trainer] = _LiveFit()


def _fit(trainer: Any) -> _LiveFit:
    state = _FITS.get(trainer)
    if state is None:
        state = _FITS[trainer] = _LiveFit()
    return state


def finding_counts(trainer: Any) -> tuple[int, int]:
    """``(fail, warn)``: how many findings of every recipe callback of ``trainer`` have those statuses."""
    fail = warn = 0
    for cb in trainer.callbacks:
        if getattr(cb, "_is_recipe_callback", False):
            for f in getattr(cb, "findings", None) or []:
                fail += f.status == "fail"
                warn += f.status == "warn"
    return fail, warn


def publish(trainer: Any, scalars: dict[str, Optional[float]], step: Optional[int] = None,
            flush: bool = False) -> None:
    """Send ``scalars`` (host floats; ``None``, non-finite values and a series that already has a point at ``step``
    are left out) to every logger at ``step``, with ``recipe/fail`` and ``recipe/warn`` (once per step, or when they
    change); a changed count also updates the MLflow tags and the W&B summary. File-based loggers are saved only
    with ``flush`` (at the end of the fit: Lightning saves them at its own logging steps). Rank zero only; nothing is
    done without a logger."""
    if not trainer.is_global_zero or not trainer.loggers:
        return
    from lightning_recipe.report.loggers import log_scalars, log_tags

    step = int(trainer.global_step if step is None else step)
    state = _fit(trainer)
    values = {k: float(v) for k, v in scalars.items()
              if v is not None and math.isfinite(float(v)) and state.steps.get(k) != step}
    counts = finding_counts(trainer)
    if counts != state.counts or step != state.counts_step:
        values.update({"recipe/fail": float(counts[0]), "recipe/warn": float(counts[1])})
        if counts != state.counts:
            log_tags(trainer, {"recipe/fail": counts[0], "recipe/warn": counts[1]})
        state.counts, state.counts_step = counts, step
    if values:
        state.steps.update(dict.fromkeys(values, step))
        log_scalars(trainer, values, step, flush=flush)


def tick(trainer: Any, tag: str, draw: Callable[[Any], Any], every_n_reads: Optional[int] = None) -> bool:
    """One periodic read of the check that draws figure ``tag``: call ``draw(trainer)`` when this is the
    ``every_n_reads``-th read since the last redraw (default: :func:`set_live_figures`'s) and the time budget allows
    it. Returns whether it drew. Rank zero only; a drawing that raises is reported once and the fit goes on."""
    every = _SETTINGS["every_n_reads"] if every_n_reads is None else every_n_reads
    if not every or not trainer.is_global_zero:
        return False
    state = _fit(trainer)
    state.reads[tag] = state.reads.get(tag, 0) + 1
    if state.reads[tag] < every:
        return False
    now = time.perf_counter()
    fraction = _SETTINGS["time_fraction"]
    expected = state.costs.get(tag, max(state.costs.values(), default=_FIRST_GUESS_S))
    if fraction is not None and state.spent + expected > fraction * (now - state.start):
        return False  # the next read tries again: the budget grows with the fit
    try:
        with paused_gc():  # see its docstring: a figure's garbage kept out of the older generations
            draw(trainer)
    except Exception as err:  # a live figure never stops the fit nor switches a check off
        from lightning_recipe._core.warn import warn_once

        warn_once(trainer, f"lightning_recipe could not redraw {tag!r} during training: {type(err).__name__}: {err}",
                  key=f"live: {tag}")
    finally:
        cost = time.perf_counter() - now
        state.spent += cost
        state.costs[tag] = cost
        state.reads[tag] = 0
        state.redraws[tag] = state.redraws.get(tag, 0) + 1
    return True


def spent(trainer: Any) -> dict[str, Any]:
    """This fit's live-figure bookkeeping: seconds spent, redraws per tag, last cost per tag (for benchmarks)."""
    state = _fit(trainer)
    return {"spent_s": state.spent, "elapsed_s": time.perf_counter() - state.start, "redraws": dict(state.redraws),
            "costs_s": dict(state.costs)}
