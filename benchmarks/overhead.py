"""Wall-time overhead of the recipe callbacks on a realistic CPU fit.

A small CNN on scikit-learn's digits (8x8 images, 10 classes), logger, progress bar and checkpointing off, trained
for ``--steps`` optimizer steps. The configurations run interleaved (plain, ``recommended()``, ``strict()``,
Lightning's ``SpikeDetection``, which syncs every step) ``--repeats`` times, so that machine noise hits them
alike; each repeat's ratio to its own plain fit is printed, then the median ratio per configuration.

    python benchmarks/overhead.py                      # 3000 steps x 5 repeats
    python benchmarks/overhead.py --steps 300 --repeats 3   # a quick run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, SpikeDetection
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr


class DigitsCNN(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def digits_loader(batch_size: int = 32) -> DataLoader:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


CONFIGS: dict[str, Callable[[], list[Callback]]] = {
    "plain": lambda: [],
    "recommended": lambda: lr.recommended(),
    "strict": lambda: lr.strict(),
    "SpikeDetection": lambda: [SpikeDetection(rtol=1e9)],  # never fires: only its per-step cost counts
}
# each check of the preset alone (``--configs`` with its class name), for the per-check cost table of the README
for _cb in lr.recommended()[0].callbacks:
    CONFIGS[type(_cb).__name__] = (lambda cls: lambda: [cls(on_fail="warn")])(type(_cb))


def fit_seconds(callbacks: list[Callback], steps: int, root: str) -> float:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks, default_root_dir=root,
    )
    model, data = DigitsCNN(), digits_loader()
    t0 = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - t0


def hook_times(steps: int, root: str) -> None:
    """Time spent inside each callback of ``recommended()`` during one fit, split into per-step and one-time hooks."""
    import collections
    import functools

    (recipe,) = lr.recommended()
    callbacks = recipe.callbacks
    spent: dict[tuple[str, str], float] = collections.defaultdict(float)
    hooks = [h for h in dir(Callback) if h.startswith("on_") or h in ("setup", "teardown", "state_dict")]
    for cb in callbacks:
        for h in hooks:
            if getattr(type(cb), h) is getattr(Callback, h):
                continue  # not implemented: the Recipe does not call it
            def timed(f: Callable = getattr(cb, h), key: tuple[str, str] = (type(cb).__name__, h)) -> Callable:
                @functools.wraps(f)
                def g(*a: Any, **k: Any) -> Any:
                    t0 = time.perf_counter()
                    try:
                        return f(*a, **k)
                    finally:
                        spent[key] += time.perf_counter() - t0
                return g
            setattr(cb, h, timed())
    total = fit_seconds([recipe], steps, root)
    per_step = ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                "on_before_optimizer_step", "on_before_zero_grad")
    print(f"\ntime inside each callback of recommended() over one {steps}-step fit ({total:.2f}s):")
    print(f"  {'callback':<26}{'per step (ms)':>14}{'one-time (s)':>14}")
    for name in dict.fromkeys(type(cb).__name__ for cb in callbacks):
        step_s = sum(v for (c, h), v in spent.items() if c == name and h in per_step)
        once_s = sum(v for (c, h), v in spent.items() if c == name and h not in per_step)
        print(f"  {name:<26}{1e3 * step_s / steps:>14.3f}{once_s:>14.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per fit")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise)")
    parser.add_argument("--hook-times", action="store_true", help="also time each callback's hooks in one fit")
    parser.add_argument("--configs", nargs="*", default=["plain", "recommended", "strict", "SpikeDetection"],
                        choices=list(CONFIGS), help="configurations to time; a check's class name times it alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    configs = ["plain"] + [c for c in args.configs if c != "plain"]
    with tempfile.TemporaryDirectory() as root:
        fit_seconds([], min(args.steps, 50), root)  # warm-up: imports, allocator, first figure
        fit_seconds(lr.recommended(), min(args.steps, 50), root)
        times: dict[str, list[float]] = {c: [] for c in configs}
        for r in range(args.repeats):
            for c in configs:
                times[c].append(fit_seconds(CONFIGS[c](), args.steps, root))
            line = "  ".join(f"{c} {times[c][-1]:.2f}s" + ("" if c == "plain" else f" (x{times[c][-1] / times['plain'][-1]:.3f})")
                             for c in configs)
            print(f"repeat {r + 1}/{args.repeats}: {line}", flush=True)
    print(f"\n{args.steps} steps, {args.repeats} repeats, median wall-time ratio to plain "
          f"(plain median {statistics.median(times['plain']):.2f}s, {1e3 * statistics.median(times['plain']) / args.steps:.2f} ms/step):")
    for c in configs[1:]:
        ratios = [a / b for a, b in zip(times[c], times["plain"])]
        extra_ms = 1e3 * statistics.median([a - b for a, b in zip(times[c], times["plain"])]) / args.steps
        print(f"  {c:<15} x{statistics.median(ratios):.3f}  (per repeat: {', '.join(f'{x:.3f}' for x in ratios)}; "
              f"{extra_ms:+.3f} ms/step)")
    if args.hook_times:
        with tempfile.TemporaryDirectory() as root:
            hook_times(args.steps, root)


if __name__ == "__main__":
    main()
