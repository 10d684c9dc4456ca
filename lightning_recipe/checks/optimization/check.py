"""``OptimizationHealthCheck``: LR schedule, gradient clipping, per-layer gradients, dead ReLUs, weight decay.

The recipe's "do not trust learning-rate decay defaults" and the optimisation bugs that let a loss go down a little
while the model quietly learns nothing: a schedule that decays to nothing early, a clip value that clips every step
by orders of magnitude, gradients that vanish before reaching the first layers, ReLUs that never fire, weight decay
that shrinks the weights instead of fitting.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_recipe._core.base import OnFail, RecipeCheck
from lightning_recipe._core.conventions import probe_mode, read_losses, run_forward, split_batch
from lightning_recipe._core.labels import first_batch
from lightning_recipe._core.warn import warn_once
from lightning_recipe.checks.optimization.rules import _OptimizationRules
from lightning_recipe.checks.optimization.update_ratio import _UpdateRatio
from lightning_recipe.exceptions import RecipeConfigError, RecipeSkipNotice, RecipeWarning
from lightning_recipe.findings import Finding
from lightning_recipe.functional.optimization import _decoupled, _norms, _weight_norm
from lightning_recipe.report.plotting import plot_optimization
from lightning_recipe._core.dtypes import wide
from lightning_recipe._core.sharding import local_tensor

_ADAPTIVE = ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "SparseAdam", "Adafactor")
_CHECKS = ("lr_schedule", "clipping", "gradients", "dead_relu", "weight_decay", "update_ratio")


class OptimizationHealthCheck(_OptimizationRules, _UpdateRatio, RecipeCheck):
    """Six checks of the optimisation, gathered on the device and judged every ``check_every_n_steps`` batches.

    * **lr_schedule**: the learning rate of every parameter group, read from ``trainer.optimizers`` at each batch
      (a Python float; a tensor learning rate is copied on its device and read with the periodic reads, so it costs
      no sync per step either), relative to its peak so far. Before ``schedule_fraction`` (a quarter) of the
      planned optimizer steps (``trainer.estimated_stepping_batches``) it must not fall below ``min_lr_fraction``
      (10 %) of the peak *and stay there*: when it falls below at step ``s``, the decision waits until step ``2 s``
      (the learning rate has then been low for as long as it took to get there; or the end of the fit, if sooner).
      If by then it came back above ``min_lr_fraction`` of the peak, the schedule restarts (warm restarts such as
      ``CosineAnnealingWarmRestarts``, a cyclic schedule) and is judged at ``schedule_fraction`` by the share of
      the steps until then with a group below ``min_lr_fraction`` of its peak: under half passes, saying so (a cosine
      cycle spends 80 % of its length above, a triangular one from a tenth of the peak all of it); half or more is a
      schedule that comes back but does not stay (cycles that shrink, a cycle sized in epochs and stepped per batch),
      judged like a decay. If it did not come back by step ``2 s``, warn, and fail when the smallest ratio
      before ``schedule_fraction`` is below ``min_lr_fraction**2`` (1 %), which no intended schedule reaches for
      good (a cosine schedule is at 85 % of its peak at a quarter, a step decay by 10 at a third of training at
      100 %). Catches ``StepLR(step_size=1, gamma=0.5)`` stepped per batch (0.5**k of the start after ``k``
      batches: below 10 % at batch 4, judged at batch 8), ``ExponentialLR`` and ``MultiStepLR`` with epoch
      milestones stepped per batch. Only the parameter group that fell below first is followed for a restart (the
      groups of one scheduler move together). Warm-up does not count (the reference is the peak so far). Skipped
      when the number of planned steps is unknown (``max_steps=-1`` and ``max_epochs=-1``).
    * **clipping** (when ``trainer.gradient_clip_val`` is set): the gradient norm before clipping (the norm of all
      gradients of the optimizer for ``"norm"``, their largest absolute value for ``"value"``), computed in
      ``on_before_optimizer_step`` on the device. When at least ``clip_steps`` (90 %) of the steps are clipped and
      the median ratio of the norm to ``gradient_clip_val`` is at least ``clip_ratio`` (100), clipping is not a
      safeguard but the effective learning rate: fail for SGD-like optimizers (every update is shrunk by that
      ratio), a ``note`` for adaptive ones (Adam and kin divide the gradient by its running scale, so the clip value
      is meaningless but does little harm: nothing a person must act on).
    * **gradients** (warn): per layer (the parameters of one module), the gradient norm per step divided by the
      square root of its number of values (the RMS gradient, comparable across widths), averaged over each window.
      Warn when the largest layer RMS exceeds the smallest (non-zero) by more than ``max_grad_spread``: vanishing
      when the smallest is the earlier layer (parameter registration order), exploding when it is the later one.
      Non-finite gradient norms are counted and reported (expected under fp16 loss scaling in the first steps).
    * **dead_relu** (warn): a probe forward on a fixed training batch (eval mode, ``no_grad``, random state
      isolated, forward hooks on the ``nn.ReLU``/``nn.ReLU6`` modules only during the probe) at fit start and every
      ``check_every_n_steps`` batches; a unit (a feature, or a channel for ``(N, C, ...)`` outputs) is dead when it
      outputs 0 for every example of the batch. Warn when the dead fraction of a layer exceeds
      ``max_dead_fraction``. Functional ``F.relu`` calls are not seen.
    * **weight_decay** (when a parameter group has ``weight_decay > 0``): at each read, the norm of all trainable
      parameters and the mean loss of the window. After ``warmup_steps`` batches, if the weight norm has fallen
      below ``1 - min_shrink`` (half) of its value at fit start at each of the last three reads, and the mean
      loss of the last window is not below the first window's by ``min_rel_decrease`` (5 %), and the decay term
      alone can explain it (``prod(1 - lr * weight_decay)`` over the steps so far below ``1 - min_shrink / 2``: SGD's
      L2 and decoupled AdamW decay; an L2 term inside Adam and kin is rescaled by the optimizer, so there it is only
      suspected, when ``weight_decay >= 0.01``): weight decay shrinks the weights instead of letting them fit.
      Warn; fail when both the weight norm and the decay term fell below 10 % of the start. (A network that learns nothing for another reason, e.g.
      vanishing gradients, with a small weight decay is not blamed on the decay.)
    * **update_ratio** (warn): ``||dw|| / ||w||`` of one optimizer step per parameter tensor (CS231n: ~1e-3),
      measured with the gradients: a fixed sample of at most ``update_sample`` entries per tensor is copied (float32,
      on the device) before the step and compared after it (see :func:`~lightning_recipe.functional.optimization.
      update_ratios` for the estimator and its error, ~``1/sqrt(update_sample)``). No ratio for a tensor that is all
      zero, for a step that moved nothing (a skipped GradScaler step), for sparse gradients; embeddings are measured
      but not judged (rows move only when seen). Judged at reads 1, 2, 4, 8, ... and at the end, on each tensor's
      median over the measurements so far and, per parameter group, the median over its tensors weighted by their
      sizes (the typical entry). Warn when a group whose peak learning rate is more than ``max_update_spread``
      times below the other groups' moves more than ``max_update_spread`` times less than they do (a group with a
      wrong learning rate). A group up to 100x (the default) below the rest is a choice, not judged by this rule:
      discriminative fine-tuning puts a pretrained backbone at 1/10 to 1/100 of the head's rate, and its large
      weights then move 100x to 1000x less than the head's fresh ones. A gap of more than ``max_update_spread``
      between neighbouring tensors (sorted) that no learning rate explains (a parameter in raw units, a layer scale
      at 1e-5) is a ``note``; so is a median tensor outside [1e-5, 1e-1] (the
      ~1e-3 rule of thumb, which adaptive optimizers do not follow).
      Calibration (``benchmarks/update_ratio_calibration.py``, 69 healthy fits of ``benchmarks/corpus.py``): the
      largest gap between neighbouring tensors is 9.8x (slowest to fastest tensor up to 179x); on the healthy fits
      with parameter groups (no decay on norms, the backbone at a tenth of the head's rate) the slowest group moves at
      most 4.5x less than the rest; one layer at 1e-4x the learning rate moves 6.4e3x to 2.9e4x less. A layer at
      100x is not seen: its weights grow until its ratio is back within 2-5x of the others'. Tensors that do not move
      at all (learning rate 0) and tensors in no optimizer are left to ``ParameterUpdateCheck``.

    Gradient statistics are computed every ``grad_every_n_steps`` optimizer steps (one pass over the gradients,
    like clipping's own), kept on the device and read every ``check_every_n_steps`` batches; the learning rates are
    Python floats (tensor learning rates are read with the gradient statistics). A figure
    (``optimization_health.png``: learning rate, per-layer gradient norms, gradient norm vs clip value, weight norm
    and loss, update ratio per tensor) goes to the loggers at the end of the fit, and during it every few reads within
    the live-figure time budget (:mod:`lightning_recipe.report.live`). At each read the loggers get the series
    ``recipe/lr`` (one per parameter group, ``recipe/lr/pg<j>``, when there are several), ``recipe/grad_norm`` and
    ``recipe/grad_norm_max`` (mean and largest since the last read), ``recipe/weight_norm`` and
    ``recipe/update_ratio`` (the median tensor's ratio in that read's window): values the read already holds on the
    host. ``update_ratios`` (a row of ratios per measurement, NaN where not measured), ``update_ratio_names`` and
    ``update_ratio_stats`` (per read: the median, smallest and largest of the tensors' median ratio in that read's
    window, host floats) keep the history.

    Args:
        on_fail: ``"raise"`` or ``"warn"``.
        check_every_n_steps: batches between two reads (one host sync each); the dead-ReLU probe runs at the start
            and at reads 1, 2, 4, 8, ... (a logarithmic number of probe forwards per fit).
        grad_every_n_steps: optimizer steps between two gradient measurements.
        min_lr_fraction: smallest learning rate, relative to its peak, allowed before ``schedule_fraction``.
        schedule_fraction: fraction of the planned steps during which ``min_lr_fraction`` applies.
        clip_ratio: median ratio of the pre-clip norm to the clip value that counts as clipping by orders of
            magnitude.
        clip_steps: fraction of clipped steps that counts as "nearly every step".
        max_grad_spread: largest allowed ratio between the largest and the smallest per-layer RMS gradient.
        max_dead_fraction: largest allowed fraction of dead units in one ReLU layer.
        min_shrink: relative fall of the weight norm that counts as shrinking.
        min_rel_decrease: relative decrease of the loss that counts as fitting.
        warmup_steps: batches before the weight-decay test.
        max_update_spread: largest allowed gap between neighbouring per-tensor update ratios (sorted).
        update_sample: entries per tensor sampled for the update ratio (memory: 4 bytes each, during one step).
        figure: draw the figure at the end of the fit.
        **kwargs: overrides (``split_batch``, ``forward``, ...), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[OptimizationHealthCheck(check_every_n_steps=20)], logger=False)
    """

    def __init__(
        self,
        on_fail: OnFail = "raise",
        check_every_n_steps: int = 50,
        grad_every_n_steps: int = 10,
        min_lr_fraction: float = 0.1,
        schedule_fraction: float = 0.25,
        clip_ratio: float = 100.0,
        clip_steps: float = 0.9,
        max_grad_spread: float = 1e4,
        max_dead_fraction: float = 0.75,
        min_shrink: float = 0.5,
        min_rel_decrease: float = 0.05,
        warmup_steps: int = 50,
        max_update_spread: float = 100.0,
        update_sample: int = 256,
        figure: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(on_fail, **kwargs)
        for name, v in (("check_every_n_steps", check_every_n_steps), ("grad_every_n_steps", grad_every_n_steps),
                        ("warmup_steps", warmup_steps)):
            if not isinstance(v, int) or v < 1:
                raise RecipeConfigError(f"{self.name}: `{name}` must be a positive int, got {v!r}.")
        for name, v in (("min_lr_fraction", min_lr_fraction), ("schedule_fraction", schedule_fraction),
                        ("clip_steps", clip_steps), ("max_dead_fraction", max_dead_fraction),
                        ("min_shrink", min_shrink), ("min_rel_decrease", min_rel_decrease)):
            if not 0 < v <= 1:
                raise RecipeConfigError(f"{self.name}: `{name}` must be in (0, 1], got {v!r}.")
        if not isinstance(update_sample, int) or update_sample < 1:
            raise RecipeConfigError(f"{self.name}: `update_sample` must be a positive int, got {update_sample!r}.")
        if not clip_ratio > 1 or not max_grad_spread > 1 or not max_update_spread > 1:
            raise RecipeConfigError(f"{self.name}: `clip_ratio`, `max_grad_spread` and `max_update_spread` must be "
                                    f"> 1, got {clip_ratio!r}, {max_grad_spread!r}, {max_update_spread!r}.")
        self.check_every_n_steps = check_every_n_steps
        self.grad_every_n_steps = grad_every_n_steps
        self._reads = 0
        self.min_lr_fraction = float(min_lr_fraction)
        self.schedule_fraction = float(schedule_fraction)
        self.clip_ratio = float(clip_ratio)
        self.clip_steps = float(clip_steps)
        self.max_grad_spread = float(max_grad_spread)
        self.max_dead_fraction = float(max_dead_fraction)
        self.min_shrink = float(min_shrink)
        self.min_rel_decrease = float(min_rel_decrease)
        self.warmup_steps = warmup_steps
        self.max_update_spread = float(max_update_spread)
        self.update_sample = update_sample
        self.figure = figure
        # histories read on the host (plain values)
        self.lrs: list[list[float]] = []  # per batch: the learning rate of every parameter group
        self.grad_norms: list[float] = []  # per measured step: pre-clip norm (or max |g| for "value" clipping)
        self.layer_history: list[tuple[int, list[float]]] = []  # per read: mean RMS gradient per layer
        self.layer_names: list[str] = []
        self.weight_history: list[tuple[int, float, float]] = []  # per read: step, weight norm, mean loss
        self.dead_history: list[tuple[int, dict[str, float]]] = []
        self.losses: list[float] = []
        # per measurement: optimizer step and ||dw|| / ||w|| per tensor (NaN: not measured), with the tensors' names;
        # per read: median/min/max over the tensors of their median ratio in that read's window (host floats)
        self.update_ratios: list[tuple[int, list[float]]] = []
        self.update_ratio_names: list[str] = []
        self.update_ratio_stats: list[tuple[int, dict[str, float]]] = []
        self.concluded: dict[str, str] = {}
        self._reset_fit()

    def _reset_fit(self) -> None:
        self._batches = 0
        self._opt_steps = 0
        self._planned: Optional[float] = None
        self._track_until: Optional[float] = None  # the step up to which the schedule is judged
        self._peaks: list[float] = []
        self._min_ratio_early: Optional[tuple[float, int, int]] = None  # ratio, group, step
        self._low: Optional[tuple[int, int]] = None  # group, step: the first fall below min_lr_fraction of the peak
        self._back: Optional[int] = None  # the step at which that group came back above it (by twice that step)
        self._early_steps = self._low_steps = 0  # steps before schedule_fraction, and those with a group below
        self._lr_pending: list[tuple[int, list[Any]]] = []  # (step, learning rates) with a tensor among them
        self._layer_of: dict[int, int] = {}
        self._numel: Optional[Tensor] = None
        self._opt_cache: dict[int, tuple[list[nn.Parameter], Tensor]] = {}
        self._layer_sum: Optional[Tensor] = None
        self._layer_count = 0
        self._grad_pending: list[tuple[Tensor, Tensor, Optional[Tensor]]] = []  # (layer index, norms, max |g|)
        self._gn_pending: list[Tensor] = []
        self._loss_pending: list[Tensor] = []
        self._loss_scale: list[int] = []  # accumulate_grad_batches of each pending loss
        self._nonfinite_steps = 0
        self._nonfinite_dev: Optional[Tensor] = None
        self._relus: list[tuple[str, nn.Module]] = []
        self._probe_inputs: Any = None
        self._dead_pending: Optional[Tensor] = None
        self._weight_pending: Optional[Tensor] = None
        self._weight0: Optional[float] = None
        self._first_window: Optional[float] = None
        self._max_spread: tuple[float, str, str] = (1.0, "", "")
        self._has_wd = False
        self._adaptive = False
        self._wds: list[float] = []
        self._decay_budget: list[float] = []
        self._coupled_adaptive = False
        self._slot_of: dict[int, int] = {}  # id(parameter) -> index in update_ratio_names
        self._embedding: set[int] = set()  # slots of nn.Embedding/EmbeddingBag weights (rows updated sparsely)
        self._group_of: dict[int, int] = {}  # slot -> parameter group (counted over all optimizers)
        self._numel_of: list[int] = []  # slot -> number of entries
        self._plan_cache: dict[int, Any] = {}  # per optimizer: its update-ratio sample (`update_ratio._Plan`)
        self._sample: Optional[tuple[Any, ...]] = None  # step, the optimizer's plan, sampled values before the step
        self._ratio_pending: list[tuple[int, Any, Tensor, Tensor]] = []  # step, plan, sample before, after

    # -- setup ----------------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._reset_fit()
        planned = float(trainer.estimated_stepping_batches)
        self._planned = planned if math.isfinite(planned) and planned > 0 else None
        self._track_until = self.schedule_fraction * self._planned if self._planned is not None else None
        groups = [g for opt in trainer.optimizers for g in opt.param_groups]
        self._peaks = [float(g.get("lr", 0.0)) for g in groups]
        self._wds = [float(g.get("weight_decay", 0.0) or 0.0) for g in groups]
        self._decay_budget = [0.0] * len(groups)
        self._has_wd = any(wd > 0 for wd in self._wds)
        adaptive = [type(o).__name__ in _ADAPTIVE or any("betas" in g for g in o.param_groups) for o in trainer.optimizers]
        self._adaptive = any(adaptive)
        self._coupled_adaptive = any(
            a and any(float(g.get("weight_decay", 0.0) or 0.0) > 0 and not _decoupled(o, g) for g in o.param_groups)
            for a, o in zip(adaptive, trainer.optimizers)
        )
        names: dict[str, int] = {}
        numel: list[int] = []
        for name, p in pl_module.named_parameters():
            if not p.requires_grad:
                continue
            layer = name.rsplit(".", 1)[0] if "." in name else name
            if layer not in names:
                names[layer] = len(names)
                numel.append(0)
            self._layer_of[id(p)] = names[layer]
            numel[names[layer]] += p.numel()
        self.layer_names = list(names)
        self._start_update_ratio(trainer, pl_module)
        self._numel = torch.tensor(numel, dtype=torch.float32, device=pl_module.device)
        self._relus = [(n, m) for n, m in pl_module.named_modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
        if self._relus:
            try:
                self._probe_inputs = split_batch(first_batch(trainer), self._settings.split_batch)[0]
            except RecipeConfigError as err:
                self._skip_dead_relu(trainer, err)
        try:
            self._probe(trainer, pl_module)
        except RecipeConfigError as err:  # the probe forward gives no tensor: `forward=` is the user's to set
            if self.on_fail == "raise":
                raise RecipeConfigError(f"{self.name}: {err}") from None
            self._skip_dead_relu(trainer, err)
        self._weight_pending = _weight_norm(pl_module)

    # -- gathering (no host sync) -----------------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        self._end_sample()  # another optimizer stepped since the last sample (manual optimization, several optimizers)
        self._opt_steps += 1
        if (self._opt_steps - 1) % self.grad_every_n_steps or self._numel is None:
            return
        params, idx = self._params_of(optimizer)
        grads = [local_tensor(p.grad) for p in params]  # a DTensor's own shard (ModelParallelStrategy)
        if not grads:
            return
        # one fused norm per measurement, kept on the device; the per-layer arithmetic is batched at the next read
        top = _norms(grads, math.inf).max() if trainer.gradient_clip_algorithm == "value" else None
        self._grad_pending.append((idx, _norms(grads, 2.0), top))
        if "update_ratio" not in self.concluded:  # not under a sharded strategy (see `_start_update_ratio`)
            self._begin_sample(trainer.global_step, optimizer, params)

    def _gather_grads(self) -> None:
        """Per-layer RMS gradients and the total norm of the measurements since the last read, batched per optimizer
        (runs of measurements over the same parameters), still on the device."""
        pending, self._grad_pending = self._grad_pending, []
        assert self._numel is not None
        scale = self._numel.clamp_min(1).sqrt()
        start = 0
        while start < len(pending):
            idx = pending[start][0]
            end = start
            while end < len(pending) and pending[end][0] is idx:
                end += 1
            run = pending[start:end]
            sq = torch.stack([n for _, n, _ in run]).float().square()  # (measurements, parameters)
            layer_sq = torch.zeros(len(run), self._numel.numel(), device=sq.device).index_add_(1, idx, sq)
            finite = torch.isfinite(layer_sq).all(1, keepdim=True)
            layer_rms = torch.where(finite, layer_sq.sqrt() / scale, torch.zeros_like(layer_sq)).sum(0)
            bad = (~finite).sum()
            self._nonfinite_dev = bad if self._nonfinite_dev is None else self._nonfinite_dev + bad
            self._layer_sum = layer_rms if self._layer_sum is None else self._layer_sum + layer_rms
            self._layer_count += len(run)
            if run[0][2] is not None:  # "value" clipping: the largest |gradient|
                self._gn_pending.append(torch.stack([t for _, _, t in run]).float())
            else:
                self._gn_pending.append(layer_sq.sum(1).sqrt())
            start = end

    def _params_of(self, optimizer: Any) -> tuple[list[nn.Parameter], Tensor]:
        opt = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch one
        params = [p for g in opt.param_groups for p in g["params"]
                  if p.grad is not None and not p.grad.is_sparse and id(p) in self._layer_of]
        key = id(opt)
        cached = self._opt_cache.get(key)
        if cached is None or len(cached[0]) != len(params) or any(a is not b for a, b in zip(cached[0], params)):
            assert self._numel is not None
            idx = torch.tensor([self._layer_of[id(p)] for p in params], dtype=torch.long).to(self._numel.device)
            cached = (params, idx)
            self._opt_cache[key] = cached
        return cached

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end_sample()  # the optimizer stepped after on_before_optimizer_step (automatic or manual optimization)
        self._batches += 1
        lrs = [g.get("lr", 0.0) for opt in trainer.optimizers for g in opt.param_groups]
        if self._lr_pending or any(isinstance(lr, Tensor) for lr in lrs):
            # a tensor learning rate (e.g. `SGD(lr=torch.tensor(0.05))`, capturable optimizers) is read on the host
            # with the other periodic reads: a copy now (the scheduler may change it in place), no `float()` per step
            self._lr_pending.append((trainer.global_step,
                                     [lr.detach().clone() if isinstance(lr, Tensor) else lr for lr in lrs]))
        else:
            self._take_lrs([float(lr) for lr in lrs], trainer.global_step)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:  # rescaled by accumulate_grad_batches when read
            self._loss_pending.append(loss.detach())
            self._loss_scale.append(trainer.accumulate_grad_batches)  # it may change between epochs
        if self._batches % self.check_every_n_steps == 0:
            self._read(trainer, pl_module)
            self._judge(trainer, final=False)
            self._publish(trainer, self._live_scalars())  # live: the values this read brought to the host
            self._live_figure(trainer, "recipe/optimization_health", self._draw)

    def _take_lrs(self, lrs: list[float], step: int) -> None:
        """The learning rates of one batch, as Python floats: history, schedule tracking, decay budget."""
        self.lrs.append(lrs)
        if self._track_until is not None and (step <= self._track_until or self._awaiting_restart(step)):
            self._track_lr(lrs, step)
        if self._has_wd and len(lrs) == len(self._wds):
            for j, (lr, wd) in enumerate(zip(lrs, self._wds)):
                self._decay_budget[j] += lr * wd

    def _flush_lrs(self) -> None:
        """Read the pending tensor learning rates (one ``tolist`` per device) and take them in batch order."""
        pending, self._lr_pending = self._lr_pending, []
        if not pending:
            return
        by_device: dict[Any, list[Tensor]] = {}
        for _, lrs in pending:
            for lr in lrs:
                if isinstance(lr, Tensor):
                    by_device.setdefault(lr.device, []).append(lr)
        values = {d: iter(torch.stack([wide(t.reshape(())) for t in ts]).tolist()) for d, ts in by_device.items()}
        for step, lrs in pending:
            self._take_lrs([next(values[lr.device]) if isinstance(lr, Tensor) else float(lr) for lr in lrs], step)

    def _awaiting_restart(self, step: int) -> bool:
        """Whether the learning rate fell below ``min_lr_fraction`` of its peak and may still come back by ``step``."""
        return self._low is not None and self._back is None and step <= 2 * self._low[1]

    def _track_lr(self, lrs: list[float], step: int) -> None:
        if len(lrs) != len(self._peaks):
            return
        assert self._track_until is not None
        early = step <= self._track_until
        self._early_steps += early
        low_now = False
        for j, lr in enumerate(lrs):
            self._peaks[j] = max(self._peaks[j], lr)
            if not self._peaks[j] > 0:
                continue
            r = lr / self._peaks[j]
            if early and (self._min_ratio_early is None or r < self._min_ratio_early[0]):
                self._min_ratio_early = (r, j, step)
            low_now |= r < self.min_lr_fraction
            if early and self._low is None and r < self.min_lr_fraction:
                self._low = (j, step)
            elif self._low is not None and self._low[0] == j and self._awaiting_restart(step) and \
                    r >= self.min_lr_fraction:
                self._back = step
        self._low_steps += early and low_now

    def _skip_dead_relu(self, trainer: "pl.Trainer", err: RecipeConfigError) -> None:
        """The dead-ReLU probe cannot run (a configuration problem): skip that sub-check only, the others go on."""
        self._relus = []
        self.concluded["dead_relu"] = "skip"
        self.findings.append(Finding(f"{self.name}.dead_relu", "skip", f"{self.name}: {err}"))
        warn_once(trainer, f"{self.name}: {err}", key=f"config: {err}", category=RecipeSkipNotice)

    def _probe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._relus or self._probe_inputs is None:
            return
        fractions: list[Tensor] = []

        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.ndim >= 1:
                o = out.detach()
                o = o.reshape(-1, 1) if o.ndim == 1 else o.movedim(1, -1).reshape(-1, o.shape[1])
                fractions.append((o.amax(0) <= 0).float().mean())

        handles = [m.register_forward_hook(hook) for _, m in self._relus]
        try:
            with probe_mode(trainer, pl_module):
                run_forward(pl_module, self._probe_inputs, self._settings.forward)
        finally:
            for h in handles:
                h.remove()
        if len(fractions) == len(self._relus):  # a module called twice would be ambiguous: keep one per module
            self._dead_pending = torch.stack(fractions)

    # -- reading (one host sync per read) ---------------------------------------------------------------------------
    def _read(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        step = trainer.global_step
        self._flush_lrs()
        if self._grad_pending:
            self._gather_grads()
        if self._gn_pending:
            self.grad_norms.extend(torch.cat(self._gn_pending).tolist())
            self._gn_pending.clear()
        if self._nonfinite_dev is not None:
            self._nonfinite_steps += int(self._nonfinite_dev)
            self._nonfinite_dev = None
        if self._layer_sum is not None and self._layer_count:
            mean = (self._layer_sum / self._layer_count).tolist()
            self.layer_history.append((step, mean))
            self._layer_sum, self._layer_count = None, 0
        new_losses: list[float] = []
        if self._loss_pending:
            new_losses = [v * k for v, k in zip(read_losses(self._loss_pending), self._loss_scale)]
            self._loss_pending.clear()
            self._loss_scale.clear()
            self.losses.extend(new_losses)
            if self._first_window is None:
                finite = [v for v in new_losses if math.isfinite(v)]
                self._first_window = sum(finite) / len(finite) if finite else None
        if self._weight_pending is not None and self._weight0 is None:
            self._weight0 = float(self._weight_pending)
        w = float(_weight_norm(pl_module))
        finite_losses = [v for v in new_losses if math.isfinite(v)]
        window_loss = sum(finite_losses) / len(finite_losses) if finite_losses else math.nan
        self.weight_history.append((step, w, window_loss))
        self._read_ratios(step)
        if self._dead_pending is not None:
            self.dead_history.append((step, dict(zip((n for n, _ in self._relus), self._dead_pending.tolist()))))
            self._dead_pending = None
        self._reads += 1
        if self._reads & (self._reads - 1) == 0:  # probe at reads 1, 2, 4, 8, ...: O(log n) forwards per fit
            self._probe(trainer, pl_module)

    # -- judging --------------------------------------------------------------------------------------------------
    def _judge(self, trainer: "pl.Trainer", final: bool) -> None:
        step = trainer.global_step
        findings = [
            f for f in (
                self._judge_lr(trainer, step, final),
                self._judge_clip(trainer, step, final),
                self._judge_gradients(step, final),
                self._judge_dead(step, final),
                self._judge_wd(step, final),
                self._judge_update_ratio(step, final),
            ) if f is not None
        ]
        for f in findings:
            self.concluded[f.check.split(".")[-1]] = f.status
            if f.status == "warn":
                rank_zero_warn(f.message + (" Likely causes: " + "; ".join(f.causes) if f.causes else ""),
                               category=RecipeWarning)
        fails = [f for f in findings if f.failed]
        self.findings.extend(f for f in findings if not f.failed)
        last = None
        if fails:
            self.findings.extend(fails[:-1])
            last = fails[-1]
            if len(fails) > 1:
                last.message += " Also failed: " + "; ".join(f.check for f in fails[:-1]) + " (see the report)."
                last.causes = [c for f in fails for c in f.causes]
        self._conclude(trainer, last)

    # -- end of fit -----------------------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._numel is None:
            return
        self._end_sample()
        if (self._loss_pending or self._grad_pending or self._gn_pending or self._layer_count or self._lr_pending
                or self._ratio_pending):
            self._read(trainer, pl_module)
        self._judge(trainer, final=True)

    @override
    def _finish(self, trainer: "pl.Trainer", failed: bool = False) -> None:
        self._flush_lrs()  # no collective: the learning rates of the last batches, for the figure
        if self.__dict__.get("_drawn_n") != (len(self.lrs), len(self.grad_norms)) or not self.figures:
            self._draw(trainer)  # unless drawn live with the same data

    def _live_scalars(self) -> dict[str, Optional[float]]:
        """The series sent to the loggers at each read (host values this read brought; no sync): the learning rate
        of each parameter group (``recipe/lr``, or ``recipe/lr/pg<j>`` with several groups), the mean and largest
        gradient norm measured since the last read, the weight norm."""
        out: dict[str, Optional[float]] = {}
        if self.lrs:
            lrs = self.lrs[-1]
            out.update({"recipe/lr": lrs[0]} if len(lrs) == 1 else {f"recipe/lr/pg{j}": v for j, v in enumerate(lrs)})
        start = self.__dict__.get("_live_from", 0)
        norms = [v for v in self.grad_norms[start if start <= len(self.grad_norms) else 0:] if math.isfinite(v)]
        self._live_from = len(self.grad_norms)
        if norms:
            out.update({"recipe/grad_norm": sum(norms) / len(norms), "recipe/grad_norm_max": max(norms)})
        if self.weight_history:
            out["recipe/weight_norm"] = self.weight_history[-1][1]
        if len(self.update_ratio_stats) > self.__dict__.get("_ratio_live_from", 0):  # a new window this read
            out["recipe/update_ratio"] = self.update_ratio_stats[-1][1]["median"]
        self._ratio_live_from = len(self.update_ratio_stats)
        return out

    def _draw(self, trainer: "pl.Trainer") -> None:
        """The optimization-health figure to the loggers and ``optimization_health.png`` (at the end, and live)."""
        if not self.figure or not trainer.is_global_zero or self._dir is None or not (self.lrs or self.grad_norms):
            return
        self._drawn_n = (len(self.lrs), len(self.grad_norms))
        from lightning_recipe.report.loggers import log_figure

        try:
            fig = plot_optimization(self.lrs, self.layer_history, self.layer_names, self.grad_norms,
                                    trainer.gradient_clip_val, self.weight_history, self._planned,
                                    self.schedule_fraction, self.grad_every_n_steps,
                                    update_ratios=self.update_ratios, update_ratio_names=self.update_ratio_names)
        except Exception as err:  # a figure must never stop the fit
            rank_zero_warn(f"{self.name}: could not draw its figure: {err}", category=RecipeWarning)
            return
        path = log_figure(trainer, "recipe/optimization_health", fig, trainer.global_step, self._dir)
        if path and path not in self.figures:
            self.figures.append(path)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            # a checkpoint restored after this brings back `concluded`
            self.concluded = {}
            self.lrs, self.grad_norms, self.layer_history, self.losses = [], [], [], []
            self.weight_history, self.dead_history = [], []
            self.update_ratios, self.update_ratio_stats = [], []
            self._reads = self._live_from = self._ratio_live_from = 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"concluded": dict(self.concluded)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.concluded = dict(state_dict.get("concluded", {}))
