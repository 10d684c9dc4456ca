"""``InitialLossCheck``: the recipe's "verify loss @ init"."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_recipe._core.base import OnFail, _OnceCheck
from lightning_recipe._core.conventions import find_loss, probe_mode, run_forward, split_batch
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding
from lightning_recipe.functional.constants import constant_loss, noise_band
from lightning_recipe.functional.data import input_target_correlation
from lightning_recipe.report.loggers import log_scalars

_TRACKS_INPUT = 0.3  # |correlation| of inputs and targets above which an untrained output may carry the targets
_HIGH_CAUSES = [
    "last layer initialised too large (scale the head's weights down, e.g. by 0.01, or zero them)",
    "inputs not scaled (standardise features; raw pixel values 0-255)",
    "softmax/sigmoid applied before a loss that expects logits (CrossEntropyLoss, BCEWithLogitsLoss)",
    "wrong loss for the task, or the loss was guessed wrong (pass `loss_fn=`)",
]
_LOW_CAUSES = [
    "label leakage: the target (or a function of it) is among the inputs",
    "a pretrained head: the model already knows the task (then this is expected: pass HeadBiasInit(skip=True) and "
    "leave InitialLossCheck out: `strict(exclude=[\"InitialLossCheck\"])`)",
    "the loss sign is flipped (training_step returns -loss: the optimiser maximises the loss)",
    "the loss was guessed wrong (pass `loss_fn=`)",
]


class InitialLossCheck(_OnceCheck):
    """The first training step's loss must match the loss of the constant prediction at the head's current bias.

    The expected value is the user's loss evaluated with every output equal to the head bias, on the targets of the
    first batch: ``log C`` for a softmax over ``C`` classes at zero bias, the label cross-entropy after
    :class:`HeadBiasInit`, ``E[y²]`` (zero bias) or ``Var(y)`` (bias at the mean) for MSE. The measured value is the
    loss the user's own ``training_step`` returned (``outputs["loss"]`` times ``accumulate_grad_batches``).

    Tolerance, derived from the loss and the labels rather than fixed: a healthy network starts at its bias plus
    input-dependent deviations that carry no information about the labels. The check simulates that, drawing
    outputs ``bias + N(0, s²)`` on the first batch's targets (private generator), and

    * fails **high** when the loss exceeds the mean of that simulated loss at ``s = max_output_std`` by more than
      ``z`` of its standard deviations (initial logits too large: bad init, unscaled inputs, a double softmax);
    * fails **low** when the loss is below the expected value by more than ``z`` standard deviations of the
      simulated loss at ``s`` = the measured spread of the initial outputs (clipped to ``[0.5, max_output_std]``):
      the model knows something about the labels before training (leakage, a pretrained head, a flipped sign).

    Targets that pair up, value for value, with the inputs and correlate with them (``|r| >= 0.3``: an autoencoder's
    targets are its inputs, a denoiser's nearly so, a mask thresholded from the image) are not judged low: an
    untrained network's output is a function of the input, so it already carries some of the targets.

    When the loss was inferred from the targets (no loss module on the LightningModule and no ``loss_fn=``), the two
    tests above give a ``warn`` instead: ``training_step`` may compute a loss of its own (a focal loss, a sum instead
    of a mean) whose numbers differ from the guess. A non-finite first loss, or one below the loss's minimum, fails
    either way. The same for ``KLDivLoss`` (distillation: ``training_step`` usually divides the logits by a
    temperature and multiplies the loss by its square).

    When a loss module is held and ``training_step`` returns another value than its call in the first step (the call
    combined with a distillation term, a penalty or sample weights: the calls are recorded by a forward hook on the
    loss module, removed at the end of that step), the first call's value is judged against the constant
    prediction's loss, and the returned value only for what it shows by itself (non-finite, below the loss's
    minimum); the finding names both.

    ``max_output_std=2`` was calibrated on healthy models with PyTorch's default initialisation, whose initial
    outputs have a standard deviation of about 0.1-0.8 (MLPs, CNNs, with or without normalisation layers); a head
    scaled by 50 or inputs scaled by 1000 give tens to thousands. Also reports the spread of the initial outputs.

    When the head's output is transformed before the loss (``127.5 * (1 + tanh(head))``, ``softplus``, a residual
    added after the head: the fit's context compares the head's output with the model's), the bias is not the
    constant the model predicts and the tests above have no reference: the check then gives a ``skip`` with the
    first loss and the loss of the model's actual output on the first batch (probe mode), and fails only on a
    non-finite first loss or one below the loss's minimum.

    Args:
        on_fail: ``"raise"`` or ``"warn"``.
        max_output_std: largest standard deviation of the initial outputs (around the bias) counted as healthy.
        z: how many standard deviations of the simulated loss a deviation must exceed.
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[InitialLossCheck(max_output_std=2.0)], logger=False)
    """

    def __init__(self, on_fail: OnFail = "raise", max_output_std: float = 2.0, z: float = 4.0, **kwargs: Any) -> None:
        super().__init__(on_fail, **kwargs)
        if not max_output_std > 0 or not z > 0:
            raise RecipeConfigError(f"{self.name}: `max_output_std` and `z` must be > 0, got {max_output_std}, {z}.")
        self.max_output_std = float(max_output_std)
        self.z = float(z)
        self.done = False
        self._expected: Optional[dict[str, Any]] = None

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._first_time(trainer):
            return
        self._context(trainer, pl_module)  # configuration errors surface before the first step

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._untap_loss()  # the first step did not end (an error in it): the user's loss module is left as it was

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._untap_loss()
        super().on_exception(trainer, pl_module, exception)

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        if self.done or self._disabled:
            self._retire("on_train_batch_start", "on_train_batch_end")
            return
        if self._expected is not None:
            return
        ctx = self._context(trainer, pl_module)
        if ctx is None:
            return
        spec = ctx.spec
        try:
            inputs, targets = split_batch(batch, self._settings.split_batch)
        except RecipeConfigError:
            inputs, targets = None, None
        if not isinstance(targets, Tensor):  # e.g. several train dataloaders: a list/dict of batches
            self.done = True
            self.findings.append(Finding(self.name, "skip", f"{self.name}: the training batch ({type(batch).__name__}) "
                                         "does not split into inputs and a target tensor (several train dataloaders?), "
                                         "so the first loss has no constant-prediction reference. HINT: pass "
                                         "`split_batch=lambda batch: (inputs, targets)`."))
            return
        y = spec.canonical_targets(targets.detach()).cpu()
        try:
            ctx.stats  # the label statistics validate the class range (RecipeConfigError)
        except RecipeConfigError as err:
            self._config_error(str(err))
            return
        if ctx.head_error is None and not ctx.bias_is_constant():
            self._expected = self._actual_output_reference(trainer, pl_module, ctx, batch, y)
            return
        c = ctx.current_constant()
        expected = constant_loss(spec.loss, c, y)
        hi_mean, hi_sd = noise_band(spec.loss, c, y, self.max_output_std)
        s_lo = min(max(ctx.initial_output_std, 0.5), self.max_output_std)
        _, lo_sd = noise_band(spec.loss, c, y, s_lo)
        upper = hi_mean + self.z * hi_sd
        lower = expected - self.z * lo_sd - 1e-6 * max(1.0, abs(expected))
        if spec.floor is not None:  # no healthy loss is below the loss function's minimum
            lower = max(lower, spec.floor - 1e-6 * max(1.0, abs(expected)))
        self._expected = {
            "expected": expected,
            "upper": upper,
            "lower": lower,
            "zero_bias": bool(c.abs().max() == 0),
            "spec": spec,
            "output_std": ctx.initial_output_std,
            "head": ctx.head_name,
            "population": ctx.constant_loss(c) if ctx.head_error is None else None,
            "input_target_correlation": input_target_correlation(inputs, targets),
        }
        self._tap_loss(pl_module)

    def _tap_loss(self, pl_module: "pl.LightningModule") -> None:
        """Record what the loss module returns during the first training step (a forward hook, removed at its end):
        when training_step returns another value (the loss combined with a distillation term, a penalty, sample
        weights), that call, not the sum, is what the constant prediction's loss refers to."""
        loss = find_loss(pl_module, self._settings.loss_fn)
        if not isinstance(loss, torch.nn.Module):
            return
        calls = self._loss_calls = []

        def hook(_m: Any, _args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.numel() and out.is_floating_point():
                calls.append(out.detach().float().mean())

        try:
            self._loss_tap = loss.register_forward_hook(hook)
        except RuntimeError:  # pragma: no cover - a scripted loss takes no hook
            self._loss_tap = None

    def _untap_loss(self) -> list[Tensor]:
        tap = self.__dict__.pop("_loss_tap", None)
        if tap is not None:
            tap.remove()
        return self.__dict__.pop("_loss_calls", None) or []

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.done or self._disabled or self._expected is None:
            return
        self.done = True
        self._retire("on_train_batch_start", "on_train_batch_end")
        calls = self._untap_loss()
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        e = self._expected
        if loss is None:
            self._conclude(trainer, Finding(self.name, "skip", f"{self.name}: the first training_step returned no loss "
                                            "(manual optimization or a skipped step): nothing to check."))
            return
        if any(isinstance(o, torch.optim.LBFGS) for o in trainer.optimizers):
            self._conclude(trainer, Finding(self.name, "skip", f"{self.name}: LBFGS evaluates the loss several times "
                                            "within its first step, and the loss it returns comes after them: there is "
                                            "no untrained loss to check."))
            return
        k = trainer.accumulate_grad_batches
        first = loss.detach().float().reshape(())
        values = torch.stack([first, *(c.to(first.device) for c in calls)]).tolist()  # one read
        measured, called = values[0] * k, values[1:]
        if called and "transformed" not in e and math.isfinite(measured) and not any(
                math.isclose(measured, v, rel_tol=1e-3, abs_tol=1e-6) for v in called):
            finding = self._judge_call(measured, called, e, trainer.global_step)
        else:
            finding = self._judge(measured, e, trainer.global_step)
        if finding.status == "warn":
            rank_zero_warn(finding.message, category=RecipeWarning)
        log_scalars(trainer, {"recipe/initial_loss": measured, "recipe/expected_initial_loss": e["expected"]})
        self._conclude(trainer, finding)

    def _actual_output_reference(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", ctx: Any, batch: Any,
                                 y: Tensor) -> dict[str, Any]:
        """The loss of the model's actual output on the first batch (probe mode): the reference when the head's
        bias is not the model's constant prediction."""
        inputs, _ = split_batch(batch, self._settings.split_batch)
        with probe_mode(trainer, pl_module):
            out = run_forward(pl_module, inputs, self._settings.forward).detach()
        with torch.no_grad():
            actual = float(torch.as_tensor(ctx.spec.loss(ctx.spec.canonical_outputs(out.float()).cpu(), y)).mean())
        return {"expected": actual, "spec": ctx.spec, "head": ctx.head_name, "transformed": ctx.output_transformed,
                "bias_applied": ctx.bias_applied}

    def _judge(self, measured: float, e: dict[str, Any], step: int) -> Finding:
        spec = e["spec"]
        if "transformed" in e:
            return self._judge_actual(measured, e, step)
        shape = (f"{spec.num_outputs} output(s) per position, {spec.positions} positions per example" if spec.dense
                 else f"{spec.num_outputs} output(s)")
        what = (f"{spec.loss_name} ({spec.task}, {shape}) with every output equal to the head "
                f"bias{' (zero)' if e['zero_bias'] else ''}, on the first batch's targets")
        if spec.task == "multiclass" and e["zero_bias"] and spec.weight is None and not spec.label_smoothing:
            what += f": log({spec.num_outputs}) = {math.log(spec.num_outputs):.4f}"
        shown_lower = max(e["lower"], spec.floor) if spec.floor is not None else e["lower"]
        numbers = (
            f"  measured first loss: {measured:.4g}\n"
            f"  expected:            {e['expected']:.4g}  ({what}; an untrained network should predict about the "
            "same for every input)\n"
            f"  healthy range:       [{shown_lower:.4g}, {e['upper']:.4g}]  (initial outputs = bias + noise of std up to "
            f"max_output_std={self.max_output_std:g}, z={self.z:g})"
        )
        clue = f"initial output spread (std around the bias on a training batch): {e['output_std']:.4g}"
        notes = "".join(f"\n  note: {n}" for n in spec.notes)
        details = {k: v for k, v in e.items() if k != "spec"}
        broken = self._broken(measured, e, step, numbers, notes, details)
        if broken is not None:
            return broken
        # a guessed loss (no loss module found) may not be the one training_step computes (a focal loss, a sum): a
        # mismatch is then a warning, not a verdict
        status = "note" if spec.inferred else "warn" if spec.loss_name == "KLDivLoss" else "fail"
        if spec.inferred:
            notes += ("\n  note: the loss was inferred, not found on the module: a loss of its own in training_step "
                      "(focal, summed, scaled) gives other numbers, hence a note; pass `loss_fn=` for a verdict")
        elif spec.loss_name == "KLDivLoss":
            notes += ("\n  note: distillation usually divides the logits by a temperature T and multiplies the loss "
                      "by T**2 in training_step, which changes these numbers: hence a warning")
        if measured > e["upper"]:
            return Finding(self.name, status, f"{self.name}: the first training loss is far ABOVE what an untrained "
                           f"network should give; {clue} (healthy: up to {self.max_output_std:g}).\n{numbers}{notes}\n"
                           "  HINT: if the guess of loss or head is wrong, pass `loss_fn=` / `head=`; if large initial "
                           "outputs are intended, raise `max_output_std`.", measured, e["expected"], step,
                           list(_HIGH_CAUSES), details)
        r = e.get("input_target_correlation")
        if measured < e["lower"] and r is not None and abs(r) >= _TRACKS_INPUT:
            return Finding(self.name, "pass", f"{self.name}: the first training loss {measured:.4g} is below the "
                           f"{e['expected']:.4g} of a constant prediction ({what}), as expected: the targets pair up "
                           f"with the inputs value for value and correlate with them (r = {r:.3g}; an autoencoder or a "
                           "denoiser), so an untrained network's output, a function of the input, already carries "
                           f"some of them; {clue}.", measured, e["expected"], step, [], details)
        if measured < e["lower"]:
            return Finding(self.name, status, f"{self.name}: the first training loss is far BELOW the loss of a "
                           f"constant prediction, so the model knows the labels before training.\n{numbers}{notes}",
                           measured, e["expected"], step, list(_LOW_CAUSES), details)
        return Finding(self.name, "pass", f"{self.name}: the first training loss {measured:.4g} matches the expected "
                       f"{e['expected']:.4g} ({what}); healthy range [{shown_lower:.4g}, {e['upper']:.4g}]; {clue}.",
                       measured, e["expected"], step, [], details)

    def _judge_call(self, measured: float, called: list[float], e: dict[str, Any], step: int) -> Finding:
        """training_step returned another value than the loss module's call(s) in the first step: the first call is
        judged against the constant prediction's loss; what the returned loss itself can show (below the loss's
        minimum: a flipped sign) is judged on it."""
        spec = e["spec"]
        numbers = (f"  training_step's first loss: {measured:.4g}; the {spec.loss_name} call(s) in that step: "
                   f"{', '.join(f'{v:.4g}' for v in called[:4])}")
        broken = self._broken(measured, e, step, numbers, "", {k: v for k, v in e.items() if k != "spec"})
        if broken is not None:
            return broken
        finding = self._judge(called[0], e, step)
        finding.message += (f"\n  note: training_step returned {measured:.4g}, not the {spec.loss_name} call's "
                            f"{called[0]:.4g}: its loss combines the call with other terms (a distillation term, a "
                            f"penalty, sample weights), so the call is what is judged here")
        finding.details.update({"training_step_loss": measured, "loss_calls": called[:8]})
        return finding

    def _broken(self, measured: float, e: dict[str, Any], step: int, numbers: str, notes: str,
                details: dict[str, Any]) -> Optional[Finding]:
        """The failures that hold whatever the expected value: a non-finite first loss, or one below the loss's
        minimum (``-loss``); ``None`` when neither."""
        spec = e["spec"]
        if not math.isfinite(measured):
            return Finding(self.name, "fail", f"{self.name}: the first training loss is {measured}.\n{numbers}", measured,
                           e["expected"], step, ["NaN/Inf in the inputs or targets", "division by zero in the loss"],
                           details)
        if spec.floor is not None and measured < spec.floor - 1e-6 * max(1.0, abs(e["expected"])):
            return Finding(self.name, "fail", f"{self.name}: the first training loss {measured:.4g} is below "
                           f"{spec.floor:g}, the smallest value {spec.loss_name} can take: training_step returns the "
                           f"loss with its sign flipped (-loss), so the optimiser maximises it.\n{numbers}{notes}",
                           measured, e["expected"], step, [_LOW_CAUSES[2], _LOW_CAUSES[3]], details)
        return None

    def _judge_actual(self, measured: float, e: dict[str, Any], step: int) -> Finding:
        """The first loss of a model whose head output is transformed before the loss: only what does not rely on the
        bias being the constant prediction is judged (a finite loss, not below the loss's minimum)."""
        spec = e["spec"]
        details = {k: v for k, v in e.items() if k != "spec"}
        numbers = (f"  measured first loss: {measured:.4g}\n  the model's actual output on the first batch (eval mode, "
                   f"{spec.loss_name}): {e['expected']:.4g}")
        broken = self._broken(measured, e, step, numbers, "", details)
        if broken is not None:
            return broken
        why = e["transformed"] or ("the model's actual output predicted the targets better than the loss-optimal "
                                   "constant written into the bias")
        kept = ""
        if e["bias_applied"] is not None:
            kept = ("; HeadBiasInit set it and kept it because the loss went down" if e["bias_applied"] else
                    "; HeadBiasInit put the old bias back because writing it raised the loss")
        return Finding(self.name, "skip", f"{self.name}: the head's bias is not the constant the model predicts ("
                       f"{why}{kept}), so the loss of a constant prediction at the "
                       "bias is no reference for the first loss; only its finiteness and the loss's minimum are "
                       f"checked.\n{numbers}", measured, e["expected"], step, [], details)
