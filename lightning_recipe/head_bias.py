"""``HeadBiasInit``: start the head at the loss-optimal constant prediction (the recipe's "init well")."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_recipe._base import OnFail, RecipeCheck
from lightning_recipe.findings import Finding


class HeadBiasInit(RecipeCheck):
    """Set the head (last layer) bias to the constant prediction that minimises the loss on the training labels.

    ``log p`` for a softmax (class weights and label smoothing included), log-odds per label for a sigmoid
    (``pos_weight`` included), the mean for MSE, the median for L1; any other loss is minimised numerically over a
    constant vector on the label sample. A class absent from the labels gets a pseudo-count of 0.5, so its bias is
    finite. Runs once, at ``on_train_start`` (the train dataloader exists), in place and on every rank; skipped on a
    resume (``trainer.ckpt_path`` set, or already done according to the checkpointed state) and when
    ``skip=True`` (e.g. a model loaded with ``load_from_checkpoint``).

    Removes the "hockey stick" of the first iterations: the loss starts at the label entropy (or the target
    variance) instead of ``log C`` (or ``E[y²]``). The prior that was set is in ``.prior`` and in a ``pass`` finding.

    Args:
        on_fail: what a configuration error does (``"raise"`` or ``"warn"`` and skip).
        skip: do nothing (keep a pretrained head).
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[HeadBiasInit()], logger=False)
    """

    def __init__(self, on_fail: OnFail = "raise", skip: bool = False, **kwargs: Any) -> None:
        super().__init__(on_fail, **kwargs)
        self.skip = skip
        self.done = False
        self.prior: list[float] = []

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.done or self.skip or trainer.ckpt_path is not None:
            why = ("skip=True" if self.skip else "resumed from a checkpoint: the trained bias is kept"
                   if trainer.ckpt_path is not None else "the bias was already set in an earlier fit of this model: "
                   "the trained bias is kept")
            self.findings.append(Finding(self.name, "skip", f"{self.name}: {why}."))
            return
        ctx = self._context(trainer, pl_module)
        if ctx is None:
            return
        if ctx.head_error is not None:
            self._config_error(ctx.head_error)
            return
        c, how = ctx.optimal()
        if not bool(torch.isfinite(c).all()):  # never write a non-finite bias: the model would train on NaN
            self.done = True
            self.findings.append(Finding(
                self.name, "skip", f"{self.name}: no finite constant minimises {ctx.spec.loss_name} over constant "
                f"outputs ({how} minimisation gave {[round(float(v), 4) for v in c.reshape(-1)[:5]]}): the loss is not "
                "bounded below for constant outputs of the model (it may take transformed outputs, e.g. "
                f"log-probabilities), so `{ctx.head_name}.bias` is left as it is. HINT: pass `loss_fn=` taking the "
                "model's own outputs, or `task=`.", step=trainer.global_step, details={"method": how}))
            return
        bias = ctx.head.bias
        before = bias.detach().float().reshape(-1).cpu().clone()
        with torch.no_grad():
            bias.copy_(c.reshape(bias.shape).to(device=bias.device, dtype=bias.dtype))
        self.done = True
        self.prior = [float(v) for v in c.reshape(-1)]
        spec = ctx.spec
        loss_before = ctx.constant_loss(before)
        loss_after = ctx.prior_loss()
        shown = ", ".join(f"{v:.4g}" for v in self.prior[:10]) + (" ..." if len(self.prior) > 10 else "")
        self.findings.append(
            Finding(
                self.name,
                "pass",
                f"{self.name}: set `{ctx.head_name}.bias` to the loss-optimal constant ({how}) for {spec.task} with "
                f"{spec.loss_name}: [{shown}]. Loss of the constant prediction {loss_before:.4g} -> {loss_after:.4g}."
                + "".join(f" Note: {n}." for n in spec.notes),
                measured=loss_after,
                expected=loss_before,
                step=trainer.global_step,
                details={"bias": self.prior, "method": how, "head": ctx.head_name, "labels": ctx.stats.summary()},
            )
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "prior": self.prior}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))
        self.prior = list(state_dict.get("prior", []))
