"""The head's output against the model's output, and the loss of the model's actual output (``HeadBiasInit``'s guard).

Writing the loss-optimal constant into the head's bias is right when the head's output *is* the prediction the loss
sees (up to the task's own link: the logit of ``BCELoss`` probabilities, the shift of a softmax), or that output
plus a term added after it (a residual). A model that transforms it before the loss (``127.5 * (1 + tanh(head(h)))``,
``sigmoid * range``, ``softplus``/``exp`` rates, a temperature) needs something else. This module

* tells, on the fit's probe batch, whether the model's output in the loss's canonical layout moves one for one with
  the bias (:func:`head_view`), and identifies an elementwise transform ``a * g(head) + b`` (``g`` one of identity,
  sigmoid, tanh, softplus, exp) when one fits exactly (:func:`identify_transform`), so that the constant can be
  mapped through its inverse (:meth:`OutputTransform.inverse`);
* measures the loss of the model's *actual* output on the probe batch (:func:`probe_loss`), in probe mode (eval,
  ``no_grad``, isolated RNG), so that two measurements differ only by what changed in the weights;
* decides whether a write helped (:func:`keep_write`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from lightning_recipe._core.conventions import TaskSpec, probe_mode, run_forward
from lightning_recipe._core.dtypes import wide

# g and its inverse on the open range (lo, hi) of g
_FAMILIES: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor], float, float]] = {
    "identity": (lambda h: h, lambda u: u, -math.inf, math.inf),
    "sigmoid": (torch.sigmoid, lambda u: torch.log(u) - torch.log1p(-u), 0.0, 1.0),
    "tanh": (torch.tanh, torch.atanh, -1.0, 1.0),
    "softplus": (F.softplus, lambda u: u + torch.log(-torch.expm1(-u)), 0.0, math.inf),
    "exp": (torch.exp, torch.log, 0.0, math.inf),
}
_FIT_RTOL = 1e-4  # residual of an exact fit, relative to the spread of the outputs (float32 rounding is ~1e-7)
_MIN_ROWS = 4  # distinct head outputs needed per column to identify a transform


@dataclass
class OutputTransform:
    """An elementwise transform ``out = a * g(head) + b`` (per output column) between the head and the loss.

    Attributes:
        family: ``"identity"`` (affine), ``"sigmoid"``, ``"tanh"``, ``"softplus"`` or ``"exp"``.
        a: ``(K,)`` scale per output.
        b: ``(K,)`` offset per output.
    """

    family: str
    a: Tensor
    b: Tensor

    def describe(self) -> str:
        """The transform in words, e.g. ``127.5 * tanh(head) + 127.5``."""
        a, b = float(self.a[0]), float(self.b[0])
        text = "head" if self.family == "identity" else f"{self.family}(head)"
        if abs(a - 1) > 1e-4:
            text = f"{a:.4g} * {text}"
        if abs(b) > 1e-4 * max(abs(a), 1e-12):
            text += f" {'-' if b < 0 else '+'} {abs(b):.4g}"
        return text + (f" (first of {self.a.numel()} outputs)" if self.a.numel() > 1 else "")

    def inverse(self, constant: Tensor) -> Optional[Tensor]:
        """The head output that the transform maps to ``constant``, or ``None`` outside the transform's range.

        Example::

            >>> t = OutputTransform("tanh", torch.tensor([127.5]), torch.tensor([127.5]))
            >>> round(float(t.inverse(torch.tensor([127.5]))), 6)
            0.0
            >>> t.inverse(torch.tensor([300.0])) is None
            True
        """
        _, inv, lo, hi = _FAMILIES[self.family]
        u = (constant.double().reshape(-1) - self.b.double()) / self.a.double()
        margin = 1e-6 * (1.0 if math.isfinite(hi - lo) else 0.0)
        if not bool(torch.isfinite(u).all()) or not bool(((u > lo + margin) & (u < hi - margin)).all()):
            return None
        out = inv(u)
        return out.float() if bool(torch.isfinite(out).all()) else None


@dataclass
class HeadView:
    """What the head's bias means for the model's output on the probe batch.

    Attributes:
        transformed: ``None`` when the head's output is the model's output as the loss sees it; else why not (the
            transform in words when it was identified).
        transform: the elementwise transform, when one fits exactly.
        additive: the output moves one for one with the bias but is not the head's output: a term is added after the
            head (a residual).
    """

    transformed: Optional[str] = None
    transform: Optional[OutputTransform] = None
    additive: bool = False


def identify_transform(head: Tensor, out: Tensor, shift_invariant: bool = False) -> Optional[OutputTransform]:
    """The elementwise transform ``out = a * g(head) + b`` that fits exactly, per column, or ``None``.

    ``head`` and ``out`` are ``(M, K)`` in the same layout. Each family (identity, sigmoid, tanh, softplus, exp) is
    fitted by least squares per column; a fit counts when its residual is below ``1e-4`` of the outputs' spread
    (float32 rounding is ~1e-7). It is identified only when exactly one family fits every column, from at least 4
    distinct head outputs per column: a head whose outputs barely vary cannot tell ``tanh`` from a line, and then
    nothing is identified. With ``shift_invariant`` (a softmax) every row is centred first and only the affine
    family (a temperature) is tried.

    Example::

        >>> h = torch.linspace(-1, 1, 20).reshape(-1, 1)
        >>> identify_transform(h, 127.5 * (1 + torch.tanh(h))).describe()
        '127.5 * tanh(head) + 127.5'
        >>> identify_transform(h, h + torch.randn(20, 1)) is None  # a residual added after the head
        True
    """
    if head.shape != out.shape or head.ndim != 2 or head.shape[0] < _MIN_ROWS:
        return None
    h, o = wide(head), wide(out)
    if not bool(torch.isfinite(h).all() and torch.isfinite(o).all()):
        return None
    if shift_invariant:
        h, o = h - h.mean(1, keepdim=True), o - o.mean(1, keepdim=True)
    fits = []
    for name, (g, _, _, _) in _FAMILIES.items():
        if shift_invariant and name != "identity":
            continue
        fit = _fit_family(g(h), o, h)
        if fit is not None:
            fits.append(OutputTransform(name, *fit))
    return fits[0] if len(fits) == 1 else None


def _fit_family(g: Tensor, o: Tensor, h: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    a_s, b_s = [], []
    for k in range(o.shape[1]):
        gk, ok = g[:, k], o[:, k]
        if not bool(torch.isfinite(gk).all()) or torch.unique(h[:, k]).numel() < _MIN_ROWS:
            return None
        gc, oc = gk - gk.mean(), ok - ok.mean()
        spread_o = float(oc.pow(2).mean().sqrt())
        if float(gc.pow(2).sum()) <= 0 or spread_o <= 1e-6 * (1.0 + float(ok.abs().max())):
            return None
        a = float((gc * oc).sum() / gc.pow(2).sum())
        b = float(ok.mean()) - a * float(gk.mean())
        resid = float((ok - (a * gk + b)).pow(2).mean().sqrt())
        if a == 0 or resid > _FIT_RTOL * spread_o:
            return None
        a_s.append(a)
        b_s.append(b)
    return torch.tensor(a_s), torch.tensor(b_s)


def _layout(spec: TaskSpec, t: Tensor) -> Tensor:
    """``t`` in the loss's canonical layout, without the logit of ``BCELoss`` probabilities (for the head's output)."""
    return dataclasses.replace(spec, probabilities=False).canonical_outputs(t)


def probe_outputs(ctx: Any) -> tuple[Optional[Tensor], Tensor]:
    """One probe forward on the fit's probe batch: the head's last output (``None`` when it was not called) and the
    model's output, detached."""
    seen: list[Tensor] = []
    handle = ctx.head.register_forward_hook(lambda _m, _i, o: seen.append(o) if isinstance(o, Tensor) else None)
    try:
        with probe_mode(ctx.trainer, ctx.pl_module):
            out = run_forward(ctx.pl_module, ctx.inputs, ctx.settings.forward).detach()
    finally:
        handle.remove()
    return (seen[-1].detach() if seen else None), out


