"""Training data access that leaves training untouched, and label statistics computed once per fit.

* The probe batch comes from a private ``DataLoader`` over the training dataset (sampler driven by a private,
  seeded generator), never from the iterator training uses, and never from the global random state.
* Label statistics read ``dataset.targets`` / ``labels`` / ``y`` or a ``TensorDataset``'s last tensor without
  loading inputs (the fast path); otherwise they scan at most ``max_batches`` batches of a private loader.
* Under DDP each rank reads its own shard (its ``DistributedSampler``'s indices) and counts, sums and squared sums
  are summed across ranks, so the prior is the global one. The median (L1) and numeric minimisation use the rank's
  own label sample.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import numpy as np
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Subset, TensorDataset

from lightning_recipe._conventions import TaskSpec, split_batch
from lightning_recipe.exceptions import RecipeConfigError
from lightning_recipe.functional import LabelStats

_SAMPLE = 65_536
FIRST_TRAINING_BATCH = "the first training batch (an iterable dataset is read by training only)"
_SEEN: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()
EMPTY_LOADER = (
    "The train dataloader is empty: there is nothing to train on. HINT: check the dataset behind the "
    "`train_dataloaders` passed to `trainer.fit` (or the datamodule's `train_dataloader`)."
)


def _single_loader(loader: Any, what: str) -> Optional[DataLoader]:
    if isinstance(loader, DataLoader):
        return loader
    if isinstance(loader, (list, tuple)) and loader and isinstance(loader[0], DataLoader):
        return loader[0]
    if isinstance(loader, dict) and loader:
        first = next(iter(loader.values()))
        return first if isinstance(first, DataLoader) else None
    return None


def _private_loader(loader: DataLoader, seed: int = 0) -> DataLoader:
    """A loader over the same dataset and collate function, sampled with a private generator."""
    ds = loader.dataset
    if isinstance(ds, IterableDataset):
        return loader
    sampler = loader.sampler if isinstance(loader.sampler, DistributedSampler) else RandomSampler(
        ds, generator=torch.Generator().manual_seed(seed)
    )
    bs = loader.batch_size or getattr(getattr(loader, "batch_sampler", None), "batch_size", None) or 32
    return DataLoader(ds, batch_size=bs, sampler=sampler, collate_fn=loader.collate_fn, num_workers=0)


def _to_device(trainer: Any, batch: Any) -> Any:
    batch = trainer.precision_plugin.convert_input(batch)
    return trainer.strategy.batch_to_device(batch)


def is_iterable(loader: Optional[DataLoader]) -> bool:
    """Whether ``loader`` reads an ``IterableDataset``: a stream that only training may draw from."""
    return loader is not None and isinstance(loader.dataset, IterableDataset)


def train_is_iterable(trainer: Any) -> bool:
    """Whether the training data is an iterable dataset (then nothing is read ahead of training)."""
    return is_iterable(_single_loader(trainer.train_dataloader, "train"))


def remember_batch(trainer: Any, batch: Any) -> None:
    """Keep the first batch training itself fetched (on the device, before its first forward) for this fit."""
    _SEEN.setdefault(trainer, batch)


def forget_batch(trainer: Any) -> None:
    """Forget the batch kept by :func:`remember_batch` (a new fit)."""
    _SEEN.pop(trainer, None)


def first_batch(trainer: Any) -> Any:
    """A training batch on the device, as the training step would see it, drawn without touching training's RNG.

    For an iterable dataset, the first batch training itself fetched (see :func:`remember_batch`): a stream is never
    read from a second place (a one-shot iterator would lose the batch, a stream with its own random state would give
    training other batches).
    """
    loader = _single_loader(trainer.train_dataloader, "train")
    if loader is None:
        raise RecipeConfigError(
            f"The train dataloader is a {type(trainer.train_dataloader).__name__}; the recipe callbacks read one "
            "torch DataLoader (the first of a list/dict)."
        )
    if is_iterable(loader):
        if trainer not in _SEEN:  # training fetched no batch: the stream is empty
            raise RecipeConfigError(EMPTY_LOADER)
        return _SEEN[trainer]
    with isolate_rng():
        try:
            batch = next(iter(_private_loader(loader)))
        except StopIteration:
            raise RecipeConfigError(EMPTY_LOADER) from None
    return _to_device(trainer, batch)


def _fast_targets(loader: DataLoader) -> tuple[Optional[Tensor], str]:
    """All training targets read from the dataset without loading inputs, or ``None``."""
    ds: Any = loader.dataset
    indices: Optional[np.ndarray] = None
    while isinstance(ds, Subset):
        idx = np.asarray(ds.indices)
        indices = idx if indices is None else idx[indices]
        ds = ds.dataset
    if getattr(ds, "target_transform", None) is not None or isinstance(ds, IterableDataset):
        return None, ""
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        t, src = ds.tensors[-1], "TensorDataset"
    else:
        t, src = None, ""
        for name in ("targets", "labels", "y"):
            v = getattr(ds, name, None)
            if isinstance(v, (Tensor, np.ndarray, list)) and len(v) == len(ds):
                t, src = v, f"dataset.{name}"
                break
    if t is None:
        return None, ""
    t = torch.as_tensor(np.asarray(t) if isinstance(t, list) else t)
    if indices is not None:
        t = t[torch.as_tensor(indices, dtype=torch.long)]
    if isinstance(loader.sampler, DistributedSampler):
        t = t[torch.as_tensor(list(iter(loader.sampler)), dtype=torch.long)]
    return t, src


def _consistent(fast: Tensor, probe_targets: Tensor) -> bool:
    """The fast-path targets look like the batch targets (same per-example shape and kind of dtype)."""
    return (
        tuple(fast.shape[1:]) == tuple(probe_targets.shape[1:])
        and fast.is_floating_point() == probe_targets.is_floating_point()
    )


def _scan_targets(trainer: Any, loader: DataLoader, split: Any, max_batches: int) -> Tensor:
    out = []
    with isolate_rng():
        for i, batch in enumerate(_private_loader(loader, seed=1)):
            if i >= max_batches:
                break
            _, y = split_batch(_to_device(trainer, batch), split)
            out.append(y.detach())
    if not out:
        raise RecipeConfigError(EMPTY_LOADER)
    return torch.cat(out, 0)


def label_stats(
    trainer: Any, pl_module: Any, spec: TaskSpec, probe_targets: Tensor, split: Any = None, max_batches: int = 100
) -> LabelStats:
    """Label statistics of the training set for ``spec`` (counts reduced across ranks)."""
    loader = _single_loader(trainer.train_dataloader, "train")
    targets, source = (None, "")
    if loader is not None and split is None:
        targets, source = _fast_targets(loader)
        if targets is not None and not _consistent(targets, probe_targets):
            targets, source = None, ""
    if targets is None:
        if is_iterable(loader):
            targets, source = probe_targets, FIRST_TRAINING_BATCH
        elif loader is None:
            targets, source = probe_targets, "first batch"
        else:
            targets, source = _scan_targets(trainer, loader, split, max_batches), f"dataloader (≤{max_batches} batches)"
    return stats_from_targets(spec, spec.canonical_targets(targets.to(pl_module.device)), trainer, source)


def stats_from_targets(spec: TaskSpec, y: Tensor, trainer: Any = None, source: str = "") -> LabelStats:
    """Label statistics from canonical targets; sums are reduced across ranks when ``trainer`` is given."""

    def reduce(t: Tensor) -> Tensor:
        if trainer is not None and trainer.world_size > 1:
            t = t.clone()
            t = trainer.strategy.reduce(t, reduce_op="sum")
        return t

    mask = spec.valid_mask(y)
    if mask is not None:
        y = y[mask]
    if y.shape[0] > _SAMPLE:  # a random subsample, drawn with a private generator
        idx = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(0))[:_SAMPLE]
        sample = y[idx.to(y.device)].detach().cpu()
    else:
        sample = y.detach().cpu()
    count = int(reduce(torch.tensor([float(y.shape[0])], device=y.device, dtype=torch.float64)).item())
    if spec.task == "multiclass":
        if spec.soft_targets:
            counts = y.double().sum(0)
        else:
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= spec.num_outputs):
                raise RecipeConfigError(
                    f"Class-index targets range over [{int(y.min())}, {int(y.max())}] but the model outputs "
                    f"{spec.num_outputs} classes. HINT: set the head's output size to the number of classes, or pass "
                    "`head=`/`forward=` if the wrong module or output was picked."
                )
            counts = torch.bincount(y, minlength=spec.num_outputs).double()
        counts = reduce(counts).cpu()
        return LabelStats(spec.task, count, sample, class_counts=counts, source=source)
    if spec.task in ("binary", "multilabel"):
        pos = reduce(y.double().sum(0)).cpu()
        return LabelStats(spec.task, count, sample, positives=pos, source=source)
    s1 = reduce(y.double().sum(0)).cpu()
    s2 = reduce((y.double() ** 2).sum(0)).cpu()
    mean = s1 / max(count, 1)
    var = (s2 / max(count, 1) - mean**2).clamp_min(0)
    return LabelStats(spec.task, count, sample, mean=mean.float(), var=var.float(), source=source)
