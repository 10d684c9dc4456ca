import math

import lightning as L
import pytest
import torch
from helpers import GAN, TinyModel, blobs, loader, regression_data, trainer
from torch import nn

from lightning_recipe import HeadBiasInit, LossDecreaseCheck, RecipeCheckError, RecipeWarning
from lightning_recipe.functional.loss_decrease import plateau_test


def _fit(tmp_path, model, dl, epochs=8, cbs=(), **kw):
    L.seed_everything(0)
    cb = LossDecreaseCheck(**kw)
    t = trainer(tmp_path, [*cbs, cb], max_epochs=epochs)
    t.fit(model, dl)
    return cb, t


@pytest.mark.parametrize(
    ("model_kw", "data"),
    [
        (dict(), "multiclass"),
        (dict(out_dim=1, loss_fn=nn.BCEWithLogitsLoss()), "binary"),
        (dict(out_dim=1, loss_fn=nn.MSELoss()), "regression"),
    ],
)
def test_healthy_models_pass(tmp_path, model_kw, data):
    if data == "regression":
        x, y = regression_data(n=512, mean=0.0, scale=1.0)
    else:
        x, y = blobs(n=512, classes=4 if data == "multiclass" else 2)
        y = y if data == "multiclass" else y.float().unsqueeze(1)
    cb, t = _fit(tmp_path, TinyModel(**model_kw), loader(x, y), cbs=[HeadBiasInit()])
    assert [f.status for f in cb.findings] == ["pass"], cb.findings
    assert len(cb.losses) == t.global_step == 128
    assert cb.findings[0].measured < 0.5 * cb.prior_loss  # well below the label-prior loss


def test_prior_loss_is_label_entropy(tmp_path):
    x, y = blobs(n=512, priors=[0.55, 0.3, 0.1, 0.05])
    cb, _ = _fit(tmp_path, TinyModel(), loader(x, y), epochs=1)
    p = torch.bincount(y, minlength=4).double() / len(y)
    assert cb.prior_loss == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)


def test_nan_loss_fails(tmp_path):
    class NaNAfter(TinyModel):
        def training_step(self, batch, batch_idx):
            loss = self.compute_loss(batch)
            return loss * float("nan") if self.global_step >= 30 else loss

    x, y = blobs()
    with pytest.raises(RecipeCheckError, match="became nan") as err:
        _fit(tmp_path, NaNAfter(), loader(x, y), check_every_n_steps=10)
    assert "learning rate too high" in str(err.value)


def test_tiny_learning_rate_fails_to_decrease(tmp_path):
    x, y = blobs(priors=[0.4, 0.3, 0.2, 0.1])
    with pytest.raises(RecipeCheckError, match="did not decrease") as err:
        _fit(tmp_path, TinyModel(lr=1e-9), loader(x, y))
    assert "learning rate too low" in str(err.value)


def test_flipped_sign_fails(tmp_path):
    class Flipped(TinyModel):
        def training_step(self, batch, batch_idx):
            return -self.compute_loss(batch)

    x, y = blobs()
    with pytest.raises(RecipeCheckError, match="below 0, the smallest value") as err:
        _fit(tmp_path, Flipped(), loader(x, y))
    assert "sign is flipped" in str(err.value)


def test_permuted_labels_plateau_at_the_prior(tmp_path):
    x, y = blobs(n=2048, priors=[0.6, 0.2, 0.1, 0.1])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]  # labels independent of inputs
    cb = LossDecreaseCheck(on_fail="warn")
    with pytest.warns(RecipeWarning, match="learned only the label prior"):
        L.seed_everything(0)
        trainer(tmp_path, [HeadBiasInit(), cb], max_epochs=2).fit(TinyModel(lr=1e-3), loader(x, y))
    p = torch.bincount(y, minlength=4).double() / len(y)
    h = float(-(p * p.log()).sum())
    failed = [f for f in cb.findings if f.status == "fail"]
    assert failed and abs(failed[0].measured - h) < 0.05 * h
    d = failed[0].details
    assert (d["prior_loss"] if "prior_loss" in d else d["plateau"]["prior_loss"]) == pytest.approx(h, rel=1e-5)


