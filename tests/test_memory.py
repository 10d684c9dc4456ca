"""Bounded cost: after their setup, the recipe callbacks hold no copy of the model (tensors they own, in all, stay
under 0.1x the parameters' bytes). A structural test: it walks what the callbacks hold, it does not time anything."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from helpers import TinyModel, blobs, loader, trainer
import lightning_recipe as lr
from lightning_recipe.checks.batch_independence import BatchIndependenceCheck
from lightning_recipe.checks.parameter_updates import ParameterUpdateCheck


class Wide(TinyModel):
    """~1.1M parameters, almost all in one 1024 x 1024 layer, with BatchNorm (buffers) in between."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 1024), nn.BatchNorm1d(1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                                 nn.Linear(1024, 4))


def held_tensors(obj: Any, model: nn.Module) -> list[torch.Tensor]:
    """Tensors reachable from ``obj`` through containers and the attributes of lightning_recipe objects (not through
    modules, trainers or optimizers), one per storage, minus views of the model's own parameters and buffers."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    found: dict[int, torch.Tensor] = {}

    def walk(o: Any, depth: int) -> None:
        if id(o) in seen or depth > 8:
            return
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            if o.device.type != "meta" and o.untyped_storage().data_ptr() not in own:
                found.setdefault(o.untyped_storage().data_ptr(), o)
        elif isinstance(o, dict):
            for v in o.values():
                walk(v, depth + 1)
        elif isinstance(o, (list, tuple, set)):
            for v in o:
                walk(v, depth + 1)
        elif hasattr(o, "__dict__") and any(c.__module__.startswith("lightning_recipe") for c in type(o).__mro__):
            for v in vars(o).values():
                walk(v, depth + 1)

    walk(obj, 0)
    return list(found.values())


def _bytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


class _Audit(Callback):
    """At the start of each of the first batches (after every callback's setup): the bytes the watched callbacks
    hold in tensors of their own."""

    def __init__(self, watched: list[Callback]) -> None:
        self.watched, self.held = watched, []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx < 4:
            self.held.append(_bytes(held_tensors(self.watched, pl_module)))


def _audit(tmp_path: Any, callbacks: list[Callback]) -> tuple[list[int], int]:
    x, y = blobs(n=128)
    L.seed_everything(0)
    model = Wide()
    audit = _Audit(callbacks)
    trainer(tmp_path, [*callbacks, audit], max_steps=6).fit(model, loader(x, y))
    return audit.held, sum(p.numel() * p.element_size() for p in model.parameters())


def test_the_walk_finds_a_copy_of_the_model(tmp_path):
    """Control: a callback that keeps a clone of every parameter is seen holding 1x the parameters' bytes."""

    class Copies(ParameterUpdateCheck):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            super().on_train_start(trainer, pl_module)
            self.copies = [p.detach().clone() for p in pl_module.parameters()]

    held, param_bytes = _audit(tmp_path, [Copies(on_fail="warn")])
    assert min(held) >= param_bytes


def test_the_two_copying_checks_hold_no_copy(tmp_path):
    cbs = [BatchIndependenceCheck(on_fail="warn"), ParameterUpdateCheck(on_fail="warn")]
    held, param_bytes = _audit(tmp_path, cbs)
    assert param_bytes > 4_000_000 and len(held) == 4
    assert max(held) < 0.01 * param_bytes, (held, param_bytes)  # fingerprints: 68 numbers per tensor
    assert [f.status for f in cbs[0].findings] == ["pass"]
    assert {f.check: f.status for f in cbs[1].findings} == {"ParameterUpdateCheck": "pass",
                                                            "ParameterUpdateCheck.zero_grad": "pass"}


def test_recommended_holds_under_a_tenth_of_the_parameters(tmp_path):
    preset = lr.recommended()
    held, param_bytes = _audit(tmp_path, preset)
    assert len(held) == 4 and max(held) < 0.1 * param_bytes, (held, param_bytes)


def test_preset_gives_back_the_setup_temporaries_once_per_fit(monkeypatch: Any, tmp_path: Any) -> None:
    """The preset returns the heap pages its one-time work freed (``malloc_trim`` under glibc) once, after every
    check's ``on_train_start`` and before the first training batch: the scan's and probes' temporaries do not stay
    in the resident set under the training's peak."""
    import lightning_recipe.presets as presets

    calls: list[int] = []
    monkeypatch.setattr(presets, "release_freed_memory", lambda: calls.append(len(recorder.batches)))

    class _Batches(Callback):
        batches: list[int] = []

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.batches.append(batch_idx)

    recorder = _Batches()
    x, y = blobs(n=64)
    t = trainer(tmp_path, callbacks=[*lr.recommended(), recorder])
    t.fit(TinyModel(), loader(x, y))
    assert calls == [0]  # one call, before the first batch
    assert t.global_step == 2 and recorder.batches == [0, 1]


def test_release_freed_memory_returns_pages_to_the_system() -> None:
    """Under glibc, a freed block that a live allocation above it pins in the heap leaves the resident set only
    through the call (elsewhere the call is a no-op that must not fail)."""
    import ctypes
    import os
    import sys

    from lightning_recipe._core.memory import release_freed_memory

    if not (sys.platform.startswith("linux") and os.path.exists("/proc/self/status")):
        release_freed_memory()
        return

    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 1024 - 64  # under the mmap threshold: from the heap, one after the other at its top
    blocks = [libc.malloc(size) for _ in range(513)]
    for b in blocks:
        ctypes.memset(b, 1, size)
    pin = blocks.pop()  # the last one stays live above the 32 MiB freed below it
    if pin < max(blocks):  # the allocator placed them otherwise: nothing is pinned, nothing to show
        for b in [*blocks, pin]:
            libc.free(b)
        return
    for b in blocks:
        libc.free(b)
    before = rss_kib()
    release_freed_memory()
    after = rss_kib()
    libc.free(pin)
    assert before - after > 16 * 1024, (before, after)  # at least half of the 32 MiB goes back
