import lightning as L
import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer
from torch import nn

from lightning_recipe.exceptions import RecipeCheckError
from lightning_recipe.checks.input_dependence import InputDependenceCheck
from lightning_recipe.functional.input_dependence import input_dependence_test, per_example_loss


class IgnoresInput(TinyModel):
    """Broken: a learned constant plus 0 * x."""

    def __init__(self, lr: float = 1e-2):
        super().__init__(lr=lr)
        self.const = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.const + 0.0 * self.net(x)


def _fit(tmp_path, model, train, val=None, max_steps=100, **kw):
    cb = InputDependenceCheck(**kw)
    trainer(tmp_path, [cb], max_steps=max_steps, max_epochs=-1, num_sanity_val_steps=1 if val else 0,
            limit_val_batches=1 if val else 0).fit(model, train, val)
    return cb.findings[0]


def test_healthy_blobs_pass(tmp_path):
    L.seed_everything(0)
    x, y = blobs(n=512)
    f = _fit(tmp_path, TinyModel(), loader(x, y), after_steps=60)
    assert f.status == "pass" and f.step == 60
    d = f.details
    assert d["source"] == "training" and d["examples"] == 32
    assert d["prior"] == pytest.approx(1.386, abs=0.05)  # about balanced 4 classes: about log 4 on 32 labels
    assert d["real"] < 0.2 and d["zeroed"] > d["prior"]  # zero input: worse than the prior
    assert f.measured == pytest.approx(d["zeroed"] - d["real"]) and f.measured > f.expected
    assert f.measured >= 0.5 * d["advantage"] > 0  # zeroing the inputs costs at least half of what they gain


def test_model_ignoring_input_fails(tmp_path):
    L.seed_everything(0)
    x, y = blobs(n=512)
    with pytest.raises(RecipeCheckError, match="do not change at all when the inputs are zeroed") as err:
        _fit(tmp_path, IgnoresInput(), loader(x, y), after_steps=60)
    assert "the model ignores its input" in str(err.value)
    f = _fit(tmp_path, IgnoresInput(lr=5e-2), loader(x, y), after_steps=60, on_fail="warn")
    assert f.measured == 0.0 and f.details["max_output_change"] == 0.0
    assert f.details["real"] == pytest.approx(f.details["prior"], abs=0.05)  # it learned the label prior only


def test_noise_inputs_fail_on_validation_batch(tmp_path):
    L.seed_everything(0)
    g = torch.Generator().manual_seed(1)
    x, y = blobs(n=384)
    noise = torch.randn(384, 8, generator=g)  # the pipeline feeds a tensor unrelated to the labels
    f = _fit(tmp_path, TinyModel(), loader(noise[:256], y[:256]), loader(noise[256:], y[256:], batch_size=128),
             min_steps=20, on_fail="warn")  # default: the first epoch end with >= 20 batches
    assert f.status == "fail" and f.details["source"] == "validation" and f.details["examples"] == 128
    assert f.step == 24  # 8 batches per epoch: the 3rd epoch end is the first after 20 batches
    assert f.measured < f.expected and f.details["advantage"] < 0.05  # real inputs gain nothing over the prior
    # the same model and labels with the real inputs passes on its validation batch
    f = _fit(tmp_path, TinyModel(), loader(x[:256], y[:256]), loader(x[256:], y[256:], batch_size=128), min_steps=20)
    assert f.status == "pass" and f.details["source"] == "validation" and f.details["advantage"] > 1.0


def test_too_short_is_a_skip(tmp_path):
    x, y = blobs(n=64)
    f = _fit(tmp_path, TinyModel(), loader(x, y), max_steps=3, after_steps=10)
    assert f.status == "skip" and "after 3 batches" in f.message


def test_pure_functions():
    # zeroing costs 0.2 of a gain of 1.0, not significantly (3 standard errors = 0.3): not used
    r = input_dependence_test(torch.tensor([1.0, 1.0]), torch.tensor([1.1, 1.3]), torch.tensor([2.0, 2.0]))
    assert r["difference"] == pytest.approx(0.2) and r["advantage"] == 1.0 and r["se"] == pytest.approx(0.1)
    assert not r["uses_input"]
    # two noisy examples (not significant), but zeroing costs twice the gain over the prior: used
    r = input_dependence_test(torch.tensor([0.1, 0.9]), torch.tensor([1.9, 1.1]), torch.tensor([1.0, 1.0]))
    assert r["difference"] == pytest.approx(1.0) and r["advantage"] == pytest.approx(0.5) and 3 * r["se"] > 1.0
    assert r["uses_input"]
    out = torch.zeros(4, 3)
    assert per_example_loss(nn.CrossEntropyLoss(), out, torch.tensor([0, 1, 2, 0]), 2).tolist() == pytest.approx(
        [1.0986] * 2, abs=1e-4)


def test_pickle_and_state():
    import pickle

    cb = pickle.loads(pickle.dumps(InputDependenceCheck(after_steps=7)))
    cb.load_state_dict({"done": False, "batches": 5})
    assert cb.after_steps == 7 and cb.state_dict() == {"done": False, "batches": 5}


def test_nan_weights_are_a_skip_naming_the_cause_not_a_verdict(tmp_path):
    """A NaN loss makes every weight NaN: there is no loss to compare, and the message says so."""

    class NaNAfter(TinyModel):
        def training_step(self, batch, batch_idx):
            loss = self.compute_loss(batch)
            return loss * float("nan") if batch_idx == 3 else loss

    L.seed_everything(0)
    x, y = blobs(n=512)
    f = _fit(tmp_path, NaNAfter(), loader(x, y), after_steps=10)
    assert f.status == "skip" and "own outputs are NaN/Inf on 32 of them: the weights are probably NaN" in f.message
    assert "LossDecreaseCheck.finite" in f.message


def test_a_model_that_normalises_its_input_gets_the_baseline_hint(tmp_path):
    class Normalises(TinyModel):
        def forward(self, x):
            return self.net(x / x.norm(dim=1, keepdim=True))  # zeroed inputs: 0 / 0

    L.seed_everything(0)
    x, y = blobs(n=512)
    f = _fit(tmp_path, Normalises(), loader(x, y), after_steps=10)
    assert f.status == "skip" and "zeroed inputs give NaN/Inf on 32 of them" in f.message and "`baseline=`" in f.message


def test_token_ids_zeroed_to_padding_get_the_padding_hint(tmp_path):
    class MaskedMean(TinyModel):  # mean of the embeddings of the non-padding tokens: all padding gives 0 / 0
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8, padding_idx=0)

        def forward(self, x):
            keep = (x != 0).float().unsqueeze(-1)
            return self.net((self.emb(x) * keep).sum(1) / keep.sum(1))

    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 20, (512, 6), generator=g)
    y = (x[:, 0] % 4).long()
    f = _fit(tmp_path, MaskedMean(), loader(x, y), after_steps=10)
    assert f.status == "skip" and "zeroed inputs give NaN/Inf on 32 of them" in f.message
    assert "padding id" in f.message and "`baseline=`" in f.message
