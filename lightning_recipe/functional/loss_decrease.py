"""Loss-curve math: the decrease, divergence, trend, above-prior and plateau tests on windows of logged losses."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from lightning_recipe._core.dtypes import wide


def _values(x: Union[Tensor, Sequence[float]]) -> list[float]:
    """Host values as Python floats: one ``tolist`` for a tensor (the statistics below run on the host)."""
    return wide(x).reshape(-1).tolist() if isinstance(x, Tensor) else [float(v) for v in x]


def _mean_sd(x: Union[Tensor, Sequence[float]]) -> tuple[float, float]:
    """Mean and standard error of the mean (unbiased variance)."""
    v = _values(x)
    n = len(v)
    if n == 0:
        return math.nan, 0.0
    m = math.fsum(v) / n
    if n == 1:
        return m, 0.0
    return m, math.sqrt(math.fsum((a - m) ** 2 for a in v) / (n - 1) / n)


def decrease_test(first: Tensor, last: Tensor, floor: Optional[float], min_rel: float = 0.05, z: float = 3.0) -> dict:
    """Did the loss decrease from the ``first`` window of steps to the ``last``?

    The relative decrease is ``(m0 - m1) / (m0 - floor)`` (``floor`` is the smallest value the loss can take, e.g. 0;
    without one, ``|m0|``). The loss counts as *not decreasing* when the relative decrease is below ``min_rel`` **and**
    the decrease is not significant (below ``z`` standard errors of the difference of the window means): a small but
    real decrease of a hard task passes; a flat, noisy curve fails.

    Example::

        >>> decrease_test(torch.full((10,), 2.3), torch.full((10,), 2.3), floor=0.0)["decreased"]
        False
        >>> decrease_test(torch.full((10,), 2.3), torch.full((10,), 1.0), floor=0.0)["decreased"]
        True
    """
    m0, s0 = _mean_sd(first)
    m1, s1 = _mean_sd(last)
    scale = abs(m0 - floor) if floor is not None else abs(m0)
    scale = max(scale, 1e-12)
    rel = (m0 - m1) / scale
    se = math.sqrt(s0**2 + s1**2)
    significant = (m0 - m1) > z * se and se > 0
    return {"first": m0, "last": m1, "relative_decrease": rel, "se": se, "decreased": rel >= min_rel or significant}


def diverged(reference: float, last: Tensor, floor: Optional[float], factor: float = 2.0) -> dict:
    """Is every loss of the ``last`` window above ``factor`` times the ``reference`` loss's distance to ``floor``?

    ``reference`` is the larger of the first loss and the loss of the constant prediction (a model worse than
    knowing nothing but the label prior, ``factor`` times over, has diverged). Taking the smallest loss of the
    window means one spike of a healthy run never counts.

    Example::

        >>> diverged(1.0, torch.full((5,), 50.0), floor=0.0)["diverged"]
        True
        >>> diverged(1.0, torch.tensor([50.0, 0.5, 50.0]), floor=0.0)["diverged"]
        False
    """
    low = float(wide(last).min())
    ref = floor if floor is not None else 0.0
    scale = max(abs(reference - ref), 1e-12)
    grown = (low - ref) / scale if floor is not None else abs(low) / scale
    return {"reference": reference, "last": low, "growth": grown, "diverged": grown > factor and low > reference}


def trend(values: Union[Tensor, Sequence[float]]) -> dict:
    """Least-squares slope of ``values`` over their index, its standard error and t-statistic.

    Example::

        >>> round(trend(torch.arange(10.0) * -0.5)["slope"], 6)
        -0.5
    """
    y = _values(values)
    n = len(y)
    if n < 3:
        return {"slope": 0.0, "se": float("inf"), "t": 0.0}
    ym = math.fsum(y) / n
    x = [i - (n - 1) / 2 for i in range(n)]
    sxx = math.fsum(a * a for a in x)
    slope = math.fsum(a * (b - ym) for a, b in zip(x, y)) / sxx
    se = math.sqrt(math.fsum((b - ym - slope * a) ** 2 for a, b in zip(x, y)) / (n - 2) / sxx)
    return {"slope": slope, "se": se, "t": slope / se if se > 0 else (0.0 if slope == 0 else math.copysign(math.inf, slope))}


def above_prior_test(windows: Sequence[Sequence[float]], prior_loss: float, floor: Optional[float], rtol: float = 0.05,
                     z: float = 3.0) -> dict:
    """Is the loss worse than the best constant prediction, and staying there?

    Above: the mean of every window in ``windows`` (consecutive stretches of steps) exceeds the prior loss by more than
    ``rtol`` of its distance to the floor and by more than ``z`` standard errors of that mean, and the losses of all
    windows together show no significant downward trend (``t < -z``) nor the last window a mean below the first's by
    more than ``z`` standard errors of their difference: a network that predicts worse than the label prior for every
    input, and is not recovering from a transient spike.

    Example::

        >>> above_prior_test([[1.2] * 10, [1.2] * 10], prior_loss=0.65, floor=0.0)["above"]
        True
        >>> above_prior_test([[0.66] * 10, [0.64] * 10], prior_loss=0.65, floor=0.0)["above"]
        False
    """
    scale = max(abs(prior_loss - floor) if floor is not None else abs(prior_loss), 1e-12)
    means, margins, ses = [], [], []
    for w in windows:
        m, s = _mean_sd(w)
        means.append(m)
        ses.append(s)
        margins.append(max(rtol * scale, z * s))
    slope = trend([v for w in windows for v in _values(w)])
    falling = means[0] - means[-1] > z * math.sqrt(ses[0] ** 2 + ses[-1] ** 2)
    above = all(m - prior_loss > b for m, b in zip(means, margins)) and slope["t"] >= -z and not falling
    return {"means": means, "margins": margins, "prior_loss": prior_loss, "trend": slope, "above": above,
            "recent": means[-1]}


def plateau_test(recent: Tensor, prior_loss: float, floor: Optional[float], rtol: float = 0.05, z: float = 3.0) -> dict:
    """Is the loss stuck at the loss of the best constant prediction (the label prior)?

    At the prior means: the recent mean is within ``rtol`` of the prior loss's distance to the floor, widened to ``z``
    standard errors of the mean when the losses are noisy, but never beyond ``3 * rtol`` (a thrashing loss far from
    the prior is not a plateau).

    Example::

        >>> plateau_test(torch.full((20,), 0.69), prior_loss=0.6931, floor=0.0)["plateau"]
        True
        >>> plateau_test(torch.full((20,), 0.20), prior_loss=0.6931, floor=0.0)["plateau"]
        False
    """
    m, s = _mean_sd(recent)
    scale = max(abs(prior_loss - floor) if floor is not None else abs(prior_loss), 1e-12)
    band = min(max(rtol * scale, z * s), 3 * rtol * scale)  # noise widens the band, up to 3x: noisy is not flat
    return {"recent": m, "prior_loss": prior_loss, "band": band, "plateau": abs(m - prior_loss) <= band}
