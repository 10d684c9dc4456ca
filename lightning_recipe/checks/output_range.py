"""``OutputRangeCheck``: outputs on the scale the loss expects (logits, not probabilities) and a loss that fits the task."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_recipe._core.base import OnFail, _OnceCheck
from lightning_recipe._core.conventions import probe_mode, run_forward
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding
from lightning_recipe.functional.data import input_target_correlation
from lightning_recipe.functional.output_range import (
    class_like_targets,
    out_of_reach,
    output_interval,
    probability_rows,
    squashed_by,
)
from lightning_recipe._core.dtypes import wide

_DOUBLE = [
    "softmax/sigmoid applied in forward and again inside the loss (CrossEntropyLoss and BCEWithLogitsLoss take "
    "logits): the loss saturates, gradients shrink and training stalls",
    "a model written for inference (returning probabilities) reused for training",
]
_NLL = ["NLLLoss takes log-probabilities: use `log_softmax` in forward (or CrossEntropyLoss on logits)"]
_LABELS = [
    "class labels regressed with MSE/L1: the loss treats class 3 as 'between' classes 2 and 4 and predicts averages "
    "of class ids",
]
_LOGIT_LOSSES = ("CrossEntropyLoss", "BCEWithLogitsLoss")
_AFFINE = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)  # layers whose output cannot be squashed
_REGRESSION = ("MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss")
_SCALE = 1000.0
_RECONSTRUCTION = 0.9  # inputs-targets correlation above which integer targets are the inputs' own pixel values
_REACH_SHARE = 0.05  # most of the targets allowed outside the output's range (tails of targets scaled to fit it)
_REACH = [
    "ReLU or sigmoid on standardized targets (mean 0, std 1): about half of them are negative",
    "tanh on unscaled targets (e.g. pixel values in [0, 255], prices, counts)",
    "targets not scaled to the activation's range (e.g. [0, 1] for a sigmoid, [-1, 1] for a tanh)",
]


class OutputRangeCheck(_OnceCheck):
    """Outputs fed to a logits loss must not already be probabilities; class labels should not be regressed.

    At fit start, on the probe batch (one forward under the probe mode: eval, no grad, isolated random state):

    * ``CrossEntropyLoss`` (found or inferred): the outputs are **probabilities** when every row along the class
      dimension lies in ``[0, 1]`` and sums to 1 (within ``atol``; a set of logits does that only by accident) →
      fail, "double softmax". Also fails when the output is ``sigmoid`` of the head's output.
    * ``BCEWithLogitsLoss``: fails when the output is ``sigmoid``/``softmax`` of the head's output (measured with a
      forward hook on the head). Outputs merely all inside ``[0, 1]`` are ambiguous (logits near zero are too): when
      the output is the head's own output and the head is an affine layer (``Linear``, ``Conv``, ``Bilinear``, nothing
      applied after it) they are logits → pass; otherwise the check runs the model on the inputs scaled by
      ``+-1000`` (floating inputs only): outputs that leave ``[0, 1]`` are logits → pass; outputs that change but stay
      inside are bounded, i.e. squashed → fail; outputs that do not change (a model insensitive to the input scale) or
      integer inputs → ``warn``.
    * ``BCELoss`` (probabilities; the head's bias and the constant predictions are their log-odds): fails when the
      output is ``sigmoid(sigmoid(.))`` of the head's output (a double sigmoid keeps every probability in
      ``[0.5, 0.731]``).
    * ``NLLLoss``: the outputs must be log-probabilities (``logsumexp`` over classes = 0): probabilities (rows summing to
      1) or unnormalised logits fail.
    * a regression loss (MSE, L1, Huber, SmoothL1): the **range the output can take** must hold the targets
      (``OutputRangeCheck.target_range``). The range comes from the last transform of the output, found with forward
      hooks on every leaf module: an activation module whose output is the model's output (``ReLU`` ``[0, inf)``,
      ``ReLU6`` ``[0, 6]``, ``Softplus`` ``[0, inf)``, ``ELU``/``CELU`` ``[-alpha, inf)``, ``SELU``, ``GELU``, ``SiLU``,
      ``Sigmoid``/``Hardsigmoid``/``Softmax`` ``[0, 1]``, ``Tanh``/``Softsign`` ``[-1, 1]``, ``Hardtanh``
      ``[min_val, max_val]``, ``LogSigmoid`` ``(-inf, 0]``); else the output as an elementwise affine ``a * z + b``
      (per output, fitted on the probe batch to round-off) of such a module's output, or of ``relu``/``sigmoid``/
      ``tanh``/``softplus``/``softmax`` of the last leaf module's output (a functional activation, scaled or not:
      ``127.5 * (1 + tanh(h))`` reaches ``[0, 255]``), the bounds mapped through it. An output that is a leaf's own
      output or an affine of it is unbounded → pass; a transform that fits none of these → skip (range not measured).
      Fails when more than 5% of the training targets (the label sample of the fit, else the probe batch) lie outside
      the interval, or when the target mean does: a model whose outputs cannot reach the targets is left with a loss
      floor (reported as the mean squared distance of the targets to the interval, relative to their variance). The
      5% leaves room for tails: targets standardised and halved for a ``tanh`` have 4.6% beyond ``[-1, 1]`` and pass;
      a sigmoid or ReLU on standardised targets leaves about 50% out of reach, a ``tanh`` on ``[0, 255]`` about 100%.
      An initial output so close to linear that ``tanh(h)`` is an affine of ``h`` to round-off (``|h| < 1e-2``) reads
      as unbounded (no false alarm, a missed one).
    * a regression loss (MSE, L1, Huber) on targets that are **class labels** (integer dtype, or integer-valued
      floats with at most ``max_classes`` distinct values and at least 5 examples per value, on the training label
      sample) → a ``note`` (never a warning): the loss does not fit a classification task, but healthy ordinal and
      count regressions (ratings 1-5, quality scores, event counts) look exactly the same. Targets that are (nearly)
      the inputs (correlation >= 0.9 value for value: an autoencoder or denoiser on raw integer pixel values) are
      intensities, not labels, and pass.

    Args:
        on_fail: ``"raise"`` or ``"warn"``.
        atol: tolerance of the range and row-sum tests (raised to ``1e-2`` for half-precision outputs).
        max_classes: most distinct integer target values counted as class labels.
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[OutputRangeCheck(max_classes=20)], logger=False)
    """

    def __init__(self, on_fail: OnFail = "raise", atol: float = 1e-4, max_classes: int = 20, **kwargs: Any) -> None:
        super().__init__(on_fail, **kwargs)
        if not atol > 0:
            raise RecipeConfigError(f"{self.name}: `atol` must be > 0, got {atol!r}.")
        if not isinstance(max_classes, int) or max_classes < 2:
            raise RecipeConfigError(f"{self.name}: `max_classes` must be an int >= 2, got {max_classes!r}.")
        self.atol = float(atol)
        self.max_classes = max_classes
        self.done = False

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        ctx = self._start(trainer, pl_module)
        if ctx is None:
            return
        spec = ctx.spec
        reach: Optional[Finding] = None
        if spec.loss_name in _REGRESSION:
            finding = self._labels(ctx)
            reach = self._reach_finding(trainer, pl_module, ctx)
        elif spec.loss_name in _LOGIT_LOSSES + ("NLLLoss",):
            finding = self._range(trainer, pl_module, ctx)
        elif spec.probabilities:
            finding = self._probabilities(trainer, pl_module, ctx)
        elif spec.loss_name == "BCELoss":
            finding = Finding(self.name, "pass", f"{self.name}: the model's outputs are logits (not all in [0, 1], or "
                              f"the head's own output), so training_step applies the sigmoid before {spec.loss_name}.")
        else:
            finding = Finding(self.name, "skip", f"{self.name}: the loss {spec.loss_name or '<callable>'} has no known "
                              "output scale to check.")
        if finding.status == "warn":
            rank_zero_warn(finding.message, category=RecipeWarning)
        self._conclude(trainer, finding)
        if reach is not None:
            self._conclude(trainer, reach)

    # -- logits vs probabilities ----------------------------------------------------------------------------------
    def _probe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", ctx: Any, inputs: Any) -> tuple[Tensor, Optional[Tensor]]:
        seen: list[Tensor] = []
        handle = None
        if ctx.head is not None:
            handle = ctx.head.register_forward_hook(lambda _m, _i, o: seen.append(o) if isinstance(o, Tensor) else None)
        try:
            with probe_mode(trainer, pl_module):
                out = run_forward(pl_module, inputs, self._settings.forward)
        finally:
            if handle is not None:
                handle.remove()
        head_out = seen[-1].detach() if seen else None
        return out.detach(), head_out

    def _range(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", ctx: Any) -> Finding:
        spec = ctx.spec
        out, head_out = self._probe(trainer, pl_module, ctx, ctx.inputs)
        atol = self.atol if out.dtype in (torch.float32, torch.float64) else max(self.atol, 1e-2)
        canon = spec.canonical_outputs(out.float())
        head_c = None
        if head_out is not None and head_out.numel() == out.numel() and head_out is not out:
            head_c = spec.canonical_outputs(head_out.float().reshape(out.shape))
        rows = probability_rows(canon, atol)
        squash = squashed_by(canon, head_c, atol) if head_c is not None else None
        details = {**rows, "squashed_by": squash, "loss": spec.loss_name, "head": ctx.head_name}
        what = f"outputs {tuple(out.shape)} of the model on the probe batch ({spec.loss_name}, {spec.task})"
        inferred = (" The loss was inferred from the targets; if training_step applies another loss to these outputs, "
                    "pass `loss_fn=`.") if spec.inferred else ""
        hint = (" HINT: return logits from forward (drop the final softmax/sigmoid; apply it only for inference), or "
                "pass `forward=` returning the logits that training uses.")
        if spec.loss_name == "NLLLoss":
            return self._nll(canon, rows, details, what, atol)
        if spec.task == "multiclass" and rows["in_unit"] and rows["sums_to_one"]:
            return Finding(self.name, "fail", f"{self.name}: the {what} are already probabilities: every row lies in "
                           f"[{rows['min']:.4g}, {rows['max']:.4g}] and sums to 1 (largest deviation "
                           f"{rows['max_sum_error']:.2g}), but {spec.loss_name} applies its own softmax: a double softmax."
                           f"{inferred}{hint}", rows["max_sum_error"], atol, 0, list(_DOUBLE), details)
        if squash is not None:
            return Finding(self.name, "fail", f"{self.name}: the {what} are `{squash}` of the head's output "
                           f"(`{ctx.head_name}`), in [{rows['min']:.4g}, {rows['max']:.4g}], but {spec.loss_name} expects "
                           f"logits: a double {squash}.{inferred}{hint}", rows["max"], None, 0, list(_DOUBLE), details)
        if spec.task in ("binary", "multilabel") and rows["in_unit"] and _affine_output(ctx):
            return Finding(self.name, "pass", f"{self.name}: the {what} are the head's own output (`{ctx.head_name}`, "
                           f"{type(ctx.head).__name__}, nothing applied after it): logits, which happen to lie in "
                           f"[{rows['min']:.4g}, {rows['max']:.4g}].", rows["max"], None, 0, [], details)
        if spec.task in ("binary", "multilabel") and rows["in_unit"]:
            bounded = self._bounded(trainer, pl_module, ctx, spec, atol, canon)
            details["bounded_under_scaling"] = bounded
            if bounded:
                return Finding(self.name, "fail", f"{self.name}: the {what} lie in [{rows['min']:.4g}, "
                               f"{rows['max']:.4g}] and stay in [0, 1] (while changing) with the inputs scaled by +-1000: they are "
                               f"probabilities, but {spec.loss_name} applies its own sigmoid: a double sigmoid."
                               f"{inferred}{hint}", rows["max"], None, 0, list(_DOUBLE), details)
            if bounded is None:
                return Finding(self.name, "warn", f"{self.name}: the {what} all lie in [{rows['min']:.4g}, "
                               f"{rows['max']:.4g}]: if forward applies a sigmoid, {spec.loss_name} applies a second one "
                               f"(double sigmoid).{hint}", rows["max"], None, 0, list(_DOUBLE), details)
        return Finding(self.name, "pass", f"{self.name}: the {what} are logits (range [{rows['min']:.4g}, "
                       f"{rows['max']:.4g}]), as {spec.loss_name} expects.",
                       rows["max_sum_error"] if spec.task == "multiclass" else rows["max"], None, 0, [], details)

    def _probabilities(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", ctx: Any) -> Finding:
        """``BCELoss`` takes probabilities: one sigmoid after the head, not two."""
        spec = ctx.spec
        out, head_out = self._probe(trainer, pl_module, ctx, ctx.inputs)
        o = out.float().reshape(-1, spec.num_outputs)
        atol = self.atol if out.dtype in (torch.float32, torch.float64) else max(self.atol, 1e-2)
        lo, hi = float(o.min()), float(o.max())
        what = f"outputs {tuple(out.shape)} of the model on the probe batch ({spec.loss_name}, {spec.task})"
        details = {"min": lo, "max": hi, "loss": spec.loss_name, "head": ctx.head_name}
        if head_out is not None and head_out.numel() == out.numel() and head_out is not out:
            once = torch.sigmoid(head_out.float().reshape(o.shape))
            if squashed_by(o, once, atol) == "sigmoid":
                return Finding(self.name, "fail", f"{self.name}: the {what} are `sigmoid(sigmoid(.))` of the head's "
                               f"output (`{ctx.head_name}`): a double sigmoid, so every probability lies in [0.5, 0.731] "
                               f"(here [{lo:.4g}, {hi:.4g}]). HINT: apply one sigmoid in forward (or return logits and "
                               "use BCEWithLogitsLoss).", hi, None, 0, list(_DOUBLE), details)
        return Finding(self.name, "pass", f"{self.name}: the {what} are probabilities (range [{lo:.4g}, {hi:.4g}]), "
                       f"as {spec.loss_name} expects.", hi, None, 0, [], details)

    def _nll(self, canon: Tensor, rows: dict[str, Any], details: dict[str, Any], what: str, atol: float) -> Finding:
        lse = torch.logsumexp(wide(canon), dim=-1).abs().max().item() if canon.numel() else 0.0
        details["max_abs_logsumexp"] = lse
        if rows["in_unit"] and rows["sums_to_one"]:
            return Finding(self.name, "fail", f"{self.name}: the {what} are probabilities (rows in [0, 1] summing to 1), "
                           "but NLLLoss takes log-probabilities: the loss is -p(true class), not -log p. HINT: use "
                           "`log_softmax` instead of `softmax` in forward.", rows["max_sum_error"], atol, 0, list(_NLL), details)
        if lse > max(1e-3, 10 * atol):
            return Finding(self.name, "fail", f"{self.name}: the {what} are not log-probabilities: logsumexp over the "
                           f"classes is up to {lse:.4g} away from 0, but NLLLoss takes log-probabilities (it is unbounded "
                           "below on raw logits). HINT: apply `log_softmax` in forward, or use CrossEntropyLoss on logits.",
                           lse, 0.0, 0, list(_NLL), details)
        return Finding(self.name, "pass", f"{self.name}: the {what} are log-probabilities, as NLLLoss expects.", lse, 0.0,
                       0, [], details)

    def _bounded(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", ctx: Any, spec: Any, atol: float,
                 base: Tensor) -> Optional[bool]:
        """Do the outputs stay in [0, 1] while moving when the (floating) inputs are scaled by +-1000?

        ``False``: they leave [0, 1] (logits). ``True``: they stay inside although they changed (bounded: squashed).
        ``None``: cannot tell (integer inputs, non-finite outputs, or a model insensitive to the input scale).
        """
        x = ctx.inputs
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return None
        moved = 0.0
        for factor in (_SCALE, -_SCALE):
            out, _ = self._probe(trainer, pl_module, ctx, x * factor)
            canon = spec.canonical_outputs(out.float())
            if not bool(torch.isfinite(canon).all()):
                return None
            if not probability_rows(canon, atol)["in_unit"]:
                return False
            moved = max(moved, float((canon - base).abs().max()))
        return True if moved > 0.1 else None

    # -- the loss vs the targets ----------------------------------------------------------------------------------
    def _labels(self, ctx: Any) -> Finding:
        spec = ctx.spec
        y = ctx.stats.sample
        raw = ctx.targets
        res = class_like_targets(y, self.max_classes, integer_dtype=isinstance(raw, Tensor) and not raw.is_floating_point())
        details = {k: v for k, v in res.items() if k != "values"}
        details["values"] = res["values"][:20]
        r = input_target_correlation(ctx.inputs, raw)
        details["input_target_correlation"] = r
        if res["class_like"] and r is not None and r >= _RECONSTRUCTION:
            return Finding(self.name, "pass", f"{self.name}: {spec.loss_name} on targets with {res['distinct']} distinct "
                           f"integer values that are (nearly) the inputs themselves (correlation {r:.3g}): pixel "
                           "intensities reconstructed by an autoencoder or a denoiser, not class labels.",
                           float(res["distinct"]), float(self.max_classes), 0, [], details)
        if res["class_like"]:
            shown = ", ".join(f"{v:g}" for v in res["values"][:10])
            # a note: ratings and counts regressed on purpose are integer targets with few values too
            return Finding(self.name, "note", f"{self.name}: {spec.loss_name} regresses targets that look like class "
                           f"labels: {res['distinct']} distinct integer values ({shown}) over {res['count']} labels. A "
                           "regression loss treats class ids as numbers. HINT: for classes, output one logit per class "
                           "and use CrossEntropyLoss (targets as class indices, dtype long). For ordinal or count "
                           f"targets a regression loss is fine: pass `max_classes={res['distinct'] - 1}` to silence this.", float(res["distinct"]), float(self.max_classes), 0, list(_LABELS), details)
        return Finding(self.name, "pass", f"{self.name}: {spec.loss_name} on continuous targets ({res['distinct']} "
                       f"distinct values in {res['count']} labels).", float(res["distinct"]), float(self.max_classes), 0,
                       [], details)


    # -- the output's reachable range vs the targets' range -------------------------------------------------------
    def _reach_finding(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", ctx: Any) -> Finding:
        name = f"{self.name}.target_range"
        try:
            return self._reach(trainer, pl_module, ctx, name)
        except Exception as err:  # an aid: an unusual model skips this rule, never the fit
            return Finding(name, "skip", f"{self.name}: the output range could not be measured: "
                           f"{type(err).__name__}: {err}.")

    def _leaf_outputs(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", ctx: Any,
                      numel: int) -> tuple[Tensor, list[tuple[nn.Module, Tensor]]]:
        """One probe forward; the outputs of the leaf modules with the model output's size, in execution order."""
        seen: list[tuple[nn.Module, Tensor]] = []

        def hook(module: nn.Module, _args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and out.numel() == numel and out.is_floating_point():
                seen.append((module, out.detach()))

        handles = []
        try:
            for m in pl_module.modules():
                if m is not pl_module and next(m.children(), None) is None:
                    try:
                        handles.append(m.register_forward_hook(hook))
                    except RuntimeError:  # a scripted/traced submodule takes no hook
                        pass
            with probe_mode(trainer, pl_module):
                out = run_forward(pl_module, ctx.inputs, self._settings.forward)
        finally:
            for h in handles:
                h.remove()
        return out.detach(), seen

    def _reach(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", ctx: Any, name: str) -> Finding:
        spec = ctx.spec
        if spec.task != "regression":
            return Finding(name, "skip", f"{self.name}: {spec.loss_name} on a {spec.task} task: no target range to check.")
        out, leaves = self._leaf_outputs(trainer, pl_module, ctx, ctx.initial_output.numel())
        names = {m: n for n, m in pl_module.named_modules()}
        tol = 1e-4 if out.dtype in (torch.float32, torch.float64) else 2e-2
        canon = spec.canonical_outputs(wide(out))
        found = output_interval(canon, [(m, spec.canonical_outputs(wide(o).reshape(out.shape))) for m, o in leaves],
                                tol)
        if found is None:
            const = canon.shape[0] > 1 and bool((canon.amax(0) == canon.amin(0)).any())
            why = (" (an output constant over the probe batch, e.g. a saturated activation, fits any transform)"
                   if const else "")
            return Finding(name, "skip", f"{self.name}: the model's output is not a leaf module's output, an activation "
                           f"of one, or an elementwise affine of these{why}: its range was not measured.")
        lo, hi, what, module = found
        where = f"`{names.get(module, '?')}` ({type(module).__name__})"
        what = what.replace("{m}", where)
        y = wide(ctx.stats.sample)
        reach = out_of_reach(y, lo, hi, rtol=max(tol, 1e-6) if "affine" in what else 1e-6)
        details = {**reach, "output": what, "low": _show(lo), "high": _show(hi),
                   "interval": [float(lo.min()), float(hi.max())], "targets_from": ctx.stats.source,
                   "loss": spec.loss_name}
        if not reach["bounded"]:
            return Finding(name, "pass", f"{self.name}: the model's output is {what}: unbounded, any target is reachable.",
                           0.0, _REACH_SHARE, 0, [], details)
        rng = ("(" if bool(torch.isinf(lo).all()) else "[") + f"{_show(lo)}, {_show(hi)}" + \
            (")" if bool(torch.isinf(hi).all()) else "]")
        targets = (f"training targets ({ctx.stats.source}: {reach['count']} values in [{reach['min']:.4g}, "
                   f"{reach['max']:.4g}], mean {reach['mean']:.4g}, 1%-99% quantiles [{reach['q01']:.4g}, "
                   f"{reach['q99']:.4g}])")
        if reach["share"] > _REACH_SHARE or reach["mean_outside"]:
            mean = " and their mean is outside it" if reach["mean_outside"] else ""
            return Finding(name, "fail", f"{self.name}: the model's output is {what}, confined to {rng}, but "
                           f"{100 * reach['share']:.3g}% of the {targets} lie outside it{mean}: the model cannot reach "
                           f"them, and {spec.loss_name} keeps a floor (the targets' mean squared distance to {rng} is "
                           f"{reach['floor']:.3g} of their variance). HINT: remove the final activation (return the "
                           f"head's output) for unbounded targets, or scale the targets to {rng}.", reach["share"],
                           _REACH_SHARE, 0, list(_REACH), details)
        return Finding(name, "pass", f"{self.name}: the model's output is {what}, confined to {rng}, and holds the {targets} "
                       f"({100 * reach['share']:.3g}% outside, at most {100 * _REACH_SHARE:g}% allowed).",
                       reach["share"], _REACH_SHARE, 0, [], details)


def _show(bound: Tensor) -> str:
    """A bound per output, shown as one number when every output has the same."""
    b = bound.reshape(-1)
    if b.numel() == 1 or bool((b == b[0]).all()):
        return f"{float(b[0]):.4g}"
    return "(" + ", ".join(f"{float(v):.4g}" for v in b[:4]) + (", ...)" if b.numel() > 4 else ")")


def _affine_output(ctx: Any) -> bool:
    """The model output is the detected head's own output and the head is an affine layer (``Linear``, ``Conv``):
    logits by construction, whatever their range."""
    return ctx.head_how.startswith("output identical") and isinstance(ctx.head, _AFFINE)


