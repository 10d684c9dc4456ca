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
import re
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
from lightning_recipe.checks.data import DataCheck
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


# -- dataset.targets verified against the batches ---------------------------------------------------------------------
class Remapped(Dataset):
    """``targets`` holds raw ids; ``__getitem__`` returns ``mapping[raw]`` (or ``raw - offset``)."""

    def __init__(self, raw: torch.Tensor, x: torch.Tensor, mapping: Any) -> None:
        self.targets, self.x, self.mapping = raw.tolist(), x, mapping

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> Any:
        return self.x[i], torch.tensor(self.mapping(self.targets[i]))


def _labelled(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), n, replacement=True, generator=g)
    return torch.randn(n, 8, generator=g) + y[:, None].float(), y


def _bias_of(tmp_path: Any, data: Dataset, callbacks: list, sampler: Any = None, out_dim: int = 3) -> tuple:
    L.seed_everything(0)
    model = TinyModel(out_dim=out_dim)
    t = trainer(tmp_path, callbacks, max_steps=2)
    t.fit(model, DataLoader(data, batch_size=20, shuffle=sampler is None, sampler=sampler))
    findings = lr.collect_findings(t)
    set_to = next(f for f in findings if f.check == "HeadBiasInit").details["bias"]  # before training moved it
    return torch.tensor(set_to, dtype=torch.float64), findings


def test_targets_remapped_by_getitem_are_read_from_the_batches(tmp_path: Any) -> None:
    x, y = _labelled()
    perm = [2, 0, 1]  # raw id r is class perm[r]
    raw = torch.tensor([perm.index(int(v)) for v in y])
    bias, findings = _bias_of(tmp_path, Remapped(raw, x, lambda r: perm[r]), [HeadBiasInit(), InitialLossCheck()])
    expected = torch.log(torch.bincount(y, minlength=3).double() / len(y))  # the prior of the labels trained on
    assert torch.allclose(bias.double() - bias.double().logsumexp(0), expected, atol=1e-4)
    hb = next(f for f in findings if f.check == "HeadBiasInit")
    assert "does not match the targets the batches carry" in hb.message and "dataloader" in hb.details["labels"]["source"]
    assert next(f for f in findings if f.check == "InitialLossCheck").status == "pass"


def test_targets_offset_by_one_do_not_stop_the_fit(tmp_path: Any) -> None:
    x, y = _labelled()
    bias, findings = _bias_of(tmp_path, Remapped(y + 1, x, lambda r: r - 1), lr.strict())
    expected = torch.log(torch.bincount(y, minlength=3).double() / len(y))
    assert torch.allclose(bias.double() - bias.double().logsumexp(0), expected, atol=1e-4)
    assert not [f for f in findings if f.failed]


def test_targets_that_match_keep_the_fast_path(tmp_path: Any) -> None:
    x, y = _labelled()
    bias, findings = _bias_of(tmp_path, Remapped(y, x, lambda r: r), [HeadBiasInit()])
    hb = next(f for f in findings if f.check == "HeadBiasInit")
    assert hb.details["labels"]["source"] == "dataset.targets" and hb.details["labels"]["count"] == len(y)
    assert "does not match" not in hb.message


# -- WeightedRandomSampler --------------------------------------------------------------------------------------------
def _nine_to_one(n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    y = (torch.arange(n) % 10 == 0).long()  # 9:1 exactly
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(0)) + y[:, None].float(), y


@pytest.mark.parametrize(("w_rare", "expected"), [(9.0, 0.0), (3.0, math.log(1 / 3)), (1.0, math.log(1 / 9))])
def test_weighted_sampler_sets_the_sampled_prior(tmp_path: Any, w_rare: float, expected: float) -> None:
    x, y = _nine_to_one()
    weights = torch.where(y == 1, w_rare, 1.0).double()
    sampler = WeightedRandomSampler(weights, len(y), generator=torch.Generator().manual_seed(0))
    bias, findings = _bias_of(tmp_path, TensorDataset(x, y), [HeadBiasInit()], sampler, out_dim=2)
    # closed form: log of the weighted class frequencies, p_j ∝ n_j w_j
    assert float(bias[1] - bias[0]) == pytest.approx(expected, abs=1e-5)
    hb = next(f for f in findings if f.check == "HeadBiasInit")
    assert "WeightedRandomSampler" in hb.message and "weighted" in hb.details["labels"]["source"]


