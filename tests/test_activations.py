import math
import warnings

import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer
from sklearn.datasets import load_digits
from torch import nn

from lightning_recipe.checks.activations import ActivationCheck
from lightning_recipe.exceptions import RecipeCheckError, RecipeWarning

EDGE = math.atanh(0.99)  # |pre-activation| beyond which |tanh| > 0.99


def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


class Net(TinyModel):
    """``TinyModel`` with any ``net``; ``net[-1]`` is the head."""

    def __init__(self, net, loss_fn=None, forward=None):
        super().__init__(loss_fn=loss_fn)
        self.net = net
        self._fwd = forward

    def forward(self, x):
        return self._fwd(self, x) if self._fwd is not None else self.net(x)


def _fit(tmp_path, model, dl, **kw):
    cb = ActivationCheck(**kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], max_steps=1).fit(model, dl)
    by = {f.check.split(".")[-1]: f for f in cb.findings}
    return by, [w for w in caught if issubclass(w.category, RecipeWarning)]


def _healthy(by, warned):
    assert not warned, [str(w.message) for w in warned]
    assert {f.status for f in by.values()} <= {"pass", "note"}, [f.message for f in by.values()]


def _gaussian(n=256, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    return x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()


def _digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp(min=1e-6)
    return x[:512], torch.tensor(y[:512])


@pytest.mark.parametrize(("act", "edge"), [(nn.Tanh, EDGE), (nn.Sigmoid, math.log(0.99 / 0.01))])
def test_large_weights_saturate_as_the_closed_form_says(tmp_path, act, edge):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), act(), nn.Linear(64, 4))
    with torch.no_grad():
        nn.init.normal_(net[0].weight, 0.0, 3.0)
        net[0].bias.zero_()
    x, y = _gaussian()
    by, warned = _fit(tmp_path, Net(net), loader(x, y, batch_size=256))
    f = by["saturation"]
    assert f.status == "warn" and len(warned) == 1 and f"`net.1` ({act.__name__}) is saturated" in f.message
    measured = f.details["layers"]["net.1"]["saturated"]
    # x ~ N(0, I): unit j's pre-activation is N(0, |w_j|^2) -> saturated share 2 * (1 - Phi(edge / |w_j|))
    norms = net[0].weight.detach().double().norm(dim=1)
    closed = sum(2 * (1 - _phi(edge / float(s))) for s in norms) / len(norms)
    assert abs(measured - closed) < 0.02, (measured, closed)
    s = 3.0 * math.sqrt(8)  # the std of the pre-activations: 3 * sqrt(fan_in) = 8.49
    assert abs(f.details["layers"]["net.1"]["pre_activation_std"] - s) < 0.15 * s
    # one s for all units (tanh 0.755, sigmoid 0.588): looser, the norms of 8 weights spread by ~25% around s
    assert abs(measured - 2 * (1 - _phi(edge / s))) < 0.08
    assert abs(f.details["closed_form"] - 2 * (1 - _phi(edge / f.details["layers"]["net.1"]["pre_activation_std"]))) < 1e-9
    assert f.measured > 0.5 and f.expected == 0.5
    assert by["dead"].status == "pass"


def test_unscaled_inputs_into_a_tanh_warn(tmp_path):
    x, y = load_digits(return_X_y=True)  # raw pixel values 0..16
    x, y = torch.tensor(x, dtype=torch.float32)[:512], torch.tensor(y)[:512]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))  # default init
    by, warned = _fit(tmp_path, Net(net), loader(x, y, batch_size=128))
    f = by["saturation"]
    assert f.status == "warn" and len(warned) == 1
    assert f.details["layers"]["net.1"]["pre_activation_std"] > 3.92  # the std at which half saturate
    # the same net on standardised pixels: pre-activation std ~0.55, 2 * (1 - Phi(2.647 / 0.55)) ~ 1e-6
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
    by, warned = _fit(tmp_path, Net(net), loader(*_digits(), batch_size=128))
    _healthy(by, warned)
    v = by["saturation"].details["layers"]["net.1"]
    assert v["pre_activation_std"] < 1 and v["saturated"] < 0.01


