"""What :class:`~lightning_recipe.LossDecreaseCheck` knows of the loss it reads, mixed into it: whether a guessed loss
is the one training_step computes, and whether the returned loss is one objective of several."""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_recipe._core.conventions import prediction_of, split_batch
from lightning_recipe._core.head_guard import _loss_value
from lightning_recipe.exceptions import RecipeConfigError
from lightning_recipe.findings import Finding


# the first loss and the guessed loss of the same output within 10%: the same loss, up to what does not move the
# constant prediction's loss (mixup's second label set, label smoothing on near-uniform untrained outputs); another
# loss (InfoNCE over the batch: 3.3 against a cross-entropy's 2.3) is further off
_SAME_LOSS = 0.1
_ADVERSARIAL_BLOWUP = 1e3  # growth over the reference that is a blow-up even for one player of an adversarial game


class _LossGuess:
    """Mixed into :class:`~lightning_recipe.LossDecreaseCheck` (it reads and writes the check's state)."""

    name: str
    _reported: set[str]
    _settings: Any
    _ctx: Any

    def _tap_guess(self, pl_module: "pl.LightningModule", batch: Any, head: Optional[Any]) -> None:
        """With the loss inferred (no loss module, no ``loss_fn=``): keep the output of the first forward call of the
        first training step, or, when training_step calls a submodule instead (``self.net(x)``, ``self.encoder(x)``),
        the first output of the ``head`` whose output is the model's (forward hooks, removed at the step's end), to
        compare the guessed loss on it with the loss training_step returns (:meth:`_check_guess`)."""
        try:
            _, targets = split_batch(batch, self._settings.split_batch)
        except RecipeConfigError:
            return
        seen: dict[str, Any] = {}

        def hook(where: str) -> Any:
            def record(_m: Any, _args: Any, out: Any) -> None:
                if torch.is_grad_enabled():  # training_step's forward, not another check's probe (under no_grad)
                    seen.setdefault(where, prediction_of(out))
            return record

        handles = [pl_module.register_forward_hook(hook("model"))]
        if head is not None:
            handles.append(head.register_forward_hook(hook("head")))
        self._guess_tap = (handles, seen, targets)

    def _check_guess(self, trainer: "pl.Trainer", loss: Any) -> None:
        """The first step's loss against the guessed loss on the model's output in that step (one read, once): when
        they differ, training_step computes another loss (a contrastive or reconstruction loss on labelled batches,
        label smoothing, mixup), and the constant prediction's loss under the guess is no reference for it."""
        tap = self.__dict__.pop("_guess_tap", None)
        if tap is None:
            return
        handles, seen, targets = tap
        for h in handles:
            h.remove()
        out = seen.get("model", seen.get("head"))
        ctx = getattr(self, "_ctx", None)
        if ctx is None or not isinstance(out, Tensor) or not isinstance(targets, Tensor) or \
                not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        spec = ctx.spec
        try:
            o, y = spec.canonical_outputs(out.detach().float()).cpu(), spec.canonical_targets(targets.detach()).cpu()
        except Exception:  # the guess does not even apply to that output (2N views of N labelled examples)
            guess = math.nan
        else:
            guess = _loss_value(spec, o, y)  # NaN as well where the loss cannot take them
        got = float(loss.detach()) * trainer.accumulate_grad_batches
        if math.isfinite(got) and not (math.isfinite(guess) and math.isclose(got, guess, rel_tol=_SAME_LOSS, abs_tol=1e-4)):
            self._guess_off = (got, guess)

    def _unconfirmed(self, finding: Optional[Finding]) -> Optional[Finding]:
        """A verdict against the constant prediction's loss (plateau, above the prior) when the loss was guessed and
        the first step showed training_step computes another: a note, once per sub-check."""
        off = self.__dict__.get("_guess_off")
        if finding is None or off is None or not finding.failed or \
                finding.check not in (f"{self.name}.plateau", f"{self.name}.above_prior"):
            return finding
        name = self._ctx.spec.loss_name
        return self._note_once(finding, f"the loss was inferred as {name}, but training_step's first loss, "
                               f"{off[0]:.4g}, is not {name} of the model's output in that step "
                               f"({f'{off[1]:.4g}' if math.isfinite(off[1]) else 'it does not apply to that output'}): "
                               "it computes another loss, whose constant prediction this is not; pass `loss_fn=` for a "
                               "verdict")

    def _several_objectives(self, finding: Optional[Finding]) -> Optional[Finding]:
        """Under manual optimization with several optimizers (a GAN, an actor-critic) the returned loss is one player's
        objective, which need not fall: a generator's and a discriminator's losses stay near their equilibrium while
        the samples improve. Its trend (decrease, plateau, above the prior, divergence, blow-up, early epochs) is then
        a note; a non-finite loss and one below the loss's minimum still fail, and a blow-up beyond
        ``_ADVERSARIAL_BLOWUP`` times the reference still warns (a player that won outright: orders of magnitude)."""
        if finding is None or not self.__dict__.get("_adversarial") or finding.status not in ("fail", "warn") or \
                finding.check in (f"{self.name}.finite", f"{self.name}.floor") or (
                finding.check == f"{self.name}.blowup" and finding.details.get("growth", 0) > _ADVERSARIAL_BLOWUP):
            return finding
        return self._note_once(finding, f"manual optimization with {self._adversarial} optimizers: the returned loss "
                               "is one objective of several (adversarial training keeps its losses near an "
                               "equilibrium), so its trend is not judged")

    def _note_once(self, finding: Finding, why: str) -> Optional[Finding]:
        """``finding`` as a note saying ``why``, the first time its sub-check comes to it (``None`` after)."""
        key = f"note: {finding.check}"
        if key in self._reported:
            return None
        self._reported.add(key)
        finding.status = "note"
        finding.message += f"\n  note: {why}"
        return finding
