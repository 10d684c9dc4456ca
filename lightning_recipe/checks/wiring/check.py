"""``WiringCheck``: the wiring bugs a first step already shows (weights the optimizer never sees, batches sorted by
class, a loss computed on another layout than the model's output, framework warnings that mean a bug)."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any, Callable, Mapping, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)
from typing_extensions import override

from lightning_recipe._core.base import OnFail, _OnceCheck
from lightning_recipe._core.context import get_context
from lightning_recipe._core.conventions import find_loss, split_batch
from lightning_recipe._core.labels import _single_loader
from lightning_recipe.exceptions import RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding

_UNREGISTERED_CAUSES = [
    "layers kept in a Python list or dict instead of `nn.ModuleList` / `nn.ModuleDict`: their weights are not "
    "parameters of the module, so the optimizer never updates them, checkpoints do not save them and `.to(device)` "
    "does not move them",
    "a tensor created with `requires_grad=True` inside `forward` (or kept as a plain tensor attribute): it is a new, "
    "untrained tensor at every step; make it an `nn.Parameter` in `__init__`",
    "a helper model kept out of the module on purpose (a frozen teacher) that still computes gradients: call "
    "`requires_grad_(False)` on it or run it under `torch.no_grad()`",
]
_SHUFFLE_CAUSES = [
    "`shuffle=False` on the train DataLoader of a dataset stored sorted by class (rows grouped by label, files "
    "read class by class)",
    "a sampler that returns the dataset in its stored order",
    "an iterable dataset that streams one class after another without a shuffle buffer",
]
_LAYOUT_CAUSES = [
    "`logits.view(-1, C)` on (N, C, H, W) outputs mixes pixels and classes: use `logits.permute(0, 2, 3, 1)"
    ".reshape(-1, C)`, or give the loss (N, C, H, W) and (N, H, W) directly",
    "time-major outputs (T, N, C) flattened against batch-major targets (N, T) (or the reverse): transpose one of "
    "them before flattening",
    "(N, 1) predictions against (N,) targets: the loss broadcasts them to (N, N); `squeeze(1)` the prediction or "
    "`unsqueeze(1)` the target",
]
_FRAMEWORK_CAUSES = {
    "no_loss": "`training_step` returns nothing (a missing `return loss`), so Lightning skips backward and no "
               "optimizer step ever updates the weights",
    "skipped": "the GradScaler skipped every optimizer step: the gradients are inf/NaN at every step (a NaN loss, an "
               "fp16 overflow in the model, a `log(0)`), so the weights never change",
    "no_step": "no optimizer step ever went through (an `optimizer_step` override that does not call the closure, "
               "or every step skipped)",
    "scheduler_order": "the learning-rate scheduler is stepped before the optimizer (`sch.step()` before `opt.step()` "
                       "in manual optimization): the first value of the schedule is skipped, and a scheduler stepped "
                       "by hand as well as by Lightning runs twice as fast",
    "no_optimizer": "`configure_optimizers` returns nothing, so the fit runs without an optimizer and trains nothing",
}
# warnings of torch and Lightning that mean a bug: key -> pattern of the message
_KNOWN_WARNINGS = (
    ("no_loss", re.compile(r"`training_step` returned `None`")),
    ("scheduler_order", re.compile(r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")),
    ("broadcast", re.compile(r"Using a target size \((.*?)\) that is different to the input size \((.*?)\)")),
    ("no_optimizer", re.compile(r"`LightningModule\.configure_optimizers` returned `None`")),
)
_CLASS_LOSSES = ("CrossEntropyLoss", "NLLLoss")
_ELEMENTWISE_LOSSES = ("MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss", "BCELoss", "BCEWithLogitsLoss")
_MAX_LAYOUT_ELEMENTS = 1 << 22  # a model output larger than this is not compared (sorting cost)
_MAX_CAPTURED = 4  # forward / loss calls kept from the first step
_SHUFFLE_P = 1e-6  # a random order gives all-single-class batches with at most this probability
_SHUFFLE_Z = 6.0
_TRANSIENT = ("_tap", "_handles", "_step0", "_counts", "_opt_hooks")


class WiringCheck(_OnceCheck):
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
    def _unregistered(self, step: int) -> Finding:
        check = f"{self.name}.unregistered"
        g = self._graph
        if g is not None and "error" in g:
            return Finding(check, "skip", f"{check}: the autograd graph of the first loss could not be walked: "
                           f"{g['error']}.")
        if g is None:
            return Finding(check, "skip", f"{check}: no backward ran in the first {self._seen} batch(es) ("
                           "training_step returned no loss, or manual optimization without `manual_backward`): "
                           "nothing to walk.")
        notes = "".join(f" Note: {n}" for n in g["notes"])
        details = {k: g[k] for k in ("nodes", "leaves", "parameters", "hidden", "in_optimizer")}
        hidden, held = g["hidden"], g["in_optimizer"]
        if hidden:
            return Finding(check, "fail", f"{check}: {len(hidden)} tensor(s) that require a gradient take part in the "
                           f"first training loss but are not parameters of the LightningModule, so the optimizer "
                           f"never updates them: {_names(hidden)} (expected: every trainable tensor is registered, "
                           f"as an `nn.Parameter` or inside an `nn.Module` child). HINT: use `nn.ModuleList` / "
                           f"`nn.ModuleDict` for lists of layers and `nn.Parameter` created in `__init__` for learned "
                           f"tensors.{notes}", float(len(hidden)), 0.0, step, list(_UNREGISTERED_CAUSES), details)
        if held:
            return Finding(check, "warn", f"{check}: {len(held)} tensor(s) in the first training loss are held by the "
                           f"optimizer but are not parameters of the LightningModule: {_names(held)}. They are "
                           "trained, but `state_dict()` and checkpoints leave them out and `.to(device)` does not "
                           "move them. "
                           f"HINT: register them (`nn.ModuleList`, `nn.ModuleDict`, `nn.Parameter`).{notes}",
                           float(len(held)), 0.0, step, list(_UNREGISTERED_CAUSES[:1]), details)
        trunc = " (walk stopped at `max_graph_nodes`: part of the graph was not seen)" if g["truncated"] else ""
        return Finding(check, "pass", f"{check}: every leaf tensor that requires a gradient in the first training loss "
                       f"is a parameter of the LightningModule ({g['parameters']} parameters reached, {g['nodes']} "
                       f"autograd nodes walked{trunc}).{notes}", 0.0, 0.0, step, [], details)

    # shuffle
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

    def _shuffle(self, step: int) -> Finding:
        check = f"{self.name}.shuffle"
        plan = self._shuffle_plan
        if "skip" in plan:
            return Finding(check, "skip", f"{check}: not judged: {plan['skip']}.")
        if self._counts is None:
            return Finding(check, "skip", f"{check}: no batch with one class label per example was seen.")
        per_batch = self._counts[: min(self._seen, self.batches)].cpu()[:, :-1]  # the read (ignored labels dropped)
        res = shuffle_test(per_batch, torch.tensor(plan["counts"], dtype=torch.float64))
        details = {k: res[k] for k in ("distinct", "expected_distinct", "p_all_single", "z", "batch_sizes")}
        details["order"] = plan["order"]
        numbers = (f"distinct classes in the first {len(res['distinct'])} batches: {res['distinct']} (mean "
                   f"{res['mean_distinct']:.3g}); a random order of the same labels gives {res['mean_expected']:.3g} "
                   f"on average (sum_c 1 - C(N - n_c, B) / C(N, B), N={int(res['n'])}, {plan['classes']} classes)")
        if not res["sorted"]:
            return Finding(check, "pass", f"{check}: batches are as mixed as a random order; {numbers}; order: "
                           f"{plan['order']}.", res["mean_distinct"], res["mean_expected"], step, [], details)
        if res["all_single"]:
            what = (f"every one of the first {len(res['distinct'])} batches holds a single class (a random order gives "
                    f"that with probability {res['p_all_single']:.2g})")
        else:
            what = (f"the batches hold far fewer classes than a random order gives ({res['z']:.1f} standard deviations "
                    "below)")
        if plan["judge"] == "custom":
            return Finding(check, "pass", f"{check}: {what}; {numbers}. Order: {plan['order']}. Note: a custom batch "
                           "sampler (e.g. class-balanced P x K batches) may do this on purpose, so it is not judged.",
                           res["mean_distinct"], res["mean_expected"], step, [], details)
        if plan["judge"] == "random":  # cannot come from a random order (probability below the threshold)
            return Finding(check, "warn", f"{check}: {what} although the loader samples at random ({plan['order']}); "
                           f"{numbers}.", res["mean_distinct"], res["mean_expected"], step, list(_SHUFFLE_CAUSES),
                           details)
        return Finding(check, "fail", f"{check}: the training batches are sorted by class: {what}; {numbers}. Order: "
                       f"{plan['order']}. Each step then pushes the model toward one class and the next undoes it. "
                       "HINT: `DataLoader(..., shuffle=True)` or a sampler (`RandomSampler`, "
                       "`WeightedRandomSampler`).", res["mean_distinct"], res["mean_expected"], step,
                       list(_SHUFFLE_CAUSES), details)

    # loss layout
    def _judge_layout(self, step0: dict[str, Any], step: int) -> Finding:
        check = f"{self.name}.loss_layout"
        if "why" in step0:
            return Finding(check, "skip", f"{check}: not judged: {step0['why']}.")
        if not step0:
            return Finding(check, "skip", f"{check}: the first batch was not seen.")
        name = step0["loss_name"]
        if not step0["outputs"]:
            return Finding(check, "skip", f"{check}: not judged: the model's forward was not called through "
                           "`self(...)` in the first training_step (or ran without gradients).")
        if not step0["calls"]:
            return Finding(check, "skip", f"{check}: not judged: the loss module ({name}) was not called in the first "
                           "training_step.")
        if name not in _CLASS_LOSSES + _ELEMENTWISE_LOSSES:
            return Finding(check, "skip", f"{check}: not judged: {name} is not a loss whose layout is known.")
        y = step0["targets"]
        notes: list[str] = []
        if step0["fed"] is False:
            notes.append("the model's input was not the batch's input (augmented or mixed in training_step), so "
                         "the pairing with the batch's targets is not compared")
        verdicts = [_layout_verdict(inp, tgt, step0["outputs"], y, name in _CLASS_LOSSES, step0["fed"] is not False)
                    for inp, tgt, _ in step0["calls"]]
        bad = [(v, call) for v, call in zip(verdicts, step0["calls"]) if v["status"] == "fail"]
        judged = [v for v in verdicts if v["status"] == "pass"]
        notes += sorted({v["why"] for v in verdicts if v["status"] == "skip"})
        details: dict[str, Any] = {"loss": name, "verdicts": [v["what"] for v in verdicts]}
        if bad:
            v, (_, _, value) = bad[0]
            module_value = float(value.float().mean()) if isinstance(value, Tensor) else float("nan")
            ref = _reference_loss(step0["loss_module"], v.get("reference"))
            details.update({"training_step_loss": self._first_loss, "loss_module_value": module_value,
                            "model_layout_loss": ref})
            numbers = (f"training_step's first loss: {_fmt(self._first_loss)} (the {name} call: "
                       f"{_fmt(module_value)}); the same {name} on the model's own layout ({v.get('layout', '?')}): "
                       f"{_fmt(ref)}")
            return Finding(check, "fail", f"{check}: the loss is computed on another layout than the model's output: "
                           f"{v['what']}. {numbers}. (The comparison is exact, on the output tensor of the same step: "
                           "dropout and batch statistics do not enter it.)" + "".join(f" Note: {n}." for n in notes),
                           self._first_loss, ref, step, list(_LAYOUT_CAUSES), details)
        if judged:
            return Finding(check, "pass", f"{check}: {name} received the model's output in its own layout "
                           f"({judged[0]['what']})." + "".join(f" Note: {n}." for n in notes), self._first_loss, None,
                           step, [], details)
        return Finding(check, "skip", f"{check}: not judged: " + "; ".join(notes) + ".", details=details)

    def _loss_layout(self, step: int) -> Finding:
        finding = self._layout or Finding(f"{self.name}.loss_layout", "skip", f"{self.name}.loss_layout: the first "
                                          "training step was not seen.")
        tap = self.__dict__.get("_tap")
        for rec in (tap.records if tap is not None else []):
            if rec["key"] != "broadcast" or "broadcast" in self._reported:
                continue
            self._reported.add("broadcast")
            tgt, inp = _parse_size(rec["groups"][0]), _parse_size(rec["groups"][1])
            grows = _broadcast_grows(inp, tgt)
            msg = (f"PyTorch warned during training: \"{rec['message'][:160]}\" ({rec['where']})")
            if grows:
                new = Finding(finding.check, "fail", f"{finding.check}: a loss broadcast its input {inp} against its "
                              f"target {tgt} to a larger shape: every prediction is compared with every target. "
                              f"{msg}.", finding.measured, finding.expected, step, list(_LAYOUT_CAUSES[2:]),
                              {**finding.details, "broadcast": [inp, tgt]})
                if finding.failed:
                    finding.message += "\n" + new.message
                else:
                    finding = new
            else:
                finding.message += f" Note: {msg}; the broadcast does not enlarge the loss (a scalar target?)."
        return finding

    # framework warnings and optimizer steps
    def _framework(self, trainer: "pl.Trainer", late: bool = False) -> Optional[Finding]:
        check = f"{self.name}.framework"
        tap = self.__dict__.get("_tap")
        records = [r for r in (tap.records if tap is not None else []) if r["key"] != "broadcast"]
        new = [r for r in records if r["key"] not in self._reported]
        for r in new:
            self._reported.add(r["key"])
        attempted = trainer.global_step - self._start_step
        real = self._steps[0]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        fails, warns, notes = [], [], []
        causes: list[str] = []
        automatic = trainer.lightning_module.automatic_optimization
        if not late and automatic and self._seen > 0 and self._no_loss == self._seen:
            fails.append(f"`training_step` returned no loss at every one of the first {self._seen} batch(es), so no "
                         "backward ran and no weight changed")
            causes.append(_FRAMEWORK_CAUSES["no_loss"])
            self._reported.add("no_loss")
        elif not late and automatic and self._no_loss:
            notes.append(f"training_step returned no loss at {self._no_loss} of the first {self._seen} batches "
                         "(skipped on purpose?)")
        if (real == 0 and attempted >= 8 and self._hooked and "no_step" not in self._reported
                and self._no_loss < self._seen):
            scale = float(scaler.get_scale()) if scaler is not None else None
            if scaler is not None and scale is not None and scale <= 256:
                fails.append(f"the GradScaler skipped all {attempted} optimizer steps (non-finite gradients at every "
                             f"step; the loss scale fell to {scale:g})")
                causes.append(_FRAMEWORK_CAUSES["skipped"])
                self._reported.add("no_step")
            elif late:
                fails.append(f"none of the {attempted} optimizer steps of the fit updated the weights (no step hook of "
                             "the optimizers ever ran)")
                causes.append(_FRAMEWORK_CAUSES["skipped" if scaler is not None else "no_step"])
                self._reported.add("no_step")
        skipped_some = scaler is not None and real < attempted
        for r in new:
            text = f"\"{r['message'][:160]}\" ({r['where']})"
            if r["key"] == "scheduler_order":
                if skipped_some:
                    notes.append(f"torch warned {text}; a GradScaler skipped {attempted - real} step(s), which causes "
                                 "this warning: harmless when only the first steps were skipped")
                else:
                    warns.append(f"the learning-rate scheduler was stepped before its optimizer: torch warned {text}")
                    causes.append(_FRAMEWORK_CAUSES["scheduler_order"])
            elif r["key"] == "no_optimizer":
                warns.append(f"the fit has no optimizer: Lightning warned {text}")
                causes.append(_FRAMEWORK_CAUSES["no_optimizer"])
            elif r["key"] == "no_loss" and not fails:
                notes.append(f"Lightning warned {text}")
        note = "".join(f" Note: {n}." for n in notes)
        details = {"optimizer_steps": attempted, "steps_applied": real, "batches_without_loss": self._no_loss,
                   "warnings": [r["message"][:200] for r in records]}
        if fails:
            return Finding(check, "fail", f"{check}: " + "; ".join(fails + warns) + ". HINT: return the loss from "
                           "training_step; check the loss for NaN/Inf; step schedulers only through "
                           f"`configure_optimizers`.{note}", float(real), float(attempted), trainer.global_step,
                           causes, details)
        if warns:
            return Finding(check, "warn", f"{check}: " + "; ".join(warns) + f".{note}", float(real), float(attempted),
                           trainer.global_step, causes, details)
        if late and not notes:
            return None
        return Finding(check, "pass", f"{check}: no framework warning that means a bug; {real} of {attempted} "
                       f"optimizer step(s) applied.{note}", float(real), float(attempted), trainer.global_step, [],
                       details)


# -- the warning tap --------------------------------------------------------------------------------------------------
class _WarningTap:
    """Wraps ``warnings.showwarning`` while installed: records the warnings that mean a bug, shows every warning as
    before (the previous ``showwarning`` is called with the same arguments)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.active = False
        self._prev: Optional[Callable[..., Any]] = None
        self._show: Optional[Callable[..., Any]] = None

    def install(self) -> None:
        prev = warnings.showwarning
        tap = self

        def showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                        line: Optional[str] = None) -> Any:
            if tap.active:
                tap._record(message, filename, lineno)
            return prev(message, category, filename, lineno, file, line)

        self._prev, self._show, self.active = prev, showwarning, True
        warnings.showwarning = showwarning

    def _record(self, message: Any, filename: str, lineno: int) -> None:
        text = str(message)
        for key, pattern in _KNOWN_WARNINGS:
            m = pattern.search(text)
            if m is not None and len(self.records) < 32:
                self.records.append({"key": key, "message": text, "groups": m.groups(),
                                     "where": f"{filename.rsplit('/', 1)[-1]}:{lineno}"})
                return

    def remove(self) -> None:
        """Restore the previous ``showwarning`` (when another wrapper came after this one, it stays and this one only
        passes warnings through)."""
        self.active = False
        if self._show is not None and warnings.showwarning is self._show:
            warnings.showwarning = self._prev  # type: ignore[assignment]


