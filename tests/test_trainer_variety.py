"""The Trainer's variety: every configuration either works or is skipped with a clear finding, never a crash.

Each case runs the four core checks in ``"raise"`` mode on a healthy model; a check that cannot judge a
configuration must say so with a ``skip`` finding instead of failing or crashing. New checks join by adding a
factory to ``CHECKS``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

from helpers import TinyModel, blobs, loader, trainer
from lightning_recipe.findings import Finding, collect_findings
from lightning_recipe.checks.head_bias import HeadBiasInit
from lightning_recipe.checks.initial_loss import InitialLossCheck
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.checks.prediction_dynamics import PredictionDynamics

CHECKS: dict[str, Callable[[], Callback]] = {
    "HeadBiasInit": lambda: HeadBiasInit(),
    "InitialLossCheck": lambda: InitialLossCheck(),
    "LossDecreaseCheck": lambda: LossDecreaseCheck(check_every_n_steps=4, warmup_steps=8),
    "PredictionDynamics": lambda: PredictionDynamics(every_n_steps=4),
}


def _checks() -> list[Callback]:
    return [make() for make in CHECKS.values()]


def _data(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    return blobs(n=n, priors=[0.1, 0.2, 0.3, 0.4])


def _fit(tmp_path: Any, model: Optional[L.LightningModule] = None, train: Any = None, val: Any = None,
         **trainer_kw: Any) -> tuple[L.Trainer, list[Finding]]:
    x, y = _data()
    L.seed_everything(0)
    model = model if model is not None else TinyModel()
    trainer_kw.setdefault("max_epochs", 2)
    t = trainer(tmp_path, _checks(), **trainer_kw)
    t.fit(model, train if train is not None else loader(x, y, batch_size=16), val)
    return t, collect_findings(t)


def _status(findings: list[Finding], check: str) -> list[str]:
    return [f.status for f in findings if f.check == check]


def _assert_healthy(findings: list[Finding], decrease: bool = True) -> None:
    assert not [f for f in findings if f.failed], findings
    assert _status(findings, "HeadBiasInit") == ["pass"]
    assert _status(findings, "InitialLossCheck") == ["pass"]
    assert _status(findings, "PredictionDynamics") == ["pass"]
    if decrease:
        assert _status(findings, "LossDecreaseCheck") == ["pass"]


def _initial(findings: list[Finding]) -> Finding:
    return next(f for f in findings if f.check == "InitialLossCheck")


def test_bf16_mixed(tmp_path: Any) -> None:
    t, findings = _fit(tmp_path, precision="bf16-mixed")
    _assert_healthy(findings)
    f = _initial(findings)
    assert abs(f.measured - f.expected) < 0.2  # bf16 logits: a few hundredths off the fp32 value


def test_gradient_accumulation(tmp_path: Any) -> None:
    """``outputs["loss"]`` is divided by ``accumulate_grad_batches``: the check measures the user's loss."""
    t, findings = _fit(tmp_path, accumulate_grad_batches=4, max_epochs=4)
    assert t.global_step == 8
    _assert_healthy(findings)
    f = _initial(findings)
    assert abs(f.measured - f.expected) < 0.5 * f.expected  # not a quarter of it
    assert len(next(cb for cb in t.callbacks if isinstance(cb, LossDecreaseCheck)).losses) == 32  # one per batch


def test_torch_compile(tmp_path: Any) -> None:
    """A ``torch.compile``d LightningModule (``backend="eager"``: Dynamo's graph capture without the slow C++
    codegen of Inductor, whose compile time alone exceeds this suite's budget on 2 cores)."""
    compiled = torch.compile(TinyModel(), backend="eager")
    t0 = time.perf_counter()
    try:
        t, findings = _fit(tmp_path, model=compiled)
    except Exception as err:  # pragma: no cover - depends on the torch build
        if "dynamo" in type(err).__module__ or "Dynamo" in str(err):
            pytest.skip(f"torch.compile unsupported here: {err}")
        raise
    if time.perf_counter() - t0 > 60:  # pragma: no cover
        pytest.skip("torch.compile too slow on this machine")
    _assert_healthy(findings)


def test_limit_train_batches_too_few_steps(tmp_path: Any) -> None:
    t, findings = _fit(tmp_path, limit_train_batches=2, max_epochs=2)
    assert t.global_step == 4
    _assert_healthy(findings, decrease=False)
    skip = next(f for f in findings if f.check == "LossDecreaseCheck.decrease")
    assert skip.status == "skip" and "only 4 training steps" in skip.message and "warmup_steps=8" in skip.message


def test_fast_dev_run(tmp_path: Any) -> None:
    t, findings = _fit(tmp_path, fast_dev_run=True)
    assert t.global_step == 1
    _assert_healthy(findings, decrease=False)
    assert _status(findings, "LossDecreaseCheck.decrease") == ["skip"]


