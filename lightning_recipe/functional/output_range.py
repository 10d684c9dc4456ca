"""Output-range math: the interval a bounded activation allows, targets out of the model's reach, probability rows,
squashed outputs, class-like targets."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_recipe._core.dtypes import wide

_FUNCTIONAL: tuple[tuple[str, Any, tuple[float, float]], ...] = (
    ("sigmoid", torch.sigmoid, (0.0, 1.0)),
    ("tanh", torch.tanh, (-1.0, 1.0)),
    ("relu", torch.relu, (0.0, math.inf)),
    ("softplus", torch.nn.functional.softplus, (0.0, math.inf)),
    ("softmax", lambda z: torch.softmax(z, -1), (0.0, 1.0)),
)


def activation_range(module: nn.Module) -> Optional[tuple[float, float]]:
    """The closed interval an activation module's output lies in, or ``None`` for a module that is not a bounded one.

    Example::

        >>> activation_range(nn.Tanh()), activation_range(nn.ELU(alpha=0.5)), activation_range(nn.Linear(2, 2))
        ((-1.0, 1.0), (-0.5, inf), None)
    """
    inf = math.inf
    if isinstance(module, (nn.ReLU, nn.Softplus)):
        return (0.0, inf)
    if isinstance(module, nn.ReLU6):
        return (0.0, 6.0)
    if isinstance(module, nn.Hardtanh):  # also ReLU6 (handled above, same bounds)
        return (float(module.min_val), float(module.max_val))
    if isinstance(module, (nn.ELU, nn.CELU)):
        return (-float(module.alpha), inf)
    if isinstance(module, nn.SELU):
        return (-1.0507009873554805 * 1.6732632423543772, inf)
    if isinstance(module, nn.GELU):
        return (-0.17, inf)  # min of x * Phi(x) is -0.16997 (tanh approximation: about the same)
    if isinstance(module, nn.SiLU):
        return (-0.2785, inf)  # min of x * sigmoid(x) is -0.27846
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softmax2d)):
        return (0.0, 1.0)
    if isinstance(module, (nn.Tanh, nn.Softsign)):
        return (-1.0, 1.0)
    if isinstance(module, nn.LogSigmoid):
        return (-inf, 0.0)
    return None


def affine_fit(out: Tensor, z: Tensor, tol: float = 1e-4) -> Optional[tuple[Tensor, Tensor]]:
    """Per column ``(a, b)`` with ``out = a * z + b`` to within ``tol`` of each column's spread, else ``None``.

    ``out`` and ``z`` are ``(M, D)``; every column of both must vary (a constant column says nothing).

    Example::

        >>> z = torch.linspace(-1, 1, 5).reshape(5, 1).double()
        >>> a, b = affine_fit(3 * z + 2, z)
        >>> float(a), float(b)
        (3.0, 2.0)
        >>> affine_fit(z ** 3, z) is None
        True
    """
    if out.shape != z.shape or out.ndim != 2 or out.shape[0] < 3:
        return None
    o, x = wide(out), wide(z)
    xc, oc = x - x.mean(0), o - o.mean(0)
    sxx = xc.pow(2).sum(0)
    spread = o.max(0).values - o.min(0).values
    if not bool((sxx > 0).all()) or not bool((spread > 0).all()):
        return None
    a = (xc * oc).sum(0) / sxx
    b = o.mean(0) - a * x.mean(0)
    resid = (o - (a * x + b)).abs().max(0).values
    if not bool((resid <= tol * spread).all()) or not bool((a != 0).all()):
        return None
    return a, b


def output_interval(out: Tensor, leaves: list[tuple[nn.Module, Tensor]],
                    tol: float = 1e-4) -> Optional[tuple[Tensor, Tensor, str, nn.Module]]:
    """The interval ``[lo, hi]`` (per output column) the model's output can take, from its last transform.

    Args:
        out: the model's output ``(M, D)``.
        leaves: ``(module, output)`` of the leaf modules whose output has the model output's size, in execution
            order, each reshaped to ``(M, D)``.
        tol: tolerance of the affine fits, relative to each output column's spread.

    Returns:
        ``(lo, hi, description, module)`` (``lo``/``hi`` of shape ``(D,)``, infinite for an unbounded side; the
        description has ``{m}`` where the module is named), or ``None`` when the output is not one of the transforms
        recognised (see :class:`OutputRangeCheck`).

    Example::

        >>> h = torch.randn(16, 1, generator=torch.Generator().manual_seed(0)).double()
        >>> lo, hi, what, _ = output_interval(127.5 * (1 + torch.tanh(h)), [(nn.Linear(4, 1), h)])
        >>> float(lo), float(hi), what
        (0.0, 255.0, 'an elementwise affine of tanh of {m}')
        >>> output_interval(h, [(nn.Linear(4, 1), h)])[1]
        tensor([inf], dtype=torch.float64)
    """
    d = out.shape[-1]
    inf = torch.full((d,), math.inf, dtype=torch.float64)

    def mapped(rng: tuple[float, float], ab: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        lo = torch.full((d,), rng[0], dtype=torch.float64)
        hi = torch.full((d,), rng[1], dtype=torch.float64)
        if ab is None:
            return lo, hi
        a, b = ab  # a != 0: an infinite bound stays infinite, its sign flipped with a's
        x, y = a * lo + b, a * hi + b
        return torch.minimum(x, y), torch.maximum(x, y)

    flat = out.reshape(-1)
    same = [(m, o) for m, o in leaves if o.shape == out.shape and torch.equal(o.reshape(-1), flat)]
    if same:  # the output is a leaf's own output: bounded when any of those leaves is a bounded activation
        for m, _ in reversed(same):
            rng = activation_range(m)
            if rng is not None:
                lo, hi = mapped(rng, None)
                return lo, hi, "the output of {m}", m
        return -inf, inf, "the output of {m}", same[-1][0]
    sized = [(m, o) for m, o in leaves if o.shape == out.shape]
    if not sized:
        return None
    m, pre = sized[-1]
    rng = activation_range(m)
    ab = affine_fit(out, pre, tol)
    if rng is not None and ab is not None:
        lo, hi = mapped(rng, ab)
        return lo, hi, "an elementwise affine of the output of {m}", m
    if ab is not None:  # an affine of an unbounded layer (or of a near-linear stretch of an activation: cannot tell)
        return -inf, inf, "an elementwise affine of the output of {m}", m
    for fname, fn, frng in _FUNCTIONAL:
        if fname == "softmax" and d < 2:
            continue
        z = fn(pre)
        if torch.allclose(out, z, rtol=tol, atol=tol * max(float(z.abs().max()), 1e-12)):
            lo, hi = mapped(frng, None)
            return lo, hi, f"{fname} of {{m}}", m
        ab = affine_fit(out, z, tol)
        if ab is not None:
            lo, hi = mapped(frng, ab)
            return lo, hi, f"an elementwise affine of {fname} of {{m}}", m
    return None


def out_of_reach(targets: Tensor, lo: Tensor, hi: Tensor, rtol: float = 1e-6) -> dict[str, Any]:
    """How much of ``targets`` ``(M, D)`` lies outside the closed interval ``[lo, hi]`` (per column, or scalars).

    Keys: ``bounded`` (either bound finite), ``share`` (fraction of the target values outside, a bound itself counting
    as inside, up to ``rtol`` times the largest finite bound's size, at least 1: bounds mapped through a fitted affine
    carry its round-off), ``mean_outside`` (a column's target mean outside), ``floor`` (mean
    squared distance of the targets to the interval over their variance: the least MSE a model confined to the
    interval reaches, in units of the loss of predicting the mean), ``count``, ``min``, ``max``, ``mean``,
    ``q01``, ``q99``.

    Example::

        >>> y = torch.linspace(-2, 2, 401).reshape(-1, 1)
        >>> r = out_of_reach(y, torch.tensor([0.0]), torch.tensor([1.0]))
        >>> round(r["share"], 3), r["mean_outside"]
        (0.748, False)
        >>> out_of_reach(y, torch.tensor([-2.0]), torch.tensor([2.0]))["share"]
        0.0
    """
    y = targets.detach().cpu().double()
    if y.ndim < 2:
        y = y.reshape(-1, 1)
    lo_t, hi_t = lo.detach().cpu().double().reshape(-1), hi.detach().cpu().double().reshape(-1)
    if lo_t.numel() != y.shape[-1] and lo_t.numel() > 1:  # outputs and targets laid out differently: the envelope
        lo_t, hi_t = lo_t.min().reshape(1), hi_t.max().reshape(1)
    bounded = bool(torch.isfinite(lo_t).any() or torch.isfinite(hi_t).any())
    finite = torch.isfinite(y).all(-1)
    y = y[finite]
    if y.numel() == 0:
        return {"bounded": bounded, "share": 0.0, "mean_outside": False, "floor": 0.0, "count": 0,
                "min": math.nan, "max": math.nan, "mean": math.nan, "q01": math.nan, "q99": math.nan}
    size = torch.maximum(lo_t.abs().nan_to_num(posinf=0.0), hi_t.abs().nan_to_num(posinf=0.0)).clamp(min=1.0)
    eps_lo = eps_hi = rtol * size
    outside = (y < lo_t - eps_lo) | (y > hi_t + eps_hi)
    mean = y.mean(0)
    clipped = torch.maximum(torch.minimum(y, hi_t), lo_t)
    var = float(y.var(0, unbiased=False).sum())
    dist = float((y - clipped).pow(2).mean(0).sum())
    flat = y.reshape(-1)
    q = torch.quantile(flat[:1_000_000].float(), torch.tensor([0.01, 0.99])).tolist()
    return {"bounded": bounded, "share": float(outside.double().mean()),
            "mean_outside": bool(((mean < lo_t - eps_lo) | (mean > hi_t + eps_hi)).any()),
            "floor": dist / var if var > 0 else (math.inf if dist > 0 else 0.0), "count": int(flat.numel()),
            "min": float(flat.min()), "max": float(flat.max()), "mean": float(flat.mean()), "q01": q[0], "q99": q[1]}


def probability_rows(outputs: Tensor, atol: float = 1e-4) -> dict[str, Any]:
    """Are the rows of ``outputs`` ``(M, C)`` probability vectors (in ``[0, 1]``, summing to 1 for ``C > 1``)?

    Args:
        outputs: canonical outputs, one row per prediction, the class (or label) dimension last.
        atol: tolerance of both tests.

    Example::

        >>> r = probability_rows(torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), -1))
        >>> r["in_unit"], r["sums_to_one"]
        (True, True)
        >>> probability_rows(torch.tensor([[0.2, 0.3], [0.9, -1.0]]))["in_unit"]
        False
    """
    x = wide(outputs.detach())
    if x.numel() == 0:
        return {"in_unit": False, "sums_to_one": False, "min": float("nan"), "max": float("nan"),
                "max_sum_error": float("nan")}
    lo, hi = float(x.min()), float(x.max())
    in_unit = lo >= -atol and hi <= 1 + atol
    err = float((x.sum(-1) - 1).abs().max()) if x.ndim > 1 and x.shape[-1] > 1 else float("inf")
    return {"in_unit": in_unit, "sums_to_one": err <= atol * max(1, x.shape[-1] ** 0.5), "min": lo, "max": hi,
            "max_sum_error": err}


def squashed_by(outputs: Tensor, pre: Tensor, atol: float = 1e-4) -> Optional[str]:
    """``"softmax"`` or ``"sigmoid"`` when ``outputs`` is that function of ``pre`` (both ``(M, C)``), else ``None``.

    Example::

        >>> z = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
        >>> squashed_by(torch.softmax(z, -1), z), squashed_by(torch.sigmoid(z), z), squashed_by(z, z)
        ('softmax', 'sigmoid', None)
    """
    o, z = wide(outputs.detach()), wide(pre.detach())
    if o.shape != z.shape or o.numel() == 0 or torch.allclose(o, z, atol=atol, rtol=0):
        return None
    if o.shape[-1] > 1 and torch.allclose(o, torch.softmax(z, -1), atol=atol, rtol=1e-3):
        return "softmax"
    if torch.allclose(o, torch.sigmoid(z), atol=atol, rtol=1e-3):
        return "sigmoid"
    return None


def class_like_targets(targets: Tensor, max_classes: int = 20, integer_dtype: bool = False) -> dict[str, Any]:
    """Do regression targets look like class labels: integer-valued with few distinct values?

    Class-like: integer dtype (or integer values) with between 2 and ``max_classes`` distinct values, and at least 5
    labels per distinct value (a handful of labels says nothing).

    Example::

        >>> class_like_targets(torch.tensor([0.0, 1.0, 2.0] * 10))["class_like"]
        True
        >>> class_like_targets(torch.linspace(0, 1, 30))["class_like"]
        False
    """
    y = targets.detach().reshape(-1).cpu().double()
    y = y[torch.isfinite(y)]
    values = torch.unique(y)
    integral = bool((y == y.round()).all()) if y.numel() else False
    distinct, count = int(values.numel()), int(y.numel())
    class_like = (integral or integer_dtype) and 2 <= distinct <= max_classes and count >= 5 * distinct
    return {"class_like": class_like, "integer_valued": integral, "distinct": distinct, "count": count,
            "values": [float(v) for v in values[: max_classes + 1]]}
