
import lightning as L
import numpy as np
import pytest
import torch
from helpers import TinyModel, blobs, loader, regression_data, trainer
from matplotlib.image import imread
from torch import nn

from lightning_recipe import PredictionDynamics, RecipeCheckError, RecipeConfigError, RecipeWarning, recommended, strict


def _not_blank(path):
    img = imread(path)
    return img.std() > 0.01 and (img[..., :3] < 0.5).mean() > 0.001  # varied pixels, some dark ink


def test_multiclass_records_true_class_probability(tmp_path):
    L.seed_everything(0)
    x, y = blobs(n=256)
    cb = PredictionDynamics(every_n_steps=4, num_samples=10)
    trainer(tmp_path, [cb], max_epochs=3).fit(TinyModel(), loader(x, y), loader(x[:64], y[:64], shuffle=False))
    d = np.load(tmp_path / "recipe" / "prediction_dynamics.npz")
    # one record at the start, then every 4 of the 24 batches
    assert d["values"].shape == (1 + 24 // 4, 10) and list(d["steps"]) == [0, 4, 8, 12, 16, 20, 24]
    assert np.array_equal(d["targets"], y[:10].numpy())  # the fixed batch is the first validation batch
    assert ((d["values"] >= 0) & (d["values"] <= 1)).all()
    assert d["values"][-1].mean() > d["values"][0].mean() + 0.3  # the model learns: p(true class) rises
    assert _not_blank(tmp_path / "recipe" / "prediction_dynamics.png")


def test_regression_records_predictions_that_approach_targets(tmp_path):
    L.seed_everything(0)
    x, y = regression_data(n=64, mean=3.0, scale=1.0)
    cb = PredictionDynamics(every_n_steps=10, num_samples=8)
    trainer(tmp_path, [cb], max_epochs=60).fit(
        TinyModel(out_dim=1, loss_fn=nn.MSELoss(), lr=1e-2), loader(x, y, batch_size=64, shuffle=False)
    )
    d = np.load(tmp_path / "recipe" / "prediction_dynamics.npz")
    assert d["values"].shape == (1 + 60 // 10, 8, 1)
    err0 = np.abs(d["values"][0, :, 0] - d["targets"][:, 0]).mean()
    err1 = np.abs(d["values"][-1, :, 0] - d["targets"][:, 0]).mean()
    assert err1 < 0.2 * err0
    assert _not_blank(tmp_path / "recipe" / "prediction_dynamics.png")


def test_binary_probabilities(tmp_path):
    x, y = blobs(n=128, classes=2)
    cb = PredictionDynamics(every_n_steps=2, num_samples=5)
    trainer(tmp_path, [cb], max_epochs=1).fit(
        TinyModel(out_dim=1, loss_fn=nn.BCEWithLogitsLoss()), loader(x, y.float().unsqueeze(1))
    )
    d = np.load(tmp_path / "recipe" / "prediction_dynamics.npz")
    assert d["values"].shape == (1 + 4 // 2, 5, 1) and ((d["values"] > 0) & (d["values"] < 1)).all()


def test_probe_does_not_change_training(tmp_path):
    class WithDropout(TinyModel):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))

    def run(cbs):
        L.seed_everything(0)
        m = WithDropout()
        x, y = blobs(n=256)
        trainer(tmp_path, cbs, max_epochs=2).fit(m, loader(x, y), loader(x[:64], y[:64]))
        return m.state_dict()

    a, b = run([]), run([PredictionDynamics(every_n_steps=3)])
    assert all(torch.equal(a[k], b[k]) for k in a)


class _StopAfter(L.Callback):
    """Stops the fit after ``n`` batches, as early stopping would, without telling Lightning's plan."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.n:
            trainer.should_stop = True


def test_default_spacing_keeps_even_records_when_the_fit_stops_early(tmp_path):
    """Lightning's default max_epochs=1000 plans 8,000 batches here; the fit stops after 1,200. The spacing is capped
    at one epoch (8 batches, raised to the floor of 10) and doubled when the records pass 100: 0..1000 every 10 make
    101 records, thinned to every 20, then 1020..1200."""
    x, y = blobs(64)
    cb = PredictionDynamics(num_samples=4)
    t = trainer(tmp_path, [cb, _StopAfter(1200)], max_epochs=None)
    t.fit(TinyModel(), loader(x, y, batch_size=8))
    assert t.global_step == 1200
    assert cb.steps == list(range(0, 1201, 20))
    assert len(cb.values) == len(cb.steps) == 61
    short = PredictionDynamics(num_samples=4)
    trainer(tmp_path / "short", [short], max_epochs=5).fit(TinyModel(), loader(x, y, batch_size=8))
    assert short.steps == [0, 10, 20, 30, 40]  # 40 planned batches: every max(10, ceil(40 / 50))


class _FunctionalDropout(TinyModel):
    """Broken: ``F.dropout`` without ``training=self.training`` also drops units in eval mode."""

    def forward(self, x):
        h = torch.nn.functional.dropout(self.net[1](self.net[0](x)), 0.3)
        return self.net[2](h)


class _DropoutForcedOn(TinyModel):
    """Broken: a Dropout module switched back to train mode inside forward."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 4))

    def forward(self, x):
        self.net[2].train()
        return self.net(x)


class _Dropout(_DropoutForcedOn):
    def forward(self, x):
        return self.net(x)


def _eval_mode(tmp_path, model, on_fail="warn", **kw):
    L.seed_everything(0)
    x, y = blobs(n=128)
    cb = PredictionDynamics(every_n_steps=4, on_fail=on_fail, **kw)
    trainer(tmp_path, [cb], max_steps=2).fit(model, loader(x, y))
    return next(f for f in cb.findings if f.check == "PredictionDynamics.eval_mode")


def test_randomness_in_eval_mode_fails_and_names_where_it_starts(tmp_path):
    with pytest.warns(RecipeWarning, match="EVAL mode"):
        f = _eval_mode(tmp_path, _FunctionalDropout())
    assert f.status == "fail" and "`net.2`, and its input differs" in f.message
    assert f.measured > f.expected > 0 and "F.dropout" in f.causes[0]
    assert "eval_mode=False" in f.message  # the way out for a model that samples on purpose
    f = _eval_mode(tmp_path, _DropoutForcedOn())
    assert f.status == "fail" and "`net.2`, on the same input: the module itself is random" in f.message
    # nn.Dropout, switched off by eval(): two forwards agree exactly
    f = _eval_mode(tmp_path, _Dropout())
    assert f.status == "pass" and f.measured == 0.0


def test_eval_randomness_hidden_by_a_zero_head_and_a_scripted_submodule(tmp_path):
    """The modules are compared one by one: dropout left on before a zero-initialised head still shows; a scripted
    submodule (which takes no hook) does not stop the records."""
    model = _FunctionalDropout()
    torch.nn.init.zeros_(model.net[2].weight)  # the predictions are the bias alone, whatever the dropout does
    f = _eval_mode(tmp_path, model)
    assert f.status == "fail" and f.measured == 0.0 and f.details["first_module"] == "net.2"
    scripted = _Dropout()
    scripted.net[0] = torch.jit.script(scripted.net[0])
    L.seed_everything(0)
    x, y = blobs(n=128)
    cb = PredictionDynamics(every_n_steps=4, head="net.3")  # given: head detection hooks every biased module
    trainer(tmp_path, [cb], max_steps=8).fit(scripted, loader(x, y))
    assert [f.status for f in cb.findings] == ["pass", "pass"] and cb.steps[:2] == [0, 4]


class _Dropout50(TinyModel):
    """Broken: ``F.dropout(x, 0.5)`` in forward drops half the hidden units in eval mode too."""

    def forward(self, x):
        return self.net[2](torch.nn.functional.dropout(self.net[1](self.net[0](x)), 0.5))


def _preset_fit(tmp_path, callbacks, model):
    L.seed_everything(0)
    x, y = blobs(n=128)
    trainer(tmp_path, callbacks, max_steps=2).fit(model, loader(x, y))
    return next(f for cb in callbacks[0].callbacks for f in cb.findings if f.check == "PredictionDynamics.eval_mode")


def test_eval_randomness_raises_in_strict_and_warns_in_recommended(tmp_path):
    others = ["DataCheck", "HeadBiasInit", "OutputRangeCheck", "InitialLossCheck", "BatchIndependenceCheck",
              "ParameterUpdateCheck", "LossDecreaseCheck", "InputDependenceCheck", "OptimizationHealthCheck",
              "ReproducibilityCheck"]  # PredictionDynamics alone, as the presets build it
    with pytest.raises(RecipeCheckError, match="EVAL mode") as err:
        _preset_fit(tmp_path, strict(exclude=others), _Dropout50())
    assert "F.dropout" in str(err.value) and "eval_mode=False" in str(err.value)
    with pytest.warns(RecipeWarning, match="EVAL mode"):
        f = _preset_fit(tmp_path, recommended(exclude=others), _Dropout50())
    # two masks of p=0.5 disagree on about half the hidden units: far beyond the 1e-3 relative tolerance
    assert f.status == "fail" and f.measured > 100 * f.expected > 0
    f = _preset_fit(tmp_path, strict(exclude=others), _Dropout())  # nn.Dropout is off in eval: identical forwards
    assert f.status == "pass" and f.measured == 0.0


def test_eval_mode_comparison_can_be_switched_off(tmp_path):
    f = _eval_mode(tmp_path, _Dropout50(), on_fail="raise", eval_mode=False)  # a model that samples on purpose
    assert f.status == "skip" and "eval_mode=False" in f.message
    with pytest.raises(RecipeConfigError, match="`eval_mode`"):
        PredictionDynamics(eval_mode="no")
