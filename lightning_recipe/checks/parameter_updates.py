"""``ParameterUpdateCheck``: every trainable parameter gets a gradient and changes; gradients are zeroed between steps."""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_recipe._core.base import OnFail, _OnceCheck
from lightning_recipe.exceptions import RecipeConfigError
from lightning_recipe._core.sharding import sharding, sharding_skip
from lightning_recipe.findings import Finding
from lightning_recipe.functional.parameter_updates import _chunk_for, _eps, gradient_growth, tensor_fingerprint

_NOT_IN_OPTIMIZER = [
    "the optimizer was built before a layer was added or swapped (e.g. a new head assigned after "
    "configure_optimizers, or parameters collected from the wrong module)",
    "a parameter group forgot some parameters (e.g. `model.encoder.parameters()` only)",
]
_NO_GRAD = [
    "a layer created but never used in forward (or overwritten/replaced inside forward)",
    "a branch cut off from the loss by `.detach()`, `.data`, `torch.no_grad()` or a conversion to numpy",
    "an output head that the loss never reads (e.g. an auxiliary head left out of the loss)",
]
_NOT_CHANGED = [
    "weight updates not applied: `optimizer.step()` missing (manual optimization) or the step skipped",
    "a parameter group with learning rate 0, or gradients zeroed between backward and step",
]
_STALE = [
    "`zero_grad()` missing in manual optimization: every step adds the new gradient to all previous ones",
    "a custom `optimizer_zero_grad` that does nothing",
]