def test_divergence_fails(tmp_path):
    class Saturating(TinyModel):
        """Outputs bounded by 10: a too-high learning rate drives them to the wrong bound (finite loss ~100)."""

        def forward(self, x):
            return 10 * torch.tanh(self.net(x))

    x, y = regression_data(n=512, mean=0.0, scale=1.0)
    cb = LossDecreaseCheck(on_fail="warn", check_every_n_steps=5)
    with pytest.warns(RecipeWarning, match="diverges"):
        L.seed_everything(0)
        trainer(tmp_path, [cb], max_epochs=2).fit(
            Saturating(out_dim=1, loss_fn=nn.MSELoss(), lr=20.0, optimizer="sgd"), loader(x, y))
    f = next(f for f in cb.findings if f.check.endswith("diverge"))
    assert math.isfinite(f.measured) and f.measured > 2 * f.expected


def test_short_fit_is_skipped_not_failed(tmp_path):
    x, y = blobs(n=64)
    cb, _ = _fit(tmp_path, TinyModel(lr=1e-9), loader(x, y), epochs=2)
    assert [f.status for f in cb.findings] == ["skip"]
    assert "too few to judge" in cb.findings[0].message


def test_short_planned_fit_is_judged_at_half_its_length(tmp_path):
    """A small data set (6 batches per epoch, 72 planned): the warm-up becomes max(30, 72 // 2) = 36 batches."""
    x, y = blobs(n=192, priors=[0.4, 0.3, 0.2, 0.1])
    with pytest.raises(RecipeCheckError, match="did not decrease after 36 steps"):
        _fit(tmp_path, TinyModel(lr=1e-9), loader(x, y), epochs=12)
    cb, t = _fit(tmp_path, TinyModel(lr=1e-2), loader(x, y), epochs=12)
    assert cb._warmup == 36 and cb.window == 7
    assert [f.status for f in cb.findings] == ["pass"] and t.global_step == 72


class _BreastCancerMLP(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        self.loss_fn, self.lr = nn.BCEWithLogitsLoss(), lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / x.std(0), dtype=torch.float32)
    return x, torch.tensor(y, dtype=torch.float32).unsqueeze(1)


def test_loss_staying_above_the_prior_fails_and_a_healthy_rate_passes(tmp_path):
    """SGD at lr=5 on breast cancer: the loss explodes, comes back down, and settles ABOVE the label entropy (worse than
    a constant prediction), which neither the decrease test (it went down from the explosion) nor the divergence test
    (under x2) sees (here the loss also rose between two early epochs); the same model at lr=0.01 ends far below."""
    x, y = _breast_cancer()
    q = y.mean().item()
    entropy = -(q * math.log(q) + (1 - q) * math.log(1 - q))
    with pytest.warns(RecipeWarning, match="stays ABOVE"):
        cb, _ = _fit(tmp_path, _BreastCancerMLP(lr=5.0), loader(x, y, batch_size=16), epochs=6, cbs=[HeadBiasInit()],
                     on_fail="warn")
    failed = {f.check: f for f in cb.findings if f.failed}
    assert "LossDecreaseCheck.decrease" not in failed and "LossDecreaseCheck.diverge" not in failed
    f = failed["LossDecreaseCheck.above_prior"]
    assert f.expected == pytest.approx(entropy, rel=1e-4)  # after the bias init: the untrained loss is the prior
    means, margins = f.details["means"], f.details["margins"]
    assert all(m > entropy + b for m, b in zip(means, margins)) and f.details["trend"]["t"] >= -3
    cb, _ = _fit(tmp_path, _BreastCancerMLP(lr=0.01), loader(x, y, batch_size=16), epochs=6, cbs=[HeadBiasInit()])
    assert [f.status for f in cb.findings] == ["pass"] and cb.findings[0].measured < 0.25 * entropy


