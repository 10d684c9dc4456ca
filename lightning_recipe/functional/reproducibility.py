"""Reproducibility math: the largest relative difference between two runs of one step."""

from __future__ import annotations

import math
from typing import Any


def step_difference(a: Any, b: Any) -> float:
    """Largest relative difference between two numbers or two equal-length sequences of numbers.

    ``|a - b| / max(|a|, |b|)`` (0 for two zeros, ``inf`` when only one is NaN).

    Example::

        >>> step_difference(2.0, 2.0), step_difference([1.0, 4.0], [1.0, 5.0])
        (0.0, 0.2)
    """
    xs = a if isinstance(a, (list, tuple)) else [a]
    ys = b if isinstance(b, (list, tuple)) else [b]
    out = 0.0
    for x, y in zip(xs, ys):
        x, y = float(x), float(y)
        if math.isnan(x) and math.isnan(y):
            continue
        if math.isnan(x) or math.isnan(y):
            return math.inf
        scale = max(abs(x), abs(y))
        if scale > 0:
            out = max(out, abs(x - y) / scale)
    return out