class ParameterUpdateCheck(_OnceCheck):
    """After the first ``steps`` optimizer steps, every trainable parameter must have received a non-zero gradient
    and changed; gradients must be zeroed between optimizer steps.

    At ``on_train_start`` the trainable parameters (``requires_grad``, minus ``ignore``) are fingerprinted once, on
    their device (see :func:`tensor_fingerprint`: a few sampled elements and three float64 checksums, no copy), and
    matched against the optimizers' parameter groups. At every optimizer step (``on_before_optimizer_step``,
    where the gradients are complete, in automatic and in manual optimization) the gradient norm of each parameter
    is folded into a running maximum on the device. After ``steps`` optimizer steps the parameters are fingerprinted
    again and compared, in one host sync, and the fingerprints are freed. A parameter fails when it is

    * in no optimizer parameter group;
    * without gradient at every step (``None`` or exactly zero): never used, or cut from the loss;
    * given a gradient but unchanged, unless the update was below float resolution: the check estimates the
      smallest step as ``lr * min(|g| / sqrt(numel), 1)`` (SGD's step for the average element, a lower bound for
      Adam's) and does not fail a parameter whose estimated step is below ``8 eps |p|`` (a tiny learning rate on
      large weights), nor one whose group's learning rate stayed 0 over the steps (reported as a ``warn``; a
      warm-up from 0 counts with its largest learning rate).

    A parameter that never had a gradient tensor and still changed was changed by the training code itself, since
    torch's optimizers skip a parameter whose gradient is ``None``: an EMA copy (``AveragedModel`` keeps
    ``requires_grad=True``), a momentum encoder updated in place. It passes, named in the finding's message and in
    ``details["updated_outside_optimizer"]``; the same copy left at its initial values fails as above.

    **Gradients not zeroed** (``zero_grad`` missing in manual optimization): at every backward
    (``on_before_backward``) the check records on the device which parameters carry no gradient (``None`` or all
    zeros). A parameter whose gradient was never empty at any backward between two steps of its optimizer, and
    that is non-zero at the second step, carries the previous step's gradient: it fails. This is exact (it does not
    depend on how gradients evolve), and healthy patterns pass: ``zero_grad`` before backward or after step,
    ``set_to_none`` or not, gradient accumulation over several backwards, several optimizers (GANs). When the
    backward hooks are bypassed (``loss.backward()`` called directly in manual optimization), a statistical fallback
    is used on the total gradient norm of the first optimizer, ``n_1 .. n_K``: accumulated gradients grow like
    ``k`` with constant data (like ``sqrt(k)`` at least), so the check fails when ``n_K / n_1 >= (K + 1) / 2``,
    the norm grew at all but one step, and the training loss did not grow by more than half that factor.

    **Memory.** A fingerprint holds at most 68 numbers per parameter tensor, whatever its size (a tensor of at most
    64 elements is kept whole), and is computed chunk by chunk (two float64 temporaries, together at most 1% of the
    parameters' bytes and 64K elements each), so the check adds O(number of tensors) memory, not a copy of the
    model.

    **What could go unseen.** A parameter counts as changed when any fingerprint entry differs. A change of one of
    the sampled elements is always seen. A change that touches none of them (a sparse update moving ``k`` elements
    at random positions escapes the sample with probability ``(1 - 64 / n)^k`` for a tensor of ``n`` elements) is
    still seen by the float64 sum as soon as it moves the sum by more than about two rounding units of its largest
    partial sum, ``2^-51 sum_j |p_j|`` (for one float32 element: any move of at least one float32 ulp when ``|p_i|``
    is above about ``2^-27 sum_j |p_j|``); moves that cancel in the sum are seen by the weighted sum (a swap of two
    values, for instance) and the sum of squares. An update goes unseen only when it leaves every sampled element
    alone and moves all three sums by less than that rounding: a few unsampled elements each moved by a
    rounding-level amount, or moves that cancel in three independent sums at once (probability zero for updates
    computed from gradients). No host sync happens before step ``steps``.
    Skipped on a resume.

    **Mixed precision and sharding.** With a GradScaler (``16-mixed``), a step the scaler skipped (non-finite
    gradients, typical while the scale calibrates) does not count: the check waits for ``steps`` applied steps
    (counted by an optimizer step hook, on the host), ignores the skipped steps' gradients, and gives a ``skip``
    finding when the scaler skipped every step (WiringCheck reports that). Under FSDP the ranks' shards are combined
    at the evaluation (one reduction); under DeepSpeed and ``ModelParallelStrategy`` the check skips with the reason.

    Args:
        on_fail: ``"raise"`` or ``"warn"``.
        steps: optimizer steps after which parameters are compared (every optimizer's steps count).
        ignore: parameter names (``fnmatch`` patterns, e.g. ``"aux_head.*"``) not to check.
        check_zero_grad: also check that gradients are zeroed between optimizer steps.
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[ParameterUpdateCheck(steps=3, ignore=["aux.*"])], logger=False)
    """

    def __init__(
        self,
        on_fail: OnFail = "raise",
        steps: int = 5,
        ignore: Sequence[str] = (),
        check_zero_grad: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(on_fail, **kwargs)
        if not isinstance(steps, int) or steps < 1:
            raise RecipeConfigError(f"{self.name}: `steps` must be a positive int, got {steps!r}.")
        if isinstance(ignore, str):
            ignore = [ignore]
        self.steps = steps
        self.ignore = list(ignore)
        self.check_zero_grad = bool(check_zero_grad)
        self.done = False
        self._tracking = False

    # -- setup ----------------------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._tracking = False
        if not self._first_time(trainer):
            return
        why_not = sharding_skip(trainer, self.name, "reading each parameter's gradient and change",
                                "run the check once on a single device or under DDP/FSDP")
        if why_not is not None:
            self.done = True
            self.findings.append(Finding(self.name, "skip", why_not))
            return
        named = [(n, p) for n, p in pl_module.named_parameters()
                 if p.requires_grad and not any(fnmatch.fnmatch(n, pat) for pat in self.ignore)]
        if not named:
            self.done = True
            self._conclude(trainer, Finding(self.name, "skip", f"{self.name}: no trainable parameter to check."))
            return
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self._optimizers = list(trainer.optimizers)
        owner: dict[int, tuple[int, int]] = {}
        for k, opt in enumerate(self._optimizers):
            for j, group in enumerate(opt.param_groups):
                for p in group["params"]:
                    owner.setdefault(id(p), (k, j))
        where = [owner.get(id(p)) for p in self._params]
        self._owner = [w[0] if w is not None else None for w in where]
        self._group = [w[1] if w is not None else None for w in where]
        self._max_lr: list[list[Optional[float]]] = [[None] * len(opt.param_groups) for opt in self._optimizers]
        self._device = self._params[0].device
        dev = self._device
        self._masks = [torch.tensor([o == k for o in self._owner], device=dev) for k in range(len(self._optimizers))]
        with torch.no_grad():
            self._chunk = _chunk_for(self._params)
            self._initial = [tensor_fingerprint(p, chunk=self._chunk) for p in self._params]
        self._zero = torch.zeros((), device=dev)
        self._grad_max = torch.zeros(len(self._params), device=dev)
        self._had_grad = [False] * len(self._params)  # a gradient tensor at some step (host bools: no sync)
        self._empty_seen = torch.zeros(len(self._params), dtype=torch.bool, device=dev)
        self._stale = torch.zeros(len(self._params), dtype=torch.bool, device=dev)
        self._gnorm = torch.zeros(self.steps, device=dev)
        self._loss = torch.full((self.steps,), float("nan"), device=dev)
        self._opt_steps = [0] * len(self._optimizers)
        self._backwards_since = [0] * len(self._optimizers)
        self._unobserved = False
        self._total = 0
        self._batches_with_step = 0
        # 16-mixed: a GradScaler skips the optimizer step when the gradients are not finite (the first steps, while
        # the scale calibrates); only the steps it applied count, told on the host by a step hook (no sync)
        self._scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        self._applied = 0
        self._hooks = [getattr(opt, "optimizer", opt).register_step_post_hook(self._count_applied)
                       for opt in self._optimizers] if self._scaler else []
        self._tracking = True

    def _count_applied(self, *args: Any) -> None:
        self._applied += 1

    def _unhook(self) -> None:
        for handle in self.__dict__.pop("_hooks", []):
            handle.remove()

    def _norms(self) -> Tensor:
        """``(P,)`` gradient norm of every tracked parameter (0 for ``None``), on the device, without a sync."""
        present = [(k, p.grad) for k, p in enumerate(self._params) if p.grad is not None]
        for k, _ in present:
            self._had_grad[k] = True
        out = [self._zero] * len(self._params)
        if present:
            grads = [g.detach() if g.layout == torch.strided else g.detach().coalesce().values() for _, g in present]
            for (k, _), v in zip(present, torch._foreach_norm(grads)):
                out[k] = v.to(self._device, torch.float32)
        return torch.stack(out)

    # -- per step -------------------------------------------------------------------------------------------------
    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        if not self._tracking or not self.check_zero_grad:
            self._retire("on_before_backward")
            return
        self._empty_seen |= self._norms() == 0
        self._backwards_since = [b + 1 for b in self._backwards_since]

    @override
    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        if not self._tracking:
            self._retire("on_before_optimizer_step")
            return
        k = next((i for i, o in enumerate(self._optimizers) if o is optimizer or getattr(optimizer, "optimizer", None) is o), None)
        norms = self._norms()
        if self._scaler:  # non-finite gradients: the scaler skips this step; they are no evidence of training
            norms = torch.where(torch.isfinite(norms), norms, self._zero)
        self._grad_max = torch.maximum(self._grad_max, norms)
        if k is None:
            return
        mask = self._masks[k]
        for j, group in enumerate(self._optimizers[k].param_groups[: len(self._max_lr[k])]):
            lr = group.get("lr")
            if isinstance(lr, (int, float)):  # host values only: a tensor learning rate is read at the end
                prev = self._max_lr[k][j]
                self._max_lr[k][j] = float(lr) if prev is None else max(prev, float(lr))
        if self.check_zero_grad:
            if self._opt_steps[k] > 0:
                if self._backwards_since[k] == 0:
                    self._unobserved = True  # backward ran without Lightning's hooks: fall back on growth
                else:
                    self._stale |= mask & ~self._empty_seen & (norms > 0)
            self._empty_seen &= ~mask
            self._backwards_since[k] = 0
        if k == 0 and self._opt_steps[0] < self.steps:
            self._gnorm[self._opt_steps[0]] = torch.linalg.vector_norm(norms * mask)
        self._opt_steps[k] += 1
        self._total += 1

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._tracking:
            self._retire("on_train_batch_end")
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        s = self._opt_steps[0] - 1 if self._opt_steps else -1
        if isinstance(loss, Tensor) and loss.numel() == 1 and 0 <= s < self.steps:
            self._loss[s] = loss.detach().float().reshape(()).to(self._device)
        if (self._applied if self._scaler else self._total) >= self.steps or self._total >= self.steps + _MAX_SKIPPED:
            self._evaluate(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._tracking:
            self._evaluate(trainer)

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _evaluate(self, trainer: "pl.Trainer") -> None:
        self._tracking = False
        self.done = True
        self._retire("on_before_backward", "on_before_optimizer_step", "on_train_batch_end")
        self._unhook()
        if self._scaler and self._applied == 0 and self._total > 0:
            self._initial = []
            self._conclude(trainer, Finding(self.name, "skip", f"{self.name}: the GradScaler skipped all {self._total} "
                                            "optimizer step(s) (non-finite gradients): no update to judge (see "
                                            "WiringCheck.framework).", details={"steps": self._total, "applied": 0}))
            return
        if self._total == 0:
            self._initial = []
            self._conclude(trainer, Finding(self.name, "skip", f"{self.name}: no optimizer step was taken."))
            return
        with torch.no_grad():
            changed = torch.stack([(tensor_fingerprint(p, chunk=self._chunk) != f).any()
                                   for p, f in zip(self._params, self._initial)])
            scale = torch.stack([f[0].float() for f in self._initial])  # the largest |p| at the start
            had = torch.tensor(self._had_grad, dtype=torch.float32, device=self._device)
            packed = torch.stack([changed.float(), self._grad_max, scale, self._stale.float(), had])
            series = torch.stack([self._gnorm, self._loss])
            if sharding(trainer) == "fsdp":  # each rank holds a shard of every parameter: combine them
                packed, series = _combine_shards(trainer, packed, series)
            packed, series = packed.cpu(), series.cpu()  # the one sync
        self._initial = []
        changed_l, gmax, pmax, stale, had_l = (packed[i].tolist() for i in range(5))
        k0 = min(self._opt_steps[0], self.steps) if self._opt_steps else 0
        gnorms, losses = series[0, :k0].tolist(), series[1, :k0].tolist()
        findings = [self._updates(changed_l, gmax, pmax, had_l, trainer.global_step)]
        if self.check_zero_grad:
            findings.append(self._zero_grad(stale, gnorms, losses, trainer, trainer.global_step))
        failed = [f for f in findings if f.failed]
        for f in findings:
            if not f.failed:
                self.findings.append(f)
        if not failed:
            self._conclude(trainer, None)
            return
        first = failed[0]
        for f in failed[1:]:
            first.message += "\n" + f.message
            first.causes += f.causes
            first.details.update(f.details)
        self._conclude(trainer, first)

    def _lr_of(self, k: int) -> Optional[float]:
        """The largest learning rate of the parameter's group over the steps taken (warm-up from 0 included)."""
        opt, j = self._owner[k], self._group[k]
        if opt is None or j is None:
            return None
        lr = self._max_lr[opt][j]
        if lr is None and j < len(self._optimizers[opt].param_groups):
            value = self._optimizers[opt].param_groups[j].get("lr")
            lr = float(value) if isinstance(value, (int, float, Tensor)) else None
        return lr

    def _updates(self, changed: list[float], gmax: list[float], pmax: list[float], had_grad: list[float],
                 step: int) -> Finding:
        not_in_opt, no_grad, not_changed, lr_zero, tiny, outside = [], [], [], [], [], []
        for k, (name, p) in enumerate(zip(self._names, self._params)):
            if changed[k] and not had_grad[k]:  # no optimizer steps a tensor without a gradient: user code did
                outside.append(name)
                continue
            if self._owner[k] is None:
                not_in_opt.append(name)
                continue
            if not gmax[k] > 0:
                no_grad.append(name)
                continue
            if changed[k]:
                continue
            lr = self._lr_of(k)
            if lr is not None and lr == 0:
                lr_zero.append(name)
            elif lr is not None and lr * min(gmax[k] / math.sqrt(max(p.numel(), 1)), 1.0) < 8 * _eps(p) * pmax[k]:
                tiny.append(name)
            else:
                not_changed.append(name)
        n = len(self._names)
        details = {"parameters": n, "steps": self._total, "not_in_optimizer": not_in_opt, "no_gradient": no_grad,
                   "not_changed": not_changed, "lr_zero": lr_zero, "below_float_resolution": tiny,
                   "updated_outside_optimizer": outside}
        bad = len(not_in_opt) + len(no_grad) + len(not_changed)
        if bad:
            parts, causes = [], []
            if not_in_opt:
                parts.append(f"in no optimizer parameter group: {_names(not_in_opt)}")
                causes += _NOT_IN_OPTIMIZER
            if no_grad:
                parts.append(f"never received a non-zero gradient: {_names(no_grad)}")
                causes += _NO_GRAD
            if not_changed:
                parts.append(f"received gradients but did not change: {_names(not_changed)}")
                causes += _NOT_CHANGED
            msg = (f"{self.name}: after {self._total} optimizer step(s), {bad} of {n} trainable parameters were not "
                   f"trained (expected: every trainable parameter gets a gradient and changes). " + "; ".join(parts) +
                   ". HINT: freeze parameters on purpose with `requires_grad_(False)`, or pass `ignore=[...]` (name "
                   "patterns) for those used only outside training_step.")
            return Finding(self.name, "fail", msg, float(bad), 0.0, step, causes, details)
        notes = ""
        if outside:
            notes += (f" Changed by the training code outside any optimizer (no gradient at any step: an EMA copy, a "
                      f"momentum encoder): {_names(outside)}.")
        if lr_zero:
            notes += f" Unchanged in a group with learning rate 0: {_names(lr_zero)}."
        if tiny:
            notes += f" Unchanged because the update is below float resolution: {_names(tiny)}."
        if self.__dict__.get("_scaler") and self._applied < self._total:
            notes += f" A GradScaler skipped {self._total - self._applied} of these steps (not counted)."
            details["applied"] = self._applied
        stepped = f"all {n}" if not outside else f"the {n - len(outside)} other"
        return Finding(self.name, "warn" if lr_zero else "pass", f"{self.name}: {stepped} trainable parameters received "
                       f"gradients and changed within {self._total} optimizer step(s).{notes}", 0.0, 0.0, step, [], details)

    def _zero_grad(self, stale: list[float], gnorms: list[float], losses: list[float], trainer: "pl.Trainer",
                   step: int) -> Finding:
        check = f"{self.name}.zero_grad"
        growth = gradient_growth(gnorms, losses)
        details = {"grad_norms": gnorms, "losses": losses, "growth": growth["growth"]}
        bad = [name for name, s in zip(self._names, stale) if s]
        series = ", ".join(f"{v:.3g}" for v in gnorms)
        if bad:
            details["stale"] = bad
            return Finding(check, "fail", f"{check}: gradients are not zeroed between optimizer steps: {len(bad)} of "
                           f"{len(self._names)} parameters still held the previous step's gradient when the next step "
                           f"was taken ({_names(bad)}). Gradient norm over the first steps: [{series}] (x"
                           f"{growth['growth']:.3g}). HINT: call `optimizer.zero_grad()` once per step (manual "
                           "optimization); pass `check_zero_grad=False` if accumulating across steps is intended.",
                           float(len(bad)), 0.0, step, list(_STALE), details)
        if self._unobserved and growth["accumulating"] and not trainer.lightning_module.automatic_optimization:
            return Finding(check, "fail", f"{check}: the gradient norm grew at every optimizer step, x"
                           f"{growth['growth']:.3g} over {len(gnorms)} steps ([{series}]), while the loss changed x"
                           f"{growth['loss_ratio']:.3g}: gradients accumulate across steps (expected: roughly constant "
                           f"with zero_grad; accumulation gives ~x{len(gnorms)}). HINT: call `optimizer.zero_grad()` "
                           "and `self.manual_backward(loss)` once per step; pass `check_zero_grad=False` if the growth "
                           "is genuine.", growth["growth"], growth["threshold"], step, list(_STALE), details)
        how = "no gradient outlived its step" if not self._unobserved else "backward hooks bypassed; growth test"
        return Finding(check, "pass", f"{check}: gradients are zeroed between optimizer steps ({how}); gradient norm "
                       f"over the first steps: [{series}].", growth["growth"], growth["threshold"], step, [], details)


    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._initial = []  # free the fingerprints if the fit stopped early
        self._tracking = False
        self._unhook()


# a GradScaler that keeps skipping: judge anyway after this many steps beyond `steps` (from 2**16 the scale reaches 1
# in 16 skipped steps)
_MAX_SKIPPED = 64


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _combine_shards(trainer: "pl.Trainer", packed: Tensor, series: Tensor) -> tuple[Tensor, Tensor]:
    """Under FSDP each rank holds a shard of every parameter (an empty one for some): a parameter changed, received a
    gradient, outlived its step, had a gradient tensor when it did on any rank; its largest ``|p|`` is the largest of
    the shards'; the gradient norm of a step is the root of the sum of the shards' squared norms. A collective: every
    rank calls it."""
    changed, gmax, scale, stale, had = packed
    any_rank = trainer.strategy.reduce(torch.stack([changed, stale, had]), reduce_op="sum") > 0
    peaks = trainer.strategy.reduce(torch.stack([gmax, scale]), reduce_op="max")
    gnorm = trainer.strategy.reduce(series[0].nan_to_num(0.0).pow(2), reduce_op="sum").sqrt()
    return (torch.stack([any_rank[0].float(), peaks[0], peaks[1], any_rank[1].float(), any_rank[2].float()]),
            torch.stack([gnorm, series[1]]))