# -- pure functions ---------------------------------------------------------------------------------------------------
def _log_absent(n_total: float, n_class: Tensor, b: int) -> Tensor:
    """``log C(N - n, B) - log C(N, B)``: log-probability that a batch of ``B`` drawn without replacement from ``N``
    misses a class of ``n`` (``-inf`` when it cannot)."""
    rest = n_total - n_class
    out = (torch.lgamma(rest + 1) - torch.lgamma((rest - b).clamp_min(0) + 1) - math.lgamma(n_total + 1)
           + math.lgamma(n_total - b + 1))
    return torch.where(rest >= b, out, torch.full_like(out, -math.inf))


def expected_distinct_classes(class_counts: Any, batch_size: int) -> float:
    """Expected number of distinct classes in a batch of ``batch_size`` labels drawn at random without replacement
    from a dataset with ``class_counts``: ``sum_c 1 - C(N - n_c, B) / C(N, B)``.

    Args:
        class_counts: examples per class.
        batch_size: labels in the batch.

    Example::

        >>> round(expected_distinct_classes([50, 50], 2), 4)  # 2 * (1 - C(50, 2) / C(100, 2))
        1.5051
        >>> expected_distinct_classes([10, 10, 10], 30)
        3.0
    """
    n = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    n = n[n > 0]
    total = float(n.sum())
    b = int(min(batch_size, total))
    return float((1 - _log_absent(total, n, b).exp()).sum())


