"""``GeneralizationCheck``: after the loss goes down, training vs validation loss (the recipe's "overfit, then
regularize"): a model that does not transfer, the onset of overfitting, and the bias/variance verdict."""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_recipe._core.base import OnFail, RecipeCheck
from lightning_recipe._core.conventions import TaskSpec, probe_mode, run_forward, split_batch, take_examples
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding
from lightning_recipe.functional.generalization import bias_variance
from lightning_recipe.functional.input_dependence import per_example_loss
from lightning_recipe._core.dtypes import wide, wide_dtype

_NO_TRANSFER_CAUSES = [
    "validation data preprocessed differently from the training data (another scaler, normalisation or tokenizer)",
    "labels mapped differently per split (another class-index order)",
    "the model memorised noise: labels that do not depend on the inputs, or far too little data for the model",
    "validation inputs paired with the wrong labels",
]
_OVERFIT_CAUSES = [
    "the model is too large for the data, or too little data (high variance)",
    "no or too little regularization (weight decay, dropout, augmentation)",
    "no early stopping or checkpoint on a validation metric: the last weights are not the best ones",
]
_ADVICE = {
    "high bias": "the model does not fit the training data well: a larger model, longer training, a higher learning "
                 "rate or less regularization",
    "high variance": "the model fits training much better than validation: more data or augmentation, more "
                     "regularization (weight decay, dropout), a smaller model, early stopping",
    "high bias and high variance": "neither fits well: first fit the training data (a larger model, longer training), "
                                   "then regularize",
    "neither": "training and validation agree and the training loss is well below the label prior",
}


