"""Blind fits for ``lightning_recipe.recommended()``: generative, self-supervised, graph, set, count and multi-loader
models, ported from two folders of standalone blind-study scripts.

Uses blind.py's registry, helpers and runner; only the fits below are registered, so

    python benchmarks/blind_generative.py                      # every fit here, one at a time
    python benchmarks/blind_generative.py --only gan_moons     # one fit (or a list, or "healthy"/"broken")
    python benchmarks/blind_generative.py --json out.json      # every result, findings with their full messages
    python benchmarks/blind_generative.py --plain              # also each healthy fit without the recipe

Families: a VAE on digits (BCE-with-logits reconstruction + KL, ``(x, label)`` batches, the label unused); a GAN on two
moons under manual optimisation (latent 8, ``training_step`` returning nothing; the same returning its generator loss;
latent 2 with ``(x, label)`` batches); knowledge distillation into a small student from a frozen teacher pretrained in
plain PyTorch (T^2-scaled KL + ``nn.CrossEntropyLoss`` held as an attribute); a two-layer GCN on a stochastic-block-
model graph fed as one full-graph item per epoch (``batch_size=None``); DeepSets sum pooling classifying point sets;
heteroscedastic regression with ``nn.GaussianNLLLoss`` (forward returns mean and variance); Poisson regression on large
counts (means ~26 and ~71) with ``nn.PoissonNLLLoss(log_input=True)``; an LSTM over ``pack_padded_sequence``-d
variable-length sequences whose forward requires the lengths; a dilated causal TCN one-step forecaster; a log-STFT
1-D CNN classifying synthetic audio; SimCLR NT-Xent on two augmented views of digits (feature widths 64, 32 and 16,
judged by a linear probe); LoRA adapters on a frozen MLP pretrained on digits 0-4, fine-tuned on all ten; a CORAL
ordinal head trained on cumulative level targets; a three-quantile pinball-loss regressor; a multi-task CNN fed a dict
of two training loaders (classification + an auxiliary regression); a residual MLP with stochastic depth (drop path),
AdamW with split decay groups, a per-step cosine schedule and gradient clipping.

Broken fits carry one named bug each: the Poisson counts shuffled against the inputs, the generator-loss-returning GAN
at a learning rate of 10 (its generator loss explodes; named ``gan_moons_nan``, but on CPU it stays finite), and a
distillation student that applies softmax to its outputs before the cross-entropy module and the KL term.

Data: scikit-learn's digits and diabetes, scikit-learn's two moons, and synthetic tensors (a stochastic block model,
point sets, Gaussian and Poisson regression targets, variable-length sequences, multi-sine series, tones/chirps/noise
bursts, wine-quality-like ordinal grades). Nothing is downloaded.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes, load_digits, make_moons
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence
from torch.utils.data import DataLoader, Dataset, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blind  # noqa: E402

from blind import Built, acc_eval, fit  # noqa: E402

blind.FITS.clear()

Metric = tuple[str, float, float, bool]


# ---------------------------------------------------------------------------------------------------------------------
# data


def digits_split(test_size: float,
                 scale: str = "none") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits (N, 64), stratified split (random_state=0); ``scale``: "unit" (/16), "standard" (train statistics) or
    "none"."""
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    if scale == "unit":
        X = X / 16.0
    Xtr, Xva, ytr, yva = train_test_split(X, y, test_size=test_size, random_state=0, stratify=y)
    if scale == "standard":
        sc = StandardScaler().fit(Xtr)
        Xtr, Xva = sc.transform(Xtr), sc.transform(Xva)
    return (torch.tensor(Xtr, dtype=torch.float32), torch.tensor(ytr),
            torch.tensor(Xva, dtype=torch.float32), torch.tensor(yva))


def majority(y_train: torch.Tensor, y_test: torch.Tensor) -> float:
    """Accuracy of always predicting the training split's most frequent class."""
    return (y_test == torch.bincount(y_train).argmax()).float().mean().item()


# ---------------------------------------------------------------------------------------------------------------------
# 1. VAE on digits: BCE-with-logits reconstruction + KL; the dataset yields (x, label), the label is ignored


