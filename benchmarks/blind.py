"""A blind calibration study: ``lightning_recipe.recommended()`` on model families the corpus does not hold.

Every fit below is its own LightningModule, written the way a user writes one for that family (tuple and dict
batches, ``F.cross_entropy`` inline or a loss module held as an attribute, ``{"loss": ...}`` or a tensor returned,
dict/tuple/dataclass outputs, manual optimisation, Lightning's own callbacks), with no argument given to the recipe.
Healthy fits end with a held-out metric that shows they learned (accuracy, R², or a loss well below the constant
prediction's); broken fits carry one named bug each.

A healthy fit is *alarmed* when it gets a warn/fail finding, a ``RecipeWarning`` or a crash; a broken fit is *caught*
when it gets a warn/fail finding (or a RecipeWarning).

    python benchmarks/blind.py                      # every fit, one at a time (6-8 min on one core)
    python benchmarks/blind.py --only vit_digits    # one fit (or a comma-separated list, or "healthy"/"broken")
    python benchmarks/blind.py --json blind.json    # every result, findings with their full messages
    python benchmarks/blind.py --plain              # also fit each healthy fit without the recipe (12 min): a fit
                                                    # good without the recipe and not with it is marked HARMED

Data: scikit-learn's bundled tables (digits, iris, wine, diabetes, breast cancer, linnerud), synthetic tensors and
Python's standard-library source text. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import StochasticWeightAveraging
from sklearn import datasets
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

# ---------------------------------------------------------------------------------------------------------------------
# registry


@dataclass
class Built:
    module: L.LightningModule
    train: Any
    val: Any
    epochs: int
    evaluate: Callable[[], tuple[str, float, float, bool]]  # (metric, value, baseline, good)
    trainer_kw: dict[str, Any] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)


@dataclass
class Fit:
    name: str
    kind: str  # healthy | broken
    family: str
    bug: str
    build: Callable[[], Built]


FITS: list[Fit] = []


def fit(name: str, family: str, bug: str = "") -> Callable[[Callable[[], Built]], Callable[[], Built]]:
    def deco(fn: Callable[[], Built]) -> Callable[[], Built]:
        FITS.append(Fit(name, "broken" if bug else "healthy", family, bug, fn))
        return fn

    return deco


# ---------------------------------------------------------------------------------------------------------------------
# data


def _split(n: int, n_val: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    p = np.random.RandomState(seed).permutation(n)
    k = int(round(n * n_val)) if n_val < 1 else int(n_val)
    return p[k:], p[:k]


def digits(scale: float = 16.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = datasets.load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / scale
    y = torch.tensor(d.target, dtype=torch.long)
    tr, va = _split(len(y), 397)
    return X[tr], y[tr], X[va], y[va]


def standardized(X: np.ndarray, tr: np.ndarray, va: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    mu, sd = X[tr].mean(0), X[tr].std(0) + 1e-8
    return (torch.tensor((X[tr] - mu) / sd, dtype=torch.float32), torch.tensor((X[va] - mu) / sd, dtype=torch.float32))


def stdlib_text() -> str:
    import argparse as a, functools as f, textwrap as t, string as s, inspect as i, dataclasses as dc
    text = ""
    for mod in (a, f, t, s, dc, i):
        with open(mod.__file__, encoding="utf-8") as fh:
            text += fh.read()
    return "".join(c if 32 <= ord(c) < 127 or c == "\n" else "?" for c in text)


def acc_eval(module: L.LightningModule, x: torch.Tensor, y: torch.Tensor, good: float = 0.9,
             fwd: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Callable[[], tuple]:
    def ev() -> tuple[str, float, float, bool]:
        module.eval()
        with torch.no_grad():
            logits = (fwd or module)(x)
        module.train()
        a = (logits.argmax(-1) == y).float().mean().item()
        base = torch.bincount(y).max().item() / len(y)
        return "acc", a, base, a >= good
    return ev


def r2(pred: torch.Tensor, y: torch.Tensor, ymean: torch.Tensor) -> tuple[float, float]:
    ss = ((pred - y) ** 2).sum().item()
    s0 = ((ymean - y) ** 2).sum().item()
    return 1 - ss / s0, 0.0


# ---------------------------------------------------------------------------------------------------------------------
# 1. ViT-style patch transformer on digits (dict batches, F.cross_entropy inline)


class DigitsDict(Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X.view(-1, 1, 8, 8), y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.X[i], "label": self.y[i]}


class ViT(L.LightningModule):
    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, batch_first: bool = True) -> None:
        super().__init__()
        self.patch = nn.Linear(4, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim * 2, dropout=0.1, batch_first=batch_first,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        B = img.shape[0]
        p = img.unfold(2, 2, 2).unfold(3, 2, 2)                     # B,1,4,4,2,2
        p = p.permute(0, 2, 3, 1, 4, 5).reshape(B, 16, 4)
        tok = torch.cat([self.cls.expand(B, -1, -1), self.patch(p)], 1) + self.pos
        return self.head(self.norm(self.encoder(tok)[:, 0]))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["image"])
        self.log("val_loss", F.cross_entropy(logits, batch["label"]))
        self.log("val_acc", (logits.argmax(1) == batch["label"]).float().mean())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=2e-3, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _vit(batch_first: bool, good: float) -> Built:
    Xt, yt, Xv, yv = digits()
    m = ViT(batch_first=batch_first)
    return Built(m, DataLoader(DigitsDict(Xt, yt), batch_size=64, shuffle=True),
                 DataLoader(DigitsDict(Xv, yv), batch_size=256), 30,
                 acc_eval(m, Xv.view(-1, 1, 8, 8), yv, good))


@fit("vit_digits", "vit")
def vit_digits() -> Built:
    return _vit(True, 0.93)


@fit("vit_no_batch_first", "vit", bug="TransformerEncoderLayer without batch_first=True fed (B, T, D): attention mixes the batch")
def vit_no_batch_first() -> Built:
    return _vit(False, 0.93)


# ---------------------------------------------------------------------------------------------------------------------
# 2. dilated causal 1-D conv (TCN), multi-step forecasting of synthetic series


def series(n_series: int, length: int, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    t = np.arange(length)
    out = []
    for _ in range(n_series):
        f1, f2 = rng.uniform(0.02, 0.08), rng.uniform(0.1, 0.2)
        s = np.sin(2 * np.pi * f1 * t + rng.uniform(0, 6.3)) + 0.5 * np.sin(2 * np.pi * f2 * t + rng.uniform(0, 6.3))
        ar = np.zeros(length)
        e = rng.randn(length) * 0.1
        for i in range(2, length):
            ar[i] = 0.6 * ar[i - 1] - 0.2 * ar[i - 2] + e[i]
        out.append(s + ar)
    return np.array(out, dtype=np.float32)


def windows(S: np.ndarray, win: int, horizon: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for s in S:
        for i in range(0, len(s) - win - horizon, stride):
            xs.append(s[i:i + win])
            ys.append(s[i + win:i + win + horizon])
    return torch.tensor(np.array(xs)).unsqueeze(1), torch.tensor(np.array(ys))


class CausalBlock(nn.Module):
    def __init__(self, ch: int, dilation: int, wn: bool = False) -> None:
        super().__init__()
        self.pad = 2 * dilation
        c1, c2 = nn.Conv1d(ch, ch, 3, dilation=dilation), nn.Conv1d(ch, ch, 3, dilation=dilation)
        if wn:
            c1, c2 = nn.utils.parametrizations.weight_norm(c1), nn.utils.parametrizations.weight_norm(c2)
        self.c1, self.c2 = c1, c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c1(F.pad(x, (self.pad, 0))))
        h = self.c2(F.pad(h, (self.pad, 0)))
        return F.relu(x + h)


class TCN(L.LightningModule):
    def __init__(self, horizon: int = 8, ch: int = 32, lr: float = 2e-3, wn: bool = False) -> None:
        super().__init__()
        self.inp = nn.Conv1d(1, ch, 1)
        self.blocks = nn.Sequential(*[CausalBlock(ch, d, wn) for d in (1, 2, 4, 8)])
        self.out = nn.Linear(ch, horizon)
        self.loss_fn = nn.MSELoss()
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.inp(x))
        return self.out(h[:, :, -1])

    def training_step(self, batch: Any, batch_idx: int) -> dict:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _tcn(lr: float, wn: bool = False) -> Built:
    Xt, yt = windows(series(40, 400, 0), 48, 8, 6)
    Xv, yv = windows(series(10, 400, 1), 48, 8, 6)
    m = TCN(lr=lr, wn=wn)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            p = m(Xv)
        v, base = r2(p, yv, yt.mean(0))
        return "r2", v, base, v > 0.8
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=256), 15, ev)


@fit("tcn_forecast", "tcn")
def tcn_forecast() -> Built:
    return _tcn(2e-3)


@fit("tcn_weight_norm", "tcn")
def tcn_weight_norm() -> Built:
    return _tcn(2e-3, wn=True)


@fit("tcn_lr_too_high", "tcn", bug="Adam with lr=1.0 (far too high)")
def tcn_lr_too_high() -> Built:
    return _tcn(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# 3. VAE on digits: reconstruction + KL, dict outputs, labels in the batch but unused


class VAE(L.LightningModule):
    def __init__(self, z: int = 8, beta: float = 1.0) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.mu, self.logvar = nn.Linear(128, z), nn.Linear(128, z)
        self.dec = nn.Sequential(nn.Linear(z, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64))
        self.beta = beta

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.enc(x)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return {"x_logits": self.dec(z), "mu": mu, "logvar": logvar}

    def _elbo(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self(x)
        rec = F.binary_cross_entropy_with_logits(out["x_logits"], x, reduction="sum") / x.shape[0]
        kl = -0.5 * torch.sum(1 + out["logvar"] - out["mu"] ** 2 - out["logvar"].exp()) / x.shape[0]
        return rec + self.beta * kl, rec, kl

    def training_step(self, batch: Any, batch_idx: int) -> dict:
        x, _ = batch
        loss, rec, kl = self._elbo(x)
        self.log_dict({"train_loss": loss, "rec": rec, "kl": kl})
        return {"loss": loss}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        self.log("val_loss", self._elbo(x)[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@fit("vae_digits", "vae")
def vae_digits() -> Built:
    Xt, yt, Xv, yv = digits()
    m = VAE()

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            rec = F.mse_loss(torch.sigmoid(m(Xv)["x_logits"]), Xv).item()
        base = F.mse_loss(Xt.mean(0).expand_as(Xv), Xv).item()
        return "recon_mse", rec, base, rec < 0.6 * base
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=256), 40, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 4. SimCLR-style InfoNCE on two noisy views of digits (targets = arange within the batch)


def view(x: torch.Tensor) -> torch.Tensor:
    keep = (torch.rand_like(x) > 0.15).float()
    shift = torch.roll(x.view(-1, 8, 8), shifts=int(torch.randint(-1, 2, ()).item()), dims=2).view(-1, 64)
    return shift * keep + 0.1 * torch.randn_like(x)


class SimCLR(L.LightningModule):
    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128))
        self.projector = nn.Sequential(nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))
        self.t = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def info_nce(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.projector(self.encoder(torch.cat([view(x), view(x)]))), dim=1)
        n = x.shape[0]
        sim = z @ z.T / self.t
        sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=x.device), float("-inf"))
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(x.device)
        return F.cross_entropy(sim, targets)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.info_nce(batch[0])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.info_nce(batch[0]))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3, weight_decay=1e-5)


def knn_eval(m: L.LightningModule, Xt: torch.Tensor, yt: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor,
             good: float) -> Callable[[], tuple]:
    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            et, evv = F.normalize(m(Xt), dim=1), F.normalize(m(Xv), dim=1)
        m.train()
        nn_idx = (evv @ et.T).topk(5, dim=1).indices
        pred = torch.mode(yt[nn_idx], dim=1).values
        a = (pred == yv).float().mean().item()
        return "knn_acc", a, 0.1, a >= good
    return ev


def _simclr(scale: float) -> Built:
    Xt, yt, Xv, yv = digits(scale)
    m = SimCLR()
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=128, shuffle=True, drop_last=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=128, drop_last=True), 30,
                 knn_eval(m, Xt, yt, Xv, yv, 0.93))


@fit("simclr_digits", "contrastive")
def simclr_digits() -> Built:
    return _simclr(16.0)


@fit("simclr_inputs_0_255", "contrastive", bug="pixels left at 0-255 (digits x 16) instead of scaled to [0, 1]")
def simclr_inputs_0_255() -> Built:
    return _simclr(1.0 / 16.0)


# ---------------------------------------------------------------------------------------------------------------------
# 5. knowledge distillation: a CNN teacher trained first in-process, an MLP student with KL at temperature T


class TeacherCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                               nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x.view(-1, 1, 8, 8))


def train_plain(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 1e-3) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


class Distill(L.LightningModule):
    def __init__(self, teacher: nn.Module, T: float = 4.0, alpha: float = 0.7, softmax_bug: bool = False) -> None:
        super().__init__()
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.T, self.alpha, self.softmax_bug = T, alpha, softmax_bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.student(x)
        return out.softmax(-1) if self.softmax_bug else out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        s = self(x)
        with torch.no_grad():
            t = self.teacher(x)
        kd = F.kl_div(F.log_softmax(s / self.T, -1), F.softmax(t / self.T, -1), reduction="batchmean") * self.T ** 2
        loss = self.alpha * kd + (1 - self.alpha) * F.cross_entropy(s, y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.student.parameters(), lr=3e-3)


def _distill(bug: bool) -> Built:
    Xt, yt, Xv, yv = digits()
    teacher = train_plain(TeacherCNN(), Xt, yt, 10)
    m = Distill(teacher, softmax_bug=bug)
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=256), 20, acc_eval(m, Xv, yv, 0.93))


@fit("distill_digits", "distillation")
def distill_digits() -> Built:
    return _distill(False)


@fit("distill_softmax_before_ce", "distillation", bug="the student's forward returns softmax probabilities, fed to F.cross_entropy and the KL as logits")
def distill_softmax_before_ce() -> Built:
    return _distill(True)


# ---------------------------------------------------------------------------------------------------------------------
# 6. multi-label classification with BCEWithLogits (attributes of a digit), dict batches


ATTRS = [lambda d: d % 2 == 0, lambda d: d >= 5, lambda d: d in (2, 3, 5, 7), lambda d: d in (0, 6, 8, 9)]


class MultiLabelDigits(Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X = X
        self.Y = torch.tensor([[float(a(int(d))) for a in ATTRS] for d in y])

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.X[i], "targets": self.Y[i]}


class MultiLabelNet(L.LightningModule):
    def __init__(self, double_sigmoid: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, len(ATTRS)))
        self.criterion = nn.BCEWithLogitsLoss()
        self.double_sigmoid = double_sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return torch.sigmoid(out) if self.double_sigmoid else out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.criterion(self(batch["features"]), batch["targets"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.criterion(self(batch["features"]), batch["targets"]))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _multilabel(bug: bool) -> Built:
    Xt, yt, Xv, yv = digits()
    m = MultiLabelNet(bug)
    dv = MultiLabelDigits(Xv, yv)
    dt = MultiLabelDigits(Xt, yt)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            out = m(Xv)
        pred = (out > (0.5 if bug else 0.0)).float()
        a = (pred == dv.Y).float().mean().item()
        base_acc = ((dt.Y.mean(0) > 0.5).float() == dv.Y).float().mean().item()  # the majority per label
        return "label_acc", a, base_acc, a >= 0.93
    return Built(m, DataLoader(dt, batch_size=32, shuffle=True), DataLoader(dv, batch_size=256), 25, ev)


@fit("multilabel_digits", "multilabel")
def multilabel_digits() -> Built:
    return _multilabel(False)


@fit("multilabel_double_sigmoid", "multilabel", bug="sigmoid in forward, then BCEWithLogitsLoss (double sigmoid)")
def multilabel_double_sigmoid() -> Built:
    return _multilabel(True)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Poisson regression on synthetic counts (PoissonNLLLoss, log-rate output)


class PoissonReg(L.LightningModule):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 1))
        self.loss = nn.PoissonNLLLoss(log_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # log rate

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, counts = batch
        loss = self.loss(self(x), counts)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, counts = batch
        self.log("val_loss", self.loss(self(x), counts))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def poisson_deviance(mu: torch.Tensor, y: torch.Tensor) -> float:
    t = torch.where(y > 0, y * torch.log(y / mu), torch.zeros_like(y))
    return (2 * (t - (y - mu))).mean().item()


@fit("poisson_counts", "poisson")
def poisson_counts() -> Built:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4000, 8, generator=g)
    w = torch.randn(8, generator=g) * 0.35
    rate = torch.exp(0.8 + X @ w + 0.4 * torch.sin(2 * X[:, 0]))
    y = torch.poisson(rate, generator=g)
    Xt, yt, Xv, yv = X[:3200], y[:3200], X[3200:], y[3200:]
    m = PoissonReg(8)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            mu = m(Xv).exp()
        d, base = poisson_deviance(mu, yv), poisson_deviance(yt.mean().expand_as(yv), yv)
        return "deviance", d, base, d < 0.6 * base
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=512), 15, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 8. heteroscedastic regression: GaussianNLLLoss with a predicted variance, tuple outputs


class HeteroReg(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU())
        self.mean_head, self.var_head = nn.Linear(64, 1), nn.Linear(64, 1)
        self.nll = nn.GaussianNLLLoss()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.mean_head(h).squeeze(-1), F.softplus(self.var_head(h)).squeeze(-1) + 1e-4

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        mean, var = self(x)
        loss = self.nll(mean, y, var)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        mean, var = self(x)
        self.log("val_loss", self.nll(mean, y, var))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@fit("hetero_gaussian_nll", "heteroscedastic")
def hetero_gaussian_nll() -> Built:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4000, 1, generator=g) * 6 - 3
    y = (torch.sin(2 * x) + (0.05 + 0.3 * x.abs() / 3) * torch.randn(x.shape, generator=g)).squeeze(-1)
    Xt, yt, Xv, yv = x[:3200], y[:3200], x[3200:], y[3200:]
    m = HeteroReg()

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            mean, var = m(Xv)
        nll = F.gaussian_nll_loss(mean, yv, var, full=True).item()
        base = F.gaussian_nll_loss(yt.mean().expand_as(yv), yv, yt.var().expand_as(yv), full=True).item()
        return "val_nll", nll, base, nll < base - 1.0
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=512), 20, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 9. quantile regression (pinball loss, three quantiles) on diabetes


QS = torch.tensor([0.1, 0.5, 0.9])


def pinball(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    diff = y.unsqueeze(-1) - pred
    return torch.maximum(QS * diff, (QS - 1) * diff).mean()


class QuantileNet(L.LightningModule):
    def __init__(self, sign: float = 1.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
        self.sign = sign

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.sign * pinball(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", pinball(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3, weight_decay=1e-4)


def _quantile(sign: float) -> Built:
    d = datasets.load_diabetes()
    tr, va = _split(len(d.target), 0.2, seed=2)
    Xt, Xv = standardized(d.data, tr, va)
    mu, sd = d.target[tr].mean(), d.target[tr].std()
    yt = torch.tensor((d.target[tr] - mu) / sd, dtype=torch.float32)
    yv = torch.tensor((d.target[va] - mu) / sd, dtype=torch.float32)
    m = QuantileNet(sign)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            v = pinball(m(Xv), yv).item()
        const = torch.quantile(yt, QS).expand(len(yv), 3)
        base = pinball(const, yv).item()
        return "pinball", v, base, v < 0.85 * base
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=256), 40, ev)


@fit("quantile_diabetes", "quantile")
def quantile_diabetes() -> Built:
    return _quantile(1.0)


@fit("quantile_loss_sign_flipped", "quantile", bug="training_step returns -loss (sign flipped)")
def quantile_loss_sign_flipped() -> Built:
    return _quantile(-1.0)


# ---------------------------------------------------------------------------------------------------------------------
# 10. ordinal regression (cumulative logits, CORAL-style: K-1 binary tasks sharing one score)


class Coral(L.LightningModule):
    def __init__(self, d: int, K: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 1, bias=False))
        self.thresholds = nn.Parameter(torch.arange(K - 1, dtype=torch.float32) - (K - 2) / 2)
        self.K = K

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) - self.thresholds  # (N, K-1) logits of P(level > k)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, level = batch
        ext = (level.unsqueeze(1) > torch.arange(self.K - 1, device=x.device)).float()
        loss = F.binary_cross_entropy_with_logits(self(x), ext)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, level = batch
        ext = (level.unsqueeze(1) > torch.arange(self.K - 1, device=x.device)).float()
        self.log("val_loss", F.binary_cross_entropy_with_logits(self(x), ext))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@fit("ordinal_coral", "ordinal")
def ordinal_coral() -> Built:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 6, generator=g)
    latent = X[:, 0] + 0.7 * X[:, 1] * X[:, 2] + 0.5 * X[:, 3] + 0.3 * torch.randn(3000, generator=g)
    level = torch.bucketize(latent, torch.tensor([-1.2, -0.4, 0.4, 1.2]))
    Xt, yt, Xv, yv = X[:2400], level[:2400], X[2400:], level[2400:]
    m = Coral(6, 5)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            pred = (m(Xv) > 0).sum(1)
        mae = (pred - yv).abs().float().mean().item()
        base = (yt.median() - yv).abs().float().mean().item()
        return "mae", mae, base, mae < 0.5 * base
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=512), 20, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 11. GAN on a 2-D Gaussian mixture: manual optimisation, two optimisers


MODES = torch.stack([torch.tensor([2 * math.cos(a), 2 * math.sin(a)]) for a in np.linspace(0, 2 * math.pi, 9)[:-1]])


class GAN(L.LightningModule):
    def __init__(self, latent: int = 8, zero_grad_bug: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.latent = latent
        self.G = nn.Sequential(nn.Linear(latent, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))
        self.D = nn.Sequential(nn.Linear(2, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2),
                               nn.Linear(128, 1))
        self.bug = zero_grad_bug

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.G(z)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        n = real.shape[0]
        z = torch.randn(n, self.latent, device=real.device)
        fake = self(z)
        ones, zeros = torch.ones(n, 1, device=real.device), torch.zeros(n, 1, device=real.device)
        d_loss = (F.binary_cross_entropy_with_logits(self.D(real), ones)
                  + F.binary_cross_entropy_with_logits(self.D(fake.detach()), zeros)) / 2
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.binary_cross_entropy_with_logits(self.D(fake), ones)
        if not self.bug:
            opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss})

    def configure_optimizers(self) -> Any:
        return (torch.optim.Adam(self.G.parameters(), lr=1e-3, betas=(0.5, 0.999)),
                torch.optim.Adam(self.D.parameters(), lr=1e-3, betas=(0.5, 0.999)))


def _gan(bug: bool) -> Built:
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 8, (20000,), generator=g)
    pts = MODES[idx] + 0.08 * torch.randn(20000, 2, generator=g)
    m = GAN(zero_grad_bug=bug)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            s = m(torch.randn(2000, 8, generator=torch.Generator().manual_seed(5)))
        d = torch.cdist(s, MODES)
        near, which = d.min(1)
        hq = (near < 0.3).float().mean().item()
        covered = len(set(which[near < 0.3].tolist()))
        return "hq_frac(modes)", hq + covered, 0.0, hq > 0.6 and covered >= 7
    return Built(m, DataLoader(TensorDataset(pts), batch_size=256, shuffle=True), None, 30, ev)


@fit("gan_mixture", "gan")
def gan_mixture() -> Built:
    return _gan(False)


@fit("gan_missing_zero_grad", "gan", bug="manual optimisation: the generator's optimizer is never zero_grad()ed")
def gan_missing_zero_grad() -> Built:
    return _gan(True)


# ---------------------------------------------------------------------------------------------------------------------
# 12. dense-adjacency graph convolution, node classification, one graph per batch


class Graphs(Dataset):
    def __init__(self, n: int, seed: int, nodes: int = 40, k: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            y = torch.randint(0, k, (nodes,), generator=g)
            same = y[:, None] == y[None, :]
            p = torch.where(same, torch.tensor(0.3), torch.tensor(0.02))
            a = (torch.rand(nodes, nodes, generator=g) < p).float().triu(1)
            a = a + a.T
            x = F.one_hot(y, k).float() + 1.0 * torch.randn(nodes, k, generator=g)
            x = torch.cat([x, torch.randn(nodes, 5, generator=g)], 1)
            self.items.append({"x": x, "adj": a, "y": y})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class GCN(L.LightningModule):
    def __init__(self, d: int = 8, h: int = 32, k: int = 3) -> None:
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, k)

    @staticmethod
    def norm_adj(adj: torch.Tensor) -> torch.Tensor:
        a = adj + torch.eye(adj.shape[-1], device=adj.device)
        dinv = a.sum(-1).rsqrt()
        return dinv[:, None] * a * dinv[None, :]

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        a = self.norm_adj(adj)
        h = F.relu(a @ self.l1(x))
        h = F.relu(a @ self.l2(h))
        return self.l3(h)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["x"], batch["adj"]), batch["y"])
        self.log("train_loss", loss, batch_size=batch["y"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch["x"], batch["adj"]), batch["y"]), batch_size=batch["y"].shape[0])

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=5e-3, weight_decay=5e-4)


def _gcn(val_is_train: bool) -> Built:
    tr, va = Graphs(300, 0), Graphs(60, 1)
    m = GCN()

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            accs = [(m(g["x"], g["adj"]).argmax(1) == g["y"]).float().mean().item() for g in va]
        a = float(np.mean(accs))
        return "node_acc", a, 1 / 3, a >= 0.85
    val = tr if val_is_train else va
    return Built(m, DataLoader(tr, batch_size=None, shuffle=True), DataLoader(val, batch_size=None), 20, ev)


@fit("gcn_nodes", "graph")
def gcn_nodes() -> Built:
    return _gcn(False)


@fit("gcn_val_is_train", "graph", bug="the validation loader is built on the training graphs")
def gcn_val_is_train() -> Built:
    return _gcn(True)


# ---------------------------------------------------------------------------------------------------------------------
# 13. DeepSets: the sum of the digits in a set of five images (L1 loss on the raw sum)


class DeepSets(L.LightningModule):
    def __init__(self, unused_bug: bool = False) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.rho = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))
        if unused_bug:
            self.set_norm = nn.Linear(128, 128)  # meant to go between the pooling and rho; never called
        self.loss_fn = nn.L1Loss()

    def forward(self, sets: torch.Tensor) -> torch.Tensor:
        return self.rho(self.phi(sets).sum(1)).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        sets, total = batch
        loss = self.loss_fn(self(sets), total)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        sets, total = batch
        self.log("val_loss", self.loss_fn(self(sets), total))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def make_sets(X: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(y), (n, 5), generator=g)
    return X[idx], y[idx].sum(1).float()


def _deepsets(bug: bool) -> Built:
    Xt, yt, Xv, yv = digits()
    St, Tt = make_sets(Xt, yt, 6000, 0)
    Sv, Tv = make_sets(Xv, yv, 1000, 1)
    m = DeepSets(bug)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            p = m(Sv)
        v, base = r2(p, Tv, Tt.mean())
        return "r2", v, base, v > 0.85
    return Built(m, DataLoader(TensorDataset(St, Tt), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Sv, Tv), batch_size=500), 10, ev)


@fit("deepsets_sum", "deepsets")
def deepsets_sum() -> Built:
    return _deepsets(False)


@fit("deepsets_unused_layer", "deepsets", bug="a layer (set_norm) created in __init__ and never used in forward")
def deepsets_unused_layer() -> Built:
    return _deepsets(True)


# ---------------------------------------------------------------------------------------------------------------------
# 14. MLP-Mixer with LayerNorm only


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.tok = nn.Sequential(nn.Linear(tokens, 64), nn.GELU(), nn.Linear(64, tokens))
        self.ch = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.tok(self.n1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.ch(self.n2(x))


class Mixer(L.LightningModule):
    def __init__(self, dim: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.Sequential(*[MixerBlock(16, dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, 10)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        B = img.shape[0]
        p = img.view(B, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(B, 16, 4)
        return self.classifier(self.norm(self.blocks(self.embed(p))).mean(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.criterion(logits, y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=2e-3, weight_decay=0.05)
        return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)]


def _mixer(shuffled: bool) -> Built:
    Xt, yt, Xv, yv = digits()
    if shuffled:
        yt = yt[torch.randperm(len(yt), generator=torch.Generator().manual_seed(3))]
    Xt, Xv = Xt.view(-1, 8, 8), Xv.view(-1, 8, 8)
    m = Mixer()
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=256), 25, acc_eval(m, Xv, yv, 0.93))


@fit("mixer_digits", "mixer")
def mixer_digits() -> Built:
    return _mixer(False)


@fit("mixer_shuffled_labels", "mixer", bug="training labels shuffled independently of the images")
def mixer_shuffled_labels() -> Built:
    return _mixer(True)


# ---------------------------------------------------------------------------------------------------------------------
# 15. GRU seq2seq with teacher forcing: reverse a sequence of digits


V, BOS, T = 10, 10, 8


class Seq2Seq(L.LightningModule):
    def __init__(self, detach_bug: bool = False) -> None:
        super().__init__()
        self.src_emb = nn.Embedding(V, 32)
        self.tgt_emb = nn.Embedding(V + 1, 32)
        self.encoder = nn.GRU(32, 128, batch_first=True)
        self.decoder = nn.GRU(32, 128, batch_first=True)
        self.out = nn.Linear(128, V)
        self.detach_bug = detach_bug

    def forward(self, src: torch.Tensor, tgt: Optional[torch.Tensor] = None) -> torch.Tensor:
        _, h = self.encoder(self.src_emb(src))
        if self.detach_bug:
            h = h.detach()
        if tgt is not None:  # teacher forcing
            dec_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], 1)
            o, _ = self.decoder(self.tgt_emb(dec_in), h)
            return self.out(o)
        tok = torch.full_like(src[:, :1], BOS)
        logits = []
        for _ in range(src.shape[1]):
            o, h = self.decoder(self.tgt_emb(tok), h)
            step = self.out(o)
            logits.append(step)
            tok = step.argmax(-1)
        return torch.cat(logits, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        src, tgt = batch
        logits = self(src, tgt)
        loss = F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        src, tgt = batch
        self.log("val_loss", F.cross_entropy(self(src, tgt).reshape(-1, V), tgt.reshape(-1)))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _seq2seq(bug: bool) -> Built:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, V, (12000, T), generator=g)
    tgt = src.flip(1)
    m = Seq2Seq(bug)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            pred = m(src[10000:]).argmax(-1)
        a = (pred == tgt[10000:]).float().mean().item()
        return "tok_acc(greedy)", a, 0.1, a >= 0.9
    return Built(m, DataLoader(TensorDataset(src[:10000], tgt[:10000]), batch_size=128, shuffle=True),
                 DataLoader(TensorDataset(src[10000:], tgt[10000:]), batch_size=500), 12, ev,
                 trainer_kw={"gradient_clip_val": 1.0})


@fit("gru_seq2seq_reverse", "seq2seq")
def gru_seq2seq_reverse() -> Built:
    return _seq2seq(False)


@fit("seq2seq_detached_encoder", "seq2seq", bug="the encoder's final state is .detach()ed before the decoder")
def seq2seq_detached_encoder() -> Built:
    return _seq2seq(True)


# ---------------------------------------------------------------------------------------------------------------------
# 16. weight-tied character LM on Python's standard-library source


class TiedCharLM(L.LightningModule):
    def __init__(self, vocab: int, d: int = 128, lr: float = 3e-3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, num_layers=1, batch_first=True)
        self.drop = nn.Dropout(0.1)
        self.decoder = nn.Linear(d, vocab)
        self.decoder.weight = self.emb.weight  # weight tying
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.drop(self.emb(x)))
        return self.decoder(self.drop(h))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def _charlm(lr: float) -> Built:
    text = stdlib_text()
    chars = sorted(set(text))
    ids = torch.tensor(np.searchsorted(np.array(chars), np.array(list(text))))
    n = len(ids) // 65 * 65
    seqs = ids[:n].view(-1, 65)
    k = int(len(seqs) * 0.9)
    tr, va = seqs[:k], seqs[k:]
    tr = tr[:4000]
    va = va[:500]
    m = TiedCharLM(len(chars), lr=lr)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            logits = m(va[:, :-1])
        ce = F.cross_entropy(logits.reshape(-1, len(chars)), va[:, 1:].reshape(-1)).item()
        p = torch.bincount(tr[:, 1:].reshape(-1), minlength=len(chars)).float()
        p = (p + 1) / (p + 1).sum()
        base = -(torch.log(p)[va[:, 1:].reshape(-1)]).mean().item()
        return "val_ce", ce, base, ce < 0.7 * base
    return Built(m, DataLoader(TensorDataset(tr[:, :-1], tr[:, 1:]), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(va[:, :-1], va[:, 1:]), batch_size=250), 8, ev)


@fit("charlm_tied_stdlib", "charlm")
def charlm_tied_stdlib() -> Built:
    return _charlm(3e-3)


@fit("charlm_lr_too_low", "charlm", bug="Adam with lr=1e-6 (far too low)")
def charlm_lr_too_low() -> Built:
    return _charlm(1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# 17. focal loss on imbalanced synthetic data (one logit per example)


def focal_loss(logit: torch.Tensor, y: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    ce = F.binary_cross_entropy_with_logits(logit, y, reduction="none")
    p = torch.sigmoid(logit)
    pt = p * y + (1 - p) * (1 - y)
    a = alpha * y + (1 - alpha) * (1 - y)
    return (a * (1 - pt) ** gamma * ce).mean()


class FocalNet(L.LightningModule):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = focal_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", focal_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    pos, neg = score[y == 1], score[y == 0]
    return ((pos[:, None] > neg[None, :]).float().mean() + 0.5 * (pos[:, None] == neg[None, :]).float().mean()).item()


@fit("focal_imbalanced", "focal")
def focal_imbalanced() -> Built:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6000, 12, generator=g)
    s = X[:, 0] + X[:, 1] * X[:, 2] + 0.5 * X[:, 3] ** 2 + 0.3 * torch.randn(6000, generator=g)
    y = (s > torch.quantile(s, 0.95)).float()  # 5% positives
    Xt, yt, Xv, yv = X[:5000], y[:5000], X[5000:], y[5000:]
    m = FocalNet(12)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            a = auc(m(Xv), yv)
        return "auc", a, 0.5, a > 0.9
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=128, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=1000), 15, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 18. frozen-backbone fine-tuning: backbone pretrained in-process on digits 0-4, head trained on 5-9


class FineTune(L.LightningModule):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(1024, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y - 5)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y - 5))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


@fit("frozen_backbone_finetune", "finetune")
def frozen_backbone_finetune() -> Built:
    Xt, yt, Xv, yv = digits()
    lo = yt < 5
    backbone = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    train_plain(nn.Sequential(backbone, nn.Linear(1024, 5)), Xt[lo], yt[lo], 10)
    backbone.train()
    hi, hv = yt >= 5, yv >= 5
    m = FineTune(backbone)
    return Built(m, DataLoader(TensorDataset(Xt[hi], yt[hi]), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(Xv[hv], yv[hv]), batch_size=256), 15,
                 acc_eval(m, Xv[hv], yv[hv] - 5, 0.85))


# ---------------------------------------------------------------------------------------------------------------------
# 19-25. scikit-learn tables with unusual but sane choices


class TableNet(L.LightningModule):
    """A small MLP whose loss and optimiser differ per fit (set as attributes by each builder)."""

    def __init__(self, d_in: int, d_out: int, hidden: int = 64, log_softmax: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
        self.log_softmax = log_softmax
        self.opt_fn: Callable[[Any], Any] = lambda params: torch.optim.Adam(params, lr=1e-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return F.log_softmax(out, -1) if self.log_softmax else out

    def compute_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return self.criterion(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.compute_loss(batch))

    def configure_optimizers(self) -> Any:
        return self.opt_fn(self.parameters())


@fit("swa_wine", "tables")
def swa_wine() -> Built:
    d = datasets.load_wine()
    tr, va = _split(len(d.target), 0.25)
    Xt, Xv = standardized(d.data, tr, va)
    yt, yv = torch.tensor(d.target[tr]), torch.tensor(d.target[va])
    m = TableNet(13, 3, 32)
    m.criterion = nn.CrossEntropyLoss()
    m.opt_fn = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=16, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=64), 40, acc_eval(m, Xv, yv, 0.9),
                 callbacks=[StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=0.6)])


@fit("iris_logsoftmax_nll_sgd", "tables")
def iris_logsoftmax_nll_sgd() -> Built:
    d = datasets.load_iris()
    tr, va = _split(len(d.target), 0.3)
    Xt, Xv = standardized(d.data, tr, va)
    yt, yv = torch.tensor(d.target[tr]), torch.tensor(d.target[va])
    m = TableNet(4, 3, 16, log_softmax=True)
    m.criterion = nn.NLLLoss()
    m.opt_fn = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=8, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=64), 40, acc_eval(m, Xv, yv, 0.9))


@fit("diabetes_huber_raw_target", "tables")
def diabetes_huber_raw_target() -> Built:
    """Unusual: the raw target (25-346) with a Huber loss of delta 20, features as shipped (already scaled)."""
    d = datasets.load_diabetes()
    tr, va = _split(len(d.target), 0.2, seed=2)
    Xt = torch.tensor(d.data[tr] / d.data[tr].std(0), dtype=torch.float32)
    Xv = torch.tensor(d.data[va] / d.data[tr].std(0), dtype=torch.float32)
    yt = torch.tensor(d.target[tr], dtype=torch.float32)
    yv = torch.tensor(d.target[va], dtype=torch.float32)
    m = TableNet(10, 1, 32)
    m.criterion = nn.HuberLoss(delta=20.0)
    m.compute_loss = lambda batch: m.criterion(m(batch[0]).squeeze(-1), batch[1])
    m.opt_fn = lambda p: torch.optim.Adam(p, lr=1e-2)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            p = m(Xv).squeeze(-1)
        v, base = r2(p, yv, yt.mean())
        return "r2", v, base, v > 0.38
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=128), 60, ev)


@fit("breast_cancer_hinge", "tables")
def breast_cancer_hinge() -> Built:
    """Unusual: a linear-SVM-style hinge loss on targets in {-1, +1}, one output."""
    d = datasets.load_breast_cancer()
    tr, va = _split(len(d.target), 0.25)
    Xt, Xv = standardized(d.data, tr, va)
    yt = torch.tensor(d.target[tr] * 2.0 - 1, dtype=torch.float32)
    yv = torch.tensor(d.target[va] * 2.0 - 1, dtype=torch.float32)
    m = TableNet(30, 1, 32)
    m.compute_loss = lambda batch: torch.clamp(1 - batch[1] * m(batch[0]).squeeze(-1), min=0).mean()
    m.opt_fn = lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-3)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            a = ((m(Xv).squeeze(-1) > 0).float() * 2 - 1 == yv).float().mean().item()
        base = max((yv == 1).float().mean().item(), (yv == -1).float().mean().item())
        return "acc", a, base, a > 0.93
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=256), 30, ev)


@fit("linnerud_lbfgs_fullbatch", "tables")
def linnerud_lbfgs_fullbatch() -> Built:
    """Unusual: 20 rows; waist from weight, chins and situps; full-batch LBFGS on 15 rows, 5 held out; a linear
    model with a small L2 penalty (a hidden tanh layer overfit the 15 rows)."""
    d = datasets.load_linnerud()
    X = np.c_[d.target[:, 0], d.data[:, 0], d.data[:, 1]]
    y = d.target[:, 1]
    tr, va = _split(20, 5, seed=4)
    Xt, Xv = standardized(X, tr, va)
    yt = torch.tensor(y[tr], dtype=torch.float32)
    yv = torch.tensor(y[va], dtype=torch.float32)
    m = TableNet(3, 1, 8)
    m.net = nn.Sequential(nn.Linear(3, 1))
    m.criterion = nn.MSELoss()
    m.compute_loss = lambda batch: m.criterion(m(batch[0]).squeeze(-1), batch[1]) + 1e-3 * sum(
        (p ** 2).sum() for n_, p in m.named_parameters() if "weight" in n_)
    m.opt_fn = lambda p: torch.optim.LBFGS(p, lr=0.5, max_iter=20, history_size=10)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            p = m(Xv).squeeze(-1)
        v, base = r2(p, yv, yt.mean())
        return "r2", v, base, v > 0.5
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=15, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=5), 30, ev)


@dataclass
class ClassifierOutput:
    """What a Hugging Face-style model returns: the loss when labels are given, and the logits."""
    loss: Optional[torch.Tensor]
    logits: torch.Tensor


class WineHF(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(13, 64), nn.GELU(), nn.LayerNorm(64), nn.Dropout(0.1))
        self.classifier = nn.Linear(64, 3)

    def forward(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None) -> ClassifierOutput:
        logits = self.classifier(self.encoder(features))
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1) if labels is not None else None
        return ClassifierOutput(loss=loss, logits=logits)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(**batch)
        self.log("train_loss", out.loss)
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(**batch)
        self.log("val_loss", out.loss)
        self.log("val_acc", (out.logits.argmax(-1) == batch["labels"]).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.01)


class DictTable(Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.X[i], "labels": self.y[i]}


@fit("wine_hf_style_output", "tables")
def wine_hf_style_output() -> Built:
    d = datasets.load_wine()
    tr, va = _split(len(d.target), 0.25, seed=1)
    Xt, Xv = standardized(d.data, tr, va)
    yt, yv = torch.tensor(d.target[tr]), torch.tensor(d.target[va])
    m = WineHF()
    return Built(m, DataLoader(DictTable(Xt, yt), batch_size=16, shuffle=True),
                 DataLoader(DictTable(Xv, yv), batch_size=64), 30,
                 acc_eval(m, Xv, yv, 0.9, fwd=lambda x: m(x).logits))


# ---------------------------------------------------------------------------------------------------------------------
# 26. gradient clipping + bf16-mixed: a small CNN on digits


class SmallCNN(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                                      nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["images"]), batch["labels"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch["images"]), batch["labels"]))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.MultiStepLR(opt, [12, 18], 0.1)}


class DigitImages(Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = (X.view(-1, 1, 8, 8) - 0.3) / 0.4, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"images": self.X[i], "labels": self.y[i]}


@fit("cnn_bf16_clip", "precision")
def cnn_bf16_clip() -> Built:
    Xt, yt, Xv, yv = digits()
    m = SmallCNN()
    return Built(m, DataLoader(DigitImages(Xt, yt), batch_size=32, shuffle=True),
                 DataLoader(DigitImages(Xv, yv), batch_size=256), 20,
                 acc_eval(m, ((Xv.view(-1, 1, 8, 8) - 0.3) / 0.4), yv, 0.93),
                 trainer_kw={"precision": "bf16-mixed", "gradient_clip_val": 0.5})


# ---------------------------------------------------------------------------------------------------------------------
# running


def run_plain(f: Fit, root: str) -> dict[str, Any]:
    """The same fit without the recipe: its metric shows whether the recipe changed the outcome."""
    L.seed_everything(0, verbose=False)
    b = f.build()
    trainer = L.Trainer(max_epochs=b.epochs, callbacks=list(b.callbacks), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        default_root_dir=root, **b.trainer_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(b.module, b.train, b.val)
    name, v, base, good = b.evaluate()
    return {"name": name, "value": v, "baseline": base, "good": bool(good)}


def run(f: Fit, root: str) -> dict[str, Any]:
    import lightning_recipe as lr

    res: dict[str, Any] = {"name": f.name, "kind": f.kind, "family": f.family, "bug": f.bug, "findings": [],
                           "notes": [], "skips": [], "recipe_warnings": [], "crash": None, "metric": None}
    t0 = time.time()
    L.seed_everything(0, verbose=False)
    b = f.build()
    trainer = L.Trainer(max_epochs=b.epochs, callbacks=[*b.callbacks, *lr.recommended()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1, default_root_dir=root, **b.trainer_kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(b.module, b.train, b.val)
        except Exception as err:
            tb = traceback.extract_tb(err.__traceback__)
            where = next((f"{os.path.relpath(fr.filename, os.path.dirname(lr.__file__))}:{fr.lineno} in {fr.name}"
                          for fr in reversed(tb) if "lightning_recipe" in fr.filename), "")
            res["crash"] = f"{type(err).__name__}: {err} [{where}]"[:1500]
    res["recipe_warnings"] = [str(w.message) for w in caught if issubclass(w.category, lr.RecipeWarning)]
    res["other_warnings"] = sorted({f"{w.category.__name__}: {str(w.message)[:200]}" for w in caught
                                    if not issubclass(w.category, lr.RecipeWarning)
                                    and "lightning_recipe" in (w.filename or "")})
    for fd in lr.collect_findings(trainer):
        entry = {"check": fd.check, "status": fd.status, "message": fd.message,
                 "measured": repr(getattr(fd, "measured", None))[:300],
                 "expected": repr(getattr(fd, "expected", None))[:300]}
        key = {"warn": "findings", "fail": "findings", "note": "notes", "skip": "skips"}.get(fd.status)
        if key:
            res[key].append(entry)
    try:
        name, v, base, good = b.evaluate()
        res["metric"] = {"name": name, "value": v, "baseline": base, "good": bool(good)}
    except Exception as err:
        res["metric"] = {"name": "error", "value": float("nan"), "baseline": float("nan"), "good": False,
                         "error": f"{type(err).__name__}: {err}"[:300]}
    res["seconds"] = time.time() - t0
    return res


def rules(r: dict[str, Any]) -> list[str]:
    out = {f"{f['check']}[{f['status']}]" for f in r["findings"]}
    classes = {f["check"].split(".")[0] for f in r["findings"]}
    for w in r["recipe_warnings"]:
        cls = w.split(":")[0].split(".")[0].strip()
        if cls not in classes:
            out.add(f"RecipeWarning({w[:60]})")
    return sorted(out) + (["crash"] if r["crash"] else [])


def row(r: dict[str, Any]) -> str:
    m = r["metric"] or {}
    mt = f"{m.get('name', '-')} {m.get('value', float('nan')):.3f} (base {m.get('baseline', float('nan')):.3f})"
    good = "good" if m.get("good") else "NOT GOOD"
    rl = rules(r)
    verdict = ("ok" if not rl else "ALARM") if r["kind"] == "healthy" else ("caught" if rl else "MISSED")
    plain = ""
    if r.get("plain_metric"):
        pm = r["plain_metric"]
        plain = f" [without the recipe: {pm['value']:.3f} {'good' if pm['good'] else 'NOT GOOD'}]"
        if pm["good"] and not m.get("good"):
            verdict = "HARMED"
    return (f"{r['name']:28s} {r['kind']:7s} {verdict:6s} {r['seconds']:5.1f}s {mt:40s} {good:8s}"
            f" {', '.join(rl)}{plain}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="a fit name, a comma-separated list of names, or 'healthy' / 'broken'")
    p.add_argument("--json", help="write every result (full finding messages) to this file")
    p.add_argument("--verbose", action="store_true", help="print Lightning's own output")
    p.add_argument("--plain", action="store_true",
                   help="also fit each healthy fit without the recipe and print its metric (does the recipe change it?)")
    args = p.parse_args()
    torch.set_num_threads(1)
    fits = FITS
    if args.only in ("healthy", "broken"):
        fits = [f for f in FITS if f.kind == args.only]
    elif args.only:
        names = set(args.only.split(","))
        unknown = names - {f.name for f in FITS}
        if unknown:
            p.error(f"unknown fit(s) {sorted(unknown)}; known: {[f.name for f in FITS]}")
        fits = [f for f in FITS if f.name in names]
    for log in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(log).setLevel(logging.ERROR)
    print(f"{len(fits)} fits ({sum(f.kind == 'healthy' for f in fits)} healthy, "
          f"{sum(f.kind == 'broken' for f in fits)} broken)", flush=True)
    results = []
    t0 = time.time()
    for f in fits:
        sink = io.StringIO()
        with tempfile.TemporaryDirectory(prefix="blind-") as root:
            ctx = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(sink)
            ctx2 = contextlib.nullcontext() if args.verbose else contextlib.redirect_stderr(sink)
            with ctx, ctx2:
                r = run(f, root)
                if args.plain and f.kind == "healthy":
                    r["plain_metric"] = run_plain(f, root)
        results.append(r)
        print(row(r), flush=True)
    healthy = [r for r in results if r["kind"] == "healthy"]
    # a healthy fit counts when its metric is good, with the recipe or (--plain) without it: a fit that the recipe
    # made worse is counted, and alarmed
    healthy_good = [r for r in healthy if (r["metric"] or {}).get("good") or r["crash"]
                    or (r.get("plain_metric") or {}).get("good")]
    broken = [r for r in results if r["kind"] == "broken"]
    print(f"\nhealthy alarmed {sum(bool(rules(r)) for r in healthy_good)}/{len(healthy_good)}"
          f" (healthy fits whose metric was not good, not counted: {[r['name'] for r in healthy if r not in healthy_good]})")
    harmed = [r["name"] for r in healthy_good if not (r["metric"] or {}).get("good")]
    print(f"healthy fits the recipe made worse (good without it, not with it): {harmed}")
    print(f"healthy with a RecipeWarning {sum(bool(r['recipe_warnings']) for r in healthy_good)}/{len(healthy_good)}")
    print(f"broken caught {sum(bool(rules(r)) for r in broken)}/{len(broken)} (by a warn/fail finding: "
          f"{sum(bool(r['findings']) for r in broken)}/{len(broken)}; the rest only by a configuration RecipeWarning)")
    print(f"total {time.time() - t0:.0f}s")
    print("\nalarms on healthy fits:")
    for r in healthy_good:
        if r["name"] in harmed:
            print(f"  {r['name']}: HARMED: {r['metric']} with the recipe, {r['plain_metric']} without")
        for fd in r["findings"]:
            print(f"  {r['name']}: {fd['check']} [{fd['status']}] {fd['message']}")
        if r["crash"]:
            print(f"  {r['name']}: crash {r['crash']}")
        classes = {fd["check"].split(".")[0] for fd in r["findings"]}
        for w in r["recipe_warnings"]:
            if w.split(":")[0].split(".")[0].strip() not in classes:
                print(f"  {r['name']}: RecipeWarning without a warn/fail finding: {w}")
    print("\nbroken fits:")
    for r in broken:
        print(f"  {r['name']} ({r['bug']}): {', '.join(rules(r)) or 'MISSED'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
