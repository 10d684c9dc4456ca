"""Host syncs, wall-time overhead and peak GPU memory of ``recommended()`` on a CUDA GPU, per precision.

Two small models on synthetic data they learn within the first steps (a healthy fit: no check should warn): a CNN
on 3x32x32 images (10 classes, a class pattern under unit noise) and a 2-layer transformer encoder on 64-token
sequences (10 classes; 30% of the tokens drawn from the class's own 100 of the 1000 tokens). Each is fitted in ``32-true``, ``16-mixed`` (Lightning's GradScaler) and ``bf16-mixed`` (when the GPU
has bfloat16), plain and with ``recommended()``:

* **host syncs**: one fit per configuration under ``torch.cuda.set_sync_debug_mode("warn")``, which warns at every
  synchronizing CUDA call; the warnings are counted, before the first training step ends (setup: the label scan, the
  probes, the first-step checks) and per training step after it (the deltas between successive ``on_train_batch_end``
  of a counting callback placed last). A GradScaler syncs once per step itself (``scaler.step`` reads ``found_inf``),
  so the plain fit is the baseline: the recipe's per-step syncs are the difference (a periodic read every N steps
  shows up in the maximum, not in the median).
* **overhead**: ``--repeats`` interleaved timed fits (plain, recommended, plain, ...), sync debug mode off,
  ``torch.cuda.synchronize()`` around each; the median of each repeat's ratio to its own plain fit.
* **peak memory**: ``torch.cuda.max_memory_allocated()`` of each timed fit (reset before it), the median; printed as
  the ratio to the plain fit and as the extra bytes over the parameters' bytes (the design's budget: at most +0.10x).

Each sync-counting fit also counts the ``RecipeWarning``s it raised: both fits are healthy, so any is a false alarm
(printed with its message). On a machine without CUDA it says so and exits 0; ``--cpu`` runs the same fits on the
CPU (``32-true`` only, no sync counting or GPU memory: a check of the script and of the warnings before a GPU run).

    python benchmarks/gpu.py                               # both models, every precision, 300 steps x 3 repeats
    python benchmarks/gpu.py --cpu --steps 60 --sync-steps 60 --repeats 1   # the script's own smoke run, on a CPU
    python benchmarks/gpu.py --models cnn --precisions 16-mixed --steps 200 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr
from overhead import DigitsCNN  # benchmarks/ is on the path when a script here runs

_SYNC = "synchronizing"  # the text of the warning torch emits in sync debug mode "warn"


class CNN(DigitsCNN):
    """A deeper CNN on 3x32x32 inputs with AdamW; the forward and training step are ``overhead.py``'s."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
        )

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Transformer(L.LightningModule):
    def __init__(self, vocab: int = 1000, d: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, 64, d))
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)
        self.head = nn.Linear(d, 10)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.embed(tokens) + self.pos[:, : tokens.shape[1]])
        return self.head(h.mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def cnn_data(n: int = 8192, batch_size: int = 128) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    templates = nn.functional.interpolate(torch.randn(10, 3, 4, 4, generator=g), size=32)  # blobs of 8x8 pixels
    x = torch.randn(n, 3, 32, 32, generator=g) + templates[y]  # a class pattern under unit noise
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, pin_memory=True, drop_last=True)


def transformer_data(n: int = 8192, batch_size: int = 64) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    noise = torch.randint(0, 1000, (n, 64), generator=g)
    topical = y[:, None] * 100 + torch.randint(0, 100, (n, 64), generator=g)  # the class's own 100 tokens
    x = torch.where(torch.rand(n, 64, generator=g) < 0.3, topical, noise)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, pin_memory=True, drop_last=True)


MODELS: dict[str, tuple[Callable[[], L.LightningModule], Callable[[], DataLoader]]] = {
    "cnn": (CNN, cnn_data),
    "transformer": (Transformer, transformer_data),
}
CONFIGS: dict[str, Callable[[], list[Callback]]] = {"plain": lambda: [], "recommended": lambda: lr.recommended()}


class StepMarks(Callback):
    """The number of warnings recorded so far at each ``on_train_batch_end`` (placed last: after the recipe's)."""

    def __init__(self, record: list) -> None:
        self.record = record
        self.marks: list[int] = []

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.marks.append(len(self.record))


def _fit_parts(model_name: str, callbacks: list[Callback], precision: str, steps: int, root: str,
               cuda: bool) -> tuple[L.LightningModule, DataLoader, L.Trainer]:
    """The model, its data (8192 examples on a GPU, 1024 on a CPU) and the trainer of one fit, seeded."""
    build, data = MODELS[model_name]
    L.seed_everything(0, verbose=False)
    model, loader = build(), data(n=8192 if cuda else 1024)
    trainer = L.Trainer(
        accelerator="cuda" if cuda else "cpu", devices=1, precision=precision, max_steps=steps, max_epochs=-1,
        callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=root, num_sanity_val_steps=0,
    )
    return model, loader, trainer


