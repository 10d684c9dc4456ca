"""The contract every recipe callback keeps: ``on_fail``, ``findings``, reduce-then-act, the report at the end."""

from __future__ import annotations

import functools
import os
import traceback
import uuid
import weakref
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_recipe._core.context import FitContext, get_context, new_fit
from lightning_recipe._core.conventions import _Settings, _validate_settings
from lightning_recipe._core.labels import EMPTY_LOADER, forget_batch, remember_batch, train_is_iterable
from lightning_recipe._core.memory import paused_gc
from lightning_recipe.exceptions import RecipeCheckError, RecipeConfigError, RecipeSkipNotice, RecipeWarning
from lightning_recipe.findings import Finding, _send_to_parent, collect_findings
from lightning_recipe.report.writers import _write_reports
from lightning_recipe._core.warn import new_fit as _new_warn_fit
from lightning_recipe._core.warn import warn_once
from lightning_recipe.report.live import new_fit as _new_live_fit
from lightning_recipe.report.live import publish, tick

OnFail = Literal["raise", "warn"]
# the hooks Lightning calls on every batch; a check whose work in one of them is over sets it to None for the rest of
# the stage (`RecipeCheck._retire`): Lightning's dispatch skips a hook that is None (no profiler context, no call)
BATCH_HOOKS = (
    "on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
    "on_before_optimizer_step", "on_before_zero_grad", "on_validation_batch_start", "on_validation_batch_end",
)


def null_hook(obj: Callback, hook: str, replace: bool = True) -> None:
    """Set the per-batch ``hook`` of ``obj`` to None for the rest of the stage (Lightning skips a None hook);
    :func:`restore_hooks` gives it back. With ``replace=False`` an instance attribute already there is left alone."""
    assert hook in BATCH_HOOKS, hook
    if not replace and hook in obj.__dict__:
        return
    obj.__dict__[hook] = None
    obj.__dict__.setdefault("_retired", set()).add(hook)


def restore_hooks(obj: Callback) -> None:
    """Undo :func:`null_hook` (at ``setup``: each stage starts with every hook)."""
    for hook in obj.__dict__.pop("_retired", ()):
        if obj.__dict__.get(hook, 0) is None:
            del obj.__dict__[hook]


# the hooks of a fit in which an error of a check in "warn" mode switches the check off instead of stopping the fit
# (`RecipeCheck.__init_subclass__` guards them); the checkpoint hooks and `on_exception` are left as they are
_GUARDED = frozenset(
    name for name, value in vars(Callback).items()
    if callable(value) and name.startswith("on_") and name not in ("on_exception", "on_save_checkpoint",
                                                                    "on_load_checkpoint")
)


def _record_switch_off(trainer: "pl.Trainer", cb: Callback, hook: str, err: Exception) -> None:
    """The ``skip`` finding and the warning (once per distinct message per fit) of a check switched off by ``err``:
    a :class:`RecipeConfigError` as the configuration problem it is, anything else as an internal error."""
    name = type(cb).__name__
    if isinstance(err, RecipeConfigError):  # e.g. a probe forward that gives no tensor: the user's to fix
        reason, prefix = str(err), f"{name}: "
        reason = reason[len(prefix):] if reason.startswith(prefix) else reason
        config_error = getattr(cb, "_config_error", None)
        if callable(config_error):
            config_error(reason)  # a skip finding; the warning once per distinct reason per fit
        else:  # pragma: no cover - a check of another kind
            cb.findings.append(Finding(name, "skip", f"{name}: {reason}"))
            warn_once(trainer, f"{name}: {reason}", key=f"config: {reason}", category=RecipeSkipNotice)
        return
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ is not None else None
    where = f" at {os.path.basename(frame.filename)}:{frame.lineno}" if frame is not None else ""
    message = (f"{name}: switched off for the rest of the fit by an internal error in `{hook}`{where}: "
               f"{type(err).__name__}: {err}. Training and the other checks go on. HINT: this is a bug of the "
               f"check or a convention it misread; run the check with on_fail='raise' for the traceback, or pass "
               "the override its message names.")
    cb.findings.append(Finding(name, "skip", message, details={"error": f"{type(err).__name__}: {err}", "hook": hook}))
    warn_once(trainer, message)


