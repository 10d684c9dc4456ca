import copy
import math
import os

import lightning as L
import numpy as np
import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer
from torch import nn

from lightning_recipe.exceptions import RecipeCheckError, RecipeWarning
from lightning_recipe.checks.optimization import OptimizationHealthCheck
from lightning_recipe.functional.optimization import lr_ratio_before


def _fit(tmp_path, model, dl, steps=40, figure=False, **kw):
    trainer_kw = {k: kw.pop(k) for k in list(kw) if k in ("gradient_clip_val", "gradient_clip_algorithm", "max_epochs")}
    cb = OptimizationHealthCheck(check_every_n_steps=kw.pop("check_every_n_steps", 10), figure=figure, **kw)
    trainer(tmp_path, [cb], max_steps=steps, **{"max_epochs": 100, **trainer_kw}).fit(model, dl)
    return cb


def _get(cb, name):
    return next(f for f in cb.findings if f.check.endswith("." + name))


class _Scheduled(TinyModel):
    def __init__(self, make, interval="step", **kw):
        super().__init__(**kw)
        self.make, self.interval = make, interval

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.make(opt), "interval": self.interval}}


class _Deep(TinyModel):
    def __init__(self, act, depth=10, width=32, **kw):
        super().__init__(**kw)
        layers, d = [], 8
        for _ in range(depth):
            layers += [nn.Linear(d, width), act()]
            d = width
        self.net = nn.Sequential(*layers, nn.Linear(d, 4))


def test_steplr_stepped_per_batch_fails_and_cosine_passes(tmp_path):
    x, y = blobs(512)
    with pytest.raises(RecipeCheckError, match="fell to 0.000977 of its peak") as err:
        cb = OptimizationHealthCheck(check_every_n_steps=10, figure=False)
        model = _Scheduled(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
        trainer(tmp_path, [cb], max_steps=80, max_epochs=100).fit(model, loader(x, y))
    f = _get(cb, "lr_schedule")
    assert f.status == "fail" and f.measured == pytest.approx(0.5**10)  # read at batch 10, before step 20 = 80/4
    assert f.details["planned_steps"] == 80 and "'interval': 'epoch'" in str(err.value)
    cb = _fit(tmp_path, _Scheduled(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=32)), loader(x, y),
              steps=32)
    f = _get(cb, "lr_schedule")
    assert f.status == "pass" and f.measured == pytest.approx((1 + math.cos(math.pi / 4)) / 2)  # 0.854 at a quarter
    assert lr_ratio_before([row[0] for row in cb.lrs], 32, initial=0.1) == pytest.approx(f.measured)


def test_warm_restarts_stepped_per_batch_pass(tmp_path):
    """SGDR (CosineAnnealingWarmRestarts, T_0=20, T_mult=2) stepped per batch over 144 steps: the learning rate falls
    below 10% of its peak at step 16 and to 0.00616 at step 19, before a quarter (36 steps), but restarts to the peak at
    step 20, before twice 16: a restart, not a decay to nothing."""
    x, y = blobs(512)
    make = lambda opt: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=20, T_mult=2)  # noqa: E731
    cb = _fit(tmp_path, _Scheduled(make), loader(x, y), steps=144)
    f = _get(cb, "lr_schedule")
    assert f.status == "pass" and "the schedule restarts" in f.message
    assert f.measured == pytest.approx((1 + math.cos(math.pi * 19 / 20)) / 2) and f.measured < 0.01  # at step 19
    assert f.details["low_step"] == 16 and f.details["restart_step"] == 20 and f.step == 40  # first read after 36
    assert f.details["fraction_low"] == pytest.approx(4 / 36)  # steps 16-19 of the first 36 below a tenth
    assert (1 + math.cos(math.pi * 16 / 20)) / 2 < 0.1 < (1 + math.cos(math.pi * 15 / 20)) / 2
    assert [row[0] for row in cb.lrs][19] == pytest.approx(0.1)  # back at the peak after the 20th step


