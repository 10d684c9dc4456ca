"""ActivationCheck over the calibration corpus: its findings on every healthy fit (and, with ``--broken``, the broken
ones, for information).

The check looks at the model at init only (one probe forward at ``on_train_start``), so each fit runs one training
step, with :class:`~lightning_recipe.HeadBiasInit` before the check as in the presets. A healthy fit must get no
``warn`` and no ``fail`` from it.

Usage::

    PYTHONPATH=$PWD python benchmarks/activations_calibration.py [--quick] [--broken] [--only NAME ...] [--sweep]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings

import lightning as L
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus  # noqa: E402

from lightning_recipe import HeadBiasInit  # noqa: E402
from lightning_recipe.checks.activations import ActivationCheck  # noqa: E402
from lightning_recipe.exceptions import RecipeWarning  # noqa: E402


def run(fit: corpus.Fit, root: str) -> dict:
    """The check's findings on ``fit`` (one step), the RecipeWarnings it raised and the time taken."""
    t0 = time.time()
    L.seed_everything(0, verbose=False)
    built = fit.build()
    check = ActivationCheck(on_fail="warn", **built.recipe_kw)
    kw = {**built.trainer_kw, "max_steps": 1}
    trainer = L.Trainer(max_epochs=built.epochs, callbacks=[HeadBiasInit(on_fail="warn", **built.recipe_kw), check],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=root,
                        num_sanity_val_steps=0, limit_val_batches=0, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(built.module, built.train, built.val)
    ours = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning) and "ActivationCheck" in
            str(w.message)]
    assert all(f.status in ("warn", "fail") for f in check.findings if any(f.message[:60] in w for w in ours))
    return {"name": fit.name, "kind": fit.kind, "findings": check.findings, "warnings": ours,
            "seconds": time.time() - t0}


_INITS = ("default", "xavier_tanh_gain", "xavier", "orthogonal", "he", "normal_1", "normal_3")
_HEALTHY_INITS = ("default", "xavier_tanh_gain", "xavier", "orthogonal", "he")


def _init(net: torch.nn.Module, how: str) -> None:
    for m in net.modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        if how == "xavier_tanh_gain":
            torch.nn.init.xavier_uniform_(m.weight, gain=torch.nn.init.calculate_gain("tanh"))
        elif how == "xavier":
            torch.nn.init.xavier_uniform_(m.weight)
        elif how == "orthogonal":
            torch.nn.init.orthogonal_(m.weight)
        elif how == "he":
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        elif how.startswith("normal_"):
            torch.nn.init.normal_(m.weight, 0.0, float(how.split("_")[1]))


def sweep(root: str) -> int:
    """Tanh and sigmoid MLPs (3 hidden layers of 128) on the bundled tables, standardised (and raw), under the usual
    inits (healthy) and N(0, 1), N(0, 3^2) weights: the saturation each gives at init. Returns the number of healthy
    configurations the check warned on."""
    import numpy as np
    from sklearn import datasets

    tables = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer,
              "wine": datasets.load_wine, "diabetes": datasets.load_diabetes}
    alarms = 0
    worst_healthy = 0.0
    for data, load in tables.items():
        x_np, y_np = load(return_X_y=True)
        raw = torch.tensor(x_np, dtype=torch.float32)
        std = (raw - raw.mean(0)) / raw.std(0).clamp(min=1e-6)
        regression = data == "diabetes"
        y = torch.tensor(y_np, dtype=torch.float32).unsqueeze(1) if regression else torch.tensor(y_np)
        if regression:
            y = (y - y.mean()) / y.std()
        out_dim = 1 if regression else int(np.max(y_np)) + 1
        for act in (torch.nn.Tanh, torch.nn.Sigmoid):
            for how in _INITS + ("default_raw_inputs",):
                x = raw if how.endswith("raw_inputs") else std
                torch.manual_seed(0)
                d = x.shape[1]
                net = torch.nn.Sequential(torch.nn.Linear(d, 128), act(), torch.nn.Linear(128, 128), act(),
                                          torch.nn.Linear(128, 128), act(), torch.nn.Linear(128, out_dim))
                _init(net, how.replace("_raw_inputs", ""))
                module = corpus.Model(net, torch.nn.MSELoss() if regression else torch.nn.CrossEntropyLoss())
                dl = corpus.DataLoader(corpus.TensorDataset(x, y), batch_size=128, shuffle=True)
                check = ActivationCheck(on_fail="warn")
                trainer = L.Trainer(max_steps=1, callbacks=[check], logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                                    devices=1, default_root_dir=root)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    trainer.fit(module, dl)
                f = next(f for f in check.findings if f.check.endswith("saturation"))
                layers = f.details["layers"].values()
                sat = max(v["saturated"] for v in layers)
                over = max(v["examples_over_half"] for v in layers)
                pre = max(v["pre_activation_std"] for v in layers)
                healthy = how in _HEALTHY_INITS
                if healthy:
                    worst_healthy = max(worst_healthy, over)
                    alarms += f.status == "warn"
                print(f"sweep {'healthy' if healthy else 'broken '} {data:14s} {act.__name__:8s} {how:20s} "
                      f"saturated {sat:7.2%}  examples over half {over:7.2%}  pre-activation std {pre:8.3g}  "
                      f"-> {f.status}")
    print(f"sweep: healthy configurations warned: {alarms}; largest share of examples over half saturated in a "
          f"healthy configuration: {worst_healthy:.2%} (threshold 50%)")
    return alarms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the fits marked quick")
    parser.add_argument("--broken", action="store_true", help="the broken fits too (for information)")
    parser.add_argument("--only", nargs="*", default=None, help="fit names")
    parser.add_argument("--sweep", action="store_true", help="only the tanh/sigmoid init sweep")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.sweep:
        with tempfile.TemporaryDirectory() as root:
            sweep(root)
        return
    fits = corpus.HEALTHY + (corpus.BROKEN if args.broken else [])
    if args.quick:
        fits = [f for f in fits if f.quick]
    if args.only:
        fits = [f for f in fits if f.name in args.only]
    alarms = {"healthy": 0, "broken": 0}
    with tempfile.TemporaryDirectory() as root:
        for fit in fits:
            res = run(fit, root)
            bad = [f for f in res["findings"] if f.status in ("warn", "fail")]
            alarms[fit.kind] += bool(bad)
            print(f"{fit.kind:7s} {fit.name:55s} {res['seconds']:5.1f}s "
                  + " ".join(f"{f.check.split('.')[-1]}={f.status}" for f in res["findings"]))
            for f in res["findings"]:
                if f.status in ("warn", "fail", "note", "skip"):
                    print(f"        {f.status}: {f.message[:300]}")
                if f.check.endswith("saturation") and f.details.get("layers"):
                    worst = max(f.details["layers"].items(), key=lambda kv: kv[1]["saturated"])
                    print(f"        worst saturation {worst[0]}: {worst[1]['saturated']:.3%} of outputs, "
                          f"{worst[1]['examples_over_half']:.1%} of examples over half, pre-activation std "
                          f"{worst[1]['pre_activation_std']:.3g}")
                if f.check.endswith("depth") and f.details.get("ratio") is not None:
                    print(f"        depth ratio {f.details['ratio']:.3g} over {len(f.details['stds'])} layers")
    n_h = sum(f.kind == "healthy" for f in fits)
    n_b = len(fits) - n_h
    print(f"\nhealthy fits warned/failed by ActivationCheck: {alarms['healthy']} of {n_h}")
    if n_b:
        print(f"broken fits warned/failed by ActivationCheck: {alarms['broken']} of {n_b}")


if __name__ == "__main__":
    main()
