"""Wiring math: the distinct classes a batch should hold, the shuffle test, output/target layouts, broadcasting."""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import torch
from torch import Tensor

from lightning_recipe._core.dtypes import wide

_SHUFFLE_P = 1e-6  # a random order gives all-single-class batches with at most this probability


_SHUFFLE_Z = 6.0


_MAX_LAYOUT_ELEMENTS = 1 << 22  # a model output larger than this is not compared (sorting cost)


def _log_absent(n_total: float, n_class: Tensor, b: int) -> Tensor:
    """``log C(N - n, B) - log C(N, B)``: log-probability that a batch of ``B`` drawn without replacement from ``N``
    misses a class of ``n`` (``-inf`` when it cannot)."""
    rest = n_total - n_class
    out = (torch.lgamma(rest + 1) - torch.lgamma((rest - b).clamp_min(0) + 1) - math.lgamma(n_total + 1)
           + math.lgamma(n_total - b + 1))
    return torch.where(rest >= b, out, torch.full_like(out, -math.inf))


def expected_distinct_classes(class_counts: Any, batch_size: int) -> float:
    """Expected number of distinct classes in a batch of ``batch_size`` labels drawn at random without replacement
    from a dataset with ``class_counts``: ``sum_c 1 - C(N - n_c, B) / C(N, B)``.

    Args:
        class_counts: examples per class.
        batch_size: labels in the batch.

    Example::

        >>> round(expected_distinct_classes([50, 50], 2), 4)  # 2 * (1 - C(50, 2) / C(100, 2))
        1.5051
        >>> expected_distinct_classes([10, 10, 10], 30)
        3.0
    """
    n = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    n = n[n > 0]
    total = float(n.sum())
    b = int(min(batch_size, total))
    return float((1 - _log_absent(total, n, b).exp()).sum())


