"""``HeadBiasInit``: start the head at the loss-optimal constant prediction (the recipe's "init well")."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_recipe._core.base import OnFail, RecipeCheck
from lightning_recipe._core.conventions import several_optimizers
from lightning_recipe._core.context import FitContext
from lightning_recipe._core.head_guard import guard_summary, keep_write
from lightning_recipe._core.sharding import full_params, sharding_skip
from lightning_recipe.exceptions import RecipeConfigError
from lightning_recipe.findings import Finding


class HeadBiasInit(RecipeCheck):
    """Set the head (last layer) bias to the constant prediction that minimises the loss on the training labels.

    ``log p`` for a softmax (class weights and label smoothing included), log-odds per label for a sigmoid
    (``pos_weight`` included), the mean for MSE, the median for L1; any other loss is minimised numerically over a
    constant vector on the label sample. A class absent from the labels gets a pseudo-count of 0.5, so its bias is
    finite. Runs once, at ``on_train_start`` (the train dataloader exists), in place and on every rank; skipped on a
    resume (``trainer.ckpt_path`` set, or already done according to the checkpointed state) and when
    ``skip=True`` (e.g. a model loaded with ``load_from_checkpoint``).

    The labels: ``dataset.targets`` (or ``labels``/``y``, a ``TensorDataset``'s last tensor) once the probe batch
    carries the same targets at its indices, else a time-bounded scan of a private loader (a note says why). With a
    ``WeightedRandomSampler`` in the training loader the prior is the sampled one (each example weighted by its
    sampling weight; a note says so). An ``IterableDataset`` is read by training only: the bias is
    then set at the first training batch, before its forward, from that batch's labels.

    Removes the "hockey stick" of the first iterations: the loss starts at the label entropy (or the target
    variance) instead of ``log C`` (or ``E[y²]``). The value that was set is in ``.prior`` and in a ``pass`` finding.

    A loss inferred from the targets (no loss module on the LightningModule, no ``loss_fn=``) is a guess, and a
    written bias is not undone by training: with a guessed cross-entropy the bias is written only when the model
    gives exactly one output per label value (a 16-wide embedding over ten digit labels is not a classifier of
    them), and never under manual optimization with several optimizers (a GAN's forward is its generator).

    Never makes the model worse: the loss of the model's *actual* output on the fit's probe batch is measured before
    and after the write (probe mode: eval, ``no_grad``, isolated RNG, so only the bias differs between the two), and
    the new bias is kept only when that loss did not rise by more than ``z`` standard errors of the per-example change
    (a bias right for the training set can raise the loss of a small probe batch by chance; one in front of a
    saturating ``tanh`` raises it on nearly every example). Otherwise the old bias is restored bit for bit and a
    ``skip`` finding gives both losses and the reason: a head whose output is transformed before the loss
    (``127.5 * (1 + tanh(head))``, ``sigmoid * range``, ``softplus``/``exp`` rates, a temperature: the output does
    not move one for one with the bias), or a term added after the head that already predicts the targets better
    than the constant (``out = x_last + head(h)``). When the transform is an exact elementwise ``a * g(head) + b`` on
    the probe batch (``g`` one of identity, sigmoid, tanh, softplus, exp), the constant is mapped through its inverse
    first, and that write goes through the same test. Under DDP rank zero's value is written on every rank, and the
    losses and their changes are summed over the ranks, so every rank takes the same decision for the global probe
    batch. Under FSDP the bias is written into the full parameters (``summon_full_params(writeback=True)``, on every
    rank) and re-sharded. Under DeepSpeed (its optimizer steps its own copy of the weights, ZeRO-3 partitions them)
    and ``ModelParallelStrategy`` (DTensor shards) a callback cannot write it: the check skips and says to set the
    bias in ``configure_model``.

    Args:
        on_fail: what a configuration error does (``"raise"`` or ``"warn"`` and skip).
        skip: do nothing (keep a pretrained head).
        z: standard errors of the per-example change of the probe batch's loss that a write may add and be kept.
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[HeadBiasInit()], logger=False)
    """

    _sets_head_bias = True  # other checks look for this marker (a check never imports another check)

    def __init__(self, on_fail: OnFail = "raise", skip: bool = False, z: float = 3.0, **kwargs: Any) -> None:
        super().__init__(on_fail, **kwargs)
        if not z > 0:
            raise RecipeConfigError(f"{self.name}: `z` must be > 0, got {z!r}.")
        self.skip = skip
        self.z = float(z)
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
        why_not = sharding_skip(trainer, self.name, "setting the head's bias", "set the head's bias in "
                                "`configure_model` (or before the fit), or run HeadBiasInit on a single device once")
        if why_not is not None:
            self.done = True
            self.findings.append(Finding(self.name, "skip", why_not))
            return
        ctx = self._context(trainer, pl_module)
        if ctx is None:
            return
        if ctx.head_error is not None:
            self._config_error(ctx.head_error)
            return
        spec = ctx.spec
        several = several_optimizers(trainer, pl_module)
        if spec.inferred and several:
            self.done = True
            self.findings.append(Finding(
                self.name, "skip", f"{self.name}: manual optimization with {several} optimizers (a GAN, "
                "an actor-critic) and no loss module on the LightningModule: the module's forward need not be a "
                f"predictor of the batch's targets (a generator), so `{ctx.head_name}.bias` is left as it is. HINT: "
                "pass `loss_fn=` and `head=` if the forward is a classifier or regressor of these targets.",
                step=trainer.global_step))
            return
        counts = getattr(ctx.stats, "class_counts", None)
        if spec.inferred and spec.task == "multiclass" and not spec.soft_targets and counts is not None \
                and bool((counts > 0).any()):
            used = int((counts > 0).nonzero().max()) + 1
            # a guessed cross-entropy is trusted only with one output per label value: an embedding or a projection
            # (contrastive learning on a labelled data set) has some other width
            if spec.num_outputs != used:
                self.done = True
                self.findings.append(Finding(
                    self.name, "skip", f"{self.name}: the loss was inferred from the targets as a cross-entropy, but "
                    f"the model gives {spec.num_outputs} outputs for labels in [0, {used - 1}]: the output is not "
                    f"logits over these labels (an embedding, a projection: the batch's labels may not be the loss's "
                    f"targets), so `{ctx.head_name}.bias` is left as it is. HINT: pass `loss_fn=`/`task=` if it is.",
                    step=trainer.global_step))
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
        with full_params(trainer, writeback=True):  # FSDP: written into the full bias on every rank, then re-sharded
            self._write_guarded(trainer, pl_module, ctx, c, how)

    def _write_guarded(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", ctx: FitContext, c: Tensor, how: str
    ) -> None:
        """Write the bias, keep it only when the loss of the model's actual output on the probe batch went down."""
        spec, bias = ctx.spec, ctx.head.bias
        view = ctx.head_view()
        old = bias.detach().clone()  # restored bit for bit when the write does not help
        before = old.float().reshape(-1).cpu()
        probe_before = ctx.actual_loss(refresh=True)
        value, mapped = c, False
        if view.transform is not None:  # set the constant in the space before the transform
            inv = view.transform.inverse(c)
            if inv is not None:
                value, mapped = inv, True
        # under DDP every rank writes the same value, decides the same way
        value = torch.tensor(trainer.strategy.broadcast([float(v) for v in value.reshape(-1)], src=0))
        with torch.no_grad():
            bias.copy_(value.reshape(bias.shape).to(device=bias.device, dtype=bias.dtype))
        probe_after = ctx.actual_loss(refresh=True)
        # under DDP the decision is taken on the global probe batch (the sums of every rank's), the same on every rank
        summary = guard_summary(probe_before, probe_after).float().to(pl_module.device)
        summary = trainer.strategy.reduce(summary, reduce_op="sum")
        keep, tol, lb, la = keep_write(summary.cpu(), self.z)
        self.done = True
        numbers = {"probe_loss_before": lb, "probe_loss_after": la, "tolerance": tol, "z": self.z,
                   "transform": view.transformed, "mapped": mapped, "method": how, "head": ctx.head_name}
        shown = _show([float(v) for v in c.reshape(-1)])
        if not keep:
            with torch.no_grad():
                bias.copy_(old)
            ctx.note_bias(False, probe_before)  # the model is as it was: so is its loss
            if view.transformed is not None:
                why, hint = view.transformed, ("set the bias yourself to the constant mapped through the inverse of "
                                               "the transform, or pass `head=` naming the layer whose output is the "
                                               "prediction")
            elif view.additive:
                why = ("the model adds a term to the head's output (a residual after the head) that already predicts "
                       "the targets better than the constant")
                hint = "set the bias yourself to the best constant for the targets minus that term"
            else:
                why = ("the outputs vary so much around the bias (initial spread "
                       f"{ctx.initial_output_std:.3g}) that the constant does not describe them, or this batch's labels "
                       "differ from the training set's")
                hint = ("if the spread is large, see InitialLossCheck (a head initialised too large, unscaled inputs); "
                        "else a larger batch size gives a more representative probe batch")
            after = ("; the checks that compare with a constant prediction judge the model's actual output instead"
                     if view.transformed is not None or view.additive else "")
            tried = (f"the constant mapped through the inverse of the transform, [{_show(value.tolist())}]" if mapped
                     else f"the loss-optimal constant ({how}) [{shown}]")
            self.findings.append(Finding(
                self.name, "skip", f"{self.name}: `{ctx.head_name}.bias` is left as it was: writing {tried} raised the "
                f"loss of the model's actual output on the probe batch ({spec.loss_name}, eval mode) from {lb:.6g} to "
                f"{la:.6g} (tolerance +{tol:.3g}: {self.z:g} standard errors of the per-example change). Reason: "
                f"{why}. The old bias is restored exactly{after}. HINT: {hint}.", measured=la, expected=lb, step=trainer.global_step,
                details={**numbers, "bias_tried": value.tolist(), "constant": [float(v) for v in c.reshape(-1)]}))
            return
        ctx.note_bias(True, probe_after)
        self.prior = [float(v) for v in value.reshape(-1)]
        probe = (f" Loss of the model's actual output on the probe batch {lb:.4g} -> {la:.4g}.")
        if view.transformed is None:
            loss_before, loss_after = ctx.constant_loss(before), ctx.prior_loss()
            message = (f"{self.name}: set `{ctx.head_name}.bias` to the loss-optimal constant ({how}) for {spec.task} "
                       f"with {spec.loss_name}: [{shown}]. Loss of the constant prediction {loss_before:.4g} -> "
                       f"{loss_after:.4g}.{probe}")
            measured, expected = loss_after, loss_before
        else:
            what = (f"[{_show(self.prior)}], the loss-optimal constant ({how}) [{shown}] mapped through the inverse of "
                    "the transform after the head" if mapped else f"the loss-optimal constant ({how}) [{shown}]")
            message = (f"{self.name}: set `{ctx.head_name}.bias` to {what} for {spec.task} with {spec.loss_name} "
                       f"({view.transformed}).{probe}")
            measured, expected = la, lb
        self.findings.append(Finding(
            self.name, "pass", message + "".join(f" Note: {n}." for n in spec.notes), measured=measured,
            expected=expected, step=trainer.global_step,
            details={"bias": self.prior, **numbers, "labels": ctx.stats.summary()}))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "prior": self.prior}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))
        self.prior = list(state_dict.get("prior", []))


def _show(values: list[float]) -> str:
    return ", ".join(f"{v:.4g}" for v in values[:10]) + (" ..." if len(values) > 10 else "")
