"""A small subset of the calibration corpus (``benchmarks/corpus.py``): healthy fits of the families users train must
reach a good held-out metric and end with no RecipeWarning and no failed finding under ``recommended()``.

The whole corpus runs with ``python benchmarks/calibration.py``; these are shortened versions of some of its fits.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import corpus  # noqa: E402

# (family, options): shortened healthy fits of families the older tests do not train
SUBSET = [
    ("attention", {"epochs": 4}),  # attention pooling over bags of digits with a padding mask, BCE
    ("tabular", {"epochs": 4}),  # embeddings of integer categorical columns + numeric columns, MSE
    ("rnn", {"task": "packed", "epochs": 5}),  # GRU over packed variable-length sequences, MSE
    ("multitask", {"epochs": 4}),  # MLP with a tuple (class, parity) output, CE + BCE
    ("autoencoder", {"epochs": 5}),  # MLP autoencoder on digits, MSE with target = input
    ("transformer", {"epochs": 3}),  # transformer with a padding mask, mean-pooled, warm-up
    ("segmentation", {"epochs": 2}),  # fully convolutional net with BatchNorm, per-pixel CE over 3 classes
    # fits that alarmed before the dense-output, scale and severity fixes
    ("segmentation", {"loss": "bce", "epochs": 2}),  # one logit per pixel, BCE (the head bias is per channel)
    ("segmentation", {"loss": "bce", "unet": True, "opt": "adamw", "bs": 64, "sched": "warmup", "epochs": 3}),
    ("autoencoder", {"kind": "conv", "epochs": 3}),  # conv autoencoder, (N, 1, 8, 8) output, MSE
    ("autoencoder", {"out": "sigmoid", "epochs": 5}),  # sigmoid output on pixels in [0, 1]: near-constant borders
]


@pytest.mark.parametrize(("family", "opts"), SUBSET, ids=[f"{f}-{'-'.join(str(v) for k, v in o.items() if k != 'epochs') or 'default'}" for f, o in SUBSET])
def test_healthy_fit_raises_no_alarm(family: str, opts: dict, tmp_path) -> None:
    fit = corpus.Fit(f"{family}/subset", family, "healthy", tuple(sorted(opts.items())))
    res = corpus.run(fit, str(tmp_path))
    assert res["crash"] is None, res["crash"]
    metric = res["metric"]
    assert metric["good"], f"the fit is not healthy: {metric}"  # the held-out metric beats its threshold
    if metric["name"] in ("acc", "R2"):
        assert metric["value"] > metric["baseline"]
    assert res["recipe_warnings"] == []
    assert [f for f in res["findings"] if f["status"] == "fail"] == []