def shuffle_test(per_batch_counts: Tensor, class_counts: Tensor) -> dict[str, Any]:
    """Are the batches less mixed than a random order of the same labels could make them?

    ``per_batch_counts`` ``(K, C)`` holds the label counts of each of the first ``K`` batches, ``class_counts``
    ``(C,)`` those of the whole training set. For each batch of ``B`` labels, a random order (drawing without
    replacement) gives ``E[D] = sum_c 1 - a_c`` distinct classes, with ``a_c = C(N - n_c, B) / C(N, B)``,
    ``Var[D] = sum_{c, c'} (a_{cc'} - a_c a_{c'})`` (``a_{cc'}`` for both classes absent, ``a_{cc} = a_c``), and a
    single class with probability ``sum_c C(n_c, B) / C(N, B)``. The order is ``sorted`` when every batch holds one
    class and the product of those probabilities is below 1e-6, or when the mean of ``D`` is at most half its
    expectation (itself at least 2.5) and ``6`` standard deviations (of the mean, batches taken as independent)
    below it.

    Args:
        per_batch_counts: label counts per batch.
        class_counts: label counts of the training set.

    Example::

        >>> counts = torch.tensor([100.0, 100.0, 100.0, 100.0])
        >>> sorted_batches = torch.tensor([[32.0, 0, 0, 0]] * 3)
        >>> shuffle_test(sorted_batches, counts)["sorted"]
        True
        >>> shuffle_test(torch.tensor([[8.0, 9, 7, 8], [10, 6, 8, 8]]), counts)["sorted"]
        False
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64).reshape(-1)
    per_batch = torch.as_tensor(per_batch_counts, dtype=torch.float64).reshape(-1, counts.numel())
    per_batch = per_batch[per_batch.sum(1) > 0]
    present = counts > 0
    n = counts[present]
    total = float(n.sum())
    distinct, expected, variances, log_single, sizes = [], [], [], [], []
    for row in per_batch:
        b = int(min(row.sum().item(), total))
        sizes.append(b)
        distinct.append(int((row > 0).sum()))
        log_a = _log_absent(total, n, b)
        a = log_a.exp()
        expected.append(float((1 - a).sum()))
        # all B labels from one class: C(n_c, B) / C(N, B)
        log_one = (torch.lgamma(n + 1) - torch.lgamma((n - b).clamp_min(0) + 1) - math.lgamma(total + 1)
                   + math.lgamma(total - b + 1))
        log_one = torch.where(n >= b, log_one, torch.full_like(log_one, -math.inf))
        log_single.append(float(torch.logsumexp(log_one, 0)) if b > 0 else 0.0)
        if n.numel() <= 1000:
            pair = n.reshape(-1, 1) + n.reshape(1, -1)
            a2 = _log_absent(total, pair, b).exp()
            a2.fill_diagonal_(0.0)
            a2 += torch.diag(a)
            variances.append(float(a2.sum() - a.sum() ** 2))
        else:
            variances.append(float("nan"))
    k = len(distinct)
    mean_d = sum(distinct) / k if k else float("nan")
    mean_e = sum(expected) / k if k else float("nan")
    sd = math.sqrt(max(sum(variances), 0.0)) / k if k else float("nan")
    z = (mean_e - mean_d) / sd if k and sd > 0 and math.isfinite(sd) else (math.inf if k and mean_e > mean_d else 0.0)
    log_p = sum(log_single)
    all_single = k > 0 and all(d == 1 for d in distinct)
    p_all_single = math.exp(log_p) if log_p > -700 else 0.0
    few = k > 0 and mean_e >= 2.5 and mean_d <= 0.5 * mean_e and z >= _SHUFFLE_Z
    return {"sorted": bool((all_single and log_p < math.log(_SHUFFLE_P)) or few), "all_single": all_single,
            "distinct": distinct, "expected_distinct": [round(e, 4) for e in expected], "mean_distinct": mean_d,
            "mean_expected": mean_e, "p_all_single": p_all_single, "z": z, "batch_sizes": sizes, "n": total}


# -- helpers ----------------------------------------------------------------------------------------------------------
def _order_kind(trainer: Any) -> tuple[str, str]:
    """How the train loader orders the examples: ``sequential``, ``random``, ``custom`` or ``iterable``."""
    loader = _single_loader(trainer.train_dataloader, "train")
    if loader is None:
        return "custom", f"a {type(trainer.train_dataloader).__name__} of loaders"
    if isinstance(loader.dataset, IterableDataset):
        return "iterable", f"an iterable dataset ({type(loader.dataset).__name__}): its own order"
    bs = loader.batch_sampler
    if bs is not None and type(bs) is not BatchSampler:
        return "custom", f"a custom batch sampler ({type(bs).__name__})"
    sampler = loader.sampler
    if isinstance(sampler, DistributedSampler):
        return ("random", "DistributedSampler(shuffle=True)") if getattr(sampler, "shuffle", False) else (
            "sequential", "DistributedSampler(shuffle=False)")
    if isinstance(sampler, SequentialSampler):
        return "sequential", "SequentialSampler (shuffle=False)"
    if isinstance(sampler, (RandomSampler, WeightedRandomSampler, SubsetRandomSampler)):
        return "random", type(sampler).__name__
    return "custom", f"a custom sampler ({type(sampler).__name__})"


def _batch_size(inputs: Any, targets: Any) -> Optional[int]:
    for t in (targets, inputs):
        if isinstance(t, Tensor) and t.ndim > 0:
            return int(t.shape[0])
    found = [int(t.shape[0]) for t in _tensors(inputs) if t.ndim]
    return found[0] if found else None


def _tensors(obj: Any, limit: int = 64) -> list[Tensor]:
    """The tensors in ``obj`` (nested tuples, lists, dicts and dataclass-like mappings), in order, at most ``limit``."""
    out: list[Tensor] = []
    stack = [obj]
    while stack and len(out) < limit:
        o = stack.pop(0)
        if isinstance(o, Tensor):
            out.append(o)
        elif isinstance(o, (tuple, list)):
            stack.extend(o[:limit])
        elif isinstance(o, Mapping):
            stack.extend(list(o.values())[:limit])
    return out


def _fed_the_batch(call: Any, inputs: Any) -> Optional[bool]:
    """Whether a forward call received the batch's input tensor (itself, or equal values)."""
    firsts = _tensors(inputs, 1)
    if not firsts:
        return None
    x = firsts[0]
    given = _tensors(call)
    return any(t is x or (t.shape == x.shape and t.dtype == x.dtype and t.device == x.device and torch.equal(t, x))
               for t in given)


