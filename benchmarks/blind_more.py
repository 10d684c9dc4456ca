"""More blind fits for ``lightning_recipe.recommended()``: model families that ``blind.py`` does not hold.

Uses blind.py's registry, data helpers and runner; only the fits below are registered, so

    python benchmarks/blind_more.py                     # every fit here, one at a time
    python benchmarks/blind_more.py --only flow_moons   # one fit (or a list, or "healthy"/"broken")
    python benchmarks/blind_more.py --json out.json     # every result, findings with their full messages
    python benchmarks/blind_more.py --plain             # also each healthy fit without the recipe

Families: a RealNVP normalizing flow (negative NLL), DDPM noise prediction, triplet-loss metric learning, CTC on
synthetic frame sequences, padded token tagging, label smoothing with a per-step OneCycleLR, a two-input
(numeric + categorical embedding) model on dict batches, dense per-pixel regression, LBFGS under automatic
optimisation, and bf16-mixed on CPU. Broken fits carry one named bug each.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn import datasets
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blind  # noqa: E402

from blind import Built, _split, acc_eval, digits, fit, r2, standardized  # noqa: E402

blind.FITS.clear()


# ---------------------------------------------------------------------------------------------------------------------
# 1. RealNVP normalizing flow on two moons (NLL goes negative)


def two_moons(n: int, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    g = np.random.RandomState(seed)
    k = n // 2
    t1 = g.uniform(0, np.pi, k)
    t2 = g.uniform(0, np.pi, n - k)
    a = np.c_[np.cos(t1), np.sin(t1)]
    b = np.c_[1 - np.cos(t2), 0.5 - np.sin(t2)]
    x = np.r_[a, b] + g.normal(0, noise, (n, 2))
    x = (x - np.array([0.5, 0.25])) * 0.5  # centred, roughly within [-1, 1]
    return torch.tensor(x[g.permutation(n)], dtype=torch.float32)


class Coupling(nn.Module):
    def __init__(self, mask: torch.Tensor, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("mask", mask)
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 4))
        self.scale = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xm = x * self.mask
        s, t = self.net(xm).chunk(2, dim=-1)
        s = torch.tanh(s) * self.scale.exp() * (1 - self.mask)
        t = t * (1 - self.mask)
        y = xm + (1 - self.mask) * (x * torch.exp(s) + t)
        return y, s.sum(-1)


class RealNVP(L.LightningModule):
    def __init__(self, n_layers: int = 6, flip_logdet: bool = False) -> None:
        super().__init__()
        masks = [torch.tensor([1.0, 0.0]) if i % 2 == 0 else torch.tensor([0.0, 1.0]) for i in range(n_layers)]
        self.layers = nn.ModuleList(Coupling(m) for m in masks)
        self.flip_logdet = flip_logdet

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = torch.zeros(x.shape[0], device=x.device)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, logdet = self(x)
        log_pz = -0.5 * (z ** 2).sum(-1) - math.log(2 * math.pi)
        return log_pz + logdet

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        if self.flip_logdet:
            z, logdet = self(x)
            log_pz = -0.5 * (z ** 2).sum(-1) - math.log(2 * math.pi)
            return -(log_pz - logdet).mean()
        return -self.log_prob(x).mean()

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.nll(batch)
        self.log("train_nll", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_nll", self.nll(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _flow(flip: bool) -> Built:
    xt, xv = two_moons(2000, seed=0), two_moons(500, seed=1)
    m = RealNVP(flip_logdet=flip)

    def ev() -> tuple:
        mu, cov = xt.mean(0), torch.cov(xt.T)
        gauss = torch.distributions.MultivariateNormal(mu, cov)
        base = -gauss.log_prob(xv).mean().item()
        m.eval()
        with torch.no_grad():
            v = -m.log_prob(xv).mean().item()
        m.train()
        return "val_nll", v, base, v < base - 0.3
    return Built(m, DataLoader(xt, batch_size=128, shuffle=True), DataLoader(xv, batch_size=500), 80, ev)


@fit("flow_moons", "flow")
def flow_moons() -> Built:
    return _flow(False)


@fit("flow_logdet_sign_flipped", "flow", bug="the coupling log-determinant is subtracted instead of added in the NLL")
def flow_logdet_sign_flipped() -> Built:
    return _flow(True)


# ---------------------------------------------------------------------------------------------------------------------
# 2. DDPM noise prediction on digits (the batch holds only images; noise and timesteps drawn in training_step)


class TinyDDPM(L.LightningModule):
    def __init__(self, T: int = 100, hidden: int = 256) -> None:
        super().__init__()
        self.T = T
        betas = torch.linspace(1e-4, 0.05, T)
        self.register_buffer("alpha_bar", torch.cumprod(1 - betas, 0))
        self.t_embed = nn.Sequential(nn.Linear(32, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(64, hidden)
        self.body = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                  nn.SiLU(), nn.Linear(hidden, 64))

    def time_features(self, t: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(16, device=t.device) / 16)
        ang = t.float()[:, None] * freqs[None]
        return torch.cat([ang.sin(), ang.cos()], -1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.body(self.inp(x_t) + self.t_embed(self.time_features(t)))

    def noisy(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self.alpha_bar[t][:, None]
        return ab.sqrt() * x0 + (1 - ab).sqrt() * eps

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        x0 = batch
        t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        loss = F.mse_loss(self(self.noisy(x0, t, eps), t), eps)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        g = torch.Generator().manual_seed(batch_idx)
        t = torch.randint(0, self.T, (batch.shape[0],), generator=g)
        eps = torch.randn(batch.shape, generator=g)
        self.log("val_loss", F.mse_loss(self(self.noisy(batch, t, eps), t), eps))

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=1e-4)


@fit("ddpm_digits", "diffusion")
def ddpm_digits() -> Built:
    Xt, _, Xv, _ = digits()
    Xt, Xv = Xt * 2 - 1, Xv * 2 - 1
    m = TinyDDPM()

    def ev() -> tuple:
        g = torch.Generator().manual_seed(123)
        t = torch.randint(0, m.T, (len(Xv),), generator=g)
        eps = torch.randn(Xv.shape, generator=g)
        m.eval()
        with torch.no_grad():
            v = F.mse_loss(m(m.noisy(Xv, t, eps), t), eps).item()
        m.train()
        return "noise_mse", v, 1.0, v < 0.5
    return Built(m, DataLoader(Xt, batch_size=64, shuffle=True), DataLoader(Xv, batch_size=256), 40, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Metric learning with TripletMarginLoss on digits, k-NN accuracy on the embeddings


class TripletEmbedder(L.LightningModule):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, dim))
        self.criterion = nn.TripletMarginLoss(margin=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1) * 2

    def triplets(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        same = y[:, None] == y[None, :]
        eye = torch.eye(len(y), dtype=torch.bool, device=y.device)
        pos_w = (same & ~eye).float()
        neg_w = (~same).float()
        has = pos_w.sum(1) > 0
        anchors = torch.nonzero(has).squeeze(1)
        pos = torch.multinomial(pos_w[anchors], 1).squeeze(1)
        neg = torch.multinomial(neg_w[anchors], 1).squeeze(1)
        return anchors, pos, neg

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        emb = self(x)
        a, p, n = self.triplets(y)
        loss = self.criterion(emb[a], emb[p], emb[n])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        emb = self(x)
        a, p, n = self.triplets(y)
        self.log("val_loss", self.criterion(emb[a], emb[p], emb[n]))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@fit("triplet_digits", "metric_learning")
def triplet_digits() -> Built:
    Xt, yt, Xv, yv = digits()
    m = TripletEmbedder()

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            et, evv = m(Xt), m(Xv)
        m.train()
        d = torch.cdist(evv, et)
        nn_idx = d.topk(5, largest=False).indices
        pred = torch.mode(yt[nn_idx], dim=1).values
        a = (pred == yv).float().mean().item()
        base = torch.bincount(yv).max().item() / len(yv)
        return "knn_acc", a, base, a >= 0.93
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=128, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=256), 25, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 4. CTC: a BiGRU on synthetic frame sequences (each symbol emits 2-4 noisy frames of its prototype)


def ctc_data(n: int, seed: int, n_sym: int = 9, dim: int = 16, protos: torch.Tensor | None = None) -> tuple:
    g = np.random.RandomState(seed)
    if protos is None:
        protos = torch.tensor(np.random.RandomState(99).normal(0, 1, (n_sym + 1, dim)), dtype=torch.float32)
    seqs, labels = [], []
    for _ in range(n):
        L_ = g.randint(2, 6)
        lab = g.randint(1, n_sym + 1, L_)
        frames = []
        for i, s in enumerate(lab):
            gap = g.randint(0, 2) + (1 if i > 0 and lab[i - 1] == s else 0)
            frames += [protos[0]] * gap
            frames += [protos[s]] * g.randint(2, 5)
        x = torch.stack(frames) + 0.5 * torch.tensor(g.normal(0, 1, (len(frames), dim)), dtype=torch.float32)
        seqs.append(x)
        labels.append(torch.tensor(lab, dtype=torch.long))
    return seqs, labels, protos


def ctc_collate(items: list) -> dict:
    xs, ys = zip(*items)
    return {"frames": nn.utils.rnn.pad_sequence(list(xs), batch_first=True),
            "frame_lens": torch.tensor([len(x) for x in xs]),
            "targets": torch.cat(list(ys)),
            "target_lens": torch.tensor([len(y) for y in ys])}


class ListData(Dataset):
    def __init__(self, a: list, b: list) -> None:
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a)

    def __getitem__(self, i: int) -> tuple:
        return self.a[i], self.b[i]


class CTCTagger(L.LightningModule):
    def __init__(self, dim: int = 16, hidden: int = 64, n_sym: int = 9) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, hidden, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * hidden, n_sym + 1)
        self.ctc = nn.CTCLoss(blank=0, zero_infinity=True)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(frames)
        return self.out(h).log_softmax(-1)

    def step(self, batch: dict) -> torch.Tensor:
        logp = self(batch["frames"]).transpose(0, 1)  # T, B, C
        return self.ctc(logp, batch["targets"], batch["frame_lens"], batch["target_lens"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.step(batch)
        self.log("train_ctc", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_ctc", self.step(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def greedy_decode(logp: torch.Tensor, length: int) -> list[int]:
    best = logp[:length].argmax(-1).tolist()
    out, prev = [], 0
    for s in best:
        if s != prev and s != 0:
            out.append(s)
        prev = s
    return out


@fit("ctc_bigru_frames", "ctc")
def ctc_bigru_frames() -> Built:
    xs_t, ys_t, protos = ctc_data(1500, seed=0)
    xs_v, ys_v, _ = ctc_data(300, seed=1, protos=protos)
    m = CTCTagger()

    def ev() -> tuple:
        b = ctc_collate(list(zip(xs_v, ys_v)))
        m.eval()
        with torch.no_grad():
            logp = m(b["frames"])
        m.train()
        ok = [greedy_decode(logp[i], int(b["frame_lens"][i])) == ys_v[i].tolist() for i in range(len(ys_v))]
        a = float(np.mean(ok))
        return "seq_acc", a, 0.0, a >= 0.8
    return Built(m, DataLoader(ListData(xs_t, ys_t), batch_size=32, shuffle=True, collate_fn=ctc_collate),
                 DataLoader(ListData(xs_v, ys_v), batch_size=100, collate_fn=ctc_collate), 15, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Token classification (BIO tagging) on padded synthetic sentences, ignore_index=-100


N_TOK, PAD = 60, 0


def tag_sentence(tokens: np.ndarray) -> np.ndarray:
    """O=0, B=1, I=2. Tokens 40-59 are entity words; 30-39 are entity words only right after a trigger (1-3)."""
    tags = np.zeros(len(tokens), dtype=np.int64)
    for i, t in enumerate(tokens):
        ent = t >= 40 or (30 <= t < 40 and i > 0 and 1 <= tokens[i - 1] <= 3)
        if ent:
            tags[i] = 2 if i > 0 and tags[i - 1] > 0 else 1
    return tags


def tagging_data(n: int, seed: int, max_len: int = 32) -> tuple[list, list]:
    g = np.random.RandomState(seed)
    toks, tags = [], []
    for _ in range(n):
        L_ = g.randint(4, max_len + 1)
        t = g.randint(1, N_TOK, L_)
        toks.append(torch.tensor(t))
        tags.append(torch.tensor(tag_sentence(t)))
    return toks, tags


def make_tag_collate(label_pad: int, pad_to: int = 0) -> Any:
    def collate(items: list) -> dict:
        xs, ys = zip(*items)
        if pad_to:  # tokenizer-style padding="max_length"
            xs = [F.pad(x, (0, pad_to - len(x)), value=PAD) for x in xs]
            ys = [F.pad(y, (0, pad_to - len(y)), value=label_pad) for y in ys]
        return {"input_ids": nn.utils.rnn.pad_sequence(list(xs), batch_first=True, padding_value=PAD),
                "labels": nn.utils.rnn.pad_sequence(list(ys), batch_first=True, padding_value=label_pad)}
    return collate


class Tagger(L.LightningModule):
    def __init__(self, ignore_pad: bool = True, n_tags: int = 3) -> None:
        super().__init__()
        self.n_tags = n_tags
        self.ignore_pad = ignore_pad
        self.emb = nn.Embedding(N_TOK, 32, padding_idx=PAD)
        self.lstm = nn.LSTM(32, 64, batch_first=True, bidirectional=True)
        self.head = nn.Linear(128, n_tags)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(input_ids))
        return self.head(h)

    def loss(self, batch: dict) -> torch.Tensor:
        logits = self(batch["input_ids"])
        if self.ignore_pad:
            return F.cross_entropy(logits.reshape(-1, self.n_tags), batch["labels"].reshape(-1), ignore_index=-100)
        return F.cross_entropy(logits.reshape(-1, self.n_tags), batch["labels"].reshape(-1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def _tagger(ignore_pad: bool, shift: bool = False) -> Built:
    xt, yt = tagging_data(2000, 0)
    xv, yv = tagging_data(400, 1)
    if shift:  # tags aligned as if a leading special token had been dropped: token i gets the tag of token i+1
        yt = [torch.cat([y[1:], y.new_zeros(1)]) for y in yt]
        yv = [torch.cat([y[1:], y.new_zeros(1)]) for y in yv]
    # the broken variant pads every sentence (4-32 tokens) to 64 with tag 0: about 70% of its labels are padding
    collate = make_tag_collate(-100) if ignore_pad else make_tag_collate(0, pad_to=64)
    m = Tagger(ignore_pad)
    xv_eval, yv_eval = tagging_data(400, 1)

    def ev() -> tuple:
        b = make_tag_collate(-100)(list(zip(xv_eval, yv_eval)))
        m.eval()
        with torch.no_grad():
            pred = m(b["input_ids"]).argmax(-1)
        m.train()
        mask = b["labels"] != -100
        a = (pred[mask] == b["labels"][mask]).float().mean().item()
        base = torch.bincount(b["labels"][mask]).max().item() / mask.sum().item()
        return "token_acc", a, base, a >= 0.97
    return Built(m, DataLoader(ListData(xt, yt), batch_size=32, shuffle=True, collate_fn=collate),
                 DataLoader(ListData(xv, yv), batch_size=128, collate_fn=collate), 10, ev)


@fit("token_tagger_bio", "tagging")
def token_tagger_bio() -> Built:
    return _tagger(True)


@fit("token_tagger_pad_not_ignored", "tagging",
     bug="labels padded with 0 (a real tag) and no ignore_index: most of the loss is on pad positions")
def token_tagger_pad_not_ignored() -> Built:
    return _tagger(False)


@fit("token_tagger_labels_shifted", "tagging", bug="tags shifted by one position relative to the tokens")
def token_tagger_labels_shifted() -> Built:
    return _tagger(True, shift=True)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Label smoothing + OneCycleLR stepping per batch (digits)


class SmoothMLP(L.LightningModule):
    def __init__(self, lr: float = 3e-3, dead_schedule: bool = False) -> None:
        super().__init__()
        self.lr = lr
        self.dead_schedule = dead_schedule
        self.model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 128), nn.ReLU(),
                                   nn.Linear(128, 10))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

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
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)
        if self.dead_schedule:
            # written as "decay linearly over 20 epochs" but stepped per batch: 0 after 20 of ~450 steps
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: max(0.0, 1 - step / 20))
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr,
                                                        total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _smooth(dead: bool) -> Built:
    Xt, yt, Xv, yv = digits()
    m = SmoothMLP(dead_schedule=dead)
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=256), 20, acc_eval(m, Xv, yv, 0.95))


@fit("label_smoothing_onecycle", "label_smoothing")
def label_smoothing_onecycle() -> Built:
    return _smooth(False)


@fit("label_smoothing_lr_dead", "label_smoothing",
     bug="LambdaLR meant per epoch stepped per batch: the learning rate is 0 after 20 of ~450 steps")
def label_smoothing_lr_dead() -> Built:
    return _smooth(True)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Two-input model: numeric features + categorical embedding, dict batches, BCEWithLogitsLoss


class MixedTable(Dataset):
    def __init__(self, num: torch.Tensor, cat: torch.Tensor, y: torch.Tensor) -> None:
        self.num, self.cat, self.y = num, cat, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"num": self.num[i], "cat": self.cat[i], "y": self.y[i]}


class TwoInput(L.LightningModule):
    def __init__(self, n_num: int, n_levels: int, dead_branch: bool = False) -> None:
        super().__init__()
        self.dead_branch = dead_branch
        self.cat_emb = nn.Embedding(n_levels, 4)
        self.num_net = nn.Sequential(nn.Linear(n_num, 32), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(32 if dead_branch else 36, 16), nn.ReLU(), nn.Linear(16, 1))
        self.criterion = nn.BCEWithLogitsLoss()

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> torch.Tensor:
        e = self.cat_emb(x_cat)
        h = self.num_net(x_num)
        if self.dead_branch:
            z = h  # the embedding e is never concatenated
        else:
            z = torch.cat([h, e], -1)
        return self.head(z).squeeze(-1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.criterion(self(batch["num"], batch["cat"]), batch["y"])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.log("val_loss", self.criterion(self(batch["num"], batch["cat"]), batch["y"]))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3, weight_decay=1e-4)


def _two_input(dead: bool) -> Built:
    d = datasets.load_breast_cancer()
    g = np.random.RandomState(3)
    y = d.target
    # a synthetic "site" column with 6 levels, weakly tied to the label
    cat = np.where(g.rand(len(y)) < 0.3, y * 3 + g.randint(0, 3, len(y)), g.randint(0, 6, len(y)))
    tr, va = _split(len(y), 0.25, seed=2)
    Xt, Xv = standardized(d.data, tr, va)
    ct, cv = torch.tensor(cat[tr]), torch.tensor(cat[va])
    yt, yv = torch.tensor(y[tr], dtype=torch.float32), torch.tensor(y[va], dtype=torch.float32)
    m = TwoInput(30, 6, dead)

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            p = m(Xv, cv)
        m.train()
        a = ((p > 0).float() == yv).float().mean().item()
        base = max(yv.mean().item(), 1 - yv.mean().item())
        return "acc", a, base, a >= 0.93
    return Built(m, DataLoader(MixedTable(Xt, ct, yt), batch_size=32, shuffle=True),
                 DataLoader(MixedTable(Xv, cv, yv), batch_size=256), 30, ev)


@fit("two_input_cat_embedding", "two_input")
def two_input_cat_embedding() -> Built:
    return _two_input(False)


@fit("two_input_dead_cat_branch", "two_input",
     bug="the categorical embedding is computed in forward but its output never reaches the head")
def two_input_dead_cat_branch() -> Built:
    return _two_input(True)


# ---------------------------------------------------------------------------------------------------------------------
# 8. Dense per-pixel regression: conv encoder-decoder, SmoothL1


def depth_data(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    k = 3
    cx, cy = torch.rand(n, k, 1, 1, generator=g) * 2 - 1, torch.rand(n, k, 1, 1, generator=g) * 2 - 1
    amp = torch.rand(n, k, 1, 1, generator=g) + 0.5
    r2_ = (xx - cx) ** 2 + (yy - cy) ** 2
    blobs = amp * torch.exp(-r2_ / 0.05)
    img = blobs.sum(1, keepdim=True) + 0.05 * torch.randn(n, 1, size, size, generator=g)
    depth = (amp * torch.exp(-r2_ / 0.25)).sum(1, keepdim=True) + 0.5 * yy  # wide bumps plus a floor ramp
    return img, depth


class DepthNet(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.enc3 = nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(64, 32, 2, stride=2), nn.BatchNorm2d(32), nn.ReLU())
        self.up1 = nn.Sequential(nn.ConvTranspose2d(64, 16, 2, stride=2), nn.BatchNorm2d(16), nn.ReLU())
        self.out = nn.Conv2d(32, 1, 3, padding=1)
        self.criterion = nn.SmoothL1Loss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.up2(e3)
        d1 = self.up1(torch.cat([d2, e2], 1))
        return self.out(torch.cat([d1, e1], 1))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        img, depth = batch
        loss = self.criterion(self(img), depth)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        img, depth = batch
        self.log("val_loss", self.criterion(self(img), depth))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=2e-3)


@fit("depth_unet_smoothl1", "dense_regression")
def depth_unet_smoothl1() -> Built:
    xt, dt = depth_data(1000, 0)
    xv, dv = depth_data(200, 1)
    m = DepthNet()

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            p = m(xv)
        m.train()
        v, base = r2(p, dv, dt.mean(0, keepdim=True))
        return "pixel_r2", v, base, v > 0.85
    return Built(m, DataLoader(TensorDataset(xt, dt), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(xv, dv), batch_size=200), 15, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 9. LBFGS under automatic optimisation (Lightning passes the closure) on diabetes


class LBFGSRegressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        mse = F.mse_loss(self(x), y)
        l2 = sum((p ** 2).sum() for n, p in self.named_parameters() if "weight" in n)
        self.log("train_mse", mse)
        return mse + 1e-2 * l2

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        self.log("val_mse", F.mse_loss(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.5, max_iter=10, history_size=10,
                                 line_search_fn="strong_wolfe")


@fit("lbfgs_diabetes", "lbfgs")
def lbfgs_diabetes() -> Built:
    d = datasets.load_diabetes()
    tr, va = _split(len(d.target), 0.25, seed=5)
    Xt, Xv = standardized(d.data, tr, va)
    mu, sd = d.target[tr].mean(), d.target[tr].std()
    yt = torch.tensor((d.target[tr] - mu) / sd, dtype=torch.float32)
    yv = torch.tensor((d.target[va] - mu) / sd, dtype=torch.float32)
    m = LBFGSRegressor()

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            p = m(Xv)
        v, base = r2(p, yv, yt.mean())
        return "r2", v, base, v > 0.35
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=len(yt), shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=len(yv)), 10, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 10. bf16-mixed on CPU: an MLP on digits


class Bf16MLP(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    def training_step(self, batch: tuple, batch_idx: int) -> dict:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@fit("mlp_bf16_mixed_cpu", "precision")
def mlp_bf16_mixed_cpu() -> Built:
    Xt, yt, Xv, yv = digits()
    m = Bf16MLP()
    return Built(m, DataLoader(TensorDataset(Xt, yt), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xv, yv), batch_size=256), 20, acc_eval(m, Xv, yv, 0.94),
                 trainer_kw={"precision": "bf16-mixed"})


if __name__ == "__main__":
    blind.main()
