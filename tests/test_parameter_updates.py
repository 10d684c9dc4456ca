import lightning as L
import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer
from torch import nn

from lightning_recipe.exceptions import RecipeCheckError, RecipeWarning
from lightning_recipe.checks.parameter_updates import ParameterUpdateCheck
from lightning_recipe.functional.parameter_updates import gradient_growth


def _fit(tmp_path, model, dl=None, max_steps=8, **kw):
    cb = ParameterUpdateCheck(**kw)
    if dl is None:
        x, y = blobs(n=256)
        dl = loader(x, y)
    trainer(tmp_path, [cb], max_steps=max_steps, max_epochs=max_steps).fit(model, dl)
    return cb


def _by_check(cb):
    return {f.check: f for f in cb.findings}


class UnusedAndDetached(TinyModel):
    """Broken: `unused` never runs; `enc` is cut from the loss by `.detach()`."""

    def __init__(self):
        super().__init__(in_dim=8)
        self.enc = nn.Linear(8, 8)
        self.unused = nn.Linear(8, 8)

    def forward(self, x):
        return self.net(x + self.enc(x).detach())


class SwappedHead(TinyModel):
    """Broken: the optimizer is built, then the head is replaced: the new head is in no parameter group."""

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        self.net[2] = nn.Linear(32, 4)
        return opt


class Manual(TinyModel):
    """Manual optimization; `zero` toggles `zero_grad`, `hooks` toggles `manual_backward` vs `loss.backward()`."""

    def __init__(self, zero: bool, hooks: bool = True):
        super().__init__(lr=1e-3, optimizer="sgd")
        self.automatic_optimization = False
        self.zero, self.hooks = zero, hooks

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        if self.zero:
            opt.zero_grad()
        loss = self.compute_loss(batch)
        self.manual_backward(loss) if self.hooks else loss.backward()
        opt.step()
        return loss


def test_healthy_model_passes(tmp_path):
    cb = _fit(tmp_path, TinyModel())
    f = _by_check(cb)
    assert f["ParameterUpdateCheck"].status == "pass"
    assert f["ParameterUpdateCheck"].details["parameters"] == 4 and f["ParameterUpdateCheck"].details["steps"] == 5
    assert f["ParameterUpdateCheck.zero_grad"].status == "pass"
    assert cb._initial == []  # the copies are freed after the check


def test_unused_and_detached_layers_are_named(tmp_path):
    with pytest.raises(RecipeCheckError, match="never received a non-zero gradient") as err:
        _fit(tmp_path, UnusedAndDetached())
    for name in ("enc.weight", "enc.bias", "unused.weight", "unused.bias"):
        assert f"`{name}`" in str(err.value)
    assert "4 of 8 trainable parameters" in str(err.value)
    cb = _fit(tmp_path, UnusedAndDetached(), on_fail="warn", ignore=["unused.*", "enc.*"])
    assert _by_check(cb)["ParameterUpdateCheck"].details["parameters"] == 4


def test_head_swapped_after_optimizer(tmp_path):
    with pytest.warns(RecipeWarning, match="in no optimizer parameter group"):
        cb = _fit(tmp_path, SwappedHead(), on_fail="warn")
    f = cb.findings[-1]
    assert f.status == "fail" and f.measured == 2.0
    assert f.details["not_in_optimizer"] == ["net.2.weight", "net.2.bias"]
    assert f.details["no_gradient"] == [] and f.details["not_changed"] == []


class WithEMA(TinyModel):
    """An EMA of the network kept inside the module (torch's ``AveragedModel``: a deep copy whose parameters keep
    ``requires_grad=True``), updated after every batch unless ``update=False``; the optimizer holds the network's
    parameters, or every parameter of the module (``all_params``: the copy's then never get a gradient)."""

    def __init__(self, update: bool = True, all_params: bool = False):
        super().__init__()
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.999))
        self.update, self.all_params = update, all_params

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.update:
            self.ema.update_parameters(self.net)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters() if self.all_params else self.net.parameters(), lr=self.lr)


