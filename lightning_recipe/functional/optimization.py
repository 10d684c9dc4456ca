"""Optimization math: per-tensor and weight norms, decoupled weight decay, the learning rate's early fall."""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np
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


# -- the per-tensor update ratio ||dw|| / ||w|| of one optimizer step, estimated from a fixed sample ------------------


def sample_plan(numel: int, k: int, last_dim: int = 1, seed: int = 0) -> tuple[int, int, int]:
    """A fixed systematic sample of at most ``k`` of a tensor's ``numel`` entries: ``(offset, stride, count)``.

    The entries ``offset, offset + stride, ...`` of the flattened tensor (in memory order), a view: no index tensor
    is stored. ``stride = ceil(numel / k)``, raised to the next value coprime with ``last_dim`` (the row length of a
    weight matrix) so that the sample walks through every column instead of repeating one; ``offset`` is drawn
    once from ``seed`` (a private generator: the global random state is not touched). A tensor of at most ``k``
    entries is taken whole (``stride`` 1, the estimate is then exact).

    Example::

        >>> sample_plan(100, 256)
        (0, 1, 100)
        >>> off, stride, count = sample_plan(64 * 30, 256, last_dim=30)
        >>> stride, math.gcd(stride, 30), count == len(range(off, 64 * 30, stride)) <= 256
        (11, 1, True)
    """
    if numel <= k:
        return 0, 1, numel
    stride = -(-numel // k)
    while math.gcd(stride, max(last_dim, 1)) != 1:
        stride += 1
    offset = int(torch.randint(stride, (1,), generator=torch.Generator().manual_seed(seed)))
    return offset, stride, len(range(offset, numel, stride))


def _flat(t: Tensor) -> Tensor:
    """The entries of ``t`` in memory order, as a view (a channels-last or transposed tensor is not copied)."""
    if t.is_contiguous():
        return t.reshape(-1)
    order = sorted(range(t.ndim), key=lambda d: -t.stride(d))
    p = t.permute(order)
    return p.reshape(-1) if p.is_contiguous() else p.contiguous().reshape(-1)


def take_sample(tensors: list[Tensor], plans: list[tuple[int, int, int]]) -> Tensor:
    """The sampled entries of every tensor, concatenated into one float32 vector on their device.

    Example::

        >>> w = torch.arange(10.0).reshape(2, 5)
        >>> take_sample([w, torch.ones(3)], [(1, 3, 3), (0, 1, 3)])
        tensor([1., 4., 7., 1., 1., 1.])
    """
    return torch.cat(sample_views(tensors, plans)).float()  # one copy kernel (cat promotes mixed dtypes), one cast


def sample_views(tensors: list[Tensor], plans: list[tuple[int, int, int]]) -> list[Tensor]:
    """The sampled entries of every tensor (plans from :func:`sample_plan`), as views of the tensors where their
    strides allow (a tensor whose entries no flat view walks is copied: its sample no longer follows the tensor).

    Example::

        >>> w = torch.arange(10.0).reshape(2, 5)
        >>> v = sample_views([w], [(1, 3, 3)])[0]
        >>> w.add_(1.0) is w, v  # a view: the sample follows the tensor
        (True, tensor([2., 5., 8.]))
    """
    return [_flat(t.detach())[off::stride][:count] for t, (off, stride, count) in zip(tensors, plans)]


def update_ratios(before: Tensor, after: Tensor, counts: list[int]) -> Tensor:
    """Per tensor, ``||after - before|| / ||before||`` over its sampled entries (``counts`` of them, in order).

    A tensor whose sampled weights are all zero (zero-initialised, e.g. a bias before its first step) has no
    ratio: NaN. When no sampled entry of any tensor moved, the optimizer step did not happen (a GradScaler step
    skipped on an inf/NaN gradient, a closure that returned ``None``): every ratio is NaN, not 0. Stays on the device.

    **Estimator and its error.** With ``S`` the sampled entries of a tensor of ``n``, the estimate is
    ``sqrt(sum_S dw^2 / sum_S w^2)``: both sums estimate ``k / n`` times the full sums, so the scale cancels. For
    ``k = n`` it is exact. Otherwise each sum of ``k`` squares has a relative standard deviation of about
    ``cv / sqrt(k)`` (``cv`` the coefficient of variation of the squared entries: ``sqrt(2)`` for Gaussian entries),
    and the square root halves it: the ratio's relative error is about ``sqrt(cv_w^2 + cv_dw^2) / (2 sqrt(k))``,
    i.e. ``1 / sqrt(k)`` for Gaussian weights and updates (6 % for ``k = 256``; see :func:`ratio_error`), times the
    finite-population factor ``sqrt(1 - k / n)``. Heavy-tailed updates (a few rows of an embedding) have a larger
    ``cv_dw``: their estimate can be far off, and 0 when no updated entry is in the sample.

    Example::

        >>> b = torch.tensor([3.0, 4.0, 0.0, 0.0])
        >>> update_ratios(b, b + torch.tensor([0.03, 0.04, 0.5, 0.0]), [2, 2])
        tensor([0.0100,    nan])
        >>> update_ratios(b, b.clone(), [2, 2])  # a skipped step
        tensor([nan, nan])
    """
    return ratios_from_sums(square_sums(before, after, segments(counts, before.device), len(counts)))


def ratios_from_sums(sums: Tensor) -> Tensor:
    """``(..., n)`` update ratios from the ``(..., 2, n)`` sums of squares of :func:`square_sums` (leading dimensions
    are measurements): ``sqrt(sum dw^2 / sum w^2)``; NaN for a tensor whose sampled weights are all zero, and for
    every tensor of a measurement in which nothing moved (see :func:`update_ratios`).

    Example::

        >>> ratios_from_sums(torch.tensor([[[1e-4, 0.0], [1.0, 0.0]], [[0.0, 0.0], [1.0, 4.0]]]))
        tensor([[0.0100,    nan],
                [   nan,    nan]])
    """
    dn, wn = sums.sqrt().unbind(-2)
    nan = torch.full_like(dn, math.nan)
    ratio = torch.where(wn > 0, dn / wn, nan)
    return torch.where(dn.sum(-1, keepdim=True) > 0, ratio, nan)


def segments(counts: list[int], device: Any = None) -> Tensor:
    """The tensor index of every sampled entry (``counts[i]`` times ``i``), for :func:`square_sums`.

    Example::

        >>> segments([2, 1, 3])
        tensor([0, 0, 1, 2, 2, 2])
    """
    return torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))


