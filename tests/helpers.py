"""Tiny labelled models and data, healthy and broken, shared by the tests."""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def blobs(n: int = 512, dim: int = 8, classes: int = 4, priors: Optional[list[float]] = None, seed: int = 0):
    """Gaussian blobs: learnable class-index data; ``priors`` makes the labels imbalanced."""
    g = torch.Generator().manual_seed(seed)
    p = torch.tensor(priors if priors is not None else [1.0 / classes] * classes)
    y = torch.multinomial(p, n, replacement=True, generator=g)
    centers = torch.randn(classes, dim, generator=g) * 2.0
    x = centers[y] + torch.randn(n, dim, generator=g)
    return x, y


def regression_data(n: int = 512, dim: int = 8, mean: float = 50.0, scale: float = 10.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.randn(dim, 1, generator=g)
    y = mean + scale * (x @ w / dim**0.5) + 0.1 * scale * torch.randn(n, 1, generator=g)
    return x, y


def loader(x, y, batch_size: int = 32, shuffle: bool = True) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class TinyModel(L.LightningModule):
    """A small MLP: ``net[-1]`` is the head."""

    def __init__(self, in_dim: int = 8, out_dim: int = 4, loss_fn: Optional[nn.Module] = None, lr: float = 1e-2,
                 hidden: int = 32, optimizer: str = "adam", weight_decay: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.lr, self.optimizer, self.weight_decay = lr, optimizer, weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def compute_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.compute_loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.compute_loss(batch))

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def trainer(tmp_path, callbacks, max_epochs: int = 1, **kw: Any) -> L.Trainer:
    defaults = dict(
        default_root_dir=str(tmp_path), max_epochs=max_epochs, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, logger=False, accelerator="cpu", devices=1,
    )
    defaults.update(kw)
    return L.Trainer(callbacks=callbacks, **defaults)


class GAN(TinyModel):
    """Manual optimization with two optimizers; forward is the generator (8 noise values to 8 features), the batch's
    labels are never a target of it. ``returns``: what training_step returns (None, ``"g_loss"``, ``"d_loss"``, or
    ``"equilibrium"``: 2 log 2 plus a little noise, a discriminator's loss at the equilibrium of healthy adversarial
    training); ``nan_from`` / ``blowup_from``: the step from which it is NaN / a million times larger."""

    def __init__(self, returns=None, nan_from=None, blowup_from=None):
        super().__init__(out_dim=8)
        self.returns, self.nan_from, self.blowup_from = returns, nan_from, blowup_from
        self.loss_fn = None
        self.disc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, _ = batch
        g_opt, d_opt = self.optimizers()
        fake = self(torch.randn_like(x))
        bce = nn.functional.binary_cross_entropy_with_logits
        d_loss = bce(self.disc(x), torch.ones(len(x), 1)) + bce(self.disc(fake.detach()), torch.zeros(len(x), 1))
        d_opt.zero_grad()
        self.manual_backward(d_loss)
        d_opt.step()
        g_loss = bce(self.disc(fake), torch.ones(len(x), 1))
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        g_opt.step()
        if self.returns is not None:
            loss = {"g_loss": g_loss, "d_loss": d_loss}.get(self.returns, 2 * math.log(2) + 0.01 * torch.randn(()))
            loss = torch.as_tensor(loss).detach()
            if self.blowup_from is not None and self.global_step >= self.blowup_from:
                loss = loss * 1e6
            return loss * float("nan") if self.nan_from is not None and self.global_step >= self.nan_from else loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), 1e-3), torch.optim.Adam(self.disc.parameters(), 1e-3)


class SpawnLauncher(_MultiProcessingLauncher):
    """``ddp_spawn``'s launcher whose workers leave with ``os._exit(0)`` once the fit has finished and rank zero has
    handed its result over (a ``SimpleQueue`` write, done before this returns). A gloo process group, even destroyed,
    now and then aborts a worker in the interpreter's finalisation ("terminate called without an active
    exception"), which fails the spawn after a fit that has finished: the workers skip that finalisation. An error
    in the fit still propagates, as in Lightning's own launcher."""

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class SpawnDDP(DDPStrategy):
    """``strategy="ddp_spawn"`` with :class:`SpawnLauncher`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(start_method="spawn", **kwargs)

    def _configure_launcher(self) -> None:
        self._launcher = SpawnLauncher(self, start_method="spawn")
