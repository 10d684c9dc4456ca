"""Image classification: a small CNN on scikit-learn's 8x8 digits, checked by ``lightning_recipe.strict()``.

    python examples/digits.py                  # 15 epochs, well under a minute on a laptop CPU
    python examples/digits.py --fast           # 5 epochs, a few seconds
    python examples/digits.py --break scale    # raw 0-255 pixels: the initial-loss check stops the fit

Logs go to TensorBoard and CSV under ``recipe_runs/digits/version_N``; the recipe's plots and report to
``recipe_runs/digits/version_N/recipe/``.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr

try:
    from _common import fit_and_report, loggers, parse_args
except ImportError:  # imported as examples.digits
    from examples._common import fit_and_report, loggers, parse_args

BREAKS = {
    "scale": "pixels as raw 0-255 values, not standardized",
}


class DigitsData(L.LightningDataModule):
    """The 1,797 digits, split 80/20 (stratified), standardized with the training pixels' mean and std."""

    def __init__(self, batch_size: int = 64, seed: int = 0, broken: Optional[str] = None) -> None:
        super().__init__()
        self.batch_size, self.seed, self.broken = batch_size, seed, broken

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        x_train, x_val, y_train, y_val = train_test_split(x, y, test_size=0.2, stratify=y, random_state=self.seed)
        if self.broken == "scale":
            x_train, x_val = x_train * 255.0 / 16.0, x_val * 255.0 / 16.0
        else:
            mean, std = x_train.mean(), x_train.std()  # one scale for all pixels (border pixels are always 0)
            x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
        self.train = _images(x_train, y_train)
        self.val = _images(x_val, y_val)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)


def _images(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8), torch.tensor(y, dtype=torch.long))


class DigitsCNN(L.LightningModule):
    """Two 3x3 convolutions, a max-pool and two linear layers; ``classifier`` is the head."""

    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        )  # fmt: skip
        self.classifier = nn.Linear(64, 10)
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(__doc__, argv, epochs=15, fast_epochs=5, breaks=BREAKS)
    L.seed_everything(args.seed, verbose=False)
    trainer = L.Trainer(
        max_epochs=args.max_epochs,
        callbacks=lr.strict(),  # every check; a failed check stops the fit with RecipeCheckError
        logger=loggers(args, "digits"),
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    return fit_and_report(trainer, DigitsCNN(), DigitsData(seed=args.seed, broken=args.broken))


if __name__ == "__main__":
    sys.exit(main())
