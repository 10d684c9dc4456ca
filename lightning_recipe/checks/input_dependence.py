"""``InputDependenceCheck``: the recipe's input-independent baseline: zeroed inputs must do clearly worse."""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from typing_extensions import override

from lightning_recipe._core.base import OnFail, RecipeCheck
from lightning_recipe._core.conventions import TaskSpec, probe_mode, run_forward, sanity_examples, take_examples
from lightning_recipe.exceptions import RecipeConfigError
from lightning_recipe.findings import Finding
from lightning_recipe.functional.input_dependence import input_dependence_test, per_example_loss
from lightning_recipe.report.loggers import log_scalars

_CAUSES = [
    "the model ignores its input (forward returns a learned constant, or the input path is cut)",
    "the data pipeline feeds the wrong tensor (noise, a constant, a padding mask) or pairs inputs with the wrong labels",
    "labels shuffled independently of the inputs",
    "training stalled before the model learned anything from the inputs (learning rate too low)",
]


class InputDependenceCheck(RecipeCheck):
    """Once training has run a while, the loss on a fixed batch with zeroed inputs must be clearly worse than with
    the real inputs.

    The fixed batch is the first validation batch of the sanity check (held-out data: memorised noise does not
    help there), else the probe training batch; at most ``num_examples`` examples. At the check (after
    ``after_steps`` training batches, or by default at the end of the first epoch with at least ``min_steps``
    batches), two probe forwards (eval mode, no grad, isolated random state) give per-example losses with the real
    inputs ``R_i`` and with zeroed inputs ``Z_i`` (floating tensors set to 0; a single integer tensor, such as
    token ids, set to id 0; or ``baseline=`` for anything else); ``P_i`` is the loss of the best constant prediction
    (the label prior of the training set). With ``D = mean(Z_i - R_i)`` and ``A = mean(P_i - R_i)`` (what the real
    inputs gain over the prior), the model uses its inputs when

    ``D > z * se(D)`` or ``D >= rel_margin * A`` (with ``A > 0``), and ``D > 1e-3 * |P - floor|``

    i.e. zeroing the inputs loses significantly, or loses at least ``rel_margin`` of the real inputs' advantage over
    the label prior (either is evidence that the input is used; a small batch alone never makes a false alarm). A model that ignores its input gives ``D = 0`` exactly; a pipeline feeding noise gives real inputs
    no advantage on held-out data (``D ~ 0`` or negative). A healthy model loses most of its advantage when the
    inputs are zeroed (``D >~ A``). If the check cannot run before training ends, a ``skip`` finding says so.

    Args:
        on_fail: ``"raise"`` or ``"warn"``.
        after_steps: training batches before the check; ``None``: the end of the first epoch with at least
            ``min_steps`` batches.
        min_steps: fewest training batches before the check when ``after_steps`` is ``None``.
        num_examples: examples of the fixed batch used.
        rel_margin: share of the real inputs' advantage over the prior that zeroing the inputs must lose.
        z: standard errors of the paired difference ``Z_i - R_i`` that count as significant.
        baseline: ``callable(inputs) -> inputs`` building the uninformative inputs (default: zeros).
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[InputDependenceCheck(after_steps=200)], logger=False)
    """

    def __init__(
        self,
        on_fail: OnFail = "raise",
        after_steps: Optional[int] = None,
        min_steps: int = 50,
        num_examples: int = 256,
        rel_margin: float = 0.5,
        z: float = 3.0,
        baseline: Optional[Callable[[Any], Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(on_fail, **kwargs)
        for name, v in (("min_steps", min_steps), ("num_examples", num_examples)):
            if not isinstance(v, int) or v < 1:
                raise RecipeConfigError(f"{self.name}: `{name}` must be a positive int, got {v!r}.")
        if after_steps is not None and (not isinstance(after_steps, int) or after_steps < 1):
            raise RecipeConfigError(f"{self.name}: `after_steps` must be a positive int or None, got {after_steps!r}.")
        if not 0 <= rel_margin <= 1:
            raise RecipeConfigError(f"{self.name}: `rel_margin` must be in [0, 1], got {rel_margin!r}.")
        if baseline is not None and not callable(baseline):
            raise RecipeConfigError(f"{self.name}: `baseline` must be callable, got {type(baseline).__name__}.")
        self.after_steps = after_steps
        self.min_steps = min_steps
        self.num_examples = num_examples
        self.rel_margin = float(rel_margin)
        self.z = float(z)
        self.baseline = baseline
        self.done = False
        self._batches = 0
        self._batch: Optional[tuple[Any, Tensor]] = None
        self._source = "training"

    # -- the fixed batch ------------------------------------------------------------------------------------------
    @override
    def on_validation_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._batch is None:
            split = self._settings.split_batch
            self._batch = sanity_examples(trainer, batch, batch_idx, dataloader_idx, split, self.num_examples)
            if self._batch is not None:
                self._source = "validation"
        if self._batch is not None or not trainer.sanity_checking:  # only the sanity check's first batch is taken
            self._retire("on_validation_batch_start")

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.done or trainer.ckpt_path is not None:
            self.done = True
            return
        ctx = self._context(trainer, pl_module)
        if ctx is None:
            return
        self._ctx = ctx
        if self._batch is None:
            self._batch, self._source = take_examples(ctx.inputs, ctx.targets, self.num_examples), "training"
        self._batches = 0

    # -- when -----------------------------------------------------------------------------------------------------
    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.done or self._disabled:
            self._retire("on_train_batch_end")
            return
        self._batches += 1
        if self.after_steps is not None and self._batches >= self.after_steps:
            self._check(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.done and not self._disabled and self.after_steps is None and self._batches >= self.min_steps:
            self._check(trainer, pl_module)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.done or self._disabled or getattr(self, "_ctx", None) is None:
            return
        self.done = True
        wanted = self.after_steps if self.after_steps is not None else f"the end of an epoch with >= {self.min_steps}"
        self._conclude(trainer, Finding(self.name, "skip", f"{self.name}: training ended after {self._batches} batches, "
                                        f"before the check ({wanted} batches). HINT: lower `after_steps`/`min_steps`."))

    # -- the check ------------------------------------------------------------------------------------------------
    def _zeroed(self, x: Any) -> Any:
        if self.baseline is not None:
            return self.baseline(x)
        if isinstance(x, Tensor):
            return torch.zeros_like(x)
        return apply_to_collection(x, Tensor, lambda t: torch.zeros_like(t) if t.is_floating_point() else t)

    def _check(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.done = True
        ctx = self._ctx
        spec: TaskSpec = ctx.spec
        assert self._batch is not None
        x, y = self._batch
        with probe_mode(trainer, pl_module):
            real = run_forward(pl_module, x, self._settings.forward).detach()
            zero = run_forward(pl_module, self._zeroed(x), self._settings.forward).detach()
        n = y.shape[0] if y.ndim else 1
        canon_real = spec.canonical_outputs(real.float()).cpu()  # one host copy per output: the check runs once
        canon_zero = spec.canonical_outputs(zero.float()).cpu()
        yt = spec.canonical_targets(y.detach()).cpu()
        c, _ = ctx.optimal()
        const = c.float().reshape(1, -1).expand(canon_real.shape[0], -1)
        r = per_example_loss(spec.loss, canon_real, yt, n)
        zl = per_example_loss(spec.loss, canon_zero, yt, n)
        p = per_example_loss(spec.loss, const, yt, n)
        keep = torch.isfinite(r) & torch.isfinite(zl) & torch.isfinite(p)
        if not bool(keep.any()):
            bad_real, bad_zero = int((~torch.isfinite(r)).sum()), int((~torch.isfinite(zl)).sum())
            tokens = isinstance(x, Tensor) and not x.is_floating_point()
            cause = ("token ids all set to 0, which is often the padding id: attention over a fully masked sequence "
                     "is NaN" if tokens else "a model that normalises its input divides by zero")
            why = (f"the model's own outputs are NaN/Inf on {bad_real} of them: the weights are probably NaN after a "
                   "non-finite loss (see LossDecreaseCheck.finite and DataCheck.finite)" if bad_real else
                   f"the zeroed inputs give NaN/Inf on {bad_zero} of them ({cause}): pass `baseline=` (e.g. inputs "
                   "shuffled across the batch)" if bad_zero else "the label-prior loss is not finite")
            self._conclude(trainer, Finding(self.name, "skip", f"{self.name}: no loss to compare on the {n} "
                                            f"{self._source} examples: {why}.", step=trainer.global_step))
            return
        res = input_dependence_test(r[keep], zl[keep], p[keep], spec.floor, self.rel_margin, self.z)
        res["max_output_change"] = float((canon_real - canon_zero).abs().max()) if canon_real.numel() else 0.0
        res["source"], res["examples"] = self._source, int(keep.sum())
        step = trainer.global_step
        log_scalars(trainer, {"recipe/input_dependence/real_loss": res["real"],
                              "recipe/input_dependence/zeroed_loss": res["zeroed"]})
        numbers = (f"on {res['examples']} {self._source} examples after {self._batches} training batches: loss "
                   f"{res['real']:.4g} with the real inputs, {res['zeroed']:.4g} with zeroed inputs, "
                   f"{res['prior']:.4g} for the label prior; zeroing costs {res['difference']:.4g} (needed: more than "
                   f"{self.z:g} standard errors = {self.z * res['se']:.4g}, or at least rel_margin={self.rel_margin:g} "
                   f"x the real inputs' gain over the prior {res['advantage']:.4g})")
        if res["uses_input"]:
            finding = Finding(self.name, "pass", f"{self.name}: the model uses its input: {numbers}.", res["difference"],
                              res["threshold"], step, [], res)
        else:
            how = ("the outputs do not change at all when the inputs are zeroed" if res["max_output_change"] == 0
                   else "zeroed inputs are not clearly worse than the real ones")
            # an inferred loss (training_step computes its own: focal, InfoNCE) scores outputs the model was not
            # trained to calibrate for: unless the outputs do not move at all, that is a note
            inferred = spec.inferred and res["max_output_change"] != 0
            finding = Finding(self.name, "note" if inferred else "fail", f"{self.name}: {how}: {numbers}"
                              + (" (scored with a loss inferred from the targets, not the one training_step computes)"
                                 if inferred else "") + ". The model does not use its input, or "
                              "the input carries no information about the labels. HINT: if zero is a meaningful input "
                              "here, pass `baseline=` (e.g. inputs shuffled across the batch); raise `after_steps` if "
                              "training needs longer to learn anything.", res["difference"], res["threshold"], step,
                              list(_CAUSES), res)
        self._conclude(trainer, finding)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "batches": self._batches}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))
        self._batches = int(state_dict.get("batches", 0))


