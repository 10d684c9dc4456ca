"""Data math: row hashes and the duplicate fraction, the off-scale rule, how targets line up with the inputs.

Pure functions of tensors (no Lightning): ``DataCheck`` and ``BatchIndependenceCheck`` apply them.
"""

from __future__ import annotations

import math
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
# the layers with a weight matrix: those whose input scale matters, and the embeddings, which take ids
_INPUT_WEIGHT_LAYERS = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.RNNBase)
_WEIGHT_LAYERS = _INPUT_WEIGHT_LAYERS + (nn.Embedding, nn.EmbeddingBag)


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


# -- validation vs training distribution (the ``shift`` rule of DataCheck) ------------------------------------------
# a shift is "large" beyond one training standard deviation of the mean, or a factor 2 in the spread; "moderate" (a
# note, as a temporal split can have) beyond 0.2 standard deviations or a factor 1.25; a label distribution is far
# when a quarter of the probability mass moved (total variation distance)
LARGE_SMD, LARGE_RATIO = 1.0, 2.0
MODERATE_SMD, MODERATE_RATIO = 0.2, 1.25
LARGE_TV = 0.25
# a validation set standardised with its own statistics: every mean within this fraction of a sampling error of 0, and
# every std as close to 1
EXACT_FRACTION = 0.01


def familywise_z(tests: int, z: float = 3.0) -> float:
    """The normal quantile that keeps the chance of any of ``tests`` two-sided tests exceeding it at the chance of one
    test exceeding ``z`` (Bonferroni): ``Φ⁻¹(1 - (1 - Φ(z)) / tests)``; ``z`` for one test.

    Example::

        >>> familywise_z(1), round(familywise_z(64), 1)
        (3.0, 4.1)
    """
    if tests <= 1:
        return float(z)
    tail = 0.5 * math.erfc(z / math.sqrt(2)) / tests
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1.0 - tail, dtype=torch.float64)))


_MIN_CARRIERS = 10.0  # values carrying a feature's spread, per sample, for its sampling errors to be normal


def scale_shift(mean_t: Tensor, std_t: Tensor, kurt_t: Tensor, n_t: float, mean_v: Tensor, std_v: Tensor,
                kurt_v: Tensor, n_v: float, z: float = 3.0) -> dict[str, Tensor]:
    """Per feature, how the validation inputs sit relative to the training inputs, against sampling error.

    ``smd = (mean_v - mean_t) / std_t`` (standardized mean difference) and ``ratio = std_v / std_t``. For two
    independent samples of ``n_t`` and ``n_v`` examples from one distribution, ``smd`` has the sampling error
    ``sqrt(1 / n_t + max(1, ratio²) / n_v)`` and ``ratio² - 1`` (the variance ratio) ``sqrt((κ - 1) (1 / n_t +
    1 / n_v))``, ``κ`` the larger kurtosis ``m4 / σ⁴`` of the two (3 for a normal, about ``1 / p`` for a sparse
    feature nonzero in a fraction ``p`` of the examples, whose spread is noisy: a validation set in which it happens to
    be all zero, ``ratio`` 0, is ``sqrt(n_v p)`` errors away, the square root of the nonzero values expected).
    ``se_log_ratio`` is half the latter (the error of ``log ratio`` for small shifts). ``significant``: beyond
    ``familywise_z(D, z)`` sampling errors for one of the two (``D`` features tested: a healthy split exceeds it on
    any feature with the chance of one ``z``-sigma event). ``large``: significant and ``|smd| > 1`` or a ratio beyond
    2 either way; ``moderate``: significant and ``|smd| > 0.2`` or a ratio beyond 1.25. Features constant in training
    (``std_t`` 0) are not judged (``judged`` False). The ratio counts only where a few values do not decide the
    spread: its error is a normal approximation, which holds when each sample holds some ten of the values that carry
    the feature (``min(n_t, n_v) / κ >= 10``, ``n p`` nonzero values for a sparse feature); a pixel nonzero in 2 of
    1347 training digits and 6 of 450 validation ones has a ratio of 3 by chance alone. A large or moderate shift
    is one that is significant by the same statistic (the mean, or the ratio) that is large or moderate.

    Example::

        >>> ones = torch.ones(3)
        >>> r = scale_shift(torch.zeros(3), ones, 3 * ones, 1000, torch.tensor([0.01, 0.0, 5.0]),
        ...                 torch.tensor([1.0, 16.0, 1.0]), 3 * ones, 300)
        >>> r["large"].tolist(), r["ratio"].tolist()
        ([False, True, True], [1.0, 16.0, 1.0])
    """
    judged = (std_t > 1e-12 * mean_t.abs().clamp_min(1)) & torch.isfinite(mean_v) & torch.isfinite(std_v)
    sd = torch.where(judged, std_t, torch.ones_like(std_t))
    smd = (mean_v - mean_t) / sd
    ratio = std_v / sd
    log_ratio = torch.log(ratio.clamp_min(1e-300))
    se_smd = (1 / n_t + ratio.clamp_min(1) ** 2 / n_v).sqrt()
    kappa = torch.maximum(kurt_t, kurt_v)
    se_var = ((kappa - 1).clamp_min(0) * (1 / n_t + 1 / n_v)).sqrt()
    spread = min(n_t, n_v) / kappa.clamp_min(1.0) >= _MIN_CARRIERS  # the spread's error is near normal
    zd = familywise_z(int(judged.sum()), z)
    by_mean = smd.abs() > zd * se_smd
    by_spread = spread & ((ratio**2 - 1).abs() > zd * se_var)
    significant = judged & (by_mean | by_spread)
    large = judged & ((by_mean & (smd.abs() > LARGE_SMD)) | (by_spread & (log_ratio.abs() > math.log(LARGE_RATIO))))
    moderate = judged & ((by_mean & (smd.abs() > MODERATE_SMD)) |
                         (by_spread & (log_ratio.abs() > math.log(MODERATE_RATIO))))
    return {"smd": smd, "ratio": ratio, "se_smd": se_smd, "se_log_ratio": se_var / 2, "z": torch.tensor(zd),
            "judged": judged, "significant": significant, "large": large, "moderate": moderate}


