import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyModel, blobs, loader, regression_data, trainer
from torch import nn

from lightning_recipe.exceptions import RecipeCheckError, RecipeWarning
from lightning_recipe.checks.output_range import OutputRangeCheck
from lightning_recipe.functional.output_range import class_like_targets, probability_rows, squashed_by


class SoftmaxClassifier(TinyModel):
    """Like Lightning's test helper `ClassificationModel`: softmax in forward, then `F.cross_entropy`."""

    def __init__(self):
        super().__init__()
        del self.loss_fn  # functional loss only: the check infers cross-entropy from the class-index targets

    def forward(self, x):
        return F.softmax(self.net(x), dim=1)

    def compute_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self(x), y)


class SigmoidBinary(TinyModel):
    def __init__(self, scale: float = 1.0):
        super().__init__(out_dim=1, loss_fn=nn.BCEWithLogitsLoss())
        self.scale = scale

    def forward(self, x):
        return torch.sigmoid(self.scale * self.net(x))


def _fit(tmp_path, model, dl, **kw):
    cb = OutputRangeCheck(**kw)
    trainer(tmp_path, [cb], max_steps=1).fit(model, dl)
    return cb.findings[0]


def _binary():
    x, y = blobs(n=128, classes=2)
    return loader(x, y.float().unsqueeze(1))


def test_double_softmax_fails_and_logits_pass(tmp_path):
    x, y = blobs(n=128)
    with pytest.raises(RecipeCheckError, match="double softmax") as err:
        _fit(tmp_path, SoftmaxClassifier(), loader(x, y))
    assert "inferred" in str(err.value)
    with pytest.warns(RecipeWarning):
        f = _fit(tmp_path, SoftmaxClassifier(), loader(x, y), on_fail="warn")
    assert f.status == "fail" and f.measured < 1e-6  # rows sum to 1 up to round-off
    assert 0 <= f.details["min"] and f.details["max"] <= 1
    f = _fit(tmp_path, TinyModel(), loader(x, y))
    assert f.status == "pass" and f.details["sums_to_one"] is False and f.details["min"] < 0


def test_double_sigmoid(tmp_path):
    with pytest.raises(RecipeCheckError, match="`sigmoid` of the head's output"):
        _fit(tmp_path, SigmoidBinary(), _binary())
    # not a function of the head alone: found by running the model on inputs scaled by +-10
    f = _fit(tmp_path, SigmoidBinary(scale=2.0), _binary(), on_fail="warn")
    assert f.status == "fail" and f.details["bounded_under_scaling"] is True and f.details["squashed_by"] is None
    f = _fit(tmp_path, TinyModel(out_dim=1, loss_fn=nn.BCEWithLogitsLoss()), _binary())
    assert f.status == "pass" and f.details["squashed_by"] is None


def test_logits_inside_unit_interval_are_not_a_double_sigmoid(tmp_path):
    m = TinyModel(out_dim=1, loss_fn=nn.BCEWithLogitsLoss())
    with torch.no_grad():
        m.net[2].weight.mul_(0.01)
        m.net[2].bias.fill_(0.5)  # every initial logit near 0.5, inside [0, 1]
    f = _fit(tmp_path, m, _binary())  # the head's own output: logits by construction
    assert f.status == "pass" and f.details["in_unit"] is True and "head's own output" in f.message

    class Halved(TinyModel):  # not the head's own output: the +-1000 scaling tells, the outputs leave [0, 1]
        def forward(self, x):
            return 0.5 * self.net(x)

    m2 = Halved(out_dim=1, loss_fn=nn.BCEWithLogitsLoss())
    m2.load_state_dict(m.state_dict())
    f = _fit(tmp_path, m2, _binary())
    assert f.status == "pass" and f.details["in_unit"] is True and f.details["bounded_under_scaling"] is False


@pytest.mark.parametrize(("fn", "status"), [(F.softmax, "fail"), (F.log_softmax, "pass"), (None, "fail")])
def test_nll_needs_log_probabilities(tmp_path, fn, status):
    class Model(TinyModel):
        def forward(self, x):
            z = self.net(x)
            return fn(z, dim=1) if fn is not None else z

    x, y = blobs(n=128)
    f = _fit(tmp_path, Model(loss_fn=nn.NLLLoss()), loader(x, y), on_fail="warn")
    assert f.status == status
    if fn is F.log_softmax:
        assert f.measured < 1e-5  # logsumexp of log-probabilities is 0