@pytest.mark.parametrize("all_params", [False, True])
def test_an_ema_copy_updated_outside_the_optimizer_passes_and_one_never_updated_fails(tmp_path, all_params):
    cb = _fit(tmp_path, WithEMA(all_params=all_params))
    f = _by_check(cb)["ParameterUpdateCheck"]
    ema = ["ema.module.0.weight", "ema.module.0.bias", "ema.module.2.weight", "ema.module.2.bias"]
    assert f.status == "pass", f.message
    assert f.details["updated_outside_optimizer"] == ema and f.details["not_in_optimizer"] == []
    assert f.details["no_gradient"] == [] and "the 4 other trainable parameters received gradients" in f.message
    assert "Changed by the training code outside any optimizer" in f.message and "`ema.module.0.weight`" in f.message
    # the same copy left at its initial values (update_parameters never called) is what the check exists for
    with pytest.warns(RecipeWarning, match="never received a non-zero gradient" if all_params else
                      "in no optimizer parameter group"):
        cb = _fit(tmp_path, WithEMA(update=False, all_params=all_params), on_fail="warn")
    f = _by_check(cb)["ParameterUpdateCheck"]
    assert f.status == "fail" and f.measured == 4.0 and f.details["updated_outside_optimizer"] == []
    assert f.details["no_gradient" if all_params else "not_in_optimizer"] == ema


def test_learning_rate_zero_group_is_a_warning(tmp_path):
    class Frozen(TinyModel):
        def configure_optimizers(self):
            return torch.optim.SGD([{"params": self.net[0].parameters(), "lr": 0.0},
                                    {"params": self.net[2].parameters(), "lr": 0.1}])

    cb = _fit(tmp_path, Frozen())
    f = _by_check(cb)["ParameterUpdateCheck"]
    assert f.status == "warn" and f.details["lr_zero"] == ["net.0.weight", "net.0.bias"]


def test_missing_zero_grad_in_manual_optimization(tmp_path):
    cb = _fit(tmp_path, Manual(zero=True))
    f = _by_check(cb)["ParameterUpdateCheck.zero_grad"]
    assert f.status == "pass" and f.measured < 1.5
    with pytest.warns(RecipeWarning, match="gradients are not zeroed"):
        cb = _fit(tmp_path, Manual(zero=False), on_fail="warn")
    f = cb.findings[-1]
    assert f.status == "fail" and f.details["stale"] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert f.details["growth"] > 3.0  # ~ linear growth over 5 steps


def test_missing_zero_grad_without_hooks_uses_growth(tmp_path):
    x, y = blobs(n=32)
    dl = loader(x, y, batch_size=32)  # constant data: one batch per epoch
    cb = _fit(tmp_path, Manual(zero=True, hooks=False), dl)
    f = _by_check(cb)["ParameterUpdateCheck.zero_grad"]
    assert f.status == "pass" and f.measured == pytest.approx(1.0, abs=0.05)
    cb = _fit(tmp_path, Manual(zero=False, hooks=False), dl, on_fail="warn")
    f = cb.findings[-1]
    assert f.status == "fail" and "grew at every optimizer step" in f.message
    assert f.measured == pytest.approx(5.0, rel=0.05)  # sum of 5 almost equal gradients
    assert f.expected == 3.0


def test_gradient_growth_closed_forms():
    assert gradient_growth([1, 2, 3, 4, 5])["growth"] == 5.0
    assert not gradient_growth([1, 2, 3, 4, 5], [1, 4, 9, 16, 25])["accumulating"]  # diverging loss
    assert not gradient_growth([1, 2])["accumulating"]


