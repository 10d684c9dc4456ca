import shutil

import lightning as L
import pytest
import torch
from helpers import TinyModel, blobs, loader, trainer
from torch import nn

from lightning_recipe.checks.batch_independence import BatchIndependenceCheck
from lightning_recipe.functional.batch_independence import batch_leaks, future_leaks
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
    # positions 0, 2, 4, 6 on examples 0, 2, 5, 7, in one backward: each attends to every later position
    assert f.details["future"] == {"0,0": list(range(1, 8)), "2,2": list(range(3, 8)), "5,4": [5, 6, 7], "7,6": [7]}
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


def _char_windows(t: int = 16, stride: int = 24, n: int = 64):
    """Character windows of Python stdlib source (``json.decoder``) as ids: ``(n, t + 1)``, and the vocabulary size."""
    import inspect
    import json.decoder

    text = inspect.getsource(json.decoder)
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    starts = torch.arange(n) * stride
    return ids[starts[:, None] + torch.arange(t + 1)], len(vocab)


class CharTransformer(L.LightningModule):
    """A character LM: embedding, positions, one nn.TransformerEncoder layer; `causal` toggles the mask."""

    def __init__(self, vocab: int, causal: bool, dim: int = 16):
        super().__init__()
        self.causal = causal
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(32, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, ids):
        t = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device) if self.causal else None
        return self.head(self.encoder(self.emb(ids) + self.pos[:t], mask=mask, is_causal=self.causal))

    def training_step(self, batch, batch_idx):
        ids, tgt = batch
        return self.loss_fn(self(ids).flatten(0, 1), tgt.flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class LookAhead(CharTransformer):
    """Broken: the representation of position t adds the embedding of position t + 1 (the next target)."""

    def __init__(self, vocab: int):
        super().__init__(vocab, causal=True)
        self.mlp = nn.Sequential(nn.Linear(16, 16), nn.Tanh())

    def forward(self, ids):
        e = self.emb(ids)
        return self.head(self.mlp(e + nn.functional.pad(e[:, 1:], (0, 0, 0, 1))))


def test_causal_mode_turns_on_for_next_token_targets(tmp_path):
    """A transformer LM without its causal mask, under the default arguments (as in `recommended()`): caught."""
    w, vocab = _char_windows()
    data = loader(w[:, :-1], w[:, 1:], batch_size=16)
    L.seed_everything(0)
    cb = _fit(tmp_path, CharTransformer(vocab, causal=True), data)
    f = cb.findings[0]
    assert f.status == "pass" and f.measured == 0.0 and f.details["max_future_ratio"] == 0.0
    assert f.details["causal"] == "auto" and f.details["next_token_fraction"] == 1.0
    assert "turned on automatically" in f.message and "`causal=False`" in f.message
    assert "4 positions, one per example" in f.message
    with pytest.warns(RecipeWarning, match="sees the future") as rec:
        cb = _fit(tmp_path, CharTransformer(vocab, causal=False), data, on_fail="warn")
    f = cb.findings[0]
    assert f.status == "fail" and f.details["causal"] == "auto" and "leaks" not in f.details
    assert any("turned on automatically" in str(r.message) for r in rec if r.category is RecipeWarning)
    # positions 0, 5, 9, 14 on examples 0, 5, 10, 15 of the 16: each attends to every later position
    assert f.details["future"] == {"0,0": list(range(1, 16)), "5,5": list(range(6, 16)), "10,9": list(range(10, 16)),
                                   "15,14": [15]}
    assert f.measured == f.details["max_future_ratio"] and 0.01 < f.measured <= 1.0


def test_look_ahead_measured_exactly_and_causal_false_turns_it_off(tmp_path):
    w, vocab = _char_windows()
    data = loader(w[:, :-1], w[:, 1:], batch_size=16)
    cb = _fit(tmp_path, LookAhead(vocab), data, on_fail="warn", num_positions=2)
    f = cb.findings[0]
    assert f.status == "fail" and f.details["future"] == {"0,0": [1], "15,14": [15]}
    # output t sees e_t + e_{t+1} through the same path: the gradient on position t + 1 equals the one on t
    assert f.measured == pytest.approx(1.0, rel=1e-6)
    cb = _fit(tmp_path, LookAhead(vocab), data, causal=False)
    f = cb.findings[0]
    assert f.status == "pass" and not f.details["causal"] and "automatically" not in f.message


def test_causal_mode_stays_off_for_other_targets(tmp_path):
    """Per-position targets that are not the inputs shifted by one, and per-example targets: no causal mode."""
    w, vocab = _char_windows()
    cb = _fit(tmp_path, LookAhead(vocab), loader(w[:, :-1], (w[:, :-1] + 1) % vocab, batch_size=16))
    f = cb.findings[0]
    assert f.status == "pass" and not f.details["causal"] and "automatically" not in f.message
    x, y = blobs(n=64)
    f = _fit(tmp_path, TinyModel(), loader(x, y)).findings[0]
    assert f.status == "pass" and not f.details["causal"]


def test_causal_probe_leaves_training_untouched(tmp_path):
    w, vocab = _char_windows()
    weights = []
    for cbs in ([], [BatchIndependenceCheck(on_fail="warn")]):
        L.seed_everything(0)
        m = CharTransformer(vocab, causal=False)
        trainer(tmp_path, cbs, max_steps=3).fit(m, loader(w[:, :-1], w[:, 1:], batch_size=16))
        weights.append(torch.cat([p.detach().flatten() for p in m.state_dict().values()]))
    assert cbs[0].findings[0].details["causal"] == "auto" and torch.equal(weights[0], weights[1])


class PrefixLM(CharTransformer):
    """A prefix language model: the first `prefix` positions attend to the whole prefix (both ways, on purpose: they
    carry no label), the rest causally."""

    def __init__(self, vocab: int, prefix: int = 6):
        super().__init__(vocab, causal=True)
        self.prefix = prefix

    def forward(self, ids):
        t = ids.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        mask[: self.prefix, : self.prefix] = 0.0  # the prefix sees itself whole
        return self.head(self.encoder(self.emb(ids) + self.pos[:t], mask=mask))


def test_an_unlabelled_prefix_that_sees_both_ways_is_not_a_causal_leak(tmp_path):
    w, vocab = _char_windows()
    y = w[:, 1:].clone()
    y[:, :6] = -100  # the loss is on the continuation only
    cb = _fit(tmp_path, PrefixLM(vocab), loader(w[:, :-1], y, batch_size=16), num_positions=4)
    f = cb.findings[0]
    assert f.status == "pass" and f.details["causal"] == "auto" and f.details["next_token_fraction"] == 1.0
    assert f.details["max_future_ratio"] == 0.0
    # the same model with every position labelled: its prefix positions do see later ones
    cb = _fit(tmp_path, PrefixLM(vocab), loader(w[:, :-1], w[:, 1:], batch_size=16), on_fail="warn", num_positions=4)
    f = cb.findings[0]
    assert f.status == "fail" and any(int(k.split(",")[1]) < 5 for k in f.details["future"])


class Stateful(TinyModel):
    """BatchNorm, a frozen bias, a frozen (eval) BatchNorm, and buffers that a differentiable forward changes: one in
    place, one by replacing it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.BatchNorm1d(32),
                                 nn.ReLU(), nn.Linear(32, 4))
        self.net[0].bias.requires_grad_(False)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("cache", torch.zeros(4))

    def forward(self, x):
        if torch.is_grad_enabled():
            self.calls += 1
            self.cache = self.cache + 1
        return self.net(x)


class _Snapshot(L.Callback):
    """At on_train_start: gives every parameter a known `.grad` and freezes net.4 in eval (`before`), or records the
    model's state (`after`)."""

    def __init__(self, before: bool):
        self.before, self.state = before, None

    def on_train_start(self, trainer, pl_module):
        if self.before:
            pl_module.net[4].eval()
            for k, p in enumerate(pl_module.parameters()):
                p.grad = torch.full_like(p, float(k))
        self.state = {
            "grads": [(p.grad, p.grad.clone()) for p in pl_module.parameters()],
            "flags": [p.requires_grad for p in pl_module.parameters()],
            "modes": [m.training for m in pl_module.modules()],
            "buffers": {k: (b, b.clone()) for k, b in pl_module.named_buffers()},
        }


def test_the_model_is_probed_in_place_and_left_as_it_was(tmp_path):
    """No copy: flags, modes, buffers (objects and values) and every parameter's `.grad` are as before the probe."""
    x, y = blobs(n=64)
    before, after, cb = _Snapshot(True), _Snapshot(False), BatchIndependenceCheck()
    trainer(tmp_path, [before, cb, after], max_steps=1).fit(Stateful(), loader(x, y))
    f = cb.findings[0]
    assert f.status == "pass" and f.measured == 0.0 and f.details["examples"] == [0, 16, 31]
    a, b = before.state, after.state
    assert a["flags"] == b["flags"] and a["flags"].count(False) == 1
    assert a["modes"] == b["modes"] and a["modes"].count(False) == 1  # net.4 stays in eval, the rest in train
    for (g0, v0), (g1, v1) in zip(a["grads"], b["grads"]):
        assert g1 is g0 and torch.equal(v1, v0)
    assert a["buffers"].keys() == b["buffers"].keys()
    for k, (t0, v0) in a["buffers"].items():
        t1, v1 = b["buffers"][k]
        assert t1 is t0 and torch.equal(v1, v0), k
    assert float(a["buffers"]["calls"][1]) == 0.0  # the probe's forward did count (and was put back)


def test_a_scripted_submodule_is_probed_and_a_scripted_embedding_skips(tmp_path):
    x, y = blobs(n=64)
    model = TinyModel()
    model.net[0] = torch.jit.script(nn.Linear(8, 32))
    f = _fit(tmp_path, model, loader(x, y)).findings[0]
    assert f.status == "pass" and f.measured == 0.0
    model = TokenModel(causal=True)
    model.emb = torch.jit.script(nn.Embedding(11, 16))
    f = _fit(tmp_path, model, _tokens(), causal=True).findings[0]  # not an nn.Embedding any more
    assert f.status == "skip" and "no embedding consumed the inputs (8, 8)" in f.message and "`embedding=`" in f.message
    f = _fit(tmp_path, model, _tokens(), causal=True, embedding="emb").findings[0]
    assert f.status == "skip" and "takes no forward hook" in f.message and "`embedding=`" in f.message


class _MaskedPool(L.LightningModule):
    """Attention pooling over a padded set: batches ``((x, mask), y)``; ``mix=True`` takes the softmax over the batch."""

    def __init__(self, mix: bool = False) -> None:
        super().__init__()
        self.enc, self.score, self.head = nn.Linear(4, 8), nn.Linear(8, 1), nn.Linear(8, 3)
        self.loss_fn, self.mix = nn.CrossEntropyLoss(), mix

    def forward(self, inputs):
        x, mask = inputs
        h = torch.tanh(self.enc(x))  # (N, T, 8)
        s = self.score(h).squeeze(-1).masked_fill(~mask, -1e9)  # (N, T)
        w = torch.softmax(s, dim=0 if self.mix else 1)
        return self.head((w.unsqueeze(-1) * h).sum(1))

    def training_step(self, batch, batch_idx):
        return self.loss_fn(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _sets(n: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, 4, generator=g)
    mask = torch.arange(6).expand(n, 6) < torch.randint(2, 7, (n, 1), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    from torch.utils.data import DataLoader, TensorDataset

    collate = lambda items: ((torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items])),  # noqa: E731
                             torch.stack([i[2] for i in items]))
    return DataLoader(TensorDataset(x, mask, y), batch_size=16, collate_fn=collate)


@pytest.mark.parametrize("mix", [False, True])
def test_tuple_inputs_with_a_mask_are_probed(tmp_path, mix):
    cb = BatchIndependenceCheck(on_fail="warn")
    t = trainer(tmp_path, [cb], max_steps=1)
    t.fit(_MaskedPool(mix), _sets())
    (f,) = cb.findings
    assert f.status == ("fail" if mix else "pass"), f.message
    assert f.details["batch_size"] == 16
    if mix:  # a softmax over the batch: every output depends on every other example
        assert "examples of the batch are mixed" in f.message and f.measured > 1e-3
    else:
        assert f.measured <= cb.rtol


class _CompiledMLP(TinyModel):
    """The network wrapped with ``torch.compile`` (inductor) in ``__init__``, as the Lightning docs show; a graph
    compiled by inductor donates its buffers to one backward, so the probe's repeated gradients need eager mode."""

    def __init__(self):
        super().__init__(in_dim=64, out_dim=10)
        self.net = torch.compile(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                               nn.Linear(128, 10)))


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor compiles C++ on the CPU")
def test_a_compiled_model_is_probed_eagerly_and_passes(tmp_path):
    import warnings

    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb = BatchIndependenceCheck(on_fail="warn")
        L.seed_everything(0)
        trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=3, limit_val_batches=2).fit(
            _CompiledMLP(), loader(x[:1024], y[:1024], 64), loader(x[1024:], y[1024:], 128))
    assert not [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    (f,) = cb.findings
    assert f.status == "pass" and "zero outside its own example" in f.message, f.message
