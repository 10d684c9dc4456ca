"""The per-tensor update ratio ||dw|| / ||w|| of ``OptimizationHealthCheck``: the sampled estimate against the closed
form of SGD, the rule on a parameter group with a learning rate 1e-4x the others and on healthy fits, skipped steps,
zero-initialised tensors, gradient accumulation, several optimizers, the figure's panel."""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from helpers import TinyModel, blobs, loader, trainer
from lightning_recipe.checks.optimization import OptimizationHealthCheck
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.functional.optimization import ratio_error, sample_plan, take_sample, update_ratios


def _fit(tmp_path: Any, model: L.LightningModule, steps: int = 40, extra: tuple = (), bs: int = 32, **kw: Any):
    trainer_kw = {k: kw.pop(k) for k in list(kw) if k in ("accumulate_grad_batches", "logger")}
    cb = OptimizationHealthCheck(on_fail="warn", figure=False, **{"check_every_n_steps": 10, "grad_every_n_steps": 2,
                                                                   **kw})
    x, y = blobs(512)
    L.seed_everything(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb, *extra], max_steps=steps, max_epochs=100, **trainer_kw).fit(model, loader(x, y, bs))
    recipe = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    return cb, recipe


def _finding(cb: OptimizationHealthCheck):
    return next(f for f in cb.findings if f.check == "OptimizationHealthCheck.update_ratio")


def _cv2(t: torch.Tensor) -> float:
    """var(x^2) / mean(x^2)^2 of the entries: the squared coefficient of variation of the squared entries."""
    s = t.double().flatten().square()
    return float(s.var(unbiased=False) / s.mean() ** 2)