def test_a_schedule_that_comes_back_but_does_not_stay_fails(tmp_path):
    """CyclicLR triangular2 with cycles of 4 batches (a step size meant in epochs, stepped per batch): the
    amplitude halves every cycle, so the learning rate comes back above a tenth of its peak once and then stays
    below it for most of the first quarter."""
    x, y = blobs(512)
    make = lambda opt: torch.optim.lr_scheduler.CyclicLR(  # noqa: E731
        opt, base_lr=1e-4, max_lr=0.1, step_size_up=2, mode="triangular2")
    cb = OptimizationHealthCheck(check_every_n_steps=10, figure=False)
    with pytest.raises(RecipeCheckError, match="but does not stay"):
        trainer(tmp_path, [cb], max_steps=144, max_epochs=100).fit(_Scheduled(make), loader(x, y))
    f = _get(cb, "lr_schedule")
    lrs = [row[0] for row in cb.lrs][:36]  # after each of the first 36 steps (a quarter of 144)
    peaks = [max(lrs[: k + 1] + [1e-4]) for k in range(36)]
    low = sum(lr / p < 0.1 for lr, p in zip(lrs, peaks)) / 36
    assert f.status == "fail" and f.measured == pytest.approx(low) and low >= 0.5 and f.details["restart_step"]


@pytest.mark.parametrize(
    ("make", "fell", "ratio"),
    [
        # 0.8**k: below 0.1 at step 11, still low at 22; read at 30
        (lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8), 11, 0.8**30),
        # epoch milestones stepped per batch: 0.01 of the peak at step 6, 0.001 at 9, judged at 12, read at 20
        (lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 6, 9], gamma=0.1), 6, 1e-3),
    ],
    ids=["exponential", "multistep"],
)
def test_decay_to_nothing_stepped_per_batch_still_fails(tmp_path, make, fell, ratio):
    x, y = blobs(512)
    cb = OptimizationHealthCheck(check_every_n_steps=10, figure=False)
    with pytest.raises(RecipeCheckError, match=f"had not come back above 0.1 of the peak by step {2 * fell}"):
        trainer(tmp_path, [cb], max_steps=144, max_epochs=100).fit(_Scheduled(make), loader(x, y))
    f = _get(cb, "lr_schedule")
    assert f.status == "fail" and f.measured == pytest.approx(ratio, rel=1e-6)
    assert f.details["low_step"] == fell and f.details["restart_step"] is None


def test_a_fit_ending_before_the_restart_window_is_judged_at_its_end(tmp_path):
    """StepLR(step_size=1, gamma=0.5) per batch, judged over the whole fit (schedule_fraction=1) of 6 steps: below 0.1
    at step 4 (0.0625), never back; the fit ends at step 6, before twice 4, with the learning rate still low: a warning
    (0.5**6 = 0.0156 is above the fail level 0.01)."""
    x, y = blobs(512)
    cb = OptimizationHealthCheck(on_fail="warn", check_every_n_steps=10, schedule_fraction=1.0, figure=False)
    with pytest.warns(RecipeWarning, match=r"by the end of the fit \(step 6\)"):
        trainer(tmp_path, [cb], max_steps=6, max_epochs=100).fit(
            _Scheduled(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)), loader(x, y))
    f = _get(cb, "lr_schedule")
    assert f.status == "warn" and f.measured == pytest.approx(0.5**6) and f.details["low_step"] == 4


def test_weight_decay_skip_names_only_the_reason_that_applies(tmp_path):
    x, y = blobs(512)
    cb = _fit(tmp_path, TinyModel(optimizer="sgd", lr=0.1, weight_decay=1e-4), loader(x, y), steps=82,
              check_every_n_steps=50, warmup_steps=50)
    f = _get(cb, "weight_decay")
    assert f.status == "skip" and "warmup_steps" not in f.message
    assert "only 2 reads of the weight norm (one every check_every_n_steps=50 batches and at the end)" in f.message
    cb = _fit(tmp_path, TinyModel(optimizer="sgd", lr=0.1, weight_decay=1e-4), loader(x, y), steps=40,
              warmup_steps=50)
    f = _get(cb, "weight_decay")
    assert f.status == "skip" and "40 batches, fewer than warmup_steps=50: weight decay not judged" in f.message


