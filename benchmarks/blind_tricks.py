"""Blind fits for ``lightning_recipe.recommended()``: training tricks that look odd to a checker but are healthy, each
with a broken twin that carries one real bug.

Uses blind.py's registry, helpers and runner; only the fits below are registered, so

    python benchmarks/blind_tricks.py                               # every fit here, one at a time
    python benchmarks/blind_tricks.py --only uncertainty_multitask  # one fit (or a list, or "healthy"/"broken")
    python benchmarks/blind_tricks.py --json out.json               # every result, findings with their full messages
    python benchmarks/blind_tricks.py --plain                       # also each healthy fit without the recipe

Families: uncertainty-weighted multitask learning (learned homoscedastic log-variances, Kendall et al.), the classic
char-level LSTM language model (tied weights, SGD at lr 20, gradient clipping at 0.25, truncated BPTT with the hidden
state carried across batches, the LR divided by 4 every epoch), a residual MLP whose residual branches start at zero,
a classifier with spectral norm on every layer, a regressor that denormalizes its output inside ``forward``, an
imbalanced classifier balanced by a ``WeightedRandomSampler``, validation four times an epoch with ``EarlyStopping``,
an endless ``IterableDataset`` stream bounded by ``max_steps``, and gradient accumulation under a per-step
warmup-cosine ``LambdaLR``. Broken fits carry one named bug each.

Data: scikit-learn's digits and diabetes, Python's standard-library source text, a synthetic regression stream.
Nothing is downloaded.
"""

from __future__ import annotations

import glob
import math
import os
import sys
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping
from sklearn import datasets
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, WeightedRandomSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blind  # noqa: E402

from blind import Built, acc_eval, fit, r2  # noqa: E402

blind.FITS.clear()


# ---------------------------------------------------------------------------------------------------------------------
# data


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def digit_splits(seed: int = 0) -> Arrays:
    """Digits in [0, 1] as float32 arrays, stratified train / val / test (68% / 12% / 20%)."""
    X, y = datasets.load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    Xtr, Xva, ytr, yva = train_test_split(Xtr, ytr, test_size=0.15, random_state=seed, stratify=ytr)
    return Xtr, ytr, Xva, yva, Xte, yte