def test_tanh_with_xavier_init_and_default_init_pass(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain("tanh"))
    x, y = _digits()
    by, warned = _fit(tmp_path, Net(net), loader(x, y, batch_size=128))
    _healthy(by, warned)
    assert by["saturation"].status == "pass"
    # Xavier with the tanh gain 5/3 gives pre-activations of std <= 5/3 on unit-variance inputs: at most
    # 2 * (1 - Phi(2.647 / 1.667)) = 11% saturated; few examples with half of their units saturated
    for v in by["saturation"].details["layers"].values():
        s = v["pre_activation_std"]
        assert s < 5 / 3 and v["saturated"] < 2 * (1 - _phi(EDGE / s)) + 0.02 < 0.12
        assert v["examples_over_half"] < 0.05  # threshold 0.5 (an outlier digit with rare pixels: 1 of 128)


@pytest.mark.parametrize("inplace", [False, True])  # an in-place ReLU overwrites its input: measured before the call
def test_relu_made_dead_by_a_large_negative_bias_fails_naming_it(tmp_path, inplace):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(inplace), nn.Linear(32, 32), nn.ReLU(inplace), nn.Linear(32, 4))
    with torch.no_grad():
        net[2].bias.fill_(-100.0)
    x, y = blobs(n=128)
    with pytest.raises(RecipeCheckError, match=r"`net.3` \(ReLU\) outputs exactly 0 for every probe example"):
        _fit(tmp_path, Net(net), loader(x, y))
    by, warned = _fit(tmp_path, Net(net), loader(x, y), on_fail="warn")
    f = by["dead"]
    assert f.status == "fail" and len(warned) == 1
    assert f.details["zero_layers"] == ["net.3"] and f.details["signal_cut"] is True
    # the depth note sees the collapse too: the last hidden std is 0
    assert by["depth"].details["stds"]["net.3"] == 0.0


