"""Render every figure of a few small fits into one folder, to look at them (and at the HTML report).

Each fit runs ``lightning_recipe.recommended()`` (warn mode: a finding never stops the fit) with a CSV logger; its
figures and ``report.html`` are copied to ``<out>/<fit>/``. The fits are the cases a figure has to survive:

* ``digits_100_epochs``: the digits CNN, 100 epochs of 3 batches with a validation loop (val_loss logged): the
  validation line, epoch markers at 100 epochs, the expected-initial-loss and prior lines on top of each other
  (HeadBiasInit sets the bias to the prior: both are the label entropy);
* ``one_step``: the digits CNN with ``max_steps=1``: a curve of one point;
* ``frozen``: learning rate 0: a flat loss, flat predictions, flat gradient norms (narrow-range axes);
* ``diabetes``: regression (prediction dynamics against targets);
* ``breast_cancer``: binary classification (label markers).

    python benchmarks/figures.py --out /tmp/figures            # all fits, about a minute on 2 cores
    python benchmarks/figures.py --out /tmp/figures --fits one_step digits_100_epochs
    chromium --headless --no-sandbox --screenshot=/tmp/r.png --window-size=1200,3000 \\
        file:///tmp/figures/digits_100_epochs/report.html
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import lightning as L
from lightning.pytorch.loggers import CSVLogger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import lightning_recipe as lr  # noqa: E402


def _fit(root: str, model: L.LightningModule, data: L.LightningDataModule, **trainer_kwargs: Any) -> str:
    """Fit with ``recommended()``; returns the recipe folder."""
    trainer = L.Trainer(callbacks=lr.recommended(), logger=CSVLogger(root, name="fit"), enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False, accelerator="cpu",
                        log_every_n_steps=1, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=data)
    return os.path.join(trainer.log_dir, "recipe")


def _digits(epochs: int = 100, batches: int = 3, **kw: Any) -> Callable[[str], str]:
    def run(root: str) -> str:
        from digits import DigitsCNN, DigitsData

        L.seed_everything(0, verbose=False)
        return _fit(root, DigitsCNN(lr=kw.pop("lr", 2e-3)), DigitsData(), max_epochs=epochs,
                    limit_train_batches=batches, **kw)

    return run


def _diabetes(root: str) -> str:
    from diabetes import DiabetesData, ProgressionRegressor

    L.seed_everything(0, verbose=False)
    return _fit(root, ProgressionRegressor(), DiabetesData(), max_epochs=20)


def _breast_cancer(root: str) -> str:
    from breast_cancer import BreastCancerData, TumourClassifier

    L.seed_everything(0, verbose=False)
    return _fit(root, TumourClassifier(), BreastCancerData(), max_epochs=20)


FITS: dict[str, Callable[[str], str]] = {
    "digits_100_epochs": _digits(100, 3, limit_val_batches=1),
    "one_step": _digits(1, 1, max_steps=1),
    "frozen": _digits(10, 5, lr=0.0),
    "diabetes": _diabetes,
    "breast_cancer": _breast_cancer,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="recipe_figures", help="folder of the figures (one subfolder per fit)")
    parser.add_argument("--fits", nargs="*", default=list(FITS), choices=list(FITS))
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    for name in args.fits:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            recipe = FITS[name](tmp)
            dest = os.path.join(args.out, name)
            shutil.rmtree(dest, ignore_errors=True)
            os.makedirs(dest)
            files = sorted(glob.glob(os.path.join(recipe, "*.png")))
            for f in files:
                shutil.copy(f, dest)
            if os.path.isfile(os.path.join(recipe, "report.html")):
                shutil.copy(os.path.join(recipe, "report.html"), dest)
        print(f"{name}: {len(files)} figures in {dest} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
