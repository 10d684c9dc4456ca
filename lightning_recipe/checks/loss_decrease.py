"""``LossDecreaseCheck``: the training loss must be finite, must not diverge, and must decrease."""

from __future__ import annotations

import math
import re
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_recipe._core.base import OnFail, RecipeCheck
from lightning_recipe._core.conventions import planned_batches, read_losses, several_optimizers
from lightning_recipe._core.loss_guess import _LossGuess
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding
from lightning_recipe.functional.loss_decrease import above_prior_test, decrease_test, diverged, plateau_test, trend

_NONFINITE = [
    "learning rate too high (the loss exploded to inf/NaN)",
    "NaN/Inf in the inputs or targets (missing values in features; division by zero in preprocessing)",
    "log/sqrt/division of a non-positive value inside the loss or the model",
]
_DIVERGE = ["learning rate too high", "loss sign flipped (maximising)", "a bug that feeds a growing input"]
_BLOWUP = [
    "learning rate too high (adaptive optimisers such as RMSprop and Adam take full-size steps from the first one)",
    "no learning-rate warm-up: the first steps, with the optimiser's statistics not yet settled, are the largest",
    "no gradient clipping: one large gradient throws the weights far away (set the Trainer's `gradient_clip_val`)",
]
_FLAT = [
    "learning rate too low, or decayed to zero by the schedule",
    "weight decay or gradient clipping so strong that nothing moves",
    "frozen or unused parameters (requires_grad=False, the optimizer built before the layers were swapped)",
    "optimizer.step()/zero_grad() missing in manual optimization",
    "regression targets on a large scale (e.g. mean 150, std 77): standardise the targets or raise the learning rate",
]
_PLATEAU = [
    "labels shuffled independently of the inputs",
    "inputs zeroed or constant (the data pipeline feeds the wrong tensor)",
    "the model ignores its input",
    "learning stalled: learning rate too low or weight decay too strong",
    "regression targets on a large scale (e.g. mean 150, std 77): standardise the targets or raise the learning rate",
]
_ABOVE_PRIOR = [
    "learning rate too high: every step overshoots, so the network stays worse than a constant prediction",
    "the loss is computed on outputs it does not fit (e.g. probabilities fed to a logits loss, targets misaligned "
    "with the outputs)",
    "a term added to the loss in training_step that grows during training (an annealed KL or penalty weight) and "
    "outweighs the data term",
]
_BELOW_FLOOR = ["the loss sign is flipped: training_step returns -loss and the optimiser maximises the loss"]