def test_tiny_clip_value_fails_with_sgd_and_sane_clip_passes(tmp_path):
    x, y = blobs(512)
    model = TinyModel(optimizer="sgd", lr=0.1)
    init = copy.deepcopy(model)
    with pytest.raises(RecipeCheckError, match="clips nearly every step by orders of magnitude"):
        cb = OptimizationHealthCheck(check_every_n_steps=10, grad_every_n_steps=1, figure=False)
        trainer(tmp_path, [cb], max_steps=40, gradient_clip_val=1e-4).fit(model, loader(x, y, shuffle=False))
    f = _get(cb, "clipping")
    assert f.status == "fail" and f.details["clipped_fraction"] == 1.0 and f.details["steps"] == 10
    assert f.measured == pytest.approx(float(np.median(cb.grad_norms)) / 1e-4) and f.measured > 1e3
    # the first norm is the pre-clip gradient norm of the first batch at init
    loss = init.compute_loss((x[:32], y[:32]))
    loss.backward()
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in init.parameters()))
    assert cb.grad_norms[0] == pytest.approx(float(expected), rel=1e-5)
    cb = _fit(tmp_path, TinyModel(optimizer="sgd", lr=0.1), loader(x, y), gradient_clip_val=5.0)
    f = _get(cb, "clipping")
    assert f.status == "pass" and f.measured < 1 and f.details["clipped_fraction"] < 0.5


def test_deep_sigmoid_net_warns_vanishing_gradients_and_relu_net_passes(tmp_path):
    L.seed_everything(0, verbose=False)  # the initialisation decides which of the two first layers gets the least
    x, y = blobs(512)
    with pytest.warns(RecipeWarning, match="vanishing gradients"):
        cb = _fit(tmp_path, _Deep(nn.Sigmoid, optimizer="sgd", lr=0.1), loader(x, y), steps=20)
    f = _get(cb, "gradients")
    rms = f.details["rms"]
    assert f.status == "warn" and f.measured == pytest.approx(max(rms) / min(rms)) and f.measured > 1e6
    assert int(np.argmin(rms)) == 0 and f.details["layers"][0] == "net.0"  # the first layer gets the least
    cb = _fit(tmp_path, _Deep(nn.ReLU, depth=3, optimizer="sgd", lr=0.1), loader(x, y), steps=20)
    f = _get(cb, "gradients")
    assert f.status == "pass" and f.measured < 100


def test_dead_relu_layer_warns(tmp_path):
    x, y = blobs(512)
    model = TinyModel()
    with torch.no_grad():
        model.net[0].bias.fill_(-100.0)  # pre-activations negative for every input
    with pytest.warns(RecipeWarning, match="100% of the units of ReLU `net.1`"):
        cb = _fit(tmp_path, model, loader(x, y), steps=10)
    f = _get(cb, "dead_relu")
    assert f.status == "warn" and f.measured == 1.0 and f.details["probe_examples"] == 32
    cb = _fit(tmp_path / "healthy", TinyModel(), loader(x, y), steps=10, figure=True)  # own folder: a second fit
    f = _get(cb, "dead_relu")                                                         # into one writes recipe_1/
    assert f.status == "pass" and f.measured < 0.5
    assert os.path.isfile(os.path.join(tmp_path, "healthy", "recipe", "optimization_health.png"))


def test_huge_weight_decay_fails_and_small_passes(tmp_path):
    x, y = blobs(512)
    with pytest.raises(RecipeCheckError, match="the weights shrink instead of fitting"):
        cb = OptimizationHealthCheck(check_every_n_steps=10, warmup_steps=30, figure=False)
        trainer(tmp_path, [cb], max_steps=60, max_epochs=100).fit(
            TinyModel(optimizer="sgd", lr=0.1, weight_decay=5.0), loader(x, y))
    f = _get(cb, "weight_decay")
    assert f.status == "fail" and f.measured < 0.1 and f.details["relative_loss_decrease"] < 0.05
    assert f.details["decay_alone"] == pytest.approx(math.exp(-0.1 * 5.0 * 30))  # 30 steps of lr * wd = 0.5
    cb = _fit(tmp_path, TinyModel(optimizer="sgd", lr=0.1, weight_decay=5e-4), loader(x, y), steps=60, warmup_steps=30)
    f = _get(cb, "weight_decay")
    assert f.status == "pass" and f.details["relative_loss_decrease"] > 0.3