def t(x: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.as_tensor(x, dtype=dtype)


def pairs(X: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(t(X), t(y, torch.long))


def r2_own_mean(pred: torch.Tensor, y: torch.Tensor) -> float:
    """The ordinary R² (against the constant prediction of y's own mean)."""
    return r2(pred.double(), y.double(), y.double().mean())[0]


# ---------------------------------------------------------------------------------------------------------------------
# 1. Uncertainty-weighted multitask (Kendall et al.): digit class + mean pixel intensity, learned log-variances


class UncertaintyMultiTask(L.LightningModule):
    def __init__(self, lr: float = 1e-3, detach_log_var: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.trunk = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU())
        self.cls_head = nn.Linear(128, 10)
        self.reg_head = nn.Linear(128, 1)
        # homoscedastic uncertainty: s = log(sigma^2), one per task
        self.log_var_cls = nn.Parameter(torch.zeros(()))
        self.log_var_reg = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.cls_head(h), self.reg_head(h).squeeze(-1)

    def _loss(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y_cls, y_reg = batch
        logits, reg = self(x)
        ce = F.cross_entropy(logits, y_cls)
        mse = F.mse_loss(reg, y_reg)
        s_cls, s_reg = self.log_var_cls, self.log_var_reg
        if self.hparams.detach_log_var:
            s_cls, s_reg = s_cls.detach(), s_reg.detach()
        loss = torch.exp(-s_cls) * ce + s_cls + 0.5 * torch.exp(-s_reg) * mse + 0.5 * s_reg
        acc = (logits.argmax(-1) == y_cls).float().mean()
        return loss, ce, mse, acc

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss, ce, mse, acc = self._loss(batch)
        self.log_dict({"train_loss": loss, "train_ce": ce, "train_mse": mse,
                       "sigma_cls": torch.exp(0.5 * self.log_var_cls),
                       "sigma_reg": torch.exp(0.5 * self.log_var_reg)})
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        loss, ce, mse, acc = self._loss(batch)
        self.log_dict({"val_loss": loss, "val_ce": ce, "val_mse": mse, "val_acc": acc}, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _multitask(detach: bool) -> Built:
    Xtr, ytr, Xva, yva, Xte, yte = digit_splits()
    m_pix, s_pix = Xtr.mean(1).mean(), Xtr.mean(1).std()

    def reg(X: np.ndarray) -> torch.Tensor:
        return t((X.mean(1) - m_pix) / s_pix)
    tr = TensorDataset(t(Xtr), t(ytr, torch.long), reg(Xtr))
    va = TensorDataset(t(Xva), t(yva, torch.long), reg(Xva))
    m = UncertaintyMultiTask(detach_log_var=detach)

    def ev() -> tuple:
        """Both tasks learned (acc > 0.9, R² > 0.8) and the task weights learned: the mean |log-variance| has left its
        initial 0 (the healthy fit ends near sigma_cls 0.78, sigma_reg 0.69, i.e. |s| about 0.6)."""
        m.eval()
        with torch.no_grad():
            logits, r = m(t(Xte))
        m.train()
        a = (logits.argmax(-1).numpy() == yte).mean().item()
        rv = r2_own_mean(r, reg(Xte))
        s = (abs(m.log_var_cls.item()) + abs(m.log_var_reg.item())) / 2
        return f"|log_var| (acc {a:.2f}, R2 {rv:.2f})", s, 0.0, a > 0.9 and rv > 0.8 and s > 0.1
    return Built(m, DataLoader(tr, batch_size=64, shuffle=True), DataLoader(va, batch_size=256), 30, ev)


@fit("uncertainty_multitask", "multitask")
def uncertainty_multitask() -> Built:
    return _multitask(False)


@fit("multitask_log_variance_detached", "multitask",
     bug="the log-variances enter the loss .detach()ed: they get no gradient, the task weights stay at their init")
def multitask_log_variance_detached() -> Built:
    return _multitask(True)


# ---------------------------------------------------------------------------------------------------------------------
# 2. The classic char-level LSTM language model (PyTorch's word_language_model, at character level)


def stdlib_corpus() -> str:
    import argparse
    import collections
    import dataclasses
    import fractions
    import inspect
    import json
    import textwrap
    text = ""
    for mod in (collections, argparse, json, textwrap, dataclasses, fractions, inspect):
        files = [mod.__file__]
        if mod.__file__.endswith("__init__.py"):
            files = sorted(glob.glob(os.path.join(os.path.dirname(mod.__file__), "*.py")))
        for f in files:
            with open(f, encoding="utf-8") as fh:
                text += fh.read()
    return text


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()  # (T, B)


class BPTTChunks(Dataset):
    """Consecutive (T, B) chunks of ``bptt`` steps; the target is the input shifted by ``shift`` positions."""

    def __init__(self, source: torch.Tensor, bptt: int, shift: int = 1) -> None:
        self.source, self.bptt, self.shift = source, bptt, shift
        self.starts = list(range(0, source.size(0) - 1, bptt))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.starts[i]
        seq_len = min(self.bptt, self.source.size(0) - 1 - s)
        return self.source[s:s + seq_len], self.source[s + self.shift:s + self.shift + seq_len]


class RNNModel(L.LightningModule):
    def __init__(self, ntoken: int, ninp: int = 200, nhid: int = 200, nlayers: int = 2, dropout: float = 0.2,
                 lr: float = 20.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.decoder.weight = self.encoder.weight  # weight tying
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        self.hidden: tuple[torch.Tensor, torch.Tensor] | None = None
        self.val_hidden: tuple[torch.Tensor, torch.Tensor] | None = None
        self.lr = lr

    def init_hidden(self, bsz: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = next(self.parameters())
        return (w.new_zeros(self.hparams.nlayers, bsz, self.hparams.nhid),
                w.new_zeros(self.hparams.nlayers, bsz, self.hparams.nhid))

    def forward(self, inp: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, tuple]:
        output, hidden = self.rnn(self.drop(self.encoder(inp)), hidden)
        decoded = self.decoder(self.drop(output))
        return F.log_softmax(decoded.view(-1, self.hparams.ntoken), dim=1), hidden

    def on_train_epoch_start(self) -> None:
        self.hidden = None

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        data, targets = batch
        if self.hidden is None or self.hidden[0].size(1) != data.size(1):
            self.hidden = self.init_hidden(data.size(1))
        hidden = tuple(v.detach() for v in self.hidden)  # repackage: truncated BPTT
        output, self.hidden = self(data, hidden)
        loss = F.nll_loss(output, targets.reshape(-1))
        self.log("train_loss", loss)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_hidden = None

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        data, targets = batch
        if self.val_hidden is None:
            self.val_hidden = self.init_hidden(data.size(1))
        output, self.val_hidden = self(data, self.val_hidden)
        self.log("val_loss", F.nll_loss(output, targets.reshape(-1)), batch_size=targets.numel())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.25)  # anneal the LR 4x every epoch
        return [opt], [sched]


def _char_lm(shift: int) -> Built:
    text = stdlib_corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = len(ids)
    ntr, nva = int(n * 0.8), int(n * 0.1)
    train_ids, val_ids, test_ids = ids[:ntr][:250_000], ids[ntr:ntr + nva], ids[ntr + nva:]
    bptt = 35
    train_data, val_data, test_data = batchify(train_ids, 20), batchify(val_ids, 10), batchify(test_ids, 10)
    m = RNNModel(len(chars), ninp=128, nhid=128, nlayers=2, dropout=0.2, lr=20.0)

    def ev() -> tuple:
        """Test perplexity of the next character (always the true next character, whatever the fit trained on),
        against the unigram model's: good below 0.4 of it."""
        m.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            hidden = m.init_hidden(10)
            for data, targets in BPTTChunks(test_data, bptt):
                out, hidden = m(data, hidden)
                total += F.nll_loss(out, targets.reshape(-1), reduction="sum").item()
                count += targets.numel()
        m.train()
        ppl = math.exp(total / count)
        p = torch.bincount(train_ids, minlength=len(chars)).double() + 1
        p = p / p.sum()
        uni = math.exp(-torch.log(p[test_ids]).mean().item())
        return "test_ppl", ppl, uni, ppl < 0.4 * uni
    return Built(m, DataLoader(BPTTChunks(train_data, bptt, shift), batch_size=None, shuffle=False),
                 DataLoader(BPTTChunks(val_data, bptt, shift), batch_size=None, shuffle=False), 4, ev,
                 trainer_kw={"gradient_clip_val": 0.25})


@fit("char_lm_classic", "char_lm")
def char_lm_classic() -> Built:
    return _char_lm(1)


@fit("char_lm_inputs_equal_targets", "char_lm",
     bug="the targets are the inputs themselves (no shift by one): the model learns to copy its input character")
def char_lm_inputs_equal_targets() -> Built:
    return _char_lm(0)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Residual MLP whose residual branches start at zero (every block is the identity at init), SGD + cosine


class ResBlock(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(F.relu(x))))


class ZeroInitResMLP(L.LightningModule):
    def __init__(self, width: int = 128, depth: int = 6, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.Sequential(*[ResBlock(width, 2 * width) for _ in range(depth)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.blocks(self.stem(x))))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_epochs)
        return [opt], [sched]


@fit("zero_init_residual", "residual")
def zero_init_residual() -> Built:
    Xtr, ytr, Xva, yva, Xte, yte = digit_splits()
    m = ZeroInitResMLP()
    return Built(m, DataLoader(pairs(Xtr, ytr), batch_size=64, shuffle=True),
                 DataLoader(pairs(Xva, yva), batch_size=256), 25, acc_eval(m, t(Xte), t(yte, torch.long), 0.93))


# ---------------------------------------------------------------------------------------------------------------------
# 4. Spectral norm on every layer (a 1-Lipschitz classifier) on standardized digits


class SNClassifier(L.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            spectral_norm(nn.Linear(64, 256)), nn.ReLU(),
            spectral_norm(nn.Linear(256, 256)), nn.ReLU(),
            spectral_norm(nn.Linear(256, 10)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("spectral_norm_classifier", "spectral_norm")
def spectral_norm_classifier() -> Built:
    Xtr, ytr, Xva, yva, Xte, yte = digit_splits()
    sc = StandardScaler().fit(Xtr)  # a Lipschitz-bounded net: give it unit-scale inputs
    Xtr, Xva, Xte = (sc.transform(a).astype(np.float32) for a in (Xtr, Xva, Xte))
    m = SNClassifier(lr=3e-3)
    return Built(m, DataLoader(pairs(Xtr, ytr), batch_size=64, shuffle=True),
                 DataLoader(pairs(Xva, yva), batch_size=256), 50, acc_eval(m, t(Xte), t(yte, torch.long), 0.9))


# ---------------------------------------------------------------------------------------------------------------------
# 5. A regressor that denormalizes inside forward (head * y_std + y_mean, buffers), diabetes targets in raw units


class DenormRegressor(L.LightningModule):
    def __init__(self, n_in: int, y_mean: float, y_std: float, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["y_mean", "y_std"])
        self.register_buffer("y_mean", torch.tensor(float(y_mean)))
        self.register_buffer("y_std", torch.tensor(float(y_std)))
        self.body = nn.Sequential(nn.Linear(n_in, 32), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).squeeze(-1) * self.y_std + self.y_mean

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_mse", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        pred = self(x)
        self.log("val_loss", F.mse_loss(pred, y))
        self.log("val_mae", (pred - y).abs().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=1e-3)


def _denorm(standardize_targets: bool) -> Built:
    X, y = datasets.load_diabetes(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=1)
    Xtr, Xva, ytr, yva = train_test_split(Xtr, ytr, test_size=0.15, random_state=1)
    sc = StandardScaler().fit(Xtr)
    Xtr, Xva, Xte = (sc.transform(a).astype(np.float32) for a in (Xtr, Xva, Xte))
    mu, sd = ytr.mean(), ytr.std()
    m = DenormRegressor(X.shape[1], mu, sd)
    # the bug: the dataset's targets are standardized too, so forward's "* std + mean" undoes a scaling never applied
    ytr_ds, yva_ds = ((ytr - mu) / sd, (yva - mu) / sd) if standardize_targets else (ytr, yva)
    yte_t = t(yte)

    def ev() -> tuple:
        """Test R² of the predictions in the targets' raw units; the baseline is the training mean's R²."""
        m.eval()
        with torch.no_grad():
            p = m(t(Xte))
        m.train()
        v = r2_own_mean(p, yte_t)
        base = r2_own_mean(torch.full_like(yte_t, float(mu)), yte_t)
        return "r2", v, base, v > 0.35
    return Built(m, DataLoader(TensorDataset(t(Xtr), t(ytr_ds)), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(t(Xva), t(yva_ds)), batch_size=256), 40, ev)


@fit("denormalizing_regressor", "denormalize")
def denormalizing_regressor() -> Built:
    return _denorm(False)


@fit("denormalizing_double", "denormalize",
     bug="the dataset's targets are standardized as well, and forward still applies * y_std + y_mean: the "
         "predictions live in the wrong units and the loss stays huge")
def denormalizing_double() -> Built:
    return _denorm(True)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Imbalanced digits (classes 0-4 cut to 10%) balanced by a WeightedRandomSampler


class MLPClassifier(L.LightningModule):
    def __init__(self, n_in: int = 64, n_cls: int = 10, hidden: int = 128, lr: float = 1e-3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_cls))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def subsample_minority(X: np.ndarray, y: np.ndarray, rng: np.random.Generator,
                       frac: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    keep = np.ones(len(y), bool)
    for c in range(5):
        idx = np.where(y == c)[0]
        drop = rng.choice(idx, size=len(idx) - max(1, int(round(frac * len(idx)))), replace=False)
        keep[drop] = False
    return X[keep], y[keep]


@fit("weighted_sampler_imbalanced", "imbalanced")
def weighted_sampler_imbalanced() -> Built:
    rng = np.random.default_rng(0)
    Xtr, ytr, Xva, yva, Xte, yte = digit_splits()
    Xtr, ytr = subsample_minority(Xtr, ytr, rng)
    Xva, yva = subsample_minority(Xva, yva, rng)
    Xte, yte = subsample_minority(Xte, yte, rng)
    class_counts = np.bincount(ytr, minlength=10)
    ds = pairs(Xtr, ytr)
    sampler = WeightedRandomSampler(torch.as_tensor(1.0 / class_counts[ytr], dtype=torch.double),
                                    num_samples=len(ds), replacement=True)
    m = MLPClassifier()

    def ev() -> tuple:
        """Balanced accuracy (mean per-class recall) on the equally imbalanced test set; good also needs acc > 0.85."""
        m.eval()
        with torch.no_grad():
            pred = m(t(Xte)).argmax(-1).numpy()
        m.train()
        acc = float((pred == yte).mean())
        bal = float(np.mean([(pred[yte == c] == c).mean() for c in range(10)]))
        return "balanced_acc", bal, 0.1, acc > 0.85 and bal > 0.8
    return Built(m, DataLoader(ds, batch_size=32, sampler=sampler),
                 DataLoader(pairs(Xva, yva), batch_size=256), 40, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Validation four times an epoch (val_check_interval=0.25) and EarlyStopping(patience=3) on val_loss


@fit("val_interval_early_stop", "early_stopping")
def val_interval_early_stop() -> Built:
    Xtr, ytr, Xva, yva, Xte, yte = digit_splits()
    m = MLPClassifier(dropout=0.2)
    es = EarlyStopping(monitor="val_loss", patience=3)
    acc = acc_eval(m, t(Xte), t(yte, torch.long), 0.93)

    def ev() -> tuple:
        """Test accuracy > 0.93, and EarlyStopping ended the fit well before max_epochs=200."""
        name, v, base, good = acc()
        return name, v, base, good and m.trainer.current_epoch < 199
    return Built(m, DataLoader(pairs(Xtr, ytr), batch_size=32, shuffle=True),
                 DataLoader(pairs(Xva, yva), batch_size=256), 200, ev,
                 trainer_kw={"val_check_interval": 0.25}, callbacks=[es])


# ---------------------------------------------------------------------------------------------------------------------
# 8. An endless IterableDataset stream of synthetic regression samples, bounded by max_steps, validated every 250


D_STREAM = 8
W_STREAM = torch.randn(D_STREAM, generator=torch.Generator().manual_seed(123))


def stream_target(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * x[..., 0]) + x[..., 1] * x[..., 2] + x[..., 3:] @ W_STREAM[3:] * 0.5


class SyntheticStream(IterableDataset):
    def __init__(self, seed: int = 0, noise: float = 0.1, reseed_every_item: bool = False) -> None:
        self.seed, self.noise, self.reseed_every_item = seed, noise, reseed_every_item

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            if self.reseed_every_item:  # the bug: a fresh generator, same seed, for every sample
                g = torch.Generator().manual_seed(self.seed)
            x = torch.randn(D_STREAM, generator=g)
            y = stream_target(x) + self.noise * torch.randn((), generator=g)
            yield x, y


class StreamRegressor(L.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(D_STREAM, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _stream(same_sample: bool) -> Built:
    g = torch.Generator().manual_seed(999)
    Xva = torch.randn(2000, D_STREAM, generator=g)
    yva = stream_target(Xva) + 0.1 * torch.randn(2000, generator=g)
    Xte = torch.randn(2000, D_STREAM, generator=g)
    yte = stream_target(Xte) + 0.1 * torch.randn(2000, generator=g)
    m = StreamRegressor()

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            p = m(Xte)
        m.train()
        v = r2_own_mean(p, yte)
        return "r2", v, 0.0, v > 0.8
    return Built(m, DataLoader(SyntheticStream(reseed_every_item=same_sample), batch_size=64),
                 DataLoader(TensorDataset(Xva, yva), batch_size=500), -1, ev,
                 trainer_kw={"max_steps": 1500, "val_check_interval": 250})


@fit("iterable_stream", "stream")
def iterable_stream() -> Built:
    return _stream(False)


@fit("stream_same_sample", "stream",
     bug="the stream's generator is re-seeded inside __iter__ for every item: it yields the same sample forever")
def stream_same_sample() -> Built:
    return _stream(True)


# ---------------------------------------------------------------------------------------------------------------------
# 9. Gradient accumulation (4 batches) under a per-step linear-warmup + cosine LambdaLR, a small CNN on digits


class DigitsCNN(L.LightningModule):
    def __init__(self, lr: float = 3e-3, weight_decay: float = 0.01, warmup_frac: float = 0.1,
                 warmup_in_samples: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x.view(-1, 1, 8, 8)))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)  # optimizer steps
        warmup = max(1, int(self.hparams.warmup_frac * total))
        if self.hparams.warmup_in_samples:
            # the bug: the warmup counted in training samples (steps x accumulation x batch size), while LambdaLR
            # counts optimizer steps
            samples = total * self.trainer.accumulate_grad_batches * self.trainer.train_dataloader.batch_size
            warmup = max(1, int(self.hparams.warmup_frac * samples))

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


def _accum(warmup_in_samples: bool) -> Built:
    Xtr, ytr, Xva, yva, Xte, yte = digit_splits()
    m = DigitsCNN(warmup_in_samples=warmup_in_samples)
    return Built(m, DataLoader(pairs(Xtr, ytr), batch_size=32, shuffle=True),
                 DataLoader(pairs(Xva, yva), batch_size=256), 20, acc_eval(m, t(Xte), t(yte, torch.long), 0.95),
                 trainer_kw={"accumulate_grad_batches": 4})


@fit("grad_accum_warmup_cosine", "grad_accum")
def grad_accum_warmup_cosine() -> Built:
    return _accum(False)


@fit("grad_accum_lr_warmup_never_ends", "grad_accum",
     bug="the warmup length given in training samples instead of optimizer steps (12.8x the fit's 200 steps): the "
         "LR never gets above 8% of its peak")
def grad_accum_lr_warmup_never_ends() -> Built:
    return _accum(True)


if __name__ == "__main__":
    blind.main()