class VAE(L.LightningModule):
    def __init__(self, d: int = 64, h: int = 128, z: int = 8, lr: float = 1e-3, beta: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.enc = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.mu = nn.Linear(h, z)
        self.logvar = nn.Linear(h, z)
        self.dec = nn.Sequential(nn.Linear(z, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hdn = self.enc(x)
        mu, logvar = self.mu(hdn), self.logvar(hdn)
        zz = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.dec(zz), mu, logvar                       # reconstruction logits, mu, logvar

    def _loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        recon, mu, logvar = self(x)
        rec = F.binary_cross_entropy_with_logits(recon, x, reduction="sum") / x.shape[0]
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / x.shape[0]
        return rec + self.hparams.beta * kl, rec, kl

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, rec, kl = self._loss(batch[0])
        self.log_dict({"train_loss": loss, "train_rec": rec, "train_kl": kl})
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, rec, kl = self._loss(batch[0])
        self.log_dict({"val_loss": loss, "val_rec": rec, "val_kl": kl})

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("vae_digits", "vae")
def vae_digits() -> Built:
    Xtr, ytr, Xte, yte = digits_split(0.2, "unit")
    m = VAE()

    def ev() -> Metric:
        """Held-out reconstruction BCE per image (lower is better) against the training mean image's."""
        m.eval()
        with torch.no_grad():
            recon, _, _ = m(Xte)
        m.train()
        bce = F.binary_cross_entropy_with_logits(recon, Xte, reduction="sum").item() / len(Xte)
        p = Xtr.mean(0).clamp(1e-4, 1 - 1e-4)
        base = F.binary_cross_entropy(p.expand_as(Xte), Xte, reduction="sum").item() / len(Xte)
        return "recon_bce/img", bce, base, bce < 0.8 * base
    return Built(m, DataLoader(TensorDataset(Xtr, ytr), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xte, yte), batch_size=256), 100, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 2. GAN on two moons: manual optimisation, two Adam optimisers, non-saturating generator loss


class MoonsGAN(L.LightningModule):
    def __init__(self, latent_dim: int = 8, h: int = 128, lr: float = 1e-3, return_g: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(latent_dim, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2),
                                       nn.Linear(h, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2),
                                           nn.Linear(h, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def training_step(self, batch: Any, batch_idx: int) -> Optional[torch.Tensor]:
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        n = real.shape[0]
        z = torch.randn(n, self.hparams.latent_dim, device=self.device)
        fake = self(z)
        d_real = self.discriminator(real)
        d_fake = self.discriminator(fake.detach())
        d_loss = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))) / 2
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        d_fake = self.discriminator(fake)
        g_loss = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss}, prog_bar=True)
        if self.hparams.return_g:          # some GAN code returns a loss from a manual-optimisation step
            return g_loss
        return None

    def configure_optimizers(self) -> Any:
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=(0.5, 0.999))
        return [opt_g, opt_d]


def mmd(a: torch.Tensor, b: torch.Tensor, sigmas: tuple[float, ...] = (0.1, 0.3, 1.0)) -> float:
    def k(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d / (2 * s * s)) for s in sigmas)
    return (k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()).item()


def _gan(latent: int, labelled: bool, return_g: bool, lr: float = 1e-3) -> Built:
    X, Y = make_moons(n_samples=4000, noise=0.05, random_state=0)
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    Xtr, Xte, Ytr = torch.tensor(X[:3000]), torch.tensor(X[3000:]), torch.tensor(Y[:3000])
    m = MoonsGAN(latent_dim=latent, lr=lr, return_g=return_g)

    def ev() -> Metric:
        """MMD between 1000 generated points and the held-out moons (lower is better) against a Gaussian fitted to
        the training points."""
        g = torch.Generator().manual_seed(1)
        m.eval()
        with torch.no_grad():
            fake = m(torch.randn(1000, latent, generator=g))
        m.train()
        chol = torch.linalg.cholesky(torch.cov(Xtr.T))
        gauss = Xtr.mean(0) + torch.randn(1000, 2, generator=g) @ chol.T
        v, base = mmd(fake, Xte), mmd(gauss, Xte)
        return "mmd", v, base, v < 0.5 * base
    ds = TensorDataset(Xtr, Ytr) if labelled else TensorDataset(Xtr)
    return Built(m, DataLoader(ds, batch_size=128, shuffle=True, drop_last=True), None, 60, ev)


@fit("gan_moons", "gan")
def gan_moons() -> Built:
    return _gan(8, labelled=False, return_g=False)


@fit("gan_moons_returns_loss", "gan")
def gan_moons_returns_loss() -> Built:
    return _gan(8, labelled=False, return_g=True)


@fit("gan_moons_labelled", "gan")
def gan_moons_labelled() -> Built:
    return _gan(2, labelled=True, return_g=False)


@fit("gan_moons_nan", "gan",
     bug="both Adam optimisers at lr=10.0 (meant 1e-3), the generator loss returned from training_step: the "
         "discriminator collapses and the generator loss blows up to 1e11-1e16 (on CPU it stays finite, no NaN)")
def gan_moons_nan() -> Built:
    return _gan(8, labelled=False, return_g=True, lr=10.0)


# ---------------------------------------------------------------------------------------------------------------------
# 3. knowledge distillation: a frozen teacher pretrained in plain PyTorch, T^2 * KL + CE held as nn.CrossEntropyLoss


class DistillStudent(L.LightningModule):
    def __init__(self, teacher: nn.Module, T: float = 4.0, alpha: float = 0.7, lr: float = 1e-3,
                 softmax_out: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["teacher"])
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.ce = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.student(x)
        return out.softmax(-1) if self.hparams.softmax_out else out

    def on_train_epoch_start(self) -> None:
        self.teacher.eval()              # Lightning puts the whole module in train mode; keep the teacher's dropout off

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        s = self(x)
        with torch.no_grad():
            t = self.teacher(x)
        T = self.hparams.T
        kd = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), log_target=True,
                      reduction="batchmean") * T * T
        ce = self.ce(s, y)
        loss = self.hparams.alpha * kd + (1 - self.hparams.alpha) * ce
        self.log_dict({"train_loss": loss, "kd": kd, "ce": ce})
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        s = self(x)
        self.log_dict({"val_loss": self.ce(s, y), "val_acc": (s.argmax(1) == y).float().mean()})

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.student.parameters(), lr=self.hparams.lr)