class TwoOptimizers(TinyModel):
    """Healthy GAN-like manual loop: the second loss also flows into the first optimizer's parameters."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x, y = batch
        opt_a.zero_grad()
        self.manual_backward(self.loss_fn(self(x), y))
        opt_a.step()
        opt_b.zero_grad()
        self.manual_backward(-self.loss_fn(self(x), y) * 0.01)
        opt_b.step()

    def configure_optimizers(self):
        return (torch.optim.SGD(self.net[2].parameters(), lr=1e-2), torch.optim.SGD(self.net[0].parameters(), lr=1e-2))


def test_two_optimizers_healthy(tmp_path):
    cb = _fit(tmp_path, TwoOptimizers())
    f = _by_check(cb)
    assert f["ParameterUpdateCheck"].status == "pass" and f["ParameterUpdateCheck.zero_grad"].status == "pass"
    assert f["ParameterUpdateCheck"].details["steps"] == 6  # 3 batches x 2 optimizers, checked at >= 5


def test_pickle_and_state(tmp_path):
    import pickle

    cb = pickle.loads(pickle.dumps(ParameterUpdateCheck(steps=3, ignore="aux.*")))
    assert cb.steps == 3 and cb.ignore == ["aux.*"]
    cb.load_state_dict({"done": True})
    trainer(tmp_path, [cb], max_steps=2).fit(TinyModel(), loader(*blobs(n=64)))
    assert cb.findings == []  # done before (a resumed fit): not redone


def test_fingerprint_sees_any_change_and_stays_small():
    from lightning_recipe.functional.parameter_updates import tensor_fingerprint

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 1000, generator=g) * 0.02
    a = tensor_fingerprint(w)
    assert a.shape == (68,) and a.dtype == torch.float64 and torch.equal(tensor_fingerprint(w), a)
    sampled = set(torch.linspace(0, w.numel() - 1, 64, dtype=torch.float64).round().long().tolist())
    i = next(k for k in range(1000, w.numel()) if k not in sampled and abs(float(w.view(-1)[k])) > 0.01)
    b = w.clone()
    b.view(-1)[i] = torch.nextafter(b.view(-1)[i], torch.tensor(1.0))  # one float32 ulp, one unsampled element
    d = tensor_fingerprint(b) != a
    assert d[1] and not d[4:].any()  # the float64 sum moved; no sampled element did
    j = next(k for k in range(i + 1, w.numel()) if k not in sampled and float(w.view(-1)[k]) != float(w.view(-1)[i]))
    b = w.clone()
    b.view(-1)[[i, j]] = b.view(-1)[[j, i]]  # a swap keeps the sum and the sum of squares, not the weighted sum
    assert bool((tensor_fingerprint(b) != a)[3])
    for t in (torch.randn(7, 9).t(), torch.randn(300).half(), torch.randn(300).bfloat16(), torch.randn(300, 2,
              dtype=torch.complex64), torch.zeros(0), torch.randn(5)):
        f = tensor_fingerprint(t)
        assert f.numel() <= 68 and torch.equal(tensor_fingerprint(t), f)
    assert tensor_fingerprint(torch.randn(5)).numel() == 4 + 5  # a small tensor is kept whole


class EmbeddingBag(L.LightningModule):
    """Token ids -> mean embedding -> linear; `zero_before_step` breaks it: gradients zeroed after they are read."""

    def __init__(self, zero_before_step: bool = False):
        super().__init__()
        self.emb = nn.Embedding(500, 8)
        self.head = nn.Linear(8, 4)
        self.zero_before_step = zero_before_step

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return nn.functional.cross_entropy(self(ids), y)

    def on_before_optimizer_step(self, optimizer):
        if self.zero_before_step:
            for p in self.parameters():
                p.grad.zero_()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_sparse_update_of_unsampled_rows_counts_as_a_change(tmp_path):
    """Every batch uses one token whose embedding row holds no sampled element: only that row moves, and the float64
    checksums see it. With the gradients zeroed after the check read them, nothing moves: a failure."""
    n = 500 * 8
    sampled = set(torch.linspace(0, n - 1, 64, dtype=torch.float64).round().long().tolist())
    row = next(r for r in range(500) if not sampled & set(range(8 * r, 8 * r + 8)))
    ids, y = torch.full((64, 3), row), torch.arange(64) % 4
    L.seed_everything(0)
    model = EmbeddingBag()
    before = model.emb.weight.detach().clone()
    cb = _fit(tmp_path, model, loader(ids, y, batch_size=8))
    f = _by_check(cb)["ParameterUpdateCheck"]
    assert f.status == "pass" and f.details["not_changed"] == []
    moved = (model.emb.weight.detach() != before).any(1).nonzero().flatten().tolist()
    assert moved == [row]  # a sparse update: one row of 500, none of its elements sampled
    with pytest.warns(RecipeWarning, match="received gradients but did not change"):
        cb = _fit(tmp_path, EmbeddingBag(zero_before_step=True), loader(ids, y, batch_size=8), on_fail="warn")
    f = cb.findings[-1]
    assert f.status == "fail" and f.details["not_changed"] == ["emb.weight", "head.weight", "head.bias"]
