"""Blind fits for ``lightning_recipe.recommended()``: a wide sweep of healthy model families, none with a bug.

Uses blind.py's registry, helpers and runner; only the fits below are registered, so

    python benchmarks/blind_wide.py                          # every fit here, one at a time
    python benchmarks/blind_wide.py --only masked_lm         # one fit (or a comma-separated list, or "healthy")
    python benchmarks/blind_wide.py --json out.json          # every result, findings with their full messages
    python benchmarks/blind_wide.py --plain                  # also each healthy fit without the recipe

Families: a BERT-style masked character LM (80/10/10 masking, ``ignore_index=-100``), a causal character GPT
(``scaled_dot_product_attention`` with ``is_causal``), a CLIP-style two-tower contrastive model with a learned logit
scale, a Cox proportional-hazards survival net (partial likelihood over the batch's risk sets), a classifier with
per-sample loss weights carried in the batch, a digits MLP under ``precision="bf16-true"``, one fed by persistent
DataLoader workers, one whose body is ``torch.compile``-d; box regression with an L1 + GIoU loss, soft-Dice
segmentation, GroupNorm at batch size 4, BatchNorm at batch size 8, an ``nn.Transformer`` encoder-decoder that learns to
sort, a classifier with a dict output and an auxiliary regression head, multi-label ``MultiLabelSoftMarginLoss``, a
regressor whose ``(N, 1)`` output is squeezed in the loss, and a RevIN forecaster that normalises each raw-scale window
inside ``forward``. Every fit is healthy: any warn/fail finding, RecipeWarning or crash is a false alarm.

Data: scikit-learn's digits, breast cancer and diabetes, Python's standard-library source text, synthetic tensors
(survival times, boxes, blobs, digit sequences, sine series). Nothing is downloaded.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blind  # noqa: E402

from blind import Built, acc_eval, fit  # noqa: E402

blind.FITS.clear()

Metric = tuple[str, float, float, bool]


# ---------------------------------------------------------------------------------------------------------------------
# data


def stdlib_chars() -> str:
    """argparse, textwrap and string source, non-printable characters replaced by '?'."""
    import argparse
    import string
    import textwrap
    txt = ""
    for m in (argparse, textwrap, string):
        with open(m.__file__, encoding="utf-8") as f:
            txt += f.read() + "\n"
    return "".join(c if (32 <= ord(c) < 127 or c == "\n") else "?" for c in txt)


def char_ids() -> tuple[torch.Tensor, int, int]:
    """The text as character ids, the vocabulary size and the 90% train/val split point."""
    text = stdlib_chars()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text])
    return ids, len(chars), int(0.9 * len(ids))


def digits_flat(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits (N, 64) in [0, 1], stratified 75/25 split, standardised with the training split's statistics."""
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32) / 16.0
    Xtr, Xva, ytr, yva = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-3
    Xtr, Xva = (Xtr - mu) / sd, (Xva - mu) / sd
    return (torch.tensor(Xtr, dtype=torch.float32), torch.tensor(ytr),
            torch.tensor(Xva, dtype=torch.float32), torch.tensor(yva))