def square_sums(before: Tensor, after: Tensor, segment: Tensor, n: int) -> Tensor:
    """``(..., 2, n)``: per tensor, the sum of the squared updates ``(after - before)^2`` and of the squared weights
    ``before^2`` over its sampled entries (``segment``: the tensor of each entry, from :func:`segments`; leading
    dimensions are measurements). A few kernels on the device whatever the number of tensors and measurements; the
    ratio is ``sqrt`` of their quotient.

    Example::

        >>> b = torch.tensor([3.0, 4.0, 1.0])
        >>> square_sums(b, b + torch.tensor([0.0, 0.1, 0.0]), segments([2, 1]), 2)
        tensor([[1.0000e-02, 0.0000e+00],
                [2.5000e+01, 1.0000e+00]])
    """
    return before.new_zeros(*before.shape[:-1], 2, n).index_add_(
        before.ndim, segment, torch.stack([after - before, before], -2).square())


def ratio_error(k: int, numel: int, cv2_w: float = 2.0, cv2_dw: float = 2.0) -> float:
    """Relative standard deviation of the sampled update ratio (see :func:`update_ratios`) for ``k`` of ``numel``
    entries: ``sqrt((cv2_w + cv2_dw) (1 - k / numel)) / (2 sqrt(k))``, with ``cv2_w`` and ``cv2_dw`` the squared
    coefficients of variation of the squared weights and of the squared updates (``var(x^2) / mean(x^2)^2``: 2 for
    Gaussian entries, which gives ``1 / sqrt(k)``).

    Example::

        >>> round(ratio_error(256, 10**6), 4), ratio_error(300, 300)
        (0.0625, 0.0)
    """
    if k >= numel:
        return 0.0
    return math.sqrt((cv2_w + cv2_dw) * (1 - k / numel)) / (2 * math.sqrt(k))


