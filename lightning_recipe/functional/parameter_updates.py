"""Parameter-update math: gradient growth across steps, a tensor's fingerprint (did it change?), the float epsilon."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from lightning_recipe._core.dtypes import wide_dtype


def gradient_growth(grad_norms: Sequence[float], losses: Sequence[float] = ()) -> dict[str, Any]:
    """Does the gradient norm grow as if gradients were accumulated across steps (``zero_grad`` missing)?

    With gradients never zeroed, the gradient at step ``k`` is the sum of the first ``k`` gradients: its norm grows
    like ``k`` when the data (and so the gradient) stays about the same, like ``sqrt(k)`` at least for noise. A
    healthy run keeps it roughly constant. Accumulating means: the norm grew at all but at most one step, by at least
    ``(K + 1) / 2`` over the ``K`` steps (half the growth of accumulation with constant data), while the loss (when
    known) did not grow by more than half that factor (a diverging loss grows its gradient too).

    Args:
        grad_norms: total gradient norm at each of the first ``K`` optimizer steps.
        losses: training loss at the same steps (NaN or empty when unknown).

    Example::

        >>> gradient_growth([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 0.9, 0.9, 0.8, 0.8])["accumulating"]
        True
        >>> gradient_growth([1.0, 0.9, 1.1, 0.8, 0.9])["accumulating"]
        False
    """
    g = [float(v) for v in grad_norms]
    k = len(g)
    threshold = (k + 1) / 2
    if k < 3 or not g[0] > 0 or not all(math.isfinite(v) for v in g):
        return {"accumulating": False, "growth": g[-1] / g[0] if k and g[0] > 0 else float("nan"),
                "threshold": threshold, "loss_ratio": float("nan")}
    growth = g[-1] / g[0]
    ups = sum(b > a for a, b in zip(g, g[1:]))
    known = [float(v) for v in losses if math.isfinite(float(v))]
    loss_ratio = abs(known[-1] / known[0]) if len(known) >= 2 and known[0] != 0 else float("nan")
    loss_ok = not math.isfinite(loss_ratio) or loss_ratio <= growth / 2
    return {"accumulating": growth >= threshold and ups >= k - 2 and loss_ok, "growth": growth,
            "threshold": threshold, "loss_ratio": loss_ratio}


def tensor_fingerprint(t: Tensor, samples: int = 64, chunk: int = 2**16) -> Tensor:
    """A fingerprint of a tensor's values, of at most ``samples + 4`` numbers, on the tensor's device: two
    fingerprints of the same tensor differ (``(a != b).any()``) when its values changed.

    Entries: ``max |t_i|``, the sum ``sum t_i``, the sum of squares ``sum t_i^2``, the weighted sum ``sum w_i t_i``
    with fixed weights ``w_i = frac((i + 1) phi)`` (``phi`` the golden ratio: distinct, in ``(0, 1)``, generated chunk
    by chunk and never stored), all in float64 (float32 on MPS, which has no float64) and computed in the same order
    every time, then ``samples`` elements at a fixed stride over the flattened tensor (all elements when the tensor
    has at most ``samples``). Temporaries hold at most ``chunk`` elements. Values compare by ``==``: ``-0.0`` and
    ``0.0`` are the same value, and a NaN anywhere makes every comparison "changed". What a change must do to go
    unseen is in :class:`ParameterUpdateCheck`'s docstring.

    Args:
        t: the tensor (a parameter); complex tensors are read as their real and imaginary parts.
        samples: elements sampled at a fixed stride.
        chunk: elements converted to float64 at a time.

    Example::

        >>> w = torch.linspace(-1.0, 1.0, 1000)
        >>> a = tensor_fingerprint(w)
        >>> a.shape, bool((tensor_fingerprint(w) != a).any())
        (torch.Size([68]), False)
        >>> b = w.clone(); b[501] += 1e-6  # one element, not sampled
        >>> bool((tensor_fingerprint(b) != a).any())
        True
        >>> b = w.clone(); b[[3, 5]] = b[[5, 3]]  # two unsampled values swapped: only the weighted sum sees it
        >>> d = tensor_fingerprint(b) != a
        >>> d[:3].tolist(), bool(d[3]), bool(d[4:].any())
        ([False, False, False], True, False)
    """
    v = t.detach()
    if v.is_complex():
        v = torch.view_as_real(v)
    acc = wide_dtype(v.device)
    flat = v.reshape(-1)  # a view for a contiguous tensor
    n = flat.numel()
    zero = torch.zeros((), dtype=acc, device=v.device)
    top, total, squares, weighted = zero, zero, zero, zero
    for start in range(0, n, chunk):
        c = flat[start : start + chunk].to(acc)
        w = torch.arange(start + 1, start + 1 + c.numel(), dtype=acc, device=v.device).mul_(_PHI).frac_()
        lo, hi = torch.aminmax(c)
        top = torch.maximum(top, torch.maximum(-lo, hi))
        total = total + c.sum()
        squares = squares + torch.dot(c, c)
        weighted = weighted + torch.dot(c, w)
    if n <= samples:
        picked = flat.to(acc)
    else:
        idx = torch.linspace(0, n - 1, samples, dtype=torch.float64).round().long().to(v.device)
        picked = flat[idx].to(acc)
    return torch.cat([torch.stack([top, total, squares, weighted]), picked])


def _chunk_for(params: list[Tensor]) -> int:
    """Elements converted at a time by :func:`tensor_fingerprint`: its two float64 temporaries stay under 1% of the
    parameters' bytes (between 1K and 64K elements)."""
    total = sum(p.numel() * p.element_size() for p in params)
    return int(min(2**16, max(2**10, total // 1600)))


_PHI = (5**0.5 - 1) / 2  # frac((i + 1) * phi): weights that differ for every i, without storing them


def _eps(p: Tensor) -> float:
    return float(torch.finfo(p.dtype).eps) if p.is_floating_point() else 0.0