def _distill(softmax_out: bool) -> Built:
    Xtr, ytr, Xte, yte = digits_split(0.25, "standard")
    teacher = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 256), nn.ReLU(),
                            nn.Dropout(0.2), nn.Linear(256, 10))
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    for _ in range(30):
        teacher.train()
        for xb, yb in DataLoader(TensorDataset(Xtr, ytr), batch_size=64, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(teacher(xb), yb).backward()
            opt.step()
    teacher.eval()
    m = DistillStudent(teacher, softmax_out=softmax_out)

    def ev() -> Metric:
        """Student test accuracy against the majority class."""
        m.eval()
        with torch.no_grad():
            acc = (m(Xte).argmax(1) == yte).float().mean().item()
        m.train()
        return "acc", acc, majority(ytr, yte), acc >= 0.9
    return Built(m, DataLoader(TensorDataset(Xtr, ytr), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xte, yte), batch_size=256), 30, ev)


@fit("distill_ce_module", "distillation")
def distill_ce_module() -> Built:
    return _distill(False)


@fit("distill_softmax_student", "distillation",
     bug="the student's forward applies softmax: nn.CrossEntropyLoss gets probabilities as logits, and the KL term "
         "takes log_softmax of those probabilities")
def distill_softmax_student() -> Built:
    return _distill(True)


# ---------------------------------------------------------------------------------------------------------------------
# 4. two-layer GCN (plain torch) on a stochastic-block-model graph; one full-graph item per epoch, batch_size=None


class GraphItem(Dataset):
    def __init__(self, x: torch.Tensor, adj: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> None:
        self.item = (x, adj, y, mask)

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return self.item


class GCN(L.LightningModule):
    def __init__(self, d_in: int = 16, h: int = 32, c: int = 4, lr: float = 1e-2, wd: float = 5e-4,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lin1 = nn.Linear(d_in, h)
        self.lin2 = nn.Linear(h, c)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = F.relu(adj @ self.lin1(self.dropout(x)))
        return adj @ self.lin2(self.dropout(h))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, adj, y, mask = batch
        out = self(x, adj)
        loss = F.cross_entropy(out[mask], y[mask])
        self.log("train_loss", loss, batch_size=int(mask.sum()))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, adj, y, mask = batch
        out = self(x, adj)
        self.log_dict({"val_loss": F.cross_entropy(out[mask], y[mask]),
                       "val_acc": (out[mask].argmax(1) == y[mask]).float().mean()}, batch_size=int(mask.sum()))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.wd)


@fit("gcn_sbm", "graph")
def gcn_sbm() -> Built:
    rng = np.random.default_rng(0)
    N, C, D = 600, 4, 16
    labels = np.repeat(np.arange(C), N // C)
    rng.shuffle(labels)
    P = np.where(labels[:, None] == labels[None, :], 0.05, 0.005)
    A = (rng.random((N, N)) < P).astype(np.float32)
    A = np.triu(A, 1)
    A = A + A.T
    means = rng.normal(0, 1, (C, D)) * 0.5            # weak, noisy node features: an MLP alone is mediocre
    Xf = (means[labels] + rng.normal(0, 1, (N, D))).astype(np.float32)
    Xf = (Xf - Xf.mean(0)) / Xf.std(0)
    Ahat = A + np.eye(N, dtype=np.float32)
    dinv = 1 / np.sqrt(Ahat.sum(1))
    Anorm = (dinv[:, None] * Ahat * dinv[None, :]).astype(np.float32)
    perm = rng.permutation(N)
    masks = {k: torch.zeros(N, dtype=torch.bool) for k in ("train", "val", "test")}
    masks["train"][torch.tensor(perm[:120])] = True
    masks["val"][torch.tensor(perm[120:300])] = True
    masks["test"][torch.tensor(perm[300:])] = True
    X_t, A_t, y_t = torch.tensor(Xf), torch.tensor(Anorm), torch.tensor(labels)
    m = GCN(d_in=D, c=C)

    def ev() -> Metric:
        """Test-node accuracy against the training nodes' majority class."""
        m.eval()
        with torch.no_grad():
            out = m(X_t, A_t)
        m.train()
        tm = masks["test"]
        acc = (out[tm].argmax(1) == y_t[tm]).float().mean().item()
        return "acc", acc, majority(y_t[masks["train"]], y_t[tm]), acc >= 0.9
    return Built(m, DataLoader(GraphItem(X_t, A_t, y_t, masks["train"]), batch_size=None),
                 DataLoader(GraphItem(X_t, A_t, y_t, masks["val"]), batch_size=None), 200, ev,
                 trainer_kw={"log_every_n_steps": 1})


# ---------------------------------------------------------------------------------------------------------------------
# 5. DeepSets (sum pooling) on sets of 10 points in 2-D; 3 classes: tertiles of the set's largest point norm


class DeepSets(L.LightningModule):
    def __init__(self, h: int = 64, out: int = 3, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.phi = nn.Sequential(nn.Linear(2, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h))
        self.rho = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, out))
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:           # x: (N, set_size, 2)
        return self.rho(self.phi(x).sum(dim=1))                   # permutation-invariant sum pooling

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("deepsets_cls", "deepsets")
def deepsets_cls() -> Built:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6000, 10, 2, generator=g)
    maxnorm = X.norm(dim=-1).max(dim=1).values
    q = torch.quantile(maxnorm[:4000], torch.tensor([1 / 3, 2 / 3]))
    Y = torch.bucketize(maxnorm, q)
    Xtr, Xva, Xte = X[:4000], X[4000:5000], X[5000:]
    Ytr, Yva, Yte = Y[:4000], Y[4000:5000], Y[5000:]
    m = DeepSets()

    def ev() -> Metric:
        """Test accuracy against the training sets' majority class."""
        m.eval()
        with torch.no_grad():
            acc = (m(Xte).argmax(1) == Yte).float().mean().item()
        m.train()
        return "acc", acc, majority(Ytr, Yte), acc >= 0.9
    return Built(m, DataLoader(TensorDataset(Xtr, Ytr), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xva, Yva), batch_size=256), 30, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 6. heteroscedastic regression with nn.GaussianNLLLoss: forward returns (mean, variance)


