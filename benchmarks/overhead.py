"""Wall-time overhead of the recipe callbacks on a realistic CPU fit.

A small CNN on scikit-learn's digits (8x8 images, 10 classes), logger, progress bar and checkpointing off, trained
for ``--steps`` optimizer steps on batches of ``--batch-size``. The configurations run interleaved (plain,
``recommended()``, ``strict()``, Lightning's ``SpikeDetection``, which syncs every step, and one no-op callback,
Lightning's own cost of a callback) ``--repeats`` times, so that machine noise hits them alike; each repeat's ratio
to its own plain fit is printed, then per configuration the median ratio, the seconds spent in one-time hooks (timed
inside the fit: data scan, probes, figures, report), the rest of the extra time per step, and the fit length from
which the whole-fit ratio is at most x1.03 on this model (one-time cost / (3% of a step - the per-step cost)).

    python benchmarks/overhead.py                      # 3000 steps x 5 repeats, batches of 32
    python benchmarks/overhead.py --batch-size 128     # a heavier step: the same absolute cost, a smaller ratio
    python benchmarks/overhead.py --steps 300 --repeats 3   # a quick run
    python benchmarks/overhead.py --configs recommended --hook-times   # time inside each check, per step and once
    python benchmarks/overhead.py --logger tensorboard  # live scalars and figures to TensorBoard (default: none)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import timeit
import warnings
from typing import Any, Callable, NamedTuple

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, SpikeDetection
from lightning.pytorch.profilers import Profiler
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
    "one no-op callback": lambda: [Callback()],  # Lightning's own cost of dispatching the hooks to one callback
}
# each check of the preset alone (``--configs`` with its class name), for the per-check cost table of the README
for _cb in lr.recommended()[0].callbacks:
    CONFIGS[type(_cb).__name__] = (lambda cls: lambda: [cls(on_fail="warn")])(type(_cb))


_ONCE = ("setup", "teardown", "on_fit_start", "on_fit_end", "on_train_start", "on_train_end",
         "on_sanity_check_start", "on_sanity_check_end")


def dispatch_seconds() -> float:
    """Lightning's own cost of calling one hook on one callback (its loop, profiler context and call), in seconds."""
    from lightning.pytorch.trainer import call

    def per_call(callbacks: list[Callback]) -> float:
        t = L.Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False)
        return min(timeit.repeat(lambda: call._call_callback_hooks(t, "on_before_zero_grad", None), number=20000,
                                 repeat=5)) / 20000

    return max(0.0, per_call([Callback()]) - per_call([]))


class Fit(NamedTuple):
    wall: float  # seconds of trainer.fit
    once: float  # of which inside the callbacks' one-time hooks (fit start and end)
    hooks: float  # of which inside all of their hooks
    calls: int  # hook calls Lightning made to them
    live: dict  # live figures: seconds spent, redraws and last cost per figure (lightning_recipe.report.live.spent)


class HookTimer(Profiler):
    """Times every callback hook as Lightning calls it (its ``[Callback]<key>.<hook>`` profiler actions), nothing else.

    Lightning wraps each hook call of each callback in ``trainer.profiler.profile(...)``, so this sees exactly the
    calls it makes: a hook a callback leaves as ``None`` is skipped by Lightning and costs nothing here either (a
    wrapper around the bound methods would turn every hook back on). Every fit of the benchmark, the plain one too,
    runs with it, so its own cost (a prefix test per action) is on both sides.
    """

    def __init__(self) -> None:
        super().__init__()
        self.once = self.all = 0.0
        self.calls = 0
        self._open: dict[str, float] = {}

    def start(self, action_name: str) -> None:
        if action_name.startswith("[Callback]"):
            self._open[action_name] = time.perf_counter()

    def stop(self, action_name: str) -> None:
        t0 = self._open.pop(action_name, None)
        if t0 is not None:
            dt = time.perf_counter() - t0
            self.all += dt
            self.once += dt if action_name.rsplit(".", 1)[-1] in _ONCE else 0.0
            self.calls += 1

    def summary(self) -> str:
        return ""


