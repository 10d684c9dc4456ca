"""The five rules of ``OptimizationHealthCheck`` (learning-rate schedule, clipping, gradients, dead ReLUs, weight
decay): each reads the measurements the callback took and returns a finding, or ``None`` while undecided."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np

from lightning_recipe._core.sharding import sharding
from lightning_recipe.findings import Finding
from lightning_recipe.functional.optimization import _batch_size

if TYPE_CHECKING:
    import lightning.pytorch as pl

_LR = [
    "a per-epoch schedule (StepLR, MultiStepLR, ExponentialLR) stepped every batch: "
    "return {'scheduler': ..., 'interval': 'epoch'} from configure_optimizers",
    "a schedule length (step_size, T_max, total_steps, milestones) copied from another dataset or batch size",
    "warm restarts whose first cycle is longer than the training, or a decay factor meant for far longer training",
]
_CLIP = [
    "gradient_clip_val far below the gradient norm (e.g. 1e-4 with norms ~1): every step is scaled down by the "
    "same huge factor, which acts as a much lower learning rate",
    "gradient_clip_algorithm='value' with a tiny value: every gradient element is cut to ±value",
]
_VANISH = [
    "saturating activations (sigmoid/tanh) stacked deep without normalisation or residual connections",
    "weights initialised too small for the depth (use Kaiming/Xavier initialisation)",
    "a layer that squashes its input (a sigmoid in the middle of the network, a very low temperature)",
]
_EXPLODE = [
    "learning rate too high, or no normalisation in a deep or recurrent network",
    "weights initialised too large for the depth",
    "a loss or input on a huge scale (unscaled inputs or targets)",
]
_DEAD = [
    "learning rate too high: a large step pushed the pre-activations negative for every input",
    "a large negative bias (or bias init) before the ReLU",
    "inputs not standardised, so pre-activations start far from zero",
]
_WD = [
    "weight_decay far too large for this learning rate (typical: 1e-4 to 1e-2 for AdamW, 5e-4 for SGD)",
    "weight decay applied as L2 to an Adam optimiser with a large coefficient (use AdamW with a small one)",
    "weight decay on biases and normalisation parameters",
]


class _OptimizationRules:
    """The judgements of :class:`~lightning_recipe.OptimizationHealthCheck`, mixed into it (they read its state)."""

    def _judge_lr(self, trainer: "pl.Trainer", step: int, final: bool) -> Optional[Finding]:
        name = f"{self.name}.lr_schedule"
        if "lr_schedule" in self.concluded:
            return None
        if self._planned is None:
            return Finding(name, "skip", f"{self.name}: the number of planned steps is unknown (max_steps=-1, "
                           "max_epochs=-1): the learning-rate schedule is not judged.", step=step) if final else None
        quarter = self.schedule_fraction * self._planned
        m = self._min_ratio_early
        if self._low is not None and m is not None:
            (j, fell), (r, jm, at) = self._low, m
            details = {"peak": self._peaks[jm], "group": jm, "planned_steps": self._planned, "low_step": fell,
                       "restart_step": self._back}
            low = self._low_steps / max(self._early_steps, 1)
            details["fraction_low"] = low
            status = "fail" if r < self.min_lr_fraction**2 else "warn"
            hint = ("HINT: step per-epoch schedulers per epoch (`'interval': 'epoch'`) or size the schedule to "
                    "trainer.estimated_stepping_batches; pass `min_lr_fraction=` if the schedule is intended.")
            if self._back is not None and not (step > quarter or final):
                return None  # it came back: judged at the end of the inspected part, by the time spent low
            if self._back is not None and low < 0.5:
                return Finding(name, "pass", f"{self.name}: the learning rate of parameter group {j} fell below "
                               f"{self.min_lr_fraction:g} of its peak {self._peaks[j]:.4g} at step {fell} (down to "
                               f"{r:.3g} of it at step {at}) and came back above it at step {self._back}: the schedule "
                               f"restarts (warm restarts, a cyclic schedule), below {self.min_lr_fraction:g} of the "
                               f"peak for {low:.0%} of the first {self.schedule_fraction:g} of the planned steps.", r,
                               self.min_lr_fraction, step, details=details)
            if self._back is not None:
                return Finding(name, status, f"{self.name}: the learning rate was below {self.min_lr_fraction:g} of "
                               f"its peak {self._peaks[jm]:.4g} for {low:.0%} of the first {self.schedule_fraction:g} "
                               f"of the {int(self._planned)} planned steps (down to {r:.3g} of it at step {at}): it "
                               f"came back above at step {self._back} but does not stay, so most of training runs at "
                               "a learning rate too small to learn (a cyclic schedule whose cycles shrink, or sized in "
                               f"epochs and stepped per batch). {hint}", low, 0.5, at, list(_LR), details)
            if step < 2 * fell and not final:
                return None  # a restart may still bring it back
            until = (f"step {2 * fell} (twice the step at which it fell below {self.min_lr_fraction:g} of the peak)"
                     if step >= 2 * fell else f"the end of the fit (step {step})")
            return Finding(name, status, f"{self.name}: the learning rate of parameter group {jm} fell to {r:.3g} of "
                           f"its peak {self._peaks[jm]:.4g} at step {at}, before {self.schedule_fraction:g} of the "
                           f"{int(self._planned)} planned steps (step {quarter:.0f}), and had not come back above "
                           f"{self.min_lr_fraction:g} of the peak by {until}; expected at least "
                           f"{self.min_lr_fraction:g} of the peak until step {quarter:.0f}, or a restart. The rest of "
                           f"training runs at a learning rate too small to learn. {hint}", r, self.min_lr_fraction, at,
                           list(_LR), details)
        if step > quarter or final:
            r = m[0] if m is not None else 1.0
            return Finding(name, "pass", f"{self.name}: the learning rate stayed at or above {r:.0%} of its peak during "
                           f"the first {self.schedule_fraction:.0%} of {int(self._planned)} planned steps.", r,
                           self.min_lr_fraction, step, details={"planned_steps": self._planned})
        return None

    def _judge_clip(self, trainer: "pl.Trainer", step: int, final: bool) -> Optional[Finding]:
        name = f"{self.name}.clipping"
        if "clipping" in self.concluded:
            return None
        clip = trainer.gradient_clip_val
        if clip is None or float(clip) <= 0:
            return Finding(name, "skip", f"{self.name}: no gradient clipping configured.", step=step) if final else None
        g = np.asarray([v for v in self.grad_norms if math.isfinite(v)], dtype=float)
        if g.size < min(10, self.check_every_n_steps) and not final:
            return None
        if g.size == 0:
            return Finding(name, "skip", f"{self.name}: no gradient measured.", step=step) if final else None
        ratio = g / float(clip)
        clipped = float((ratio > 1).mean())
        med = float(np.median(ratio))
        kind = "largest |gradient|" if trainer.gradient_clip_algorithm == "value" else "gradient norm"
        numbers = (f"{clipped:.0%} of {g.size} steps clipped; median pre-clip {kind} {float(np.median(g)):.4g} = "
                   f"{med:.3g} x gradient_clip_val={float(clip):g}")
        details = {"clipped_fraction": clipped, "median_ratio": med, "steps": int(g.size), "clip_val": float(clip)}
        if clipped >= self.clip_steps and med >= self.clip_ratio:
            status = "note" if self._adaptive else "fail"  # adaptive: meaningless but harmless, a note
            effect = ("an adaptive optimizer rescales gradients anyway, so the clip value is meaningless"
                      if self._adaptive else f"every update is shrunk ~{med:.3g}x: the effective learning rate is the "
                      "learning rate divided by that")
            return Finding(name, status, f"{self.name}: gradient clipping clips nearly every step by orders of "
                           f"magnitude: {numbers} (limits: {self.clip_steps:.0%} of steps and {self.clip_ratio:g}x); "
                           f"{effect}. HINT: set gradient_clip_val near the typical gradient norm (~{float(np.median(g)):.3g}) "
                           "or remove it.", med, self.clip_ratio, step, list(_CLIP), details)
        if final:
            return Finding(name, "pass", f"{self.name}: gradient clipping: {numbers}.", med, self.clip_ratio, step,
                           details=details)
        return None

    def _judge_gradients(self, step: int, final: bool) -> Optional[Finding]:
        name = f"{self.name}.gradients"
        if "gradients" in self.concluded:
            return None
        if self.layer_history:
            _, rms = self.layer_history[-1]
            live = [(i, v) for i, v in enumerate(rms) if v > 0 and math.isfinite(v)]
            if len(live) >= 2:
                lo = min(live, key=lambda t: t[1])
                hi = max(live, key=lambda t: t[1])
                spread = hi[1] / lo[1]
                if spread > self._max_spread[0]:
                    self._max_spread = (spread, self.layer_names[lo[0]], self.layer_names[hi[0]])
                if spread > self.max_grad_spread:
                    vanishing = lo[0] < hi[0]
                    what = "vanishing" if vanishing else "exploding"
                    # FSDP/DeepSpeed/ModelParallel: each rank measures its own shard of a layer, and a few elements
                    # of a split layer are no measure of the layer: a note, never a warning
                    sharded = sharding(self._trainer()) is not None  # type: ignore[attr-defined]
                    status = "note" if sharded else "warn"
                    shard_note = (" Measured on this rank's shards of the parameters (a sharded strategy): a layer "
                                  "split across ranks may be represented by a few elements, so this is a note."
                                  if sharded else "")
                    return Finding(name, status, f"{self.name}: {what} gradients: the RMS gradient of layer "
                                   f"`{self.layer_names[lo[0]]}` is {lo[1]:.3g}, of layer `{self.layer_names[hi[0]]}` "
                                   f"{hi[1]:.3g}: a spread of {spread:.3g} (limit {self.max_grad_spread:g}) over steps "
                                   f"up to {step}. The {'early' if vanishing else 'late'} layers barely learn. HINT: "
                                   f"pass `max_grad_spread=` if this is expected.{shard_note}", spread,
                                   self.max_grad_spread, step,
                                   list(_VANISH if vanishing else _EXPLODE),
                                   {"layers": self.layer_names, "rms": rms, "nonfinite_steps": self._nonfinite_steps})
        if final:
            if not self.layer_history:
                return Finding(name, "skip", f"{self.name}: no gradient measured.", step=step)
            s, lo, hi = self._max_spread
            return Finding(name, "pass", f"{self.name}: per-layer RMS gradients within a spread of {s:.3g} (limit "
                           f"{self.max_grad_spread:g}){f'; smallest `{lo}`, largest `{hi}`' if lo else ''}.", s,
                           self.max_grad_spread, step, details={"layers": self.layer_names,
                                                                "rms": self.layer_history[-1][1]})
        return None

    def _judge_dead(self, step: int, final: bool) -> Optional[Finding]:
        name = f"{self.name}.dead_relu"
        if "dead_relu" in self.concluded:
            return None
        if not self.dead_history:
            if final:
                return Finding(name, "skip", f"{self.name}: no nn.ReLU module ran in the probe forward: dead units not "
                               "checked.", step=step)
            return None
        at, dead = self.dead_history[-1]
        layer, frac = max(dead.items(), key=lambda t: t[1])
        n = _batch_size(self._probe_inputs)
        shown = ", ".join(f"`{k}`: {v:.2f}" for k, v in list(dead.items())[:8])
        if frac > self.max_dead_fraction:
            return Finding(name, "warn", f"{self.name}: {frac:.0%} of the units of ReLU `{layer}` output 0 for all "
                           f"{n} examples of the probe batch at step {at} (limit {self.max_dead_fraction:.0%}); per "
                           f"layer: {shown}. Dead units get no gradient and never recover. HINT: pass "
                           "`max_dead_fraction=` to change the threshold.", frac, self.max_dead_fraction, at,
                           list(_DEAD), {"dead_fraction": dead, "probe_examples": n})
        if final:
            return Finding(name, "pass", f"{self.name}: dead ReLU units on {n} probe examples at step {at}: {shown}.",
                           frac, self.max_dead_fraction, at, details={"dead_fraction": dead})
        return None

    def _judge_wd(self, step: int, final: bool) -> Optional[Finding]:
        name = f"{self.name}.weight_decay"
        if "weight_decay" in self.concluded:
            return None
        if not self._has_wd:
            return Finding(name, "skip", f"{self.name}: no parameter group has weight_decay > 0.", step=step) \
                if final else None
        h = self.weight_history
        if self._weight0 is None or not self._weight0 > 0 or len(h) < 3 or self._batches < self.warmup_steps:
            if final:
                why = _wd_skip_reason(self._batches, self.warmup_steps, len(h), self.check_every_n_steps, self._weight0)
                return Finding(name, "skip", f"{self.name}: {why}: weight decay not judged.", step=step)
            return None
        w0, w = self._weight0, h[-1][1]
        shrink = w / w0
        steady = all(v < (1 - self.min_shrink) * w0 for _, v, _ in h[-3:])
        first, last = self._first_window, h[-1][2]
        if first is None or not math.isfinite(last):
            return None
        rel = (first - last) / max(abs(first), 1e-12)
        decay_alone = math.exp(-max(self._decay_budget, default=0.0))
        numbers = (f"weight norm {w0:.4g} at fit start -> {w:.4g} ({shrink:.3g}x) at step {step}, below {1 - self.min_shrink:g}x at each "
                   f"of the last 3 reads: {steady}; mean loss {first:.4g} (first window) -> {last:.4g} (last window), a relative "
                   f"decrease of {rel:.3g}; the decay term alone, prod(1 - lr * weight_decay), shrinks weights to "
                   f"{decay_alone:.3g}x")
        details = {"weight_norms": [v for _, v, _ in h], "window_losses": [v for _, _, v in h], "shrink": shrink,
                   "relative_loss_decrease": rel, "decay_alone": decay_alone, "coupled_adaptive": self._coupled_adaptive}
        # weight decay is to blame only if its own term can shrink the weights that much (SGD's L2 and decoupled
        # decay: a factor 1 - lr * wd per step); an L2 term inside Adam & co. is rescaled, so it is only suspected
        strong = decay_alone < 1 - self.min_shrink / 2 or (self._coupled_adaptive and max(self._wds) >= 1e-2)
        if shrink < 1 - self.min_shrink and steady and rel < self.min_rel_decrease and strong:
            status = "fail" if shrink < 0.1 and decay_alone < 0.1 else "warn"
            return Finding(name, status, f"{self.name}: the weights shrink instead of fitting: {numbers} (limits: "
                           f"shrink below {1 - self.min_shrink:g}x with a loss decrease under {self.min_rel_decrease:g}). "
                           "HINT: lower weight_decay (or pass `min_shrink=` if this is expected).", shrink,
                           1 - self.min_shrink, step, list(_WD), details)
        if final:
            return Finding(name, "pass", f"{self.name}: {numbers}.", shrink, 1 - self.min_shrink, step, details=details)
        return None


def _wd_skip_reason(batches: int, warmup_steps: int, reads: int, every: int, weight0: Optional[float]) -> str:
    """Why the weight-decay test did not run: only the reasons that apply, with their numbers.

    Example::

        >>> _wd_skip_reason(82, 50, 2, 50, 3.2)
        'only 2 reads of the weight norm (one every check_every_n_steps=50 batches and at the end), fewer than 3'
        >>> _wd_skip_reason(20, 50, 3, 5, 3.2)
        '20 batches, fewer than warmup_steps=50'
    """
    reasons = []
    if batches < warmup_steps:
        reasons.append(f"{batches} batches, fewer than warmup_steps={warmup_steps}")
    if reads < 3:
        reasons.append(f"only {reads} read{'' if reads == 1 else 's'} of the weight norm (one every "
                       f"check_every_n_steps={every} batches and at the end), fewer than 3")
    if weight0 is None or not weight0 > 0:
        reasons.append(f"the weight norm at fit start is {weight0} (no trainable weights)")
    return "; ".join(reasons)
