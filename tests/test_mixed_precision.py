"""Mixed precision on CPU: ``16-mixed`` with a real ``torch.amp.GradScaler("cpu")`` and ``bf16-mixed``.

Lightning 2.6.6 takes ``plugins=[MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu", ...))]`` on CPU: autocast
runs the linear layers in float16, so a large loss scale overflows the float16 activation gradients exactly as on a
GPU, the scaler finds inf, skips ``optimizer.step`` and halves the scale. With ``init_scale=2**24`` the first steps
are skipped (counted here from the scale, which halves at each skip and otherwise stays within the 2000-step growth
interval); a healthy model must then get no warning from any check. A model whose gradients are infinite at every
step makes the scaler skip every step: WiringCheck's rule fires, ParameterUpdateCheck skips with the reason.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from helpers import TinyModel, blobs, loader, trainer
from lightning_recipe import recommended
from lightning_recipe.exceptions import RecipeWarning
from lightning_recipe.findings import collect_findings

PRIORS = [0.6, 0.2, 0.1, 0.1]


class ScaleLog(Callback):
    """The loss scale after each batch: a halving is a skipped step."""

    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        self.scales.append(float(trainer.precision_plugin.scaler.get_scale()))  # test only: a sync per step is fine

    def skipped(self, init: float) -> int:
        scales = [init, *self.scales]
        return sum(b < a for a, b in zip(scales, scales[1:]))


def _fit(tmp_path: Any, model: L.LightningModule, precision: str, init_scale: float = 2.0**16,
         epochs: int = 2) -> tuple[L.Trainer, list[str], ScaleLog]:
    x, y = blobs(n=640, priors=PRIORS)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale) if precision == "16-mixed" else None
    log = ScaleLog()
    callbacks = [*recommended(), *([log] if scaler is not None else [])]
    t = trainer(tmp_path, callbacks, max_epochs=epochs, plugins=[MixedPrecision(precision, "cpu", scaler=scaler)])
    L.seed_everything(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, loader(x[:512], y[:512], batch_size=16), loader(x[512:], y[512:], batch_size=64, shuffle=False))
    return t, [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)], log


def test_first_steps_skipped_by_the_scaler_are_not_failures(tmp_path: Any) -> None:
    init = 2.0**24
    t, warned, log = _fit(tmp_path, TinyModel(), "16-mixed", init_scale=init)
    skipped = log.skipped(init)
    # the scale halves from 2**24 until the float16 activation gradients stop overflowing (measured: the first 7 steps
    # and the 9th, then 2**16 to the end): the first 5 steps, ParameterUpdateCheck's window, are all skipped
    assert log.scales[:5] == [init / 2**k for k in range(1, 6)]
    assert 5 <= skipped <= 12 and log.scales[-1] == init / 2**skipped  # no skip and no growth after calibration
    assert warned == []
    found = {f.check: f for f in collect_findings(t)}
    assert {f.status for f in found.values()} <= {"pass", "skip", "note"}
    assert found["ParameterUpdateCheck"].status == "pass"
    assert "all 4 trainable parameters" in found["ParameterUpdateCheck"].message
    # it waited for 5 applied steps: 7 skipped, 1 applied, 1 skipped, then 4 applied (13 steps, 8 skipped)
    assert found["ParameterUpdateCheck"].details["applied"] == 5
    assert f"A GradScaler skipped {skipped} of these steps" in found["ParameterUpdateCheck"].message
    assert found["ParameterUpdateCheck.zero_grad"].status == "pass"
    assert found["OptimizationHealthCheck.gradients"].status == "pass"
    assert found["LossDecreaseCheck"].status == "pass"
    assert found["WiringCheck.framework"].status == "pass"
    assert found["InitialLossCheck"].status == "pass" and found["HeadBiasInit"].status == "pass"


class InfGradModel(TinyModel):
    """Finite loss, infinite gradients at every step (a hook on the output's gradient): the scaler skips every step."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if out.requires_grad:
            out.register_hook(lambda g: torch.full_like(g, math.inf))
        return out


def test_scaler_skipping_every_step_is_reported(tmp_path: Any) -> None:
    t, warned, log = _fit(tmp_path, InfGradModel(), "16-mixed", epochs=1)
    assert log.skipped(2.0**16) == len(log.scales) == 32  # every step: the scale halved 32 times
    found = {f.check: f for f in collect_findings(t)}
    framework = found["WiringCheck.framework"]
    assert framework.status in ("fail", "warn") and "GradScaler skipped all" in framework.message
    assert any("GradScaler skipped all" in w for w in warned)
    skip = found["ParameterUpdateCheck"]
    assert skip.status == "skip" and "GradScaler skipped all" in skip.message  # not "parameters not updating"
    assert not any(w.startswith("ParameterUpdateCheck") for w in warned)


def test_bf16_mixed_healthy(tmp_path: Any) -> None:
    t, warned, _ = _fit(tmp_path, TinyModel(), "bf16-mixed", epochs=1)
    assert warned == []
    found = {f.check: f for f in collect_findings(t)}
    assert {f.status for f in found.values()} <= {"pass", "skip", "note"}
    assert found["ParameterUpdateCheck"].status == "pass" and found["InitialLossCheck"].status == "pass"