def head_view(ctx: Any) -> HeadView:
    """How the head's bias reaches the model's output, on the probe batch (two probe forwards; none when the head was
    found as the model's output itself).

    The bias is the model's constant prediction when the output, in the loss's canonical layout, moves one for one
    with it: the bias is shifted by ``delta`` (distinct values in [1, 2] per output) for one probe forward and put
    back bit for bit, and the output must move by ``delta`` (up to a shift per row for a softmax, and to the logit's
    precision for ``BCELoss`` probabilities). A term added after the head (a residual) passes this test: the bias is
    still the constant, and the term is an input-dependent deviation like any other at init. Otherwise the output is
    transformed, and :func:`identify_transform` looks for an exact elementwise transform.
    """
    if ctx.head_how.startswith("output identical"):
        return HeadView()
    spec: TaskSpec = ctx.spec
    head, out = probe_outputs(ctx)
    bias = ctx.head.bias
    old = bias.detach().clone()
    k = bias.numel()
    delta = 1.0 + torch.arange(k, dtype=torch.float64) / max(k - 1, 1)
    try:
        with torch.no_grad():
            bias.add_(delta.reshape(bias.shape).to(device=bias.device, dtype=bias.dtype))
        _, moved = probe_outputs(ctx)
    finally:
        with torch.no_grad():
            bias.copy_(old)
    shift = spec.task == "multiclass"
    o = _canonical(spec, out, shift)
    step = _canonical(spec, moved, shift) - o
    o_raw = _canonical(spec, out, False)
    want = delta.reshape(1, -1).expand_as(step)
    if shift:
        want = want - want.mean(1, keepdim=True)
    eps = torch.finfo(out.dtype).eps if out.is_floating_point() else 0.0
    if spec.probabilities:  # the logit of a float32 sigmoid loses precision in the tails
        keep = o.abs() < 8
        ones = bool(keep.any()) and torch.allclose(step[keep], want[keep], rtol=1e-3, atol=1e-3)
    else:
        ones = bool(((step - want).abs() <= 1e-4 + 16 * eps * (o.abs() + 1)).all())
    if ones:
        additive = head is None or head.numel() != out.numel() or not torch.allclose(
            _head_rows(spec, head, out), o_raw)
        return HeadView(additive=additive)
    if head is None:
        return HeadView(f"the head `{ctx.head_name}` is not called in the model's forward")
    if head.numel() != out.numel():
        return HeadView(f"the head's output has {head.numel()} values, the model's output {out.numel()}: an operation "
                        "after the head changes its shape")
    h = _head_rows(spec, head, out)
    t = identify_transform(h, o, shift_invariant=shift)
    if t is not None:
        return HeadView(f"the head's output is transformed before the loss: out = {t.describe()}", t)
    return HeadView("the head's output is transformed before the loss, by an operation that is not one elementwise "
                    "function of it (a normalisation after the head, a clamp or ReLU, a function other than an affine "
                    "map, sigmoid, tanh, softplus or exp)")


