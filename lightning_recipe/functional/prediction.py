"""Prediction math: the jitter index of predictions recorded over training, frozen and thrashing predictions."""

from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np


_FROZEN_RTOL = 1e-6  # ~8 float32 ulps: changes below this are rounding, not learning


_MIN_JITTER = 0.1  # of the prediction scale: smaller reversals are the ordinary minibatch noise of a hard task


def jitter_index(values: np.ndarray, scale: float = 1.0, steps: Optional[np.ndarray] = None) -> dict[str, Any]:
    """How much predictions move back and forth between snapshots, beyond their trend, relative to how far they move.

    With ``V`` the snapshots ``(S, M)`` (one column per recorded number), the trend of each column is its running
    median over three snapshots, and the jitter is what a snapshot deviates from it: ``r_s = V_s - median(V_{s-1},
    V_s, V_{s+1})``. A monotone column (however fast or slow, with a knee or not) has ``r = 0``; only reversals count.
    ``jitter = RMS(r)``, ``movement = RMS over columns of (max - min)``, and ``index = jitter / movement`` in
    ``[0, 1]`` (1: every snapshot reverses the previous one, ``a, -a, a, ...``).

    Thresholds, derived from the number of snapshots and the prediction scale:

    * ``noise_reference``: the index of pure noise (columns of i.i.d. Gaussians: no trend at all) with ``S``
      snapshots, computed with a fixed private generator (0.37 for 4 snapshots, 0.28 for 10, 0.23 for 20, 0.16 for
      200: a longer record has a larger range for the same noise);
    * ``thrash``: ``index > threshold = noise_reference / 2`` (the reversals are at least half as large, relative to
      the travel, as if there were no trend at all) and ``jitter > 10%`` of ``scale``; needs 4 snapshots or more;
    * ``frozen``: no column changed between any two snapshots by more than ``1e-6 * max(1, max |V|)`` (rounding),
      although the snapshots lie at different steps (when ``steps`` is given).

    Args:
        values: snapshots ``(S, ...)``, first axis over time.
        scale: the size of a prediction (1 for probabilities; the targets' standard deviation for regression).
        steps: the global step of each snapshot (frozen needs training steps between the first and the last).

    Returns:
        ``index``, ``jitter``, ``movement``, ``max_change``, ``noise_reference``, ``threshold``, ``frozen_tol``,
        ``snapshots``, ``frozen``, ``thrash`` (``index`` is NaN with fewer than 3 snapshots or non-finite values).

    Example::

        >>> up = np.linspace(0.1, 0.9, 10)[:, None]             # monotone: no jitter
        >>> jitter_index(up)["index"]
        0.0
        >>> zigzag = np.tile([[0.2], [0.8]], (5, 1))              # every snapshot reverses the last one
        >>> j = jitter_index(zigzag)
        >>> round(j["index"], 3), j["thrash"], round(j["threshold"], 3)
        (1.0, True, 0.139)
        >>> jitter_index(np.full((5, 3), 0.25), steps=np.arange(5) * 10)["frozen"]
        True
    """
    v = np.asarray(values, dtype=float)
    s = v.shape[0] if v.ndim else 0
    v = v.reshape(s, -1) if s else np.empty((0, 0))
    nan = float("nan")
    out: dict[str, Any] = {"index": nan, "jitter": nan, "movement": nan, "max_change": nan, "snapshots": int(s),
                           "noise_reference": nan, "threshold": nan, "frozen_tol": nan, "frozen": False,
                           "thrash": False}
    if s < 2 or v.shape[1] == 0 or not np.isfinite(v).all():
        return out
    tol = _FROZEN_RTOL * max(1.0, float(np.abs(v).max()))
    max_change = float(np.abs(np.diff(v, axis=0)).max())
    trained = steps is None or (len(steps) == s and float(np.max(steps)) > float(np.min(steps)))
    out.update(max_change=max_change, frozen_tol=tol, frozen=bool(max_change <= tol and trained))
    if s < 3:
        return out
    jitter, movement, index = _jitter_parts(v)
    ref = _noise_reference(s)
    out.update(index=index, jitter=jitter, movement=movement, noise_reference=ref, threshold=ref / 2)
    out["thrash"] = bool(s >= 4 and index > ref / 2 and jitter > _MIN_JITTER * scale and not out["frozen"])
    return out


def _jitter_parts(v: np.ndarray) -> tuple[float, float, float]:
    med = np.median(np.stack([v[:-2], v[1:-1], v[2:]]), axis=0)
    jitter = float(np.sqrt(np.mean((v[1:-1] - med) ** 2)))
    movement = float(np.sqrt(np.mean((v.max(0) - v.min(0)) ** 2)))
    return jitter, movement, (jitter / movement if movement > 0 else 0.0)


@functools.lru_cache(maxsize=64)
def _noise_reference(snapshots: int) -> float:
    """The jitter index of trendless Gaussian noise with ``snapshots`` rows (fixed private generator)."""
    columns = max(32, min(512, 400_000 // snapshots))
    noise = np.random.default_rng(0).standard_normal((snapshots, columns))
    return _jitter_parts(noise)[2]
