"""The update-ratio rule of ``OptimizationHealthCheck`` over the calibration corpus: per fit, the spread of the
per-tensor update ratio ``||dw|| / ||w||`` (each tensor's median over its measurements): the factor by which the
slowest parameter group with a 10x lower learning rate moves less than the others (what warns), and the largest gap
between neighbouring tensors once sorted (what makes a note).

Each fit runs under :class:`~lightning_recipe.OptimizationHealthCheck` alone (``on_fail="warn"``, the preset's
arguments), seed 0, CPU. Printed per fit: the held-out metric, the median tensor's ratio, the slowest group's factor,
the largest gap, the spread from the slowest to the fastest tensor, and the rule's status. A healthy fit must not
warn; the broken fits ``one layer's lr x1e-4`` (the first layer with a weight matrix in its own parameter group at
1e-4x the learning rate) are the ones it is meant to catch. ``benchmarks/calibration.py`` runs the
same fits under every check of ``recommended()``.

Usage::

    PYTHONPATH=$PWD python benchmarks/update_ratio_calibration.py [--only healthy|broken] [--name SUBSTR ...]
        [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus  # noqa: E402


def run(name: str) -> dict:
    """Fit ``name`` with the check alone; its update-ratio finding and numbers."""
    import lightning as L
    import torch

    from lightning_recipe import OptimizationHealthCheck

    torch.set_num_threads(1)
    for log in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(log).setLevel(logging.ERROR)
    fit = corpus.BY_NAME[name]
    t0 = time.time()
    out: dict = {"name": name, "kind": fit.kind, "crash": None}
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.seed_everything(0, verbose=False)
        built = fit.build()
        check = OptimizationHealthCheck(on_fail="warn", figure=False, **built.recipe_kw)
        trainer = L.Trainer(max_epochs=built.epochs, callbacks=[check], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                            default_root_dir=tempfile.mkdtemp(prefix="uratio-"), num_sanity_val_steps=0,
                            **built.trainer_kw)
        try:
            trainer.fit(built.module, built.train, built.val)
        except Exception as err:
            out["crash"] = f"{type(err).__name__}: {err}"[:300]
        if out["crash"] is None:
            metric, value, _, good = corpus.evaluate(built)
            out["metric"] = f"{metric} {value:.3f}{'' if good else ' NOT GOOD'}"
    f = next((f for f in check.findings if f.check.endswith(".update_ratio")), None)
    out.update(status=f.status if f else None, message=f.message if f else "", details=(f.details or {}) if f else {},
               seconds=time.time() - t0)
    return out


def _row(r: dict) -> None:
    d = r["details"]
    ratios = d.get("ratios", {})
    if ratios:
        lo = min(ratios, key=ratios.get)
        hi = max(ratios, key=ratios.get)
        med = d["median_ratio"]
        txt = (f"median {med:.2e}  group {d['group_factor']:8.3g}x  gap {d['gap']:8.3g}x  spread {d['spread']:8.3g}x  smallest `{lo}` "
               f"{ratios[lo]:.2e}  largest `{hi}` {ratios[hi]:.2e}")
    else:
        txt = r["crash"] or r["message"][:80]
    print(f"{r['name']:52s} {r['kind']:7s} {str(r['status']):5s} {r['seconds']:5.1f}s {r.get('metric', ''):18s} {txt}",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["healthy", "broken"])
    p.add_argument("--name", nargs="*")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json")
    a = p.parse_args()
    fits = [f for f in corpus.FITS if (a.only is None or f.kind == a.only)
            and (not a.name or any(n in f.name for n in a.name))]
    if not a.name:  # the broken fits this rule is meant for
        fits = [f for f in fits if f.kind == "healthy" or f.bug.startswith("one layer's lr")]
    results = []
    with cf.ProcessPoolExecutor(a.workers) as pool:
        for r in pool.map(run, [f.name for f in fits]):
            _row(r)
            results.append(r)
    for kind in ("healthy", "broken"):
        rs = [r for r in results if r["kind"] == kind]
        if not rs:
            continue
        warned = [r["name"] for r in rs if r["status"] in ("warn", "fail")]
        factors = [r["details"]["group_factor"] for r in rs if len(set(r["details"].get("groups", {}).values())) > 1]
        print(f"{kind}: {len(factors)} fits with several parameter groups; slowest group below the others (learning "
              f"rate 10x lower or more, else 1): {', '.join(f'{v:.3g}x' for v in sorted(factors))}")
        gaps = sorted(r["details"]["gap"] for r in rs if "gap" in r["details"])
        spreads = sorted(r["details"]["spread"] for r in rs if "spread" in r["details"])
        print(f"{kind}: {len(warned)}/{len(rs)} warned {warned}; largest gap between neighbouring tensors: "
              f"min {min(gaps, default=math.nan):.3g}x, median {np.median(gaps) if gaps else math.nan:.3g}x, max "
              f"{max(gaps, default=math.nan):.3g}x; spread smallest to largest: max "
              f"{max(spreads, default=math.nan):.3g}x")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
