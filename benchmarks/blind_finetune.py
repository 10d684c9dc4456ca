"""Blind fits for ``lightning_recipe.recommended()``: transfer learning and training tricks that add state or change
the loss around an ordinary classifier.

Uses blind.py's registry, helpers and runner; only the fits below are registered, so

    python benchmarks/blind_finetune.py                             # every fit here, one at a time
    python benchmarks/blind_finetune.py --only ema_averaged_model   # one fit (or a list, or "healthy"/"broken")
    python benchmarks/blind_finetune.py --json out.json             # every result, findings with their full messages
    python benchmarks/blind_finetune.py --plain                     # also each healthy fit without the recipe

Families: fine-tuning a backbone pretrained (plain PyTorch, inside the build, seeded) on digits 0-4 to all ten digits
with discriminative learning rates (a CNN backbone and an MLP backbone) or with the backbone frozen, an EMA of the
weights kept in a ``torch.optim.swa_utils.AveragedModel`` and validated on, mixup with soft targets, a class-weighted
BCE on a 1:9 imbalanced task, a matrix-factorisation recommender with sparse embeddings under SparseAdam and Adam
(manual optimisation), focal loss, and SGD under ReduceLROnPlateau. Broken fits carry one named bug each.

Data: scikit-learn's digits and wine, synthetic ratings. Nothing is downloaded.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn import datasets
from sklearn.model_selection import train_test_split
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import blind  # noqa: E402

from blind import Built, acc_eval, fit, r2  # noqa: E402

blind.FITS.clear()


# ---------------------------------------------------------------------------------------------------------------------
# data


Pair = tuple[torch.Tensor, torch.Tensor]


def digit_splits(seed: int = 0) -> tuple[Pair, Pair, Pair]:
    """Digits in [0, 1], stratified train / val / test (64% / 16% / 20%)."""
    X, y = datasets.load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=seed, stratify=y)
    Xtr, Xva, ytr, yva = train_test_split(Xtr, ytr, test_size=0.2, random_state=seed, stratify=ytr)

    def t(a: np.ndarray, b: np.ndarray) -> Pair:
        return torch.tensor(a), torch.tensor(b, dtype=torch.long)
    return t(Xtr, ytr), t(Xva, yva), t(Xte, yte)


def loaders(train: Pair, val: Pair, bs: int = 32) -> tuple[DataLoader, DataLoader]:
    return (DataLoader(TensorDataset(*train), batch_size=bs, shuffle=True),
            DataLoader(TensorDataset(*val), batch_size=256))


def balanced_acc(pred: torch.Tensor, y: torch.Tensor) -> float:
    """The mean of the per-class recalls (sklearn's balanced_accuracy_score)."""
    return float(np.mean([(pred[y == c] == c).float().mean().item() for c in y.unique()]))


# ---------------------------------------------------------------------------------------------------------------------
# 1. Fine-tuning a pretrained backbone: discriminative learning rates, or the backbone frozen


class CNNBackbone(nn.Module):
    feat = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 16, 128), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class MLPBackbone(nn.Module):
    feat = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def pretrained_backbone(cls: type[nn.Module]) -> nn.Module:
    """Plain PyTorch pretraining (no Lightning, no recipe) on the training digits 0-4, 20 epochs of Adam."""
    torch.manual_seed(0)
    (Xtr, ytr), _, _ = digit_splits()
    m = ytr < 5
    bb = cls()
    head = nn.Linear(cls.feat, 5)
    opt = torch.optim.Adam(list(bb.parameters()) + list(head.parameters()), lr=1e-3)
    dl = DataLoader(TensorDataset(Xtr[m], ytr[m]), batch_size=32, shuffle=True)
    for _ in range(20):
        for xb, yb in dl:
            loss = F.cross_entropy(head(bb(xb)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return bb


class FinetuneModule(L.LightningModule):
    def __init__(self, backbone: nn.Module, num_classes: int = 10, backbone_lr: float = 1e-5) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feat, num_classes)
        self.backbone_lr = backbone_lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

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
        return torch.optim.AdamW([
            {"params": self.backbone.parameters(), "lr": self.backbone_lr},
            {"params": self.head.parameters(), "lr": 1e-3},
        ], weight_decay=0.01)


class FrozenBackboneModule(FinetuneModule):
    def __init__(self, backbone: nn.Module, num_classes: int = 10) -> None:
        super().__init__(backbone, num_classes)
        self.backbone.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        self.backbone.eval()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.head.parameters(), lr=1e-3)


