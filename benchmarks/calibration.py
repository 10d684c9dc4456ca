"""Calibration matrix: the core checks on healthy and broken trainings of real data sets.

For each data set that scikit-learn ships (digits, breast cancer, iris, wine, diabetes; 80/20 random split, the 20%
as a validation loader) this trains small models under
``lightning_recipe.recommended()`` in healthy variants (optimisers, batch sizes, dropout/BatchNorm, with and without
the bias init) and in broken ones (labels shuffled, inputs x1000, learning rate 1e-9, loss sign flipped, NaN in the
features, and a double softmax on the multiclass sets). Regression targets are standardised. A healthy run must end
with no failed finding; a broken one must have at least one.

    python benchmarks/calibration.py            # the whole matrix (a few minutes on a laptop CPU)
    python benchmarks/calibration.py --quick    # one healthy and a few broken runs per data set
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from sklearn import datasets
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr


def _data(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    loader = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer, "iris": datasets.load_iris,
              "wine": datasets.load_wine, "diabetes": datasets.load_diabetes}[name]
    x, y = loader(return_X_y=True)
    task = "regression" if name == "diabetes" else ("binary" if name == "breast_cancer" else "multiclass")
    return x.astype(np.float32), y, task


class _Net(L.LightningModule):
    def __init__(self, d_in: int, d_out: int, loss: nn.Module, lr: float, opt: str, norm: bool, dropout: float,
                 flip: bool = False, softmax: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d_in, 64)]
        if norm:
            layers.append(nn.BatchNorm1d(64))
        layers += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, d_out)]
        self.net = nn.Sequential(*layers)
        self.loss_fn, self.lr, self.opt, self.flip, self.softmax = loss, lr, opt, flip, softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return torch.softmax(out, -1) if self.softmax else out

    def training_step(self, batch: Any, i: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        return -loss if self.flip else loss

    def validation_step(self, batch: Any, i: int) -> None:
        x, y = batch
        self.log("val_loss", self.loss_fn(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def run(name: str, variant: str, epochs: int, bs: int, lr_: float, opt: str, norm: bool, dropout: float,
        bias_init: bool, seed: int) -> tuple[int, list[str]]:
    x, y, task = _data(name)
    rng = np.random.default_rng(seed)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    if task == "regression":  # standardised targets: raw ones (mean 152, std 77) need a tuned learning rate
        y = (y - y.mean()) / y.std()
    kw: dict[str, Any] = {}
    if variant == "shuffled":
        y = rng.permutation(y)
    elif variant == "x1000":
        x = x * 1000
    elif variant == "lr0":
        lr_ = 1e-9
    elif variant == "flip":
        kw["flip"] = True
    elif variant == "nan":
        x = x.copy()
        x[rng.random(x.shape) < 0.01] = np.nan
    elif variant == "double_softmax":
        kw["softmax"] = True
    if task == "multiclass":
        yt, d_out, loss = torch.tensor(y, dtype=torch.long), int(y.max()) + 1, nn.CrossEntropyLoss()
    elif task == "binary":
        yt, d_out, loss = torch.tensor(y, dtype=torch.float32).unsqueeze(1), 1, nn.BCEWithLogitsLoss()
    else:
        yt, d_out, loss = torch.tensor(y, dtype=torch.float32).unsqueeze(1), 1, nn.MSELoss()
    L.seed_everything(seed, verbose=False)
    order = torch.randperm(len(yt), generator=torch.Generator().manual_seed(seed))  # an 80/20 random split
    cut = int(0.8 * len(order))
    xs = torch.tensor(x)
    dl = DataLoader(TensorDataset(xs[order[:cut]], yt[order[:cut]]), batch_size=bs, shuffle=True)
    val = DataLoader(TensorDataset(xs[order[cut:]], yt[order[cut:]]), batch_size=256)
    cbs = lr.recommended(exclude=[] if bias_init else [lr.HeadBiasInit])
    trainer = L.Trainer(max_epochs=epochs, callbacks=cbs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=f"/tmp/calibration/{name}-{variant}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            trainer.fit(_Net(x.shape[1], d_out, loss, lr_, opt, norm, dropout, **kw), dl, val)
        except Exception as err:  # a crash is a finding too
            return 1, [f"crash: {type(err).__name__}: {err}"[:120]]
    fails = [f.check for f in lr.collect_findings(trainer) if f.status == "fail"]
    return len(fails), fails


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--datasets", nargs="*", default=["digits", "breast_cancer", "iris", "wine", "diabetes"])
    args = p.parse_args()
    healthy = [dict(bs=32, lr_=1e-3, opt="adam", norm=False, dropout=0.0, bias_init=True)]
    if not args.quick:
        healthy += [
            dict(bs=16, lr_=1e-2, opt="sgd", norm=False, dropout=0.0, bias_init=True),
            dict(bs=64, lr_=3e-3, opt="adam", norm=True, dropout=0.3, bias_init=True),
            dict(bs=32, lr_=1e-3, opt="adam", norm=False, dropout=0.0, bias_init=False),
            dict(bs=128, lr_=3e-4, opt="adam", norm=False, dropout=0.1, bias_init=False),
        ]
    broken = ["shuffled", "x1000", "lr0", "flip", "nan"] + ([] if args.quick else ["double_softmax"])
    rows, false_alarms, missed = [], 0, 0
    for name in args.datasets:
        for i, h in enumerate(healthy):
            t0 = time.time()
            n, fails = run(name, "healthy", 12, seed=i, **h)
            false_alarms += n > 0
            rows.append((name, f"healthy#{i} {h['opt']} bs{h['bs']} lr{h['lr_']:g}", "ok" if n == 0 else "FALSE ALARM", fails, time.time() - t0))
        for v in broken:
            if v == "double_softmax" and name in ("breast_cancer", "diabetes", "iris"):
                continue
            t0 = time.time()
            n, fails = run(name, v, 12, seed=0, **healthy[0])
            missed += n == 0
            rows.append((name, v, "caught" if n else "MISSED", fails, time.time() - t0))
    for r in rows:
        print(f"{r[0]:14s} {r[1]:34s} {r[2]:12s} {r[4]:5.1f}s  {', '.join(r[3])}")
    print(f"\nfalse alarms on healthy runs: {false_alarms}; broken runs missed: {missed}")


if __name__ == "__main__":
    main()
