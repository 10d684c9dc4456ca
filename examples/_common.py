"""What the examples share: command-line arguments, loggers, and printing where the results are.

Not part of the library; each example imports it from the same folder.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any, Optional, Sequence

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_recipe import RecipeCheckError, RecipeConfigError


def parse_args(
    description: str,
    argv: Optional[Sequence[str]],
    epochs: int,
    fast_epochs: int,
    breaks: dict[str, str],
    flags: Optional[dict[str, str]] = None,
) -> argparse.Namespace:
    """The arguments every example takes; ``breaks`` maps the name of a deliberate bug to what it does, ``flags``
    adds the example's own on/off switches (name → help)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-epochs", type=int, default=None, help=f"epochs to train (default {epochs})")
    parser.add_argument("--fast", action="store_true", help="a short run of a few seconds, for tests and a first look")
    parser.add_argument("--root-dir", default="recipe_runs", help="folder of the runs (default recipe_runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--break",
        dest="broken",
        choices=sorted(breaks),
        default=None,
        help="introduce a bug on purpose, to see the check that catches it: "
        + "; ".join(f"{k}: {v}" for k, v in sorted(breaks.items())),
    )
    for flag, text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=text)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.max_epochs is None:
        args.max_epochs = fast_epochs if args.fast else epochs
    return args


def loggers(args: argparse.Namespace, name: str) -> list[Any]:
    """CSV and TensorBoard, in one folder per run: ``<root>/<name>/version_N`` holds ``metrics.csv``, the recipe's
    ``recipe/`` folder (``trainer.log_dir`` is the first logger's folder) and the TensorBoard events in
    ``tensorboard/``.
    """
    run = name if args.broken is None else f"{name}-broken-{args.broken}"
    csv = CSVLogger(args.root_dir, name=run)
    version = f"version_{csv.version}/tensorboard"
    tb = TensorBoardLogger(args.root_dir, name=run, version=version, default_hp_metric=False)
    return [csv, tb]


def fit_and_report(trainer: L.Trainer, model: L.LightningModule, datamodule: L.LightningDataModule) -> int:
    """Fit, then print where the report, the figures and the logs are. Returns the exit code (1 if a check failed)."""
    error: Optional[Exception] = None
    try:
        trainer.fit(model, datamodule=datamodule)
    except (RecipeCheckError, RecipeConfigError) as err:
        error = err
    log_dir = trainer.log_dir or trainer.default_root_dir
    recipe = os.path.join(log_dir, "recipe")
    counts = _counts(os.path.join(recipe, "report.json"))
    summary = ", ".join(f"{counts[k]} {k}" for k in ("fail", "warn", "note", "pass", "skip")) if counts else "(no report)"
    print()
    if error is not None:
        print(f"A recipe check stopped the fit:\n{error}\n")
    for key in ("val_acc", "val_r2", "val_loss"):
        if key in trainer.callback_metrics and error is None:
            print(f"{key}: {float(trainer.callback_metrics[key]):.4f}")
    print(f"findings:    {summary}")
    print(f"report:      {os.path.join(recipe, 'report.html')} (also report.md, report.json)")
    figures = sorted(glob.glob(os.path.join(recipe, "*.png")))
    print(f"figures:     {', '.join(figures) if figures else '(none)'}")
    csv = [lg.log_dir for lg in trainer.loggers if isinstance(lg, CSVLogger)]
    if csv:
        print(f"metrics:     {os.path.join(csv[0], 'metrics.csv')}")
    tb = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if tb:
        print(f"tensorboard: tensorboard --logdir {tb[0].root_dir}")
    return 1 if error is not None or (counts or {}).get("fail", 0) else 0


def _counts(path: str) -> Optional[dict[str, int]]:
    try:
        with open(path) as fh:
            counts = json.load(fh)["summary"]
    except (OSError, ValueError, KeyError):
        return None
    return {k: int(counts.get(k, 0)) for k in ("fail", "warn", "note", "pass", "skip")}
