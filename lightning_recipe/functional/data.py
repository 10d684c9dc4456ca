"""Data math: row hashes and the duplicate fraction, the off-scale rule, how targets line up with the inputs.

Pure functions of tensors (no Lightning): ``DataCheck`` and ``BatchIndependenceCheck`` apply them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_recipe._core.dtypes import wide

# "nearly all": the fraction of positions at which targets that are the inputs shifted by one match them (exactly 1.0
# for `x, y = s[:, :-1], s[:, 1:]`; a few positions may differ through padding or special tokens)
NEXT_TOKEN_FRACTION = 0.95
# normalisation layers that standardise each feature (channel) separately, and those that standardise each example
_PER_FEATURE_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_PER_EXAMPLE_NORMS = (nn.LayerNorm, nn.GroupNorm)


def row_hashes(rows: Tensor, seed: int = 0) -> Tensor:
    """Two independent 64-bit hashes of each row's raw values: ``(N, ...)`` → ``(N, 2)`` int64.

    Rows are equal exactly when their values are bitwise equal (``-0.0`` counts as ``0.0``); each hash is a linear
    form with random odd 64-bit coefficients over the mixed integer view of the values (wrap-around arithmetic), so
    two different rows collide with probability about ``2**-128``.

    Args:
        rows: a tensor whose first dimension indexes the rows.
        seed: seeds the coefficients (the same seed gives comparable hashes).

    Example::

        >>> h = row_hashes(torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]]))
        >>> bool((h[0] == h[2]).all()), bool((h[0] == h[1]).all())
        (True, False)
    """
    v = _int_view(rows)
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-(2**62), 2**62, (2, v.shape[1]), generator=g, dtype=torch.int64) * 2 + 1
    v = v * -7046029254386353131  # mix the bits before the linear form
    v = v ^ (v >> 31)
    return torch.stack([(v * w[0]).sum(1), (v * w[1]).sum(1)], dim=1)


def duplicate_fraction(hashes: Tensor, population: Optional[int] = None) -> tuple[float, int]:
    """Fraction of rows that are extra copies, from row hashes ``(k, 2)`` of ``k`` rows read out of ``population``.

    With every row read it is ``1 - unique / k``; from a sample of ``k`` out of ``n`` rows the ``P`` equal pairs in
    the sample estimate it as ``P (n - 1) / (k (k - 1))`` (exact for pairs, capped at 1). Returns the fraction and
    ``P``.

    Example::

        >>> h = row_hashes(torch.arange(10.0).repeat(2).reshape(-1, 1))
        >>> duplicate_fraction(h)
        (0.5, 10)
    """
    k = hashes.shape[0]
    if k < 2:
        return 0.0, 0
    _, counts = torch.unique(hashes, dim=0, return_counts=True)
    pairs = int((counts * (counts - 1) // 2).sum())
    n = population if population is not None else k
    if n <= k:
        return 1.0 - counts.numel() / k, pairs
    return min(1.0, pairs * (n - 1) / (k * (k - 1))), pairs


def off_scale(mean: Tensor, std: Tensor, max_abs: Tensor, factor: float = 10.0) -> Tensor:
    """Which features are far from a standardised scale: too large, ``|mean| > factor`` or ``std > factor`` (raw
    pixels 0-255, an income in dollars), or too small, ``0 < max |x| < 1 / factor**2`` (every value of the feature
    under 0.01 in magnitude: a feature in the wrong unit). The small side is judged by the feature's magnitude, not
    its spread: a nearly constant feature (a border pixel that is almost always 0, a rare one-hot column) has a tiny
    std but values of the usual size, and is on scale; so is any feature within [0, 1] or [-1, 1] that reaches 0.01.
    Constant features (``std == 0``) are not judged.

    Args:
        mean: per-feature mean.
        std: per-feature standard deviation.
        max_abs: per-feature largest ``|x|``.
        factor: how far from mean 0 / std 1 a feature may be.

    Example::

        >>> mean, std = torch.tensor([0.1, 120.0, 0.0, 0.0, 5e-5]), torch.tensor([1.2, 70.0, 0.0, 1e-3, 1.7e-3])
        >>> off_scale(mean, std, torch.tensor([4.0, 255.0, 0.0, 3e-3, 0.0625])).tolist()  # the last: a border pixel
        [False, True, False, True, False]
    """
    return (mean.abs() > factor) | (std > factor) | ((std > 0) & (max_abs < 1.0 / factor**2))


def token_alignment(inputs: Tensor, targets: Tensor, ignore_index: Optional[int] = None) -> Optional[dict[str, Any]]:
    """How class-index targets line up with integer inputs of the same shape (token ids, categories).

    ``equal``: the fraction of labelled positions whose target equals the input at the same position (1.0 when the
    targets are a copy of the inputs). ``shifted``: for ``(N, T)`` tensors with ``T > 1``, the fraction of labelled
    positions ``t < T - 1`` whose target equals the input at ``t + 1`` (1.0 for next-token prediction,
    ``x, y = s[:, :-1], s[:, 1:]``), else ``None``. Targets that are negative (``ignore_index=-100``) or equal to
    ``ignore_index`` are not labelled. ``None`` when the two cannot be compared: float, bool or ``uint8`` (image)
    inputs, float or bool targets, different shapes, or no labelled position. One host sync.

    Example::

        >>> s = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
        >>> token_alignment(s[:, :-1], s[:, 1:])
        {'equal': 0.0, 'shifted': 1.0, 'positions': 6}
        >>> token_alignment(s[:, :-1], s[:, :-1])["equal"]
        1.0
    """
    if (inputs.ndim == 0 or inputs.shape != targets.shape or inputs.is_floating_point() or inputs.is_complex()
            or inputs.dtype in (torch.bool, torch.uint8) or targets.is_floating_point() or targets.is_complex()
            or targets.dtype == torch.bool):
        return None
    valid = labelled_positions(targets, ignore_index)
    sums = [valid.sum(), (valid & (inputs == targets)).sum()]
    if inputs.ndim == 2 and inputs.shape[1] > 1:
        v = valid[:, :-1]
        sums += [v.sum(), (v & (targets[:, :-1] == inputs[:, 1:])).sum()]
    counts = torch.stack(sums).tolist()  # the one host sync
    if counts[0] == 0:
        return None
    shifted = counts[3] / counts[2] if len(counts) == 4 and counts[2] else None
    return {"equal": counts[1] / counts[0], "shifted": shifted, "positions": int(counts[0])}


def labelled_positions(targets: Tensor, ignore_index: Optional[int] = None) -> Tensor:
    """Where class-index targets carry a label: not negative (``-100``, PyTorch's default ``ignore_index``) and not
    ``ignore_index``.

    Example::

        >>> labelled_positions(torch.tensor([[3, -100, 0]]), ignore_index=0).tolist()
        [[True, False, False]]
    """
    keep = targets >= 0
    return keep & (targets != ignore_index) if ignore_index is not None else keep


def _int_view(rows: Tensor) -> Tensor:
    """Rows as ``(N, D)`` int64 holding the exact bits of the values."""
    x = rows.reshape(rows.shape[0], -1) if rows.ndim else rows.reshape(1, 1)
    if x.dtype == torch.bool:
        return x.long()
    if x.is_complex():
        x = torch.view_as_real(x).reshape(x.shape[0], -1)
    if x.is_floating_point():
        x = torch.where(x == 0, torch.zeros_like(x), x).contiguous()
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        return x.view(bits).long()
    return x.long()


def _is_image(x: Tensor, layout: str) -> bool:
    if layout == "image":
        return x.ndim >= 3
    if layout == "features":
        return False
    return x.ndim >= 3


def _feature_matrix(x: Tensor, layout: str) -> Tensor:
    """``(M, F)`` values per feature: features of 2-D inputs, channels of images, the last dim for sequences."""
    if x.ndim == 1:
        return x.reshape(-1, 1)
    if x.ndim == 2:
        return x
    if _is_image(x, layout):
        if x.ndim == 3:
            return x.reshape(-1, 1)
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _judged(x: Tensor, layout: str) -> bool:
    """Whether the scale of ``x`` is judged: real values, or ``uint8`` images; not token ids or booleans."""
    if x.dtype == torch.bool:
        return False
    if x.is_floating_point():
        return True
    return x.dtype == torch.uint8 and _is_image(x, layout)


def _class_weighting(loss: Optional[Callable], kind: str, counts: Any, label: int = 0) -> tuple[Optional[str], bool]:
    """How the loss weights the classes (``kind`` ``"classes"``) or the positives (``"labels"``), or ``None``; and
    whether that weight works against the imbalance (the rarest class, or the minority side of the most imbalanced
    label, weighted less than the most frequent one: the imbalance made worse).

    Example::

        >>> bce = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.03]))
        >>> _class_weighting(bce, "labels", (torch.tensor([30.0]), 1000))  # 30 positives of 1000, weighted down
        ('`pos_weight=` of BCEWithLogitsLoss', True)
    """
    attr = "weight" if kind == "classes" else "pos_weight"
    w = getattr(loss, attr, None)
    if not isinstance(w, Tensor) or w.numel() == 0:
        return None, False
    w = w.detach().float().cpu().reshape(-1)
    if bool((w == (w[0] if kind == "classes" else 1)).all()):  # uniform class weights, or pos_weight 1
        return None, False
    name = f"`{attr}=` of {type(loss).__name__}"
    if kind == "classes":
        if w.numel() != len(counts):
            return name, False
        c = torch.as_tensor(counts, dtype=torch.float64)
        against = bool(w[int(c.argmin())] < w[int(c.argmax())])
    else:
        pos, n = counts
        pw = float(w[label] if w.numel() > label else w[0])
        minority_positive = float(pos[label]) < n - float(pos[label])
        against = pw < 1 if minority_positive else pw > 1
    return name, against


def _stateful_leaf(m: nn.Module) -> bool:
    """A module without children that holds parameters or buffers of its own (not a reshape, an activation, ...), or
    a normalisation layer (``InstanceNorm1d`` without ``affine`` holds neither)."""
    own = next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None
    return (own or isinstance(m, _PER_FEATURE_NORMS + _PER_EXAMPLE_NORMS)) and next(m.children(), None) is None


def input_target_correlation(inputs: Any, targets: Any) -> Optional[float]:
    """Pearson correlation, element by element, of floating inputs and targets with as many values per example.

    1.0 for an autoencoder (targets are the inputs), high for a denoiser; ``None`` when the shapes do not pair up
    or either side is constant. An untrained network's output is a function of the input, so with such targets it
    already carries information about them.

    Example::

        >>> x = torch.arange(12.0).reshape(2, 6)
        >>> input_target_correlation(x, x.reshape(2, 1, 6))
        1.0
        >>> input_target_correlation(x, torch.zeros(2, 3)) is None
        True
    """
    if not (isinstance(inputs, Tensor) and isinstance(targets, Tensor)) or inputs.ndim == 0 or targets.ndim == 0:
        return None
    if not inputs.is_floating_point() or not targets.is_floating_point() or inputs.shape[0] != targets.shape[0]:
        return None
    if inputs.numel() != targets.numel() or inputs.numel() < 4:
        return None
    x, y = wide(inputs.detach()).reshape(-1), wide(targets.detach()).reshape(-1)
    ok = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[ok] - x[ok].mean(), y[ok] - y[ok].mean()
    den = float((x.pow(2).sum() * y.pow(2).sum()).sqrt())
    return round(float((x * y).sum()) / den, 6) if den > 0 else None