def test_max_steps(tmp_path: Any) -> None:
    t, findings = _fit(tmp_path, max_steps=12, max_epochs=None)
    assert t.global_step == 12
    _assert_healthy(findings)
    assert next(cb for cb in t.callbacks if isinstance(cb, PredictionDynamics)).steps == [0, 4, 8, 12]


class _Stream(IterableDataset):
    """An IterableDataset without ``__len__``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self) -> Any:
        return iter(zip(self.x, self.y))


def test_iterable_dataset_without_len(tmp_path: Any) -> None:
    x, y = _data()
    t, findings = _fit(tmp_path, train=DataLoader(_Stream(x, y), batch_size=16), max_epochs=2)
    assert t.global_step == 16
    _assert_healthy(findings)
    hb = next(f for f in findings if f.check == "HeadBiasInit")
    # a stream is read by training only: the labels are those of the first batch training fetched
    assert hb.details["labels"]["count"] == 16 and hb.details["labels"]["source"].startswith("the first training batch")


def test_no_validation_loop(tmp_path: Any) -> None:
    x, y = _data(64)
    t, findings = _fit(tmp_path, val=loader(x, y, batch_size=16), limit_val_batches=0, max_epochs=2)
    _assert_healthy(findings)


def test_with_validation_loop(tmp_path: Any) -> None:
    x, y = blobs(n=64, seed=1)
    t, findings = _fit(tmp_path, val=loader(x, y, batch_size=16, shuffle=False), max_epochs=2)
    _assert_healthy(findings)
    pd = next(cb for cb in t.callbacks if isinstance(cb, PredictionDynamics))
    assert torch.equal(torch.as_tensor(pd.targets), y[:16])  # the fixed batch is the first validation batch


class _Manual(TinyModel):
    def __init__(self, return_loss: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.return_loss = return_loss

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        opt = self.optimizers()
        loss = self.compute_loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss.detach() if self.return_loss else None


@pytest.mark.parametrize("return_loss", [True, False])
def test_manual_optimization(tmp_path: Any, return_loss: bool) -> None:
    t, findings = _fit(tmp_path, model=_Manual(return_loss))
    assert t.global_step == 16
    if return_loss:
        _assert_healthy(findings)
    else:
        assert not [f for f in findings if f.failed], findings
        skip = next(f for f in findings if f.check == "InitialLossCheck")
        assert skip.status == "skip" and "returned no loss" in skip.message
        assert _status(findings, "LossDecreaseCheck.decrease") == ["skip"]
        assert _status(findings, "PredictionDynamics") == ["pass"]


class _TwoLoaders(TinyModel):
    """Several train dataloaders: the batch is a list (or dict) of ``(x, y)`` batches; the loss sums both."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        parts = batch.values() if isinstance(batch, dict) else batch
        return sum(self.compute_loss(b) for b in parts) / len(parts)


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_multiple_train_dataloaders(tmp_path: Any, kind: str) -> None:
    x, y = _data()
    x2, y2 = _data()
    loaders = [loader(x, y, batch_size=16), loader(x2, y2, batch_size=16)]
    train = loaders if kind == "list" else {"a": loaders[0], "b": loaders[1]}
    t, findings = _fit(tmp_path, model=_TwoLoaders(), train=train)
    assert t.global_step == 16
    assert not [f for f in findings if f.failed], findings
    assert _status(findings, "HeadBiasInit") == ["pass"]  # from the first dataloader's labels
    initial = next(f for f in findings if f.check == "InitialLossCheck")
    assert initial.status == "skip" and "`split_batch=" in initial.message
    assert _status(findings, "PredictionDynamics") == ["pass"]


def test_a_scripted_submodule_works_under_strict(tmp_path):
    """torch.jit modules take no forward hook and do not copy like eager ones: the head is found among the others,
    the batch-independence check (which probes the model in place, no copy) runs and passes, the rest runs."""
    import lightning_recipe as lr

    class Scripted(TinyModel):
        def __init__(self):
            super().__init__()
            self.net[0] = torch.jit.script(torch.nn.Linear(8, 32))

    L.seed_everything(0)
    x, y = blobs(512)
    t = trainer(tmp_path, lr.strict(), max_epochs=4)
    t.fit(Scripted(), loader(x, y))
    status = {f.check: f.status for f in lr.collect_findings(t)}
    assert status["BatchIndependenceCheck"] == "pass" and status["HeadBiasInit"] == "pass"
    assert status["InitialLossCheck"] == "pass" and status["PredictionDynamics.eval_mode"] == "pass"
    assert "fail" not in status.values()