class HeteroMLP(L.LightningModule):
    def __init__(self, d: int = 6, h: int = 64, lr: float = 1e-3, wd: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.mean_head = nn.Linear(h, 1)
        self.var_head = nn.Linear(h, 1)
        self.loss_fn = nn.GaussianNLLLoss()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hdn = self.body(x)
        mean = self.mean_head(hdn).squeeze(-1)
        var = F.softplus(self.var_head(hdn)).squeeze(-1) + 1e-6
        return mean, var

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        mean, var = self(x)
        loss = self.loss_fn(mean, y, var)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        mean, var = self(x)
        self.log_dict({"val_loss": self.loss_fn(mean, y, var), "val_mse": F.mse_loss(mean, y)})

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.wd)


@fit("hetero_gaussian_nll", "heteroscedastic")
def hetero_gaussian_nll() -> Built:
    """y = x0 + sin(2 x1) + 0.5 x2^2 + noise with std 0.1 + 0.6 sigmoid(2 x3); inputs and target standardised."""
    rng = np.random.default_rng(0)
    N, D, ntr, nva = 5000, 6, 3500, 750
    X = rng.normal(size=(N, D)).astype(np.float32)
    sd = 0.1 + 0.6 / (1 + np.exp(-2 * X[:, 3]))
    Y = (X[:, 0] + np.sin(2 * X[:, 1]) + 0.5 * X[:, 2] ** 2 + sd * rng.normal(size=N)).astype(np.float32)
    X = (X - X[:ntr].mean(0)) / X[:ntr].std(0)
    Y = (Y - Y[:ntr].mean()) / Y[:ntr].std()
    X, Y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)
    Xtr, Ytr, Xva, Yva = X[:ntr], Y[:ntr], X[ntr:ntr + nva], Y[ntr:ntr + nva]
    Xte, Yte = X[ntr + nva:], Y[ntr + nva:]
    m = HeteroMLP(d=D)

    def ev() -> Metric:
        """Test Gaussian NLL (lower is better) against the training targets' mean and variance."""
        m.eval()
        with torch.no_grad():
            mean, var = m(Xte)
        m.train()
        nll = F.gaussian_nll_loss(mean, Yte, var, full=True).item()
        nll0 = F.gaussian_nll_loss(Ytr.mean().expand_as(Yte), Yte, Ytr.var().expand_as(Yte), full=True).item()
        return "gauss_nll", nll, nll0, nll < nll0 - 0.5
    return Built(m, DataLoader(TensorDataset(Xtr, Ytr), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xva, Yva), batch_size=256), 40, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 7. Poisson regression on synthetic counts: nn.PoissonNLLLoss(log_input=True), the model outputs the log-rate


class PoissonMLP(L.LightningModule):
    def __init__(self, d: int = 8, h: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))
        self.loss_fn = nn.PoissonNLLLoss(log_input=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)        # log-rate

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def deviance(y: torch.Tensor, mu: torch.Tensor) -> float:
    t = torch.where(y > 0, y * torch.log(y / mu), torch.zeros_like(y))
    return (2 * (t - (y - mu))).mean().item()


def _poisson(offset: float, shuffled: bool = False) -> Built:
    """log-rate = offset + 0.5 x0 - 0.4 x1 + 0.3 sin(2 x2) + 0.2 x3 x4: offset 3.0 gives mean counts ~26, 4.0 ~71."""
    rng = np.random.default_rng(0)
    N, D = 6000, 8
    X = rng.normal(size=(N, D)).astype(np.float32)
    log_rate = offset + 0.5 * X[:, 0] - 0.4 * X[:, 1] + 0.3 * np.sin(2 * X[:, 2]) + 0.2 * X[:, 3] * X[:, 4]
    Y = rng.poisson(np.exp(log_rate)).astype(np.float32)
    X, Y = torch.tensor(X), torch.tensor(Y)
    Xtr, Ytr, Xva, Yva, Xte, Yte = X[:4000], Y[:4000], X[4000:5000], Y[4000:5000], X[5000:], Y[5000:]
    if shuffled:
        Ytr = Ytr[torch.randperm(len(Ytr), generator=torch.Generator().manual_seed(1))]
    m = PoissonMLP(d=D)

    def ev() -> Metric:
        """Mean Poisson deviance on the test rows (lower is better) against a constant rate (the training mean)."""
        m.eval()
        with torch.no_grad():
            mu = m(Xte).exp()
        m.train()
        d, d0 = deviance(Yte, mu), deviance(Yte, torch.full_like(Yte, Ytr.mean().item()))
        return "deviance", d, d0, d < 0.3 * d0
    return Built(m, DataLoader(TensorDataset(Xtr, Ytr), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xva, Yva), batch_size=256), 30, ev)