def _guard(fn: Callable[..., Any], hook: str) -> Callable[..., Any]:
    """``fn`` (a hook of a check) such that, in ``"warn"`` mode on a single process, an error switches the check off
    for the rest of the stage (a ``skip`` finding, a warning) instead of stopping the fit; a check's own verdict
    (``RecipeCheckError``), ``"raise"`` mode and several processes raise as before."""

    @functools.wraps(fn)
    def guarded(self: "RecipeCheck", trainer: "pl.Trainer", *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_switched_off"):
            if hook == "on_fit_end":  # the report is still written when this check is the one that writes it
                self._maybe_write_report(trainer)
            return None
        try:
            return fn(self, trainer, *args, **kwargs)
        except Exception as err:
            if (isinstance(err, RecipeCheckError) or self.__dict__.get("on_fail") != "warn"
                    or not isinstance(self.__dict__.get("findings"), list) or trainer.world_size > 1):
                raise
            self._switched_off = True
            for batch_hook in BATCH_HOOKS:  # Lightning (or a Recipe) stops calling them
                if getattr(type(self), batch_hook, None) is not getattr(Callback, batch_hook):
                    null_hook(self, batch_hook)
            _record_switch_off(trainer, self, hook, err)
            if hook == "on_fit_end":
                self._maybe_write_report(trainer)
            return None

    guarded._recipe_guarded = True  # type: ignore[attr-defined]
    return guarded


def _first_failure(mine: Optional[Finding]) -> Optional[tuple[int, Finding]]:
    """The failing finding of the lowest rank that has one, with that rank: a collective that every rank calls once
    some rank failed (``reduce_boolean_decision`` says so on all of them); ``None`` without ``torch.distributed``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    got: list[Optional[Finding]] = [None] * dist.get_world_size()
    dist.all_gather_object(got, mine)
    return next(((rank, f) for rank, f in enumerate(got) if f is not None), None)


def recipe_dir(trainer: "pl.Trainer") -> str:
    """``<log_dir>/recipe``, absolute for a local folder (a relative log folder such as ``TensorBoardLogger("logs")``
    gives figure paths that the report finds from any working directory); ``recipe_1``, ``recipe_2``, ... when an
    earlier fit's report is there (the report line says so). Call it on every rank at setup (``trainer.log_dir``
    broadcasts under DDP); only global rank zero writes there.

    When the first logger is an ``MLFlowLogger`` or a ``WandbLogger`` (whose ``log_dir`` is their ``save_dir``, shared by
    every run), the folder is the run's own, where Lightning's ``ModelCheckpoint`` puts the run's ``checkpoints``:
    ``<save_dir>/<experiment id>/<run id>/recipe`` (MLflow; ``default_root_dir`` when the tracking store is not a local
    folder, e.g. ``sqlite:///``), ``<save_dir>/<project>/<run id>/recipe`` (W&B). Rank zero's names are broadcast."""
    base = str(trainer.log_dir or trainer.default_root_dir)
    run = _run_folder(trainer)
    if run is not None:
        base = run
    root = os.path.join(base if "://" in base else os.path.abspath(base), "recipe")
    return unused_recipe_dir(root)


def _run_folder(trainer: "pl.Trainer") -> Optional[str]:
    """``<save_dir>/<name>/<version>`` of an MLflow or W&B first logger (as ``ModelCheckpoint`` resolves its folder),
    broadcast from rank zero; ``None`` for other loggers. A collective under DDP: call it on every rank."""
    if not trainer.loggers or type(trainer.loggers[0]).__name__ not in ("MLFlowLogger", "WandbLogger"):
        return None
    logger = trainer.loggers[0]
    folder: Optional[str] = None
    try:
        if trainer.is_global_zero:
            save_dir = logger.save_dir or trainer.default_root_dir
            version = logger.version
            version = version if isinstance(version, str) else f"version_{version}"
            folder = os.path.join(str(save_dir), str(logger.name), version)
    except Exception:  # a logger that cannot name its run: the shared folder, as before
        folder = None
    return trainer.strategy.broadcast(folder)


def unused_recipe_dir(root: str) -> str:
    """``root``, or ``root_1``, ``root_2``, ... : the first that holds no report of an earlier fit (a second fit into
    the same log folder keeps the first one's report). A remote folder (``s3://...``) is used as it is."""
    if "://" in root:
        return root
    path, n = root, 0
    while os.path.exists(os.path.join(path, "report.json")):
        n += 1
        path = f"{root}_{n}"
    return path


def _context_notes(trainer: "pl.Trainer", settings: _Settings) -> list[str]:
    """Notes of the fit's shared context (guesses made), if it was computed; never computes it."""
    from lightning_recipe._core.context import _CACHE

    ctx = _CACHE.get(trainer, {}).get(settings.key())
    return list(ctx.spec.notes) if ctx is not None else []


class RecipeCheck(Callback):
    """Base class of the recipe callbacks.

    Args:
        on_fail: ``"raise"`` stops the fit with :class:`RecipeCheckError` (on every rank), ``"warn"`` emits a
            :class:`RecipeWarning` and training goes on. Configuration errors (a head that cannot be found, a batch
            that cannot be split) raise :class:`RecipeConfigError` at fit start in ``"raise"`` mode and are reported
            as a ``skip`` finding with a warning (once per distinct problem per fit) in ``"warn"`` mode. In ``"warn"``
            mode on a single process, an error of the check itself in any hook of the fit (``on_*``, the fit-start
            probes included) switches the check off for the rest of the stage with a ``skip`` finding and a warning:
            a ``"warn"`` check never stops a fit.
        split_batch: ``callable(batch) -> (inputs, targets)`` for batches that are not ``(x, y, ...)`` or a dict
            with conventional keys.
        forward: ``callable(pl_module, inputs) -> Tensor`` when ``pl_module(inputs)`` does not give the predictions.
        loss_fn: the loss, when the LightningModule holds no ``torch.nn`` loss module.
        head: the last layer (attribute path such as ``"classifier"`` or ``"net.3"``, or the module) when it cannot be
            detected.
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"`` when the loss does not say.

    A per-batch hook whose work is over for the stage (the first-step checks after their steps) is set to ``None``
    on the instance (:meth:`_retire`), so Lightning, or the :class:`~lightning_recipe.Recipe`, stops calling it;
    ``setup`` gives it back at the next stage.

    A check instance may serve several fits. A fit of another LightningModule object starts it afresh (its
    constructor runs again with the same arguments, so attributes changed after construction are not kept; then a
    checkpoint given as ``ckpt_path`` restores its state); a
    second fit of the same module object continues (nothing that ran once runs again: the head bias is not reset), and
    so does a copy made by pickling (``ddp_spawn``), which cannot tell which model it saw.

    Training data of an ``IterableDataset`` is never read from a second place: a one-shot stream would lose the batches
    drawn, a stream with its own random state would give training other batches. The work of ``on_train_start`` then
    waits for the first ``on_train_batch_start`` (before the first forward, ``global_step == 0``) and reads the batch
    training itself fetched, already on the device; label statistics come from that batch.
    """

    _is_recipe_callback = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # an iterable dataset is read by training only: `on_train_start` waits for the first batch training fetches
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "on_train_start" in own and not hasattr(own["on_train_start"], "_deferrable"):
            cls.on_train_start = _deferrable_start(own["on_train_start"])  # type: ignore[method-assign]
        if "on_train_batch_start" in own and not hasattr(own["on_train_batch_start"], "_deferrable"):
            cls.on_train_batch_start = _runs_deferred_start(own["on_train_batch_start"])  # type: ignore[method-assign]
        for hook in _GUARDED:  # a check in "warn" mode never stops a fit over its own errors (see `_guard`)
            fn = cls.__dict__.get(hook)
            if callable(fn) and not getattr(fn, "_recipe_guarded", False):
                setattr(cls, hook, _guard(fn, hook))

    def __new__(cls, *args: Any, **kwargs: Any) -> "RecipeCheck":
        obj = super().__new__(cls)
        obj._init_call = (args, kwargs)  # to start afresh for the fit of another model (see `setup`)
        obj._token = uuid.uuid4().hex  # shared with the copies in spawned workers (see `findings._send_to_parent`)
        return obj

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks: leave out the weak reference to the last model and the last fit's shared
        # context (it holds weak references too; each fit computes its own)
        return {k: v for k, v in self.__dict__.items() if k not in ("_model", "_ctx")}

    def __init__(
        self,
        on_fail: OnFail = "raise",
        *,
        split_batch: Optional[Callable[[Any], tuple[Any, Any]]] = None,
        forward: Optional[Callable[[Any, Any], Any]] = None,
        loss_fn: Optional[Callable[..., Any]] = None,
        head: Optional[Union[str, nn.Module]] = None,
        task: Optional[Literal["multiclass", "binary", "multilabel", "regression"]] = None,
    ) -> None:
        if on_fail not in ("raise", "warn"):
            raise RecipeConfigError(f"{type(self).__name__}: `on_fail` must be 'raise' or 'warn', got {on_fail!r}.")
        self.on_fail = on_fail
        self._settings = _Settings(split_batch, forward, loss_fn, head, task)
        _validate_settings(self._settings)
        self.findings: list[Finding] = []
        self.figures: list[str] = []
        self._dir: Optional[str] = None
        self._disabled = False
        self._saved = False  # results saved on the way out of a failed fit

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- shared facts -------------------------------------------------------------------------------------------
    def _context(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Optional[FitContext]:
        """The fit's shared context; a configuration error raises (``"raise"``) or skips this check (``"warn"``)."""
        try:
            return get_context(trainer, pl_module, self._settings)
        except RecipeConfigError as err:
            self._config_error(str(err))
            return None

    def _config_error(self, message: str) -> None:
        """A configuration problem: raise (``"raise"``), or skip this check with a ``skip`` finding (``"warn"``).

        In ``"warn"`` mode the user reads each distinct problem once per fit, as a :class:`RecipeSkipNotice` (not a
        :class:`RecipeWarning`: conventions that do not fit valid code say nothing about the training); the checks
        that skip for the same reason after the first record their finding without another notice."""
        reason, message = message, f"{self.name}: {message}"
        if self.on_fail == "raise":
            raise RecipeConfigError(message)
        self._disabled = True
        self.findings.append(Finding(self.name, "skip", message))
        warn_once(self._trainer(), message, key=f"config: {reason}", category=RecipeSkipNotice)

    def _trainer(self) -> Optional["pl.Trainer"]:
        """The trainer of the model this check last saw, if it is still attached."""
        ref = self.__dict__.get("_model")
        model = ref() if ref is not None else None
        return getattr(model, "_trainer", None) if model is not None else None

    def _retire(self, *hooks: str) -> None:
        """Stop receiving the per-batch ``hooks`` for the rest of this stage (``setup`` restores them)."""
        for hook in hooks:
            null_hook(self, hook)

    # -- results --------------------------------------------------------------------------------------------------
    def _conclude(self, trainer: "pl.Trainer", finding: Optional[Finding]) -> None:
        """Record ``finding`` and act on a failure the same way on every rank.

        Only a ``fail`` acts (raises or warns, per ``on_fail``); a ``warn`` is emitted by the check that made it, and
        a ``note``, ``pass`` or ``skip`` is only recorded: a note never becomes a warning or an exception.
        Must be reached on every rank at the same point (it runs a collective under DDP).
        """
        local_fail = finding is not None and finding.status == "fail"
        if local_fail and finding is not None:
            for note in _context_notes(trainer, self._settings):
                if note not in finding.message:  # e.g. a loss guessed from the targets: say so where it matters
                    finding.message += f"\n  note: {note}"
        any_fail = bool(trainer.strategy.reduce_boolean_decision(local_fail, all=False))
        if finding is not None:
            self.findings.append(finding)
        if not any_fail:
            return
        message = finding.message if local_fail and finding is not None else f"{self.name} failed on another rank."
        elsewhere = _first_failure(finding if local_fail else None) if trainer.world_size > 1 else None
        if not local_fail and elsewhere is not None:  # rank zero's report says why the fit stopped
            rank, other = elsewhere
            other.message = f"(on rank {rank}) {other.message}"
            self.findings.append(other)
            message = other.message
        if finding is not None and finding.causes and local_fail:
            message += "\nLikely causes:\n" + "\n".join(f"  - {c}" for c in finding.causes)
        if self.on_fail == "raise":
            # save now: `ddp_spawn` workers never reach `on_exception` (Lightning calls it in the parent process)
            for cb in [cb for cb in trainer.callbacks if getattr(cb, "_is_recipe_callback", False)]:
                cb.on_exception(trainer, trainer.lightning_module, RecipeCheckError(message))
            raise RecipeCheckError(message)
        rank_zero_warn(message, category=RecipeWarning)

    # -- hooks ----------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        restore_hooks(self)
        self.__dict__.pop("_switched_off", None)  # each stage starts with the check on
        if stage == "fit":
            last = self.__dict__.get("_model")
            if last is not None and last() is not pl_module:  # used before, for another model: start afresh
                args, kwargs = self._init_call
                type(self).__init__(self, *args, **kwargs)
            self._model = weakref.ref(pl_module)
            new_fit(trainer)
            forget_batch(trainer)
            self.__dict__.pop("_start_pending", None)
            _new_warn_fit(trainer)
            _new_live_fit(trainer)
            # each fit reports its own results (a resumed fit with the same instances reports nothing twice)
            self.findings, self.figures, self._disabled, self._saved = [], [], False, False
            self._dir = recipe_dir(trainer)  # on every rank: trainer.log_dir broadcasts

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        # reached only by a check without its own `on_train_batch_start`: the deferred `on_train_start`, then retired
        _start_if_pending(self, trainer, pl_module, batch)
        self._retire("on_train_batch_start")

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.num_training_batches == 0 and trainer.limit_train_batches != 0 and not self.findings:
            # Lightning skips training (and `on_train_start`) when the train dataloader has no batch
            self._config_error(EMPTY_LOADER)
        elif self.__dict__.get("_start_pending") and trainer.limit_train_batches != 0:
            # an iterable dataset that yielded no batch: the start that waited for one runs now, finding it empty
            _start_if_pending(self, trainer, pl_module, None)
        with paused_gc():  # the figures: see `paused_gc`
            self._finish(trainer)
            self._maybe_write_report(trainer)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        # no collectives and no raising here: save what was gathered so far (once)
        if self._saved:
            return
        self._saved = True
        with paused_gc():
            try:
                self._finish(trainer, failed=True)
            except Exception as err:  # pragma: no cover - best effort on the way out
                rank_zero_warn(f"{self.name} could not save its results: {err}", category=RecipeWarning)
            self._maybe_write_report(trainer)

    def _finish(self, trainer: "pl.Trainer", failed: bool = False) -> None:
        """Called once at fit end or on an exception: draw the figures, add the last findings. No collectives."""

    def _publish(self, trainer: "pl.Trainer", scalars: dict[str, Optional[float]]) -> None:
        """Live scalars at a periodic read: host floats already read (no sync), to every logger at the global step,
        with the fit's ``recipe/fail`` and ``recipe/warn`` counts (see :mod:`lightning_recipe.report.live`)."""
        publish(trainer, scalars)

    def _live_figure(self, trainer: "pl.Trainer", tag: str, draw: Callable[["pl.Trainer"], Any],
                     every_n_reads: Optional[int] = None) -> None:
        """A periodic read of figure ``tag``: ``draw`` (the method that draws it at the end too) runs every few reads
        within the fit's time budget for live figures (see :mod:`lightning_recipe.report.live`). Rank zero only."""
        if self._dir is None:
            return
        tick(trainer, tag, draw, every_n_reads)

    def _maybe_write_report(self, trainer: "pl.Trainer") -> None:
        """The last recipe callback of the trainer writes the report of all of them (rank zero only)."""
        ours = [cb for cb in trainer.callbacks if getattr(cb, "_is_recipe_callback", False)]
        if not ours or ours[-1] is not self or not trainer.is_global_zero or self._dir is None:
            return
        figures = [p for cb in ours for p in getattr(cb, "figures", [])]
        meta = {"global_step": trainer.global_step, "epoch": trainer.current_epoch,
                "state": "stopped by an error" if self._saved else "finished",
                "seed": os.environ.get("PL_GLOBAL_SEED", "not set")}
        try:
            _send_to_parent(trainer, getattr(self, "_token", None))  # spawned workers: the parent's callbacks get them
            paths = _write_reports(self._dir, collect_findings(trainer), figures, meta)
        except OSError as err:  # a report we cannot write is a warning (once per folder), never a failure
            from lightning_recipe.report.loggers import unwritable

            unwritable(trainer, self._dir, err)
            return
        from lightning_recipe.report.loggers import log_file, log_text

        with open(paths["md"]) as fh:
            log_text(trainer, "recipe/report", fh.read())
        log_file(trainer, "recipe/report_html", paths["html"])
        log_file(trainer, "recipe/report_json", paths["json"])
        # the last point of the recipe/fail and recipe/warn series, on disk; the tags follow the counts (`publish`)
        publish(trainer, {}, flush=True)
        earlier = ""
        if os.path.basename(self._dir) != "recipe":  # recipe_1, ...: the folder held an earlier fit's report
            earlier = f"; {os.path.join(os.path.dirname(self._dir), 'recipe')} keeps the report of an earlier fit"
        rank_zero_info(f"lightning_recipe: report at {paths['html']} (also report.md, report.json); figures in "
                       f"{self._dir}{earlier}")


def _deferrable_start(fn: Callable[..., None]) -> Callable[..., None]:
    """``on_train_start`` that waits for the first training batch when the training data is an iterable dataset."""

    @functools.wraps(fn)
    def on_train_start(self: RecipeCheck, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if train_is_iterable(trainer) and not self.__dict__.get("_starting"):
            self.__dict__["_start_pending"] = True
            return
        fn(self, trainer, pl_module)
        if not self.__dict__.get("_starting") and type(self).on_train_batch_start is RecipeCheck.on_train_batch_start:
            self._retire("on_train_batch_start")  # nothing to wait for: no per-step call

    on_train_start._deferrable = True  # type: ignore[attr-defined]
    return on_train_start


def _runs_deferred_start(fn: Callable[..., None]) -> Callable[..., None]:
    """A check's own ``on_train_batch_start``, after the ``on_train_start`` that waited for this batch."""

    @functools.wraps(fn)
    def on_train_batch_start(self: RecipeCheck, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        _start_if_pending(self, trainer, pl_module, batch)
        fn(self, trainer, pl_module, batch, batch_idx)

    on_train_batch_start._deferrable = True  # type: ignore[attr-defined]
    return on_train_batch_start


def _start_if_pending(check: RecipeCheck, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
    """Run the ``on_train_start`` that waited for the first training batch, with that batch as the probe batch."""
    if not check.__dict__.pop("_start_pending", False):
        return
    if batch is not None:
        remember_batch(trainer, batch)
    check.__dict__["_starting"] = True
    try:
        type(check).on_train_start(check, trainer, pl_module)
    finally:
        check.__dict__.pop("_starting", None)


RecipeCheck.on_train_batch_start._deferrable = True  # type: ignore[attr-defined]

for _hook in _GUARDED:  # the base class's own hooks (on_fit_end) too
    if _hook in vars(RecipeCheck):
        setattr(RecipeCheck, _hook, _guard(vars(RecipeCheck)[_hook], _hook))
del _hook


class _OnceCheck(RecipeCheck):
    """A check that runs once per training, not again on a resume: its checkpointed state is ``done``."""

    done: bool = False

    def _first_time(self, trainer: "pl.Trainer") -> bool:
        """Whether to run now: not when already done, nor on a resume from a checkpoint (``trainer.ckpt_path``)."""
        if self.done or trainer.ckpt_path is not None:
            self.done = True
            return False
        return True

    def _start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Optional[FitContext]:
        """The shared context when the check runs now (marked done), ``None`` when it does not."""
        if not self._first_time(trainer):
            return None
        ctx = self._context(trainer, pl_module)
        if ctx is not None:
            self.done = True
        return ctx

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.done = bool(state_dict.get("done", False))