def _canonical(spec: TaskSpec, out: Tensor, shift: bool) -> Tensor:
    """The first rows of the canonical outputs, on the host in float64 (at most ~1M values: a language model's
    logits are not copied whole); centred per row for a softmax."""
    o = spec.canonical_outputs(out.float())
    o = o[: _row_budget(o)].cpu().double()
    return o - o.mean(1, keepdim=True) if shift else o


def _head_rows(spec: TaskSpec, head: Tensor, out: Tensor) -> Tensor:
    h = _layout(spec, head.reshape(out.shape).float())
    return h[: _row_budget(h)].cpu().double()


def _row_budget(canonical: Tensor, values: int = 2**20) -> int:
    return max(2 * _MIN_ROWS, values // max(canonical.shape[-1], 1)) if canonical.ndim == 2 else canonical.shape[0]


def probe_loss(ctx: Any, groups: int = 256) -> tuple[float, Tensor]:
    """The loss of the model's actual output on the probe batch (probe mode), and the loss of each of up to
    ``groups`` contiguous groups of its examples (for the paired tolerance of :func:`keep_write`)."""
    spec: TaskSpec = ctx.spec
    with probe_mode(ctx.trainer, ctx.pl_module):
        out = run_forward(ctx.pl_module, ctx.inputs, ctx.settings.forward).detach()
    o = spec.canonical_outputs(out.float())
    y = spec.canonical_targets(ctx.targets.detach())
    n = max(ctx.targets.shape[0] if ctx.targets.ndim else 1, 1)
    if o.shape[0] == y.shape[0] and o.shape[0] % n == 0 and o.numel() > 2**22:
        # at most ~4M output values go to the host: the first examples of a batch of a language model's logits
        rows = o.shape[0] // n
        n = max(1, 2**22 // max(rows * o.shape[1], 1))
        o, y = o[: n * rows], y[: n * rows]
    o, y = o.cpu(), y.cpu()
    total = _loss_value(spec, o, y)
    g = max(1, min(groups, n))
    per_group = []
    if o.shape[0] == y.shape[0] and o.shape[0] % n == 0:
        rows = o.shape[0] // n
        bounds = torch.linspace(0, n, g + 1).round().long().tolist()
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            if hi > lo:
                per_group.append(_loss_value(spec, o[lo * rows : hi * rows], y[lo * rows : hi * rows]))
    return total, torch.tensor(per_group or [total], dtype=torch.float64)


def _loss_value(spec: TaskSpec, o: Tensor, y: Tensor) -> float:
    try:
        with torch.no_grad():
            return float(wide(torch.as_tensor(spec.loss(o, y))).mean())
    except Exception:  # a loss that needs the whole batch: no per-group value
        return math.nan


def guard_summary(before: tuple[float, Tensor], after: tuple[float, Tensor]) -> Tensor:
    """What :func:`keep_write` needs from one process, as sums that add up across ranks: ``[loss before, loss after,
    1 (ranks), groups, sum of the per-group changes, sum of their squares]``.

    Example::

        >>> guard_summary((2.0, torch.tensor([1.0, 3.0])), (1.0, torch.tensor([0.5, 1.5]))).tolist()
        [2.0, 1.0, 1.0, 2.0, -2.0, 2.5]
    """
    d = wide(after[1] - before[1]).cpu()
    d = d[torch.isfinite(d)]
    return torch.tensor([before[0], after[0], 1.0, float(d.numel()), float(d.sum()), float(d.pow(2).sum())],
                        dtype=torch.float64)


def keep_write(summary: Tensor, z: float = 3.0) -> tuple[bool, float, float, float]:
    """Whether a bias write helped: the probe batch's loss after it is at most the loss before plus a tolerance.

    ``summary`` is :func:`guard_summary`, summed over the ranks under DDP (so every rank decides the same from the
    global probe batch). The tolerance is ``z`` standard errors of the paired per-group change of the loss (the
    same examples, the same probe mode, only the bias differs), plus ``1e-6`` of the loss for rounding. A bias that
    is right for the training set can raise the loss of a small probe batch whose labels happen to differ from the
    training set's; that rise is within a few standard errors. A bias in front of a saturating transform raises it
    on nearly every example, far beyond. Returns ``(keep, tolerance, loss before, loss after)`` (the losses are
    the ranks' means); a non-finite loss after the write never keeps it, and a non-finite loss before it (a loss
    that cannot be evaluated on the probe batch) never blocks it.

    Example::

        >>> keep_write(guard_summary((2.3, torch.tensor([2.2, 2.4])), (1.6, torch.tensor([1.5, 1.7]))))[0]
        True
        >>> keep_write(guard_summary((3742.0, torch.full((4,), 3742.0)), (25610.0, torch.full((4,), 25610.0))))[0]
        False
    """
    lb_sum, la_sum, ranks, n, sd, sd2 = (float(v) for v in summary.double())
    lb, la = lb_sum / max(ranks, 1.0), la_sum / max(ranks, 1.0)
    if not math.isfinite(lb):  # nothing to compare with (a loss that cannot be evaluated here): the write stands
        return True, 0.0, lb, la
    if not math.isfinite(la):
        return False, 0.0, lb, la
    tol = 1e-6 * max(1.0, abs(lb))
    if n > 1:
        var = max(sd2 - sd * sd / n, 0.0) / (n - 1)
        tol += z * math.sqrt(var / n)
    return la <= lb + tol, tol, lb, la


def _head_bias_in_use(trainer: "pl.Trainer") -> bool:
    """Whether a callback of the trainer (or of a bundle it holds) sets the head bias to the prior this fit."""
    stack = list(trainer.callbacks)
    while stack:
        cb = stack.pop()
        if getattr(cb, "_sets_head_bias", False) and not getattr(cb, "skip", False):
            return True
        stack.extend(c for c in (getattr(cb, "callbacks", None) or []) if c is not cb)
    return False