def test_training_is_bit_identical_with_the_check(tmp_path):
    x, y = blobs(256)
    weights = []
    for cbs in ([], [OptimizationHealthCheck(check_every_n_steps=5, figure=False)]):
        L.seed_everything(0, verbose=False)
        model = nn.Sequential()  # placeholder replaced below
        model = TinyModel()
        model.net.insert(1, nn.Dropout(0.2))
        trainer(tmp_path, cbs, max_steps=15, max_epochs=100, gradient_clip_val=1.0).fit(model, loader(x, y))
        weights.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


class _GradRecorder(L.Callback):
    """The total gradient norm and the RMS gradient per layer at every optimizer step, computed directly."""

    def __init__(self) -> None:
        self.total: list[float] = []
        self.rms: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        sq: dict[str, float] = {}
        n: dict[str, int] = {}
        for name, p in pl_module.named_parameters():
            layer = name.rsplit(".", 1)[0]
            sq[layer] = sq.get(layer, 0.0) + float(p.grad.double().pow(2).sum())
            n[layer] = n.get(layer, 0) + p.numel()
        self.total.append(math.sqrt(sum(sq.values())))
        self.rms.append({k: math.sqrt(v / n[k]) for k, v in sq.items()})


def test_gradient_statistics_and_figure_match_a_direct_computation(tmp_path):
    """Norms gathered on the device and batched at each read equal the per-step norms computed one by one."""
    x, y = blobs(256)
    rec = _GradRecorder()
    cb = OptimizationHealthCheck(check_every_n_steps=10, grad_every_n_steps=3, figure=True)
    trainer(tmp_path, [rec, cb], max_steps=20, max_epochs=100).fit(TinyModel(), loader(x, y))
    measured = list(range(0, 20, 3))  # optimizer steps 1, 4, 7, ... (0-based 0, 3, 6, ...)
    assert cb.grad_norms == pytest.approx([rec.total[i] for i in measured], rel=1e-5)
    assert [s for s, _ in cb.layer_history] == [10, 20]
    for (_, rms), window in zip(cb.layer_history, ([0, 3, 6, 9], [12, 15, 18])):
        expected = [np.mean([rec.rms[i][layer] for i in window]) for layer in cb.layer_names]
        assert rms == pytest.approx(expected, rel=1e-5)
    from lightning_recipe.report.plotting import plot_optimization

    fig = plot_optimization(cb.lrs, cb.layer_history, cb.layer_names, cb.grad_norms, None, cb.weight_history, 20,
                            grad_every=3)
    clip_ax, w_ax = fig.axes[2], fig.axes[3]
    assert list(clip_ax.get_lines()[0].get_xdata()) == measured
    w = np.array([h[1] for h in cb.weight_history])
    loss = np.array([h[2] for h in cb.weight_history])
    weight_line, loss_line = w_ax.get_lines()[:2]
    assert np.allclose(weight_line.get_ydata(), w / w[0]) and np.allclose(loss_line.get_ydata(), loss / loss[0])
    assert any(p.endswith("optimization_health.png") for p in cb.figures)


class _LossLog(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[float] = []

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.seen.append(float(loss))
        return loss


def test_losses_keep_their_own_accumulation_factor(tmp_path):
    """With accumulation changing between epochs (1, then 4), each loss is rescaled by the factor of its batch."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    x, y = blobs(320)
    model = _LossLog()
    cb = OptimizationHealthCheck(check_every_n_steps=50, figure=False)
    trainer(tmp_path, [cb, GradientAccumulationScheduler({0: 1, 1: 4})], max_epochs=2).fit(model, loader(x, y))
    assert len(cb.losses) == len(model.seen) == 20  # the 10 batches of epoch 0 were pending at the switch
    assert cb.losses == pytest.approx(model.seen, rel=1e-6)
