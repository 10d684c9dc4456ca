"""Training data access that leaves training untouched, and label statistics computed once per fit.

* The probe batch comes from a private ``DataLoader`` over the training dataset (sampler driven by a private,
  seeded generator, the user's worker settings), never from the iterator training uses, and never from the global
  random state. An ``IterableDataset`` is never read here at all: a one-shot stream would lose the batches drawn and
  a stream with its own random state would give training other batches; the probe batch is then the first batch
  training itself fetched (see :func:`remember_batch`), and the label statistics are that batch's.
* Label statistics read ``dataset.targets`` / ``labels`` / ``y`` or a ``TensorDataset``'s last tensor without
  loading inputs (the fast path), trusted only after the probe batch carries the same targets at its known indices
  (a ``__getitem__`` or a batch hook that remaps labels, an offset attribute; see :func:`_verify`);
  otherwise they scan a private loader, at most ``max_batches`` batches and about :data:`SCAN_SECONDS` seconds.
* A ``WeightedRandomSampler`` in the training loader weights the statistics: the prior the model sees is the
  sampled one.
* Under DDP each rank reads its own shard (its ``DistributedSampler``'s indices) and counts, sums and squared sums
  are summed across ranks, so the prior is the global one. The median (L1) and numeric minimisation use the rank's
  own label sample.
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Iterator, Optional

import numpy as np
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Subset,
    TensorDataset,
    WeightedRandomSampler,
)

from lightning_recipe._core.conventions import TaskSpec, split_batch
from lightning_recipe.exceptions import RecipeConfigError
from lightning_recipe.functional.constants import LabelStats
from lightning_recipe._core.dtypes import wide, wide_dtype

_SAMPLE = 65_536
_MAX_VALUES = 1 << 24  # label values read per fit: dense targets (segmentation maps) are subsampled by example beyond
# the fit-start scans stop reading new batches after this many seconds (besides their batch limit): a slow dataset
# (decoding, augmentation) costs at most about this much before the first step
SCAN_SECONDS = 2.0
# examples fetched by index, with the dataset's own `__getitem__`, to verify the `dataset.targets` shortcut
VERIFY_EXAMPLES = 32
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


def weighted_sampler(loader: Optional[DataLoader]) -> Optional[WeightedRandomSampler]:
    """The training loader's ``WeightedRandomSampler`` (given as ``sampler=`` or inside a ``BatchSampler``), if any."""
    if loader is None:
        return None
    for s in (loader.sampler, getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if isinstance(s, WeightedRandomSampler):
            return s
    return None


def _worker_settings(loader: DataLoader) -> dict[str, Any]:
    """The user's worker settings, for a private loader that reads as fast as training does (never persistent: the
    workers end with the scan)."""
    pin = loader.pin_memory and torch.cuda.is_available()  # pinning without CUDA only warns
    kw: dict[str, Any] = {"num_workers": loader.num_workers, "pin_memory": pin,
                          "timeout": loader.timeout, "worker_init_fn": loader.worker_init_fn,
                          "persistent_workers": False}
    if loader.num_workers > 0:
        kw["multiprocessing_context"] = loader.multiprocessing_context
        if loader.prefetch_factor is not None:
            kw["prefetch_factor"] = loader.prefetch_factor
    return kw


def _private_loader(loader: DataLoader, seed: int = 0, sampled: bool = False, one: bool = False) -> DataLoader:
    """A loader over the same dataset and collate function with the user's worker settings, sampled with a private
    generator (also the workers' base seed: no draw from the global random state).

    With ``sampled=True`` a ``WeightedRandomSampler`` of the training loader is kept (with a private generator), so
    that the labels read are distributed as the model sees them; otherwise every example is equally likely (the data
    checks judge the dataset itself: weighted sampling with replacement would repeat examples). With ``one=True``
    (a single batch is wanted) at most one worker, prefetching one batch: the user's worker setup runs, without
    loading batches that are never read.
    """
    ds = loader.dataset
    if isinstance(ds, IterableDataset):  # never read here: see `first_batch`
        raise RuntimeError("an iterable dataset is read by training only")
    gen = torch.Generator().manual_seed(seed)
    workers = _worker_settings(loader)
    if one and workers["num_workers"] > 0:
        workers.update(num_workers=1, prefetch_factor=1)
    # automatic batching off (`batch_size=None`): each item of the dataset is a whole batch, as training sees it
    unbatched = loader.batch_size is None and getattr(loader, "batch_sampler", None) is None
    return DataLoader(ds, batch_size=None if unbatched else _batch_size(loader),
                      sampler=_private_sampler(loader, seed, sampled), collate_fn=loader.collate_fn, generator=gen,
                      **workers)


def _batch_size(loader: DataLoader) -> int:
    return loader.batch_size or getattr(getattr(loader, "batch_sampler", None), "batch_size", None) or 32


def _private_sampler(loader: DataLoader, seed: int, sampled: bool = False) -> Any:
    """The index order of a private loader: the rank's ``DistributedSampler``, else a private random order (weighted
    like the training loader's ``WeightedRandomSampler`` with ``sampled=True``). Deterministic in ``seed``."""
    weighted = weighted_sampler(loader) if sampled else None
    if isinstance(loader.sampler, DistributedSampler):
        return loader.sampler
    if weighted is not None:
        return WeightedRandomSampler(weighted.weights, weighted.num_samples, weighted.replacement,
                                     generator=torch.Generator().manual_seed(seed))
    return RandomSampler(loader.dataset, generator=torch.Generator().manual_seed(seed))


def _probe_indices(loader: DataLoader) -> Tensor:
    """The indices into ``loader.dataset`` of the examples of the probe batch (:func:`first_batch`'s)."""
    it = iter(_private_sampler(loader, seed=0))
    return torch.as_tensor([i for _, i in zip(range(_batch_size(loader)), it)], dtype=torch.long)


class read_batches:  # noqa: N801 - used as a function that returns an iterable
    """At most ``max_batches`` batches of ``loader``, and no new batch once fetching them took ``seconds`` (default
    :data:`SCAN_SECONDS`; the time spent waiting for the loader, not the caller's work on each batch; the first
    batch is always read). The workers end with the iteration. ``timed_out`` says whether the time budget stopped it
    before ``max_batches`` and the end of the data."""

    def __init__(self, loader: DataLoader, max_batches: int, seconds: Optional[float] = None) -> None:
        self.loader, self.max_batches = loader, max_batches
        self.seconds = SCAN_SECONDS if seconds is None else seconds
        self.timed_out = False

    def __iter__(self) -> Iterator[Any]:
        spent = 0.0
        it = iter(self.loader)
        try:
            for i in range(self.max_batches):
                if i and spent > self.seconds:
                    self.timed_out = True
                    return
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                spent += time.perf_counter() - t0
                yield batch
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
            del it


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
            batch = next(iter(read_batches(_private_loader(loader, one=True), 1)))
        except StopIteration:
            raise RecipeConfigError(EMPTY_LOADER) from None
    return _to_device(trainer, batch)


def _fast_targets(loader: DataLoader) -> tuple[Optional[Tensor], str]:
    """All targets of ``loader.dataset`` (in its own index order) read without loading inputs, or ``None``."""
    ds: Any = loader.dataset
    if loader.batch_size is None and getattr(loader, "batch_sampler", None) is None:
        return None, ""  # the dataset returns whole batches: its targets attribute need not be per example
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
    return t, src


def _consistent(fast: Tensor, probe_targets: Tensor) -> bool:
    """The fast-path targets look like the batch targets (same per-example shape and kind of dtype)."""
    return (
        tuple(fast.shape[1:]) == tuple(probe_targets.shape[1:])
        and fast.is_floating_point() == probe_targets.is_floating_point()
    )


def _verify(trainer: Any, loader: DataLoader, spec: TaskSpec, fast: Tensor, probe_targets: Tensor) -> Optional[str]:
    """Check the shortcut against what the batches carry. ``None`` when every target agrees, else why not.

    The probe batch (:func:`first_batch`: collated and moved as training does it, ``on_after_batch_transfer``
    included) is compared with the shortcut at its known indices, so no example is loaded again. A probe that does
    not align (another batch) is replaced by :data:`VERIFY_EXAMPLES` examples fetched by index with the dataset's own
    ``__getitem__``.
    """
    n = int(fast.shape[0])
    if n == 0:
        return "the dataset is empty"
    idx = _probe_indices(loader)
    if probe_targets.ndim and probe_targets.shape[0] == idx.numel() and bool((idx < n).all()):
        got, how = spec.canonical_targets(probe_targets.detach()).cpu(), "of the probe batch"
    else:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:VERIFY_EXAMPLES].sort().values
        how = "fetched with the dataset's own `__getitem__`"
        try:
            with isolate_rng():
                one = DataLoader(Subset(loader.dataset, idx.tolist()), batch_size=idx.numel(), shuffle=False,
                                 collate_fn=loader.collate_fn, num_workers=0)
                _, y = split_batch(_to_device(trainer, next(iter(one))))
                got = spec.canonical_targets(y.detach()).cpu()
        except Exception as err:  # what cannot be fetched by index, the scan reports in its own words
            return f"fetching {idx.numel()} examples by index failed ({type(err).__name__}: {err})"
    k = idx.numel()
    want = spec.canonical_targets(fast[idx]).cpu()
    if got.shape != want.shape:
        return (f"the batches carry targets of shape {tuple(got.shape)} for {k} examples, the shortcut "
                f"{tuple(want.shape)}")
    same = torch.isclose(wide(got), wide(want.to(got.device)), rtol=1e-5, atol=1e-6) if got.is_floating_point() else got == want
    rows = same.reshape(k, -1).all(1)
    bad = int((~rows).sum())
    if bad == 0:
        return None
    j = int((~rows).nonzero()[0])
    return (f"{bad} of {k} examples {how} carry other targets, e.g. example {int(idx[j])}: "
            f"{want.reshape(k, -1)[j].tolist()[:4]} in the shortcut, {got.reshape(k, -1)[j].tolist()[:4]} in the "
            "batch")


