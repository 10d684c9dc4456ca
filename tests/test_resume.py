"""Resume: fit, checkpoint (``ModelCheckpoint``), resume with ``ckpt_path``.

``HeadBiasInit`` keeps the trained bias, the trackers continue from their checkpointed state, and each fit's findings
are its own (nothing reported twice), whether the resumed fit gets fresh callbacks (a new process) or the same
instances (a notebook).
"""

from __future__ import annotations

import math
import os
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from helpers import TinyModel, blobs, loader, trainer
from lightning_recipe.exceptions import RecipeCheckError
from lightning_recipe.findings import collect_findings
from lightning_recipe.checks.head_bias import HeadBiasInit
from lightning_recipe.checks.initial_loss import InitialLossCheck
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.checks.prediction_dynamics import PredictionDynamics

PRIORS = [0.1, 0.2, 0.3, 0.4]  # imbalanced: the prior bias differs clearly from anything trained


class _BiasAtStart(Callback):
    """Records the head bias right after the recipe callbacks' ``on_train_start``."""

    def __init__(self) -> None:
        self.bias: torch.Tensor = torch.empty(0)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.bias = pl_module.net[-1].bias.detach().clone()


def _callbacks() -> list[Callback]:
    return [
        HeadBiasInit(),
        InitialLossCheck(),
        LossDecreaseCheck(check_every_n_steps=4, warmup_steps=8),
        PredictionDynamics(every_n_steps=4),
    ]


def _fit(tmp_path: Any, callbacks: list[Callback], epochs: int, ckpt_path: Any = None) -> tuple[L.Trainer, TinyModel]:
    x, y = blobs(n=128, priors=PRIORS)
    L.seed_everything(0)
    model = TinyModel()
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0)
    t = trainer(tmp_path, [*callbacks, _BiasAtStart(), ckpt], max_epochs=epochs, enable_checkpointing=True)
    t.fit(model, loader(x, y, batch_size=16), ckpt_path=ckpt_path)
    return t, model


def _by_type(t: L.Trainer, cls: type) -> Any:
    return next(cb for cb in t.callbacks if isinstance(cb, cls))


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh_callbacks", "same_instances"])
def test_resume_keeps_bias_and_continues_tracking(tmp_path: Any, fresh: bool) -> None:
    first_cbs = _callbacks()
    t1, m1 = _fit(tmp_path, first_cbs, epochs=2)
    assert t1.global_step == 16
    hb1 = _by_type(t1, HeadBiasInit)
    prior = torch.log(torch.bincount(blobs(n=128, priors=PRIORS)[1], minlength=4).double() / 128)
    assert torch.allclose(torch.tensor(hb1.prior, dtype=torch.float64), prior, atol=1e-5)
    trained_bias = m1.net[-1].bias.detach().clone()
    assert not torch.allclose(trained_bias, prior.float(), atol=1e-3)  # training moved it away from the prior
    losses1 = list(_by_type(t1, LossDecreaseCheck).losses)
    steps1 = list(_by_type(t1, PredictionDynamics).steps)
    assert len(losses1) == 16 and steps1 == [0, 4, 8, 12, 16]
    first_findings = [(f.check, f.status) for f in collect_findings(t1)]
    assert ("HeadBiasInit", "pass") in first_findings and ("InitialLossCheck", "pass") in first_findings

    last = os.path.join(tmp_path, "ckpt", "last.ckpt")
    state = torch.load(last, weights_only=False)
    assert torch.equal(state["state_dict"]["net.2.bias"], trained_bias)

    t2, _ = _fit(tmp_path, _callbacks() if fresh else first_cbs, epochs=4, ckpt_path=last)
    assert t2.global_step == 32
    # the bias was not reset: at the resumed fit's start it is the checkpointed, trained one
    assert torch.equal(_by_type(t2, _BiasAtStart).bias, trained_bias)
    hb2 = _by_type(t2, HeadBiasInit)
    assert hb2.done and hb2.prior == hb1.prior
    # the trackers continue from the checkpoint
    ld = _by_type(t2, LossDecreaseCheck)
    assert len(ld.losses) == 32 and ld.losses[:16] == losses1
    assert ld.epoch_ends == [8, 16, 24, 32]
    pd = _by_type(t2, PredictionDynamics)
    assert pd.steps[: len(steps1)] == steps1 and pd.steps == sorted(set(pd.steps)) and pd.steps[-1] == 32
    assert len(pd.values) == len(pd.steps)
    # each check reports once in the resumed fit; the one-time checks do not run again
    findings = [(f.check, f.status) for f in collect_findings(t2)]
    assert len(findings) == len(set(findings)), findings
    assert ("HeadBiasInit", "skip") in findings and ("HeadBiasInit", "pass") not in findings
    assert not any(c == "InitialLossCheck" for c, _ in findings)
    assert findings.count(("LossDecreaseCheck", "pass")) == 1 and findings.count(("PredictionDynamics", "pass")) == 1


