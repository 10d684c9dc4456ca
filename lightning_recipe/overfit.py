"""``overfit_one_batch``: the recipe's "overfit one batch": a copy of the model must fit a few examples perfectly."""

from __future__ import annotations

import copy
import math
import os
import tempfile
import warnings
from typing import Any, Callable, Iterator, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.seed import isolate_rng
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from lightning_recipe._core.conventions import TaskSpec, find_loss, probe_mode, resolve_task, run_forward
from lightning_recipe._core.dtypes import wide
from lightning_recipe._core.conventions import split_batch as _split
from lightning_recipe._core.labels import stats_from_targets
from lightning_recipe._core.namespaces import _is_lightning, _namespace
from lightning_recipe.exceptions import RecipeConfigError
from lightning_recipe.findings import Finding
from lightning_recipe.functional.constants import constant_loss, numeric_constant, optimal_constant

_CHECK = "overfit_one_batch"
_CAUSES = [
    "capacity too small for even a few examples (too few units/layers, or a bottleneck)",
    "learning rate too low (or too high) for this batch: try `lr=`",
    "a bug in the loss or the labels (the loss cannot reach its minimum on these labels: e.g. a double softmax)",
    "features and labels mismatched (inputs paired with the wrong targets), or the model ignores its input",
    "regularisation too strong to fit a few examples (dropout, weight decay, augmentation): turn it off for this test",
]


def overfit_one_batch(
    model: "pl.LightningModule",
    data: Any = None,
    num_examples: int = 8,
    steps: int = 300,
    lr: Optional[float] = None,
    rel_tol: float = 0.05,
    directory: Optional[str] = None,
    *,
    split_batch: Optional[Callable[[Any], tuple[Any, Any]]] = None,
    forward: Optional[Callable[[Any, Any], Any]] = None,
    loss_fn: Optional[Callable[..., Any]] = None,
    task: Optional[Literal["multiclass", "binary", "multilabel", "regression"]] = None,
    seed: int = 0,
    accelerator: str = "cpu",
    precision: Optional[Union[str, int]] = None,
) -> Finding:
    """Train a copy of ``model`` on ``num_examples`` examples and verify it fits them: the loss reaches near its
    minimum and the predictions match the labels.

    The first batch of ``data`` (read with the random state isolated) is cut to its first ``num_examples`` examples;
    a deep copy of the model is trained on that batch, repeated ``steps`` times, by a private ``Trainer`` (the
    model's own ``training_step`` and ``configure_optimizers``, so custom losses, manual optimization and schedulers
    run as they are; no validation, no logger, no checkpoint; seeded with ``seed``, the caller's random state is
    restored afterwards). The caller's model, its optimizer state and its trainer are not touched.

    Before and after training, the loss of the batch is measured in eval mode with the loss the recipe callbacks
    use (found on the module, given as ``loss_fn``, or inferred from the targets). The copy **fits** when

    * the final loss is within ``rel_tol`` of its floor, relative to the loss of the best constant prediction on
      these labels (the tiny batch's label prior): ``L_end - floor <= rel_tol * (P - floor)`` (the floor is 0 for
      cross-entropy, BCE, MSE and L1; the entropy of the smoothed target with label smoothing; the prior is the exact
      minimum over constant predictions, found numerically, so absent classes count as absent); when the prior is
      already at the floor (all labels equal) or the loss is unknown, the final loss must be below ``rel_tol`` of the
      initial loss's distance to the floor instead;
    * the predictions align with the labels: every argmax equals its class (multiclass), every sign its label
      (binary/multilabel), or ``R² >= 1 - rel_tol`` (regression).

    Args:
        model: the LightningModule (not modified).
        data: a ``DataLoader``, a ``LightningDataModule`` (``prepare_data``/``setup("fit")`` are called), a batch, or
            ``None`` for ``model.train_dataloader()``.
        num_examples: examples of the batch to fit.
        steps: optimizer steps.
        lr: learning rate for every parameter group (``None``: the model's own).
        rel_tol: tolerance of both criteria.
        directory: where to save ``overfit_one_batch.png`` (loss curve and predictions vs labels).
        split_batch: ``callable(batch) -> (inputs, targets)`` for unconventional batches.
        forward: ``callable(module, inputs) -> predictions`` when ``module(inputs)`` does not give them.
        loss_fn: the loss on ``(predictions, targets)``, when the module holds no ``torch.nn`` loss.
        task: the task when the loss does not say.
        seed: seed of the copy's training.
        accelerator: accelerator of the private Trainer.
        precision: precision of the private Trainer (``None``: its default).

    Returns:
        A :class:`~lightning_recipe.Finding` with status ``"pass"`` or ``"fail"`` (``"skip"`` when the batch cannot be
        read); ``measured`` is the final loss, ``expected`` the threshold, ``details`` the numbers and the figure path.

    Example::

        >>> import lightning as L
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> class Net(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(4, 3)
        ...         self.loss_fn = torch.nn.CrossEntropyLoss()
        ...     def forward(self, x):
        ...         return self.layer(x)
        ...     def training_step(self, batch, batch_idx):
        ...         return self.loss_fn(self(batch[0]), batch[1])
        ...     def configure_optimizers(self):
        ...         return torch.optim.Adam(self.parameters(), lr=0.1)
        >>> g = torch.Generator().manual_seed(0)
        >>> dl = DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.arange(16) % 3), batch_size=16)
        >>> overfit_one_batch(Net(), dl, num_examples=3, steps=100).status
        'pass'
    """
    if not isinstance(num_examples, int) or num_examples < 1:
        raise RecipeConfigError(f"overfit_one_batch: `num_examples` must be a positive int, got {num_examples!r}.")
    if not isinstance(steps, int) or steps < 1:
        raise RecipeConfigError(f"overfit_one_batch: `steps` must be a positive int, got {steps!r}.")
    if not 0 < rel_tol < 1:
        raise RecipeConfigError(f"overfit_one_batch: `rel_tol` must be in (0, 1), got {rel_tol!r}.")
    with isolate_rng():
        try:
            batch = _cut(_first_batch(model, data), num_examples)
            inputs, targets = _split(batch, split_batch)
        except (RecipeConfigError, StopIteration, TypeError, AttributeError) as err:
            return Finding(_CHECK, "skip", f"{_CHECK}: could not read a batch ({type(err).__name__}: {err}). HINT: pass "
                           "a DataLoader, a LightningDataModule or a batch, and `split_batch=` for unconventional "
                           "batches.")
        torch.manual_seed(seed)
        work = copy.deepcopy(model).cpu()
        loss = find_loss(work, loss_fn)
        try:
            with probe_mode(None, work):
                out0 = run_forward(work, inputs, forward).detach()
            spec = resolve_task(loss, out0, targets, task)
        except Exception as err:
            return Finding(_CHECK, "skip", f"{_CHECK}: could not run the model on the batch ({type(err).__name__}: "
                           f"{err}). HINT: pass `forward=`, `loss_fn=` or `task=`.")
        try:
            losses = _train(work, batch, steps, lr, accelerator, precision)
        except Exception as err:  # the copy's training crashed: report it, the caller's model is untouched
            return Finding(_CHECK, "skip", f"{_CHECK}: training the copy failed ({type(err).__name__}: {err}). If "
                           "training_step or configure_optimizers needs the datamodule or other trainer state, "
                           "run the check with a Trainer of your own instead.")
        work.cpu()
        with probe_mode(None, work):
            out1 = run_forward(work, inputs, forward).detach()
    return _judge(spec, out0, out1, targets, losses, num_examples, steps, rel_tol, directory)