def test_a_training_loss_with_an_auxiliary_term_is_not_judged_against_the_prior(tmp_path):
    """Class cross-entropy plus an auxiliary MSE on a noisy target: the training loss stays above log 4 for good
    (the auxiliary term's noise floor), but it starts far above the constant prediction's loss, so it is not compared
    with it; it decreases, and passes."""
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class MultiTask(TinyModel):
        def __init__(self):
            super().__init__(lr=3e-3)
            self.aux = nn.Linear(8, 1)

        def training_step(self, batch, batch_idx):
            x, y, z = batch
            return self.loss_fn(self(x), y) + F.mse_loss(self.aux(x), z)

    x, y = blobs(n=1024)
    z = x[:, :1] + 1.2 * torch.randn(len(x), 1, generator=torch.Generator().manual_seed(1))  # noise floor ~1.44
    cb, t = _fit(tmp_path, MultiTask(), DataLoader(TensorDataset(x, y, z), batch_size=32, shuffle=True), epochs=10)
    assert [f.status for f in cb.findings] == ["pass"]
    assert cb.losses[0] > 2 * cb.prior_loss and min(cb.losses[-32:]) > cb.prior_loss  # above the prior for good


class _RMSprop(TinyModel):
    def configure_optimizers(self):
        return torch.optim.RMSprop(self.parameters(), lr=self.lr)


def _seeded(cls, **kw):
    L.seed_everything(0, verbose=False)  # the initialisation decides how far the first steps throw the weights
    return cls(**kw)


def test_a_loss_that_blows_up_and_recovers_warns_in_both_modes(tmp_path):
    """RMSprop at lr=0.2 (20x its default): in the first steps the loss jumps to more than 100x its first value (1.39),
    then comes back down (far below the prior by the end), so the divergence test (it recovered), the decrease test
    and the comparison with the prior pass; the blow-up warns, without stopping the fit even in raise mode."""
    x, y = blobs(512)
    with pytest.warns(RecipeWarning, match="the loss blew up: it rose to"):
        cb, t = _fit(tmp_path, _seeded(_RMSprop, lr=0.2), loader(x, y), cbs=[HeadBiasInit()], check_every_n_steps=10)
    assert [f.status for f in cb.findings] == ["warn", "pass"] and t.global_step == 128
    f = cb.findings[0]
    ref = max(cb.losses[0], cb.prior_loss, cb.expected_initial_loss)
    assert f.check == "LossDecreaseCheck.blowup" and f.step == 10  # at the first read
    assert f.measured == max(cb.losses) == cb.losses[f.details["batch"]] and f.details["batch"] < 10
    assert f.expected == ref and f.details["growth"] == pytest.approx(f.measured / ref) and f.details["growth"] > 100
    assert f.details["consecutive_low"] > 10 * ref and f"x{f.details['growth']:.3g} the reference" in f.message
    assert cb.findings[1].measured < 0.1 * cb.prior_loss  # recovered: the end-of-fit mean is far below the prior
    cb, _ = _fit(tmp_path, _seeded(_RMSprop, lr=0.2), loader(x, y), cbs=[HeadBiasInit()], blowup_ratio=None)
    assert [f.status for f in cb.findings] == ["pass"]


class _Spiky(TinyModel):
    """Reports ``factor`` times its loss at the ``spikes`` steps (the gradient is the plain loss's): a loss curve that
    jumps and comes straight back, with the training itself untouched."""

    def __init__(self, spikes, factor=50.0):
        super().__init__()
        self.spikes, self.factor, self.raw = spikes, factor, []

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.raw.append(float(loss))
        return loss + (self.factor - 1) * loss.detach() if self.global_step in self.spikes else loss