class _NaNOnce(TinyModel):
    """Returns a NaN loss at one batch without touching the weights (the NaN has no gradient)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss + (float("nan") if self.global_step == self.at else 0.0)


def test_checkpoint_between_reads_loses_no_loss(tmp_path: Any) -> None:
    """A checkpoint saved between two reads of the loss buffer does not let a NaN loss go unchecked."""
    x, y = blobs(n=256)
    L.seed_everything(0)
    ld = LossDecreaseCheck(check_every_n_steps=8, warmup_steps=100)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3, save_top_k=-1)
    t = trainer(tmp_path, [ld, ckpt], max_epochs=1, enable_checkpointing=True)
    with pytest.raises(RecipeCheckError, match=r"became nan at (training )?batch 4\b"):
        t.fit(_NaNOnce(at=4), loader(x, y, batch_size=16))
    assert len(ld.losses) == 8 and math.isnan(ld.losses[4])
    assert sum(f.failed for f in ld.findings) == 1


def test_one_preset_serves_fits_of_several_models(tmp_path: Any) -> None:
    """The same callbacks (one ``strict()`` list) for a second model: every check runs again, as fresh instances
    would; a second fit of the same model continues: the bias is not set again."""
    import lightning_recipe as lr

    x, y = blobs(n=128, priors=PRIORS)

    def fit(callbacks: list[Callback], model: TinyModel, root: str, epochs: int = 3) -> list[tuple[str, str]]:
        L.seed_everything(0)
        t = trainer(tmp_path / root, callbacks, max_epochs=epochs)
        t.fit(model, loader(x, y, batch_size=16))
        return [(f.check, f.status) for f in collect_findings(t)]

    shared = lr.strict()
    L.seed_everything(0)
    first = fit(shared, TinyModel(), "first")
    L.seed_everything(1)
    second_model = TinyModel()
    second = fit(shared, second_model, "second")
    L.seed_everything(1)
    fresh = fit(lr.strict(), TinyModel(), "fresh")
    assert second == fresh and len(second) == len(first) > 15
    checks = {cb.name: cb for cb in shared[0].callbacks}
    assert len(checks["LossDecreaseCheck"].losses) == 24  # this fit's 3 epochs of 8 batches, not both fits'
    assert checks["PredictionDynamics"].steps[0] == 0 and len(checks["PredictionDynamics"].steps) == 3
    bias, probe = second_model.net[-1].bias.detach().clone(), _BiasAtStart()
    again = fit([*shared, probe], second_model, "again", epochs=4)  # the same model once more: a continued fit
    assert ("HeadBiasInit", "skip") in again and ("InitialLossCheck", "pass") not in again
    assert torch.equal(probe.bias, bias)  # the trained bias was kept, not set to the prior again


def test_a_used_preset_still_pickles(tmp_path: Any) -> None:
    """ddp_spawn pickles the callbacks: one used for a fit before must still pickle; the copy keeps its state."""
    import pickle

    import lightning_recipe as lr

    x, y = blobs(n=64, priors=PRIORS)
    (recipe,) = lr.strict()
    trainer(tmp_path, [recipe], max_epochs=1).fit(TinyModel(), loader(x, y, batch_size=16))
    copy = pickle.loads(pickle.dumps(recipe))
    assert [type(cb) for cb in copy.callbacks] == [type(cb) for cb in recipe.callbacks]
    head = next(cb for cb in copy.callbacks if isinstance(cb, HeadBiasInit))
    decrease = next(cb for cb in copy.callbacks if type(cb).__name__ == "LossDecreaseCheck")
    assert head.done and head.prior and "_model" not in vars(head)
    assert len(decrease.losses) == 4  # one epoch of 4 batches


def test_resume_keeps_the_validation_losses_of_the_loss_curve(tmp_path: Any) -> None:
    """The validation losses drawn on the loss curve come back with a checkpoint: a fit resumed from epoch 2 of 4
    draws the four validation runs, the first two with the values the first fit logged."""
    x, y = blobs(n=128, priors=PRIORS)

    def fit(callbacks: list[Callback], epochs: int, ckpt_path: Any = None) -> L.Trainer:
        L.seed_everything(0)
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True, save_top_k=0)
        t = trainer(tmp_path, [*callbacks, ckpt], max_epochs=epochs, enable_checkpointing=True,
                    num_sanity_val_steps=0)
        t.fit(TinyModel(), loader(x, y, batch_size=16), loader(x, y, batch_size=64, shuffle=False),
              ckpt_path=ckpt_path)
        return t

    first = LossDecreaseCheck(check_every_n_steps=4, warmup_steps=8)
    fit([first], 2)
    logged = [float(v) for _, v in first._val]
    assert [n for n, _ in first._val] == [8, 16] and all(math.isfinite(v) for v in logged)
    resumed = LossDecreaseCheck(check_every_n_steps=4, warmup_steps=8)
    fit([resumed], 4, os.path.join(tmp_path, "ckpt", "last.ckpt"))
    assert [n for n, _ in resumed._val] == [8, 16, 24, 32]
    assert [float(v) for _, v in resumed._val][:2] == pytest.approx(logged, rel=1e-6)
    assert resumed._val_key == first._val_key == "val_loss"