def count_syncs(model_name: str, config: str, precision: str, steps: int, root: str,
                cuda: bool = True) -> dict[str, Any]:
    """Host syncs of one fit: before the first step ends, and per step after it (median, mean, max; none counted on
    a CPU); and the messages of the ``RecipeWarning``s it raised (``"recipe_warnings"``)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        marks = StepMarks(record)
        model, loader, trainer = _fit_parts(model_name, [*CONFIGS[config](), marks], precision, steps, root, cuda)
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.fit(model, loader)
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        is_sync = [_SYNC in str(w.message) for w in record]
        alarms = [str(w.message) for w in record if issubclass(w.category, lr.RecipeWarning)]
    prefix = [0]
    for s in is_sync:
        prefix.append(prefix[-1] + int(s))
    at = [prefix[m] for m in marks.marks]  # syncs up to each step's end
    per_step = [b - a for a, b in zip(at, at[1:])]
    return {
        "setup": float(at[0]) if at else float(prefix[-1]),
        "median": float(statistics.median(per_step)) if per_step else float("nan"),
        "mean": statistics.fmean(per_step) if per_step else float("nan"),
        "max": float(max(per_step)) if per_step else float("nan"),
        "total": float(prefix[-1]),
        "recipe_warnings": alarms,
    }


def timed_fit(model_name: str, config: str, precision: str, steps: int, root: str,
              cuda: bool = True) -> tuple[float, int, int]:
    """Wall seconds, peak bytes allocated during the fit (0 on a CPU), parameter bytes."""
    model, loader, trainer = _fit_parts(model_name, CONFIGS[config](), precision, steps, root, cuda)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return wall, (torch.cuda.max_memory_allocated() if cuda else 0), param_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="*", default=["32-true", "16-mixed", "bf16-mixed"],
                        choices=["32-true", "16-mixed", "bf16-mixed"])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per fit")
    parser.add_argument("--sync-steps", type=int, default=120, help="optimizer steps of the sync-counting fits")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed repeats of plain and recommended")
    parser.add_argument("--cpu", action="store_true", help="the same fits on the CPU, 32-true (a smoke run)")
    args = parser.parse_args()
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to "
              "measure. Run it on a machine with an NVIDIA GPU.")
        return 0
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_recipe"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.cpu:
        precisions = ["32-true"]
        print(f"device: CPU (smoke run), torch {torch.__version__}, lightning {L.__version__}")
    else:
        precisions = [p for p in args.precisions if p != "bf16-mixed" or torch.cuda.is_bf16_supported()]
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, lightning {L.__version__}")
    root = tempfile.mkdtemp()
    # one throw-away fit per model: CUDA context, cuDNN autotuning and lazy imports are not counted below
    for m in args.models:
        timed_fit(m, "recommended", "32-true", 5, root, cuda)
    for m in args.models:
        for prec in precisions:
            print(f"\n== {m}, precision={prec} ==")
            print(f"  host syncs ({args.sync_steps}-step fit; per step = between successive steps' ends):")
            print(f"    {'config':<12}{'setup':>8}{'median':>8}{'mean':>8}{'max':>6}{'total':>8}")
            syncs = {}
            for cfg in CONFIGS:
                s = count_syncs(m, cfg, prec, args.sync_steps, root, cuda)
                syncs[cfg] = s
                print(f"    {cfg:<12}{s['setup']:>8.0f}{s['median']:>8.1f}{s['mean']:>8.2f}{s['max']:>6.0f}"
                      f"{s['total']:>8.0f}")
            alarms = syncs["recommended"]["recipe_warnings"]
            print(f"    RecipeWarnings of the recommended() fit (a healthy fit: each is a false alarm): {len(alarms)}")
            for a in alarms:
                print(f"      - {a[:300]}")
            extra = syncs["recommended"]["median"] - syncs["plain"]["median"]
            print(f"    recommended() adds {extra:+.1f} sync(s) per step (median; the plain fit's are Lightning's and "
                  "the GradScaler's)")
            walls: dict[str, list[float]] = {c: [] for c in CONFIGS}
            peaks: dict[str, list[int]] = {c: [] for c in CONFIGS}
            param_bytes = 0
            for _ in range(args.repeats):
                for cfg in CONFIGS:  # interleaved: machine noise hits both alike
                    wall, peak, param_bytes = timed_fit(m, cfg, prec, args.steps, root, cuda)
                    walls[cfg].append(wall)
                    peaks[cfg].append(peak)
            ratios = [r / p for r, p in zip(walls["recommended"], walls["plain"])]
            peak_plain, peak_rec = statistics.median(peaks["plain"]), statistics.median(peaks["recommended"])
            print(f"  overhead ({args.steps} steps x {args.repeats} repeats): plain {statistics.median(walls['plain']):.2f}s"
                  f", recommended {statistics.median(walls['recommended']):.2f}s, ratio x{statistics.median(ratios):.3f} "
                  f"(repeats: {', '.join(f'x{r:.3f}' for r in ratios)})")
            if args.cpu:
                continue  # no GPU memory to read (benchmarks/memory.py measures the CPU's)
            print(f"  peak memory: plain {peak_plain / 2**20:.1f} MiB, recommended {peak_rec / 2**20:.1f} MiB, ratio "
                  f"x{peak_rec / max(peak_plain, 1):.3f}; extra {(peak_rec - peak_plain) / max(param_bytes, 1):+.3f}x "
                  f"the parameters' {param_bytes / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
