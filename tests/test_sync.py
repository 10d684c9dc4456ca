"""No per-step host/device sync: the syncs a callback adds grow with K / N (its read interval), not with K.

Every host sync a Python callback can trigger goes through one of a few ``torch.Tensor`` methods (``item``, ``cpu``,
``tolist``, ``numpy``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``__format__``...). They are counted
while the training loop runs (from the first ``on_train_start`` to the last ``on_train_end``) for fits of K and 2K
steps; the calls a plain fit makes are subtracted, so only a callback's own syncs remain. On a GPU the same
property shows with ``torch.cuda.set_sync_debug_mode("warn")``.

The set of callbacks is a parametrize list: a new check joins by adding a factory ``n -> [callbacks]`` that reads
the device every ``n`` steps.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, SpikeDetection
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from helpers import TinyModel, blobs, loader, trainer
from lightning_recipe._core.labels import label_stats
from lightning_recipe.checks.head_bias import HeadBiasInit
from lightning_recipe.checks.initial_loss import InitialLossCheck
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.checks.prediction_dynamics import PredictionDynamics
from lightning_recipe.checks.wiring import WiringCheck

_SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__format__")


class _SyncCounter:
    """Patches the syncing ``torch.Tensor`` methods while active and counts their calls."""

    def __init__(self) -> None:
        self.count = 0
        self.by_method: dict[str, int] = {}
        self._saved: dict[str, Any] = {}

    def start(self) -> None:
        for name in _SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def patched(*args: Any, __name: str = name, __original: Any = original, **kwargs: Any) -> Any:
                self.count += 1
                self.by_method[__name] = self.by_method.get(__name, 0) + 1
                return __original(*args, **kwargs)

            setattr(torch.Tensor, name, patched)

    def stop(self) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()


class _Start(Callback):
    def __init__(self, counter: _SyncCounter) -> None:
        self.counter = counter

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.counter.start()


class _Stop(Callback):
    def __init__(self, counter: _SyncCounter) -> None:
        self.counter = counter

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.counter.stop()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.counter.stop()  # also on an exception


class _ItemEveryStep(Callback):
    """A positive control: one ``.item()`` per step."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        outputs["loss"].item()


def _count_syncs(tmp_path: Any, callbacks: list[Callback], steps: int, model: Callable[[], L.LightningModule] = TinyModel
                 ) -> int:
    counter = _SyncCounter()
    x, y = blobs(n=4096)
    L.seed_everything(0)
    t = trainer(tmp_path, [_Start(counter), *callbacks, _Stop(counter)], max_steps=steps, max_epochs=None)
    try:
        t.fit(model(), loader(x, y, batch_size=16))
    finally:
        counter.stop()
    assert t.global_step == steps
    return counter.count


N = 10  # the read interval given to every check
K = 40  # steps of the short fit; the long one has 2K (one epoch each: 4096 / 16 = 256 batches)

# name -> factory(n) -> callbacks; a new check that reads the device every n steps is added here
CALLBACKS: dict[str, Callable[[int], list[Callback]]] = {
    "HeadBiasInit": lambda n: [HeadBiasInit()],
    "InitialLossCheck": lambda n: [InitialLossCheck()],
    "LossDecreaseCheck": lambda n: [LossDecreaseCheck(check_every_n_steps=n, warmup_steps=1000)],
    "PredictionDynamics": lambda n: [PredictionDynamics(every_n_steps=n)],
    "WiringCheck": lambda n: [WiringCheck()],
    "bundle": lambda n: [
        HeadBiasInit(on_fail="warn"),
        InitialLossCheck(on_fail="warn"),
        LossDecreaseCheck(on_fail="warn", check_every_n_steps=n, warmup_steps=1000),
        PredictionDynamics(on_fail="warn", every_n_steps=n),
    ],
}
# calls allowed per read: one `.tolist()` of the loss buffer, plus a few `float()` of statistics computed on the host
# from the values read (CPU tensors: not device syncs, but indistinguishable from them on a CPU-only run)
_PER_READ = 5


@pytest.fixture(scope="module")
def plain_syncs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, int]:
    return {k: _count_syncs(tmp_path_factory.mktemp(f"plain{k}"), [], k) for k in (K, 2 * K)}


@pytest.mark.parametrize("name", sorted(CALLBACKS))
def test_syncs_grow_with_reads_not_steps(tmp_path: Any, plain_syncs: dict[int, int], name: str) -> None:
    extra = {k: _count_syncs(tmp_path / str(k), CALLBACKS[name](N), k) - plain_syncs[k] for k in (K, 2 * K)}
    growth = extra[2 * K] - extra[K]  # the K extra steps cost this many syncs
    assert extra[K] >= 0
    assert growth <= _PER_READ * K // N, (name, extra)
    assert growth < K // 2, (name, extra)  # far from one per step