def _unregistered_leaves(loss: Tensor, pl_module: nn.Module, optimizers: list[Any], batch_ids: set[int],
                         batch_size: Optional[int], limit: int) -> dict[str, Any]:
    """Walk the autograd graph of ``loss`` (read-only, at most ``limit`` nodes) and name the leaves that require a
    gradient but are not parameters of ``pl_module``."""
    registered = {id(p) for p in pl_module.parameters()}
    in_optimizer = {id(p) for opt in optimizers for g in getattr(opt, "param_groups", []) for p in g.get("params", [])}
    root = getattr(loss, "grad_fn", None)
    seen: set[Any] = set()
    stack = [root] if root is not None else []
    leaves: dict[int, Tensor] = {}
    readers: dict[int, set[str]] = {}
    truncated = False
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        if len(seen) >= limit:
            truncated = True
            break
        seen.add(fn)
        for nxt, _ in getattr(fn, "next_functions", ()):
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if isinstance(var, Tensor):
                leaves[id(var)] = var
                readers.setdefault(id(var), set()).add(type(fn).__name__)
            elif nxt not in seen:
                stack.append(nxt)
    nodes = len(seen) + len(leaves)
    seen.clear()
    stray = {k: v for k, v in leaves.items() if k not in registered}
    names = _hidden_names(pl_module) if stray else {}
    hidden, held, notes = [], [], []
    inputs, checkpoint = 0, 0
    for key, t in stray.items():
        if key in batch_ids or (key not in names and _input_like(t, batch_size)):
            inputs += 1
            continue
        if key not in names and readers.get(key) and all("Checkpoint" in r for r in readers[key]):
            checkpoint += 1
            continue
        label = f"`{names[key]}`" if key in names else f"a {tuple(t.shape)} tensor created in forward"
        (held if key in in_optimizer else hidden).append(label)
    if inputs:
        notes.append(f"{inputs} input-like leaf tensor(s) (of the batch, or with the batch size as first dimension: "
                     "a gradient penalty, an adversarial perturbation) are not counted.")
    if checkpoint:
        notes.append(f"{checkpoint} tensor(s) read only by gradient checkpointing are not counted (the parameters "
                     "inside a reentrant checkpoint are not reachable by the walk).")
    leaves.clear()
    return {"nodes": nodes, "leaves": len(readers), "parameters": len(readers) - len(stray), "hidden": hidden,
            "in_optimizer": held, "notes": notes,
            "truncated": truncated}


