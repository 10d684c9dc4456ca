"""Regression with a large target mean: scikit-learn's diabetes progression (raw targets, mean about 152, standard
deviation about 77), checked by ``lightning_recipe.strict()``.

This is where the head bias matters. A head that starts at 0 begins with a loss of E[y^2] (about 29,000) and spends
its first steps only moving the mean up (the "hockey stick"); ``HeadBiasInit`` starts the bias at the training mean,
so the first loss is the target variance (about 5,900) and every step goes into fitting the features.

    python examples/diabetes.py                    # 60 epochs, seconds on a laptop CPU
    python examples/diabetes.py --fast             # 12 epochs
    python examples/diabetes.py --no-bias-init     # keep PyTorch's bias: compare the two loss curves in TensorBoard
    python examples/diabetes.py --break constant-inputs  # every patient gets the same features: the loss plateaus
                                                         # at the target variance (the model can only learn the mean)

Note: shuffling the targets is not caught here: this MLP memorizes 331 noisy targets, so the training loss still
falls; only the validation loss (R² below 0) shows it.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr

try:
    from _common import fit_and_report, loggers, parse_args
except ImportError:  # imported as examples.diabetes
    from examples._common import fit_and_report, loggers, parse_args

BREAKS = {"constant-inputs": "every patient gets the first patient's features (a pipeline feeding the wrong tensor)"}


class DiabetesData(L.LightningDataModule):
    """442 patients, 10 raw features (age, sex, BMI, blood pressure, 6 serum measurements) standardized with a scaler
    fitted on the training split; the targets stay raw (disease progression after one year, 25 to 346)."""

    def __init__(self, batch_size: int = 32, seed: int = 0, broken: Optional[str] = None) -> None:
        super().__init__()
        self.batch_size, self.seed, self.broken = batch_size, seed, broken

    def setup(self, stage: str) -> None:
        x, y = load_diabetes(return_X_y=True, scaled=False)
        x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.25, random_state=self.seed)
        scaler = StandardScaler().fit(x_train)
        x_train, x_val = scaler.transform(x_train), scaler.transform(x_val)
        if self.broken == "constant-inputs":
            x_train = np.repeat(x_train[:1], len(x_train), axis=0)
        self.train, self.val = _tensors(x_train, y_train), _tensors(x_val, y_val)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).unsqueeze(1))


class ProgressionRegressor(L.LightningModule):
    """A two-layer MLP predicting the raw target with ``MSELoss`` (so the recipe knows it is a regression)."""

    def __init__(self, in_features: int = 10, hidden: int = 64, lr: float = 2e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.loss_fn = nn.MSELoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        pred = self(x)
        self.log("val_loss", self.loss_fn(pred, y))
        self.log("val_r2", 1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    flags = {"--no-bias-init": "keep PyTorch's initial head bias (HeadBiasInit(skip=True))"}
    args = parse_args(__doc__, argv, epochs=60, fast_epochs=12, breaks=BREAKS, flags=flags)
    L.seed_everything(args.seed, verbose=False)
    callbacks = lr.strict()
    if args.no_bias_init:
        for cb in callbacks[0].callbacks:  # the checks held by the preset's Recipe
            if isinstance(cb, lr.HeadBiasInit):
                cb.skip = True  # keep PyTorch's initial bias (about 0): the loss starts at E[y^2]
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        callbacks=callbacks,
        logger=loggers(args, "diabetes" + ("-no-bias-init" if args.no_bias_init else "")),
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    return fit_and_report(trainer, ProgressionRegressor(), DiabetesData(seed=args.seed, broken=args.broken))


if __name__ == "__main__":
    sys.exit(main())
