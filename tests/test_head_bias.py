import math

import lightning as L
import pytest
import torch
from helpers import GAN, TinyModel, blobs, loader, regression_data, trainer
from torch import nn

from lightning_recipe import HeadBiasInit, collect_findings


class _Capture(L.Callback):
    """Records the head bias right before the first training step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and not hasattr(self, "bias"):
            self.bias = pl_module.net[-1].bias.detach().clone()


def _fit(tmp_path, model, dl, **cb_kw):
    cap = _Capture()
    cb = HeadBiasInit(**cb_kw)
    trainer(tmp_path, [cb, cap], max_steps=1).fit(model, dl)
    return cb, cap.bias


def test_softmax_bias_is_log_class_prior(tmp_path):
    x, y = blobs(n=1000, priors=[0.6, 0.25, 0.1, 0.05])
    cb, bias = _fit(tmp_path, TinyModel(), loader(x, y))
    p = torch.bincount(y, minlength=4).double() / len(y)
    assert torch.allclose(bias.double(), p.log(), atol=1e-6)
    assert cb.findings[0].status == "pass" and cb.findings[0].details["method"] == "log class prior"
    # the loss of the constant prediction went from ~log C (default init bias) to the label entropy
    assert cb.findings[0].measured == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)


def test_class_weight_and_label_smoothing_respected(tmp_path):
    x, y = blobs(n=1000, priors=[0.7, 0.2, 0.1, 0.0])  # class 3 absent
    w = torch.tensor([1.0, 2.0, 3.0, 1.0])
    _, bias = _fit(tmp_path, TinyModel(loss_fn=nn.CrossEntropyLoss(weight=w)), loader(x, y))
    n = torch.bincount(y, minlength=4).double()
    q = torch.where(n > 0, n, torch.full_like(n, 0.5)) * w.double()
    assert torch.allclose(bias.double(), (q / q.sum()).log(), atol=1e-5)
    assert torch.isfinite(bias).all()
    _, bias = _fit(tmp_path, TinyModel(loss_fn=nn.CrossEntropyLoss(label_smoothing=0.1)), loader(x, y))
    p = torch.where(n > 0, n, torch.full_like(n, 0.5))
    p = 0.9 * p / p.sum() + 0.1 / 4
    assert torch.allclose(bias.double(), p.log(), atol=1e-5)


def test_sigmoid_bias_is_log_odds_with_pos_weight(tmp_path):
    x, y = blobs(n=1000, classes=2, priors=[0.9, 0.1])
    yf = y.float().unsqueeze(1)
    p = yf.mean().item()
    _, bias = _fit(tmp_path, TinyModel(out_dim=1, loss_fn=nn.BCEWithLogitsLoss()), loader(x, yf))
    assert bias.item() == pytest.approx(math.log(p / (1 - p)), abs=1e-5)
    pw = torch.tensor([3.0])
    _, bias = _fit(tmp_path, TinyModel(out_dim=1, loss_fn=nn.BCEWithLogitsLoss(pos_weight=pw)), loader(x, yf))
    assert bias.item() == pytest.approx(math.log(3 * p / (1 - p)), abs=1e-5)


def test_multilabel_bias_per_label(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(800, 8, generator=g)
    y = (torch.rand(800, 3, generator=g) < torch.tensor([0.5, 0.2, 0.05])).float()
    _, bias = _fit(tmp_path, TinyModel(out_dim=3, loss_fn=nn.BCEWithLogitsLoss()), loader(x, y))
    p = y.mean(0).double()
    assert torch.allclose(bias.double(), (p / (1 - p)).log(), atol=1e-5)


@pytest.mark.parametrize(("loss", "stat"), [(nn.MSELoss(), "mean"), (nn.L1Loss(), "median")])
def test_regression_bias_is_mean_or_median(tmp_path, loss, stat):
    x, y = regression_data(n=501, mean=50.0, scale=10.0)
    _, bias = _fit(tmp_path, TinyModel(out_dim=1, loss_fn=loss), loader(x, y))
    expected = y.mean() if stat == "mean" else y.median()
    assert bias.item() == pytest.approx(expected.item(), abs=1e-3)


def test_sequence_and_dense_heads(tmp_path):
    class Seq(TinyModel):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10)
            self.net = nn.Sequential(self.emb, self.head)

        def compute_loss(self, batch):
            x, y = batch
            return self.loss_fn(self(x).reshape(-1, 10), y.reshape(-1))

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 10, (200, 12), generator=g)
    y = torch.multinomial(torch.tensor([0.5, 0.3] + [0.025] * 8), 200 * 12, replacement=True, generator=g).reshape(200, 12)
    _, bias = _fit(tmp_path, Seq(), loader(x, y))
    p = torch.bincount(y.reshape(-1), minlength=10).double() / y.numel()
    assert torch.allclose(bias.double(), p.log(), atol=1e-5)


def test_no_head_found_raises_naming_head(tmp_path):
    class NoBias(TinyModel):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 4, bias=False))

    x, y = blobs(n=64)
    from lightning_recipe import RecipeConfigError

    with pytest.raises(RecipeConfigError, match="head="):
        trainer(tmp_path, [HeadBiasInit()], max_steps=1).fit(NoBias(), loader(x, y))
    with pytest.warns(UserWarning, match="head="):
        t = trainer(tmp_path, [HeadBiasInit(on_fail="warn")], max_steps=1)
        t.fit(NoBias(), loader(x, y))
    assert [f.status for f in collect_findings(t)] == ["skip"] and t.global_step == 1


def test_skip_keeps_pretrained_bias(tmp_path):
    x, y = blobs(n=200, priors=[0.7, 0.1, 0.1, 0.1])
    m = TinyModel()
    with torch.no_grad():
        m.net[-1].bias.fill_(1.5)
    cb, bias = _fit(tmp_path, m, loader(x, y), skip=True)
    assert torch.all(bias == 1.5) and cb.findings[0].status == "skip"


class _Embedder(TinyModel):
    """Labelled batches, no loss module, and a loss of its own that never uses the labels (two noisy views pulled
    together): the output is an embedding of ``width`` values, not logits over the labels."""

    def __init__(self, width):
        super().__init__(out_dim=width)
        self.loss_fn = None

    def training_step(self, batch, batch_idx):
        x, _ = batch
        a, b = self(x + 0.1 * torch.randn_like(x)), self(x + 0.1 * torch.randn_like(x))
        return (a - b).pow(2).mean()


@pytest.mark.parametrize(("model", "why"), [(lambda: _Embedder(6), "6 outputs for labels in [0, 3]"),
                                            (lambda: GAN(), "manual optimization with 2 optimizers")])
def test_a_guessed_loss_writes_no_bias_into_an_embedding_or_a_generator(tmp_path, model, why):
    """With the cross-entropy only guessed from integer labels, a bias written into a layer that is not a classifier
    of them would change what the model learns: an embedding 6 wide over 4 labels (below twice their number), a GAN's
    generator. The same labels under a 4-wide output are a classifier's and get the log prior."""
    x, y = blobs(n=512, priors=[0.55, 0.25, 0.15, 0.05])
    m = model()
    before = m.net[-1].bias.detach().clone()
    cb, bias = _fit(tmp_path, m, loader(x, y))
    assert cb.findings[0].status == "skip" and why in cb.findings[0].message
    assert torch.equal(bias, before)
    cb, bias = _fit(tmp_path, _Embedder(4), loader(x, y))
    p = torch.bincount(y, minlength=4).double() / len(y)
    assert cb.findings[0].status == "pass" and torch.allclose(bias.double(), p.log(), atol=1e-6)