def digits_images(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits (N, 1, 8, 8) in [0, 1], stratified 75/25 split."""
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    Xtr, Xva, ytr, yva = train_test_split(X, y, test_size=0.25, random_state=seed, stratify=y)
    return torch.tensor(Xtr), torch.tensor(ytr), torch.tensor(Xva), torch.tensor(yva)


# ---------------------------------------------------------------------------------------------------------------------
# 1. BERT-style masked character LM (80% [MASK], 10% random, 10% kept; ignore_index=-100)


class CharMLMDataset(Dataset):
    def __init__(self, ids: torch.Tensor, seq_len: int, stride: int, vocab_size: int, mask_id: int,
                 mask_prob: float = 0.15, fixed_seed: Optional[int] = None) -> None:
        self.ids, self.seq_len, self.stride = ids, seq_len, stride
        self.vocab_size, self.mask_id, self.mask_prob = vocab_size, mask_id, mask_prob
        self.fixed_seed = fixed_seed
        self.n = (len(ids) - seq_len) // stride

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = i * self.stride
        x = self.ids[s:s + self.seq_len].clone()
        g = torch.Generator().manual_seed(self.fixed_seed + i) if self.fixed_seed is not None else None
        labels = x.clone()
        sel = torch.rand(self.seq_len, generator=g) < self.mask_prob
        if not sel.any():
            sel[torch.randint(self.seq_len, (1,), generator=g)] = True
        labels[~sel] = -100
        r = torch.rand(self.seq_len, generator=g)
        to_mask = sel & (r < 0.8)
        to_rand = sel & (r >= 0.8) & (r < 0.9)
        x[to_mask] = self.mask_id
        x[to_rand] = torch.randint(self.vocab_size, (int(to_rand.sum()),), generator=g)
        return x, labels


class TinyBERT(L.LightningModule):
    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 96, nhead: int = 4, nlayers: int = 2,
                 lr: float = 2e-3, dropout: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok = nn.Embedding(vocab_size + 1, d_model)  # +1 for [MASK]
        self.pos = nn.Embedding(seq_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, nlayers)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.size(1), device=x.device)
        return self.head(self.norm(self.encoder(self.tok(x) + self.pos(pos))))

    def _step(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, labels = batch
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)
        m = labels != -100
        return loss, (logits.argmax(-1)[m] == labels[m]).float().mean()

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        loss, acc = self._step(batch)
        self.log("val_loss", loss)
        self.log("val_acc", acc)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


@fit("masked_lm", "masked_lm")
def masked_lm() -> Built:
    ids, V, n_tr = char_ids()
    seq = 64
    tl = DataLoader(CharMLMDataset(ids[:n_tr], seq, 8, V, mask_id=V), batch_size=32, shuffle=True)
    vl = DataLoader(CharMLMDataset(ids[n_tr:], seq, 64, V, mask_id=V, fixed_seed=1234), batch_size=64)
    m = TinyBERT(V, seq, d_model=64, lr=5e-3, dropout=0.0)

    def ev() -> Metric:
        """Masked-character accuracy on the held-out tail against always predicting the most frequent character."""
        m.eval()
        correct = total = base = 0
        mode = torch.bincount(ids[:n_tr], minlength=V).argmax()
        with torch.no_grad():
            for x, lab in vl:
                pred = m(x).argmax(-1)
                k = lab != -100
                correct += (pred[k] == lab[k]).sum().item()
                base += (lab[k] == mode).sum().item()
                total += k.sum().item()
        m.train()
        return "masked_acc", correct / total, base / total, correct / total >= 0.42
    return Built(m, tl, vl, -1, ev, trainer_kw={"max_steps": 900, "val_check_interval": 300})


# ---------------------------------------------------------------------------------------------------------------------
# 2. causal character GPT (scaled_dot_product_attention with is_causal, gradient clipping)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, nhead: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.nhead = nhead
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (z.view(B, T, self.nhead, C // self.nhead).transpose(1, 2) for z in self.qkv(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, d: int, nhead: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, nhead)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(L.LightningModule):
    def __init__(self, vocab_size: int, block_size: int, d: int = 96, nhead: int = 4, nlayer: int = 2,
                 lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(block_size, d)
        self.blocks = nn.Sequential(*[Block(d, nhead) for _ in range(nlayer)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1), device=idx.device))
        return self.lm_head(self.ln_f(self.blocks(x)))

    def _loss(self, batch: tuple) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=(0.9, 0.99), weight_decay=0.1)


class NextCharDataset(Dataset):
    def __init__(self, ids: torch.Tensor, block: int, stride: int) -> None:
        self.ids, self.block, self.stride = ids, block, stride

    def __len__(self) -> int:
        return (len(self.ids) - self.block - 1) // self.stride

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.ids[i * self.stride:i * self.stride + self.block + 1]
        return chunk[:-1], chunk[1:]


@fit("causal_char_gpt", "causal_lm")
def causal_char_gpt() -> Built:
    ids, V, n_tr = char_ids()
    block = 64
    tl = DataLoader(NextCharDataset(ids[:n_tr], block, 32), batch_size=64, shuffle=True, drop_last=True)
    vl = DataLoader(NextCharDataset(ids[n_tr:], block, 64), batch_size=64)
    m = CharGPT(V, block)

    def ev() -> Metric:
        """Held-out nats per character (lower is better) against the training unigram's."""
        m.eval()
        tot = n = 0.0
        with torch.no_grad():
            for x, y in vl:
                tot += F.cross_entropy(m(x).view(-1, V), y.view(-1), reduction="sum").item()
                n += y.numel()
        m.train()
        p = torch.bincount(ids[:n_tr], minlength=V).float()
        p = p / p.sum()
        unigram = -(torch.log(p[ids[n_tr:]] + 1e-12)).mean().item()
        return "nats/char", tot / n, unigram, tot / n < 2.3
    return Built(m, tl, vl, 4, ev, trainer_kw={"gradient_clip_val": 1.0})


# ---------------------------------------------------------------------------------------------------------------------
# 3. CLIP-style two towers: a digit and a noisy, pixel-dropped view of it, symmetric InfoNCE, learned logit scale


class TwoViewDigits(Dataset):
    """Returns (image, noisy second view). Second view: fresh noise + pixel dropout each call."""

    def __init__(self, X: torch.Tensor, noise: float = 0.5, drop: float = 0.2,
                 fixed_seed: Optional[int] = None) -> None:
        self.X, self.noise, self.drop, self.fixed_seed = X, noise, drop, fixed_seed

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.fixed_seed + i) if self.fixed_seed is not None else None
        x = self.X[i]
        keep = (torch.rand(x.shape, generator=g) > self.drop).float()
        return x, x * keep + self.noise * torch.randn(x.shape, generator=g)


