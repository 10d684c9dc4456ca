"""``PredictionDynamics``: predictions on a fixed batch over training, plotted with the labels."""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_recipe._core.base import OnFail, RecipeCheck
from lightning_recipe._core.conventions import (
    TaskSpec,
    planned_batches,
    probe_mode,
    run_forward,
    sanity_examples,
    take_examples,
)
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding
from lightning_recipe.functional.prediction import jitter_index
from lightning_recipe._core.dtypes import wide

_RECORDS = 50  # records per fit when `every_n_steps` is not given
_DEFAULT_EVERY = 25  # ... and the length of the fit is unknown


class PredictionDynamics(RecipeCheck):
    """Record the predictions on a fixed batch every ``every_n_steps`` batches and plot them with the labels.

    By default (``every_n_steps=None``) the fit gets about 50 records: every ``max(10, ceil(planned / 50))`` batches,
    ``planned`` being the batches the fit plans to run, at most one epoch apart (every 25 when unknown). A fit that
    runs longer than the spacing foresaw (early stopping under Lightning's default ``max_epochs=1000`` plans far more
    than it runs) drops every other record and doubles the spacing whenever it holds more than 100, so any fit keeps
    evenly spaced records, at most 100. A record is one forward of
    ``num_samples`` examples, about a third of a training step on batches of 32 (the small CNN of
    ``benchmarks/overhead.py``): spaced like this it costs under 1% of a fit of 1,500 batches or more, and 50
    snapshots are plenty for the figure and the jitter index.

    The fixed batch is the first validation batch seen in Lightning's sanity check, or, without one, a training
    batch drawn by a private sampler (training's iterators and random state are not touched); its first
    ``num_samples`` examples are kept. Each record is a forward in eval mode, under ``no_grad``, with the random state
    isolated, and every submodule's mode restored afterwards, so training is bit-identical with and without this
    callback. Records stay on the device and are copied to the host once per epoch.

    What is recorded: the probability of the true class per sample (multiclass; the mean over positions for
    sequence outputs ``(N, T, C)`` and segmentation maps), the predicted probability per label (binary/multilabel),
    the prediction (regression). Dense outputs of the other tasks (a logit or a value per pixel or step) are reduced
    per sample, so a record stays small: the mean probability of the true label over positions (per-pixel sigmoid),
    the mean prediction over positions per channel (dense regression, drawn against the targets' means, its jitter
    judged on the scale of one target value). Figures (``prediction_dynamics.png``) and arrays (``prediction_dynamics.npz``: ``steps``
    ``(S,)``, ``values`` ``(S, N, ...)``, ``targets``) go to ``<log_dir>/recipe/`` and to the loggers. The figure is
    redrawn during training every few records within the fit's time budget for live figures (see
    :mod:`lightning_recipe.report.live`: at most 0.5% of the training time by default; rendering a figure costs 0.1 to
    1 s on a CPU), and at the end of the fit.

    **Eval mode** (``PredictionDynamics.eval_mode``, at the first record; a ``fail``: it stops the fit under
    ``on_fail="raise"``, as in :func:`~lightning_recipe.strict`, and warns under ``on_fail="warn"``, as in
    :func:`~lightning_recipe.recommended`): two
    forwards of the fixed batch in eval mode from two different seeds must give the same predictions and the same
    input and output in every submodule (within ``1e-3`` of their scale, ``2e-2`` under 16-bit precision: GPU rounding
    passes, a dropped unit does not), since dropout is off and BatchNorm uses its running statistics in eval. When
    they differ, forward hooks name the first submodule whose input or output differs and whether its input did: a functional ``F.dropout(x, p)`` (``training`` defaults to True) between two
    modules, or a module switched back to train mode inside ``forward``. A model that samples on purpose (a VAE, MC
    dropout) fails this comparison by design: pass ``eval_mode=False`` to leave it out (with a preset, exclude
    ``"PredictionDynamics"`` and add ``PredictionDynamics(eval_mode=False)`` to the callbacks).

    **Jitter.** Each drawing also logs ``recipe/prediction_jitter``, the :func:`jitter_index` of the snapshots: how
    much the predictions move back and forth from one snapshot to the next, beyond their trend, relative to how far
    they travel (0: every prediction moves monotonically; 1: every snapshot reverses the previous one). At the end of
    the fit a finding ``PredictionDynamics.jitter`` (it never stops the fit) reports predictions that are

    * **frozen** (``warn``): no prediction changed between any two snapshots although training steps ran between them
      (beyond float rounding, ``1e-6`` of the largest prediction): learning rate zero, frozen or detached parameters,
      an optimizer that holds other parameters than the model's. A fit that trains at all moves some prediction by
      far more than rounding, so this never fires on a healthy fit;
    * **thrashing** (a ``note``, never a :class:`~lightning_recipe.RecipeWarning`): the index is above half of what
      pure snapshot-to-snapshot noise (predictions with no trend at all) gives for the same number of snapshots (about
      0.14 for 10 snapshots, 0.11 for 25, 0.097 for 50), and the jitter is at least 10% of the prediction scale
      (probabilities: 1; regression: the targets' standard deviation): the learning rate may be too high, or the batch
      too small for it. A note, because healthy and too-high-learning-rate fits overlap on every signal measured
      here. Measured (23 to 50 snapshots, 32 fixed validation samples): healthy fits of a small ResNet with
      BatchNorm, an LSTM with attention pooling, a transformer encoder with a padding mask, an MLP with SGD + momentum
      and one with a linear warm-up reached indices up to 0.22 (thresholds 0.097 to 0.112) with jitters up to 0.15
      once converged (a transformer at Adam 3e-3, 78-88% accuracy: 0.18 to 0.22; minibatch noise is all that is
      left once the trend stops); too-high learning rates gave 0.16 to 0.25 with jitters of 0.13 to 0.23, and Adam
      at lr=0.3 on an MLP 0.15 with a jitter of 0.09 (under the 10% bar). The loss on the fixed batch does not
      separate them either: the last snapshot's loss was 0.14 to 0.43 of the first in healthy fits and 0.13 to 0.77
      in too-high-learning-rate ones. A loss that does not fall, or diverges, is
      :class:`~lightning_recipe.LossDecreaseCheck`'s to judge.

    Args:
        every_n_steps: batches between two records (``None``: about 50 records over the planned fit, see above).
        num_samples: examples of the fixed batch to follow.
        on_fail: ``"raise"`` or ``"warn"``, for configuration errors and for randomness in eval mode.
        eval_mode: compare two eval-mode forwards at the first record (``False`` for a model that samples on purpose).
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[PredictionDynamics(every_n_steps=10)], logger=False)
    """

    def __init__(
        self, every_n_steps: Optional[int] = None, num_samples: int = 16, on_fail: OnFail = "raise",
        eval_mode: bool = True, **kwargs: Any,
    ) -> None:
        super().__init__(on_fail, **kwargs)
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise RecipeConfigError(f"{self.name}: `every_n_steps` must be a positive int, got {every_n_steps!r}.")
        if not isinstance(num_samples, int) or num_samples < 1:
            raise RecipeConfigError(f"{self.name}: `num_samples` must be a positive int, got {num_samples!r}.")
        self.every_n_steps = every_n_steps
        self._every = every_n_steps or _DEFAULT_EVERY  # this fit's spacing, set at train start
        if not isinstance(eval_mode, bool):
            raise RecipeConfigError(f"{self.name}: `eval_mode` must be True or False, got {eval_mode!r}.")
        self.num_samples = num_samples
        self.eval_mode = eval_mode
        self.steps: list[int] = []
        self.values: list[np.ndarray] = []
        self.targets: Optional[np.ndarray] = None
        self._target_std: Optional[float] = None
        self._pending: list[tuple[int, Tensor]] = []
        self._batch: Optional[tuple[Any, Tensor]] = None
        self._spec: Optional[TaskSpec] = None
        self._batches = 0
        self._drawn_at = 0

    # -- the fixed batch ------------------------------------------------------------------------------------------
    @override
    def on_validation_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._batch is None:  # validation batches that do not split: a training batch is used instead
            split = self._settings.split_batch
            self._batch = sanity_examples(trainer, batch, batch_idx, dataloader_idx, split, self.num_samples)
        if self._batch is not None or not trainer.sanity_checking:  # only the sanity check's first batch is taken
            self._retire("on_validation_batch_start")

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        ctx = self._context(trainer, pl_module)
        if ctx is None:
            return
        self._spec = ctx.spec
        if self._batch is None:
            self._batch = take_examples(ctx.inputs, ctx.targets, self.num_samples)
        self._batches = 0
        self._every = self.every_n_steps or _auto_every(trainer)
        if not self.steps and not self._pending:
            self._record(trainer, pl_module)
            if not self.eval_mode:
                finding = Finding(f"{self.name}.eval_mode", "skip", f"{self.name}: the eval-mode comparison is off "
                                  "(`eval_mode=False`).")
            else:
                try:
                    finding = self._eval_randomness(trainer, pl_module)
                except Exception as err:  # an aid, never a reason to stop the records
                    finding = Finding(f"{self.name}.eval_mode", "skip", f"{self.name}: the eval-mode comparison could "
                                      f"not run: {type(err).__name__}: {err}.")
            # a failure raises (on_fail="raise") or warns, the same on every rank
            self._conclude(trainer, finding)

    def _eval_randomness(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Finding:
        """Two forwards of the fixed batch in eval mode, from two different seeds, must agree (dropout is off in
        eval); where they do not, the first submodule (in execution order) whose output differs is named."""
        assert self._batch is not None
        x = self._batch[0]
        names = {m: n for n, m in pl_module.named_modules()}

        def run(seed: int) -> tuple[Tensor, list[tuple[str, Tensor]]]:
            seen: list[tuple[str, Tensor]] = []  # per call: module name, (input, output) fingerprints

            def hook(module: Any, args: Any, out: Any) -> None:
                inp = next((a for a in args if isinstance(a, Tensor)), None)
                seen.append((names.get(module, "?"), torch.stack([_fingerprint(inp), _fingerprint(out)])))

            handles = []
            try:
                for m in pl_module.modules():
                    if m is not pl_module:
                        try:
                            handles.append(m.register_forward_hook(hook))
                        except RuntimeError:  # a scripted/traced submodule takes no hook: it goes unnamed
                            pass
                with probe_mode(trainer, pl_module):
                    torch.manual_seed(seed)  # inside the isolated random state
                    out = run_forward(pl_module, x, self._settings.forward).detach().float()
            finally:
                for h in handles:
                    h.remove()
            return out, seen

        (a, seen_a), (b, seen_b) = run(1), run(2)
        # half precision: a nondeterministic reduction (index_add, scatter_add on a GPU) differs by a few bf16 ulps
        rtol = _EVAL_RTOL if "16" not in str(trainer.precision) else _EVAL_RTOL_HALF
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        scale = float(a.abs().max()) if a.numel() else 0.0
        name = f"{self.name}.eval_mode"
        first: Optional[int] = None
        differs: list[list[bool]] = []
        if len(seen_a) == len(seen_b) and seen_a:
            fa = torch.stack([f for _, f in seen_a])  # (calls, input/output, 2 sums)
            fb = torch.stack([f for _, f in seen_b])
            differs = ((fa - fb).abs() > rtol * (fa.abs() + fb.abs() + 1e-12)).any(-1).tolist()
            first = next((i for i, row in enumerate(differs) if any(row)), None)  # its input or its output
        if not diff > rtol * max(scale, 1e-12) and first is None:
            return Finding(name, "pass", f"{self.name}: two forwards of the fixed batch in eval mode from different "
                           "seeds give the same predictions, module by module (dropout and other noise are off in "
                           "eval).", diff, rtol * scale, trainer.global_step)
        where = ""
        if first is not None:
            module = seen_a[first][0]
            where = (f" The first module whose input or output differs is `{module}`, and its input differs: the "
                     "randomness is in code between modules (a functional `F.dropout(x, p)`, which defaults to "
                     "training=True, or noise added in a forward)." if differs[first][0] else
                     f" The first module whose output differs is `{module}`, on the same input: the module itself "
                     "is random in eval mode (switched back to train mode, or noise inside it).")
        return Finding(name, "fail", f"{self.name}: two forwards of the fixed batch in EVAL mode from different seeds "
                       f"give different results (largest difference of the predictions {diff:.4g}, predictions up to "
                       f"{scale:.4g}): something random runs when the model is evaluated, so validation metrics are "
                       f"noisy and biased.{where} HINT: make the randomness follow the mode "
                       "(`F.dropout(x, p, training=self.training)`, or an `nn.Dropout` module); if the model samples "
                       "on purpose (a VAE, MC dropout), pass `PredictionDynamics(eval_mode=False)` (with a preset: "
                       "`exclude=[\"PredictionDynamics\"]` and that callback added).",
                       diff, rtol * scale, trainer.global_step, list(_EVAL_RANDOM),
                       {"max_difference": diff, "scale": scale, "first_module": seen_a[first][0] if first is not None
                        else None})

    # -- records --------------------------------------------------------------------------------------------------
    def _summarise(self, out: Tensor, y: Tensor) -> Tensor:
        spec = self._spec
        assert spec is not None
        n = y.shape[0] if y.ndim else 1
        canon = spec.canonical_outputs(out.float())
        if spec.task == "multiclass":
            probs = torch.softmax(canon, dim=-1)
            yt = spec.canonical_targets(y)
            if spec.soft_targets:
                p_true = (probs * yt).sum(-1)
                valid = torch.ones_like(p_true)
            else:
                valid = (yt != spec.ignore_index).float() if spec.ignore_index is not None else torch.ones_like(yt, dtype=torch.float)
                p_true = probs.gather(1, yt.clamp(0, spec.num_outputs - 1).unsqueeze(1)).squeeze(1) * valid
            p_true, valid = p_true.reshape(n, -1), valid.reshape(n, -1)
            return p_true.sum(1) / valid.sum(1).clamp_min(1)
        if spec.task in ("binary", "multilabel") and spec.dense:  # per pixel: the mean p(true label) of each example
            yt = spec.canonical_targets(y)
            p = torch.sigmoid(canon)
            return torch.where(yt > 0.5, p, 1 - p).reshape(n, -1).mean(1)
        if spec.task in ("binary", "multilabel"):
            return torch.sigmoid(canon).reshape(n, -1)
        if spec.dense:  # per position: the mean prediction of each example and channel (bounded memory per record)
            return canon.reshape(n, -1, spec.num_outputs).mean(1)
        return canon.reshape(n, -1)

    def _record(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._batch is None or self._spec is None:
            return
        x, y = self._batch
        with probe_mode(trainer, pl_module):
            out = run_forward(pl_module, x, self._settings.forward)
        self._pending.append((trainer.global_step, self._summarise(out.detach(), y).detach()))
        if self.every_n_steps is None and len(self.steps) + len(self._pending) > 2 * _RECORDS:
            self._thin()

    def _thin(self) -> None:
        """Keep every other record and double the spacing (the records stay evenly spaced, at most 100)."""
        self._to_host()
        self.steps, self.values = self.steps[::2], self.values[::2]
        self._every *= 2
        self._drawn_at //= 2

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batches += 1
        if self._batches % self._every == 0:
            self._record(trainer, pl_module)
            self._live_figure(trainer, "recipe/prediction_dynamics", self._draw_live)  # a record is this check's read

    def _draw_live(self, trainer: "pl.Trainer") -> None:
        """A redraw during training: the records to the host (one copy, only when a redraw is granted), then the
        figure."""
        self._to_host()
        self._draw(trainer)

    def _to_host(self) -> None:
        if self._pending:
            stacked = torch.stack([v for _, v in self._pending]).cpu().numpy()  # one copy per epoch
            self.steps.extend(s for s, _ in self._pending)
            self.values.extend(stacked)
            self._pending.clear()
        if self.targets is None and self._batch is not None:
            y = self._batch[1].detach()
            self.targets = _recorded_targets(self._spec, y).cpu().numpy()
            if self._spec is not None and self._spec.dense and y.numel() > 1 and y.is_floating_point():
                self._target_std = float(wide(y).std())  # a prediction's size: a pixel's, not a mean's

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # live: the jitter so far; without a logger the records stay on the device until a redraw, a checkpoint, a
        # thinning or the end (at most 100 records of `num_samples` values each)
        if trainer.loggers and trainer.is_global_zero and len(self.steps) + len(self._pending) >= 2:
            self._to_host()
            index = self._jitter()["index"]
            self._publish(trainer, {"recipe/prediction_jitter": index if np.isfinite(index) else None})

    @override
    def _finish(self, trainer: "pl.Trainer", failed: bool = False) -> None:
        self._to_host()
        if not self.values:
            return
        if self._drawn_at != len(self.values) or not self.figures:
            self._draw(trainer)
        if self._spec is None:
            return
        finding = self._jitter_finding(trainer)
        if finding.status == "warn":
            rank_zero_warn(finding.message, category=RecipeWarning)
        self.findings.append(finding)

    def _jitter(self) -> dict[str, Any]:
        values = np.stack(self.values) if self.values else np.empty((0, 0))
        return jitter_index(values, self._scale(), np.asarray(self.steps))

    def _scale(self) -> float:
        """The size of a prediction: 1 for probabilities, the targets' standard deviation for regression."""
        if self._spec is None or self._spec.task != "regression":
            return 1.0
        if self._target_std is not None and math.isfinite(self._target_std) and self._target_std > 0:
            return self._target_std
        t = np.asarray(self.targets, dtype=float) if self.targets is not None and np.size(self.targets) > 1 else None
        if t is None or not np.isfinite(t).all():
            t = np.asarray(self.values[-1], dtype=float) if self.values else None
        scale = float(np.std(t)) if t is not None and t.size > 1 and np.isfinite(t).all() else 0.0
        return scale if scale > 0 else 1.0

    def _jitter_finding(self, trainer: "pl.Trainer") -> Finding:
        j = self._jitter()
        n_snap, n = len(self.values), self.values[0].shape[0]
        head = (f"{self.name}: {n_snap} snapshots of {n} fixed samples ({self._spec.task if self._spec else '?'}), "
                f"steps {self.steps[0]}..{self.steps[-1]}")
        details = {k: v for k, v in j.items()}
        if j["frozen"]:
            return Finding(f"{self.name}.jitter", "warn", f"{head}: the predictions are FROZEN: the largest change "
                           f"between two snapshots is {j['max_change']:.3g} (rounding level {j['frozen_tol']:.3g}) although "
                           f"{self.steps[-1] - self.steps[0]} optimizer steps ran. Nothing learns.", j["max_change"],
                           j["frozen_tol"], trainer.global_step, list(_FROZEN), details)
        if j["thrash"]:  # a note: healthy fits of converged models reach it too (see the class docstring)
            return Finding(f"{self.name}.jitter", "note", f"{head}: the predictions THRASH: jitter index "
                           f"{j['index']:.3g} above {j['threshold']:.3g} (half the index of pure snapshot-to-snapshot noise, "
                           f"{j['noise_reference']:.3g}, for {n_snap} snapshots); they jump by {j['jitter']:.3g} (RMS) "
                           f"against a travel of {j['movement']:.3g}. Healthy fits that have converged reach this "
                           "too (minibatch noise is all that is left): worth a look if the loss is not falling. HINT: "
                           "lower the learning rate, or record more often (`every_n_steps`) to see the oscillation.",
                           j["index"], j["threshold"], trainer.global_step, list(_THRASH), details)
        if not np.isfinite(j["index"]):
            note = "too few snapshots (or non-finite predictions) to measure the jitter"
            return Finding(self.name, "pass", f"{head}; {note}.", None, None, trainer.global_step, [], details)
        return Finding(self.name, "pass", f"{head}; jitter index {j['index']:.3g} (thrash above {j['threshold']:.3g}).",
                       j["index"], j["threshold"], trainer.global_step, [], details)

    def _draw(self, trainer: "pl.Trainer") -> None:
        self._drawn_at = len(self.values)
        if not trainer.is_global_zero or self._dir is None or self._spec is None:
            return
        from lightning_recipe.report.loggers import log_figure
        from lightning_recipe.report.plotting import plot_prediction_dynamics

        steps, values = np.asarray(self.steps), np.stack(self.values)
        j = self._jitter()
        try:
            os.makedirs(self._dir, exist_ok=True)
            np.savez(os.path.join(self._dir, "prediction_dynamics.npz"), steps=steps, values=values,
                     targets=self.targets if self.targets is not None else np.empty(0), task=self._spec.task,
                     jitter_index=j["index"])
        except OSError as err:  # a file we cannot write never stops the fit
            from lightning_recipe.report.loggers import unwritable

            unwritable(trainer, self._dir, err)
        self._publish(trainer, {"recipe/prediction_jitter": j["index"] if np.isfinite(j["index"]) else None})
        sequence = self.targets is not None and self.targets.ndim >= 2 and self._spec.task == "multiclass"
        jitter = j["index"] if np.isfinite(j["index"]) else None
        if self._spec.dense and self._spec.task in ("binary", "multilabel"):  # one mean p(true label) per example
            fig = plot_prediction_dynamics(steps, values, None, "multiclass", jitter, sequence=True,
                                           what="mean p(true label) over positions")
        else:
            what = "mean prediction over positions" if self._spec.dense and self._spec.task == "regression" else None
            fig = plot_prediction_dynamics(steps, values, self.targets, self._spec.task, jitter, sequence=sequence,
                                           what=what)
        path = log_figure(trainer, "recipe/prediction_dynamics", fig, trainer.global_step, self._dir)
        if path and path not in self.figures:
            self.figures.append(path)

    @override
    def state_dict(self) -> dict[str, Any]:
        self._to_host()
        return {"steps": list(self.steps), "values": [v.tolist() for v in self.values]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict.get("steps", []))
        self.values = [np.asarray(v) for v in state_dict.get("values", [])]


def _recorded_targets(spec: Optional[TaskSpec], y: Tensor) -> Tensor:
    """The fixed batch's targets as the records summarise them: per-example (and per-channel) means of a dense
    regression target, whole targets otherwise."""
    if spec is None or not spec.dense or spec.task != "regression" or y.ndim == 0:
        return y
    return spec.canonical_targets(y).reshape(y.shape[0], -1, spec.num_outputs).mean(1)


def _auto_every(trainer: "pl.Trainer") -> int:
    """Batches between two records when ``every_n_steps`` is not given (see :class:`PredictionDynamics`)."""
    planned = planned_batches(trainer)
    if planned is None:
        return _DEFAULT_EVERY
    every = math.ceil(planned / _RECORDS)
    per_epoch = float(trainer.num_training_batches)
    if math.isfinite(per_epoch) and per_epoch >= 1:
        every = min(every, int(per_epoch))
    return max(10, every)


_EVAL_RTOL = 1e-3  # relative difference between two eval forwards that is not rounding
_EVAL_RTOL_HALF = 2e-2  # ... under 16-bit precision (a bf16 ulp is 4e-3 of the value)
_EVAL_RANDOM = [
    "functional dropout `F.dropout(x, p)`: its `training` argument defaults to True; pass `training=self.training`",
    "noise or sampling in forward that does not check `self.training`",
    "a Dropout/BatchNorm module switched back to train mode inside forward (`.train()`)",
]


def _fingerprint(t: Any) -> Tensor:
    """Two sums that tell two tensors apart (without keeping the activations), on the tensor's device."""
    if not isinstance(t, Tensor) or not t.numel() or not (t.is_floating_point() or t.is_complex()):
        return torch.zeros(2)
    v = t.detach().float()
    return torch.stack([v.sum(), v.abs().sum()]).cpu()


_FROZEN = [
    "learning rate zero (or a schedule that decayed it to zero)",
    "parameters frozen (requires_grad=False) or detached from the loss",
    "the optimizer holds other parameters than the model's (built before the layers were replaced)",
    "optimizer.step() missing in manual optimization",
]
_THRASH = [
    "learning rate too high: each step overshoots and the next one corrects",
    "batch too small for the learning rate (gradient noise dominates)",
    "no learning-rate warmup or decay where one is needed",
]


