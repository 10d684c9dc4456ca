"""Peak memory added by the recipe callbacks, as a multiple of the model's parameter bytes.

A ~17M-parameter MLP (2048 -> 4096 -> 2048 -> 10, Adam) and optionally a BatchNorm conv net (~1.8M parameters) are
fitted for ``--steps`` optimizer steps on synthetic data, once per configuration, each fit in its own subprocess so
that every peak is clean (after a warm-up fit of the same configuration on a tiny model in that process, so that
lazy imports and one-time caches are not counted, and with the heap pages freed by the build handed back to
the system first, so that neither side counts them). A child measures its peak memory during ``trainer.fit`` only
(model and data are built before): on CPU the peak resident set size (Linux ``VmHWM``, reset before the fit
through ``/proc/self/clear_refs``; elsewhere ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which then also covers
the build), on a GPU ``torch.cuda.max_memory_allocated`` (reset before the fit). What is printed per configuration
is its peak over the plain fit's peak (gradients, optimizer state and activations are on both sides) divided by
the parameters' bytes: ``+0.10x`` means the callbacks held at most a tenth of the model's size more than the plain
fit at their peak. Two peaks are given: over the whole fit, and over the setup only (up to the first training
batch, read by a last callback). A copy made at ``on_train_start`` and freed before the first step hides below
this fit's peak (gradients and Adam's state come later), not below that of a fit with a lighter optimizer or a
frozen backbone. On the small conv net, activations outweigh the parameters, and RSS peaks move by a few MiB
between identical runs: read its ratios with that in mind.

    python benchmarks/memory.py                                   # plain, recommended(), the two checks alone
    python benchmarks/memory.py --models mlp conv --repeats 3     # median of 3 fits per configuration
    python benchmarks/memory.py --configs ParameterUpdateCheck    # one check alone (plain always runs)
    python benchmarks/memory.py --configs all                     # the preset and each of its checks alone
    python benchmarks/memory.py --device cuda                     # on a GPU (torch.cuda peak allocation)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import warnings
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr
from lightning_recipe._core.memory import release_freed_memory

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MLP(L.LightningModule):
    def __init__(self, dims: tuple[int, ...] = (2048, 4096, 2048, 10)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class ConvNet(MLP):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
        )


def _data(model: str, n: int = 256, batch_size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (n,), generator=g)
    shape = (n, 2048) if model == "mlp" else (n, 3, 8, 8)
    centers = torch.randn((10, *shape[1:]), generator=g)
    x = centers[y] + torch.randn(shape, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


CONFIGS: dict[str, Callable[[], list[Callback]]] = {
    "plain": lambda: [],
    "recommended": lambda: lr.recommended(),
    "recommended-DataCheck": lambda: lr.recommended(exclude=["DataCheck"]),  # what the data scan and its figure add
}
# each check of the preset alone (``--configs`` with its class name)
for _cb in lr.recommended()[0].callbacks:
    CONFIGS[type(_cb).__name__] = (lambda cls: lambda: [cls(on_fail="warn")])(type(_cb))
DEFAULT_CONFIGS = ["recommended", "BatchIndependenceCheck", "ParameterUpdateCheck"]


def _hwm_reset() -> bool:
    """Reset Linux's peak resident set size of this process (``VmHWM``); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class _SetupPeak(Callback):
    """Reads the peak so far when the first training batch starts: what the callbacks' setup (``on_train_start``)
    held at its peak, before gradients and optimizer state exist."""

    def __init__(self, read: Callable[[], int]) -> None:
        self.read, self.peak = read, None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.peak is None:
            self.peak = self.read()


def _warm_up(model_name: str, config: str, device: str) -> None:
    """The same configuration on a tiny model first, so that what is loaded once per process (lazy imports such as
    matplotlib, kernels, allocator pools) is not counted as the callbacks' memory."""
    model = MLP((2048, 16, 10)) if model_name == "mlp" else ConvNet(width=4)
    with tempfile.TemporaryDirectory() as root:
        L.Trainer(max_steps=8, max_epochs=-1, accelerator=device, devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, enable_checkpointing=False, default_root_dir=root,
                  callbacks=CONFIGS[config](), num_sanity_val_steps=0).fit(model, _data(model_name))


