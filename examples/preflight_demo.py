"""A LightningModule and a DataModule to try ``lightning-recipe preflight`` on: a small MLP on scikit-learn's wine data.

    lightning-recipe preflight examples/preflight_demo.py:Model examples/preflight_demo.py:DataModule
    lightning-recipe preflight examples/preflight_demo.py:BrokenModel examples/preflight_demo.py:DataModule
    lightning-recipe preflight examples/preflight_demo.py:BrokenModel examples/preflight_demo.py:DataModule \\
        --model.init_args.bug=head-scale

(``python -m lightning_recipe preflight ...`` does the same; from the repository root,
``examples.preflight_demo:Model`` works too.) The first exits 0, the others exit 1 and say which check failed.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from sklearn.datasets import load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DataModule(L.LightningDataModule):
    """178 wines, 13 chemical measurements standardized on the training split, 3 cultivars."""

    def __init__(self, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str) -> None:
        x, y = load_wine(return_X_y=True)
        x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=self.seed)
        scaler = StandardScaler().fit(x_train)
        self.train = TensorDataset(torch.tensor(scaler.transform(x_train), dtype=torch.float32), torch.tensor(y_train))
        self.val = TensorDataset(torch.tensor(scaler.transform(x_val), dtype=torch.float32), torch.tensor(y_val))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=64)


class Model(L.LightningModule):
    """A healthy two-layer MLP (``head`` is the last layer)."""

    def __init__(self, hidden: int = 32, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(13, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 3)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class BrokenModel(Model):
    """The same MLP with one classic bug.

    Args:
        bug: ``"mix-batch"``: a ``view`` where a transpose was meant mixes the examples of a batch (caught by the
            batch-independence check); ``"head-scale"``: the last layer initialised 100x too large (the initial loss
            is far above ``log 3``); ``"ignore-input"``: the forward multiplies the input by zero (the loss plateaus at
            the label prior, zeroed inputs change nothing).
    """

    def __init__(self, bug: Literal["mix-batch", "head-scale", "ignore-input"] = "mix-batch", hidden: int = 32,
                 lr: float = 1e-2) -> None:
        super().__init__(hidden=hidden, lr=lr)
        self.bug = bug
        if bug == "head-scale":
            with torch.no_grad():
                self.head.weight.mul_(100.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bug == "ignore-input":
            x = x * 0
        h = self.body(x)
        if self.bug == "mix-batch":
            h = h.view(h.shape[1], h.shape[0]).t()  # meant: h.t().t() / no reshape at all
        return self.head(h)