def standardized_on_itself(mean: Tensor, std: Tensor, rows: int, tol: float = EXACT_FRACTION) -> bool:
    """Whether features were standardized with the statistics of these very rows: every non-constant feature's mean
    within ``tol / sqrt(rows)`` of 0 and its (population) std within as much of 1 or of ``sqrt((rows - 1) / rows)``
    (a standardization with the sample std), on at least 2 features. Rows standardized with the statistics of
    *other* rows (the training set's) keep means and stds that differ from 0 and 1 by about ``1 / sqrt(rows)``, their
    sampling error: each lands within ``tol`` (0.01) of a sampling error with a chance of about 1% (``2 tol /
    sqrt(2 pi)``), so a healthy split passes for both statistics on every one of two features with a chance below
    1e-8. The tolerance stays far above float32 rounding (a standardization in float32 leaves means of ~1e-5).

    Example::

        >>> x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> standardized_on_itself(x.mean(0), x.std(0, unbiased=False), 200)
        False
        >>> z = (x - x.mean(0)) / x.std(0)
        >>> standardized_on_itself(z.mean(0), z.std(0, unbiased=False), 200)
        True
    """
    keep = std > 0
    if int(keep.sum()) < 2 or rows < 3:
        return False
    m, s = mean[keep], std[keep]
    limit = tol / math.sqrt(rows)
    sample = math.sqrt((rows - 1) / rows)
    return bool((m.abs() <= limit).all()) and bool(((s - 1).abs() <= limit).all()
                                                   or ((s - sample).abs() <= limit).all())


def label_shift(counts_t: Tensor, counts_v: Tensor, n_t: Optional[float] = None, n_v: Optional[float] = None,
                z: float = 3.0) -> dict[str, Any]:
    """Total variation distance between the training and validation label distributions, and the largest distance
    that sampling explains.

    ``tv = ½ Σ |p_v - p_t|``. Under one distribution ``X² = Σ_k (p_v,k - p_t,k)² / (p_k (1/n_t + 1/n_v))`` (``p_k``
    pooled) is about chi-square with ``K - 1`` degrees of freedom (``K`` classes seen); by Cauchy-Schwarz
    ``tv ≤ ½ sqrt(X² (1/n_t + 1/n_v))``, so ``bound = ½ sqrt((K - 1 + z sqrt(2 (K - 1))) (1/n_t + 1/n_v))`` (X² at
    its mean plus ``z`` standard deviations) is exceeded only when X² is. ``n_t``, ``n_v``: the independent
    examples behind the counts (default: the counts' sums; fewer when the labels are per position, which widens the
    bound). ``missing``: classes absent from validation although ``n_v p_t,k ≥ 7`` of them were expected (each absent
    by chance with probability ``e⁻⁷ ≈ 0.001``).

    Example::

        >>> r = label_shift(torch.tensor([50.0, 50.0]), torch.tensor([100.0, 0.0]))
        >>> r["tv"], round(r["bound"], 3), r["missing"]
        (0.5, 0.162, [1])
    """
    k = max(counts_t.numel(), counts_v.numel())
    ct = torch.zeros(k, dtype=torch.float64)
    cv = torch.zeros(k, dtype=torch.float64)
    ct[: counts_t.numel()] = counts_t.double().reshape(-1)
    cv[: counts_v.numel()] = counts_v.double().reshape(-1)
    st, sv = float(ct.sum()), float(cv.sum())
    n_t, n_v = n_t or st, n_v or sv
    pt, pv = ct / max(st, 1.0), cv / max(sv, 1.0)
    tv = 0.5 * float((pv - pt).abs().sum())
    seen = int(((ct + cv) > 0).sum())
    dof = max(seen - 1, 1)
    bound = 0.5 * math.sqrt((dof + z * math.sqrt(2 * dof)) * (1 / max(n_t, 1.0) + 1 / max(n_v, 1.0)))
    missing = torch.nonzero((cv == 0) & (pt * n_v >= 7)).reshape(-1).tolist()
    return {"tv": tv, "bound": bound, "classes": seen, "missing": missing, "p_train": pt.tolist()[:100],
            "p_val": pv.tolist()[:100]}
