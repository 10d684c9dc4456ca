"""Bad input: a clear `RecipeConfigError` at fit start, before any training step, naming the argument to set.

Each case is a (model, dataloader) pair that a callback cannot work with. In ``"raise"`` mode the fit stops at
``on_train_start`` (no ``training_step`` ran) with a message that names the argument (``match=``); in ``"warn"``
mode the callback records a ``skip`` finding, warns, and the fit goes on.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers import TinyModel, blobs, loader, trainer
from lightning_recipe.exceptions import RecipeConfigError, RecipeSkipNotice, RecipeWarning
from lightning_recipe.findings import collect_findings
from lightning_recipe.checks.head_bias import HeadBiasInit
from lightning_recipe.checks.initial_loss import InitialLossCheck
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.checks.prediction_dynamics import PredictionDynamics


class Counting(TinyModel):
    """TinyModel that counts its training steps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps_run = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        return super().training_step(batch, batch_idx)


class NoBiasHead(Counting):
    def __init__(self) -> None:
        super().__init__()
        self.net[-1] = nn.Linear(32, 4, bias=False)


class BoolTargets(Counting):
    """Boolean targets, four outputs and no loss module: the task cannot be inferred (one output per 0/1 target
    would be read as binary labels)."""

    def __init__(self) -> None:
        super().__init__(out_dim=4)
        del self.loss_fn
        self.loss_fn = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x)[:, 0], y.float())


class FloatTargetsForCE(Counting):
    """CrossEntropyLoss on float targets shaped (N,): class indices were expected."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return self.loss_fn(self(x), y.long())


class TensorOnly(Counting):
    """Batches are a single tensor (features and label in one row): nothing to split."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        return self.loss_fn(self(batch[:, :-1]), batch[:, -1].long())


class OtherInput(Counting):
    """A forward that takes other inputs than the batch holds (a generator's noise, features computed in
    training_step): the probe forward on the batch's inputs fails inside the model with a RuntimeError."""

    def __init__(self) -> None:
        super().__init__(in_dim=3)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps_run += 1
        x, y = batch
        return self.loss_fn(self(x[:, :3]), y)


class _Empty(Dataset):
    def __len__(self) -> int:
        return 0

    def __getitem__(self, i: int) -> Any:  # pragma: no cover
        raise IndexError(i)


class _EmptyIterable(torch.utils.data.IterableDataset):
    def __iter__(self) -> Any:
        return iter(())


def _blob_loader() -> DataLoader:
    x, y = blobs(n=64)
    return loader(x, y, batch_size=16)


def _tensor_loader() -> DataLoader:
    x, y = blobs(n=64)
    return DataLoader(torch.cat([x, y.float()[:, None]], 1), batch_size=16)


def _bool_loader() -> DataLoader:
    x, y = blobs(n=64, classes=2)
    return loader(x, y.bool(), batch_size=16)


def _float_loader() -> DataLoader:
    x, y = blobs(n=64)
    return loader(x, y.float(), batch_size=16)


# case -> (model factory, train dataloader factory, callback overrides, `match=`, callbacks that need it)
ALL = ("HeadBiasInit", "InitialLossCheck", "LossDecreaseCheck", "PredictionDynamics")
NEED_DATA = ("HeadBiasInit", "InitialLossCheck", "PredictionDynamics")
CASES: dict[str, tuple[Callable[[], L.LightningModule], Callable[[], Any], dict, str, tuple[str, ...]]] = {
    "head_without_bias": (NoBiasHead, _blob_loader, {}, r"`head=`", ("HeadBiasInit",)),
    "named_head_without_bias": (NoBiasHead, _blob_loader, {"head": "net.2"}, r"has no bias.*`head=`",
                                ("HeadBiasInit",)),
    "head_bias_shape": (Counting, _blob_loader, {"head": "net.0"}, r"bias of shape \(32,\).*4 outputs.*`head=`",
                        ("HeadBiasInit",)),
    "bool_targets_no_loss": (BoolTargets, _bool_loader, {}, r"dtype torch.bool.*`loss_fn=`.*`task=`", NEED_DATA),
    "float_targets_for_ce": (FloatTargetsForCE, _float_loader, {}, r"class indices.*dtype torch.float32.*`loss_fn=`",
                             NEED_DATA),
    "empty_dataloader": (Counting, lambda: DataLoader(_Empty(), batch_size=4), {}, r"empty.*`train_dataloaders`",
                         ALL),
    "empty_iterable": (Counting, lambda: DataLoader(_EmptyIterable(), batch_size=4), {},
                       r"empty.*`train_dataloaders`", NEED_DATA),
    "forward_takes_other_inputs": (OtherInput, _blob_loader, {}, r"RuntimeError: mat1 and mat2.*`forward=",
                                   NEED_DATA),
    "unsplittable_batch": (TensorOnly, _tensor_loader, {}, r"Cannot split a batch of type Tensor.*`split_batch=",
                           NEED_DATA),
}