def _scan_targets(trainer: Any, loader: DataLoader, spec: TaskSpec, split: Any,
                  max_batches: int) -> tuple[Tensor, int, bool]:
    """Targets of at most ``max_batches`` batches of a private loader (time-bounded), the number of batches read and
    whether the time budget stopped the scan. Batches whose targets differ in shape beyond the first dimension
    (sequences padded to each batch's longest, such as a tagger's labels) are put in ``spec``'s canonical layout
    first, one row per position: their statistics are those of the positions."""
    out = []
    reader = read_batches(_private_loader(loader, seed=1, sampled=True), max_batches)
    with isolate_rng():
        for batch in reader:
            _, y = split_batch(_to_device(trainer, batch), split)
            out.append(y.detach())
            if sum(t.numel() for t in out) >= _MAX_VALUES:  # dense targets: enough positions for the statistics
                break
    if not out:
        raise RecipeConfigError(EMPTY_LOADER)
    if len({tuple(t.shape[1:]) for t in out}) > 1:
        out = [spec.canonical_targets(t) for t in out]
    return torch.cat(out, 0), len(out), reader.timed_out


def label_stats(
    trainer: Any, pl_module: Any, spec: TaskSpec, probe_targets: Tensor, split: Any = None, max_batches: int = 100
) -> LabelStats:
    """Label statistics of the training set for ``spec`` (counts reduced across ranks).

    The fast path (``dataset.targets`` and the like) is used only once :func:`_verify` found it equal to the targets
    the probe batch ``probe_targets`` carries; otherwise the private loader is scanned and ``spec.notes`` says why.
    With a ``WeightedRandomSampler`` in the training loader the statistics are those of the sampled stream (each
    example weighted by its normalised sampling weight; the scan samples with the same weights), since that is the
    prior the model sees.
    """
    loader = _single_loader(trainer.train_dataloader, "train")
    if is_iterable(loader):  # read by training only: the first batch it fetched
        return stats_from_targets(spec, spec.canonical_targets(probe_targets.to(pl_module.device)), trainer,
                                  FIRST_TRAINING_BATCH)
    if loader is None:
        return stats_from_targets(spec, spec.canonical_targets(probe_targets.to(pl_module.device)), trainer,
                                  "first batch")
    sampler = weighted_sampler(loader)
    targets, source = (None, "")
    if split is None:
        targets, source = _fast_targets(loader)
        if targets is not None and not _consistent(targets, probe_targets):
            targets, source = None, ""
        if targets is not None:
            why = _verify(trainer, loader, spec, targets, probe_targets)
            if why is not None:
                spec.notes.append(f"`{source}` does not match the targets the batches carry ({why}); the labels were "
                                  "read from the dataloader instead")
                targets, source = None, ""
    weights: Optional[Tensor] = None
    if targets is not None:
        if isinstance(loader.sampler, DistributedSampler):
            order = torch.as_tensor(list(iter(loader.sampler)), dtype=torch.long)
            targets = targets[order]
        elif sampler is not None:
            w = torch.as_tensor(sampler.weights, dtype=torch.float64).reshape(-1)
            if w.numel() == targets.shape[0] and bool(torch.isfinite(w).all()) and float(w.sum()) > 0:
                weights, source = w, f"{source} weighted by the WeightedRandomSampler's weights"
            else:
                targets, source = None, ""
    if targets is None:
        targets, read, timed_out = _scan_targets(trainer, loader, spec, split, max_batches)
        source = f"dataloader ({read} batch{'es' if read != 1 else ''} read"
        source += f", stopped by the time budget of {SCAN_SECONDS:g} s" if timed_out else ""
        source += ", drawn with the WeightedRandomSampler's weights)" if sampler is not None else ")"
    if sampler is not None:
        spec.notes.append("the training loader samples with a WeightedRandomSampler: the label statistics are those "
                          "of the sampled stream, the prior the model sees, not of the dataset")
    targets, source, weights = _bounded(targets, source, weights)
    canon = spec.canonical_targets(targets.to(pl_module.device))
    if weights is not None:
        weights = weights.to(canon.device).repeat_interleave(canon.shape[0] // max(targets.shape[0], 1))
    return stats_from_targets(spec, canon, trainer, source, weights)


def _bounded(targets: Tensor, source: str, weights: Optional[Tensor] = None) -> tuple[Tensor, str, Optional[Tensor]]:
    """At most ``_MAX_VALUES`` label values: whole examples drawn with a private generator (a dense target holds a
    value per pixel, and a large segmentation set would otherwise be read whole into memory); ``weights`` (one per
    example) follow the same draw."""
    n = targets.shape[0] if targets.ndim else 0
    if targets.numel() <= _MAX_VALUES or n < 2:
        return targets, source, weights
    keep = max(1, _MAX_VALUES // max(1, targets.numel() // n))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:keep]
    return (targets[idx.to(targets.device)], f"{source}, {keep} of {n} examples",
            weights[idx.to(weights.device)] if weights is not None else None)


def stats_from_targets(
    spec: TaskSpec, y: Tensor, trainer: Any = None, source: str = "", weights: Optional[Tensor] = None
) -> LabelStats:
    """Label statistics from canonical targets; sums are reduced across ranks when ``trainer`` is given.

    ``weights`` (one per row of ``y``, e.g. a ``WeightedRandomSampler``'s) weight each row, scaled so that they sum
    to the number of rows: counts and sums are those of the weighted distribution, and the sample is drawn with them.
    """

    def reduce(t: Tensor) -> Tensor:
        if trainer is not None and trainer.world_size > 1:
            t = t.clone()
            t = trainer.strategy.reduce(t, reduce_op="sum")
        return t

    mask = spec.valid_mask(y)
    if mask is not None:
        y = y[mask]
        weights = weights[mask] if weights is not None else None
    if weights is not None:
        w = wide(weights) * (y.shape[0] / wide(weights).sum().clamp_min(1e-300))
        # the sample is what the sampler draws: rows picked with their weights (a private generator)
        pick = torch.multinomial(w.cpu().float(), min(y.shape[0], _SAMPLE), replacement=True,
                                 generator=torch.Generator().manual_seed(0))
        sample = y[pick.to(y.device)].detach().cpu()
    elif y.shape[0] > _SAMPLE:  # a random subsample, drawn with a private generator
        idx = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(0))[:_SAMPLE]
        sample = y[idx.to(y.device)].detach().cpu()
    else:
        sample = y.detach().cpu()
    rw = w.to(y.device) if weights is not None else None  # row weights, or None (each row counts 1)
    count = int(reduce(torch.tensor([float(y.shape[0])], device=y.device, dtype=wide_dtype(y.device))).item())
    if spec.task == "multiclass":
        if spec.soft_targets:
            counts = (wide(y) * (rw[:, None] if rw is not None else 1.0)).sum(0)
        else:
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= spec.num_outputs):
                raise RecipeConfigError(
                    f"Class-index targets range over [{int(y.min())}, {int(y.max())}] but the model outputs "
                    f"{spec.num_outputs} classes. HINT: set the head's output size to the number of classes, or pass "
                    "`head=`/`forward=` if the wrong module or output was picked."
                )
            counts = torch.bincount(y, weights=rw, minlength=spec.num_outputs).to(wide_dtype(y.device))
        counts = reduce(counts).cpu()
        return LabelStats(spec.task, count, sample, class_counts=counts, source=source)
    if spec.task in ("binary", "multilabel"):
        pos = reduce((wide(y) * (rw[:, None] if rw is not None else 1.0)).sum(0)).cpu()
        return LabelStats(spec.task, count, sample, positives=pos, source=source)
    wy = rw[:, None] if rw is not None else 1.0
    s1 = reduce((wide(y) * wy).sum(0)).cpu()
    s2 = reduce((wide(y) ** 2 * wy).sum(0)).cpu()
    mean = s1 / max(count, 1)
    var = (s2 / max(count, 1) - mean**2).clamp_min(0)
    return LabelStats(spec.task, count, sample, mean=mean.float(), var=var.float(), source=source)
