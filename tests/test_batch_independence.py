import lightning as L
import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer
from torch import nn

from lightning_recipe.batch_independence import BatchIndependenceCheck, batch_leaks, future_leaks
from lightning_recipe.exceptions import RecipeCheckError, RecipeWarning


class CentredModel(TinyModel):
    """Broken: subtracts the batch mean, so every output depends on every example."""

    def forward(self, x):
        return self.net(x - x.mean(0))


class BatchNormModel(TinyModel):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))


class SequenceModel(TinyModel):
    """Inputs (N, T, F); the time mean is taken on a (T, N, F) view: `view` (broken) or `transpose` (healthy)."""

    def __init__(self, use_view: bool):
        super().__init__(in_dim=3)
        self.use_view = use_view

    def forward(self, x):
        n, t, f = x.shape
        h = x.view(t, n, f) if self.use_view else x.transpose(0, 1)
        return self.net(h.mean(0))


def _fit(tmp_path, model, dl, **kw):
    cb = BatchIndependenceCheck(**kw)
    trainer(tmp_path, [cb], max_steps=1).fit(model, dl)
    return cb


def test_pure_functions():
    r = batch_leaks(torch.tensor([0.1, 3.0, 0.0, 0.2]), 1)
    assert r["leaking"] == [0, 3] and r["ratio"] == pytest.approx(0.2 / 3.0)
    assert batch_leaks(torch.zeros(3), 0) == {"leaking": [], "ratio": 0.0, "own": 0.0}
    assert future_leaks(torch.tensor([1.0, 2.0, 1e-9, 0.0]), 1)["leaking"] == []


@pytest.mark.parametrize("model_cls", [TinyModel, BatchNormModel])
def test_healthy_models_pass(tmp_path, model_cls):
    x, y = blobs(n=64)
    cb = _fit(tmp_path, model_cls(), loader(x, y))
    f = cb.findings[0]
    assert f.status == "pass"
    assert f.measured == 0.0  # exactly zero gradient outside each example
    assert f.details["batch_size"] == 32 and f.details["examples"] == [0, 16, 31]


def test_batch_mean_fails_with_closed_form_ratio(tmp_path):
    x, y = blobs(n=64)
    with pytest.raises(RecipeCheckError, match="examples of the batch are mixed") as err:
        _fit(tmp_path, CentredModel(), loader(x, y))
    assert "x - x.mean(0)" in str(err.value)


def test_batch_mean_measured_numbers(tmp_path):
    x, y = blobs(n=64)
    with pytest.warns(RecipeWarning, match="depends on examples"):
        cb = _fit(tmp_path, CentredModel(), loader(x, y), on_fail="warn")
    f = cb.findings[0]
    assert f.status == "fail"
    # d out_i / d x_j = -1/N * g for j != i, (1 - 1/N) * g for j == i: ratio 1 / (N - 1), every other example leaks
    assert f.measured == pytest.approx(1 / 31, rel=1e-4)
    assert f.details["leaks"]["0"] == list(range(1, 32))


def test_view_instead_of_transpose_fails_and_transpose_passes(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, 3, generator=g), torch.randint(0, 4, (64,), generator=g)
    cb = _fit(tmp_path, SequenceModel(use_view=False), loader(x, y))
    assert cb.findings[0].status == "pass" and cb.findings[0].measured == 0.0
    cb = _fit(tmp_path, SequenceModel(use_view=True), loader(x, y), on_fail="warn", num_examples=1)
    f = cb.findings[0]
    assert f.status == "fail"
    # view(T, N, F) of a contiguous (N, T, F) tensor: row n of the time mean reads flat rows n, N + n, ..., 4N + n of
    # the (N*T, F) array, i.e. examples (n + kN) // T: for n = 0 and N = 32, T = 5 that is examples 0, 6, 12, 19, 25
    assert f.details["leaks"]["0"] == [6, 12, 19, 25]
    assert f.measured == pytest.approx(1.0)  # each of them weighs as much as example 0 itself


def test_training_is_untouched(tmp_path):
    x, y = blobs(n=64)
    weights = []
    for cbs in ([], [BatchIndependenceCheck()]):
        L.seed_everything(0)
        m = BatchNormModel()
        trainer(tmp_path, cbs, max_steps=3).fit(m, loader(x, y))
        weights.append(torch.cat([p.detach().flatten() for p in m.state_dict().values() if p.is_floating_point()]))
    assert torch.equal(weights[0], weights[1])


class TokenModel(L.LightningModule):
    """Next-token model: embedding + one self-attention layer; `causal` toggles the attention mask."""

    def __init__(self, causal: bool, vocab: int = 11, dim: int = 16):
        super().__init__()
        self.causal = causal
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(32, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, vocab)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, ids):
        t = ids.shape[1]
        h = self.emb(ids) + self.pos(torch.arange(t, device=ids.device))
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=ids.device), 1) if self.causal else None
        a, _ = self.attn(h, h, h, attn_mask=mask, need_weights=False)
        return self.head(h + a)

    def training_step(self, batch, batch_idx):
        ids, tgt = batch
        return self.loss_fn(self(ids).flatten(0, 1), tgt.flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _tokens():
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 11, (32, 9), generator=g)
    return loader(seq[:, :-1], seq[:, 1:], batch_size=8)


def test_causal_mode(tmp_path):
    cb = _fit(tmp_path, TokenModel(causal=True), _tokens(), causal=True)
    f = cb.findings[0]
    assert f.status == "pass" and f.measured == 0.0 and f.details["max_future_ratio"] == 0.0
    assert f.details["wrt"] == "the output of `emb`"  # token ids: through the embedding that consumes them
    cb = _fit(tmp_path, TokenModel(causal=False), _tokens(), causal=True, on_fail="warn")
    f = cb.findings[0]
    assert f.status == "fail" and "sees the future" in f.message
    assert f.details["future"]["0,0"] == list(range(1, 8))  # position 0 attends to every later position
    assert 0.01 < f.details["max_future_ratio"] <= 1.0
    assert "leaks" not in f.details  # examples stay independent


def test_causal_needs_time_axis(tmp_path):
    x, y = blobs(n=64)
    with pytest.raises(Exception, match="causal=True"):
        _fit(tmp_path, TinyModel(), loader(x, y), causal=True)


def test_pickle_and_state():
    import pickle

    cb = pickle.loads(pickle.dumps(BatchIndependenceCheck(causal=True, num_examples=2)))
    assert cb.causal and cb.num_examples == 2 and cb.state_dict() == {"done": False}
