"""``WiringCheck``: the wiring bugs a first step already shows (weights the optimizer never sees, batches sorted by
class, a loss computed on another layout than the model's output, framework warnings that mean a bug)."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_recipe._core.base import OnFail, _OnceCheck
from lightning_recipe._core.context import get_context
from lightning_recipe._core.conventions import find_loss, split_batch
from lightning_recipe.checks.wiring.probes import (
    _batch_size,
    _fed_the_batch,
    _order_kind,
    _tensors,
    _unregistered_leaves,
    _WarningTap,
)
from lightning_recipe.checks.wiring.rules import _WiringRules
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding

_MAX_CAPTURED = 4  # forward / loss calls kept from the first step
_TRANSIENT = ("_tap", "_handles", "_step0", "_counts", "_opt_hooks")


class WiringCheck(_WiringRules, _OnceCheck):
    """Wiring bugs that the first training steps show, each tested once, read-only, at the start of the fit.

    * ``WiringCheck.unregistered``: the autograd graph of the first training loss (walked from ``loss.grad_fn``
      through ``next_functions``, at most ``max_graph_nodes`` nodes, without a backward) must reach no leaf tensor
      that requires a gradient and is not a parameter of the LightningModule: such a tensor is never updated by the
      optimizer (layers kept in a Python ``list``/``dict`` instead of ``nn.ModuleList``/``nn.ModuleDict``, a tensor
      made with ``requires_grad=True`` in ``forward``). The path of a module hidden in a list or dict attribute is
      named; other leaves are "created in forward". Leaves that are inputs (a tensor of the batch, or a tensor whose
      first dimension is the batch size: gradient penalties, adversarial perturbations) and tensors only read by a
      gradient-checkpointing node are not counted. A hidden tensor that the optimizer holds anyway is a ``warn``
      (trained, but not saved in checkpoints).
    * ``WiringCheck.shuffle``: the number of distinct classes ``D_b`` in each of the first ``batches`` training
      batches (the batches training itself sees, counted on the device, read once) is compared with its law under a
      random order of the same labels: for a batch of ``B`` labels drawn without replacement from ``N`` with class
      counts ``n_c``, ``E[D] = sum_c 1 - C(N - n_c, B) / C(N, B)`` and ``P(one class) = sum_c C(n_c, B) / C(N, B)``.
      It fails when every batch holds a single class and a random order gives that with probability below 1e-6, or
      when the mean ``D`` is at most half of ``E[D]`` (``E[D] >= 2.5``) and ``6`` standard deviations below it.
      Judged for a sequential order (``shuffle=False``, a non-shuffling ``DistributedSampler``) and iterable
      datasets; a random sampler (``shuffle=True``, ``WeightedRandomSampler``) passes, and a custom batch sampler
      (class-balanced P x K batches are low in diversity on purpose) only gets a note. Classification with one
      class index or one 0/1 label per example; skipped for regression and per-position targets.
    * ``WiringCheck.loss_layout``: during the first training step the output of the LightningModule's ``forward``
      and the arguments of its loss module (the conventions' loss: ``loss_fn``, ``criterion``, ...) are captured
      with forward hooks. When the loss input is a pure rearrangement of the output (the same values), the multiset
      of (class-score row, target) pairs it gives the loss must equal the one of a layout the output and the
      batch's targets support ((N, C, d...) with class dim 1, (N, T, C), time-major (T, N, C)); else the rows mix
      positions (``logits.view(-1, C)`` on (N, C, H, W)) or the targets are paired in another order (time-major
      against batch-major). The comparison is exact (no tolerance: dropout and batch statistics cannot explain
      it, both sides use the same output tensor). Elementwise losses whose input and target shapes broadcast to a
      larger shape ((N, 1) against (N,)) fail too, and so does PyTorch's own "Using a target size ... different to
      the input size" warning when the broadcast enlarges the loss. The message names training_step's loss and the
      loss module's value on the model's own layout. A loss input that is not a rearrangement of the output (a
      transformed, masked or auxiliary output), a loss that is not a module, and a forward not called through
      ``self(...)`` are not judged (a note says so).
    * ``WiringCheck.framework``: warnings shown during the fit are tapped (``warnings.showwarning`` is wrapped for
      the fit and restored; every warning is still shown as before) and the ones that mean a bug become findings:
      ``training_step`` returned ``None`` at every one of the first batches (fail), a scheduler stepped before its
      optimizer (warn; a note when a GradScaler skipped the first step, which causes the same warning),
      ``configure_optimizers`` returned ``None`` (warn). Optimizer steps are counted with step hooks: a GradScaler
      that skipped every step of the first ``batches`` batches (at least 8 steps, the scale fallen to 256 or less)
      fails, and so does a fit whose optimizers never stepped at all. A warning filtered out (``"ignore"``), or shown
      once already in this process, cannot be seen.

    All rules decide once, after ``batches`` training batches (or at the end of a shorter fit), in one reduction
    across ranks; the framework tap and the step counts go on until the end of the fit, judged again there. No
    extra forward, no RNG draw, no host sync before the decision (the first loss is read once). Skipped on a resume.

    Args:
        on_fail: ``"raise"`` or ``"warn"``.
        batches: training batches whose labels are counted (and after which the rules decide).
        max_graph_nodes: largest number of autograd nodes walked from the first loss.
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see
            :class:`~lightning_recipe.RecipeCheck`.

    Raises:
        RecipeConfigError: If ``batches`` or ``max_graph_nodes`` is not a positive int.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[WiringCheck(batches=8)], logger=False)
    """

    def __init__(self, on_fail: OnFail = "raise", batches: int = 8, max_graph_nodes: int = 200_000,
                 **kwargs: Any) -> None:
        super().__init__(on_fail, **kwargs)
        for name, value in (("batches", batches), ("max_graph_nodes", max_graph_nodes)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RecipeConfigError(f"{self.name}: `{name}` must be a positive int, got {value!r}.")
        self.batches = batches
        self.max_graph_nodes = max_graph_nodes
        self.done = False
        self._active = False

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        return {k: v for k, v in state.items() if not k.startswith(_TRANSIENT)}

    # -- fit start: the warning tap --------------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._active = False
        self._remove_hooks()
        if stage == "fit":
            self._tap = _WarningTap()
            self._tap.install()  # before the strategy's setup: `configure_optimizers` returning None is seen

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._remove_hooks()
        tap = self.__dict__.pop("_tap", None)
        if tap is not None:
            tap.remove()
        self._active = False

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self.teardown(trainer, pl_module, "fit")

    def _count_step(self, *args: Any) -> None:
        """Step hook of the optimizers: one more optimizer step went through (a host int, no sync)."""
        self._steps[0] += 1

    def _remove_hooks(self) -> None:
        for h in self.__dict__.pop("_handles", []) + self.__dict__.pop("_opt_hooks", []):
            h.remove()
        self.__dict__.pop("_step0", None)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._active = False
        if not self._first_time(trainer):
            return
        self.done = True
        self._active = True
        self._evaluated = False
        self._seen = 0
        self._no_loss = 0
        self._graph: Optional[dict[str, Any]] = None
        self._layout: Optional[Finding] = None
        self._first_loss: Optional[float] = None
        self._reported: set[str] = set()
        self._start_step = trainer.global_step
        self._steps = [0]
        self._opt_hooks = []
        for opt in trainer.optimizers:
            inner = getattr(opt, "optimizer", opt)
            if isinstance(inner, torch.optim.Optimizer):
                self._opt_hooks.append(inner.register_step_post_hook(self._count_step))
        self._hooked = bool(self._opt_hooks)
        # the conventions (task, loss, label counts) for the shuffle and layout rules; a configuration error stops a
        # strict fit here, before the first step, and skips only these two rules otherwise
        self._ctx = None
        self._ctx_error: Optional[str] = None
        try:
            self._ctx = get_context(trainer, pl_module, self._settings)
            self._shuffle_plan = self._plan_shuffle(trainer)
        except RecipeConfigError as err:
            if self.on_fail == "raise":
                raise RecipeConfigError(f"{self.name}: {err}") from None
            self._ctx_error = str(err)
            self._shuffle_plan = {"skip": f"the conventions could not be resolved ({err})"}
        self._counts = None

    # -- the first step: capture --------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._retire("on_train_batch_start")
        if not self._active or self._seen > 0:
            return
        step0: dict[str, Any] = {"outputs": [], "calls": [], "fed": None, "forwards": 0, "batch_ids": set()}
        try:
            inputs, targets = split_batch(batch, self._settings.split_batch)
        except RecipeConfigError:
            inputs, targets = None, None
        step0["inputs"], step0["targets"] = inputs, targets if isinstance(targets, Tensor) else None
        step0["batch_ids"] = {id(t) for t in _tensors(batch)}
        step0["batch_size"] = _batch_size(inputs, targets)
        self._step0 = step0
        self._handles = []
        if self._settings.forward is not None:
            step0["why"] = "`forward=` is given, so the model's own output is not known here"
            return
        loss = find_loss(pl_module, self._settings.loss_fn)
        if not isinstance(loss, nn.Module):
            step0["why"] = ("the loss is not a torch.nn module held by the LightningModule (a function, or computed in "
                            "training_step), so its arguments cannot be watched")
            return
        step0["loss_module"], step0["loss_name"] = loss, type(loss).__name__

        # the hooks only read (references to tensors of this step, released at its end) and never raise into the
        # user's forward
        def on_forward(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if module is not pl_module or not torch.is_grad_enabled() or not module.training:
                return  # a probe (no grad, eval mode) of another check
            try:
                step0["forwards"] += 1
                if len(step0["outputs"]) < _MAX_CAPTURED:
                    outs = [t.detach() for t in _tensors(output) if t.is_floating_point()]
                    step0["outputs"].extend(outs[:_MAX_CAPTURED])
                    if step0["fed"] is None:
                        step0["fed"] = _fed_the_batch((args, kwargs), step0["inputs"])
            except Exception as err:  # pragma: no cover - defensive
                step0["why"] = f"the model's output could not be read ({type(err).__name__}: {err})"

        def on_loss(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if module is not loss or len(step0["calls"]) >= _MAX_CAPTURED:
                return
            inp = args[0] if len(args) > 0 else kwargs.get("input")
            tgt = args[1] if len(args) > 1 else kwargs.get("target")
            if isinstance(inp, Tensor) and isinstance(tgt, Tensor):
                value = output.detach() if isinstance(output, Tensor) else None
                step0["calls"].append((inp.detach(), tgt.detach(), value))

        try:
            self._handles.append(pl_module.register_forward_hook(on_forward, with_kwargs=True))
            self._handles.append(loss.register_forward_hook(on_loss, with_kwargs=True))
        except RuntimeError:  # a scripted module takes no hook
            step0["why"] = "the module or its loss takes no forward hook (scripted)"

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        self._retire("on_before_backward")
        if not self._active or self._graph is not None:
            return
        step0 = self.__dict__.get("_step0") or {}
        try:
            self._graph = _unregistered_leaves(loss, pl_module, trainer.optimizers, step0.get("batch_ids", set()),
                                               step0.get("batch_size"), self.max_graph_nodes)
        except Exception as err:  # a graph this walk does not understand: say so, never stop training over it
            self._graph = {"error": f"{type(err).__name__}: {err}"}

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or self._evaluated:
            self._retire("on_train_batch_end")
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            self._no_loss += 1
        if self._seen == 0:
            for h in self.__dict__.pop("_handles", []):
                h.remove()
            step0 = self.__dict__.pop("_step0", None) or {}
            if isinstance(loss, Tensor) and loss.numel() == 1:
                self._first_loss = float(loss.detach()) * trainer.accumulate_grad_batches  # the one read at step 0
            try:
                self._layout = self._judge_layout(step0, trainer.global_step)
            except Exception as err:  # a layout this comparison does not understand: skipped, training goes on
                self._layout = Finding(f"{self.name}.loss_layout", "skip", f"{self.name}.loss_layout: the first step's "
                                       f"output and loss arguments could not be compared: {type(err).__name__}: {err}.")
        if self._shuffle_plan.get("judge") is not None:
            self._count_labels(batch)
        self._seen += 1
        if self._seen >= self.batches:
            self._retire("on_train_batch_end")
            self._evaluate(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not self._active:
            return
        if not self._evaluated:
            self._evaluate(trainer)
        else:
            late = self._framework(trainer, late=True)
            self._conclude(trainer, late if late is not None and late.failed else None)
            if late is not None and not late.failed:
                self._record(late)
        self._active = False
        for h in self.__dict__.pop("_opt_hooks", []):
            h.remove()

    # -- decision ---------------------------------------------------------------------------------------------------
    def _evaluate(self, trainer: "pl.Trainer") -> None:
        self._evaluated = True
        step = trainer.global_step
        found = [self._unregistered(step), self._shuffle(step), self._loss_layout(step), self._framework(trainer)]
        found = [f for f in found if f is not None]
        failed = [f for f in found if f.failed]
        for f in found:
            if not f.failed:
                self._record(f)
        if not failed:
            self._conclude(trainer, None)
            return
        first = failed[0]
        for f in failed[1:]:
            first.message += "\n" + f.message
            first.causes += [c for c in f.causes if c not in first.causes]
            first.details.update(f.details)
        self._conclude(trainer, first)

    def _record(self, finding: Finding) -> None:
        """Keep a finding that does not fail; a ``warn`` is also shown as a :class:`RecipeWarning`."""
        self.findings.append(finding)
        if finding.status == "warn":
            causes = "".join(f"\n  - {c}" for c in finding.causes)
            rank_zero_warn(finding.message + (f"\nLikely causes:{causes}" if causes else ""), category=RecipeWarning)

    # unregistered leaves
    def _plan_shuffle(self, trainer: "pl.Trainer") -> dict[str, Any]:
        """Whether and how to count the first batches' labels: ``judge`` is the reason to skip, or the order kind."""
        if self._ctx is None:
            return {"skip": f"the conventions could not be resolved ({self._ctx_error})"}
        spec = self._ctx.spec
        targets = self._ctx.targets
        if spec.task not in ("multiclass", "binary") or spec.soft_targets:
            return {"skip": f"a {spec.task} task{' with soft targets' if spec.soft_targets else ''}: batch diversity "
                            "of class labels does not apply"}
        n = targets.shape[0] if targets.ndim else 0
        if not (targets.numel() == n and n > 0):
            return {"skip": f"targets of shape {tuple(targets.shape)} hold more than one label per example "
                            "(per-position targets): the order of examples is not judged by their labels"}
        stats = self._ctx.stats
        if spec.task == "binary":
            sample = stats.sample
            if not bool(((sample == 0) | (sample == 1)).all()):
                return {"skip": "binary targets that are not all 0 or 1 (soft labels)"}
            pos = float(stats.positives.reshape(-1)[0])
            counts = [stats.count - pos, pos]
        else:
            counts = stats.class_counts.reshape(-1).tolist()
        kind, detail = _order_kind(trainer)
        return {"judge": kind, "order": detail, "counts": counts, "classes": len(counts),
                "binary": spec.task == "binary"}

    def _count_labels(self, batch: Any) -> None:
        """Per-class counts of one batch, into a device buffer (no host sync)."""
        plan, spec = self._shuffle_plan, self._ctx.spec
        try:
            _, y = split_batch(batch, self._settings.split_batch)
        except RecipeConfigError:
            return
        if not isinstance(y, Tensor) or y.shape[0] == 0 or y.numel() != y.shape[0]:
            return
        c = plan["classes"]
        if plan["binary"]:
            idx = (y.detach().reshape(-1) > 0.5).long()
        else:
            idx = y.detach().reshape(-1).long()
            valid = spec.valid_mask(idx)
            idx = idx.clamp(0, c) if valid is None else torch.where(valid, idx.clamp(0, c - 1), torch.full_like(idx, c))
        if self._counts is None:
            self._counts = torch.zeros(self.batches, c + 1, device=idx.device)
        if self._seen < self.batches:
            self._counts[self._seen].index_add_(0, idx, torch.ones_like(idx, dtype=self._counts.dtype))

# -- the warning tap --------------------------------------------------------------------------------------------------


# -- pure functions ---------------------------------------------------------------------------------------------------


# -- helpers ----------------------------------------------------------------------------------------------------------


