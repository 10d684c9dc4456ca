"""Tabular binary classification on an imbalanced subset of scikit-learn's breast cancer data (about 1 malignant in
10), checked by ``lightning_recipe.strict()``.

With 1 positive in 10, a head that starts at p = 0.5 spends its first steps learning the prior (the "hockey stick");
``HeadBiasInit`` starts it at the log-odds of the training labels instead, so the first loss is the label entropy.

    python examples/breast_cancer.py                        # 40 epochs, seconds on a laptop CPU
    python examples/breast_cancer.py --fast                 # 12 epochs
    python examples/breast_cancer.py --break no-standardize # raw features (areas in the thousands):
                                                            # the initial loss is far too high
    python examples/breast_cancer.py --break labels         # labels shuffled: the loss plateaus at the label prior
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr

try:
    from _common import fit_and_report, loggers, parse_args
except ImportError:  # imported as examples.breast_cancer
    from examples._common import fit_and_report, loggers, parse_args

BREAKS = {
    "no-standardize": "raw features (areas in the thousands next to ratios below 1)",
    "labels": "training labels shuffled, independent of the features",
}


class BreastCancerData(L.LightningDataModule):
    """All 357 benign tumours and 36 of the 212 malignant ones (the positive class), split 75/25 (stratified); the
    features standardized with a scaler fitted on the training split only."""

    def __init__(self, positives: int = 36, batch_size: int = 32, seed: int = 0, broken: Optional[str] = None) -> None:
        super().__init__()
        self.positives, self.batch_size, self.seed, self.broken = positives, batch_size, seed, broken

    def setup(self, stage: str) -> None:
        x, y = load_breast_cancer(return_X_y=True)
        y = 1 - y  # scikit-learn codes malignant as 0: make malignant the positive class
        rng = np.random.default_rng(self.seed)
        positives = rng.choice(np.flatnonzero(y == 1), self.positives, replace=False)
        keep = np.concatenate([np.flatnonzero(y == 0), positives])
        x, y = x[keep], y[keep]
        x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, stratify=y, random_state=self.seed)
        if self.broken != "no-standardize":
            scaler = StandardScaler().fit(x_train)
            x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
        if self.broken == "labels":
            y_train = rng.permutation(y_train)
        self.train, self.val = _tensors(x_train, y_train), _tensors(x_val, y_val)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).unsqueeze(1))


class TumourClassifier(L.LightningModule):
    """A two-layer MLP with one logit per tumour; ``BCEWithLogitsLoss`` tells the recipe the task is binary."""

    def __init__(self, in_features: int = 30, hidden: int = 32, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 1))
        self.loss_fn = nn.BCEWithLogitsLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", self.loss_fn(logits, y))
        self.log("val_acc", ((logits > 0).float() == y).float().mean())
        predicted = (logits > 0).float()
        self.log("val_recall", (predicted * y).sum() / y.sum().clamp_min(1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(__doc__, argv, epochs=40, fast_epochs=12, breaks=BREAKS)
    L.seed_everything(args.seed, verbose=False)
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        callbacks=lr.strict(),
        logger=loggers(args, "breast_cancer"),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    return fit_and_report(trainer, TumourClassifier(), BreastCancerData(seed=args.seed, broken=args.broken))


if __name__ == "__main__":
    sys.exit(main())