def test_class_labels_regressed_with_mse_are_a_note(tmp_path):
    x, y = blobs(n=256)
    with warnings.catch_warnings():  # ratings and counts regressed on purpose look the same: a note, never a warning
        warnings.simplefilter("error", RecipeWarning)
        f = _fit(tmp_path, TinyModel(out_dim=1, loss_fn=nn.MSELoss()), loader(x, y.float().unsqueeze(1)))
    assert f.status == "note" and f.measured == 4.0 and f.details["values"] == [0.0, 1.0, 2.0, 3.0]
    assert "look like class labels" in f.message
    x, y = regression_data(n=256)
    f = _fit(tmp_path, TinyModel(out_dim=1, loss_fn=nn.MSELoss()), loader(x, y))
    assert f.status == "pass" and f.measured == 256.0


def test_pure_functions():
    assert probability_rows(torch.tensor([[0.5, 0.5]]))["max_sum_error"] == 0.0
    z = torch.tensor([[1.0, -2.0]])
    assert squashed_by(torch.softmax(z, -1) + 0.1, z) is None
    assert not class_like_targets(torch.tensor([1.0, 2.0, 3.0]))["class_like"]  # too few labels per value
    assert class_like_targets(torch.arange(10).repeat(5), integer_dtype=True)["distinct"] == 10


def test_pickle_and_state():
    import pickle

    cb = pickle.loads(pickle.dumps(OutputRangeCheck(max_classes=5)))
    cb.load_state_dict({"done": True})
    assert cb.max_classes == 5 and cb.state_dict() == {"done": True}


def test_head_output_inside_unit_interval_of_a_scale_invariant_model_is_logits(tmp_path):
    """A LayerNorm on the inputs makes the outputs bounded under the +-1000 scaling (they flip with the sign but stay
    inside [0, 1]); they are still the last Linear's own output, i.e. logits."""
    class Normalised(TinyModel):
        def __init__(self, squash: bool):
            super().__init__(out_dim=1, loss_fn=nn.BCEWithLogitsLoss())
            self.norm, self.squash = nn.LayerNorm(8), squash
            with torch.no_grad():
                self.net[2].weight.mul_(0.01)
                self.net[2].bias.fill_(0.5)

        def forward(self, x):
            z = self.net(self.norm(x))
            return torch.sigmoid(2 * z) if self.squash else z

    f = _fit(tmp_path, Normalised(squash=False), _binary())
    assert f.status == "pass" and f.details["in_unit"] is True and "head's own output" in f.message
    assert 0.4 < f.details["min"] <= f.details["max"] < 0.6  # 0.5 +- 0.01 * |h|: inside [0, 1], as the bug's would be
    with pytest.warns(RecipeWarning, match="double sigmoid"):  # a sigmoid after the head is still suspected
        f = _fit(tmp_path, Normalised(squash=True), _binary(), on_fail="warn")
    assert f.status == "warn" and f.details["bounded_under_scaling"] is None  # barely moves: cannot tell, so a warning


# -- the output's range vs the targets' range ---------------------------------------------------------------------
class Regressor(TinyModel):
    """A regression MLP; ``final`` is appended to ``net`` (a module), ``post`` applied to its output in forward."""

    def __init__(self, out_dim=1, final=None, post=None):
        super().__init__(out_dim=out_dim, loss_fn=nn.MSELoss())
        if final is not None:
            self.net.append(final)
        self.post = post

    def forward(self, x):
        z = self.net(x)
        return self.post(z) if self.post is not None else z


def _standardized(n=512):
    x, y = regression_data(n=n)
    return x, (y - y.mean()) / y.std(unbiased=False)


def _reach(tmp_path, model, x, y, **kw):
    cb = OutputRangeCheck(**kw)
    trainer(tmp_path, [cb], max_steps=1).fit(model, loader(x, y))
    return next(f for f in cb.findings if f.check == "OutputRangeCheck.target_range")


@pytest.mark.parametrize(("final", "post", "lo", "hi", "name"), [
    (nn.Sigmoid(), None, 0.0, 1.0, "Sigmoid"),
    (nn.ReLU(), None, 0.0, float("inf"), "ReLU"),
    (None, torch.sigmoid, 0.0, 1.0, "sigmoid of"),  # a functional activation after the head
])
def test_bounded_output_on_standardized_targets_fails(tmp_path, final, post, lo, hi, name):
    x, y = _standardized()
    f = _reach(tmp_path, Regressor(final=final, post=post), x, y, on_fail="warn")
    outside = ((y < lo) | (y > hi)).double().mean().item()  # the share out of reach, counted on the targets
    clipped = y.clamp(lo, hi)
    floor = ((y - clipped) ** 2).mean().item() / y.var(unbiased=False).item()  # closed form of the MSE floor
    assert f.status == "fail" and name in f.message and "HINT: remove the final activation" in f.message
    assert f.measured == pytest.approx(outside, abs=1e-12) and 0.4 < f.measured < 0.7 and f.expected == 0.05
    assert f.details["floor"] == pytest.approx(floor, rel=1e-6) and f.details["floor"] > 0.4
    assert "standardized" in f.causes[0]
    with pytest.raises(RecipeCheckError, match="confined to"):
        _reach(tmp_path, Regressor(final=final, post=post), x, y)


