"""Healthy classifiers of families unlike the small MLPs of the other tests, and too-high learning rates.

Tiny and fast (scikit-learn digits, synthetic sequences): the fixtures the severity calibration was measured on.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits(flat: bool = True, scaled: bool = True, seed: int = 0):
    """Digits in [0, 1] (``/16``), shuffled with a fixed seed; flat ``(N, 64)`` or images ``(N, 1, 8, 8)``."""
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / (16.0 if scaled else 1.0)
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    return (x if flat else x.reshape(-1, 1, 8, 8)), y


def sequences(n: int = 1024, length: int = 16, vocab: int = 12, seed: int = 0, padded: bool = False):
    """Token sequences labelled by which of tokens 1/2/3 occurs most (3 classes); ``padded``: random lengths 6..T with
    id 0 after the end (a padding mask is needed to ignore it)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(6, length + 1, (n,), generator=g) if padded else torch.full((n,), length)
    pad = torch.arange(length)[None, :] >= lengths[:, None]
    x = x.masked_fill(pad, 0)
    counts = torch.stack([(x == t).sum(1) for t in (1, 2, 3)], 1).float()
    y = (counts + 0.1 * torch.rand(n, 3, generator=g)).argmax(1)
    return x, y


class _Classifier(L.LightningModule):
    def __init__(self, lr: float, optimizer: str = "adam", momentum: float = 0.0, warmup: int = 0) -> None:
        super().__init__()
        self.loss_fn = nn.CrossEntropyLoss()
        self.lr, self.optimizer, self.momentum, self.warmup = lr, optimizer, momentum, warmup

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        if not self.warmup:
            return opt
        ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": ramp, "interval": "step"}}


class _Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class ResNet(_Classifier):
    """A small ResNet with BatchNorm on 8x8 digit images."""

    def __init__(self, lr: float = 1e-3, **kw: Any) -> None:
        super().__init__(lr, **kw)
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.blocks = nn.Sequential(_Block(16), _Block(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class AttentionLSTM(_Classifier):
    """An LSTM whose states are pooled by learned attention."""

    def __init__(self, vocab: int = 12, lr: float = 3e-3, **kw: Any) -> None:
        super().__init__(lr, **kw)
        self.emb = nn.Embedding(vocab, 16)
        self.lstm = nn.LSTM(16, 32, batch_first=True)
        self.score = nn.Linear(32, 1)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(x))
        w = torch.softmax(self.score(h).squeeze(-1), dim=1)
        return self.head((w.unsqueeze(-1) * h).sum(1))


class MaskedTransformer(_Classifier):
    """A transformer encoder with a key padding mask (token id 0), mean-pooled over the real tokens."""

    def __init__(self, vocab: int = 12, lr: float = 1e-3, **kw: Any) -> None:
        super().__init__(lr, **kw)
        self.emb = nn.Embedding(vocab, 32, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, 16, 32))
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = x == 0
        h = self.encoder(self.emb(x) + self.pos[:, : x.shape[1]], src_key_padding_mask=pad)
        keep = (~pad).unsqueeze(-1).float()
        return self.head((h * keep).sum(1) / keep.sum(1).clamp_min(1))


class MLP(_Classifier):
    """A two-layer MLP on flattened digits."""

    def __init__(self, lr: float = 0.05, hidden: int = 64, **kw: Any) -> None:
        super().__init__(lr, **kw)
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def healthy_fixtures() -> dict[str, tuple[L.LightningModule, Any, Any]]:
    """name -> (model, x, y): healthy fits of other families than the tests' MLPs on blobs."""
    xd, yd = digits()
    xi, _ = digits(flat=False)
    xs, ys = sequences()
    xp, yp = sequences(padded=True)
    return {
        "resnet_bn": (ResNet(lr=1e-3), xi, yd),
        "lstm_attention": (AttentionLSTM(lr=3e-3), xs, ys),
        "transformer_mask": (MaskedTransformer(lr=1e-3), xp, yp),
        "mlp_sgd_momentum": (MLP(lr=0.05, optimizer="sgd", momentum=0.9), xd, yd),
        "mlp_sgd_warmup": (MLP(lr=0.1, optimizer="sgd", warmup=50), xd, yd),
    }


def broken_fixtures() -> dict[str, tuple[L.LightningModule, Any, Any]]:
    """name -> (model, x, y): the same families with a learning rate far too high."""
    xd, yd = digits()
    xs, ys = sequences()
    return {
        "mlp_sgd_momentum_lr_too_high": (MLP(lr=0.5, optimizer="sgd", momentum=0.9), xd, yd),
        "lstm_adam_lr_too_high": (AttentionLSTM(lr=0.3), xs, ys),
    }


def loader(x, y, batch_size: int = 32, shuffle: bool = True) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)