class _Wide(TinyModel):
    """8 -> 256 -> 64 -> 4: weights of 2048 and 16384 entries (sampled), the rest at most 256 (taken whole)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(optimizer="sgd", lr=0.05, **kw)
        self.net = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 4))


class _Record(Callback):
    """Every ``every`` optimizer steps, before the step: a full copy of each weight and its gradient (test only)."""

    def __init__(self, every: int) -> None:
        self.every, self.k, self.rec = every, 0, []

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.k += 1
        if (self.k - 1) % self.every == 0:
            self.rec.append({n: (p.detach().clone(), p.grad.detach().clone()) for n, p in pl_module.named_parameters()})


def test_sgd_ratio_matches_the_closed_form_within_the_documented_error(tmp_path):
    """Plain SGD: dw = -lr g, so the ratio is lr ||g|| / ||w||: exact for tensors of at most 256 entries, within 4
    standard errors (``ratio_error`` with the tensors' own cv^2) for the sampled ones."""
    rec = _Record(every=3)
    cb, recipe = _fit(tmp_path, _Wide(), steps=40, extra=(rec,), grad_every_n_steps=3)
    assert not recipe and _finding(cb).status == "pass"
    names = cb.update_ratio_names
    assert len(cb.update_ratios) == len(rec.rec) == 14  # steps 1, 4, ..., 40
    worst = {}
    for (step, row), full in zip(cb.update_ratios, rec.rec):
        for i, n in enumerate(names):
            w, g = full[n]
            exact = 0.05 * float(g.norm()) / float(w.norm())
            count = sample_plan(w.numel(), 256, w.shape[-1] if w.ndim else 1, seed=i)[2]
            tol = 4 * ratio_error(count, w.numel(), _cv2(w), _cv2(g)) + 1e-4  # + float32 rounding of dw
            assert row[i] == pytest.approx(exact, rel=tol), (step, n, count, tol)
            worst[n] = max(worst.get(n, 0.0), abs(row[i] / exact - 1))
    assert max(worst[n] for n in ("net.2.bias", "net.4.weight", "net.4.bias")) < 1e-4  # taken whole: exact
    assert worst["net.2.weight"] > 1e-4  # sampled (256 of 16384): an estimate, within its error


def test_estimator_error_on_gaussian_tensors():
    """Gaussian weights and updates: the relative error of the estimate is ~1/sqrt(k) (6.25 % for k = 256)."""
    gen = torch.Generator().manual_seed(0)
    errs = []
    for s in range(200):
        w = torch.randn(64, 1000, generator=gen)
        dw = 1e-3 * torch.randn(64, 1000, generator=gen)
        plan = [sample_plan(w.numel(), 256, 1000, seed=s)]
        est = float(update_ratios(take_sample([w], plan), take_sample([w + dw], plan), [plan[0][2]])[0])
        errs.append(est / float(dw.norm() / w.norm()) - 1)
    assert np.std(errs) == pytest.approx(ratio_error(256, 64000), rel=0.25)  # 0.0624 documented
    assert abs(np.mean(errs)) < 0.02


class _SlowGroup(TinyModel):
    """Adam; the first layer in its own parameter group at ``factor`` times the learning rate of the rest."""

    def __init__(self, factor: float) -> None:
        super().__init__(lr=1e-2)
        self.factor = factor

    def configure_optimizers(self):
        first = list(self.net[0].parameters())
        return torch.optim.Adam([{"params": first, "lr": self.lr * self.factor},
                                 {"params": list(self.net[2].parameters())}], lr=self.lr)


def test_a_group_with_a_learning_rate_1e4_times_smaller_warns_naming_its_tensors(tmp_path):
    cb_model = {"m": _SlowGroup(1e-4)}
    cb, recipe = _fit(tmp_path, cb_model["m"], steps=40)
    f = _finding(cb)
    assert f.status == "warn" and len(recipe) == 1
    assert "parameter group 0 is" in f.message and "`net.0.weight`" in f.message and "`net.0.bias`" in f.message
    assert "net.2" not in f.message.split("HINT")[0]
    # Adam moves every element by ~lr per step: the ratio scales with the group's learning rate, 1e-4
    r = f.details["ratios"]
    assert 1e3 < f.measured < 1e5 and f.expected == 100 and f.measured == f.details["group_factor"]
    assert "Its peak learning rate is 1e-06, the others' 0.01" in f.message
    # ... and inversely with the weights' RMS (ratio = lr rms(m / sqrt(v)) / rms(w), Adam's normalised step
    # rms(m / sqrt(v)) <= ~1 differing between layers by a small factor)
    m = cb_model["m"]
    rms = {n: float(p.detach().square().mean().sqrt()) for n, p in m.named_parameters()}
    expected = 1e4 * rms["net.0.weight"] / rms["net.2.weight"]
    assert expected / 3 < r["net.2.weight"] / r["net.0.weight"] < expected * 3
    assert f.step == 20  # decided at the second read, after 10 measurements


class _FineTuned(_SlowGroup):
    """Discriminative fine-tuning: the first layer ("the pretrained backbone", its weights at 5x the default scale) at
    1/100 of the head's learning rate, as fine-tuning guides set it."""

    def __init__(self) -> None:
        super().__init__(1e-2)
        with torch.no_grad():
            self.net[0].weight.mul_(5.0)


def test_a_backbone_at_a_hundredth_of_the_heads_learning_rate_is_a_choice_not_a_warning(tmp_path):
    """The backbone moves >100x less than the head (its learning rate is 100x lower and its weights larger): no
    RecipeWarning, since 100x between groups is a deliberate fine-tuning setting; 1e4x (above) still warns."""
    cb, recipe = _fit(tmp_path, _FineTuned(), steps=40)
    f = _finding(cb)
    assert f.status in ("pass", "note") and not recipe, f.message
    r = f.details["ratios"]
    assert r["net.2.weight"] / r["net.0.weight"] > 100  # what the group rule would have called a wrong learning rate
    assert f.details["peak_lrs"] == {0: pytest.approx(1e-4), 1: pytest.approx(1e-2)}


class _RawOffset(TinyModel):
    """One parameter group; a logit offset in raw units, initialised at 1e3 (cross-entropy ignores a common shift)."""

    def __init__(self) -> None:
        super().__init__(lr=1e-2)
        self.offset = nn.Parameter(torch.full((4,), 1e3))

    def forward(self, x):
        return self.net(x) + self.offset


def test_a_gap_the_learning_rates_do_not_explain_is_a_note(tmp_path):
    """A tensor at a large scale moves slowly relative to its size (Adam moves each entry by ~lr = 1e-2 per step:
    a ratio ~1e-5): one group, so no learning rate to blame: a note, never a RecipeWarning."""
    cb, recipe = _fit(tmp_path, _RawOffset(), steps=40)
    f = _finding(cb)
    assert f.status == "note" and not recipe, f.message
    assert "1 tensor(s)" in f.message and "`offset`" in f.message and "No parameter group's learning rate" in f.message
    assert 1e-2 / 1e3 / 10 < f.details["ratios"]["offset"] < 1e-2 / 1e3  # lr rms(m / sqrt(v)) / 1e3, rms <= 1
    assert f.measured > 100


def test_a_group_with_learning_rate_zero_is_left_to_parameter_update_check(tmp_path):
    """lr = 0: the tensors do not move (ratio 0, not judged here); ParameterUpdateCheck reports them."""
    cb, recipe = _fit(tmp_path, _SlowGroup(0.0), steps=40)
    f = _finding(cb)
    assert f.status == "pass" and not recipe and set(f.details["ratios"]) == {"net.2.weight", "net.2.bias"}
    assert all(r[0] == 0.0 and r[1] == 0.0 for _, r in cb.update_ratios)


class _Conv(L.LightningModule):
    def __init__(self, opt: str) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                                 nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        self.opt, self.loss_fn = opt, nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 2, 4).repeat(1, 1, 3, 2))

    def training_step(self, batch, i):
        return self.loss_fn(self(batch[0]), batch[1])

    def configure_optimizers(self):
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize(("model", "opt"), [("mlp", "adam"), ("mlp", "sgd"), ("cnn", "adam"), ("cnn", "sgd")])
def test_healthy_fits_pass(tmp_path, model, opt):
    m = TinyModel(optimizer=opt, lr=1e-2 if opt == "adam" else 0.1) if model == "mlp" else _Conv(opt)
    cb, recipe = _fit(tmp_path, m, steps=40)
    f = _finding(cb)
    assert f.status == "pass" and not recipe, (f.message, recipe)
    assert f.measured == 1.0 and f.details["gap"] < 100  # one group; the largest gap between neighbouring tensors
    assert len(cb.update_ratio_stats) == 4 and all(s["min"] <= s["median"] <= s["max"] for _, s in
                                                    cb.update_ratio_stats)


