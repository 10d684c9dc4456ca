"""``ReproducibilityCheck``: the recipe's "fix the random seed" and "same seed, same result"."""

from __future__ import annotations

import copy
import math
import os
import random
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from typing_extensions import override

from lightning_recipe._core.base import OnFail, _OnceCheck
from lightning_recipe._core.labels import first_batch
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding
from lightning_recipe.functional.reproducibility import step_difference
from lightning_recipe._core.dtypes import wide

_NO_SEED = [
    "no `lightning.seed_everything(seed)` (or `seed_everything: <int>` in the LightningCLI config) before the fit",
]
_NONDET = [
    "nondeterministic kernels (CUDA atomics in scatter/index_add/embedding backward, cuDNN autotuning): pass "
    "Trainer(deterministic=True) and keep torch.backends.cudnn.benchmark off",
    "randomness outside the seeded generators: numpy.random.default_rng() / random.Random() without a seed, "
    "os.urandom, time-based seeds, iteration over a set",
    "state carried between calls (a counter, a cache, a buffer updated in forward)",
]


class ReproducibilityCheck(_OnceCheck):
    """Note when no seed was set; with ``verify=True``, check that the same seed gives the same first step.

    * **seed** (at fit start): Lightning's ``seed_everything`` records the seed in the environment variable
      ``PL_GLOBAL_SEED``; without it the run cannot be repeated. A ``note`` (never a warning: most healthy fits run
      unseeded, and the fit itself is not harmed; it only cannot be repeated). The seed, ``deterministic``
      settings and versions go into the report (the recipe's logbook).
    * **verify** (``verify=True``, at ``on_train_start``): the first training step is run twice on deep copies of the
      LightningModule and its optimizers (the training ones are untouched), each time from the same seed (the global
      seed, or 0) with the random state isolated: ``training_step`` on the same batch (a private draw), backward,
      ``optimizer.step()``. The two losses and the parameters after the step (per-parameter sum, sum of squares and
      maximum) are compared: fail when their relative difference exceeds ``rtol``; a ``note`` when they differ by less
      (rounding-level nondeterminism: ``Trainer(deterministic=True)`` makes them bitwise equal); pass when bitwise
      equal. ``self.log`` calls of the copies are dropped. Costs one extra step and, for a moment, two copies of the
      model and optimizer state. Skipped under manual optimization (``training_step`` steps the real optimizers).

    Args:
        on_fail: ``"raise"`` or ``"warn"``.
        verify: run the two-step comparison.
        rtol: relative difference above which the two runs count as different.
        **kwargs: overrides (``split_batch``, ...), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[ReproducibilityCheck(verify=True)], logger=False)
    """

    def __init__(self, on_fail: OnFail = "raise", verify: bool = False, rtol: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(on_fail, **kwargs)
        if not rtol >= 0:
            raise RecipeConfigError(f"{self.name}: `rtol` must be >= 0, got {rtol!r}.")
        self.verify = verify
        self.rtol = float(rtol)
        self.seed: Optional[int] = None
        self.done = False

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        raw = os.environ.get("PL_GLOBAL_SEED")
        self.seed = int(raw) if raw is not None and raw.lstrip("-").isdigit() else None
        details = _environment(trainer)
        if self.seed is None:
            # a note: most healthy fits run unseeded; it limits comparing runs, it does not harm this one
            f = Finding(f"{self.name}.seed", "note", f"{self.name}: no random seed was set (PL_GLOBAL_SEED is unset): "
                        "initialisation, shuffling, dropout and augmentation differ on every run, so results cannot be "
                        "repeated and differences between runs cannot be told from noise. HINT: call "
                        "`lightning.seed_everything(42, workers=True)` before building the model.", None, None,
                        trainer.global_step, list(_NO_SEED), details)
        else:
            f = Finding(f"{self.name}.seed", "pass", f"{self.name}: seed {self.seed} (deterministic algorithms: "
                        f"{details['deterministic_algorithms']}, cudnn.benchmark: {details['cudnn_benchmark']}).",
                        float(self.seed), None, trainer.global_step, details=details)
        self.findings.append(f)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self.verify or self.done or self._disabled:
            return
        self.done = True
        if not pl_module.automatic_optimization:
            self.findings.append(Finding(f"{self.name}.verify", "skip", f"{self.name}: manual optimization: the "
                                         "training_step steps the real optimizers, so it is not repeated on copies."))
            return
        seed = self.seed if self.seed is not None else 0
        try:
            batch = first_batch(trainer)
            a = _one_step(trainer, pl_module, batch, seed)
            b = _one_step(trainer, pl_module, batch, seed)
        except RecipeConfigError as err:
            self._config_error(str(err))
            return
        except Exception as err:  # a user's training_step that needs the real loop: report, do not stop the fit
            msg = f"{self.name}: could not repeat the first training step on a copy: {type(err).__name__}: {err}"
            self.findings.append(Finding(f"{self.name}.verify", "skip", msg))
            rank_zero_warn(msg, category=RecipeWarning)
            return
        self._conclude(trainer, self._judge(a, b, seed, trainer.global_step))

    def _judge(self, a: dict[str, Any], b: dict[str, Any], seed: int, step: int) -> Finding:
        name = f"{self.name}.verify"
        loss_diff = step_difference(a["loss"], b["loss"])
        param_diff = max((step_difference(x, y) for x, y in zip(a["params"], b["params"])), default=0.0)
        diff = max(loss_diff, param_diff)
        bitwise = a["loss"] == b["loss"] and a["params"] == b["params"]
        numbers = (f"two first steps from seed {seed}: losses {a['loss']!r} and {b['loss']!r} (relative difference "
                   f"{loss_diff:.3g}); parameters after the step differ by {param_diff:.3g} (relative, largest over "
                   f"{len(a['params'])} fingerprints)")
        details = {"loss_a": a["loss"], "loss_b": b["loss"], "loss_difference": loss_diff,
                   "param_difference": param_diff, "bitwise_identical": bitwise, "seed": seed}
        if diff > self.rtol or not math.isfinite(diff):
            return Finding(name, "fail", f"{self.name}: the same seed does not give the same first step: {numbers}; "
                           f"expected at most {self.rtol:g}. Runs cannot be compared. HINT: pass `rtol=` to accept "
                           "larger differences.", diff, self.rtol, step, list(_NONDET), details)
        if not bitwise:
            # a note: within `rtol` by definition (nondeterministic GPU kernels of healthy fits do this)
            return Finding(name, "note", f"{self.name}: the same seed gives the first step up to rounding: {numbers} "
                           f"(within rtol={self.rtol:g}, not bitwise identical: Trainer(deterministic=True) makes it "
                           "so).", diff, self.rtol, step, list(_NONDET[:1]), details)
        return Finding(name, "pass", f"{self.name}: the same seed gives a bitwise identical first step: {numbers}.",
                       diff, self.rtol, step, details=details)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.done = False  # a checkpoint restored after this brings back `done`


def _environment(trainer: "pl.Trainer") -> dict[str, Any]:
    return {
        "seed": os.environ.get("PL_GLOBAL_SEED"),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "torch": torch.__version__,
        "precision": str(getattr(trainer, "precision", "")),
    }


def _seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random without touching ``PL_GLOBAL_SEED`` (inside ``isolate_rng``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _one_step(trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, seed: int) -> dict[str, Any]:
    """The first training step on deep copies of the module and its optimizers: loss and parameter fingerprints."""
    memo: dict[int, Any] = {id(trainer): trainer}
    dm = getattr(trainer, "datamodule", None)
    if dm is not None:
        memo[id(dm)] = dm
    module, optimizers = copy.deepcopy((pl_module, list(trainer.optimizers)), memo)
    module._trainer = trainer  # reads of self.trainer work; logging is dropped below
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        with isolate_rng():
            _seed_all(seed)
            with trainer.precision_plugin.train_step_context():
                out = module.training_step(batch, 0)
            loss = out.get("loss") if isinstance(out, dict) else out
            if not isinstance(loss, Tensor):
                raise RuntimeError(f"training_step returned {type(out).__name__}, not a loss tensor")
            loss.backward()
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            prints = [torch.stack([wide(p).sum(), wide(p).square().sum(), wide(p).abs().max()])
                      for p in module.parameters() if p.numel()]
            flat = torch.cat(prints).tolist() if prints else []  # one read, once per fit
        return {"loss": float(loss.detach()), "params": flat}
    finally:
        del module, optimizers