def test_counter_sees_per_step_syncs(tmp_path: Any, plain_syncs: dict[int, int]) -> None:
    """The harness catches a sync per step: a `.item()` callback and Lightning's SpikeDetection."""
    extra = {k: _count_syncs(tmp_path / f"i{k}", [_ItemEveryStep()], k) - plain_syncs[k] for k in (K, 2 * K)}
    assert extra[2 * K] - extra[K] == K
    spike = {k: _count_syncs(tmp_path / f"s{k}", [SpikeDetection(rtol=1e9)], k) - plain_syncs[k] for k in (K, 2 * K)}
    assert spike[2 * K] - spike[K] >= K


# -- the label scan reads `targets` directly ------------------------------------------------------------------------
class SlowLabels(Dataset):
    """1,000,000 examples whose ``__getitem__`` sleeps; the labels are in ``.targets``."""

    def __init__(self, n: int = 1_000_000, classes: int = 10, delay: float = 1e-3) -> None:
        g = torch.Generator().manual_seed(0)
        self.targets = torch.multinomial(torch.linspace(1.0, 2.0, classes), n, replacement=True, generator=g)
        self.delay = delay
        self.calls = 0

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        time.sleep(self.delay)
        return torch.zeros(4), self.targets[i]


class _FakeTrainer:
    """What ``label_stats`` reads from a trainer, without a fit."""

    def __init__(self, dl: DataLoader) -> None:
        self.train_dataloader = dl
        self.world_size = 1


def _spec_for(classes: int) -> Any:
    from lightning_recipe._core.conventions import resolve_task

    return resolve_task(nn.CrossEntropyLoss(), torch.zeros(2, classes), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("subset", [False, True])
def test_label_scan_reads_targets_directly(subset: bool) -> None:
    ds = SlowLabels()
    data: Dataset = Subset(ds, range(0, len(ds), 2)) if subset else ds
    dl = DataLoader(data, batch_size=256, shuffle=True)
    from lightning_recipe._core.labels import _probe_indices

    # the shortcut is checked against the probe batch's targets at its known indices (what a fit's first batch carries)
    probe = (ds.targets[::2] if subset else ds.targets)[_probe_indices(dl)]
    t0 = time.perf_counter()
    stats = label_stats(_FakeTrainer(dl), L.LightningModule(), _spec_for(10), probe)
    elapsed = time.perf_counter() - t0
    assert ds.calls == 0  # no example was loaded
    assert elapsed < 5.0  # a full pass would take 1000 s (1 ms per example)
    expected = ds.targets[::2] if subset else ds.targets
    assert stats.count == len(expected)
    assert torch.equal(stats.class_counts, torch.bincount(expected, minlength=10).double())
    assert stats.source == "dataset.targets"


class _FloatLR(TinyModel):
    """SGD decayed by a scheduler every step."""

    tensor = False

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=torch.tensor(0.05) if self.tensor else 0.05)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, 0.99),
                                                   "interval": "step"}}


class _TensorLR(_FloatLR):
    """The same with a tensor learning rate (decayed in place by the scheduler)."""

    tensor = True


def test_a_tensor_learning_rate_is_read_with_the_periodic_reads(tmp_path: Any) -> None:
    from lightning_recipe.checks.optimization import OptimizationHealthCheck

    growth, checks = {}, {}
    for model in (_FloatLR, _TensorLR):
        name = model.__name__
        plain = {k: _count_syncs(tmp_path / f"p{name}{k}", [], k, model) for k in (K, 2 * K)}
        checks[name] = {k: OptimizationHealthCheck(check_every_n_steps=N, figure=False) for k in (K, 2 * K)}
        extra = {k: _count_syncs(tmp_path / f"{name}{k}", [checks[name][k]], k, model) - plain[k] for k in (K, 2 * K)}
        growth[name] = extra[2 * K] - extra[K]
    # the tensor learning rates cost one read per periodic read (K / N more), not a float() per step (K more)
    assert 0 <= growth["_TensorLR"] - growth["_FloatLR"] <= K // N, growth
    # the values read are the learning rates of each batch: 0.05 * 0.99 ** k after k scheduler steps
    for name in ("_FloatLR", "_TensorLR"):
        lrs = [group[0] for group in checks[name][2 * K].lrs]
        assert lrs == pytest.approx([0.05 * 0.99 ** (k + 1) for k in range(2 * K)], rel=1e-6), name