class Plain(Dataset):
    """No targets attribute: the labels are scanned."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y_ = x, y

    def __len__(self) -> int:
        return len(self.y_)

    def __getitem__(self, i: int) -> Any:
        return self.x[i], self.y_[i]


def test_weighted_sampler_weights_the_scan_too(tmp_path: Any) -> None:
    x, y = _nine_to_one(1000)
    weights = torch.where(y == 1, 9.0, 1.0).double()
    sampler = WeightedRandomSampler(weights, len(y), generator=torch.Generator().manual_seed(0))
    bias, findings = _bias_of(tmp_path, Plain(x, y), [HeadBiasInit()], sampler, out_dim=2)
    hb = next(f for f in findings if f.check == "HeadBiasInit")
    assert hb.details["labels"]["source"].startswith("dataloader") and hb.details["labels"]["count"] == 1000
    # 1000 weighted draws of a balanced stream: the log-ratio's standard error is 2 / sqrt(1000) = 0.063
    assert abs(float(bias[1] - bias[0])) < 0.25  # unweighted it would be log(1/9) = -2.2


# -- worker settings and time budget of the scans ---------------------------------------------------------------------
class Slow(Plain):
    def __getitem__(self, i: int) -> Any:
        time.sleep(0.004)
        info = torch.utils.data.get_worker_info()
        return self.x[i], self.y_[i], torch.tensor(-1 if info is None else info.id)


class SlowPlain(Plain):
    def __getitem__(self, i: int) -> Any:
        time.sleep(0.004)
        return super().__getitem__(i)


def _init(worker_id: int) -> None:
    pass


def test_the_private_loader_uses_the_user_worker_settings() -> None:
    from lightning_recipe._core.labels import _private_loader, read_batches

    x, y = _nine_to_one(64)
    user = DataLoader(Slow(x, y), batch_size=8, shuffle=True, num_workers=2, worker_init_fn=_init, prefetch_factor=3,
                      persistent_workers=True)
    private = _private_loader(user)
    assert (private.num_workers, private.worker_init_fn, private.prefetch_factor) == (2, _init, 3)
    assert private.persistent_workers is False and private.sampler is not user.sampler
    ids = torch.cat([b[2] for b in read_batches(private, 4)])
    assert len(ids) == 32 and bool((ids >= 0).all())  # fetched in the workers


def test_the_scans_stop_at_their_time_budget(tmp_path: Any, monkeypatch: Any) -> None:
    from lightning_recipe._core import labels as _labels

    monkeypatch.setattr(_labels, "SCAN_SECONDS", 0.3)
    x, y = _nine_to_one(2000)
    data = SlowPlain(x, y)
    L.seed_everything(0)
    t = trainer(tmp_path, [DataCheck(on_fail="warn", max_batches=100), HeadBiasInit()], max_steps=1)
    t0 = time.perf_counter()
    t.fit(TinyModel(out_dim=2), DataLoader(data, batch_size=8, shuffle=True))
    spent = time.perf_counter() - t0
    finite = next(f for f in lr.collect_findings(t) if f.check == "DataCheck.finite")
    # 100 batches of 8 slow items would take 3.2 s per scan; each scan stops after about 0.3 s of loading
    read = re.search(r"\((\d+) batches, stopped by the scan's time budget of 0.3 s", finite.message)
    assert read is not None and 2 <= int(read.group(1)) < 30, finite.message
    hb = next(f for f in lr.collect_findings(t) if f.check == "HeadBiasInit")
    assert hb.details["labels"]["count"] < 30 * 8 and "time budget" in hb.details["labels"]["source"]
    assert spent < 5.0  # unbounded, the two scans alone would take 6.4 s


class CountingVal(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.val_seen = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.val_seen += 1


def test_an_iterable_validation_set_is_read_by_validation_only(tmp_path: Any) -> None:
    x, y = blobs(n=64)
    L.seed_everything(0)
    model = CountingVal()
    t = trainer(tmp_path, [DataCheck(on_fail="warn")], max_epochs=1, num_sanity_val_steps=0)
    t.fit(model, DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(OneShotStream(n=64), batch_size=16))
    assert model.val_seen == 4  # every batch of the one-shot stream reached validation
    overlap = next(f for f in lr.collect_findings(t) if f.check == "DataCheck.overlap")
    assert overlap.status == "skip" and "iterable" in overlap.message