def shuffle_test(per_batch_counts: Tensor, class_counts: Tensor) -> dict[str, Any]:
    """Are the batches less mixed than a random order of the same labels could make them?

    ``per_batch_counts`` ``(K, C)`` holds the label counts of each of the first ``K`` batches, ``class_counts``
    ``(C,)`` those of the whole training set. For each batch of ``B`` labels, a random order (drawing without
    replacement) gives ``E[D] = sum_c 1 - a_c`` distinct classes, with ``a_c = C(N - n_c, B) / C(N, B)``,
    ``Var[D] = sum_{c, c'} (a_{cc'} - a_c a_{c'})`` (``a_{cc'}`` for both classes absent, ``a_{cc} = a_c``), and a
    single class with probability ``sum_c C(n_c, B) / C(N, B)``. The order is ``sorted`` when every batch holds one
    class and the product of those probabilities is below 1e-6, or when the mean of ``D`` is at most half its
    expectation (itself at least 2.5) and ``6`` standard deviations (of the mean, batches taken as independent)
    below it.

    Args:
        per_batch_counts: label counts per batch.
        class_counts: label counts of the training set.

    Example::

        >>> counts = torch.tensor([100.0, 100.0, 100.0, 100.0])
        >>> sorted_batches = torch.tensor([[32.0, 0, 0, 0]] * 3)
        >>> shuffle_test(sorted_batches, counts)["sorted"]
        True
        >>> shuffle_test(torch.tensor([[8.0, 9, 7, 8], [10, 6, 8, 8]]), counts)["sorted"]
        False
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    per_batch = torch.as_tensor(per_batch_counts, dtype=torch.float64).reshape(-1, counts.numel())
    per_batch = per_batch[per_batch.sum(1) > 0]
    present = counts > 0
    n = counts[present]
    total = float(n.sum())
    distinct, expected, variances, log_single, sizes = [], [], [], [], []
    for row in per_batch:
        b = int(min(row.sum().item(), total))
        sizes.append(b)
        distinct.append(int((row > 0).sum()))
        log_a = _log_absent(total, n, b)
        a = log_a.exp()
        expected.append(float((1 - a).sum()))
        # all B labels from one class: C(n_c, B) / C(N, B)
        log_one = (torch.lgamma(n + 1) - torch.lgamma((n - b).clamp_min(0) + 1) - math.lgamma(total + 1)
                   + math.lgamma(total - b + 1))
        log_one = torch.where(n >= b, log_one, torch.full_like(log_one, -math.inf))
        log_single.append(float(torch.logsumexp(log_one, 0)) if b > 0 else 0.0)
        if n.numel() <= 1000:
            pair = n.reshape(-1, 1) + n.reshape(1, -1)
            a2 = _log_absent(total, pair, b).exp()
            a2.fill_diagonal_(0.0)
            a2 += torch.diag(a)
            variances.append(float(a2.sum() - a.sum() ** 2))
        else:
            variances.append(float("nan"))
    k = len(distinct)
    mean_d = sum(distinct) / k if k else float("nan")
    mean_e = sum(expected) / k if k else float("nan")
    sd = math.sqrt(max(sum(variances), 0.0)) / k if k else float("nan")
    z = (mean_e - mean_d) / sd if k and sd > 0 and math.isfinite(sd) else (math.inf if k and mean_e > mean_d else 0.0)
    log_p = sum(log_single)
    all_single = k > 0 and all(d == 1 for d in distinct)
    p_all_single = math.exp(log_p) if log_p > -700 else 0.0
    few = k > 0 and mean_e >= 2.5 and mean_d <= 0.5 * mean_e and z >= _SHUFFLE_Z
    return {"sorted": bool((all_single and log_p < math.log(_SHUFFLE_P)) or few), "all_single": all_single,
            "distinct": distinct, "expected_distinct": [round(e, 4) for e in expected], "mean_distinct": mean_d,
            "mean_expected": mean_e, "p_all_single": p_all_single, "z": z, "batch_sizes": sizes, "n": total}


def _as_key(t: Tensor) -> Tensor:
    return wide(t.detach())


def _same_values(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` hold the same values (as multisets): one is a rearrangement of the other."""
    if a.numel() != b.numel():
        return False
    left = torch.sort(_as_key(a).reshape(-1)).values
    return torch.equal(left, torch.sort(_as_key(b).reshape(-1)).values.to(a.device))