def _finetune(cls: type[nn.Module], seed: int, good: float, backbone_lr: float = 1e-5, frozen: bool = False) -> Built:
    bb = pretrained_backbone(cls)
    torch.manual_seed(seed)
    train, val, (Xte, yte) = digit_splits()
    m = FrozenBackboneModule(bb) if frozen else FinetuneModule(bb, backbone_lr=backbone_lr)
    tl, vl = loaders(train, val)
    return Built(m, tl, vl, 50, acc_eval(m, Xte, yte, good))


@fit("finetune_discriminative_lr", "finetune")
def finetune_discriminative_lr() -> Built:
    return _finetune(CNNBackbone, 1, 0.9)


@fit("finetune_discriminative_lr_mlp", "finetune")
def finetune_discriminative_lr_mlp() -> Built:
    return _finetune(MLPBackbone, 1, 0.8)


@fit("frozen_backbone", "finetune")
def frozen_backbone() -> Built:
    return _finetune(CNNBackbone, 2, 0.85, frozen=True)


@fit("finetune_backbone_lr_typo", "finetune",
     bug="the backbone's learning rate typed 1e-9 instead of 1e-5 (head 1e-3): the backbone never adapts")
def finetune_backbone_lr_typo() -> Built:
    return _finetune(CNNBackbone, 1, 0.9, backbone_lr=1e-9)


# ---------------------------------------------------------------------------------------------------------------------
# 2. EMA of the weights in an AveragedModel, updated after every batch; validation and inference use the EMA