# -- data ---------------------------------------------------------------------------------------------------------
def _first_batch(model: Any, data: Any) -> Any:
    if data is None:
        data = model.train_dataloader()
    if _is_lightning(data, "LightningDataModule"):
        data.prepare_data()
        data.setup("fit")
        data = data.train_dataloader()
    if isinstance(data, DataLoader) or (hasattr(data, "__iter__") and not isinstance(data, (Tensor, tuple, list, dict))):
        return next(iter(data))
    return data


def _cut(batch: Any, n: int) -> Any:
    sizes = [t.shape[0] for t in _tensors(batch) if t.ndim]
    if not sizes:
        raise RecipeConfigError("the batch holds no batched tensor")
    size = max(set(sizes), key=sizes.count)
    return apply_to_collection(batch, Tensor, lambda t: t[:n].detach().clone() if t.ndim and t.shape[0] == size else t)


def _tensors(batch: Any) -> list[Tensor]:
    found: list[Tensor] = []
    apply_to_collection(batch, Tensor, found.append)
    return found


class _Repeat(IterableDataset):
    def __init__(self, batch: Any, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.steps):
            yield self.batch


class _Record(Callback):
    """Training losses on the device; learning rate override at the start."""

    def __init__(self, lr: Optional[float]) -> None:
        self.lr = lr
        self.losses: list[Tensor] = []

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.lr is not None:
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = self.lr

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self.losses.append(loss.detach().float().reshape(()))