def _same_rows(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` ``(M, K)`` hold the same rows (as multisets)."""
    if a.shape != b.shape:
        return False
    ua, ca = torch.unique(_as_key(a), dim=0, return_counts=True)
    ub, cb = torch.unique(_as_key(b).to(a.device), dim=0, return_counts=True)
    return ua.shape == ub.shape and torch.equal(ua, ub) and torch.equal(ca, cb)


def _layouts(out: Tensor, y: Tensor, classes: bool) -> list[tuple[str, Tensor, Tensor]]:
    """The layouts in which ``out`` pairs with the targets ``y``: ``(description, rows (M, K), targets (M,))``."""
    o, t = tuple(out.shape), tuple(y.shape)
    if not classes:
        return [("elementwise", out.reshape(-1, 1), y.reshape(-1))] if out.numel() == y.numel() else []
    if y.is_floating_point() or len(o) < 2:
        return []
    found = []
    if len(o) == len(t) + 1 and o[0] == t[0] and o[2:] == t[1:]:
        found.append((f"class dim 1 of {o}", out.movedim(1, -1).reshape(-1, o[1]), y.reshape(-1)))
    if o[:-1] == t:
        found.append((f"class dim last of {o}", out.reshape(-1, o[-1]), y.reshape(-1)))
    if len(o) == 3 and len(t) == 2 and o[:2] == (t[1], t[0]):
        found.append((f"time-major {o} against {t} targets", out.transpose(0, 1).reshape(-1, o[-1]), y.reshape(-1)))
    if len(o) == 2 and y.numel() == o[0]:
        found.append((f"{o} rows against flattened targets", out, y.reshape(-1)))
    return found


def _layout_verdict(inp: Tensor, tgt: Tensor, outputs: list[Tensor], y: Optional[Tensor], classes: bool,
                    pair: bool) -> dict[str, Any]:
    """Judge one call of the loss: ``status`` pass / fail / skip, ``what`` happened, ``reference`` inputs."""
    out = next((o for o in outputs if o.numel() == inp.numel() and o.numel() <= _MAX_LAYOUT_ELEMENTS
                and _same_values(inp, o)), None)
    if out is None:
        big = any(o.numel() > _MAX_LAYOUT_ELEMENTS for o in outputs)
        why = ("the model's output is too large to compare" if big else "the loss input is not a rearrangement of "
               "the model's output (transformed, masked or another head)")
        return {"status": "skip", "why": why, "what": why}
    if not classes and tgt.shape != inp.shape and tgt.numel() > 1:
        shape = _broadcast_shape(tuple(inp.shape), tuple(tgt.shape))
        if shape is not None and math.prod(shape) > max(inp.numel(), tgt.numel()):
            ref = None
            if y is not None and y.numel() == out.numel():
                ref = (out.reshape(-1), y.reshape(-1).to(out.dtype))
            return {"status": "fail", "what": f"input {tuple(inp.shape)} and target {tuple(tgt.shape)} broadcast to "
                    f"{shape}: every prediction is compared with every target", "reference": ref,
                    "layout": "prediction and target of the same shape"}
    if y is None:
        return {"status": "skip", "why": "the batch's targets are not a tensor", "what": "no targets"}
    cands = _layouts(out, y, classes)
    if not cands:
        why = f"no known layout pairs the output {tuple(out.shape)} with targets {tuple(y.shape)}"
        return {"status": "skip", "why": why, "what": why}
    if classes:
        rows = inp.reshape(1, -1) if inp.ndim == 1 else inp.movedim(1, -1).reshape(-1, inp.shape[1])
        tg = tgt.reshape(-1) if not tgt.is_floating_point() and tgt.numel() == rows.shape[0] else None
    else:
        rows = inp.reshape(-1, 1)
        tg = tgt.reshape(-1) if tgt.shape == inp.shape else None
    row_ok = [c for c in cands if _same_rows(c[1], rows)]
    first = cands[0]
    if not row_ok:
        return {"status": "fail", "what": f"the {tuple(rows.shape)} score rows given to the loss (from input "
                f"{tuple(inp.shape)}) are not the model's rows: each mixes the scores of different positions",
                "reference": (first[1], first[2]), "layout": first[0]}
    if pair and tg is not None and tg.numel() == y.numel() and _same_values(tg, y):
        for desc, r, t in row_ok:
            if _same_rows(torch.cat([_as_key(r), _as_key(t).reshape(-1, 1)], 1),
                          torch.cat([_as_key(rows), _as_key(tg).reshape(-1, 1)], 1)):
                return {"status": "pass", "what": desc}
        desc, r, t = row_ok[0]
        return {"status": "fail", "what": f"the rows are the model's, but paired with the targets in another order "
                f"(output {tuple(out.shape)}, targets {tuple(y.shape)} given as {tuple(tgt.shape)})",
                "reference": (r, t), "layout": desc}
    why = "the model's input was not the batch's" if not pair else "the loss's targets are not the batch's"
    return {"status": "pass", "what": f"{row_ok[0][0]}; rows only, the pairing with targets not compared: {why}"}


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    try:
        return tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        return None


def _parse_size(text: str) -> tuple[int, ...]:
    m = re.search(r"\[([0-9, ]*)\]", text)
    return tuple(int(v) for v in m.group(1).split(",") if v.strip()) if m else ()


def _broadcast_grows(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    shape = _broadcast_shape(a, b)
    return shape is not None and math.prod(shape) > max(math.prod(a), math.prod(b)) and math.prod(b) > 1