def test_partly_dead_relu_is_a_note(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        net[0].bias[:24] = -100.0  # 24 of 32 units dead on every example, 8 alive: the signal passes
    x, y = blobs(n=128)
    by, warned = _fit(tmp_path, Net(net), loader(x, y))
    _healthy(by, warned)
    f = by["dead"]
    assert f.status == "note" and f.details["partly_dead"] == {"net.1": 24 / 32} and "(75%)" in f.message


def test_relu_mlp_with_default_init_passes(tmp_path):
    x, y = _digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    by, warned = _fit(tmp_path, Net(net), loader(x, y, batch_size=64))
    _healthy(by, warned)
    assert all(f.status == "pass" for f in by.values())
    stds = by["depth"].details["stds"]
    assert list(stds) == ["net.0", "net.1", "net.2", "net.3"]  # execution order, the head left out
    assert 1e-3 < by["depth"].measured < 1e3


def test_zero_initialised_head_passes(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        net[2].weight.zero_()
    x, y = blobs(n=128)
    by, warned = _fit(tmp_path, Net(net), loader(x, y))
    _healthy(by, warned)
    assert by["dead"].status == "pass"


class Residual(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        nn.init.zeros_(self.branch[2].weight)  # zero-init the branch's last layer: the block starts as the identity
        nn.init.zeros_(self.branch[2].bias)

    def forward(self, x):
        return x + self.branch(x)


def test_zero_initialised_residual_branch_is_a_note(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), Residual(32), Residual(32), nn.Linear(32, 4))
    x, y = blobs(n=128)
    by, warned = _fit(tmp_path, Net(net), loader(x, y))
    _healthy(by, warned)
    f = by["dead"]
    assert f.status == "note" and f.details["signal_cut"] is False
    assert f.details["zero_layers"] == ["net.1.branch.2", "net.2.branch.2"]
    # the depth ratio is taken over the layers that vary: the branches' zero outputs are no collapse
    d = by["depth"]
    stds = d.details["stds"]
    assert stds["net.1.branch.2"] == 0.0 and stds["net.2.branch.2"] == 0.0
    assert d.status == "pass" and d.measured == pytest.approx(stds["net.2.branch.1"] / stds["net.0"])


def test_zero_initialised_non_residual_layer_cutting_the_signal_fails(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    nn.init.zeros_(net[2].weight)
    x, y = blobs(n=128)
    by, _ = _fit(tmp_path, Net(net), loader(x, y), on_fail="warn")
    assert by["dead"].status == "fail" and "`net.2` (Linear)" in by["dead"].message


def test_signal_cut_by_a_functional_operation_is_a_note(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    x, y = blobs(n=128)
    by, warned = _fit(tmp_path, Net(net, forward=lambda m, x: m.net[2](m.net[1](m.net[0](x)) * 0)), loader(x, y))
    _healthy(by, warned)  # the cut is between leaves: no layer to name, a note
    assert by["dead"].status == "note" and by["dead"].details["signal_cut"] is True


class BNBlock(nn.Module):
    def __init__(self, c, zero_gamma=False):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        if zero_gamma:
            nn.init.zeros_(self.bn.weight)  # "zero-init the last BN gamma" of each residual block

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


@pytest.mark.parametrize("zero_gamma", [False, True])
def test_cnn_with_batchnorm_passes(tmp_path, zero_gamma):
    x, y = _digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        BNBlock(8, zero_gamma), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    by, warned = _fit(tmp_path, Net(net), loader(x, y, batch_size=64))
    _healthy(by, warned)
    assert by["dead"].status == ("note" if zero_gamma else "pass")


def test_batchnorm_cnn_on_uncentred_pixels_has_no_dead_units_at_init(tmp_path):
    """Pixels in [0, 1] (not centred): with BatchNorm's initial running statistics (mean 0, var 1) an eval-mode probe
    passes the convolutions' raw outputs to the ReLU, where a filter of mostly negative weights is negative on every
    example; training normalises with the batch's statistics, and so does the probe at init: no unit is dead."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x[:512], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0, torch.tensor(y[:512])
    torch.manual_seed(0)  # in eval mode this init leaves 50.1% of the first ReLU's units zero on all 8 examples
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))
    model = Net(net)
    by, warned = _fit(tmp_path, model, loader(x, y, batch_size=8))
    _healthy(by, warned)
    assert by["dead"].status == "pass" and by["dead"].details["partly_dead"] == {}, by["dead"].message
    assert model.net[1].num_batches_tracked.item() == 1  # the one training step: the probe's update was undone
    assert model.net[1].training  # and its mode restored


def test_lstm_classifier_passes(tmp_path):
    x, y = _digits()
    torch.manual_seed(0)

    class LSTMNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(8, 32, batch_first=True)
            self.head = nn.Linear(32, 10)

        def forward(self, x):
            out, _ = self.lstm(x.reshape(-1, 8, 8))
            return self.head(out[:, -1])

    by, warned = _fit(tmp_path, Net(LSTMNet()), loader(x, y, batch_size=64))
    _healthy(by, warned)
    assert by["saturation"].status == "pass"  # the gates are inside nn.LSTM, not leaf modules


def test_transformer_encoder_passes(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 20, (256, 12), generator=g)
    y = (tokens[:, 0] % 4).long()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 32)
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, activation="gelu", batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(32, 4)

        def forward(self, t):
            return self.head(self.enc(self.emb(t)).mean(1))

    by, warned = _fit(tmp_path, Net(Encoder()), loader(tokens, y))
    _healthy(by, warned)


def test_no_observer_effect(tmp_path):
    x, y = _gaussian()

    def run(with_check):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.3), nn.Tanh(), nn.Linear(32, 4))
        model = Net(net)
        cbs = [ActivationCheck(on_fail="warn")] if with_check else []
        trainer(tmp_path, cbs, max_steps=5).fit(model, loader(x, y))
        assert all(not m._forward_hooks for m in model.modules())  # hooks removed
        return [p.detach().clone() for p in model.parameters()]

    a, b = run(True), run(False)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_three_findings_once_and_done_in_the_checkpoint(tmp_path):
    x, y = blobs(n=64)
    cb = ActivationCheck()
    trainer(tmp_path, [cb], max_steps=2).fit(TinyModel(), loader(x, y))
    assert [f.check for f in cb.findings] == ["ActivationCheck.saturation", "ActivationCheck.depth",
                                              "ActivationCheck.dead"]
    assert cb.state_dict() == {"done": True}


def test_one_host_sync(tmp_path, monkeypatch):
    from test_sync import _SyncCounter

    counts = []

    class Counted(ActivationCheck):
        def _probe(self, *args, **kwargs):
            counter = _SyncCounter()
            counter.start()
            try:
                return super()._probe(*args, **kwargs)
            finally:
                counter.stop()
                counts.append(counter.count)

    x, y = blobs(n=64)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    cb = Counted()
    trainer(tmp_path, [cb], max_steps=3).fit(Net(net), loader(x, y))
    assert counts == [1] and len(cb.findings) == 3  # the probe, once, one transfer of every number