def _train(model: Any, batch: Any, steps: int, lr: Optional[float], accelerator: str, precision: Any) -> list[float]:
    rec = _Record(lr)
    kwargs: dict[str, Any] = {}
    if precision is not None:
        kwargs["precision"] = precision
    with tempfile.TemporaryDirectory() as root, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*You defined a `validation_step` but have no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=".*(Total length of|Your `IterableDataset` has `__len__`).*")
        trainer = _namespace(model).Trainer(
            default_root_dir=root, max_steps=steps, max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            accelerator=accelerator, devices=1, callbacks=[rec], **kwargs,
        )
        loader = DataLoader(_Repeat(batch, steps), batch_size=None)
        _quiet_fit(trainer, model, loader)
    return torch.stack(rec.losses).cpu().tolist() if rec.losses else []


def _quiet_fit(trainer: "pl.Trainer", model: Any, loader: DataLoader) -> None:
    import logging

    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        trainer.fit(model, train_dataloaders=loader)
    finally:
        log.setLevel(level)


# -- verdict ------------------------------------------------------------------------------------------------------
def loss_floor(spec: TaskSpec) -> Optional[float]:
    """The smallest value the loss can take on hard labels: 0, or the entropy of the smoothed target.

    Example::

        >>> from lightning_recipe._core.conventions import resolve_task
        >>> spec = resolve_task(torch.nn.CrossEntropyLoss(label_smoothing=0.1), torch.zeros(2, 4), torch.tensor([0, 1]))
        >>> round(loss_floor(spec), 4)
        0.3488
    """
    if spec.floor is None:
        return None
    eps = spec.label_smoothing
    if spec.task == "multiclass" and eps > 0 and not spec.soft_targets:
        c = spec.num_outputs
        hi, lo = 1 - eps + eps / c, eps / c
        return float(-(hi * math.log(hi) + (c - 1) * lo * math.log(lo)))
    return float(spec.floor)


def alignment(spec: TaskSpec, outputs: Tensor, targets: Tensor) -> tuple[float, str]:
    """How well predictions match labels: accuracy (classification) or R² (regression), with its name.

    Example::

        >>> from lightning_recipe._core.conventions import resolve_task
        >>> spec = resolve_task(torch.nn.CrossEntropyLoss(), torch.zeros(2, 3), torch.tensor([0, 2]))
        >>> alignment(spec, torch.tensor([[2.0, 0, 0], [0, 0, 1.0]]), torch.tensor([0, 2]))
        (1.0, 'accuracy')
    """
    out = spec.canonical_outputs(outputs.float())
    y = spec.canonical_targets(targets)
    if spec.task == "multiclass":
        if spec.soft_targets:
            return float(wide(out.argmax(-1) == y.argmax(-1)).mean()), "accuracy"
        mask = spec.valid_mask(y)
        hit = out.argmax(-1) == y
        if mask is not None:
            hit = hit[mask]
        return float(wide(hit).mean()) if hit.numel() else 1.0, "accuracy"
    if spec.task in ("binary", "multilabel"):
        return float(wide((out > 0) == (y > 0.5)).mean()), "accuracy"
    resid = ((out - y) ** 2).sum()
    total = ((y - y.mean(0, keepdim=True)) ** 2).sum()
    return (1.0 - float(resid / total)) if total > 0 else (1.0 if resid == 0 else 0.0), "R²"