class CLIPModel(L.LightningModule):
    def __init__(self, in_dim: int = 64, hid: int = 128, emb: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.image_tower = nn.Sequential(nn.Linear(in_dim, hid), nn.ReLU(), nn.Linear(hid, emb))
        self.view_tower = nn.Sequential(nn.Linear(in_dim, hid), nn.ReLU(), nn.Linear(hid, emb))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.normalize(self.image_tower(x), dim=-1), F.normalize(self.view_tower(v), dim=-1)

    def _loss(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, v = batch
        a, b = self(x, v)
        logits = self.logit_scale.exp().clamp(max=100) * a @ b.t()
        targets = torch.arange(x.size(0), device=x.device)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        return loss, (logits.argmax(1) == targets).float().mean()

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        loss, acc = self._loss(batch)
        self.log("val_loss", loss)
        self.log("val_top1", acc)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)


@fit("clip_two_tower", "contrastive")
def clip_two_tower() -> Built:
    Xtr, _, Xva, _ = digits_flat()
    B = 64
    tl = DataLoader(TwoViewDigits(Xtr), batch_size=B, shuffle=True, drop_last=True)
    vl = DataLoader(TwoViewDigits(Xva, fixed_seed=99), batch_size=B, drop_last=True)
    m = CLIPModel()

    def ev() -> Metric:
        """In-batch top-1 retrieval of each image's own view (chance 1/B)."""
        m.eval()
        hits = n = 0
        with torch.no_grad():
            for x, v in vl:
                a, b = m(x, v)
                hits += ((a @ b.t()).argmax(1) == torch.arange(len(x))).sum().item()
                n += len(x)
        m.train()
        return "top1_retrieval", hits / n, 1 / B, hits / n >= 0.85
    return Built(m, tl, vl, 15, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Cox proportional hazards: negative partial log-likelihood over the batch's risk sets, censored times


def make_survival(n: int, p: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    X = g.normal(size=(n, p)).astype(np.float32)
    beta = np.array([0.8, -0.6, 0.5, 0.0, 0.0, 0.3, 0.0, -0.4][:p])
    risk = X @ beta + 0.5 * X[:, 0] * X[:, 1]
    T = g.exponential(1.0 / np.exp(risk))
    C = g.exponential(1.5, size=n)
    return X, np.minimum(T, C).astype(np.float32), (T <= C).astype(np.float32)


def cox_ph_loss(risk: torch.Tensor, time_: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(time_, descending=True)  # the risk set of i is items 0..i
    risk, event = risk[order], event[order]
    pll = (risk - torch.logcumsumexp(risk, dim=0)) * event
    return -pll.sum() / event.sum().clamp(min=1.0)


def concordance_index(time_: torch.Tensor, risk: torch.Tensor, event: torch.Tensor) -> float:
    comparable = (time_[:, None] < time_[None, :]) & (event[:, None] == 1)
    conc = (risk[:, None] > risk[None, :]).float() + 0.5 * (risk[:, None] == risk[None, :]).float()
    return (conc * comparable).sum().item() / comparable.sum().item()


class CoxNet(L.LightningModule):
    def __init__(self, p: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(p, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, t, e = batch
        loss = cox_ph_loss(self(x), t, e)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, t, e = batch
        self.log("val_loss", cox_ph_loss(self(x), t, e))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)


@fit("cox_survival", "survival")
def cox_survival() -> Built:
    p, n_tr = 8, 3000
    X, T, E = make_survival(4000, p, 0)
    tr = TensorDataset(torch.tensor(X[:n_tr]), torch.tensor(T[:n_tr]), torch.tensor(E[:n_tr]))
    va = TensorDataset(torch.tensor(X[n_tr:]), torch.tensor(T[n_tr:]), torch.tensor(E[n_tr:]))
    m = CoxNet(p)

    def ev() -> Metric:
        m.eval()
        with torch.no_grad():
            r = m(va.tensors[0])
        m.train()
        ci = concordance_index(va.tensors[1], r, va.tensors[2])
        return "c_index", ci, 0.5, ci >= 0.70
    return Built(m, DataLoader(tr, batch_size=128, shuffle=True, drop_last=True), DataLoader(va, batch_size=256),
                 15, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 5. per-sample loss weights carried in the batch: (x, y, w), cross_entropy(reduction="none") * w


class WeightedDataset(Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> None:
        self.X, self.y, self.w = X, y, w

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.X[i], self.y[i], self.w[i]


class WeightedClassifier(L.LightningModule):
    def __init__(self, in_dim: int, n_classes: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Linear(in_dim, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, w = batch
        logits = self(x)
        return (F.cross_entropy(logits, y, reduction="none") * w).mean(), (logits.argmax(1) == y).float().mean()

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        loss, acc = self._loss(batch)
        self.log("val_loss", loss)
        self.log("val_acc", acc)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("sample_weighted_loss", "sample_weights")
def sample_weighted_loss() -> Built:
    X, y = load_breast_cancer(return_X_y=True)
    Xtr, Xva, ytr, yva = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    sc = StandardScaler().fit(Xtr)
    Xtr, Xva = sc.transform(Xtr).astype(np.float32), sc.transform(Xva).astype(np.float32)
    rng = np.random.default_rng(0)

    def weights(yy: np.ndarray) -> np.ndarray:
        """Inverse class frequency times a random per-sample "confidence" in [0.5, 1.5]."""
        freq = np.bincount(ytr) / len(ytr)
        return ((1.0 / (2 * freq[yy])) * rng.uniform(0.5, 1.5, size=len(yy))).astype(np.float32)
    tr = WeightedDataset(torch.tensor(Xtr), torch.tensor(ytr), torch.tensor(weights(ytr)))
    va = WeightedDataset(torch.tensor(Xva), torch.tensor(yva), torch.tensor(weights(yva)))
    m = WeightedClassifier(X.shape[1], 2)
    return Built(m, DataLoader(tr, batch_size=32, shuffle=True), DataLoader(va, batch_size=64), 20,
                 acc_eval(m, va.X, va.y, 0.93))


# ---------------------------------------------------------------------------------------------------------------------
# 6/7/8. a digits MLP: bf16-true precision, persistent DataLoader workers, a torch.compile-d body


class DigitsMLP(L.LightningModule):
    def __init__(self, lr: float = 1e-3, hidden: int = 128) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 10))

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
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class CompiledDigitsMLP(DigitsMLP):
    def __init__(self, lr: float = 1e-3, hidden: int = 128) -> None:
        super().__init__(lr, hidden)
        self.net = torch.compile(self.net)


def _digits_mlp(m: DigitsMLP, good: float, workers: int = 0, trainer_kw: Optional[dict[str, Any]] = None) -> Built:
    Xtr, ytr, Xva, yva = digits_flat()
    kw: dict[str, Any] = {"num_workers": workers, "persistent_workers": True} if workers else {}

    def fwd(x: torch.Tensor) -> torch.Tensor:
        return m(x.to(next(m.parameters()).dtype))  # bf16-true converts the parameters
    return Built(m, DataLoader(TensorDataset(Xtr, ytr), batch_size=64, shuffle=True, **kw),
                 DataLoader(TensorDataset(Xva, yva), batch_size=128, **kw), 10,
                 acc_eval(m, Xva, yva, good, fwd=fwd), trainer_kw=trainer_kw or {})


@fit("bf16_true", "precision")
def bf16_true() -> Built:
    return _digits_mlp(DigitsMLP(lr=2e-3), 0.93, trainer_kw={"precision": "bf16-true"})


@fit("workers_persistent", "dataloader")
def workers_persistent() -> Built:
    return _digits_mlp(DigitsMLP(), 0.92, workers=2)


@fit("compiled_mlp", "compile")
def compiled_mlp() -> Built:
    return _digits_mlp(CompiledDigitsMLP(), 0.93)


# ---------------------------------------------------------------------------------------------------------------------
# 9. box regression: a CNN predicts (x1, y1, x2, y2) in [0, 1], L1 + GIoU loss


def make_boxes(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    imgs = torch.rand(n, 1, 16, 16, generator=g) * 0.2
    boxes = torch.zeros(n, 4)
    for i in range(n):
        w = int(torch.randint(3, 10, (1,), generator=g))
        h = int(torch.randint(3, 10, (1,), generator=g))
        x1 = int(torch.randint(0, 16 - w + 1, (1,), generator=g))
        y1 = int(torch.randint(0, 16 - h + 1, (1,), generator=g))
        imgs[i, 0, y1:y1 + h, x1:x1 + w] += 0.8
        boxes[i] = torch.tensor([x1, y1, x1 + w, y1 + h]) / 16.0
    return imgs, boxes


def box_iou_giou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    ix1, iy1 = torch.max(a[:, 0], b[:, 0]), torch.max(a[:, 1], b[:, 1])
    ix2, iy2 = torch.min(a[:, 2], b[:, 2]), torch.min(a[:, 3], b[:, 3])
    inter = (ix2 - ix1).clamp(min=0) * (iy2 - iy1).clamp(min=0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    iou = inter / (union + eps)
    cx1, cy1 = torch.min(a[:, 0], b[:, 0]), torch.min(a[:, 1], b[:, 1])
    cx2, cy2 = torch.max(a[:, 2], b[:, 2]), torch.max(a[:, 3], b[:, 3])
    c_area = (cx2 - cx1) * (cy2 - cy1)
    return iou, iou - (c_area - union) / (c_area + eps)


class BoxRegressor(L.LightningModule):
    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.net(x))
        # keep boxes valid: (x1, y1) is the min corner, (x2, y2) the max corner
        x1, x2 = torch.min(p[:, 0], p[:, 2]), torch.max(p[:, 0], p[:, 2])
        y1, y2 = torch.min(p[:, 1], p[:, 3]), torch.max(p[:, 1], p[:, 3])
        return torch.stack([x1, y1, x2, y2], dim=1)

    def _loss(self, batch: tuple) -> torch.Tensor:
        x, b = batch
        pred = self(x)
        _, giou = box_iou_giou(pred, b)
        return F.l1_loss(pred, b) + (1 - giou).mean()

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch), prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("box_regression", "detection")
def box_regression() -> Built:
    g = torch.Generator().manual_seed(0)
    Xtr, Btr = make_boxes(3000, g)
    Xva, Bva = make_boxes(500, g)
    m = BoxRegressor()

    def ev() -> Metric:
        """Mean IoU against always predicting the training set's mean box."""
        m.eval()
        with torch.no_grad():
            iou, _ = box_iou_giou(m(Xva), Bva)
            base, _ = box_iou_giou(Btr.mean(0, keepdim=True).expand_as(Bva), Bva)
        m.train()
        return "mIoU", iou.mean().item(), base.mean().item(), iou.mean().item() >= 0.85
    return Built(m, DataLoader(TensorDataset(Xtr, Btr), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xva, Bva), batch_size=256), 8, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 10. binary segmentation of noisy blobs with a soft-Dice loss (no BCE)


def make_blobs(n: int, g: torch.Generator, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    imgs = torch.zeros(n, 1, size, size)
    masks = torch.zeros(n, 1, size, size)
    for i in range(n):
        k = int(torch.randint(1, 4, (1,), generator=g))
        mk = torch.zeros(size, size, dtype=torch.bool)
        for _ in range(k):
            cx, cy = (torch.rand(2, generator=g) * (size - 6) + 3).tolist()
            r = float(torch.rand(1, generator=g) * 3 + 2)
            mk |= ((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r
        masks[i, 0] = mk.float()
        imgs[i, 0] = mk.float() * 0.6 + torch.randn(size, size, generator=g) * 0.3
    return imgs, masks


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits)
    dims = (1, 2, 3)
    inter = (p * target).sum(dims)
    return (1 - (2 * inter + eps) / (p.sum(dims) + target.sum(dims) + eps)).mean()


def dice_score(pred_bin: torch.Tensor, mk: torch.Tensor) -> float:
    inter = (pred_bin * mk).sum((1, 2, 3))
    return (2 * inter / (pred_bin.sum((1, 2, 3)) + mk.sum((1, 2, 3)) + 1e-7)).mean().item()


class SegNet(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(16, 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, mk = batch
        loss = soft_dice_loss(self(x), mk)
        self.log("train_dice_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, mk = batch
        self.log("val_dice_loss", soft_dice_loss(self(x), mk))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("dice_segmentation", "segmentation")
def dice_segmentation() -> Built:
    g = torch.Generator().manual_seed(1)
    Xtr, Mtr = make_blobs(1000, g)
    Xva, Mva = make_blobs(200, g)
    m = SegNet()

    def ev() -> Metric:
        """Dice of the thresholded mask against predicting all foreground."""
        m.eval()
        with torch.no_grad():
            d = dice_score((m(Xva) > 0).float(), Mva)
        m.train()
        return "dice", d, dice_score(torch.ones_like(Mva), Mva), d >= 0.88
    return Built(m, DataLoader(TensorDataset(Xtr, Mtr), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(Xva, Mva), batch_size=100), 6, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 11/12. a digits CNN with GroupNorm at batch size 4, and with BatchNorm at batch size 8 (drop_last)


class DigitsCNN(L.LightningModule):
    def __init__(self, norm: str = "group", lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()

        def N(c: int) -> nn.Module:
            return nn.GroupNorm(4, c) if norm == "group" else nn.BatchNorm2d(c)

        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), N(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), N(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def _digits_cnn(norm: str, bs: int, drop_last: bool, epochs: int, good: float) -> Built:
    Xtr, ytr, Xva, yva = digits_images()
    m = DigitsCNN(norm=norm)
    return Built(m, DataLoader(TensorDataset(Xtr, ytr), batch_size=bs, shuffle=True, drop_last=drop_last),
                 DataLoader(TensorDataset(Xva, yva), batch_size=64), epochs, acc_eval(m, Xva, yva, good))


@fit("groupnorm_small_batch", "small_batch")
def groupnorm_small_batch() -> Built:
    return _digits_cnn("group", 4, False, 4, 0.93)


@fit("batchnorm_tiny_batch", "small_batch")
def batchnorm_tiny_batch() -> Built:
    return _digits_cnn("batch", 8, True, 5, 0.95)


# ---------------------------------------------------------------------------------------------------------------------
# 13. nn.Transformer encoder-decoder that sorts 8 digits (teacher forcing, causal tgt_mask, greedy decoding)

BOS, VOCAB, SEQ = 10, 11, 8


class SortTransformer(L.LightningModule):
    def __init__(self, d_model: int = 64, nhead: int = 4, layers: int = 2, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.src_emb = nn.Embedding(VOCAB, d_model)
        self.tgt_emb = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.randn(1, SEQ, d_model) * 0.02)
        self.transformer = nn.Transformer(d_model, nhead, layers, layers, dim_feedforward=128, dropout=0.0,
                                          batch_first=True)
        self.out = nn.Linear(d_model, VOCAB)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        T = tgt_in.size(1)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=src.device)
        s = self.src_emb(src) + self.pos[:, :src.size(1)]
        t = self.tgt_emb(tgt_in) + self.pos[:, :T]
        return self.out(self.transformer(s, t, tgt_mask=mask))

    def _loss(self, batch: tuple) -> torch.Tensor:
        src, tgt = batch
        tgt_in = torch.cat([torch.full_like(tgt[:, :1], BOS), tgt[:, :-1]], dim=1)
        return F.cross_entropy(self(src, tgt_in).reshape(-1, VOCAB), tgt.reshape(-1))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        self.log("val_loss", self._loss(batch))

    @torch.no_grad()
    def greedy(self, src: torch.Tensor) -> torch.Tensor:
        ys = torch.full((src.size(0), 1), BOS, dtype=torch.long)
        for _ in range(SEQ):
            ys = torch.cat([ys, self(src, ys)[:, -1].argmax(-1, keepdim=True)], dim=1)
        return ys[:, 1:]

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("transformer_seq2seq_sort", "seq2seq")
def transformer_seq2seq_sort() -> Built:
    g = torch.Generator().manual_seed(2)
    src = torch.randint(0, 10, (12000, SEQ), generator=g)
    vsrc = torch.randint(0, 10, (500, SEQ), generator=g)
    tgt, vtgt = src.sort(dim=1).values, vsrc.sort(dim=1).values
    m = SortTransformer()

    def ev() -> Metric:
        m.eval()
        a = (m.greedy(vsrc) == vtgt).float().mean().item()
        m.train()
        return "greedy_token_acc", a, 0.1, a >= 0.95
    return Built(m, DataLoader(TensorDataset(src, tgt), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(vsrc, vtgt), batch_size=250), 5, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 14. dict output: class logits + an auxiliary regression head (standardised mean intensity), ce + 0.3 * mse


class AuxDigits(L.LightningModule):
    AUX_MU, AUX_SD = 0.305, 0.035  # standardisation of the aux target (mean intensity), from the training set

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.cls_head = nn.Linear(64, 10)
        self.aux_head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {"logits": self.cls_head(h), "aux": self.aux_head(h).squeeze(-1)}

    def aux_target(self, x: torch.Tensor) -> torch.Tensor:
        return (x.mean(dim=(1, 2, 3)) - self.AUX_MU) / self.AUX_SD

    def _losses(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        out = self(x)
        ce = F.cross_entropy(out["logits"], y)
        mse = F.mse_loss(out["aux"], self.aux_target(x))
        return ce + 0.3 * mse, ce, mse

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        loss, ce, mse = self._losses(batch)
        self.log_dict({"train_loss": loss, "train_ce": ce, "train_aux_mse": mse})
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        loss, ce, mse = self._losses(batch)
        self.log_dict({"val_loss": loss, "val_ce": ce, "val_aux_mse": mse})

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("dict_output_aux_head", "multitask")
def dict_output_aux_head() -> Built:
    Xtr, ytr, Xva, yva = digits_images()
    m = AuxDigits()

    def ev() -> Metric:
        """Accuracy, and the aux head well below the mean prediction's MSE."""
        m.eval()
        with torch.no_grad():
            out = m(Xva)
        m.train()
        a = (out["logits"].argmax(1) == yva).float().mean().item()
        tm = m.aux_target(Xva)
        aux_mse = F.mse_loss(out["aux"], tm).item()
        aux_base = F.mse_loss(torch.full_like(tm, m.aux_target(Xtr).mean().item()), tm).item()
        return (f"acc (aux MSE {aux_mse:.3f} of {aux_base:.3f})", a, torch.bincount(yva).max().item() / len(yva),
                a >= 0.92 and aux_mse < 0.5 * aux_base)
    return Built(m, DataLoader(TensorDataset(Xtr, ytr), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(Xva, yva), batch_size=128), 15, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 15. multi-label digits (even, > 4, prime) with MultiLabelSoftMarginLoss held as an attribute

PRIMES = {2, 3, 5, 7}


def multilabel_targets(y: torch.Tensor) -> torch.Tensor:
    return torch.stack([(y % 2 == 0), (y > 4), torch.tensor([int(v) in PRIMES for v in y])], 1).float()


class MultiLabelDigits(L.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 3))
        self.criterion = nn.MultiLabelSoftMarginLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.criterion(logits, y))
        self.log("val_acc", ((logits > 0).float() == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("multilabel_softmargin", "multilabel")
def multilabel_softmargin() -> Built:
    Xtr, ytr, Xva, yva = digits_images()
    Ytr, Yva = multilabel_targets(ytr), multilabel_targets(yva)
    m = MultiLabelDigits()

    def ev() -> Metric:
        """Per-label accuracy against the majority value of each label."""
        m.eval()
        with torch.no_grad():
            a = ((m(Xva) > 0).float() == Yva).float().mean().item()
        m.train()
        base = ((Ytr.mean(0) > 0.5).float().expand_as(Yva) == Yva).float().mean().item()
        return "label_acc", a, base, a >= 0.92
    return Built(m, DataLoader(TensorDataset(Xtr, Ytr), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(Xva, Yva), batch_size=128), 15, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 16. diabetes regression: the (N, 1) output squeezed in the loss against (N,) targets


class DiabetesMLP(L.LightningModule):
    def __init__(self, n_in: int = 10, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(n_in, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (N, 1)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x).squeeze(-1), y)
        self.log("train_mse", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        self.log("val_mse", F.mse_loss(self(x).squeeze(-1), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=1e-2)


@fit("squeezed_regression", "regression")
def squeezed_regression() -> Built:
    d = load_diabetes()
    Xtr, Xva, ytr, yva = train_test_split(d.data, d.target, test_size=0.25, random_state=0)
    xm, xs, ym, ys = Xtr.mean(0), Xtr.std(0), ytr.mean(), ytr.std()

    def f(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(a, dtype=torch.float32)
    Xtr_t, Xva_t, ytr_t, yva_t = f((Xtr - xm) / xs), f((Xva - xm) / xs), f((ytr - ym) / ys), f((yva - ym) / ys)
    m = DiabetesMLP()

    def ev() -> Metric:
        """R² against the training mean (0 after standardisation)."""
        m.eval()
        with torch.no_grad():
            mse = F.mse_loss(m(Xva_t).squeeze(-1), yva_t).item()
        m.train()
        v = 1 - mse / F.mse_loss(torch.zeros_like(yva_t), yva_t).item()
        return "r2", v, 0.0, v >= 0.3
    return Built(m, DataLoader(TensorDataset(Xtr_t, ytr_t), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(Xva_t, yva_t), batch_size=128), 15, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 17. RevIN forecaster: raw-scale windows (offsets ~50, amplitudes up to 20) normalised per window inside forward

WIN, HOR = 32, 8


def make_series(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(WIN + HOR).float()
    amp = torch.rand(n, 1, generator=g) * 20 + 0.5
    off = torch.randn(n, 1, generator=g) * 50
    period = torch.rand(n, 1, generator=g) * 12 + 8
    phase = torch.rand(n, 1, generator=g) * 2 * math.pi
    s = off + amp * torch.sin(2 * math.pi * t / period + phase)
    s = s + 0.05 * amp * torch.randn(n, WIN + HOR, generator=g)
    return s[:, :WIN], s[:, WIN:]


class RevIN(nn.Module):
    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        self.mean = x.mean(dim=1, keepdim=True).detach()
        self.std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + self.eps).detach()
        return (x - self.mean) / self.std

    def denormalize(self, y: torch.Tensor) -> torch.Tensor:
        return y * self.std + self.mean


class Forecaster(L.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.revin = RevIN()
        self.mlp = nn.Sequential(nn.Linear(WIN, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, HOR))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.revin.denormalize(self.mlp(self.revin.normalize(x)))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_mse", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        self.log("val_mse", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("revin_forecaster", "forecasting")
def revin_forecaster() -> Built:
    g = torch.Generator().manual_seed(3)
    Xtr, Ytr = make_series(8000, g)
    Xva, Yva = make_series(1000, g)
    m = Forecaster()

    def ev() -> Metric:
        """Forecast MSE (lower is better) against repeating the window's last value."""
        m.eval()
        with torch.no_grad():
            mse = F.mse_loss(m(Xva), Yva).item()
        m.train()
        return "mse", mse, F.mse_loss(Xva[:, -1:].expand_as(Yva), Yva).item(), mse < 0.9
    return Built(m, DataLoader(TensorDataset(Xtr, Ytr), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xva, Yva), batch_size=500), 10, ev)


if __name__ == "__main__":
    blind.main()
