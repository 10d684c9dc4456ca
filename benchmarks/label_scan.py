"""Label statistics from ``dataset.targets`` (the fast path) against a pass over the train dataloader.

A dataset of ``--n`` (default 1,000,000) labelled examples whose ``__getitem__`` sleeps ``--delay`` seconds (an image
decoded from disk, say). The fast path reads ``dataset.targets`` without loading a single example; the dataloader
pass loads every example. The pass is timed over ``--limit-batches`` batches only (so the benchmark ends in well under
a minute) and extrapolated linearly to the whole dataset: loading cost is the same for every batch.

    python benchmarks/label_scan.py
    python benchmarks/label_scan.py --n 100000 --delay 0.0005
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_recipe._core.conventions import resolve_task
from lightning_recipe._core.labels import label_stats


class SlowDataset(Dataset):
    def __init__(self, n: int, classes: int, delay: float) -> None:
        g = torch.Generator().manual_seed(0)
        self.targets = torch.multinomial(torch.linspace(1.0, 2.0, classes), n, replacement=True, generator=g)
        self.delay = delay
        self.loaded = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Any:
        self.loaded += 1
        time.sleep(self.delay)
        return torch.zeros(8), self.targets[i]


class _Trainer:
    """What ``label_stats`` reads from a trainer."""

    def __init__(self, loader: DataLoader) -> None:
        self.train_dataloader = loader
        self.world_size = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="examples in the dataset")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--delay", type=float, default=1e-3, help="seconds slept per __getitem__")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit-batches", type=int, default=20, help="batches of the timed dataloader pass")
    args = parser.parse_args()

    ds = SlowDataset(args.n, args.classes, args.delay)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True)
    spec = resolve_task(nn.CrossEntropyLoss(), torch.zeros(2, args.classes), torch.zeros(2, dtype=torch.long))

    t0 = time.perf_counter()
    stats = label_stats(_Trainer(loader), L.LightningModule(), spec, torch.zeros(2, dtype=torch.long))
    fast = time.perf_counter() - t0
    assert ds.loaded == 0, "the fast path loaded examples"

    t0 = time.perf_counter()
    seen = 0
    counts = torch.zeros(args.classes, dtype=torch.long)
    for i, (_, y) in enumerate(loader):
        counts += torch.bincount(y, minlength=args.classes)
        seen += len(y)
        if i + 1 >= args.limit_batches:
            break
    partial = time.perf_counter() - t0
    full = partial * len(ds) / seen

    print(f"dataset: {args.n:,} examples, {args.delay * 1e3:g} ms per __getitem__, batch size {args.batch_size}")
    print(f"fast path ({stats.source}): {fast:.3f} s for all {stats.count:,} labels, 0 examples loaded")
    print(f"dataloader pass: {partial:.2f} s for {seen:,} examples ({args.limit_batches} batches) "
          f"-> {full:,.0f} s ({full / 60:.1f} min) extrapolated to the full dataset")
    print(f"speed-up: x{full / fast:,.0f}")
    bounded = min(100 * args.batch_size, len(ds))  # label_stats' fallback scan reads at most max_batches=100 batches
    print(f"(without `targets`, the fallback scan reads at most 100 batches: {bounded:,} examples, "
          f"~{partial * bounded / seen:,.0f} s, and only a sample of the labels)")
    frac = counts.double() / counts.sum()
    print(f"class frequencies, fast path: {[round(float(c) / stats.count, 4) for c in stats.class_counts]}")
    print(f"class frequencies, {seen:,} loaded examples: {[round(float(f), 4) for f in frac]}")


if __name__ == "__main__":
    main()