def test_tanh_on_unscaled_pixel_targets_fails_and_a_scaled_tanh_passes(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=g)
    y = (255 * torch.rand(512, 1, generator=g)).round()  # pixel values in [0, 255]
    f = _reach(tmp_path, Regressor(post=torch.tanh), x, y, on_fail="warn")
    assert f.status == "fail" and "tanh of `net.2`" in f.message and "[-1, 1]" in f.message
    assert f.measured == pytest.approx((y > 1).double().mean().item()) and f.measured > 0.98  # 0 and 1 are in reach
    assert f.details["mean_outside"] is True
    f = _reach(tmp_path, Regressor(post=lambda h: 127.5 * (1 + torch.tanh(h))), x, y)
    assert f.status == "pass" and "affine of tanh" in f.message and f.measured == 0.0
    assert f.details["interval"] == pytest.approx([0.0, 255.0], abs=1e-3)  # [-1, 1] mapped through 127.5 * (1 + .)
    f = _reach(tmp_path, Regressor(final=nn.Tanh(), post=lambda t: 127.5 * t + 127.5), x, y)  # after the module
    assert f.status == "pass" and "affine of the output of `net.3` (Tanh)" in f.message


def test_healthy_output_ranges_pass(tmp_path):
    g = torch.Generator().manual_seed(1)
    x = torch.rand(512, 8, generator=g)
    pixels = torch.where(x < 0.3, torch.zeros_like(x), x)  # an autoencoder of pixels in [0, 1], 30% exactly 0
    f = _reach(tmp_path, Regressor(out_dim=8, final=nn.Sigmoid()), x, pixels)
    assert f.status == "pass" and f.measured == 0.0 and f.details["high"] == "1"
    xs, ys = _standardized()
    f = _reach(tmp_path, Regressor(), xs, ys)  # a linear head: unbounded
    assert f.status == "pass" and "unbounded" in f.message and not f.details["bounded"]
    tanh_y = (ys / 3).clamp(-1, 1)
    f = _reach(tmp_path, Regressor(final=nn.Tanh()), xs, tanh_y)
    assert f.status == "pass" and f.measured == 0.0
    half = ys / 2  # standardised and halved: 4.6% of a Gaussian beyond [-1, 1], inside the 5% allowed
    f = _reach(tmp_path, Regressor(post=torch.tanh), xs, half)
    assert f.status == "pass" and f.measured == pytest.approx((half.abs() > 1).double().mean().item())
    assert 0.02 < f.measured < 0.05
    rate = 30 * torch.exp(xs[:, :1] / 4)
    counts = torch.poisson(rate, generator=g)  # positive counts, many distinct values (not class-like)
    assert counts.unique().numel() > 20
    f = _reach(tmp_path, Regressor(post=F.softplus), xs, counts)
    assert f.status == "pass" and "softplus of `net.2`" in f.message and f.details["low"] == "0"


def test_output_interval_pure():
    from lightning_recipe.functional.output_range import activation_range, affine_fit, out_of_reach, output_interval

    assert activation_range(nn.Hardtanh(-2.0, 3.0)) == (-2.0, 3.0) and activation_range(nn.ReLU6()) == (0.0, 6.0)
    h = torch.randn(32, 2, generator=torch.Generator().manual_seed(0)).double()
    lo, hi, what, _ = output_interval(-2 * torch.sigmoid(h) + 1, [(nn.Linear(3, 2), h)])
    assert lo.tolist() == pytest.approx([-1.0, -1.0]) and hi.tolist() == pytest.approx([1.0, 1.0])  # a < 0 flips
    assert "sigmoid" in what
    assert output_interval(h ** 3, [(nn.Linear(3, 2), h)]) is None  # not a recognised transform: not measured
    saturated = 127.5 * (1 + torch.tanh(h + 200))  # a head bias at the target mean saturates a scaled tanh: 255 always
    assert output_interval(saturated, [(nn.Linear(3, 2), h)]) is None  # a constant fits any affine: not measured
    assert affine_fit(h, torch.ones_like(h)) is None  # a constant column fits anything
    r = out_of_reach(torch.tensor([[0.0], [1.0], [2.0], [-1.0]]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert r["share"] == 0.5 and r["floor"] == pytest.approx(2 / 4 / 1.25)  # bounds count as reachable
