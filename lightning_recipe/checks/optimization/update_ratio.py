"""``OptimizationHealthCheck``'s update ratio ``||dw|| / ||w||`` per parameter tensor: a fixed sample of each tensor
taken before a measured optimizer step and compared after it (on the device), read at the periodic reads, and the
rule that judges the spread between tensors."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import numpy as np
import torch
from torch import Tensor, nn

from lightning_recipe._core.sharding import sharding
from lightning_recipe.findings import Finding
from lightning_recipe.functional.optimization import (log_spread, ratios_from_sums, sample_plan, sample_views,
                                                       segments, split_by_gap, square_sums, take_sample,
                                                       weighted_median, window_medians)

if TYPE_CHECKING:
    import lightning.pytorch as pl

_RATIO_LOW = [
    "a parameter group with a learning rate orders of magnitude below the others (a typo such as 1e-7 for 1e-3, a "
    "per-layer learning-rate multiplier applied twice, a backbone 'frozen' by a tiny learning rate by mistake)",
    "a scheduler or a custom optimizer that scales one group's learning rate to almost nothing",
]


_FAR = " (far from the ~1e-3 rule of thumb for every layer: a learning rate far too low or too high?)"


class _Plan(NamedTuple):
    """The update-ratio sample of one optimizer's parameters."""

    params: list[nn.Parameter]
    plans: list[tuple[int, int, int]]  # per tensor: offset, stride, count (`sample_plan`)
    views: Optional[list[Tensor]]  # the sampled entries as views; None: a tensor's sample is a copy, taken anew
    slots: list[int]  # per tensor: its index in `update_ratio_names`
    storage: list[int]  # per tensor: `data_ptr()` when the views were made
    segment: Tensor  # per sampled entry: its tensor (`segments`)

    def take(self) -> Tensor:
        """The sampled values now, one float32 vector on the device."""
        return torch.cat(self.views).float() if self.views is not None else take_sample(self.params, self.plans)


def _ratio_columns(rows: list[tuple[int, list[float]]], n: int) -> list[list[float]]:
    """Per tensor, its ratio at every measurement (transposed history)."""
    return [[r[i] for _, r in rows] for i in range(n)]