def child(model_name: str, config: str, steps: int, device: str) -> dict[str, Any]:
    """One fit; its peak memory above the memory held when the fit starts, in bytes."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    _warm_up(model_name, config, device)
    L.seed_everything(0, verbose=False)
    model = MLP() if model_name == "mlp" else ConvNet()
    data = _data(model_name)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    callbacks = CONFIGS[config]()
    if device == "cuda":
        read = torch.cuda.max_memory_allocated
    elif os.path.exists("/proc/self/clear_refs"):
        read = lambda: _status_kb("VmHWM") * 1024  # noqa: E731
    else:
        read = _maxrss
    setup = _SetupPeak(read)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator=device, devices=1, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            default_root_dir=root, callbacks=[*callbacks, setup], num_sanity_val_steps=0)
        if device == "cuda":
            model.cuda()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            trainer.fit(model, data)
            torch.cuda.synchronize()
            peak, how = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
        else:
            gc.collect()
            release_freed_memory()  # the build's freed heap pages are not counted as the fit's (both sides alike)
            if _hwm_reset():
                base = _status_kb("VmRSS") * 1024
                trainer.fit(model, data)
                peak, how = _status_kb("VmHWM") * 1024, "VmHWM (reset before the fit)"
            else:
                base = _maxrss()
                trainer.fit(model, data)
                peak = _maxrss()
                how = "ru_maxrss"
    statuses = {f.check: f.status for f in lr.collect_findings(trainer)}
    return {"model": model_name, "config": config, "param_bytes": param_bytes, "delta": peak - base,
            "setup_delta": (setup.peak or peak) - base, "how": how,
            "findings": statuses, "steps": trainer.global_step}


def _run_child(model: str, config: str, steps: int, device: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", model, config, "--steps", str(steps),
           "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{model}/{config} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp"], choices=["mlp", "conv"])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=[*CONFIGS, "all"],
                        help="configurations besides the plain fit; `all`: the preset and each of its checks alone")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.steps, args.device)))
        return
    if "all" in args.configs:
        args.configs = [c for c in CONFIGS if c != "plain"]
    print(f"device {args.device}, {args.steps} steps, median of {args.repeats} fit(s) per configuration")
    for model in args.models:
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.repeats):  # interleaved, so that machine noise hits every configuration alike
            for config in ["plain", *[c for c in args.configs if c != "plain"]]:
                runs.setdefault(config, []).append(_run_child(model, config, args.steps, args.device))
        pb = runs["plain"][0]["param_bytes"]
        plain = statistics.median(r["delta"] for r in runs["plain"])
        plain_setup = statistics.median(r["setup_delta"] for r in runs["plain"])
        print(f"\n{model}: {pb / 4 / 1e6:.1f}M parameters ({pb / 2**20:.1f} MiB), plain fit peak +{plain / pb:.2f}x "
              f"the parameters' bytes, setup peak +{plain_setup / pb:.2f}x ({runs['plain'][0]['how']})")
        for config, rs in runs.items():
            if config == "plain":
                continue
            extra = statistics.median(r["delta"] for r in rs) - plain
            extra_setup = statistics.median(r["setup_delta"] for r in rs) - plain_setup
            bad = sorted({k for r in rs for k, s in r["findings"].items() if s in ("warn", "fail")})
            print(f"  {config:<24} fit peak {extra / pb:+.3f}x the parameters' bytes ({extra / 2**20:+.1f} MiB); "
                  f"setup peak {extra_setup / pb:+.3f}x ({extra_setup / 2**20:+.1f} MiB)"
                  + (f"   findings warn/fail: {bad}" if bad else ""))


if __name__ == "__main__":
    main()
