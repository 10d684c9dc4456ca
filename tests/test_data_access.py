"""The callbacks never consume, reorder or alter the user's data or model state.

* an iterable dataset (a one-shot stream, a stream with its own random state) gives training exactly the same batches
  with and without the presets: the callbacks read only the batch training itself fetched;
* a ``dataset.targets`` shortcut that disagrees with what the batches carry is not trusted;
* a ``WeightedRandomSampler`` sets the prior the model sees;
* the fit-start scans use the user's worker settings and stop after a time budget;
* probe forwards leave the model's buffers as they found them.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Iterator

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, WeightedRandomSampler

import lightning_recipe as lr
from helpers import TinyModel, blobs, trainer
from lightning_recipe import HeadBiasInit, InitialLossCheck
from lightning_recipe.data_checks import DataCheck
from lightning_recipe.exceptions import RecipeWarning


# -- iterable datasets ------------------------------------------------------------------------------------------------
class OneShotStream(IterableDataset):
    """An iterator created once: whatever is drawn from it is gone for training."""

    def __init__(self, n: int = 256) -> None:
        x, y = blobs(n=n)
        self._it = iter(list(zip(x, y)))

    def __iter__(self) -> Iterator[Any]:
        return self._it


class RandomStream(IterableDataset):
    """Examples drawn from the stream's own persistent generator: each pass gives other examples."""

    def __init__(self, n: int = 256) -> None:
        self.n = n
        self.g = torch.Generator().manual_seed(7)
        self.centers = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 2

    def __iter__(self) -> Iterator[Any]:
        for _ in range(self.n):
            y = int(torch.randint(0, 4, (1,), generator=self.g))
            yield self.centers[y] + torch.randn(8, generator=self.g), torch.tensor(y)


class Counting(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.seen += 1
        return super().training_step(batch, batch_idx)


def _fit_stream(tmp_path: Any, make: Any, callbacks: list) -> tuple[int, dict[str, torch.Tensor], Any]:
    L.seed_everything(0)
    model = Counting()
    t = trainer(tmp_path, callbacks, max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, DataLoader(make(), batch_size=16))
    recipe = [w for w in caught if issubclass(w.category, RecipeWarning)]
    return model.seen, {k: v.detach().clone() for k, v in model.state_dict().items()}, (t, recipe)


@pytest.mark.parametrize("make", [OneShotStream, RandomStream], ids=["one_shot", "own_rng"])
def test_an_iterable_dataset_gives_training_the_same_batches(tmp_path: Any, make: Any) -> None:
    seen_plain, plain, _ = _fit_stream(tmp_path / "plain", make, [])
    callbacks = lr.recommended(exclude=["HeadBiasInit"])  # HeadBiasInit changes the model on purpose
    seen, weights, (t, warned) = _fit_stream(tmp_path / "recipe", make, callbacks)
    assert seen_plain == 16 and seen == 16
    assert plain.keys() == weights.keys()
    assert [k for k in plain if not torch.equal(plain[k], weights[k])] == []
    assert warned == [], [str(w.message) for w in warned]
    findings = lr.collect_findings(t)
    assert not [f for f in findings if f.status in ("warn", "fail")], [f.message for f in findings if f.status != "pass"]
    scan = [f for f in findings if f.check == "DataCheck.scan"]
    assert len(scan) == 1 and scan[0].status == "skip" and "iterable" in scan[0].message
    assert not [f for f in findings if "switched off" in f.message]


def test_an_iterable_dataset_sets_the_bias_from_the_first_training_batch(tmp_path: Any) -> None:
    seen, _, (t, warned) = _fit_stream(tmp_path, OneShotStream, lr.recommended())
    assert seen == 16 and warned == []
    hb = next(f for f in lr.collect_findings(t) if f.check == "HeadBiasInit")
    assert hb.status == "pass" and "first training batch" in hb.details["labels"]["source"]


# -- probe forwards and buffers ---------------------------------------------------------------------------------------
class CallCounter(TinyModel):
    """A forward that counts its calls in a buffer, without a ``self.training`` guard."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("num_calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.num_calls += 1
        return super().forward(x)


def _fit_counter(tmp_path: Any, callbacks: list) -> dict[str, torch.Tensor]:
    x, y = blobs(n=128)
    L.seed_everything(0)
    model = CallCounter()
    t = trainer(tmp_path, callbacks, max_epochs=1)
    t.fit(model, DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_probe_forwards_leave_buffers_as_they_found_them(tmp_path: Any) -> None:
    plain = _fit_counter(tmp_path / "plain", [])
    with_recipe = _fit_counter(tmp_path / "recipe", lr.recommended(exclude=["HeadBiasInit"]))
    assert int(plain["num_calls"]) == 16  # one forward per training step
    assert int(with_recipe["num_calls"]) == 16
    assert [k for k in plain if not torch.equal(plain[k], with_recipe[k])] == []