class _UpdateRatio:
    """The update ratio of :class:`~lightning_recipe.OptimizationHealthCheck`, mixed into it (it reads and writes the
    callback's state): sampling around each measured step, reading at the periodic reads, judging."""

    def _start_update_ratio(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Name the trainable tensors (their slot in ``update_ratio_names``), the embeddings, their groups."""
        kind = sharding(trainer)
        if kind is not None:  # each rank holds a shard of every tensor: a sample of a whole tensor is not at hand
            self.concluded["update_ratio"] = "skip"
            self.findings.append(Finding(f"{self.name}.update_ratio", "skip", (
                f"{self.name}: the update ratio is not measured under a sharded strategy ({kind}): each rank holds a "
                "shard of every parameter, so a tensor's ||dw|| / ||w|| is not at hand without gathering it.")))
        emb = {id(m.weight) for m in pl_module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        for name, p in pl_module.named_parameters():
            if p.requires_grad and id(p) not in self._slot_of:
                self._slot_of[id(p)] = len(self._slot_of)
                if id(p) in emb:
                    self._embedding.add(self._slot_of[id(p)])
        self.update_ratio_names = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        self._numel_of = [p.numel() for p in pl_module.parameters() if p.requires_grad]
        flat = [g for o in trainer.optimizers for g in o.param_groups]  # the order of `self.lrs`' columns
        self._group_of = {self._slot_of[id(p)]: j for j, g in enumerate(flat) for p in g["params"]
                          if id(p) in self._slot_of}

    def _begin_sample(self, step: int, optimizer: Any, params: list[nn.Parameter]) -> None:
        """Copy a fixed sample of at most ``update_sample`` entries per tensor (float32, on the device) before the
        step; :meth:`_end_sample` compares it with the same entries after the step.

        The strided views of the sample are made once per optimizer and kept while every parameter keeps its storage
        (``data_ptr``): a measurement is then one copy kernel and one cast before the step and the same after it;
        the sums of squares of a window's measurements are computed together at the read
        (:func:`~lightning_recipe.functional.optimization.square_sums`)."""
        key = id(getattr(optimizer, "optimizer", optimizer))
        plan = self._plan_cache.get(key)
        if (plan is None or len(plan.params) != len(params) or any(a is not b for a, b in zip(plan.params, params))
                or any(p.data_ptr() != ptr for p, ptr in zip(params, plan.storage))):
            slots = [self._slot_of[id(p)] for p in params]
            plans = [sample_plan(p.numel(), self.update_sample, p.shape[-1] if p.ndim else 1, seed=s)
                     for p, s in zip(params, slots)]
            views = sample_views(params, plans)
            # a tensor whose entries no view can walk (its sample is a copy) is sampled afresh every time
            kept = all(v.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for v, p in zip(views, params))
            plan = _Plan(params, plans, views if kept else None, slots, [p.data_ptr() for p in params],
                         segments([c for _, _, c in plans], views[0].device if views else None))
            self._plan_cache[key] = plan
        self._sample = (step, plan, plan.take())

    def _end_sample(self) -> None:
        if self._sample is not None:
            step, plan, before = self._sample
            self._sample = None
            self._ratio_pending.append((step, plan, before, plan.take()))

    def _read_ratios(self, step: int) -> None:
        """The update ratios measured since the last read: those of each plan computed at once from the stacked
        samples, one ``tolist``; a row per measurement (NaN for the tensors it did not cover, and as
        :func:`~lightning_recipe.functional.optimization.ratios_from_sums` says), and the window's median/min/max
        over the tensors of their median ratio."""
        pending, self._ratio_pending = self._ratio_pending, []
        if not pending:
            return
        by_plan: dict[int, list[int]] = {}  # measurements over the same parameters (one per optimizer)
        for i, (_, plan, _, _) in enumerate(pending):
            by_plan.setdefault(id(plan), []).append(i)
        values = iter(torch.cat([
            ratios_from_sums(square_sums(torch.stack([pending[i][2] for i in ix]),
                                         torch.stack([pending[i][3] for i in ix]), pending[ix[0]][1].segment,
                                         len(pending[ix[0]][1].slots))).reshape(-1)
            for ix in by_plan.values()]).tolist())
        n = len(self.update_ratio_names)
        rows: list[list[float]] = [[] for _ in pending]
        for i in (i for ix in by_plan.values() for i in ix):
            rows[i] = [math.nan] * n
            for slot in pending[i][1].slots:
                rows[i][slot] = next(values)
        self.update_ratios.extend((at, row) for (at, _, _, _), row in zip(pending, rows))
        meds = window_medians(rows)
        if meds:
            self.update_ratio_stats.append((step, {"median": float(np.median(meds)), "min": min(meds),
                                                   "max": max(meds)}))

    def _judge_update_ratio(self, step: int, final: bool) -> Optional[Finding]:
        name = f"{self.name}.update_ratio"
        if "update_ratio" in self.concluded or not (final or self._reads & (self._reads - 1) == 0):
            return None  # judged at reads 1, 2, 4, 8, ... (each pass reads the whole history) and at the end
        rows = [(s, r) for s, r in self.update_ratios if any(math.isfinite(v) and v > 0 for v in r)]
        if len(rows) < (3 if final else 10):
            return Finding(name, "skip", f"{self.name}: {len(rows)} measurements of the update ratio (one every "
                           f"grad_every_n_steps={self.grad_every_n_steps} optimizer steps), fewer than 3: not judged.",
                           step=step) if final else None
        names = self.update_ratio_names
        meds, _ = log_spread(_ratio_columns(rows, len(names)))
        judged = [i for i, m in enumerate(meds) if math.isfinite(m) and i not in self._embedding]
        if len(judged) < 2:
            return Finding(name, "skip", f"{self.name}: fewer than 2 tensors with a measured update ratio.",
                           step=step) if final else None
        ref = float(np.median([meds[i] for i in judged]))
        gap, low, high = split_by_gap([meds[i] if i in judged else math.nan for i in range(len(meds))])
        lo_i, hi_i = low[0], high[-1]
        groups = {i: self._group_of.get(i, -1) for i in judged}
        peaks = _peak_lrs(self.lrs)
        worst = _slowest_group(meds, judged, groups, self._numel_of, peaks, self.max_update_spread)
        factor = worst[1] if worst else 1.0
        details = {"median_ratio": 10 ** ref, "ratios": {names[i]: 10 ** meds[i] for i in judged},
                   "groups": {names[i]: groups[i] for i in judged}, "peak_lrs": peaks, "group_factor": factor,
                   "gap": 10 ** gap, "spread": 10 ** (meds[hi_i] - meds[lo_i]), "measurements": len(rows),
                   "embeddings_not_judged": [names[i] for i in sorted(self._embedding)]}

        def shown(ix: list[int]) -> str:
            return ", ".join(f"`{names[j]}` {10 ** meds[j]:.3g}" for j in ix[:6]) + \
                (f" and {len(ix) - 6} more" if len(ix) > 6 else "")

        if worst is not None and factor > self.max_update_spread:
            g, _, lr_g, lr_rest, ref_rest = worst
            mine = sorted((i for i in judged if groups[i] == g), key=lambda i: meds[i])
            return Finding(name, "warn", f"{self.name}: the update ratio ||dw|| / ||w|| per optimizer step of "
                           f"parameter group {g} is {factor:.3g}x below that of the other groups (limit "
                           f"{self.max_update_spread:g}x; the typical entry of each side, medians over {len(rows)} "
                           f"measurements up to step {step}): {shown(mine)}, against {10 ** ref_rest:.3g} for the "
                           f"others' typical entry. Its peak learning rate is {lr_g:.3g}, the others' {lr_rest:.3g}: "
                           "those weights barely move. HINT: check the learning rate of that parameter group; pass "
                           "`max_update_spread=` if this is intended.", factor, self.max_update_spread, step,
                           list(_RATIO_LOW), details)
        if 10 ** gap > self.max_update_spread:
            if final:  # not a learning-rate mistake: tensors at a tiny or large scale
                return Finding(name, "note", f"{self.name}: the update ratio ||dw|| / ||w|| per optimizer step of "
                               f"{len(low)} tensor(s) is {10 ** gap:.3g}x or more below that of the other "
                               f"{len(high)} (medians over {len(rows)} measurements): {shown(low[::-1])}; the others "
                               f"from {shown(high[:1])} up. No parameter group's learning rate explains it: a tensor "
                               "at a very large scale (a parameter in raw units) or a very small one (a layer scale, a "
                               "zero-initialised bias) moves slowly or fast relative to its size.", 10 ** gap,
                               self.max_update_spread, step, details=details)
            return None
        if final:
            # the rule of thumb (~1e-3) for all tensors at once: healthy corpus fits have a median tensor at 4.9e-4 to
            # 1.2e-2 (adaptive optimizers and schedules differ), so far outside [1e-5, 1e-1] is only worth a note
            far = not 1e-5 <= 10 ** ref <= 1e-1
            return Finding(name, "note" if far else "pass", f"{self.name}: update ratios ||dw|| / ||w|| per tensor "
                           f"(median over {len(rows)} measurements): median tensor {10 ** ref:.3g}"
                           f"{_FAR if far else ''}, "
                           f"smallest `{names[lo_i]}` {10 ** meds[lo_i]:.3g}, largest `{names[hi_i]}` "
                           f"{10 ** meds[hi_i]:.3g}; largest gap between neighbours {10 ** gap:.3g}x (limit "
                           f"{self.max_update_spread:g}x); slowest parameter group {factor:.3g}x below the others.",
                           factor, self.max_update_spread, step, details=details)
        return None


def _peak_lrs(lrs: list[list[float]]) -> dict[int, float]:
    """The largest learning rate of each parameter group over the batches (``lrs[batch][group]``).

    Example::

        >>> _peak_lrs([[0.1, 1e-5], [0.05, 2e-5]])
        {0: 0.1, 1: 2e-05}
    """
    peaks: dict[int, float] = {}
    for row in lrs:
        for j, v in enumerate(row):
            if math.isfinite(v):
                peaks[j] = max(peaks.get(j, v), v)
    return peaks


def _slowest_group(meds: list[float], judged: list[int], groups: dict[int, int], numel: list[int],
                   peaks: dict[int, float], lr_spread: float = 100.0) -> Optional[tuple[int, float, float, float, float]]:
    """The parameter group whose typical entry moves least relative to the rest, among those whose peak learning
    rate is more than ``lr_spread`` times below the rest's: ``(group, factor, its peak lr, the rest's, the rest's
    log10 ratio)``, or ``None``.

    A learning rate up to ``lr_spread`` (100x) below the rest's is a choice, not a mistake: discriminative
    fine-tuning sets a pretrained backbone at 1/10 to 1/100 of the new head's rate, and the backbone's large weights
    then move 100x to 1000x less than the head's small fresh ones, a factor of the same size as a typo's (1e-7 for
    1e-3, measured 6.4e3x to 2.9e4x). Only the learning rates separate the two.

    Each side is summarised by its median ``log10`` ratio weighted by the tensors' sizes (the typical *entry*: a
    zero-initialised bias moves fast relative to its tiny norm but weighs nothing next to its weight matrix), the
    rest's learning rate likewise. Groups with the same learning rate as the rest (no weight decay on biases and
    norms) never count: their tensors differ by their nature, not by a mistake.

    Example::

        >>> meds = [-6.3, -1.4, -2.2, -2.0]  # group 1: a weight and its bias; group 0: the rest
        >>> g, factor, lr_g, lr_rest, _ = _slowest_group(meds, [0, 1, 2, 3], {0: 1, 1: 1, 2: 0, 3: 0},
        ...                                              [2304, 48, 4096, 64], {0: 1e-3, 1: 1e-7})
        >>> g, round(factor), lr_g, lr_rest
        (1, 12589, 1e-07, 0.001)
    """
    best = None
    for g in sorted(set(groups[i] for i in judged)):
        mine = [i for i in judged if groups[i] == g]
        rest = [i for i in judged if groups[i] != g]
        if not rest or g not in peaks:
            continue
        lr_rest = weighted_median([peaks.get(groups[i], math.nan) for i in rest], [numel[i] for i in rest])
        if not peaks[g] * lr_spread * (1 + 1e-6) < lr_rest:  # beyond rounding: 1e-5 against 1e-3 is not counted
            continue
        ref_rest = weighted_median([meds[i] for i in rest], [numel[i] for i in rest])
        factor = 10 ** (ref_rest - weighted_median([meds[i] for i in mine], [numel[i] for i in mine]))
        if best is None or factor > best[1]:
            best = (g, factor, peaks[g], lr_rest, ref_rest)
    return best