class GeneralizationCheck(RecipeCheck):
    """Training vs validation loss on fixed samples, at every validation epoch end: the model must transfer; the
    onset of overfitting is reported; a bias/variance verdict ends the fit.

    Two fixed samples of at most ``num_examples`` examples each: the first training batches of the fit (as training
    sees them) and the first batches of the first validation run after the sanity check. At each validation
    epoch end both are scored in eval mode with the loss the other checks use (the conventions' loss on the model's
    output, so it does not depend on what ``training_step`` logs), next to ``P``, the loss of the best constant
    prediction (the label prior of the training set) on the same examples. With ``floor`` the loss's minimum, the
    share of the prior loss left is ``r = (L - floor) / (P - floor)`` (0: perfect, 1: nothing learned beyond the
    prior).

    * ``GeneralizationCheck.transfer`` (fail): training learned (``r_train <= 0.5``) but validation gained nothing
      significant over the constant prediction, and less than a quarter of what training gained. For classification
      the gain is accuracy over the constant prediction's accuracy (significant above ``z`` binomial standard
      errors); otherwise it is ``P_val - L_val`` (significant above ``z`` standard errors of the per-example
      difference) against training's ``(1 - r_train) * (P - floor)``. The first evaluation with a significant gain
      passes; one before training has learned is not judged. A healthy model gains on held-out data as soon as it
      gains on training data (a small validation set only widens the noise band, and the quarter keeps a
      mediocre but real gain from failing); one that does not has a broken split (preprocessing, label mapping) or
      memorised noise.
    * ``GeneralizationCheck.overfit``: the validation loss rose for ``patience`` evaluations after its best while the
      training loss fell, by more than ``z`` standard errors of the paired difference and by more than ``min_rise`` of
      what validation had gained over the prior. A ``warn`` when it costs the validation metric (for classification
      the validation accuracy fell significantly from its best, for regression the loss is the metric) and no
      ``ModelCheckpoint``/``EarlyStopping`` monitors a validation metric; otherwise a ``note`` (a checkpoint or early
      stopping on a validation metric already keeps the best weights; a rising cross-entropy with steady accuracy is
      over-confidence).
    * ``GeneralizationCheck.verdict`` (note, at the end): train and validation ``r`` (and accuracy), the gap, and
      high bias (``r_train > bias_threshold``) / high variance (``r_val - r_train > variance_gap``) / both / neither,
      with what to try.
    * ``GeneralizationCheck.worst`` (note, at the end): the ``top_k`` examples of the validation sample (the training
      sample when no validation run ended) with the highest loss, listed with label, prediction and loss and drawn in the figure
      ``recipe/worst_examples``; for classification, label-issue candidates: examples predicted as another class with
      probability >= ``confident``, ranked by the probability of their given label (``cleanlab``'s
      ``find_label_issues`` on these held-out predictions when ``cleanlab`` is installed).
    * Without a validation loop a ``skip`` finding says so.

    A figure (``recipe/generalization``) shows both losses per evaluation with the constant-prediction line and the
    best epoch marked, redrawn at each evaluation within the live-figure time budget
    (:mod:`lightning_recipe.report.live`) and at the end. Scalars ``recipe/generalization/train_loss`` and ``.../val_loss`` go to the loggers at each
    evaluation. Under DDP each rank scores its own samples and the sums are reduced.

    Args:
        on_fail: ``"raise"`` or ``"warn"``.
        num_examples: examples in each fixed sample (taken from at most 16 batches).
        patience: evaluations after the best validation loss before overfitting is judged.
        min_rise: share of the validation gain over the prior that the validation loss must give back.
        z: standard errors that count as significant.
        bias_threshold: share of the prior loss left on training above which the verdict says high bias.
        variance_gap: difference of that share between validation and training above which it says high variance.
        top_k: examples with the highest loss listed and drawn at the end (0: none).
        confident: probability of another class above which a misclassified example is a label-issue candidate.
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[GeneralizationCheck(patience=5)], logger=False)
    """

    def __init__(
        self,
        on_fail: OnFail = "raise",
        num_examples: int = 256,
        patience: int = 3,
        min_rise: float = 0.1,
        z: float = 3.0,
        bias_threshold: float = 0.5,
        variance_gap: float = 0.25,
        top_k: int = 8,
        confident: float = 0.9,
        **kwargs: Any,
    ) -> None:
        super().__init__(on_fail, **kwargs)
        for name, v in (("num_examples", num_examples), ("patience", patience)):
            if not isinstance(v, int) or v < 1:
                raise RecipeConfigError(f"{self.name}: `{name}` must be a positive int, got {v!r}.")
        for name, v in (("min_rise", min_rise), ("bias_threshold", bias_threshold), ("variance_gap", variance_gap)):
            if not 0 < v <= 1:
                raise RecipeConfigError(f"{self.name}: `{name}` must be in (0, 1], got {v!r}.")
        self.num_examples, self.patience, self.min_rise, self.z = num_examples, patience, float(min_rise), float(z)
        self.bias_threshold, self.variance_gap = float(bias_threshold), float(variance_gap)
        if not isinstance(top_k, int) or top_k < 0:
            raise RecipeConfigError(f"{self.name}: `top_k` must be an int >= 0, got {top_k!r}.")
        self.top_k, self.confident = top_k, float(confident)
        self.history: list[dict[str, Any]] = []
        self._train: list[tuple[Any, Tensor]] = []
        self._val: list[tuple[Any, Tensor]] = []
        self._best_val: Optional[Tensor] = None  # per-example validation losses at the best evaluation
        self._best_correct: Optional[Tensor] = None
        self._transfer_done = False
        self._overfit_done = False

    # -- the fixed samples ----------------------------------------------------------------------------------------
    def _collect(self, store: list, batch: Any) -> bool:
        """Add the examples of ``batch`` to ``store``; whether the store is full."""
        have = sum(int(y.shape[0]) for _, y in store)
        if have < self.num_examples and len(store) < 16:
            try:
                x, y = split_batch(batch, self._settings.split_batch)
            except RecipeConfigError:
                return True
            if not isinstance(y, Tensor) or y.ndim == 0:
                return True
            store.append(take_examples(x, y, self.num_examples - have))
            have += int(store[-1][1].shape[0])
        return have >= self.num_examples or len(store) >= 16

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.enable_validation:  # nothing to compare with: gather nothing (the verdict says why)
            self._retire("on_train_batch_start", "on_validation_batch_start")
            return
        self._ctx = self._context(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self._disabled or self._collect(self._train, batch):
            self._retire("on_train_batch_start")

    @override
    def on_validation_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != 0 or trainer.sanity_checking:  # the first real validation run gives the sample
            return
        if self._disabled or self._collect(self._val, batch):
            self._retire("on_validation_batch_start")

    # -- the evaluation -------------------------------------------------------------------------------------------
    def _score(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", store: list) -> dict[str, Tensor]:
        """Per-example loss, constant-prediction loss and correctness (classification) of a fixed sample."""
        ctx, spec = self._ctx, self._ctx.spec
        const = ctx.optimal()[0].float().reshape(1, -1)
        losses, priors, correct, const_correct = [], [], [], []
        with probe_mode(trainer, pl_module):
            outs = [run_forward(pl_module, x, self._settings.forward).detach() for x, _ in store]
        for out, (_, y) in zip(outs, store):
            n = int(y.shape[0])
            canon = spec.canonical_outputs(out.float()).cpu()
            yt = spec.canonical_targets(y.detach()).cpu()
            losses.append(per_example_loss(spec.loss, canon, yt, n))
            priors.append(per_example_loss(spec.loss, const.expand(canon.shape[0], -1), yt, n))
            hit = _correct(spec, canon, yt, n)
            if hit is not None:
                correct.append(hit)
                const_correct.append(_correct(spec, const.expand(canon.shape[0], -1), yt, n))
        res = {"loss": torch.cat(losses), "prior": torch.cat(priors)}
        if correct:
            res["correct"], res["const_correct"] = torch.cat(correct), torch.cat(const_correct)
        return res

    def _reduce_mean(self, trainer: "pl.Trainer", values: list[float], count: int) -> tuple[list[float], int]:
        """Sums over ranks of ``values`` (each a sum over ``count`` local examples); means and the total count."""
        if trainer.world_size <= 1:
            return [v / max(count, 1) for v in values], count
        t = torch.tensor([*values, float(count)], dtype=wide_dtype(trainer.strategy.root_device),
                         device=trainer.strategy.root_device)
        t = trainer.strategy.reduce(t, reduce_op="sum").cpu()
        total = int(t[-1])
        return [float(v) / max(total, 1) for v in t[:-1]], total

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or self._disabled or getattr(self, "_ctx", None) is None:
            return
        self._retire("on_validation_batch_start")  # the validation sample is what the first run gave
        if not self._train or not self._val:
            return
        tr, va = self._score(trainer, pl_module, self._train), self._score(trainer, pl_module, self._val)
        sums = [float(tr["loss"].sum()), float(tr["prior"].sum())]
        (lt, pt), _ = self._reduce_mean(trainer, sums, int(tr["loss"].numel()))
        gap = wide(va["prior"] - va["loss"])  # the validation gain over the constant prediction, per example
        (lv, pv, g1, g2), nv = self._reduce_mean(
            trainer, [float(va["loss"].sum()), float(va["prior"].sum()), float(gap.sum()), float(gap.pow(2).sum())],
            int(va["loss"].numel()))
        gain_se = math.sqrt(max(g2 - g1 * g1, 0.0) / max(nv - 1, 1)) if nv > 1 else math.inf
        rec: dict[str, Any] = {"epoch": trainer.current_epoch, "step": trainer.global_step, "train_loss": lt,
                               "val_loss": lv, "train_prior": pt, "val_prior": pv, "val_examples": nv,
                               "val_gain_se": gain_se}
        if "correct" in va:
            (at, ct), _ = self._reduce_mean(trainer, [float(tr["correct"].sum()), float(tr["const_correct"].sum())],
                                            int(tr["correct"].numel()))
            (av, cv), _ = self._reduce_mean(trainer, [float(va["correct"].sum()), float(va["const_correct"].sum())],
                                            int(va["correct"].numel()))
            rec.update(train_acc=at, val_acc=av, train_const_acc=ct, val_const_acc=cv)
        self.history.append(rec)
        self._judge_transfer(trainer, rec)
        self._judge_overfit(trainer, rec, va)
        self._publish(trainer, {"recipe/generalization/train_loss": lt, "recipe/generalization/val_loss": lv})
        self._live_figure(trainer, "recipe/generalization", self._draw_curve, every_n_reads=1)  # evaluations are rare

    def _share(self, loss: float, prior: float) -> float:
        """The share of the prior loss left: ``(L - floor) / (P - floor)``."""
        floor = self._ctx.spec.floor or 0.0
        return (loss - floor) / (prior - floor) if prior - floor > 0 else math.nan

    def _judge_transfer(self, trainer: "pl.Trainer", rec: dict[str, Any]) -> None:
        """Pass, fail or wait; decided on numbers reduced over ranks, so every rank reaches ``_conclude`` alike."""
        if self._transfer_done:
            return
        rt = self._share(rec["train_loss"], rec["train_prior"])
        if "val_acc" in rec:
            n = max(rec["val_examples"], 1)
            p, pt = rec["val_const_acc"], rec["train_const_acc"]
            se = math.sqrt(max(p * (1 - p), 1.0 / n) / n)
            gain, train_gain, noise = rec["val_acc"] - p, rec["train_acc"] - pt, self.z * se
            numbers = (f"training accuracy {rec['train_acc']:.3f} (the constant prediction's {pt:.3f}), loss "
                       f"{rec['train_loss']:.4g} against {rec['train_prior']:.4g}; validation accuracy "
                       f"{rec['val_acc']:.3f} against the constant prediction's {p:.3f} on {n} examples (a gain is "
                       f"significant above {noise:.3f}), loss {rec['val_loss']:.4g} against {rec['val_prior']:.4g}")
            measured, expected = rec["val_acc"], p + noise
        else:
            se = rec["val_gain_se"]
            scale = rec["val_prior"] - (self._ctx.spec.floor or 0.0)
            gain, train_gain = rec["val_prior"] - rec["val_loss"], (1 - rt) * scale
            noise = self.z * se
            numbers = (f"training loss {rec['train_loss']:.4g} against the constant prediction's "
                       f"{rec['train_prior']:.4g}; validation loss {rec['val_loss']:.4g} against the constant "
                       f"prediction's {rec['val_prior']:.4g} (a gain is significant above {noise:.4g})")
            measured, expected = rec["val_loss"], rec["val_prior"] - noise
        if gain > noise:
            status = "pass"
        elif rt <= 0.5 and gain < 0.25 * train_gain:
            status = "fail"  # training learned; validation gained nothing significant, and far less than training
        else:
            return  # not judged yet: training has not learned enough to expect a clear gain on held-out data
        self._transfer_done = True
        name = f"{self.name}.transfer"
        if status == "pass":
            finding = Finding(name, "pass", f"{self.name}: the model transfers to validation data: {numbers}.",
                              measured, expected, trainer.global_step, [], dict(rec))
        else:
            finding = Finding(name, "fail", f"{self.name}: the model learned the training data but does not transfer: "
                              f"{numbers} at epoch {rec['epoch']}. HINT: compare the preprocessing and label mapping "
                              "of the two splits (DataCheck's first-batch figure shows the training side).", measured,
                              expected, trainer.global_step, list(_NO_TRANSFER_CAUSES), dict(rec))
        self._conclude(trainer, finding)

    def _handled(self, trainer: "pl.Trainer") -> Optional[str]:
        """The callback that keeps the best validation weights, if any (a checkpoint or early stopping on ``val*``)."""
        for cb in trainer.callbacks:
            monitor = getattr(cb, "monitor", None)
            if isinstance(cb, (ModelCheckpoint, EarlyStopping)) and monitor and "val" in str(monitor).lower():
                return f"{type(cb).__name__}(monitor={monitor!r})"
        return None

    def _judge_overfit(self, trainer: "pl.Trainer", rec: dict[str, Any], va: dict[str, Tensor]) -> None:
        losses = wide(va["loss"])
        vals = [h["val_loss"] for h in self.history]
        best = min(range(len(vals)), key=vals.__getitem__)
        if best == len(vals) - 1:
            self._best_val = losses.clone()
            self._best_correct = va.get("correct")
            return
        if self._overfit_done or self._best_val is None or self._best_val.shape != losses.shape:
            return
        since = len(vals) - 1 - best
        b = self.history[best]
        d = losses - self._best_val
        se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else math.inf
        rise = rec["val_loss"] - b["val_loss"]
        gain = b["val_prior"] - b["val_loss"]
        train_fell = rec["train_loss"] < b["train_loss"]
        if since < self.patience or not train_fell or rise <= self.z * se or gain <= 0 or rise <= self.min_rise * gain:
            return
        self._overfit_done = True
        costs = True
        acc = ""
        if "val_acc" in rec and self._best_correct is not None and "correct" in va:
            dc = wide(self._best_correct - va["correct"])
            se_acc = float(dc.std() / math.sqrt(dc.numel())) if dc.numel() > 1 else math.inf
            drop = b["val_acc"] - rec["val_acc"]
            costs = drop > self.z * se_acc and drop > 0
            acc = (f"; validation accuracy {b['val_acc']:.3f} at the best epoch, {rec['val_acc']:.3f} now"
                   + ("" if costs else " (not significantly lower: the loss rises from over-confidence)"))
        handled = self._handled(trainer)
        numbers = (f"the validation loss rose from {b['val_loss']:.4g} at epoch {b['epoch']} (the best) to "
                   f"{rec['val_loss']:.4g} at epoch {rec['epoch']} over {since} evaluations ({rise / max(se, 1e-12):.1f} "
                   f"standard errors, {rise / gain:.0%} of its gain over the constant prediction) while the training "
                   f"loss fell from {b['train_loss']:.4g} to {rec['train_loss']:.4g}{acc}")
        details = {**rec, "best_epoch": b["epoch"], "best_val_loss": b["val_loss"], "handled_by": handled}
        if handled or not costs:
            why = (f"{handled} keeps the best weights" if handled else
                   "the validation metric holds")
            finding = Finding(f"{self.name}.overfit", "note", f"{self.name}: overfitting began after epoch "
                              f"{b['epoch']}: {numbers}. {why}.", rise, self.z * se, trainer.global_step,
                              list(_OVERFIT_CAUSES), details)
        else:
            finding = Finding(f"{self.name}.overfit", "warn", f"{self.name}: the model overfits: {numbers}. No "
                              "ModelCheckpoint or EarlyStopping monitors a validation metric, so the last weights are "
                              f"worse than those of epoch {b['epoch']}. HINT: ModelCheckpoint(monitor='val_loss') or "
                              "EarlyStopping(monitor='val_loss'), more regularization or data.", rise, self.z * se,
                              trainer.global_step, list(_OVERFIT_CAUSES), details)
            rank_zero_warn(finding.message, category=RecipeWarning)
        self.findings.append(finding)

    # -- end of fit -----------------------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._disabled:
            self.findings.append(self._verdict(trainer))
            if getattr(self, "_ctx", None) is not None and self.top_k and (self._val or self._train):
                self.findings.append(self._worst(trainer, pl_module))
        super().on_fit_end(trainer, pl_module)

    def _worst(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Finding:
        """The ``top_k`` examples of the validation sample (the training sample without one) with the highest loss,
        and label-issue candidates: examples whose given label the model finds least likely while it predicts another
        class with probability >= ``confident`` (cleanlab's ``find_label_issues`` when installed)."""
        store, split = (self._val, "validation") if self._val else (self._train, "training")
        spec = self._ctx.spec
        with probe_mode(trainer, pl_module):
            outs = [run_forward(pl_module, x, self._settings.forward).detach() for x, _ in store]
        canon = torch.cat([spec.canonical_outputs(o.float()).cpu() for o in outs])
        targets = torch.cat([spec.canonical_targets(y.detach()).cpu() for _, y in store])
        n = sum(int(y.shape[0]) for _, y in store)
        losses = per_example_loss(spec.loss, canon, targets, n)
        order = torch.argsort(torch.nan_to_num(losses, nan=math.inf), descending=True)[: self.top_k].tolist()
        rows = canon.shape[0] // max(n, 1)
        single = rows == 1 and spec.task == "multiclass" and not spec.soft_targets
        probs = canon.softmax(-1) if single else None
        captions, listed = [], []
        for i in order:
            if probs is not None:
                y, pred = int(targets[i]), int(probs[i].argmax())
                captions.append(f"y={y} pred={pred} p(y)={float(probs[i, y]):.2f}")
            elif rows == 1 and spec.task == "regression":
                captions.append(f"y={float(targets[i, 0]):.4g} pred={float(canon[i, 0]):.4g}")
            else:
                captions.append(f"example {i}")
            listed.append(f"{captions[-1]} loss={float(losses[i]):.4g}")
        issues: list[int] = []
        how = ""
        if probs is not None:
            labels = targets.long()
            p_given = probs[torch.arange(n), labels]
            confident = (probs.argmax(-1) != labels) & (probs.max(-1).values >= self.confident)
            issues = [int(i) for i in torch.argsort(p_given) if bool(confident[i])]
            how = f"predicted as another class with probability >= {self.confident:g}, least likely given label first"
            try:  # optional: cleanlab's confident learning on the held-out predictions
                from cleanlab.filter import find_label_issues

                issues = [int(i) for i in find_label_issues(labels.numpy(), probs.double().numpy(),
                                                            return_indices_ranked_by="self_confidence")]
                how = "cleanlab.filter.find_label_issues on the held-out predictions"
            except Exception:  # noqa: S110 - not installed, or too few examples per class: the plain ranking stays
                pass
        self._worst_draw = (_first(store, order), listed, split)
        shown = "; ".join(listed)
        candidates = (f" Label-issue candidates ({how}): {len(issues)} of {n}"
                      + (f", first {issues[:self.top_k]} (positions in the sample)" if issues else "") + "."
                      if probs is not None else "")
        return Finding(f"{self.name}.worst", "note", f"{self.name}: the {len(order)} {split} examples (of {n} in the "
                       f"fixed sample) with the highest loss: {shown}.{candidates} Look at them (figure "
                       "`recipe/worst_examples`): outliers uncover label noise and preprocessing bugs.",
                       float(losses[order[0]]) if order else None, None, trainer.global_step, [],
                       {"split": split, "positions": order, "losses": [float(losses[i]) for i in order],
                        "captions": captions,
                        "label_issues": issues[:100]})

    def _verdict(self, trainer: "pl.Trainer") -> Finding:
        name = f"{self.name}.verdict"
        if not self.history:
            why = ("no validation loop ran (pass `val_dataloaders` to `trainer.fit`, or a datamodule with "
                   "`val_dataloader`, define `validation_step`, and keep `limit_val_batches` above 0)"
                   if not self._val else "no validation epoch ended during training")
            return Finding(name, "skip", f"{self.name}: {why}: training and validation cannot be compared.",
                           step=trainer.global_step)
        last = self.history[-1]
        rt, rv = self._share(last["train_loss"], last["train_prior"]), self._share(last["val_loss"], last["val_prior"])
        verdict = bias_variance(rt, rv, self.bias_threshold, self.variance_gap)
        acc = (f"; accuracy {last['train_acc']:.3f} on training, {last['val_acc']:.3f} on validation"
               if "train_acc" in last else "")
        best = min(self.history, key=lambda h: h["val_loss"])
        said = "neither high bias nor high variance" if verdict == "neither" else verdict
        return Finding(name, "note", f"{self.name}: {said} at epoch {last['epoch']}: the loss is {rt:.0%} of the "
                       f"constant prediction's on training ({last['train_loss']:.4g} of {last['train_prior']:.4g}) "
                       f"and {rv:.0%} on validation ({last['val_loss']:.4g} of {last['val_prior']:.4g}){acc}; best "
                       f"validation loss {best['val_loss']:.4g} at epoch {best['epoch']}. Try: {_ADVICE[verdict]}.",
                       rv - rt, self.variance_gap, trainer.global_step, [],
                       {"verdict": verdict, "train_share": rt, "val_share": rv, "best_epoch": best["epoch"], **last})

    @override
    def _finish(self, trainer: "pl.Trainer", failed: bool = False) -> None:
        if not trainer.is_global_zero or self._dir is None:
            return
        from lightning_recipe.report.loggers import log_figure

        drawn = getattr(self, "_worst_draw", None)
        if drawn is not None:
            from lightning_recipe.report.plotting import plot_worst_examples

            inputs, captions, split = drawn
            fig = plot_worst_examples(inputs, captions, f"The {split} examples with the highest loss at the end of "
                                      "the fit (label, prediction)")
            path = log_figure(trainer, "recipe/worst_examples", fig, trainer.global_step, self._dir)
            if path and path not in self.figures:
                self.figures.append(path)
        drawn = any(os.path.basename(p) == "generalization.png" for p in self.figures)
        if self.__dict__.get("_drawn_n") != len(self.history) or not drawn:  # not drawn live at this point
            self._draw_curve(trainer)

    def _draw_curve(self, trainer: "pl.Trainer") -> None:
        """The train/validation figure to the loggers and ``generalization.png`` (at the end, and live)."""
        from lightning_recipe.report.loggers import log_figure
        from lightning_recipe.report.plotting import plot_generalization

        h = self.history
        if not h or not trainer.is_global_zero or self._dir is None:
            return
        self._drawn_n = len(h)
        fig = plot_generalization([r["step"] for r in h], [r["train_loss"] for r in h], [r["val_loss"] for r in h],
                                  h[-1]["val_prior"], [r["epoch"] for r in h])
        path = log_figure(trainer, "recipe/generalization", fig, trainer.global_step, self._dir)
        if path and path not in self.figures:
            self.figures.append(path)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "transfer_done": self._transfer_done,
                "overfit_done": self._overfit_done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self._transfer_done = bool(state_dict.get("transfer_done", False))
        self._overfit_done = bool(state_dict.get("overfit_done", False))


def _first(store: list, order: list[int]) -> Optional[Tensor]:
    """The input tensors of the examples at ``order`` (positions in the concatenated sample); ``None`` unless the
    inputs are single tensors."""
    if not all(isinstance(x, Tensor) for x, _ in store):
        return None
    xs = torch.cat([x.detach().cpu() for x, _ in store])
    return xs[order] if order else None


def _correct(spec: TaskSpec, canon: Tensor, targets: Tensor, n: int) -> Optional[Tensor]:
    """Per-example accuracy (mean over positions and labels) of canonical outputs; ``None`` for regression."""
    if spec.task == "multiclass" and not spec.soft_targets:
        hit = (canon.argmax(-1) == targets).float()
        mask = spec.valid_mask(targets)
        w = mask.float() if mask is not None else torch.ones_like(hit)
    elif spec.task in ("binary", "multilabel"):
        hit = ((canon > 0) == (targets > 0.5)).float().reshape(canon.shape[0], -1).mean(-1)
        w = torch.ones_like(hit)
    else:
        return None
    rows = hit.shape[0] // max(n, 1)
    hit, w = (hit * w).reshape(n, rows).sum(-1), w.reshape(n, rows).sum(-1)
    return wide(hit / w.clamp_min(1))


