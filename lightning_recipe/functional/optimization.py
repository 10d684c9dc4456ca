"""Optimization math: per-tensor and weight norms, decoupled weight decay, the learning rate's early fall."""

from __future__ import annotations

import math  # noqa: F401 (the doctests use it)
from typing import Any

import torch
from torch import Tensor, nn


def _norms(tensors: list[Tensor], ord: float) -> Tensor:
    """Per-tensor norms, stacked on the device (one fused kernel where available)."""
    foreach = getattr(torch, "_foreach_norm", None)
    if foreach is not None:
        try:
            return torch.stack(foreach(tensors, ord))
        except (RuntimeError, TypeError):
            pass
    return torch.stack([torch.linalg.vector_norm(t, ord) for t in tensors])


def _decoupled(optimizer: Any, group: dict) -> bool:
    """Whether weight decay is decoupled from the gradient (AdamW), i.e. a plain factor ``1 - lr * wd`` per step."""
    return type(optimizer).__name__ == "AdamW" or bool(group.get("decoupled_weight_decay", False))


def _weight_norm(module: nn.Module) -> Tensor:
    params = [p.detach() for p in module.parameters() if p.requires_grad]
    if not params:
        return torch.zeros(())
    return _norms(params, 2.0).float().norm()


def _batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.ndim else 1
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return next((_batch_size(v) for v in x if isinstance(v, Tensor)), 0)
    return 0


def lr_ratio_before(lrs: list[float], planned_steps: float, fraction: float = 0.25, initial: float = 0.0) -> float:
    """Smallest ratio of the learning rate to its running peak during the first ``fraction`` of ``planned_steps``.

    Args:
        lrs: the learning rate after each optimizer step (``lrs[k]`` after step ``k + 1``).
        planned_steps: the number of steps training will run.
        fraction: the part of training inspected.
        initial: the learning rate before the first step (counts towards the peak).

    Example::

        >>> f"{lr_ratio_before([0.1 * 0.5 ** (k + 1) for k in range(100)], 100):.3g}"  # StepLR(1, 0.5) per batch
        '5.96e-08'
        >>> cosine = [0.1 * (1 + math.cos(math.pi * (k + 1) / 100)) / 2 for k in range(100)]
        >>> round(lr_ratio_before(cosine, 100, initial=0.1), 4)  # cos(pi / 4) schedule at a quarter: fine
        0.8536
    """
    peak, low = initial, 1.0
    for k, lr in enumerate(lrs):
        if k + 1 > fraction * planned_steps:
            break
        peak = max(peak, lr)
        if peak > 0:
            low = min(low, lr / peak)
    return low