class _SkippingSGD(torch.optim.SGD):
    """Runs the closure at every step but applies every other update only (like a GradScaler skipping inf steps)."""

    calls = 0

    @torch.no_grad()
    def step(self, closure=None):
        with torch.enable_grad():
            loss = closure() if closure is not None else None
        _SkippingSGD.calls += 1
        if _SkippingSGD.calls % 2 == 0:
            return loss
        return super().step()


class _ZeroBiasSkipping(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        nn.init.zeros_(self.net[0].bias)

    def configure_optimizers(self):
        _SkippingSGD.calls = 0
        return _SkippingSGD(self.parameters(), lr=0.1)


def test_skipped_steps_and_zero_initialised_tensors_are_not_ratios_of_zero(tmp_path):
    cb, recipe = _fit(tmp_path, _ZeroBiasSkipping(), steps=40, grad_every_n_steps=1)
    rows = [r for _, r in cb.update_ratios]
    assert len(rows) == 40
    skipped = [r for k, r in enumerate(rows) if k % 2 == 1]  # calls 2, 4, ...: the update was not applied
    assert all(math.isnan(v) for r in skipped for v in r)
    done = [r for k, r in enumerate(rows) if k % 2 == 0]
    assert all(v > 0 for r in done[1:] for v in r) and all(v > 0 for i, v in enumerate(done[0]) if i != 1)
    assert math.isnan(done[0][1])  # net.0.bias was all zero before the first step: no ratio
    assert _finding(cb).status == "pass" and not recipe


class _NewStorage(Callback):
    """At batch 20, every parameter gets new storage (``p.data = p.data.clone()``, as a cast or a reload would)."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 20:
            for p in pl_module.parameters():
                p.data = p.data.clone()


def test_parameters_given_new_storage_are_sampled_where_they_now_live(tmp_path):
    """The sample's views are kept between measurements; a parameter whose storage was replaced is sampled again
    from its new storage (views of the old one would never move: every later ratio NaN), and agrees with the closed
    form of SGD on the tensors taken whole."""
    rec = _Record(every=2)
    cb, recipe = _fit(tmp_path, _Wide(), steps=40, extra=(_NewStorage(), rec), grad_every_n_steps=2)
    assert not recipe and len(cb.update_ratios) == len(rec.rec) == 20
    names = cb.update_ratio_names
    whole = [i for i, n in enumerate(names) if n in ("net.2.bias", "net.4.weight", "net.4.bias")]
    for (step, row), full in zip(cb.update_ratios, rec.rec):
        for i in whole:
            w, g = full[names[i]]
            assert row[i] == pytest.approx(0.05 * float(g.norm()) / float(w.norm()), rel=1e-4), (step, names[i])
    assert all(s > 20 for s, _ in cb.update_ratios[-9:])  # measured after the new storage


class _Strided(_Wide):
    """_Wide with a (4, 6) parameter whose entries no flat view walks (strides 12 and 2: sampling copies it)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter((torch.randn(4, 12) * 0.1)[:, ::2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x[:, :4] @ self.mix[:, :4]


def test_a_parameter_no_view_can_sample_is_sampled_afresh_at_each_measurement(tmp_path):
    rec = _Record(every=2)
    model = _Strided()
    assert not model.mix.is_contiguous()
    cb, recipe = _fit(tmp_path, model, steps=20, extra=(rec,), grad_every_n_steps=2)
    i = cb.update_ratio_names.index("mix")
    assert len(cb.update_ratios) == len(rec.rec) == 10
    for (step, row), full in zip(cb.update_ratios, rec.rec):
        w, g = full["mix"]
        assert row[i] == pytest.approx(0.05 * float(g.norm()) / float(w.norm()), rel=1e-4), step


def test_gradient_accumulation_measures_the_optimizer_steps(tmp_path):
    cb, recipe = _fit(tmp_path, TinyModel(), steps=20, accumulate_grad_batches=4)
    assert [s for s, _ in cb.update_ratios] == list(range(0, 20, 2))  # global_step before each measured step
    assert all(v > 0 for _, r in cb.update_ratios for v in r) and not recipe


class _TwoOptimizers(TinyModel):
    """Manual optimization, one optimizer per layer, stepped one after the other in each training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, i):
        loss = self.compute_loss(batch)
        a, b = self.optimizers()
        a.zero_grad()
        b.zero_grad()
        self.manual_backward(loss)
        a.step()
        b.step()
        return loss

    def configure_optimizers(self):
        return (torch.optim.Adam(self.net[0].parameters(), lr=1e-2), torch.optim.SGD(self.net[2].parameters(), lr=0.1))


def test_manual_optimization_with_two_optimizers(tmp_path):
    cb, recipe = _fit(tmp_path, _TwoOptimizers(), steps=40, grad_every_n_steps=1)
    rows = [r for _, r in cb.update_ratios]
    assert len(rows) == 40  # 20 batches x 2 optimizers, each measured on its own tensors
    first, second = rows[0::2], rows[1::2]
    assert all(v > 0 for r in first for v in r[:2]) and all(math.isnan(v) for r in first for v in r[2:])
    assert all(v > 0 for r in second for v in r[2:]) and all(math.isnan(v) for r in second for v in r[:2])
    assert _finding(cb).status == "pass" and not recipe


def test_bad_update_arguments():
    with pytest.raises(RecipeConfigError, match="update_sample"):
        OptimizationHealthCheck(update_sample=0)
    with pytest.raises(RecipeConfigError, match="max_update_spread"):
        OptimizationHealthCheck(max_update_spread=1.0)


def test_the_figure_has_the_update_ratio_panel(tmp_path):
    from lightning_recipe.report.plotting import plot_optimization

    rows = [(s, [1e-3 * (1 + s / 100), 1e-7, 2e-2, math.nan]) for s in range(0, 60, 2)]
    fig = plot_optimization([[0.1]] * 60, [(10, [1e-3, 1e-1])], ["net.0", "net.2"], [1.0] * 30,
                            update_ratios=rows, update_ratio_names=["a.weight", "a.bias", "b.weight", "b.bias"])
    ax = fig.axes[-1]
    assert len(fig.axes) == 5 and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "optimizer step" and "||dw|| / ||w||" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "a.bias (median 1e-07)" in labels and "1e-3 (rule of thumb)" in labels
    fig.savefig(tmp_path / "f.png")
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1  # outside the data area


def test_no_host_sync_per_step(tmp_path):
    """Measuring at every optimizer step (``grad_every_n_steps=1``: a sample before and after each step) costs one
    sync per read (K / N reads for K steps), not one per step: against the same check with the sampling turned off."""
    from test_sync import K, N, _count_syncs

    class _NoSample(OptimizationHealthCheck):
        def _begin_sample(self, *args):
            pass

    growth = {}
    for cls in (OptimizationHealthCheck, _NoSample):
        extra = {}
        for k in (K, 2 * K):
            cb = cls(check_every_n_steps=N, grad_every_n_steps=1, figure=False)
            extra[k] = _count_syncs(tmp_path / f"{cls.__name__}{k}", [cb], k)
            assert len(cb.update_ratios) == (k if cls is OptimizationHealthCheck else 0)
        growth[cls.__name__] = extra[2 * K] - extra[K]
    assert 0 <= growth["OptimizationHealthCheck"] - growth["_NoSample"] <= K // N, growth  # K more steps: 4 reads


class _SparseAndLoose(TinyModel):
    """A sparse embedding (SGD supports sparse gradients), a dense one, and a layer left out of the optimizer."""

    def __init__(self) -> None:
        super().__init__(optimizer="sgd", lr=0.1)
        self.sparse, self.dense = nn.Embedding(16, 8, sparse=True), nn.Embedding(16, 8)
        self.loose = nn.Linear(8, 8)

    def forward(self, x):
        ids = (x[:, 0].abs() * 4).long().clamp(max=15)
        return self.net(self.loose(x) + self.sparse(ids) + self.dense(ids))

    def configure_optimizers(self):
        return torch.optim.SGD([p for n, p in self.named_parameters() if not n.startswith("loose")], lr=0.1)


def test_sparse_embeddings_and_parameters_outside_the_optimizer(tmp_path):
    cb, recipe = _fit(tmp_path, _SparseAndLoose(), steps=20)
    col = {n: [r[i] for _, r in cb.update_ratios] for i, n in enumerate(cb.update_ratio_names)}
    assert all(math.isnan(v) for v in col["sparse.weight"] + col["loose.weight"] + col["loose.bias"])
    assert all(v >= 0 for v in col["dense.weight"]) and all(v > 0 for v in col["net.0.weight"])
    f = _finding(cb)
    assert f.details["embeddings_not_judged"] == ["sparse.weight", "dense.weight"]
    assert "dense.weight" not in f.details["ratios"] and f.status == "pass" and not recipe


def test_every_ratio_far_below_the_rule_of_thumb_is_a_note(tmp_path):
    """SGD at lr 1e-6: ratio = lr ||g|| / ||w|| ~ 1e-7 for every tensor, far from ~1e-3: a note, not a warning."""
    cb, recipe = _fit(tmp_path, TinyModel(optimizer="sgd", lr=1e-6), steps=20)
    f = _finding(cb)
    assert f.status == "note" and not recipe and "far from the ~1e-3 rule of thumb" in f.message
    assert f.details["median_ratio"] < 1e-5


def test_update_ratio_is_a_live_series_equal_to_each_reads_median(tmp_path):
    """Each read sends ``recipe/update_ratio``: the median over tensors of their median ratio in that read's window,
    the value kept in ``update_ratio_stats`` (a CSVLogger writes it; no other computation)."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(tmp_path), name="live")
    cb, recipe = _fit(tmp_path, _Wide(), steps=40, logger=logger)
    assert not recipe
    with open(f"{logger.log_dir}/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("recipe/update_ratio")]
    logged = [float(r["recipe/update_ratio"]) for r in rows]
    kept = [s["median"] for _, s in cb.update_ratio_stats]
    assert len(logged) == len(kept) >= 3
    assert logged == pytest.approx(kept, rel=1e-6)
    assert all(1e-5 < v < 1e-1 for v in logged)  # SGD at lr 0.05 on this net: inside the rule of thumb's range