FACTORIES: dict[str, Callable[..., Callback]] = {
    "HeadBiasInit": HeadBiasInit,
    "InitialLossCheck": InitialLossCheck,
    "LossDecreaseCheck": lambda **kw: LossDecreaseCheck(check_every_n_steps=2, warmup_steps=2, **kw),
    "PredictionDynamics": lambda **kw: PredictionDynamics(every_n_steps=2, **kw),
}


def _fit(tmp_path: Any, case: str, callbacks_of: Callable[[dict], list[Callback]]) -> tuple[L.Trainer, Any]:
    make_model, make_loader, overrides, _, _ = CASES[case]
    model = make_model()
    L.seed_everything(0)
    t = trainer(tmp_path, callbacks_of(overrides), max_steps=4, max_epochs=2)
    t.fit(model, make_loader())
    return t, model


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("check", ALL)
def test_config_error_before_first_step(tmp_path: Any, case: str, check: str) -> None:
    match, needs = CASES[case][3], CASES[case][4]
    make_model, make_loader, overrides = CASES[case][:3]
    model = make_model()
    t = trainer(tmp_path, [FACTORIES[check](**overrides)], max_steps=4, max_epochs=2)
    if check in needs:
        with pytest.raises(RecipeConfigError, match=match) as err:
            t.fit(model, make_loader())
        assert check in str(err.value)
        assert model.steps_run == 0
        assert t.global_step == 0
    else:  # this check does not need what is missing: the fit runs as it would without it
        try:
            t.fit(model, make_loader())
        except Exception as err:  # the model itself may not train on this input; that is not ours to catch
            assert not isinstance(err, RecipeConfigError), err


@pytest.mark.parametrize("case", sorted(CASES))
def test_strict_bundle_raises_naming_the_argument(tmp_path: Any, case: str) -> None:
    make_model, make_loader, overrides, match, _ = CASES[case]
    model = make_model()
    t = trainer(tmp_path, [FACTORIES[c](**overrides) for c in ALL], max_steps=4, max_epochs=2)
    with pytest.raises(RecipeConfigError, match=match):
        t.fit(model, make_loader())
    assert model.steps_run == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_warn_mode_skips_and_goes_on(tmp_path: Any, case: str) -> None:
    make_model, make_loader, overrides, match, needs = CASES[case]
    model = make_model()
    cbs = [FACTORIES[c](on_fail="warn", **overrides) for c in ALL]
    t = trainer(tmp_path, cbs, max_steps=4, max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, make_loader())
    # a check that cannot run says so once (RecipeSkipNotice): not a RecipeWarning, which would read as an alarm
    notices = [str(w.message) for w in caught if issubclass(w.category, RecipeSkipNotice)]
    assert any(re.search(match, m) for m in notices), notices
    assert not [w for w in caught if issubclass(w.category, RecipeWarning)]
    empty = case.startswith("empty")
    assert model.steps_run == (0 if empty else 4)  # the fit went on
    skipped = {f.check for f in collect_findings(t) if f.status == "skip"}
    assert set(needs) <= skipped, skipped
    for cb in cbs:
        if cb.name in needs:
            assert any(f.status == "skip" and f.check == cb.name for f in cb.findings)
            assert not any(f.failed for f in cb.findings)
