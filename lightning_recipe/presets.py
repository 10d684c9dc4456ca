"""Preset bundles: every check, failing (``strict``) or warning (``recommended``), held by ``Recipe``, one callback
that forwards Lightning's hooks to its checks.

A preset is one callback rather than fourteen: Lightning pays about 3 microseconds per callback for every hook it calls
(six hooks per training step), whether or not the callback implements it, so fourteen separate callbacks would cost
~0.2 ms per step in dispatch alone. ``Recipe`` calls, per hook, only the checks that implement it.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Callable, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_recipe._core.memory import release_freed_memory
from lightning_recipe._core.base import BATCH_HOOKS, RecipeCheck, _record_switch_off, null_hook, recipe_dir, restore_hooks
from lightning_recipe.exceptions import RecipeCheckError, RecipeConfigError, RecipeWarning
from lightning_recipe.findings import Finding
from lightning_recipe.checks.activations import ActivationCheck
from lightning_recipe.checks.batch_independence import BatchIndependenceCheck
from lightning_recipe.checks.data import DataCheck
from lightning_recipe.checks.generalization import GeneralizationCheck
from lightning_recipe.checks.head_bias import HeadBiasInit
from lightning_recipe.checks.initial_loss import InitialLossCheck
from lightning_recipe.checks.input_dependence import InputDependenceCheck
from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
from lightning_recipe.checks.optimization import OptimizationHealthCheck
from lightning_recipe.checks.output_range import OutputRangeCheck
from lightning_recipe.checks.parameter_updates import ParameterUpdateCheck
from lightning_recipe.checks.prediction_dynamics import PredictionDynamics
from lightning_recipe.checks.reproducibility import ReproducibilityCheck
from lightning_recipe.checks.wiring import WiringCheck

Preset = Literal["strict", "recommended"]
_ON_FAIL: dict[str, Literal["raise", "warn"]] = {"strict": "raise", "recommended": "warn"}
# the checks of the presets, in the order they run: the data is looked at before the model; the bias is set before the
# initial-loss check measures the first step and before the parameter-update check takes its snapshot; the per-step
# monitors come last; the wiring check reads the first steps (the first loss's graph and layout, the first batches'
# labels)
_CHECKS: tuple[type[RecipeCheck], ...] = (
    DataCheck, HeadBiasInit, ActivationCheck, OutputRangeCheck, InitialLossCheck, BatchIndependenceCheck,
    ParameterUpdateCheck,
    WiringCheck, LossDecreaseCheck, InputDependenceCheck, GeneralizationCheck, OptimizationHealthCheck,
    ReproducibilityCheck, PredictionDynamics,
)
Exclude = Sequence[Union[str, type]]


def _bundle(on_fail: Literal["raise", "warn"], overrides: dict[str, Any], exclude: Exclude = ()) -> list[Callback]:
    """The checks of the presets, in the order they run, less those in ``exclude`` (classes or class names)."""
    if isinstance(exclude, (str, type)):  # one check given alone
        exclude = [exclude]
    names = {c if isinstance(c, str) else getattr(c, "__name__", repr(c)) for c in exclude}
    unknown = sorted(names - {c.__name__ for c in _CHECKS})
    if unknown:
        raise RecipeConfigError(
            f"`exclude` names {unknown}, which are not checks of the presets. HINT: choose among "
            f"{[c.__name__ for c in _CHECKS]}."
        )
    kw = {k: v for k, v in overrides.items() if v is not None}
    return [cls(on_fail=on_fail, **kw) for cls in _CHECKS if cls.__name__ not in names]


_CALLBACK_ATTRS = frozenset(n for n in dir(Callback) if not n.startswith("__")) | {"state_key", "state_dict"}


class _PresetList(list):
    """What :func:`strict` and :func:`recommended` return: a plain list of callbacks that says, when it is nested as
    one item of another ``callbacks`` list, to unpack it. Lightning does not flatten nested lists; it looks up the
    callback attributes of each item (``state_dict`` at Trainer construction), and this list answers that lookup
    with a :class:`RecipeConfigError` instead of ``AttributeError: 'list' object has no attribute ...``."""

    def __getattr__(self, name: str) -> Any:
        if name in _CALLBACK_ATTRS:
            raise RecipeConfigError(
                "A lightning_recipe preset was given as one item of the `callbacks` list (e.g. "
                "`callbacks=[ModelCheckpoint(), lr.strict()]`), but it is itself a list of callbacks and Lightning does "
                "not flatten nested lists. HINT: unpack it: `callbacks=[ModelCheckpoint(), *lr.strict()]` (or pass "
                "`callbacks=lr.strict()` alone, or `lr.Recipe('strict')`, which is one callback)."
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def strict(
    *,
    split_batch: Optional[Callable[[Any], tuple[Any, Any]]] = None,
    forward: Optional[Callable[[Any, Any], Any]] = None,
    loss_fn: Optional[Callable[..., Any]] = None,
    head: Optional[Union[str, nn.Module]] = None,
    task: Optional[Literal["multiclass", "binary", "multilabel", "regression"]] = None,
    exclude: Exclude = (),
) -> list[Callback]:
    """Every check; a failed check stops the fit with :class:`RecipeCheckError`.

    Returns a list that holds one :class:`Recipe` with the checks inside (``[Recipe("strict")]``), so that it can be
    passed as ``callbacks=`` or joined with other callbacks (``[*strict(), ModelCheckpoint()]``); the checks are in
    ``strict()[0].callbacks``. The overrides are passed once to every check (see :class:`~lightning_recipe.RecipeCheck`).
    Lightning does not flatten nested lists: unpack the preset (``*strict()``) when other callbacks join it; the list
    nested as one item (``[ModelCheckpoint(), strict()]``) is refused at Trainer construction with a
    :class:`RecipeConfigError` that says so.

    Args:
        split_batch: ``callable(batch) -> (inputs, targets)``.
        forward: ``callable(pl_module, inputs) -> Tensor``.
        loss_fn: the loss, when the LightningModule holds no ``torch.nn`` loss module.
        head: the last layer, as an attribute path such as ``"classifier"`` or ``"net.3"`` (or the module).
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"`` when the loss does not say.
        exclude: checks to leave out, as classes or class names (e.g. ``[BatchIndependenceCheck]`` for a model whose
            examples interact on purpose).

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=strict(), logger=False)
        >>> [type(cb).__name__ for cb in strict()[0].callbacks][:4]
        ['DataCheck', 'HeadBiasInit', 'ActivationCheck', 'OutputRangeCheck']
    """
    return _PresetList([Recipe("strict", split_batch=split_batch, forward=forward, loss_fn=loss_fn, head=head,
                               task=task, exclude=exclude)])


def recommended(
    *,
    split_batch: Optional[Callable[[Any], tuple[Any, Any]]] = None,
    forward: Optional[Callable[[Any, Any], Any]] = None,
    loss_fn: Optional[Callable[..., Any]] = None,
    head: Optional[Union[str, nn.Module]] = None,
    task: Optional[Literal["multiclass", "binary", "multilabel", "regression"]] = None,
    exclude: Exclude = (),
) -> list[Callback]:
    """Every check; a failed check emits a :class:`RecipeWarning` and training goes on.

    Returns ``[Recipe("recommended")]``; the arguments are those of :func:`strict`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=recommended(exclude=["BatchIndependenceCheck"]), logger=False)
        >>> len(recommended(exclude=["BatchIndependenceCheck"])[0].callbacks)
        13
    """
    return _PresetList([Recipe("recommended", split_batch=split_batch, forward=forward, loss_fn=loss_fn, head=head,
                               task=task, exclude=exclude)])


class Recipe(Callback):
    """A preset as a single callback: holds the preset's checks and forwards every Lightning hook to them.

    What :func:`strict` and :func:`recommended` return (in a list), and what a configuration file names
    (``LightningCLI``)::

        trainer:
          callbacks:
            - class_path: lightning_recipe.Recipe
              init_args:
                preset: strict      # or: recommended
                head: classifier    # any override, given once
                exclude: [BatchIndependenceCheck]   # checks to leave out

    In Python code ``callbacks=lightning_recipe.strict()`` does the same. The children run in order, each hook
    reaching them as if they were separate callbacks in ``trainer.callbacks`` (``setup``/``teardown``, every
    ``on_*`` hook, ``on_exception``, checkpoint hooks; ``log``/``log_dict`` attached by the Trainer). Their state is
    saved under this callback's ``state_key`` with one entry per child. ``findings`` and ``figures`` are the
    children's, so :func:`~lightning_recipe.collect_findings` and the report see them; the report is written by
    this callback when it is the last recipe callback of the trainer.

    Per hook, only the children that implement it are called (found at ``setup`` for the per-batch hooks, at the
    hook's first call for the others; a hook a child gains later in the same stage is seen from the next stage on),
    so the bundle costs Lightning one callback dispatch per hook instead of one per check. A child hook set to
    ``None`` is skipped for the rest of the stage (the checks do so once their per-batch work is over), and a
    per-batch hook left with no child is set to ``None`` on the ``Recipe`` itself, which Lightning skips without a
    call. An unexpected error of a child in ``"warn"`` mode, on one process, in a hook of the fit (``on_*``; not
    ``setup`` or the checkpoint hooks) switches that child off for the rest of the stage (its ``teardown`` still
    runs) with a ``skip`` finding and a :class:`RecipeWarning`; in ``"raise"`` mode, or under several processes, it
    is raised. Its ``state_key`` is ``"Recipe"`` whatever the preset or ``exclude``
    (a checkpoint resumes with another preset); a checkpoint written with the checks as separate callbacks is read
    too. Two ``Recipe`` callbacks in one Trainer would share the key: hold all checks in one.

    Args:
        preset: ``"strict"`` (a failed check raises :class:`RecipeCheckError`) or ``"recommended"`` (it warns).
            Defaults to ``"strict"``; must be left out when ``callbacks`` is given.
        split_batch: ``callable(batch) -> (inputs, targets)`` (in YAML: a dotted import path).
        forward: ``callable(pl_module, inputs) -> Tensor`` (in YAML: a dotted import path).
        loss_fn: the loss, when the LightningModule holds no ``torch.nn`` loss module.
        head: the last layer, as an attribute path such as ``"classifier"`` or ``"net.3"`` (or the module).
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"`` when the loss does not say.
        exclude: checks of the preset to leave out, as classes or class names.
        callbacks: the callbacks to hold instead of a preset (e.g. recipe checks with non-default arguments).

    Raises:
        RecipeConfigError: If ``callbacks`` is given together with ``preset``, ``exclude`` or an override, or
            ``exclude`` names a class that is not a check of the presets.

    Example::

        >>> import lightning as L
        >>> recipe = Recipe(preset="recommended", head="net.2")
        >>> [type(cb).__name__ for cb in recipe.callbacks][:4]
        ['DataCheck', 'HeadBiasInit', 'ActivationCheck', 'OutputRangeCheck']
        >>> trainer = L.Trainer(callbacks=[recipe], logger=False)
    """

    _is_recipe_callback = True

    def __init__(
        self,
        preset: Optional[Preset] = None,
        *,
        split_batch: Optional[Callable[[Any], tuple[Any, Any]]] = None,
        forward: Optional[Callable[[Any, Any], Any]] = None,
        loss_fn: Optional[Callable[..., Any]] = None,
        head: Optional[Union[str, nn.Module]] = None,
        task: Optional[Literal["multiclass", "binary", "multilabel", "regression"]] = None,
        exclude: Exclude = (),
        callbacks: Optional[list[Callback]] = None,
    ) -> None:
        overrides = dict(split_batch=split_batch, forward=forward, loss_fn=loss_fn, head=head, task=task)
        if callbacks is not None:
            given = [k for k, v in overrides.items() if v is not None] + (["preset"] if preset is not None else [])
            given += ["exclude"] if exclude else []
            if given:
                raise RecipeConfigError(
                    f"Recipe: `callbacks` was given together with {', '.join(f'`{k}`' for k in given)}. HINT: pass the "
                    "overrides to each callback in `callbacks`, or drop `callbacks` to use a preset."
                )
            bad = [type(cb).__name__ for cb in callbacks if not isinstance(cb, Callback)]
            if bad:
                raise RecipeConfigError(f"Recipe: `callbacks` must hold Lightning callbacks, got {bad}.")
            self.preset: Optional[str] = None
            self.callbacks: list[Callback] = list(callbacks)
        else:
            preset = preset or "strict"
            if preset not in _ON_FAIL:
                raise RecipeConfigError(
                    f"Recipe: `preset` must be one of {sorted(_ON_FAIL)}, got {preset!r}. HINT: `strict` stops the fit "
                    "on a failed check, `recommended` warns."
                )
            self.preset = preset
            self.callbacks = _bundle(_ON_FAIL[preset], overrides, exclude)
        self._dir: Optional[str] = None
        self._plan: dict[str, list[Callback]] = {}
        self._broken: set[int] = set()
        self._handled = False  # the exception path ran (once per fit)
        self._token = uuid.uuid4().hex  # shared with the copies in spawned workers (see `findings._send_to_parent`)

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def _saved(self) -> bool:
        """Whether the children saved their results on the way out of a failed fit (read by the report writer)."""
        return any(getattr(cb, "_saved", False) for cb in self.callbacks)

    @property
    def findings(self) -> list[Finding]:
        """The findings of the children, in order."""
        return [f for cb in self.callbacks for f in (getattr(cb, "findings", None) or [])]

    @property
    def figures(self) -> list[str]:
        """The figure files of the children."""
        return [p for cb in self.callbacks for p in (getattr(cb, "figures", None) or [])]

    def __setattr__(self, key: str, value: Any) -> None:
        # the Trainer attaches the LightningModule's `log`/`log_dict` to every callback: the children need them too
        super().__setattr__(key, value)
        if key in ("log", "log_dict"):
            for cb in self.__dict__.get("callbacks", []):
                setattr(cb, key, value)

    # -- hooks with more to do than forwarding --------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._plan = {}  # the children may have changed since the last stage
        self._handled = False
        self._broken = set()  # ids of the children switched off by an internal error this stage
        for cb in self.callbacks:
            cb.setup(trainer, pl_module, stage=stage)
        restore_hooks(self)  # the hooks left last stage are back
        for hook in BATCH_HOOKS:  # a per-batch hook no child implements is None: Lightning skips it
            if not self._planned(hook):
                null_hook(self, hook, replace=False)  # an instance attribute set by someone else is left alone
        if stage == "fit":
            self._dir = recipe_dir(trainer)  # on every rank: trainer.log_dir broadcasts

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        _forward_train_start(self, trainer, pl_module)
        release_freed_memory()  # the scan's and probes' temporaries do not stay under the training's peak

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        for cb in self.callbacks:
            if id(cb) not in self._broken:
                try:
                    cb.on_fit_end(trainer, pl_module)
                except Exception as err:
                    self._contain(trainer, cb, "on_fit_end", err)
        self._maybe_write_report(trainer)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # like Lightning's own loop over callbacks: every child gets the hook, nothing raised from here. A failed
        # check in strict mode runs this before raising (see RecipeCheck._conclude); Lightning then calls it again
        if self._handled:
            return
        self._handled = True
        for cb in self.callbacks:
            try:
                cb.on_exception(trainer, pl_module, exception)
            except Exception as err:  # pragma: no cover - children already guard themselves
                rank_zero_warn(f"Recipe: {type(cb).__name__}.on_exception failed: {err}", category=RecipeWarning)
        self._maybe_write_report(trainer)

    def _maybe_write_report(self, trainer: "pl.Trainer") -> None:
        # the children are not in `trainer.callbacks`, so none of them is "the last recipe callback": this is,
        # when no other recipe callback comes after it. Same writer as every check's; it reads `_dir`, `_saved`
        # and `name`, which this class provides (tests/test_presets.py runs it on both paths).
        RecipeCheck._maybe_write_report(self, trainer)  # type: ignore[arg-type]

    @override
    def state_dict(self) -> dict[str, Any]:
        states = {key: cb.state_dict() for key, cb in self._keyed()}
        return {"children": {k: v for k, v in states.items() if v}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        children = state_dict.get("children", {})
        for key, cb in self._keyed():
            if children.get(key):
                cb.load_state_dict(children[key])

    @override
    def on_load_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        for cb in self.callbacks:
            cb.on_load_checkpoint(trainer, pl_module, checkpoint)
        saved = checkpoint.get("callbacks", {})
        if self.state_key not in saved:  # written with the checks as separate callbacks: each under its own key
            for key, cb in self._keyed():
                if saved.get(key):
                    cb.load_state_dict(saved[key])

    def _planned(self, hook: str) -> list[Callback]:
        """The children that implement ``hook`` (a child keeping Callback's no-op is not called)."""
        plan = self._plan.get(hook)
        if plan is None:
            plan = self._plan[hook] = [cb for cb in self.callbacks if _overrides(cb, hook)
                                       and (id(cb) not in self._broken or hook == "teardown")]
        return plan

    def _contain(self, trainer: "pl.Trainer", cb: Callback, hook: str, err: Exception) -> None:
        """An error of a check in ``"warn"`` mode, on a single process, in any hook of the fit (the fit-start probes
        included) switches that check off for the rest of the stage with a ``skip`` finding and a warning: training
        and the other checks go on. A :class:`RecipeConfigError` (a probe forward that gives no tensor, a batch that
        does not split) is reported as the configuration problem it is, with the argument to set, once per distinct
        message per fit; any other error as an internal error. Anything else is raised again: a check's own verdict
        (``RecipeCheckError``), a check in ``"raise"`` mode, another callback, and any error under several processes
        (a check switched off on one rank would leave the others waiting in its next collective)."""
        if (isinstance(err, RecipeCheckError) or getattr(cb, "on_fail", None) != "warn"
                or not isinstance(getattr(cb, "findings", None), list) or trainer.world_size > 1):
            raise err
        self._broken.add(id(cb))
        for h in list(self._plan):
            if cb in self._plan[h] and h != "teardown":  # teardown still reaches it: it releases what it holds
                self._drop(h, cb)
        _record_switch_off(trainer, cb, hook, err)

    def _drop(self, hook: str, cb: Callback) -> None:
        """``cb`` set ``hook`` to None: leave it out for the rest of the stage, and the hook too once no child is left
        (for a per-batch hook)."""
        plan = self._plan[hook] = [c for c in self._plan[hook] if c is not cb]
        if not plan and hook in BATCH_HOOKS:
            null_hook(self, hook, replace=False)

    def _keyed(self) -> list[tuple[str, Callback]]:
        """Each child with a key unique within this callback (its ``state_key``, numbered when repeated)."""
        out: list[tuple[str, Callback]] = []
        seen: dict[str, int] = {}
        for cb in self.callbacks:
            key = cb.state_key
            n = seen.get(key, 0)
            seen[key] = n + 1
            out.append((key if n == 0 else f"{key}#{n}", cb))
        return out


def _forwarder(hook: str) -> Callable[..., None]:
    def forward_hook(
        self: Recipe, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any, **kwargs: Any
    ) -> None:
        for cb in self._planned(hook):
            fn = getattr(cb, hook)  # looked up at each call: a child may replace its hook
            if callable(fn):
                try:
                    fn(trainer, pl_module, *args, **kwargs)
                except Exception as err:
                    self._contain(trainer, cb, hook, err)  # raises it again unless the check is switched off
            elif fn is None:  # as Lightning does, a hook set to None is skipped: for the rest of the stage
                self._drop(hook, cb)

    forward_hook.__name__ = forward_hook.__qualname__ = hook
    forward_hook.__doc__ = f"Forward ``{hook}`` to every child callback, in order."
    return forward_hook


def _overrides(cb: Callback, hook: str) -> bool:
    """Whether ``cb`` implements ``hook`` (its class, or the instance, replaces ``Callback``'s no-op)."""
    if hook in vars(cb):
        return True
    return getattr(type(cb), hook, None) is not getattr(Callback, hook)


def _hooks() -> list[str]:
    """Every hook of Lightning's ``Callback`` that takes ``(trainer, pl_module, ...)``."""
    return sorted(
        name
        for name, value in vars(Callback).items()
        if callable(value) and (name.startswith("on_") or name in ("setup", "teardown"))
    )


_forward_train_start = _forwarder("on_train_start")
for _hook in _hooks():
    if _hook not in vars(Recipe):
        setattr(Recipe, _hook, _forwarder(_hook))
del _hook