def test_two_consecutive_high_losses_are_a_blow_up_and_one_is_not(tmp_path):
    x, y = blobs(512)
    cb, _ = _fit(tmp_path, _seeded(_Spiky, spikes={5}), loader(x, y), cbs=[HeadBiasInit()], check_every_n_steps=10)
    ref = max(cb.losses[0], cb.prior_loss, cb.expected_initial_loss)
    assert [f.status for f in cb.findings] == ["pass"] and cb.losses[5] > 10 * ref  # one batch: no blow-up
    with pytest.warns(RecipeWarning, match="the loss blew up"):
        model = _seeded(_Spiky, spikes={5, 6})
        cb, _ = _fit(tmp_path, model, loader(x, y), cbs=[HeadBiasInit()], check_every_n_steps=10)
    f = cb.findings[0]
    assert [g.status for g in cb.findings] == ["warn", "pass"] and f.details["batch"] in (5, 6)
    assert f.measured == pytest.approx(50 * model.raw[f.details["batch"]], rel=1e-6)
    assert f.expected == pytest.approx(max(model.raw[0], cb.prior_loss, cb.expected_initial_loss), rel=1e-6)
    assert f.details["consecutive_low"] == pytest.approx(50 * min(model.raw[5:7]), rel=1e-6)
    assert f.details["growth"] == pytest.approx(f.measured / f.expected) and f.details["growth"] > 10


def test_healthy_fits_do_not_warn_of_a_blow_up(tmp_path):
    """Adam and RMSprop at 1e-2: the loss never rises above its first value."""
    x, y = blobs(512)
    for cls in (TinyModel, _RMSprop):
        cb, _ = _fit(tmp_path, _seeded(cls, lr=1e-2), loader(x, y), cbs=[HeadBiasInit()], check_every_n_steps=10)
        assert [f.status for f in cb.findings] == ["pass"] and max(cb.losses) <= cb.losses[0] * 1.01


class _Reported(TinyModel):
    """Reports the given values instead of its loss at some steps (training itself is untouched): outlier batches."""

    def __init__(self, reported):
        super().__init__()
        self.reported, self.raw = reported, []

    def training_step(self, batch, batch_idx):
        loss = self.compute_loss(batch)
        self.raw.append(float(loss))
        value = self.reported.get(self.global_step)
        return loss if value is None else loss + (value - loss.detach())