def _input_like(t: Tensor, batch_size: Optional[int]) -> bool:
    """A leaf shaped by the batch: first dimension the batch size (an input made to require a gradient), or
    ``(layers, N, hidden)`` (a recurrent initial state)."""
    if batch_size is None or batch_size < 2 or t.ndim == 0:
        return False
    return t.shape[0] == batch_size or (t.ndim == 3 and t.shape[1] == batch_size)


def _hidden_names(root: nn.Module, limit: int = 10_000) -> dict[int, str]:
    """``id(tensor) -> path`` for the tensors that require a gradient and that the modules of ``root`` hold outside
    their registered parameters: modules or tensors in Python lists, tuples or dicts, plain tensor attributes, and
    buffers."""
    out: dict[int, str] = {}
    budget = [limit]

    def visit(path: str, value: Any, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            return
        if isinstance(value, nn.Module):
            for pn, p in value.named_parameters():
                out.setdefault(id(p), f"{path}.{pn}")
        elif isinstance(value, Tensor):
            if value.requires_grad and value.is_leaf:
                out.setdefault(id(value), path)
        elif depth < 2 and isinstance(value, (list, tuple)):
            for i, v in enumerate(value[:1000]):
                visit(f"{path}[{i}]", v, depth + 1)
        elif depth < 2 and isinstance(value, dict):
            for k, v in list(value.items())[:1000]:
                visit(f"{path}[{k!r}]", v, depth + 1)

    for mname, m in root.named_modules():
        prefix = f"{mname}." if mname else ""
        for attr, value in vars(m).items():
            if attr in ("_parameters", "_modules", "_buffers") or attr.startswith("__"):
                continue
            visit(f"{prefix}{attr}", value, 0)
        for bn, b in m.named_buffers(recurse=False):
            if b is not None and b.requires_grad:
                out.setdefault(id(b), f"{prefix}{bn} (a buffer)")
    return out


def _as_key(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32 if t.device.type == "mps" else torch.float64)


def _same_values(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` hold the same values (as multisets): one is a rearrangement of the other."""
    if a.numel() != b.numel():
        return False
    left = torch.sort(_as_key(a).reshape(-1)).values
    return torch.equal(left, torch.sort(_as_key(b).reshape(-1)).values.to(a.device))


def _same_rows(a: Tensor, b: Tensor) -> bool:
    """``a`` and ``b`` ``(M, K)`` hold the same rows (as multisets)."""
    if a.shape != b.shape:
        return False
    ua, ca = torch.unique(_as_key(a), dim=0, return_counts=True)
    ub, cb = torch.unique(_as_key(b).to(a.device), dim=0, return_counts=True)
    return ua.shape == ub.shape and torch.equal(ua, ub) and torch.equal(ca, cb)


def _layouts(out: Tensor, y: Tensor, classes: bool) -> list[tuple[str, Tensor, Tensor]]:
    """The layouts in which ``out`` pairs with the targets ``y``: ``(description, rows (M, K), targets (M,))``."""
    o, t = tuple(out.shape), tuple(y.shape)
    if not classes:
        return [("elementwise", out.reshape(-1, 1), y.reshape(-1))] if out.numel() == y.numel() else []
    if y.is_floating_point() or len(o) < 2:
        return []
    found = []
    if len(o) == len(t) + 1 and o[0] == t[0] and o[2:] == t[1:]:
        found.append((f"class dim 1 of {o}", out.movedim(1, -1).reshape(-1, o[1]), y.reshape(-1)))
    if o[:-1] == t:
        found.append((f"class dim last of {o}", out.reshape(-1, o[-1]), y.reshape(-1)))
    if len(o) == 3 and len(t) == 2 and o[:2] == (t[1], t[0]):
        found.append((f"time-major {o} against {t} targets", out.transpose(0, 1).reshape(-1, o[-1]), y.reshape(-1)))
    if len(o) == 2 and y.numel() == o[0]:
        found.append((f"{o} rows against flattened targets", out, y.reshape(-1)))
    return found


def _layout_verdict(inp: Tensor, tgt: Tensor, outputs: list[Tensor], y: Optional[Tensor], classes: bool,
                    pair: bool) -> dict[str, Any]:
    """Judge one call of the loss: ``status`` pass / fail / skip, ``what`` happened, ``reference`` inputs."""
    out = next((o for o in outputs if o.numel() == inp.numel() and o.numel() <= _MAX_LAYOUT_ELEMENTS
                and _same_values(inp, o)), None)
    if out is None:
        big = any(o.numel() > _MAX_LAYOUT_ELEMENTS for o in outputs)
        why = ("the model's output is too large to compare" if big else "the loss input is not a rearrangement of "
               "the model's output (transformed, masked or another head)")
        return {"status": "skip", "why": why, "what": why}
    if not classes and tgt.shape != inp.shape and tgt.numel() > 1:
        shape = _broadcast_shape(tuple(inp.shape), tuple(tgt.shape))
        if shape is not None and math.prod(shape) > max(inp.numel(), tgt.numel()):
            ref = None
            if y is not None and y.numel() == out.numel():
                ref = (out.reshape(-1), y.reshape(-1).to(out.dtype))
            return {"status": "fail", "what": f"input {tuple(inp.shape)} and target {tuple(tgt.shape)} broadcast to "
                    f"{shape}: every prediction is compared with every target", "reference": ref,
                    "layout": "prediction and target of the same shape"}
    if y is None:
        return {"status": "skip", "why": "the batch's targets are not a tensor", "what": "no targets"}
    cands = _layouts(out, y, classes)
    if not cands:
        why = f"no known layout pairs the output {tuple(out.shape)} with targets {tuple(y.shape)}"
        return {"status": "skip", "why": why, "what": why}
    if classes:
        rows = inp.reshape(1, -1) if inp.ndim == 1 else inp.movedim(1, -1).reshape(-1, inp.shape[1])
        tg = tgt.reshape(-1) if not tgt.is_floating_point() and tgt.numel() == rows.shape[0] else None
    else:
        rows = inp.reshape(-1, 1)
        tg = tgt.reshape(-1) if tgt.shape == inp.shape else None
    row_ok = [c for c in cands if _same_rows(c[1], rows)]
    first = cands[0]
    if not row_ok:
        return {"status": "fail", "what": f"the {tuple(rows.shape)} score rows given to the loss (from input "
                f"{tuple(inp.shape)}) are not the model's rows: each mixes the scores of different positions",
                "reference": (first[1], first[2]), "layout": first[0]}
    if pair and tg is not None and tg.numel() == y.numel() and _same_values(tg, y):
        for desc, r, t in row_ok:
            if _same_rows(torch.cat([_as_key(r), _as_key(t).reshape(-1, 1)], 1),
                          torch.cat([_as_key(rows), _as_key(tg).reshape(-1, 1)], 1)):
                return {"status": "pass", "what": desc}
        desc, r, t = row_ok[0]
        return {"status": "fail", "what": f"the rows are the model's, but paired with the targets in another order "
                f"(output {tuple(out.shape)}, targets {tuple(y.shape)} given as {tuple(tgt.shape)})",
                "reference": (r, t), "layout": desc}
    why = "the model's input was not the batch's" if not pair else "the loss's targets are not the batch's"
    return {"status": "pass", "what": f"{row_ok[0][0]}; rows only, the pairing with targets not compared: {why}"}


def _reference_loss(module: nn.Module, ref: Optional[tuple[Tensor, Tensor]]) -> Optional[float]:
    """The loss module on the model's own layout (its ``forward``, so no hook runs), averaged."""
    if ref is None:
        return None
    try:
        with torch.no_grad():
            rows, t = ref
            name = type(module).__name__
            if name in _CLASS_LOSSES:
                value = module.forward(rows, t.long())
            else:
                value = module.forward(rows.reshape(-1), t.reshape(-1).to(rows.dtype))
        return float(value.float().mean())
    except Exception:  # the reference is a courtesy: a loss with extra requirements gives none
        return None


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...]) -> Optional[tuple[int, ...]]:
    try:
        return tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        return None


def _parse_size(text: str) -> tuple[int, ...]:
    m = re.search(r"\[([0-9, ]*)\]", text)
    return tuple(int(v) for v in m.group(1).split(",") if v.strip()) if m else ()


def _broadcast_grows(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    shape = _broadcast_shape(a, b)
    return shape is not None and math.prod(shape) > max(math.prod(a), math.prod(b)) and math.prod(b) > 1


def _fmt(v: Optional[float]) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