@fit("poisson_counts_26", "poisson")
def poisson_counts_26() -> Built:
    return _poisson(3.0)


@fit("poisson_counts_71", "poisson")
def poisson_counts_71() -> Built:
    return _poisson(4.0)


@fit("poisson_counts_shuffled", "poisson", bug="the training counts shuffled against the inputs (mean counts ~26)")
def poisson_counts_shuffled() -> Built:
    return _poisson(3.0, shuffled=True)


# ---------------------------------------------------------------------------------------------------------------------
# 8. LSTM over variable-length sequences with pack_padded_sequence; batches (padded x, lengths, y); lengths required


class SeqDataset(Dataset):
    """Sequences of 5-30 standard normal values; label: is the sum positive?"""

    def __init__(self, n: int, g: torch.Generator) -> None:
        lens = torch.randint(5, 31, (n,), generator=g)
        self.seqs = [torch.randn(int(k), generator=g) for k in lens]
        self.y = torch.tensor([int(s.sum() > 0) for s in self.seqs])

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.seqs[i], self.y[i]


def pad_collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs, ys = zip(*batch)
    lengths = torch.tensor([len(s) for s in seqs])
    return pad_sequence(seqs, batch_first=True).unsqueeze(-1), lengths, torch.stack(ys)   # (B, T, 1)


class LSTMClassifier(L.LightningModule):
    def __init__(self, h: int = 32, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lstm = nn.LSTM(1, h, batch_first=True)
        self.head = nn.Linear(h, 2)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        if lengths is None:
            raise TypeError("lengths required")
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return self.head(h_n[-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, lengths, y = batch
        loss = self.loss_fn(self(x, lengths), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, lengths, y = batch
        logits = self(x, lengths)
        self.log_dict({"val_loss": self.loss_fn(logits, y), "val_acc": (logits.argmax(1) == y).float().mean()})

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("lstm_packed", "rnn")
def lstm_packed() -> Built:
    g = torch.Generator().manual_seed(0)
    tr, va, te = SeqDataset(3000, g), SeqDataset(600, g), SeqDataset(1000, g)
    m = LSTMClassifier()
    x_te, len_te, y_te = pad_collate([te[i] for i in range(len(te))])
    return Built(m, DataLoader(tr, batch_size=64, shuffle=True, collate_fn=pad_collate),
                 DataLoader(va, batch_size=256, collate_fn=pad_collate), 15,
                 acc_eval(m, x_te, y_te, 0.9, fwd=lambda x: m(x, len_te)))


# ---------------------------------------------------------------------------------------------------------------------
# 9. dilated causal TCN (5 residual levels, dropout) forecasting the next value of a noisy multi-sine series


class CausalConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, d: int) -> None:
        super().__init__()
        self.pad = (k - 1) * d
        self.conv = nn.Conv1d(cin, cout, k, dilation=d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0)))


class TCNBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, d: int, p: float = 0.1) -> None:
        super().__init__()
        self.c1, self.c2 = CausalConv(cin, cout, k, d), CausalConv(cout, cout, k, d)
        self.drop = nn.Dropout(p)
        self.down = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(F.relu(self.c1(x)))
        h = self.drop(F.relu(self.c2(h)))
        return F.relu(h + self.down(x))


