"""Observer effect zero: the trained weights and buffers are bit-identical with and without a monitoring callback.

The model has dropout (draws from the global RNG every step) and BatchNorm (running statistics change in train
mode), the train dataloader shuffles (its sampler draws from the global RNG every epoch), and a val dataloader runs
(sanity check included). A callback that drew a random number, ran a forward in train mode or advanced training's
iterator would change the result. New monitoring checks join by adding a factory to ``MONITORS``.
"""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from helpers import TinyModel, blobs, loader, trainer
from lightning_recipe.checks.batch_independence import BatchIndependenceCheck
from lightning_recipe.checks.initial_loss import InitialLossCheck
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.checks.optimization import OptimizationHealthCheck
from lightning_recipe.checks.parameter_updates import ParameterUpdateCheck
from lightning_recipe.checks.prediction_dynamics import PredictionDynamics
from lightning_recipe.checks.wiring import WiringCheck


class NoisyModel(TinyModel):
    """An MLP with BatchNorm and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))


# name -> factory of the callbacks under test; reads are frequent so that every probe path runs many times
MONITORS: dict[str, Callable[[], list[Callback]]] = {
    "BatchIndependenceCheck": lambda: [BatchIndependenceCheck(on_fail="warn")],  # probes the model in place
    "InitialLossCheck": lambda: [InitialLossCheck(on_fail="warn")],
    "ParameterUpdateCheck": lambda: [ParameterUpdateCheck(on_fail="warn")],  # fingerprints, no copy
    "LossDecreaseCheck": lambda: [LossDecreaseCheck(on_fail="warn", check_every_n_steps=3, warmup_steps=8)],
    "PredictionDynamics": lambda: [PredictionDynamics(on_fail="warn", every_n_steps=2)],
    "WiringCheck": lambda: [WiringCheck(on_fail="warn", batches=4)],
    # samples the weights before each step and compares after (update ratio), probes ReLUs, reads gradients
    "OptimizationHealthCheck": lambda: [OptimizationHealthCheck(on_fail="warn", check_every_n_steps=3,
                                                                grad_every_n_steps=1, figure=False)],
    "bundle_without_HeadBiasInit": lambda: [
        InitialLossCheck(on_fail="warn"),
        LossDecreaseCheck(on_fail="warn", check_every_n_steps=3, warmup_steps=8),
        PredictionDynamics(on_fail="warn", every_n_steps=2),
    ],
}


def _train(tmp_path: Any, callbacks: list[Callback]) -> dict[str, torch.Tensor]:
    x, y = blobs(n=192)
    xv, yv = blobs(n=64, seed=1)
    L.seed_everything(0)
    model = NoisyModel()
    t = trainer(tmp_path, callbacks, max_epochs=2, limit_val_batches=2, num_sanity_val_steps=2)
    t.fit(model, loader(x, y, batch_size=16, shuffle=True), loader(xv, yv, batch_size=16, shuffle=True))
    assert t.global_step == 24
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return _train(tmp_path_factory.mktemp("plain"), [])


@pytest.mark.parametrize("name", sorted(MONITORS))
def test_weights_bit_identical(tmp_path: Any, plain: dict[str, torch.Tensor], name: str) -> None:
    callbacks = MONITORS[name]()
    state = _train(tmp_path, callbacks)
    _assert_identical(plain, state)
    assert "net.1.running_mean" in state and int(state["net.1.num_batches_tracked"]) == 24  # BN trained, not probed
    recorded = [cb for cb in callbacks if isinstance(cb, PredictionDynamics)]
    for cb in recorded:  # the probes did run (13 records: at start, then every 2 of 24 batches)
        assert len(cb.steps) == 13


class _DrawsRandom(Callback):
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        torch.rand(1)


class _TrainModeForward(Callback):
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            pl_module(batch[0])


@pytest.mark.parametrize("intruder", [_DrawsRandom, _TrainModeForward])
def test_the_comparison_detects_an_observer_effect(tmp_path: Any, plain: dict[str, torch.Tensor], intruder: type) -> None:
    """Controls: a global RNG draw or a train-mode forward per step changes the weights; the same fit twice does not."""
    _assert_identical(plain, _train(tmp_path / "again", []))
    changed = _train(tmp_path / "intruder", [intruder()])
    assert any(not torch.equal(plain[k], changed[k]) for k in plain)