def _judge(spec: TaskSpec, out0: Tensor, out1: Tensor, targets: Tensor, losses: list[float], n: int, steps: int,
           rel_tol: float, directory: Optional[str]) -> Finding:
    y = spec.canonical_targets(targets.detach().cpu())
    c0 = spec.canonical_outputs(out0.float().cpu())
    c1 = spec.canonical_outputs(out1.float().cpu())
    with torch.no_grad():
        start, end = float(spec.loss(c0, y)), float(spec.loss(c1, y))
    stats = stats_from_targets(spec, y)
    const, _ = optimal_constant(spec.task, stats, spec.loss, spec.loss_name, spec.weight, spec.label_smoothing,
                                spec.pos_weight)
    # the closed forms give a class absent from the labels a pseudo-count (a finite bias); on a few examples that
    # matters, so the constant is refined numerically to the exact minimum
    refined = numeric_constant(spec.loss, stats.sample, const, max_iter=100)
    prior = min(constant_loss(spec.loss, const, stats.sample), constant_loss(spec.loss, refined, stats.sample))
    floor = loss_floor(spec)
    base = floor if floor is not None else 0.0
    if floor is not None and prior - floor > 1e-6 * max(1.0, abs(prior)):
        threshold, ref = floor + rel_tol * (prior - floor), "the label prior of these examples"
    else:
        threshold, ref = base + rel_tol * abs(start - base), "the initial loss"
    score, score_name = alignment(spec, out1, targets)
    need = 1.0 if score_name == "accuracy" else 1.0 - rel_tol
    loss_ok = math.isfinite(end) and end <= threshold
    aligned = score >= need - 1e-9
    details: dict[str, Any] = {"initial_loss": start, "final_loss": end, "prior_loss": prior, "floor": floor,
                               "threshold": threshold, score_name: score, "num_examples": n, "steps": steps,
                               "train_losses": losses[:: max(1, len(losses) // 200)], "task": spec.task,
                               "loss": spec.loss_name}
    if directory is not None:
        details["figure"] = _figure(directory, spec, losses, prior, threshold, c1, y, score_name, score)
    numbers = (f"{n} examples, {steps} steps ({spec.loss_name}, {spec.task}): loss {start:.4g} -> {end:.4g} (eval mode); "
               f"required <= {threshold:.4g} (floor {_f(floor)} + {rel_tol:g} x the distance of {ref} "
               f"{prior if 'prior' in ref else start:.4g}); {score_name} {score:.4g} (required >= {need:g})")
    if loss_ok and aligned:
        return Finding(_CHECK, "pass", f"{_CHECK}: the model fits a small batch: {numbers}.", end, threshold, steps, [],
                       details)
    what = []
    if not loss_ok:
        what.append("the loss did not reach near its minimum")
    if not aligned:
        what.append("predictions do not match the labels")
    return Finding(_CHECK, "fail", f"{_CHECK}: the model cannot fit {n} examples: {' and '.join(what)}: {numbers}. "
                   "HINT: try `lr=` or more `steps=`; if the loss was guessed wrong, pass `loss_fn=`.", end, threshold,
                   steps, list(_CAUSES), details)


def _f(x: Optional[float]) -> str:
    return "unknown" if x is None else f"{x:.4g}"


def _figure(directory: str, spec: TaskSpec, losses: list[float], prior: float, threshold: float, out: Tensor, y: Tensor,
            score_name: str, score: float) -> str:
    from lightning_recipe.report.plotting import _figure as new_figure
    from lightning_recipe.report.plotting import _lean, log_y

    fig = new_figure(12, 4.5)
    ax, pr = fig.subplots(1, 2, width_ratios=[3, 2])
    if losses:
        ax.plot(np.arange(1, len(losses) + 1), losses, color="tab:blue", lw=1.2, label="training loss")
    ax.axhline(prior, color="tab:orange", ls="--", label=f"label-prior loss {prior:.4g}")
    ax.axhline(threshold, color="tab:green", ls=":", label=f"required {threshold:.4g}")
    finite = [v for v in losses if math.isfinite(v) and v > 0]
    if finite and max(finite) / max(min(finite), 1e-12) > 50:
        log_y(ax)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Overfitting one batch")
    ax.legend(fontsize=8)
    o = out.numpy()
    if spec.task == "multiclass" and not spec.soft_targets:
        probs = torch.softmax(out, -1).numpy()[:64]
        labels = y.numpy()[:64]
        im = pr.imshow(probs, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        pr.scatter(labels, np.arange(len(labels)), marker="x", color="red", s=30, label="label")
        pr.set_xlabel("class")
        pr.set_ylabel("example")
        pr.legend(fontsize=8, loc="upper right")
        fig.colorbar(im, ax=pr, label="predicted probability")
    elif spec.task in ("binary", "multilabel"):
        p = 1 / (1 + np.exp(-o.reshape(-1)))[:256]
        t = y.numpy().reshape(-1)[:256]
        idx = np.arange(len(p))
        pr.bar(idx, p, color="tab:blue", alpha=0.7, label="predicted probability")
        pr.scatter(idx, t, marker="x", color="red", zorder=3, label="label")
        pr.set_ylim(-0.05, 1.05)
        pr.set_xlabel("example x label")
        pr.legend(fontsize=8)
    else:
        t, p = y.numpy().reshape(-1), o.reshape(-1)
        lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
        pr.plot([lo, hi], [lo, hi], color="0.5", ls="--", label="identity")
        pr.scatter(t, p, color="tab:blue", s=25, zorder=3)
        pr.set_xlabel("target")
        pr.set_ylabel("prediction")
        pr.legend(fontsize=8)
    pr.set_title(f"Predictions vs labels ({score_name} {score:.3g})")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "overfit_one_batch.png")
    _lean(fig).savefig(path, dpi=100)
    return path
