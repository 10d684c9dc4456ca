"""Batch-independence math: which other examples (or future positions) an output's gradient reaches."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_recipe._core.dtypes import wide


def batch_leaks(dependence: Tensor, i: int, rtol: float = 1e-5) -> dict[str, Any]:
    """Which examples ``j != i`` the output of example ``i`` depends on.

    Args:
        dependence: ``(N,)`` size of the gradient of output ``i`` on each example (e.g. ``sum |grad_j|``).
        i: the example whose output was differentiated.
        rtol: a dependence counts when it exceeds ``rtol`` times the largest one.

    Returns:
        ``leaking`` (indices), ``ratio`` (largest dependence outside ``i`` over the largest overall) and ``own``
        (the dependence on ``i`` itself).

    Example::

        >>> batch_leaks(torch.tensor([0.0, 2.0, 0.0]), 1)["leaking"]
        []
        >>> r = batch_leaks(torch.tensor([0.5, 2.0, 0.0]), 1)
        >>> r["leaking"], r["ratio"]
        ([0], 0.25)
    """
    d = wide(dependence).reshape(-1)
    top = float(d.max()) if d.numel() else 0.0
    others = d.clone()
    others[i] = 0.0
    ratio = float(others.max()) / top if top > 0 else 0.0
    leaking = [int(j) for j in torch.nonzero(others > rtol * top).reshape(-1)] if top > 0 else []
    return {"leaking": leaking, "ratio": ratio, "own": float(d[i])}


def future_leaks(dependence: Tensor, t: int, rtol: float = 1e-5) -> dict[str, Any]:
    """Which positions after ``t`` the output at position ``t`` depends on.

    Args:
        dependence: ``(T,)`` size of the gradient of output ``t`` on each input position.
        t: the position whose output was differentiated.
        rtol: a dependence counts when it exceeds ``rtol`` times the largest one.

    Example::

        >>> future_leaks(torch.tensor([1.0, 1.0, 0.0, 0.0]), 1)["leaking"]
        []
        >>> future_leaks(torch.tensor([1.0, 1.0, 0.5, 0.0]), 1)["leaking"]
        [2]
    """
    d = wide(dependence).reshape(-1)
    top = float(d.max()) if d.numel() else 0.0
    later = d[t + 1 :]
    if top == 0 or later.numel() == 0:
        return {"leaking": [], "ratio": 0.0}
    leaking = [t + 1 + int(j) for j in torch.nonzero(later > rtol * top).reshape(-1)]
    return {"leaking": leaking, "ratio": float(later.max()) / top}