def test_windows_pushed_to_the_prior_by_outliers_are_not_a_plateau(tmp_path):
    """A healthy fit (loss ~0.05 late) whose last window of 12 batches has one outlier batch that lifts its mean to the
    prior exactly (log 4 on balanced blobs): a noisy loss, not a plateau. The same outliers in the two last windows
    are at the prior too, but the flat span they end (w + max(w, warm-up / 2) = 44 batches) is far below it."""
    x, y = blobs(512)
    clean, _ = _fit(tmp_path, _seeded(_Reported, reported={}), loader(x, y), cbs=[HeadBiasInit()])
    w, n, prior = clean.window, len(clean.losses), clean.prior_loss
    assert (w, n) == (12, 128) and [f.status for f in clean.findings] == ["pass"]

    def lifting(window_end):  # the value at step window_end - 6 that makes the mean of that window the prior
        raw = clean.losses[window_end - w : window_end]
        return w * prior - (sum(raw) - raw[w // 2])

    one = {n - w // 2: lifting(n)}
    cb, _ = _fit(tmp_path, _seeded(_Reported, reported=one), loader(x, y), cbs=[HeadBiasInit()])
    assert sum(cb.losses[-w:]) / w == pytest.approx(prior, rel=1e-5)  # the last window is at the prior level...
    assert sum(cb.losses[-2 * w : -w]) / w < 0.2 * prior  # ... the one before far below it
    assert [f.status for f in cb.findings] == ["pass"]
    two = {**one, n - w - w // 2: lifting(n - w)}
    cb, _ = _fit(tmp_path, _seeded(_Reported, reported=two), loader(x, y), cbs=[HeadBiasInit()])
    assert sum(cb.losses[-2 * w : -w]) / w == pytest.approx(prior, rel=1e-5)
    # below the widest band the rule gives a level, 3 * plateau_rtol of the prior's distance to the floor
    assert sum(cb.losses[-44:]) / 44 < (1 - 3 * 0.05) * prior and [f.status for f in cb.findings] == ["pass"]


def _counts(n=4000, offset=3.0, seed=0):
    """Poisson counts (mean ~25) whose log-rate depends on the first features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    rate = torch.exp(offset + 0.5 * x[:, 0] - 0.4 * x[:, 1] + 0.3 * torch.sin(2 * x[:, 2]))
    return x, torch.poisson(rate, generator=g)


_NOISY = dict(window=12, warmup_steps=120)  # windows of 12 batches of 64 counts: a window's mean is noisy


class _Poisson(TinyModel):
    """A log-rate regressor under ``PoissonNLLLoss()`` (``full=False``: the loss omits ``log y!``, so it is negative
    and has no floor)."""

    def __init__(self):
        super().__init__(out_dim=1, loss_fn=nn.PoissonNLLLoss(), lr=1e-2)

    def forward(self, x):
        return self.net(x).squeeze(-1)


def test_large_counts_learned_are_no_plateau_and_shuffled_counts_are(tmp_path):
    """Mean count ~25: a batch's loss swings with its counts (standard error of a 12-batch window ~2.6), which the
    model's loss and the constant's share; the model learns a few nats per example, within 3 standard errors of one
    window's mean. The loss is flat over the last 72 batches, whose mean says it: no plateau. Counts shuffled
    against the inputs stay at the prior, which is ``ybar (1 - log ybar)`` for this loss, and fail."""
    x, y = _counts()
    ybar = float(y.mean())
    cb, _ = _fit(tmp_path, _Poisson(), loader(x, y, batch_size=64), epochs=4, **_NOISY)
    assert cb.prior_loss == pytest.approx(ybar * (1 - math.log(ybar)), rel=1e-4)
    assert [f.status for f in cb.findings] == ["pass"], cb.findings[0].message
    window = plateau_test(torch.tensor(cb.losses[-12:]), cb.prior_loss, None, 0.05, 3.0)
    span = plateau_test(torch.tensor(cb.losses[-72:]), cb.prior_loss, None, 0.05, 3.0)
    assert span["band"] < window["band"] / 2 and not span["plateau"]  # the span's mean is the tighter estimate
    assert cb.prior_loss - span["recent"] > 2 * span["band"] / 3  # below the prior by more than 2 standard errors
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    with pytest.raises(RecipeCheckError, match="learned only the label prior") as err:
        _fit(tmp_path, _Poisson(), loader(x, shuffled, batch_size=64), epochs=4, **_NOISY)
    assert "labels shuffled" in str(err.value)


class _Flat(TinyModel):
    """Automatic optimization that reports the same values as GAN(returns="equilibrium")."""

    def training_step(self, batch, batch_idx):
        super().training_step(batch, batch_idx)
        return torch.tensor(2 * math.log(2)) + 0.01 * torch.randn(()) + 0 * self.net[0].bias.sum()


def test_a_flat_loss_of_one_player_of_several_is_a_note_and_nan_still_fails(tmp_path):
    """Manual optimization with two optimizers (a GAN): training_step returns the discriminator's loss at its
    equilibrium, 2 log 2, flat: a note, not "did not decrease". The same flat loss under one optimizer fails; a NaN
    returned by the GAN still fails, and a loss a million times its equilibrium still warns."""
    x, y = blobs(n=512)
    cb, _ = _fit(tmp_path, GAN(returns="equilibrium"), loader(x, y))
    notes = {f.check: f for f in cb.findings if f.status == "note"}
    assert set(notes) == {"LossDecreaseCheck.decrease", "LossDecreaseCheck.plateau"}  # each once
    assert all("manual optimization with 2 optimizers" in f.message for f in notes.values())
    assert notes["LossDecreaseCheck.decrease"].measured == pytest.approx(2 * math.log(2), abs=0.01)
    assert not any(f.failed for f in cb.findings)
    with pytest.raises(RecipeCheckError, match="did not decrease"):
        _fit(tmp_path, _Flat(), loader(x, y))
    with pytest.raises(RecipeCheckError, match="became nan"):
        _fit(tmp_path, GAN(returns="equilibrium", nan_from=60), loader(x, y), check_every_n_steps=10)
    with pytest.warns(RecipeWarning, match="the loss blew up"):  # a million times the equilibrium: still a warning
        _fit(tmp_path, GAN(returns="equilibrium", blowup_from=60), loader(x, y), check_every_n_steps=10)


class _InfoNCE(TinyModel):
    """Labelled batches, no loss module, and a loss that never uses the labels: InfoNCE between two noisy views of
    each example (temperature 0.5), whose untrained value is about log(batch size)."""

    def __init__(self, together=False):
        super().__init__(out_dim=10)
        self.loss_fn, self.together = None, together

    def training_step(self, batch, batch_idx):
        x, _ = batch
        views = [x + 0.5 * torch.randn_like(x) for _ in range(2)]
        if self.together == "net":  # the network called directly, not forward: its head's output is seen
            a, b = (nn.functional.normalize(self.net(v), dim=1) for v in views)
        elif self.together:  # one forward of the 2N views: its output does not pair with the N labels at all
            a, b = nn.functional.normalize(self(torch.cat(views)), dim=1).chunk(2)
        else:
            a, b = (nn.functional.normalize(self(v), dim=1) for v in views)
        return nn.functional.cross_entropy(a @ b.T / 0.5, torch.arange(len(x)))


class _InlineCE(TinyModel):
    def __init__(self, via_net=False):
        super().__init__(out_dim=10)
        self.loss_fn, self.via_net = None, via_net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x) if self.via_net else self(x), y)


@pytest.mark.parametrize("together", [False, True, "net"])
def test_a_guessed_loss_that_training_step_does_not_compute_gives_notes(tmp_path, together):
    """No loss module: the cross-entropy over the batch's ten labels is a guess. An InfoNCE loss (the labels unused)
    stays above log 10, the guessed prior: a note, since the first step's loss is not the cross-entropy of the model's
    output in that step. An inline cross-entropy is the guess (the same number): its labels shuffled still fail."""
    x, y = blobs(n=1024, classes=10)
    cb, _ = _fit(tmp_path, _InfoNCE(together), loader(x, y, batch_size=64), epochs=8)
    notes = [f for f in cb.findings if f.status == "note"]
    assert notes and all("computes another loss" in f.message for f in notes) and not any(f.failed for f in cb.findings)
    assert min(cb.losses) > math.log(10)  # above the guessed prior all along
    via_net = together == "net"
    cb, _ = _fit(tmp_path, _InlineCE(via_net), loader(x, y, batch_size=64), epochs=8)
    assert [f.status for f in cb.findings] == ["pass"] and "_guess_off" not in vars(cb)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(RecipeCheckError, match="learned only the label prior"):
        _fit(tmp_path, _InlineCE(via_net), loader(x, shuffled, batch_size=64), epochs=8)


def test_probe_forwards_of_other_checks_do_not_stand_for_the_training_step():
    """The first step's output is taken from training_step's forward: another check's probe forward at the first
    batch (HeadBiasInit with a stream, under no_grad, on its own probe batch) is not recorded."""
    cb, model = LossDecreaseCheck(), TinyModel(out_dim=10)
    x, y = blobs(n=64, classes=10)
    cb._tap_guess(model, (x, y), model.net[-1])
    with torch.no_grad():
        model(x[:16])  # a probe
    out = model(x)  # training_step's
    handles, seen, targets = cb._guess_tap
    assert seen["model"].shape == (64, 10) and torch.equal(seen["model"], out) and torch.equal(seen["head"], out)
    for h in handles:
        h.remove()