class TCN(L.LightningModule):
    def __init__(self, ch: int = 32, k: int = 3, levels: int = 5, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tcn = nn.Sequential(*[TCNBlock(1 if i == 0 else ch, ch, k, 2 ** i) for i in range(levels)])
        self.head = nn.Linear(ch, 1)
        self.loss_fn = nn.MSELoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tcn(x)[:, :, -1])          # (N, C, T) -> the last step

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y), prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("tcn_forecast", "tcn")
def tcn_forecast() -> Built:
    T, W = 6000, 64
    t = np.arange(T)
    rng = np.random.default_rng(0)
    s = (np.sin(2 * np.pi * t / 50) + 0.5 * np.sin(2 * np.pi * t / 23 + 1.0) + 0.3 * np.sin(2 * np.pi * t / 7 + 0.3)
         + 0.1 * rng.standard_normal(T)).astype(np.float32)
    split = int(0.8 * T)
    s = (s - s[:split].mean()) / s[:split].std()

    def windows(a: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        X = np.stack([a[i:i + W] for i in range(len(a) - W)])
        return torch.tensor(X).unsqueeze(1), torch.tensor(a[W:]).unsqueeze(1)
    Xtr, ytr = windows(s[:split])
    Xva, yva = windows(s[split:])
    m = TCN()

    def ev() -> Metric:
        """Next-value MSE on the held-out tail of the series (lower is better) against the training mean."""
        m.eval()
        with torch.no_grad():
            mse = F.mse_loss(m(Xva), yva).item()
        m.train()
        base = F.mse_loss(torch.full_like(yva, ytr.mean().item()), yva).item()
        return "mse", mse, base, mse < 0.1 * base
    return Built(m, DataLoader(TensorDataset(Xtr, ytr), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xva, yva), batch_size=256), 6, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 10. log-magnitude STFT (torch.stft in forward, Hann window as a buffer) into a BatchNorm 1-D CNN: 4 sound classes


class SpecCNN(L.LightningModule):
    def __init__(self, n_fft: int = 64, hop: int = 16, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.register_buffer("window", torch.hann_window(n_fft))
        nb = n_fft // 2 + 1
        self.net = nn.Sequential(
            nn.BatchNorm1d(nb),
            nn.Conv1d(nb, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU(),
            nn.Conv1d(64, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(64, 64, 3, padding=1), nn.BatchNorm1d(64), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Dropout(0.2),
            nn.Linear(64, 4))
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(wav, self.hparams.n_fft, self.hparams.hop, window=self.window, return_complex=True)
        return self.net(torch.log(spec.abs() + 1e-6))        # (N, F, T)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.criterion(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def make_sounds(n: int, rng: np.random.Generator, noise: float = 0.3, sr: int = 1000,
                length: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Low tones, high tones, up-chirps and noise bursts, random amplitude and phase, plus white noise."""
    tt = np.arange(length) / sr
    X = np.zeros((n, length), np.float32)
    y = rng.integers(0, 4, n)
    for i in range(n):
        a, ph = rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)
        if y[i] == 0:
            s = np.sin(2 * np.pi * rng.uniform(20, 60) * tt + ph)
        elif y[i] == 1:
            s = np.sin(2 * np.pi * rng.uniform(200, 300) * tt + ph)
        elif y[i] == 2:
            f0, f1 = rng.uniform(20, 80), rng.uniform(250, 400)
            s = np.sin(2 * np.pi * (f0 * tt + (f1 - f0) * tt ** 2 / (2 * tt[-1])) + ph)
        else:
            s = np.zeros(length)
            for _ in range(rng.integers(2, 5)):
                c = rng.integers(0, length - 100)
                s[c:c + 100] = rng.standard_normal(100)
        X[i] = a * s + noise * rng.standard_normal(length)
    return torch.tensor(X), torch.tensor(y)


@fit("stft_cnn", "audio")
def stft_cnn() -> Built:
    rng = np.random.default_rng(0)
    Xtr, ytr = make_sounds(2000, rng)
    Xva, yva = make_sounds(500, rng)
    m = SpecCNN()
    return Built(m, DataLoader(TensorDataset(Xtr, ytr), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xva, yva), batch_size=256), 5, acc_eval(m, Xva, yva, 0.95))


# ---------------------------------------------------------------------------------------------------------------------
# 11. SimCLR NT-Xent on two augmented views (shift + noise) of 8x8 digits, a BatchNorm CNN encoder; linear probe


def augment(x: torch.Tensor, max_shift: int = 1, noise: float = 0.3) -> torch.Tensor:
    n = x.shape[0]
    xp = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), device=x.device)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), device=x.device)
    out = torch.stack([xp[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(n)])
    return out + noise * torch.randn_like(out)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    z = F.normalize(torch.cat([z1, z2]), dim=1)            # (2N, D)
    n = z1.shape[0]
    sim = z @ z.t() / tau
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class SimCLR(L.LightningModule):
    def __init__(self, feat: int = 64, proj: int = 32, lr: float = 1e-3, tau: float = 0.5) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, feat))
        self.projector = nn.Sequential(nn.Linear(feat, feat), nn.ReLU(), nn.Linear(feat, proj))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        z1 = self.projector(self.encoder(augment(x)))
        z2 = self.projector(self.encoder(augment(x)))
        return nt_xent(z1, z2, self.hparams.tau)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _y = batch
        loss = self._loss(x)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, _y = batch
        self.log("val_loss", self._loss(x))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=1e-6)


def _simclr(feat: int) -> Built:
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)
    X = (X - X.mean()) / X.std()
    Xtr, Xva, ytr, yva = train_test_split(X, d.target, test_size=0.25, random_state=0, stratify=d.target)
    Xtr, Xva = torch.tensor(Xtr).unsqueeze(1), torch.tensor(Xva).unsqueeze(1)
    ytr, yva = torch.tensor(ytr), torch.tensor(yva)

    def probe(enc: nn.Module) -> float:
        enc.eval()
        with torch.no_grad():
            ftr, fva = enc(Xtr).numpy(), enc(Xva).numpy()
        enc.train()
        mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
        clf = LogisticRegression(max_iter=2000).fit((ftr - mu) / sd, ytr.numpy())
        return float(clf.score((fva - mu) / sd, yva.numpy()))

    m = SimCLR(feat=feat)
    rand_acc = probe(copy.deepcopy(m.encoder))

    def ev() -> Metric:
        """Linear-probe accuracy on the encoder's features against the same probe on the random-init encoder."""
        acc = probe(m.encoder)
        return "probe_acc", acc, rand_acc, acc >= rand_acc + 0.02
    return Built(m, DataLoader(TensorDataset(Xtr, ytr), batch_size=128, shuffle=True, drop_last=True),
                 DataLoader(TensorDataset(Xva, yva), batch_size=128, drop_last=True), 25, ev)


@fit("simclr_64", "contrastive")
def simclr_64() -> Built:
    return _simclr(64)


@fit("simclr_32", "contrastive")
def simclr_32() -> Built:
    return _simclr(32)


@fit("simclr_16", "contrastive")
def simclr_16() -> Built:
    return _simclr(16)


# ---------------------------------------------------------------------------------------------------------------------
# 12. LoRA: an MLP pretrained in plain PyTorch on digits 0-4, frozen, rank-4 adapters + a new 10-way head


class LoRALinear(nn.Module):
    def __init__(self, base_linear: nn.Linear, r: int = 4, alpha: float = 8, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base_linear
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.Linear(base_linear.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base_linear.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.drop = nn.Dropout(dropout)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.drop(x))) * self.scaling


class LoRAFinetune(L.LightningModule):
    def __init__(self, base: nn.Sequential, r: int = 4, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["base"])
        trunk = list(base.children())[:-1]          # drop the old 5-way head
        trunk = [LoRALinear(mod, r=r, alpha=2 * r, dropout=0.1) if isinstance(mod, nn.Linear) else mod for mod in trunk]
        self.trunk = nn.Sequential(*trunk)
        self.head = nn.Linear(128, 10)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss_fn(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=0.01)


@fit("lora_digits", "lora")
def lora_digits() -> Built:
    Xtr, ytr, Xva, yva = digits_split(0.25, "standard")
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 5))
    low = ytr < 5
    opt = torch.optim.Adam(base.parameters(), 1e-3)
    for _ in range(15):
        for xb, yb in DataLoader(TensorDataset(Xtr[low], ytr[low]), batch_size=64, shuffle=True):
            opt.zero_grad()
            F.cross_entropy(base(xb), yb).backward()
            opt.step()
    base.eval()
    m = LoRAFinetune(base)
    return Built(m, DataLoader(TensorDataset(Xtr, ytr), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xva, yva), batch_size=256), 20, acc_eval(m, Xva, yva, 0.9))


# ---------------------------------------------------------------------------------------------------------------------
# 13. CORAL ordinal regression: one shared weight + K-1 ordered biases, BCE on cumulative level targets (6 grades)


class CoralLayer(nn.Module):
    """Rank-consistent head: one shared weight vector, K-1 ordered biases."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 1, bias=False)
        self.coral_bias = nn.Parameter(torch.arange(num_classes - 1, 0, -1).float() / (num_classes - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + self.coral_bias


def levels_from_labels(y: torch.Tensor, K: int) -> torch.Tensor:
    return (y.unsqueeze(1) > torch.arange(K - 1, device=y.device)).float()


class Ordinal(L.LightningModule):
    def __init__(self, d_in: int, K: int = 6, hidden: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, hidden),
                                  nn.ReLU())
        self.head = CoralLayer(hidden, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))          # (N, K-1) cumulative logits

    def coral_loss(self, logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, levels)

    @staticmethod
    def predict_class(logits: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(logits) > 0.5).sum(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.coral_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.coral_loss(logits, y))
        self.log("val_mae", (self.predict_class(logits) - y.sum(1)).abs().float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)


@fit("coral_levels", "ordinal")
def coral_levels() -> Built:
    """Synthetic wine-quality-like data: 11 raw-unit features, 6 ordered grades, most in the middle two."""
    K, n = 6, 4000
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 11)) * rng.uniform(0.1, 30, 11) + rng.uniform(0, 100, 11)
    Z = (X - X.mean(0)) / X.std(0)
    latent = Z[:, 0] - 0.8 * Z[:, 3] + 0.5 * Z[:, 5] * Z[:, 6] + 0.6 * np.tanh(Z[:, 9]) + 0.6 * rng.standard_normal(n)
    grade = np.digitize(latent, [-2.6, -1.5, 0.0, 1.3, 2.4])
    Xtr, Xva, ytr, yva = train_test_split(X, grade, test_size=0.25, random_state=0)
    sc = StandardScaler().fit(Xtr)
    Xtr, Xva = (torch.tensor(sc.transform(a), dtype=torch.float32) for a in (Xtr, Xva))
    ytr, yva = torch.tensor(ytr), torch.tensor(yva)
    m = Ordinal(Xtr.shape[1], K)

    def ev() -> Metric:
        """Held-out MAE in grades (lower is better) against always predicting the training median grade."""
        m.eval()
        with torch.no_grad():
            pred = m.predict_class(m(Xva))
        m.train()
        mae = (pred - yva).abs().float().mean().item()
        base = (yva - ytr.median()).abs().float().mean().item()
        return "mae", mae, base, mae < 0.6 * base
    return Built(m, DataLoader(TensorDataset(Xtr, levels_from_labels(ytr, K)), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(Xva, levels_from_labels(yva, K)), batch_size=128), 40, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 14. quantile regression on diabetes: three outputs (0.1, 0.5, 0.9), a pinball loss module, (N,) targets


QUANTILES = (0.1, 0.5, 0.9)


class PinballLoss(nn.Module):
    def __init__(self, quantiles: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("q", torch.tensor(quantiles))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == 1:
            target = target.unsqueeze(1)
        err = target - pred                               # (N, Q)
        return torch.maximum(self.q * err, (self.q - 1) * err).mean()


class QuantileRegressor(L.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, len(QUANTILES)))
        self.loss_fn = PinballLoss(QUANTILES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=1e-4)


@fit("quantile_pinball", "quantile")
def quantile_pinball() -> Built:
    X, y = load_diabetes(return_X_y=True)
    Xtr, Xva, ytr, yva = train_test_split(X, y, test_size=0.25, random_state=0)
    sc = StandardScaler().fit(Xtr)
    ymu, ysd = ytr.mean(), ytr.std()
    Xtr, Xva = (torch.tensor(sc.transform(a), dtype=torch.float32) for a in (Xtr, Xva))
    ytr, yva = (torch.tensor((a - ymu) / ysd, dtype=torch.float32) for a in (ytr, yva))
    m = QuantileRegressor()

    def ev() -> Metric:
        """Held-out pinball loss (lower is better) against the training targets' constant quantiles."""
        m.eval()
        with torch.no_grad():
            loss = m.loss_fn(m(Xva), yva).item()
        m.train()
        const = torch.quantile(ytr, torch.tensor(QUANTILES)).expand(len(yva), 3)
        base = m.loss_fn(const, yva).item()
        return "pinball", loss, base, loss < 0.9 * base
    return Built(m, DataLoader(TensorDataset(Xtr, ytr), batch_size=32, shuffle=True),
                 DataLoader(TensorDataset(Xva, yva), batch_size=128), 30, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 15. a dict of two training loaders: digit classification + an auxiliary regression (ink centre of mass), one trunk


class MultiTask(L.LightningModule):
    def __init__(self, lr: float = 2e-3, aux_weight: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU(), nn.Dropout(0.2))
        self.cls_head = nn.Linear(128, 10)
        self.reg_head = nn.Linear(128, 1)
        self.ce = nn.CrossEntropyLoss()
        self.mse = nn.MSELoss()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.cls_head(h), self.reg_head(h).squeeze(1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        xc, yc = batch["cls"]
        xr, yr = batch["reg"]
        loss_c = self.ce(self(xc)[0], yc)
        loss_r = self.mse(self(xr)[1], yr)
        loss = loss_c + self.hparams.aux_weight * loss_r
        self.log_dict({"loss_cls": loss_c, "loss_reg": loss_r, "train_loss": loss})
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)[0]
        self.log("val_loss", self.ce(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


@fit("two_train_loaders", "multi_loader")
def two_train_loaders() -> Built:
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)
    pix_mu, pix_sd = X.mean(), X.std()
    X = (X - pix_mu) / pix_sd
    Xtr, Xva, ytr, yva = train_test_split(X, d.target, test_size=0.25, random_state=0, stratify=d.target)
    Xtr, Xva = torch.tensor(Xtr).unsqueeze(1), torch.tensor(Xva).unsqueeze(1)
    ytr, yva = torch.tensor(ytr), torch.tensor(yva)
    # auxiliary regression set: shifted, noisy digit images; target: the ink's vertical centre of mass (standardised)
    rng = np.random.default_rng(1)
    raw = d.images.astype(np.float32)
    imgs = raw[rng.permutation(len(raw))]
    imgs = np.stack([np.roll(im, rng.integers(-2, 3), axis=0) for im in imgs]).astype(np.float32)
    ink = imgs.clip(0)
    com = (ink * np.arange(8, dtype=np.float32)[:, None]).sum((1, 2)) / ink.sum((1, 2))
    imgs = imgs + 0.1 * rng.standard_normal(imgs.shape).astype(np.float32)
    Xa = (imgs / 16.0 - pix_mu) / pix_sd                   # the same preprocessing as the classification set
    ya = (com - com[:1000].mean()) / com[:1000].std()
    Xa_tr, ya_tr = torch.tensor(Xa[:1000]).unsqueeze(1), torch.tensor(ya[:1000], dtype=torch.float32)
    m = MultiTask()
    train = {"cls": DataLoader(TensorDataset(Xtr, ytr), batch_size=64, shuffle=True),
             "reg": DataLoader(TensorDataset(Xa_tr, ya_tr), batch_size=64, shuffle=True)}
    return Built(m, train, DataLoader(TensorDataset(Xva, yva), batch_size=256), 8,
                 acc_eval(m, Xva, yva, 0.93, fwd=lambda x: m(x)[0]))


# ---------------------------------------------------------------------------------------------------------------------
# 16. residual MLP with stochastic depth (drop path), label smoothing, AdamW decay groups, per-step cosine, clipping


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class ResBlock(nn.Module):
    def __init__(self, dim: int, drop_path: float, mlp_ratio: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim * mlp_ratio, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm(x)))


class ResMLP(L.LightningModule):
    def __init__(self, dim: int = 128, depth: int = 6, drop_path: float = 0.2, lr: float = 2e-3,
                 weight_decay: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Linear(64, dim)
        dpr = torch.linspace(0, drop_path, depth).tolist()       # the stochastic depth rule
        self.blocks = nn.Sequential(*[ResBlock(dim, p) for p in dpr])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.stem(x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.criterion(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.criterion(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for _, p in self.named_parameters():
            (no_decay if p.ndim < 2 else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@fit("resmlp_droppath", "resmlp")
def resmlp_droppath() -> Built:
    Xtr, ytr, Xva, yva = digits_split(0.25, "standard")
    m = ResMLP()
    return Built(m, DataLoader(TensorDataset(Xtr, ytr), batch_size=64, shuffle=True),
                 DataLoader(TensorDataset(Xva, yva), batch_size=256), 30, acc_eval(m, Xva, yva, 0.93),
                 trainer_kw={"gradient_clip_val": 1.0, "gradient_clip_algorithm": "norm"})


if __name__ == "__main__":
    blind.main()
