"""Calibration: every check under ``lightning_recipe.recommended()`` on the corpus of healthy and broken trainings.

The corpus (``benchmarks/corpus.py``) holds healthy fits of the families users train (residual CNNs with BatchNorm,
transformers with padding masks and causal language models, LSTM/GRU on packed sequences, attention pooling,
autoencoders, segmentation with per-pixel CE/BCE, embeddings for tabular data, multi-task heads, plain MLPs) under the
regimes they use (mixup, label smoothing, gradient accumulation, warm-up, OneCycle, SGD with momentum, AdamW, batches
of 4 to 256), and broken fits with one named bug each. A healthy fit counts only when its held-out metric reaches a
good value (accuracy, R², or validation loss against the constant prediction's loss); it is *alarmed* on a rule when
that rule has a warn or fail finding (a crash alarms the rule ``crash``). A broken fit is *caught* when any rule has a
warn or fail finding.

    python benchmarks/calibration.py                    # the whole corpus (20 min on 2 busy CPU cores)
    python benchmarks/calibration.py --quick            # a 14-fit subset (3-5 min)
    python benchmarks/calibration.py --only healthy --family transformer
    python benchmarks/calibration.py --json results.json

Output: one row per fit (metric, time, the rules that warned or failed), then per rule the healthy fits alarmed and
the broken fits caught, then every alarm on a healthy fit with its message, and every broken fit missed.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import corpus  # noqa: E402


def run_fit(name: str) -> dict[str, Any]:
    """Fit one training of the corpus (by name) in a temporary directory; see :func:`corpus.run`."""
    import torch

    torch.set_num_threads(1)
    for log in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(log).setLevel(logging.ERROR)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        return corpus.run(corpus.BY_NAME[name], tempfile.mkdtemp(prefix="calibration-"))


def _rules(r: dict[str, Any]) -> list[str]:
    """The rules that alarmed: warn/fail findings, a RecipeWarning that no such finding accounts for, a crash."""
    rules = {f["check"] for f in r["findings"]}
    classes = {rule.split(".")[0] for rule in rules}
    for w in r["recipe_warnings"]:
        cls = w.split(":")[0].strip()
        if cls.split(".")[0] not in classes:
            rules.add(f"{cls} (RecipeWarning only)")
    return sorted(rules) + (["crash"] if r["crash"] else [])


def _row(r: dict[str, Any]) -> None:
    m = r["metric"]
    mtxt = (f"{m['name']} {m['value']:.3f} (base {m['baseline']:.3f}, {'good' if m['good'] else 'NOT GOOD'})"
            if m else ("BUILD ERROR " + r["build_error"] if r.get("build_error") else "-"))
    verdict = ("ok" if not _rules(r) else "ALARM") if r["kind"] == "healthy" else ("caught" if _rules(r) else "MISSED")
    print(f"{r['name']:52s} {verdict:6s} {r['seconds']:5.1f}s  {mtxt:44s} {', '.join(_rules(r))}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 14-fit subset")
    p.add_argument("--only", choices=["healthy", "broken"])
    p.add_argument("--family", choices=sorted(corpus.BUILDERS))
    p.add_argument("--name", nargs="*", help="fits by name (substring match)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", help="write every result to this file")
    p.add_argument("--from-json", help="summarise the results written by an earlier run instead of fitting")
    args = p.parse_args()
    fits = [f for f in corpus.FITS if (not args.quick or f.quick) and (not args.only or f.kind == args.only)
            and (not args.family or f.family == args.family)
            and (not args.name or any(s in f.name for s in args.name))]
    print(f"{len(fits)} fits ({sum(f.kind == 'healthy' for f in fits)} healthy, "
          f"{sum(f.kind == 'broken' for f in fits)} broken), {args.workers} workers", flush=True)
    t0 = time.time()
    results: list[dict[str, Any]] = []
    if args.from_json:
        with open(args.from_json) as fh:
            results = [r for r in json.load(fh) if r["name"] in {f.name for f in fits}]
        for r in results:
            _row(r)
        fits = []
    with cf.ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(run_fit, f.name): f for f in fits}
        for fut in cf.as_completed(futures):
            try:
                r = fut.result()
            except Exception as err:  # the build itself failed: a bug of the corpus, shown as such
                f = futures[fut]
                r = {"name": f.name, "family": f.family, "kind": f.kind, "bug": f.bug, "findings": [],
                     "recipe_warnings": [], "crash": None, "metric": None, "seconds": 0.0,
                     "build_error": f"{type(err).__name__}: {err}"[:300]}
            results.append(r)
            _row(r)
    order = {f.name: i for i, f in enumerate(corpus.FITS)}
    results.sort(key=lambda r: order[r["name"]])
    healthy = [r for r in results if r["kind"] == "healthy" and r["metric"] and r["metric"]["good"]]
    not_good = [r for r in results if r["kind"] == "healthy" and not (r["metric"] and r["metric"]["good"])
                and not r["crash"]]
    broken = [r for r in results if r["kind"] == "broken"]
    crashed_healthy = [r for r in results if r["kind"] == "healthy" and r["crash"]]
    healthy_all = healthy + crashed_healthy  # a crash is an alarm; its metric is unknown
    alarmed: dict[str, list[str]] = defaultdict(list)
    caught: dict[str, list[str]] = defaultdict(list)
    for r in healthy_all:
        for rule in _rules(r):
            alarmed[rule].append(r["name"])
    for r in broken:
        for rule in _rules(r):
            caught[rule].append(r["name"])
    print(f"\n{'rule':44s} {'healthy alarmed':>16s} {'broken caught':>14s}")
    for rule in sorted(set(alarmed) | set(caught)):
        print(f"{rule:44s} {len(alarmed[rule]):>7d}/{len(healthy_all):<8d} {len(caught[rule]):>6d}/{len(broken):<7d}")
    n_alarmed = sum(bool(_rules(r)) for r in healthy_all)
    n_caught = sum(bool(_rules(r)) for r in broken)
    n_warned = sum(bool(r["recipe_warnings"]) for r in healthy_all)
    print(f"{'any':44s} {n_alarmed:>7d}/{len(healthy_all):<8d} {n_caught:>6d}/{len(broken):<7d}")
    print(f"healthy fits with a RecipeWarning: {n_warned}/{len(healthy_all)}")
    print("\nalarms on healthy fits:")
    for r in healthy_all:
        for f in r["findings"]:
            print(f"  {r['name']}: {f['check']} [{f['status']}] {f['message']}")
        if r["crash"]:
            print(f"  {r['name']}: crash {r['crash']}")
        if r["recipe_warnings"] and not r["findings"]:
            for w in r["recipe_warnings"]:
                print(f"  {r['name']}: RecipeWarning without a warn/fail finding: {w}")
    print("\nbroken fits (bug -> rules):")
    for r in broken:
        print(f"  {r['name']:48s} {', '.join(_rules(r)) or 'MISSED'}")
    if not_good:
        print("\nhealthy fits left out (held-out metric not good, or the corpus failed to build):")
        for r in not_good:
            m = r["metric"]
            print(f"  {r['name']}: {m if m else r.get('build_error')}")
    print(f"\n{len(results)} fits in {time.time() - t0:.0f} s" if not args.from_json else
          f"\n{len(results)} fits, {sum(r['seconds'] for r in results):.0f} s of fitting")
    if args.json and not args.from_json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