def fit_seconds(callbacks: list[Callback], steps: int, root: str, batch_size: int = 32, logger: str = "none") -> Fit:
    """One timed fit; the callbacks' hooks are timed as Lightning calls them (:class:`HookTimer`). ``logger``:
    ``"none"`` (figures go to PNG files only) or ``"tensorboard"`` (live scalars and figures to an event file)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_recipe.report import live

    timer = HookTimer()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="cpu", devices=1, enable_progress_bar=False,
        logger=TensorBoardLogger(root) if logger == "tensorboard" else False,
        enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks, default_root_dir=root,
        profiler=timer,
    )
    model, data = DigitsCNN(), digits_loader(batch_size)
    t0 = time.perf_counter()
    trainer.fit(model, data)
    return Fit(time.perf_counter() - t0, timer.once, timer.all, timer.calls, live.spent(trainer))


def hook_times(steps: int, root: str, batch_size: int = 32, logger: str = "none") -> None:
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
    total = fit_seconds([recipe], steps, root, batch_size, logger).wall
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
    parser.add_argument("--batch-size", type=int, default=32, help="training batch size (the step's cost)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least noise)")
    parser.add_argument("--hook-times", action="store_true", help="also time each callback's hooks in one fit")
    parser.add_argument("--logger", choices=["none", "tensorboard"], default="none",
                        help="the fits' logger: none (figures to PNG files only) or tensorboard (live scalars too)")
    parser.add_argument("--configs", nargs="*",
                        default=["plain", "recommended", "strict", "SpikeDetection", "one no-op callback"],
                        choices=list(CONFIGS), help="configurations to time; a check's class name times it alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    configs = ["plain"] + [c for c in args.configs if c != "plain"]
    dispatch = dispatch_seconds()
    with tempfile.TemporaryDirectory() as root:
        fit_seconds([], min(args.steps, 50), root, args.batch_size, args.logger)  # warm-up: imports, first figure
        fit_seconds(lr.recommended(), min(args.steps, 50), root, args.batch_size, args.logger)
        fits: dict[str, list[Fit]] = {c: [] for c in configs}
        for r in range(args.repeats):
            for c in configs:
                fits[c].append(fit_seconds(CONFIGS[c](), args.steps, root, args.batch_size, args.logger))
            plain_wall = fits["plain"][-1].wall
            line = "  ".join(f"{c} {fits[c][-1].wall:.2f}s" + ("" if c == "plain" else f" (x{fits[c][-1].wall / plain_wall:.3f})")
                             for c in configs)
            print(f"repeat {r + 1}/{args.repeats}: {line}", flush=True)
    plain = statistics.median(f.wall for f in fits["plain"])
    step_ms = 1e3 * plain / args.steps
    print(f"\n{args.steps} steps of batch {args.batch_size} x {args.repeats} interleaved repeats; plain fit median "
          f"{plain:.2f}s ({step_ms:.2f} ms/step); Lightning's dispatch of one hook to one callback: {1e6 * dispatch:.1f} us.")
    print("Per configuration, medians over the repeats of:\n"
          "  wall: the fit's wall time over the plain fit of the same repeat (machine noise included: compare with the\n"
          "        no-op callback, whose true cost is its dispatch);\n"
          "  in-fit: the fit's wall time over the same fit less the time inside the callbacks' hooks and Lightning's\n"
          "        dispatch of them (both measured in that fit, so a machine that slows down affects both sides);\n"
          "  once: seconds in one-time hooks (fit start and end: data scan, probes, figures, report);\n"
          "  per step: the rest of the callbacks' time with the dispatch, per step;\n"
          "  x1.03 from: the fit length from which the in-fit ratio is at most x1.03 on this model.")
    print(f"  {'configuration':<22}{'wall':>8}{'in-fit':>9}{'once':>9}{'per step':>12}{'x1.03 from':>16}")
    for c in configs[1:]:
        wall = statistics.median(f.wall / p.wall for f, p in zip(fits[c], fits["plain"]))
        cost = [f.hooks + f.calls * dispatch for f in fits[c]]
        in_fit = statistics.median(f.wall / (f.wall - k) for f, k in zip(fits[c], cost))
        fixed = statistics.median(f.once for f in fits[c])
        per_step = 1e3 * statistics.median(k - f.once for f, k in zip(fits[c], cost)) / args.steps
        own_step = statistics.median(1e3 * (f.wall - k) / args.steps for f, k in zip(fits[c], cost))
        room = 0.03 * own_step - per_step  # ms per step left for the one-time cost under x1.03
        reach = f"{1e3 * fixed / room:,.0f} steps" if room > 0 else "never"
        print(f"  {c:<22}x{wall:<7.3f}x{in_fit:<8.3f}{fixed:>7.2f}s{per_step:>+9.3f} ms{reach:>16}")
        print(f"  {'':<22}(wall per repeat: {', '.join(f'x{f.wall / p.wall:.3f}' for f, p in zip(fits[c], fits['plain']))})")
        redraws = [sum(f.live["redraws"].values()) for f in fits[c]]
        if any(redraws):
            costs = [v for f in fits[c] for v in f.live["costs_s"].values()]
            spent = ", ".join(f"{f.live['spent_s']:.2f}s" for f in fits[c])
            share = ", ".join(f"{100 * f.live['spent_s'] / f.wall:.2f}%" for f in fits[c])
            print(f"  {'':<22}(live redraws per fit: {redraws}, {spent} = {share} of the fit, "
                  f"{statistics.median(costs):.3f}s each (median), counted in per step)")
        else:
            print(f"  {'':<22}(no live redraw: the fit is shorter than its first redraw's share of the time budget)")
    if args.hook_times:
        with tempfile.TemporaryDirectory() as root:
            hook_times(args.steps, root, args.batch_size, args.logger)


if __name__ == "__main__":
    main()