class EMAModule(L.LightningModule):
    def __init__(self, update_ema: bool = True) -> None:
        super().__init__()
        self.update_ema = update_ema
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.999))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ema(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.update_ema:
            self.ema.update_parameters(self.net)

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self.ema(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.net.parameters(), lr=1e-3)


def _ema(update: bool) -> Built:
    torch.manual_seed(3)
    train, val, (Xte, yte) = digit_splits()
    m = EMAModule(update)
    tl, vl = loaders(train, val, bs=16)
    return Built(m, tl, vl, 20, acc_eval(m, Xte, yte, 0.9))


@fit("ema_averaged_model", "ema")
def ema_averaged_model() -> Built:
    return _ema(True)


@fit("ema_never_updated", "ema",
     bug="the EMA's update_parameters call is missing: validation and inference use the initial random weights")
def ema_never_updated() -> Built:
    return _ema(False)


# ---------------------------------------------------------------------------------------------------------------------
# 3. Mixup (alpha 0.2) with soft targets through F.cross_entropy, a small CNN on digits


class MixupModule(L.LightningModule):
    def __init__(self, alpha: float = 0.2, independent_target_perm: bool = False) -> None:
        super().__init__()
        self.alpha = alpha
        self.independent_target_perm = independent_target_perm
        self.net = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        lam = float(np.random.beta(self.alpha, self.alpha))
        perm = torch.randperm(x.size(0), device=x.device)
        x_mix = lam * x + (1 - lam) * x[perm]
        y1 = F.one_hot(y, 10).float()
        perm_y = torch.randperm(x.size(0), device=x.device) if self.independent_target_perm else perm
        soft = lam * y1 + (1 - lam) * y1[perm_y]
        loss = F.cross_entropy(self(x_mix), soft)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _mixup(independent: bool) -> Built:
    torch.manual_seed(4)
    np.random.seed(4)
    train, val, (Xte, yte) = digit_splits()
    m = MixupModule(independent_target_perm=independent)
    tl, vl = loaders(train, val)
    return Built(m, tl, vl, 15, acc_eval(m, Xte, yte, 0.9))


@fit("mixup_soft_targets", "mixup")
def mixup_soft_targets() -> Built:
    return _mixup(False)


@fit("mixup_unpermuted_targets", "mixup",
     bug="inputs mixed with one permutation, targets with another, independent one: the mixed labels are noise")
def mixup_unpermuted_targets() -> Built:
    return _mixup(True)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Imbalanced binary task (digit 0 against the rest, ~10% positive) with a class-weighted loss


class ImbalancedModule(L.LightningModule):
    """One logit, BCEWithLogitsLoss with pos_weight = negatives / positives."""

    def __init__(self, pos_weight: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 1))
        self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def predict_label(self, x: torch.Tensor) -> torch.Tensor:
        return (self(x) > 0).long()

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y.float())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss_fn(logits, y.float()))
        self.log("val_acc", ((logits > 0).long() == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class SoftmaxImbalancedModule(L.LightningModule):
    """The same task as a 2-class head: forward returns softmax probabilities, and CrossEntropyLoss(weight=...), which
    applies log_softmax itself, is computed on them."""

    def __init__(self, pos_weight: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
        self.loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, pos_weight]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=-1)

    def predict_label(self, x: torch.Tensor) -> torch.Tensor:
        return self(x).argmax(-1)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        probs = self(x)
        self.log("val_loss", self.loss_fn(probs, y))
        self.log("val_acc", (probs.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _imbalanced(softmax_head: bool) -> Built:
    torch.manual_seed(5)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = digit_splits()
    ytr, yva, yte = (ytr == 0).long(), (yva == 0).long(), (yte == 0).long()
    pos = ytr.float().mean().item()
    m = (SoftmaxImbalancedModule if softmax_head else ImbalancedModule)((1 - pos) / pos)
    tl, vl = loaders((Xtr, ytr), (Xva, yva))

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            pred = m.predict_label(Xte)
        m.train()
        v = balanced_acc(pred, yte)
        return "balanced_acc", v, 0.5, v >= 0.9
    return Built(m, tl, vl, 10, ev)


@fit("class_weighted_imbalanced", "imbalanced")
def class_weighted_imbalanced() -> Built:
    return _imbalanced(False)


@fit("weighted_softmax_before_ce", "imbalanced",
     bug="2-class head whose forward returns softmax probabilities, fed to CrossEntropyLoss(weight=...) as logits")
def weighted_softmax_before_ce() -> Built:
    return _imbalanced(True)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Matrix-factorisation recommender: sparse embeddings under SparseAdam, dense biases under Adam (manual optimisation)


class MFRecommender(L.LightningModule):
    def __init__(self, n_users: int, n_items: int, dim: int = 8, global_mean: float = 0.0) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.user_emb = nn.Embedding(n_users, dim, sparse=True)
        self.item_emb = nn.Embedding(n_items, dim, sparse=True)
        nn.init.normal_(self.user_emb.weight, std=0.1)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        self.user_bias = nn.Embedding(n_users, 1)
        self.item_bias = nn.Embedding(n_items, 1)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)
        self.global_bias = nn.Parameter(torch.tensor(float(global_mean)))

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        dot = (self.user_emb(u) * self.item_emb(i)).sum(-1)
        return dot + self.user_bias(u).squeeze(-1) + self.item_bias(i).squeeze(-1) + self.global_bias

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        u, i, r = batch
        opt_sparse, opt_dense = self.optimizers()
        loss = F.mse_loss(self(u, i), r)
        opt_sparse.zero_grad()
        opt_dense.zero_grad()
        self.manual_backward(loss)
        opt_sparse.step()
        opt_dense.step()
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        u, i, r = batch
        self.log("val_loss", F.mse_loss(self(u, i), r))

    def configure_optimizers(self) -> Any:
        sparse_params = list(self.user_emb.parameters()) + list(self.item_emb.parameters())
        dense_params = list(self.user_bias.parameters()) + list(self.item_bias.parameters()) + [self.global_bias]
        return [torch.optim.SparseAdam(sparse_params, lr=1e-2), torch.optim.Adam(dense_params, lr=1e-2)]


@fit("sparse_embedding_recsys", "recsys")
def sparse_embedding_recsys() -> Built:
    """Ratings 3.5 + <U_u, V_i> + b_u + b_i + noise (sd 0.3) for 300 users and 200 items, rank 4; 30,000 observed."""
    g = torch.Generator().manual_seed(6)
    n_users, n_items, k = 300, 200, 4
    U = torch.randn(n_users, k, generator=g) * 0.7
    V = torch.randn(n_items, k, generator=g) * 0.7
    bu = torch.randn(n_users, generator=g) * 0.3
    bi = torch.randn(n_items, generator=g) * 0.3
    n_obs = 30000
    u = torch.randint(0, n_users, (n_obs,), generator=g)
    i = torch.randint(0, n_items, (n_obs,), generator=g)
    r = 3.5 + (U[u] * V[i]).sum(-1) + bu[u] + bi[i] + 0.3 * torch.randn(n_obs, generator=g)
    idx = torch.randperm(n_obs, generator=g)
    tr, va, te = idx[:21000], idx[21000:25500], idx[25500:]
    torch.manual_seed(6)
    m = MFRecommender(n_users, n_items, dim=8, global_mean=r[tr].mean().item())

    def ev() -> tuple:
        m.eval()
        with torch.no_grad():
            p = m(u[te], i[te])
        m.train()
        v, base = r2(p, r[te], r[tr].mean())
        return "r2", v, base, v > 0.8
    return Built(m, DataLoader(TensorDataset(u[tr], i[tr], r[tr]), batch_size=256, shuffle=True),
                 DataLoader(TensorDataset(u[va], i[va], r[va]), batch_size=1024), 20, ev)


# ---------------------------------------------------------------------------------------------------------------------
# 6. Focal loss (gamma 2) written by hand, an MLP with dropout on digits


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=-1)
    logp_t = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    p_t = logp_t.exp()
    return (-(1 - p_t) ** gamma * logp_t).mean()


class FocalModule(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = focal_loss(self(x), y, gamma=2.0)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", focal_loss(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@fit("focal_loss", "focal")
def focal_loss_digits() -> Built:
    torch.manual_seed(7)
    train, val, (Xte, yte) = digit_splits()
    m = FocalModule()
    tl, vl = loaders(train, val)
    return Built(m, tl, vl, 20, acc_eval(m, Xte, yte, 0.93))


# ---------------------------------------------------------------------------------------------------------------------
# 7. SGD with momentum under ReduceLROnPlateau on val_loss (factor 0.5, patience 3), wine


class PlateauModule(L.LightningModule):
    def __init__(self, mode: str = "min") -> None:
        super().__init__()
        self.mode = mode
        self.net = nn.Sequential(nn.Linear(13, 32), nn.ReLU(), nn.Linear(32, 3))
        self.lr_history: list[float] = []

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

    def on_train_epoch_end(self) -> None:
        self.lr_history.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=self.mode, factor=0.5, patience=3)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss"}}


def _plateau(mode: str) -> Built:
    torch.manual_seed(8)
    X, y = datasets.load_wine(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    Xtr, Xva, ytr, yva = train_test_split(Xtr, ytr, test_size=0.25, random_state=0, stratify=ytr)
    mu, sd = Xtr.mean(0), Xtr.std(0)

    def t(a: np.ndarray, b: np.ndarray) -> Pair:
        return torch.tensor((a - mu) / sd, dtype=torch.float32), torch.tensor(b, dtype=torch.long)
    train, val, (Xte_t, yte_t) = t(Xtr, ytr), t(Xva, yva), t(Xte, yte)
    m = PlateauModule(mode)
    tl, vl = loaders(train, val, bs=16)
    return Built(m, tl, vl, 60, acc_eval(m, Xte_t, yte_t, 0.9))


@fit("reduce_on_plateau_sgd", "plateau")
def reduce_on_plateau_sgd() -> Built:
    return _plateau("min")


@fit("plateau_mode_max", "plateau",
     bug="ReduceLROnPlateau(mode='max') on val_loss: a falling loss counts as no improvement, the LR halves every 4 "
         "epochs regardless")
def plateau_mode_max() -> Built:
    return _plateau("max")


if __name__ == "__main__":
    blind.main()
