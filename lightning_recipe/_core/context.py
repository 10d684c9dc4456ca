"""What every recipe callback of one fit shares: the probe batch, the task, the head and the label statistics.

Computed once per fit (per set of overrides) by the first callback that needs it, at ``on_train_start`` (the
train dataloader exists, ``global_step == 0``) and cached on the trainer.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_recipe._core.conventions import (
    TaskSpec,
    _Settings,
    find_head,
    find_loss,
    probe_mode,
    resolve_module,
    resolve_task,
    run_forward,
    split_batch,
)
from lightning_recipe._core.head_guard import HeadView, head_view, probe_loss
from lightning_recipe._core.labels import first_batch, label_stats
from lightning_recipe._core.sharding import full_params, full_tensor
from lightning_recipe.exceptions import RecipeConfigError
from lightning_recipe.functional.constants import LabelStats, constant_loss, optimal_constant

_CACHE: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


class FitContext:
    """The facts of one fit that several callbacks need."""

    # HeadBiasInit's verdict: True when it wrote the bias and kept it, False when the write raised the loss of the
    # model's actual output and the old bias was put back, None when it did not run (yet)
    bias_applied: Optional[bool] = None
    _view: Optional[HeadView] = None
    _actual: Optional[tuple[float, Tensor]] = None

    def __init__(self, trainer: Any, pl_module: nn.Module, settings: _Settings, max_batches: int = 100) -> None:
        self._trainer = weakref.ref(trainer)  # the cache is keyed by the trainer: no strong reference back
        self.pl_module, self.settings, self.max_batches = pl_module, settings, max_batches
        self.batch = first_batch(trainer)
        self.inputs, self.targets = split_batch(self.batch, settings.split_batch)
        loss_fn = find_loss(pl_module, settings.loss_fn)

        def call() -> Tensor:
            return run_forward(pl_module, self.inputs, settings.forward)

        with probe_mode(trainer, pl_module):
            if settings.head is None:
                self.head, self.head_name, out, self.head_how = find_head(pl_module, call)
            else:
                if isinstance(settings.head, str):
                    self.head, self.head_name = resolve_module(pl_module, settings.head), settings.head
                else:
                    self.head, self.head_name = settings.head, _given_head_name(pl_module, settings.head)
                out, self.head_how = call(), "given by `head=`"
        self.initial_output = out.detach()
        self.spec: TaskSpec = resolve_task(loss_fn, out, self.targets, settings.task, head=self.head)
        if self.spec.probabilities and self.head is not None and self.head_how.startswith("output identical"):
            # BCELoss on the head's own output: logits that happen to lie in [0, 1]; training_step applies the sigmoid
            self.spec.probabilities = False
        canon = self.spec.canonical_outputs(out.detach().float())
        self.head_error: Optional[str] = None
        if self.head is None:
            self.head_error = (
                f"Found no head: no module with a bias produces the model output {tuple(out.shape)} (is the last "
                "layer built with bias=False?). HINT: give the last layer a bias (e.g. nn.Linear(..., bias=True)), "
                "pass `head=` (an attribute path such as 'classifier' or 'net.3', or the module), or keep the model "
                "as it is with HeadBiasInit(skip=True)."
            )
        elif not isinstance(getattr(self.head, "bias", None), nn.Parameter):
            self.head_error = (
                f"The head `{self.head_name}` ({type(self.head).__name__}) has no bias. HINT: give the last layer a bias "
                "(e.g. nn.Linear(..., bias=True)) or pass `head=` naming the layer that has one."
            )
        elif self.head.bias.numel() != self.spec.num_outputs:
            self.head_error = (
                f"The head `{self.head_name}` has a bias of shape {tuple(self.head.bias.shape)}, but the "
                f"{self.spec.task} task has {self.spec.num_outputs} outputs (model outputs {tuple(out.shape)}: a "
                "bias has one entry per output, per channel of a dense output, or one in all). HINT: pass `head=` "
                "naming the last layer (the one whose output is the prediction)."
            )
        # the spread of the initial outputs around the head bias (what InitialLossCheck's noise model assumes);
        # around the mean output when there is no usable head
        if self.head_error is None and canon.shape[-1] == self.head.bias.numel():
            dev = canon - full_tensor(self.head.bias.detach()).float().reshape(1, -1).to(canon.device)
        else:
            dev = canon - canon.mean(0, keepdim=True)
        self.initial_output_std = float(dev.pow(2).mean().sqrt()) if canon.shape[0] > 1 else 0.0
        self._stats: Optional[LabelStats] = None
        self._optimal: Optional[tuple[Tensor, str]] = None
        self._last_loss: Optional[tuple[Tensor, float]] = None

    @property
    def trainer(self) -> Any:
        return self._trainer()

    @property
    def stats(self) -> LabelStats:
        if self._stats is None:
            self._stats = label_stats(
                self.trainer, self.pl_module, self.spec, self.targets, self.settings.split_batch, self.max_batches
            )
        return self._stats

    def optimal(self) -> tuple[Tensor, str]:
        """The loss-optimal constant prediction and how it was found."""
        if self._optimal is None:
            s = self.spec
            self._optimal = optimal_constant(
                s.task, self.stats, s.loss, s.loss_name, s.weight, s.label_smoothing, s.pos_weight
            )
        return self._optimal

    def constant_loss(self, constant: Tensor) -> float:
        """Loss of predicting ``constant`` for every training label (the last value is kept: checks ask at once)."""
        if self._last_loss is None or not torch.equal(self._last_loss[0], constant):
            self._last_loss = (constant.clone(), constant_loss(self.spec.loss, constant, self.stats.sample))
        return self._last_loss[1]

    def prior_loss(self) -> float:
        """Loss of the best constant prediction on the training labels: all that the label prior explains."""
        return self.constant_loss(self.optimal()[0])

    def head_view(self) -> HeadView:
        """How the head's output relates to the model's output (one probe forward, the first time, when the head was
        not found as the model's output itself)."""
        if self._view is None:
            with full_params(self.trainer, writeback=True):  # FSDP: the full bias, shifted and put back on every rank
                self._view = head_view(self)
        return self._view

    @property
    def output_transformed(self) -> Optional[str]:
        """Why the head's bias is not the model's constant prediction (the model's output does not move one for one
        with it: the head's output is transformed before the loss), or ``None`` when it does, or when there is no
        usable head."""
        return self.head_view().transformed if self.head_error is None else None

    def bias_is_constant(self) -> bool:
        """Whether the head's bias is the constant the model predicts at init (what the constant-prediction checks
        assume): a usable head, the model's output moving one for one with its bias, and not a term added after the
        head that predicts the targets better than the loss-optimal constant did (HeadBiasInit put the bias back)."""
        if self.head_error is not None or self.output_transformed is not None:
            return False
        return not (self.bias_applied is False and self.head_view().additive)

    def actual_loss(self, refresh: bool = False) -> tuple[float, Tensor]:
        """The loss of the model's actual output on the probe batch (probe mode), and per group of its examples;
        measured once (``refresh`` measures again and keeps the new value)."""
        if self._actual is None or refresh:
            self._actual = probe_loss(self)
        return self._actual

    def note_bias(self, applied: bool, loss: tuple[float, Tensor]) -> None:
        """HeadBiasInit's verdict, and the loss of the model's actual output on the probe batch that it left."""
        self.bias_applied, self._actual = applied, loss

    def current_constant(self) -> Tensor:
        """The constant the model predicts at init: its head bias (zeros without a usable head)."""
        if self.head_error is None:
            with full_params(self.trainer):  # FSDP: the full bias, not this rank's shard
                return full_tensor(self.head.bias.detach()).float().reshape(-1).cpu().clone()
        return torch.zeros(self.spec.num_outputs)


def _given_head_name(pl_module: nn.Module, head: nn.Module) -> str:
    """The name of the module given as ``head=`` inside ``pl_module``; a module outside it is a configuration error
    (its bias would be written and checked while the model's output never depends on it)."""
    name = next((n for n, m in pl_module.named_modules() if m is head), None)
    if name is None:
        raise RecipeConfigError(
            f"`head=` was given a {type(head).__name__} that is not a submodule of {type(pl_module).__name__}: its "
            "bias does not reach the model's output. HINT: pass `head=` the model's own last layer (the module, or "
            "an attribute path such as 'classifier' or 'net.3')."
        )
    return name


def new_fit(trainer: Any) -> None:
    """Forget the context of a previous fit on this trainer."""
    _CACHE.pop(trainer, None)


def get_context(trainer: Any, pl_module: nn.Module, settings: _Settings, max_batches: int = 100) -> FitContext:
    """The shared context for this fit and these overrides (computed on first use)."""
    per_trainer = _CACHE.setdefault(trainer, {})
    key = settings.key()
    if key not in per_trainer:
        with full_params(trainer):  # FSDP: the head's full bias (its shape is checked against the outputs)
            per_trainer[key] = FitContext(trainer, pl_module, settings, max_batches)
    return per_trainer[key]
