"""ActivationCheck over the calibration corpus: its findings on every healthy fit (and, with ``--broken``, the broken
ones, for information).

The check looks at the model at init only (one probe forward at ``on_train_start``), so each fit runs one training
step, with :class:`~lightning_recipe.HeadBiasInit` before the check as in the presets. A healthy fit must get no
``warn`` and no ``fail`` from it.

Usage::

    PYTHONPATH=$PWD python benchmarks/activations_calibration.py [--quick] [--broken] [--only NAME ...]
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
from lightning_recipe.activations import ActivationCheck  # noqa: E402
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the fits marked quick")
    parser.add_argument("--broken", action="store_true", help="the broken fits too (for information)")
    parser.add_argument("--only", nargs="*", default=None, help="fit names")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
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