def log_spread(per_tensor: list[list[float]]) -> tuple[list[float], float]:
    """Per tensor, the median of ``log10`` of its positive finite ratios (NaN when it has none), and the median of
    those medians over the tensors: the reference "the others" are compared with.

    Example::

        >>> meds, ref = log_spread([[1e-3, 2e-3, 1e-3], [1e-2], [1e-7, 0.0], [math.nan]])
        >>> [round(m, 3) for m in meds[:3]], round(ref, 3)
        ([-3.0, -2.0, -7.0], -3.0)
    """
    meds = []
    for r in per_tensor:
        v = np.asarray(r, dtype=float)
        v = v[np.isfinite(v) & (v > 0)]
        meds.append(float(np.median(np.log10(v))) if v.size else math.nan)
    live = [m for m in meds if math.isfinite(m)]
    return meds, (float(np.median(live)) if live else math.nan)


def window_medians(rows: list[list[float]]) -> list[float]:
    """Per tensor (column), the median of its positive finite ratios over the rows (measurements); tensors with
    none are left out.

    Example::

        >>> window_medians([[1e-3, math.nan, 0.0], [3e-3, 1e-2, 0.0], [2e-3, math.nan, 0.0]])
        [0.002, 0.01]
    """
    # plain Python: a window holds a few measurements of a few dozen tensors, where numpy's per-call cost dominates
    out = []
    for col in zip(*rows):
        v = [x for x in col if 0 < x < math.inf]  # NaN compares False
        if v:
            out.append(float(statistics.median(v)))
    return out


def split_by_gap(values: list[float]) -> tuple[float, list[int], list[int]]:
    """The largest gap between neighbouring values (e.g. ``log10`` update ratios, one per tensor) once sorted, and
    the indices of the values below and above it (NaN values are left out of both).

    Two clusters of tensors an order of magnitude or more apart (a parameter group whose learning rate is far from
    the others') show as one gap that dwarfs the spread within each cluster, whichever cluster is the larger.

    Example::

        >>> split_by_gap([-2.1, -6.0, -2.5, math.nan, -5.7, -1.9])
        (3.2, [1, 4], [2, 0, 5])
        >>> split_by_gap([-3.0])
        (0.0, [], [0])
    """
    live = sorted((v, i) for i, v in enumerate(values) if math.isfinite(v))
    if len(live) < 2:
        return 0.0, [], [i for _, i in live]
    gaps = [b[0] - a[0] for a, b in zip(live, live[1:])]
    k = max(range(len(gaps)), key=gaps.__getitem__)
    return round(gaps[k], 12), [i for _, i in live[: k + 1]], [i for _, i in live[k + 1:]]


def weighted_median(values: list[float], weights: list[float]) -> float:
    """The median of ``values`` with each counted ``weights`` times (the lower one at an exact half): e.g. the
    ``log10`` update ratio of the typical *entry* of a set of tensors, where a weight matrix outweighs its bias.

    Example::

        >>> weighted_median([-6.2, -1.4], [2304, 48])  # a weight matrix that barely moves, its zero-initialised bias
        -6.2
        >>> weighted_median([1.0, 2.0, 3.0], [1, 1, 1])
        2.0
    """
    if not values:
        return math.nan
    order = sorted(range(len(values)), key=values.__getitem__)
    half, acc = sum(weights) / 2, 0.0
    for i in order:
        acc += weights[i]
        if acc >= half:
            return float(values[i])
    return float(values[order[-1]])