class LossDecreaseCheck(_LossGuess, RecipeCheck):
    """The training loss must be finite, must not diverge, must decrease, and must not plateau at the label prior.

    Losses are kept as a list of detached tensors on the device (no host sync per step) and read once every
    ``check_every_n_steps`` training batches, at epoch end and at the end of training. At each read:

    * **finite**: a NaN/Inf loss fails (at the read following it).
    * **above its floor**: a loss below the smallest value the loss function can take (0 for the cross-entropies,
      MSE and L1) fails: the sign is flipped. Set ``loss_floor=None`` if your training_step subtracts terms.
    * **not diverging**: every one of the last ``k`` losses above ``divergence_ratio`` times the reference's distance
      to the floor fails; the reference is the larger of the first loss and the loss of the constant prediction
      (``k = min(window, max(3, steps // 4))``: a single spike is not divergence).
    * **no transient blow-up** (warn, in both modes: the fit goes on): two consecutive losses above ``blowup_ratio``
      (10) times that reference's distance to the floor, at any step, even if the loss comes back down later. A loss
      that explodes and recovers usually leaves the network damaged (dead units, saturated outputs, a worse region)
      and settles worse than a stable run, which neither the divergence test (it recovered) nor the comparison with
      the prior (it may settle below it) sees. A mini-batch of a constant predictor averages at most its largest
      per-example loss, so batch composition alone stays far below ten times the prior unless the classes are
      very imbalanced, and then it takes two such batches in a row; a healthy run's loss goes down from its first
      value. The losses are the ones already read every ``check_every_n_steps`` batches (no further sync).
    * after ``warmup_steps`` batches, once: **decreasing**: the last window's mean must be below the first window's
      by ``min_rel_decrease`` of its distance to the floor, or significantly (``z`` standard errors); the windows
      have ``window`` batches.
    * after ``warmup_steps``, at every read after the decrease test: **not above the prior**: the means of the last two
      windows both above the loss of a constant prediction (the larger of the best one's and the untrained network's,
      the expected initial loss) by more than ``plateau_rtol`` of its distance to the floor and ``z`` standard errors,
      with no significant downward trend over them and the last not significantly below the other, fail (only when
      the first loss was within ``divergence_ratio`` of that constant prediction's, measured from the floor: a
      training_step that adds auxiliary or penalty terms to the loss starts far above it and is not judged): a
      network that stays worse than a constant prediction, after its loss went down (from an explosion, say), is not
      learning (a learning rate that overshoots at every step).
    * after ``warmup_steps``, at every read: **no plateau at the prior**: the means of the last two windows both
      within ``plateau_rtol`` (or ``z`` standard errors) of the loss of the best constant prediction (label entropy,
      target variance, ...) *and* flat (the least-squares slope of the last ``window + max(window, warm-up // 2)``
      losses, and of the second half of the losses so far when it is longer, not significantly negative at ``z``: a
      slow learner crosses the prior level on its way down) *and*, flat as it is, the mean of those losses within the same band
      (a tighter estimate of the level than one window: with count data or heavy-tailed targets a window's mean swings
      by more than a model's gain over the prior) fails with "the model learned only the label prior". A slow learner
      that passes through the prior level on its way down is not a plateau, nor one window of a noisy loss (heavy-
      tailed targets, batches of a few examples) whose mean an outlier batch pushed up to the prior level.
    * at each of the first ``early_epochs`` epoch ends: the epoch mean must not be significantly above the previous
      one.

    Under manual optimization with several optimizers (a GAN, an actor-critic) the loss training_step returns is one
    player's objective, which stays near an equilibrium in healthy training: the trend tests above (decrease, plateau,
    above the prior, divergence, blow-up, early epochs) then give a ``note`` each, once; a non-finite loss and one
    below the loss's minimum still fail.

    The untrained network's loss is the loss of its constant prediction, the head bias; when the head's output is
    transformed before the loss (``tanh`` scaled to the target range, ``softplus``, a residual after the head), the
    bias is not that constant and the loss of the model's actual output on the probe batch at the start of training
    (probe mode) takes its place. The best constant prediction's loss (the plateau test) does not depend on the bias.

    The figure (``recipe/loss_curve``) draws the training loss per batch, the two reference losses, and the
    validation loss when the fit has a validation loop: the value of the first logged metric named like a validation
    loss (``val_loss``, ``val/loss``, ``validation_loss``, ``valid_loss``, ``loss/val``, then any key with ``val``
    and ``loss`` in it) in ``trainer.callback_metrics``, kept as a tensor at each validation end (no host sync; the
    values are read once, when the figure is drawn). The check itself judges the training loss only. A validation
    loop that logs no such metric gets a legend entry saying so, and no line.

    At each read the loggers get ``recipe/loss_to_constant``, the mean of the losses just read over the loss of the
    best constant prediction, both measured from the floor (1: no better than the label prior; 0: the floor), and the
    loss curve (``loss_curve.png``) is redrawn every few reads within the live-figure time budget
    (:mod:`lightning_recipe.report.live`), and at the end of the fit.

    The warm-up adapts to the run: ``max(30, min(warmup_steps, planned_batches // 2))``, so a short fit (a small
    data set, a few epochs) is still judged, at half its length. A fit shorter than that gets a ``skip`` finding for
    the decrease and plateau tests.

    Args:
        on_fail: ``"raise"`` or ``"warn"``.
        check_every_n_steps: batches between two reads of the kept losses (one host sync each).
        warmup_steps: batches before the decrease and plateau tests.
        window: batches averaged at each end of the curve (default ``clamp(warmup_steps // 5, 5, 50)``).
        min_rel_decrease: smallest relative decrease that counts without a significance test.
        divergence_ratio: growth (relative to the floor) that counts as divergence.
        plateau_rtol: band around the prior loss, relative to its distance to the floor.
        z: standard errors for the significance tests.
        early_epochs: epochs whose mean loss must go down.
        loss_floor: ``"auto"`` (0 for the known losses, none for others), a number, or ``None``.
        blowup_ratio: growth (relative to the floor) of two consecutive losses over the reference that counts as a
            blow-up; ``None`` turns the test off.
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[LossDecreaseCheck(check_every_n_steps=20)], logger=False)
    """

    def __init__(
        self,
        on_fail: OnFail = "raise",
        check_every_n_steps: int = 50,
        warmup_steps: int = 100,
        window: Optional[int] = None,
        min_rel_decrease: float = 0.05,
        divergence_ratio: float = 2.0,
        plateau_rtol: float = 0.05,
        z: float = 3.0,
        early_epochs: int = 3,
        loss_floor: Union[float, None, Literal["auto"]] = "auto",
        blowup_ratio: Optional[float] = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(on_fail, **kwargs)
        for name, v in (("check_every_n_steps", check_every_n_steps), ("warmup_steps", warmup_steps)):
            if not isinstance(v, int) or v < 1:
                raise RecipeConfigError(f"{self.name}: `{name}` must be a positive int, got {v!r}.")
        if blowup_ratio is not None and not blowup_ratio > 1:
            raise RecipeConfigError(f"{self.name}: `blowup_ratio` must be > 1 or None, got {blowup_ratio!r}.")
        self.blowup_ratio = blowup_ratio
        self.check_every_n_steps = check_every_n_steps
        self.warmup_steps = warmup_steps
        self._window_arg = window
        self._warmup = warmup_steps  # effective warm-up of this fit, set at train start from the planned length
        self.window = window or max(5, min(50, warmup_steps // 5))
        self.min_rel_decrease = min_rel_decrease
        self.divergence_ratio = divergence_ratio
        self.plateau_rtol = plateau_rtol
        self.z = z
        self.early_epochs = early_epochs
        self.loss_floor = loss_floor
        self.losses: list[float] = []
        self.epoch_ends: list[int] = []  # number of losses at each epoch end
        self.decrease_checked = False
        self.prior_loss: Optional[float] = None
        self.expected_initial_loss: Optional[float] = None
        self._floor: Optional[float] = None
        self._pending: list[Tensor] = []  # detached losses since the last read, on the device
        self._stopped = False
        self._initial_done = False
        self._accumulate = 1
        self._reported: set[str] = set()
        self._val: list[tuple[int, Any]] = []  # (training losses so far, logged validation loss) per validation run
        self._val_key: Optional[str] = None
        self._val_runs = 0

    # -- hooks ----------------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._floor = None if self.loss_floor == "auto" else self.loss_floor  # type: ignore[assignment]
        self._adversarial = several_optimizers(trainer, pl_module)
        self._warmup = _effective_warmup(self.warmup_steps, trainer)
        self.window = self._window_arg or max(5, min(50, self._warmup // 5))
        try:
            from lightning_recipe._core.context import get_context

            ctx = get_context(trainer, pl_module, self._settings)
        except RecipeConfigError as err:
            self.findings.append(Finding(f"{self.name}.plateau", "skip", f"{self.name}: no label prior to compare "
                                         f"with ({err}); the finite/divergence/decrease tests still run."))
            return
        if self.loss_floor == "auto":
            self._floor = None if ctx.spec.inferred else ctx.spec.floor
        try:
            self.prior_loss = ctx.prior_loss()
        except Exception as err:  # the prior is a diagnosis aid: never stop training for it
            self.findings.append(Finding(f"{self.name}.plateau", "skip", f"{self.name}: could not compute the prior "
                                         f"loss ({err}); the finite/divergence/decrease tests still run."))
        self._ctx = ctx

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        ctx = getattr(self, "_ctx", None)
        if not self._initial_done and ctx is not None and not self.losses:
            self._initial_done = True
            try:
                # the untrained network's loss: at its constant prediction (the head bias), or, when the head's
                # output is transformed before the loss, its actual output on the probe batch
                self.expected_initial_loss = (ctx.constant_loss(ctx.current_constant()) if ctx.head_error is not None
                                              or ctx.bias_is_constant() else ctx.actual_loss()[0])
            except Exception:
                self.expected_initial_loss = None
            if ctx.spec.inferred:  # the head, where its output is the model's (not transformed after it)
                head = ctx.head if ctx.head_error is None and ctx.head_how.startswith("output identical") else None
                self._tap_guess(pl_module, batch, head)
        self._retire("on_train_batch_start")  # only the first batch of a fit

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stopped:
            self._retire("on_train_batch_end")
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if "_guess_tap" in self.__dict__:  # the first step of a fit with a guessed loss
            self._check_guess(trainer, loss)
        if not isinstance(loss, Tensor) or loss.numel() != 1:  # manual optimization may return anything
            return
        self._accumulate = trainer.accumulate_grad_batches
        # kept on the device, no sync; stacked and rescaled by accumulate_grad_batches when read (a list append costs
        # ~1 us, a write into a preallocated buffer ~15 us on a CPU)
        self._pending.append(loss.detach())
        if len(self._pending) == self.check_every_n_steps:
            self._flush_and_check(trainer)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._stopped:
            return
        self._flush_and_check(trainer)
        self.epoch_ends.append(len(self.losses))
        self._conclude(trainer, self._several_objectives(self._epoch_finding(trainer)))

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._stopped:
            return
        self._flush_and_check(trainer)
        finding: Optional[Finding] = None
        if not self.decrease_checked:
            n = len(self.losses)
            finding = Finding(f"{self.name}.decrease", "skip", f"{self.name}: only {n} training steps with a loss, fewer "
                              f"than the warm-up of {self._warmup} (warmup_steps={self.warmup_steps}, at most half the planned batches, "
                              "at least 30): too few to judge whether the loss decreases.")
        elif not any(f.failed for f in self.findings):
            first, last = self.losses[: self.window], self.losses[-self.window :]
            finding = Finding(self.name, "pass", f"{self.name}: the loss went from {_mean(first):.4g} (first "
                              f"{len(first)} steps) to {_mean(last):.4g} (last {len(last)}); prior loss "
                              f"{_fmt(self.prior_loss)}.", _mean(last), self.prior_loss, trainer.global_step)
        self._conclude(trainer, finding)

    # -- checks ---------------------------------------------------------------------------------------------------
    def _flush(self) -> list[float]:
        if not self._pending:
            return []
        new = read_losses(self._pending)  # the one host sync
        if self._accumulate != 1:  # Lightning divides the returned loss by accumulate_grad_batches
            new = [v * self._accumulate for v in new]
        self._pending = []
        self.losses.extend(new)
        return new

    def _flush_and_check(self, trainer: "pl.Trainer") -> None:
        new = self._flush()
        blowup = self._several_objectives(self._blowup(len(new), trainer.global_step) if new else None)
        if blowup is not None:  # a warning in both modes; local (no collective): the fit goes on on every rank
            blowup.message += f"\n  learning rate now: {_learning_rates(trainer)}"
            self.findings.append(blowup)
            if blowup.status == "warn":
                rank_zero_warn(blowup.message + "\nLikely causes:\n" + "\n".join(f"  - {c}" for c in blowup.causes),
                               category=RecipeWarning)
        finding = self._unconfirmed(self._several_objectives(self._evaluate(new, trainer.global_step) if new else None))
        if finding is not None and finding.failed and finding.check != f"{self.name}.floor":
            finding.message += f"\n  learning rate now: {_learning_rates(trainer)}"
        if finding is not None and finding.failed:
            if finding.check in self._reported:  # warn mode: each sub-check warns once
                finding = None
            else:
                self._reported.add(finding.check)
                self._stopped = self.on_fail == "raise"
        self._conclude(trainer, finding)
        if new:  # live: the values just read (no further sync), the figure every few reads within its time budget
            self._publish(trainer, {"recipe/loss_to_constant": self._to_constant(new)})
            self._live_figure(trainer, "recipe/loss_curve", self._draw)

    def _to_constant(self, new: list[float]) -> Optional[float]:
        """The mean of the losses just read over the loss of the best constant prediction, both measured from the
        floor: 1 = no better than predicting the label prior, 0 = the floor (``None`` without a prior)."""
        floor = self._floor or 0.0
        if self.prior_loss is None or not self.prior_loss - floor > 0:
            return None
        return (_mean(new) - floor) / (self.prior_loss - floor)

    def _reference(self) -> float:
        """The larger of the first loss and the losses of the constant predictions (the best one, the untrained one)."""
        refs = [self.losses[0]] + [v for v in (self.expected_initial_loss, self.prior_loss) if v is not None]
        return max((v for v in refs if math.isfinite(v)), default=math.nan)

    def _blowup(self, n_new: int, step: int) -> Optional[Finding]:
        """A warning when two consecutive losses, among the ``n_new`` just read and the one before them, rose above
        ``blowup_ratio`` times the reference (measured from the floor), once per fit."""
        name = f"{self.name}.blowup"
        losses, ref = self.losses, self._reference()
        if self.blowup_ratio is None or name in self._reported or not math.isfinite(ref):
            return None
        start = max(1, len(losses) - n_new)
        pairs = [min(losses[i - 1], losses[i]) for i in range(start, len(losses))]
        high = max((v for v in pairs if math.isfinite(v)), default=None)
        if high is None or not diverged(ref, torch.tensor([high]), self._floor, self.blowup_ratio)["diverged"]:
            return None
        self._reported.add(name)
        finite = [(v, i) for i, v in enumerate(losses) if math.isfinite(v)]
        peak, at = max(finite)
        d = diverged(ref, torch.tensor([peak]), self._floor, self.blowup_ratio)
        recent = _mean(losses[-self.window :])
        return Finding(name, "warn", f"{self.name}: the loss blew up: it rose to {peak:.6g} at training batch {at} of "
                       f"this fit, x{d['growth']:.3g} the reference {ref:.6g} (the larger of the first loss "
                       f"{losses[0]:.6g} and the loss of the constant prediction, {_fmt(self.prior_loss)}), measured "
                       f"from the floor; limit x{self.blowup_ratio:g} at two consecutive batches (read at global step "
                       f"{step}). The mean of the last {min(self.window, len(losses))} losses is {recent:.6g}. Even when "
                       "the loss comes back down, a blow-up like this can leave the network damaged (dead units, "
                       "saturated outputs) and worse than a stable run.\n  HINT: lower the learning rate, add a "
                       "warm-up or set the Trainer's `gradient_clip_val`; pass `blowup_ratio=` to change the limit "
                       "(None turns this test off).", peak, ref, step, list(_BLOWUP),
                       {**d, "batch": at, "ratio": self.blowup_ratio, "consecutive_low": high, "recent_mean": recent})

    def _evaluate(self, new: list[float], step: int) -> Optional[Finding]:
        losses, w = self.losses, self.window
        start = len(losses) - len(new)
        bad = next((i for i, v in enumerate(new) if not math.isfinite(v)), None)
        if bad is not None:
            finite = [f"{v:.4g}" for v in losses[max(0, start + bad - 5) : start + bad]]
            return Finding(f"{self.name}.finite", "fail", f"{self.name}: the training loss became {new[bad]} at "
                           f"training batch {start + bad} of this fit (losses are read every {self.check_every_n_steps} "
                           f"batches; read at global step {step}). The losses before it: {', '.join(finite) or 'none'}."
                           "\n  HINT: lower the learning rate, set the Trainer's `gradient_clip_val`, and check the "
                           "inputs and targets with torch.isfinite.", new[bad], None, step, list(_NONFINITE))
        if self._floor is not None:
            low = min(new)
            if low < self._floor - 1e-6 * max(1.0, abs(self._floor)):
                return Finding(f"{self.name}.floor", "fail", f"{self.name}: the training loss is {low:.6g}, below "
                               f"{self._floor:g}, the smallest value this loss can take. HINT: if training_step "
                               "subtracts terms on purpose, pass `loss_floor=None`.", low, self._floor, step,
                               list(_BELOW_FLOOR))
        k = min(w, max(3, len(losses) // 4))
        if len(losses) >= 2 * k:
            ref = self._reference()
            d = diverged(ref, torch.tensor(losses[-k:]), self._floor, self.divergence_ratio)
            if d["diverged"]:
                return Finding(f"{self.name}.diverge", "fail", f"{self.name}: the loss diverges: each of the last {k} "
                               f"steps is at least {d['last']:.6g}, x{d['growth']:.3g} the reference {ref:.6g} (the "
                               "larger of the first loss and the loss of the constant prediction), measured from the "
                               f"floor; limit x{self.divergence_ratio:g}.", d["last"], ref, step, list(_DIVERGE), d)
        if len(losses) < self._warmup or len(losses) < 2 * w:
            return None
        last = torch.tensor(losses[-w:])
        plateau = None
        if self.prior_loss is not None and math.isfinite(self.prior_loss):
            plateau = plateau_test(last, self.prior_loss, self._floor, self.plateau_rtol, self.z)
        if not self.decrease_checked:
            self.decrease_checked = True
            d = decrease_test(torch.tensor(losses[:w]), last, self._floor, self.min_rel_decrease, self.z)
            base0 = self._floor if self._floor is not None else 0.0
            converged = (self.prior_loss is not None and math.isfinite(self.prior_loss) and self.prior_loss > base0
                         and d["first"] - base0 <= 0.5 * (self.prior_loss - base0))
            if not d["decreased"] and converged:
                return Finding(f"{self.name}.decrease", "note", f"{self.name}: the loss is flat after {len(losses)} "
                               f"steps ({d['first']:.6g} -> {d['last']:.6g}) but was already at "
                               f"{(d['first'] - base0) / (self.prior_loss - base0):.0%} of the constant prediction's "
                               f"({self.prior_loss:.6g}) in its first {w} steps: it converged early (a closure "
                               "optimizer such as LBFGS, a model solved in its first steps).", d["last"], d["first"],
                               step, [], d)
            if not d["decreased"]:
                at_prior = plateau is not None and plateau["plateau"]
                diag = (f" It sits at the loss of the best constant prediction ({self.prior_loss:.6g}): the model "
                        "learned only the label prior." if at_prior else "")
                return Finding(f"{self.name}.decrease", "fail", f"{self.name}: the loss did not decrease after "
                               f"{len(losses)} steps: first {w} steps {d['first']:.6g}, last {w} steps {d['last']:.6g} "
                               f"(relative decrease {d['relative_decrease']:.3g} < {self.min_rel_decrease:g}, not "
                               f"significant at z={self.z:g}).{diag}\n  HINT: if the model is meant to learn this "
                               "slowly, raise `warmup_steps` or lower `min_rel_decrease`.", d["last"], d["first"], step,
                               (list(_PLATEAU[:3]) if at_prior else []) + list(_FLAT), {**d, "plateau": plateau})
        reference = max(self.prior_loss or 0.0, self.expected_initial_loss or -math.inf)
        # only when the training loss is the loss the prior is computed with: the first loss agrees with the
        # constant prediction's (a training_step that adds auxiliary or penalty terms starts far above it)
        base = self._floor if self._floor is not None else 0.0
        comparable = math.isfinite(losses[0]) and losses[0] - base <= self.divergence_ratio * abs(reference - base)
        if plateau is not None and math.isfinite(reference) and comparable:
            above = above_prior_test([losses[-2 * w : -w], losses[-w:]], reference, self._floor,
                                     self.plateau_rtol, self.z)
            if above["above"]:
                return Finding(f"{self.name}.above_prior", "fail", f"{self.name}: after {len(losses)} steps the loss "
                               f"({above['means'][0]:.6g}, then {above['means'][1]:.6g} over the last two windows of {w} "
                               f"steps) stays ABOVE {reference:.6g}, the loss of a constant prediction (the best one, "
                               f"{self.prior_loss:.6g}, and the untrained network's, {_fmt(self.expected_initial_loss)}), "
                               "and is not coming down: the network predicts worse than knowing nothing about the "
                               "input.", above["recent"], reference, step, list(_ABOVE_PRIOR), above)
        span = max(w, self._warmup // 2)
        if plateau is not None and plateau["plateau"] and len(losses) >= w + span:
            before = plateau_test(torch.tensor(losses[-2 * w : -w]), self.prior_loss, self._floor, self.plateau_rtol,
                                  self.z)
            plateau["previous_window"] = before["recent"]
            if not before["plateau"]:
                return None  # one window at the prior level: noise, unless the next one is there too
            # a plateau is flat: a slow learner passing through the prior level is still going down
            slope = trend(losses[-(w + span) :])
            plateau["trend"] = slope
            if slope["t"] < -self.z:
                return None
            # a slow learner crossing the prior level: still going down over the second half of the fit so far
            half = losses[len(losses) // 2 :]
            if len(half) > w + span:
                plateau["trend_half"] = trend(half)
                if plateau["trend_half"]["t"] < -self.z:
                    return None
            # flat over the span: its mean estimates the level more tightly than one window's (the batch-to-batch
            # spread of count data or heavy-tailed targets hides a small gain over the prior within a window)
            level = plateau_test(torch.tensor(losses[-(w + span) :]), self.prior_loss, self._floor,
                                 self.plateau_rtol, self.z)
            plateau["span_level"] = level
            if not level["plateau"]:
                return None
            return Finding(f"{self.name}.plateau", "fail", f"{self.name}: after {len(losses)} steps the loss "
                           f"{plateau['recent']:.6g} is at the loss of the best input-independent (constant) prediction "
                           f"{self.prior_loss:.6g} (± {plateau['band']:.3g}), and flat: the model learned only the label "
                           "prior. InputDependenceCheck tells whether the model uses its input at all.",
                           plateau["recent"], self.prior_loss, step, list(_PLATEAU), plateau)
        return None

    def _epoch_finding(self, trainer: "pl.Trainer") -> Optional[Finding]:
        ends = self.epoch_ends
        e = len(ends) - 1
        if e < 1 or e > self.early_epochs or len(self.losses) < self._warmup:
            return None
        prev = torch.tensor(self.losses[(ends[e - 2] if e >= 2 else 0) : ends[e - 1]])
        cur = torch.tensor(self.losses[ends[e - 1] : ends[e]])
        if prev.numel() < 2 or cur.numel() < 2:
            return None
        d = decrease_test(prev, cur, self._floor, 0.0, self.z)
        se = d["se"]
        if d["last"] - d["first"] > self.z * se and se > 0:
            return Finding(f"{self.name}.epochs", "fail", f"{self.name}: the mean training loss went UP from epoch "
                           f"{e - 1} ({d['first']:.6g}) to epoch {e} ({d['last']:.6g}), beyond {self.z:g} standard errors, "
                           "in an early epoch.", d["last"], d["first"], trainer.global_step,
                           ["learning rate too high", "learning-rate schedule restarting or warming up too far"], d)
        return None

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # for the figure only: the logged validation loss, kept as a tensor (read once, when the figure is drawn)
        if trainer.sanity_checking or getattr(trainer.state, "fn", None) != "fit":
            return
        self._val_runs += 1
        key = _val_loss_key(trainer.callback_metrics, self._val_key)
        if key is None:
            return
        self._val_key = key
        value = trainer.callback_metrics[key]
        value = value.detach().clone() if isinstance(value, Tensor) else value
        self._val.append((len(self.losses) + len(self._pending), value))

    # -- end of fit -----------------------------------------------------------------------------------------------
    @override
    def _finish(self, trainer: "pl.Trainer", failed: bool = False) -> None:
        tap = self.__dict__.pop("_guess_tap", None)
        for handle in tap[0] if tap is not None else []:  # the first step did not end: the user's modules are left
            handle.remove()                                 # without the hooks
        if failed:
            self._flush()  # no collectives on the exception path
        if self.__dict__.get("_drawn_n") != len(self.losses) or not self.figures:  # not drawn live at this point
            self._draw(trainer)

    def _draw(self, trainer: "pl.Trainer") -> None:
        """The loss curve to the loggers and ``loss_curve.png`` (at the end of the fit, and live)."""
        if not trainer.is_global_zero or not self.losses or self._dir is None:
            return
        self._drawn_n = len(self.losses)
        from lightning_recipe.report.loggers import log_figure
        from lightning_recipe.report.plotting import plot_loss_curve

        logged = [v for _, v in self._val]
        vals = (read_losses(logged) if logged and all(isinstance(v, Tensor) for v in logged)  # one host sync
                else [float(v) for v in logged])
        label = (f"validation loss (`{self._val_key}`, logged)" if vals else
                 "validation ran; no `val_loss`-like metric logged" if self._val_runs else "validation loss")
        fig = plot_loss_curve(self.losses, self.expected_initial_loss, self.prior_loss, self.epoch_ends,
                              val_steps=[n - 1 for n, _ in self._val], val_losses=vals, val_label=label)
        path = log_figure(trainer, "recipe/loss_curve", fig, trainer.global_step, self._dir)
        if path and path not in self.figures:
            self.figures.append(path)

    @override
    def state_dict(self) -> dict[str, Any]:
        # the pending losses are saved but stay pending: the next read still checks them
        pending = [v * self._accumulate for v in read_losses(self._pending)] if self._pending else []
        # the validation losses of the figure, as floats (one read per checkpoint, not per step)
        val = [(n, float(v)) for n, v in self._val]
        return {"losses": self.losses + pending, "epoch_ends": list(self.epoch_ends), "decrease_checked":
                self.decrease_checked, "expected_initial_loss": self.expected_initial_loss, "val": val,
                "val_key": self._val_key}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = list(state_dict.get("losses", []))
        self._pending = []  # losses pending at the save are in `losses`
        self.epoch_ends = list(state_dict.get("epoch_ends", []))
        self.decrease_checked = bool(state_dict.get("decrease_checked", False))
        self.expected_initial_loss = state_dict.get("expected_initial_loss")
        self._val = [(int(n), v) for n, v in state_dict.get("val", [])]
        self._val_key = state_dict.get("val_key")


def _learning_rates(trainer: "pl.Trainer") -> str:
    """The optimizers' current learning rates, as text (host values: no sync)."""
    lrs = [g.get("lr") for opt in trainer.optimizers for g in opt.param_groups]
    lrs = [float(v) for v in lrs if isinstance(v, (int, float))]
    return ", ".join(f"{v:.3g}" for v in lrs[:4]) if lrs else "unknown"


def _effective_warmup(warmup_steps: int, trainer: "pl.Trainer") -> int:
    """``max(30, min(warmup_steps, planned_batches // 2))``; ``warmup_steps`` when the length is unknown."""
    planned = planned_batches(trainer)
    if planned is None:
        return warmup_steps
    return int(max(min(30, warmup_steps), min(warmup_steps, planned // 2)))


_VAL_KEYS = ("val_loss", "val/loss", "validation_loss", "validation/loss", "valid_loss", "valid/loss", "loss/val",
             "val_loss_epoch", "val/loss_epoch")


def _val_loss_key(metrics: dict[str, Any], previous: Optional[str] = None) -> Optional[str]:
    """The logged metric that holds the validation loss: ``previous`` if still there, a usual name, else the first
    key with a word starting ``val`` and ``loss`` in it (not a step-level ``_step`` value, not the recipe's own
    ``recipe/...`` scalars); ``None`` when none is logged.

    Example::

        >>> _val_loss_key({"train_loss": 1, "val/loss": 2}), _val_loss_key({"valid_ce_loss": 1})
        ('val/loss', 'valid_ce_loss')
        >>> _val_loss_key({"interval_loss": 1, "recipe/generalization/val_loss": 2}), _val_loss_key({})
        (None, None)
    """
    if previous is not None and previous in metrics:
        return previous
    for key in _VAL_KEYS:
        if key in metrics:
            return key
    return next((k for k in metrics if re.search(r"(^|[^a-z])val", k.lower()) and "loss" in k.lower()
                 and not k.endswith("_step") and not k.startswith("recipe/")), None)


def _mean(x: list[float]) -> float:
    return sum(x) / len(x) if x else float("nan")


def _fmt(x: Optional[float]) -> str:
    return "unknown" if x is None else f"{x:.4g}"
