"""``lightning-recipe preflight``: the recipe's early checks on a user's own LightningModule, in seconds.

Builds the model (and the datamodule) from import paths, runs the overfit-one-batch utility on a copy, then a
short fit (``steps`` optimizer steps) with every check of the ``recommended()`` preset in warn mode, tuned for a
short run, plus the batch-independence and input-dependence checks, prints a table of the findings and writes the
report. The exit code is 1 when any check failed, so the command can gate CI.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import logging
import os
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_recipe.exceptions import RecipeConfigError
from lightning_recipe.findings import Finding, _fmt, collect_findings, status_counts
from lightning_recipe._core.namespaces import _is_lightning, _namespace

_OVERRIDE_PREFIXES = ("model", "data")
# the checks a preflight is for: when they could not run, it has not passed (exit 1)
_CORE = ("overfit_one_batch", "InitialLossCheck", "LossDecreaseCheck", "BatchIndependenceCheck")
# the argument a message names -> the command-line option that sets it
_OPTIONS = {"split_batch": "--split-batch module:function", "forward": "--forward module:function",
            "loss_fn": "--loss-fn module:function", "head": "--head PATH", "task": "--task TASK"}


@dataclass
class PreflightResult:
    """What :func:`preflight` found.

    Args:
        findings: every finding, in the order the checks ran.
        report: path of ``report.html`` (``report.md`` and ``report.json`` are next to it), or ``None``.
        error: the exception that stopped the short fit (the user's code crashed), or ``None``.
    """

    findings: list[Finding]
    report: Optional[str] = None
    error: Optional[BaseException] = None
    figures: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Whether a check failed or the fit crashed."""
        return self.error is not None or any(f.failed for f in self.findings)

    @property
    def incomplete(self) -> list[str]:
        """The core checks (initial loss, loss decrease, overfit one batch, batch independence) that ran in this
        installation but could not reach a verdict: each of their findings is a ``skip`` (e.g. a batch the
        conventions cannot split). A preflight that could not check these has not passed.

        Example::

            >>> PreflightResult([Finding("InitialLossCheck", "skip", "no batch"), Finding("LossDecreaseCheck", "pass",
            ...                  "fell")]).incomplete
            ['InitialLossCheck']
        """
        out = []
        for core in _CORE:
            mine = [f for f in self.findings if f.check == core or f.check.startswith(core + ".")]
            if mine and all(f.status == "skip" for f in mine):
                out.append(core)
        return out

    def hint(self) -> str:
        """The command-line options that the skipped core checks' messages name (``--split-batch module:function``
        for ``split_batch=``, ...), or ``""``."""
        named = []
        for f in self.findings:
            if f.status == "skip" and any(f.check == c or f.check.startswith(c + ".") for c in self.incomplete):
                named += [a for a in _OPTIONS if f"`{a}=" in f.message and a not in named]
        return ", ".join(f"`{_OPTIONS[a]}`" for a in named)


def preflight(
    model: "pl.LightningModule",
    datamodule: Optional["pl.LightningDataModule"] = None,
    *,
    steps: int = 100,
    overfit_steps: int = 200,
    causal: Optional[bool] = None,
    output: str = os.path.join("recipe_runs", "preflight"),
    seed: int = 0,
    accelerator: str = "auto",
    split_batch: Optional[Callable[[Any], tuple[Any, Any]]] = None,
    forward: Optional[Callable[[Any, Any], Any]] = None,
    loss_fn: Optional[Callable[..., Any]] = None,
    head: Optional[Union[str, nn.Module]] = None,
    task: Optional[Literal["multiclass", "binary", "multilabel", "regression"]] = None,
) -> PreflightResult:
    """Run the recipe's early checks on ``model`` (trained in place for ``steps`` steps: pass a fresh one).

    1. ``overfit_one_batch`` on a copy of the model, when ``lightning_recipe.overfit`` is installed
       (``overfit_steps`` steps on 8 examples; ``overfit_steps=0`` turns it off).
    2. A fit of ``steps`` optimizer steps with the checks of :func:`~lightning_recipe.recommended` in warn mode
       (head bias init, initial loss, loss decrease judged over the whole short run, prediction dynamics, and the
       other checks of the preset), plus ``BatchIndependenceCheck`` (causal mode for autoregressive models) and
       ``InputDependenceCheck`` (at the last step) where they are installed; one validation batch per epoch.

    Nothing stops early: every check runs and reports. Findings, figures and ``report.html``/``.md``/``.json`` go
    to ``<output>/recipe/``.

    Args:
        model: the LightningModule.
        datamodule: its data, unless the model defines ``train_dataloader``.
        steps: optimizer steps of the short fit (at least 10).
        overfit_steps: steps of the overfit-one-batch utility (0: skip it).
        causal: also check that outputs at position ``t`` do not depend on later inputs (``None``: when the targets
            are the inputs shifted by one, see :class:`~lightning_recipe.BatchIndependenceCheck`).
        output: the folder of the run.
        seed: seed of the run (``seed_everything``).
        accelerator: Lightning accelerator (one device).
        split_batch: see :class:`~lightning_recipe.RecipeCheck`.
        forward: see :class:`~lightning_recipe.RecipeCheck`.
        loss_fn: see :class:`~lightning_recipe.RecipeCheck`.
        head: see :class:`~lightning_recipe.RecipeCheck`.
        task: see :class:`~lightning_recipe.RecipeCheck`.

    Raises:
        RecipeConfigError: If ``steps`` is below 10.

    Example::

        >>> import lightning as L
        >>> result = preflight(L.pytorch.demos.boring_classes.BoringModel, steps=5)  # doctest: +SKIP
    """
    if not isinstance(steps, int) or steps < 10:
        raise RecipeConfigError(f"preflight: `steps` must be an int >= 10, got {steps!r}. HINT: `--steps 100`.")
    overrides = dict(split_batch=split_batch, forward=forward, loss_fn=loss_fn, head=head, task=task)
    pl.seed_everything(seed, verbose=False)
    findings: list[Finding] = []
    figures: list[str] = []
    from lightning_recipe._core.base import unused_recipe_dir

    recipe_dir = unused_recipe_dir(os.path.join(os.path.abspath(output), "recipe"))  # the fit's own, computed alike
    overfit = _optional("overfit", "overfit_one_batch")
    if overfit is not None and overfit_steps > 0:
        kwargs = dict(steps=overfit_steps, directory=recipe_dir, seed=seed, split_batch=split_batch,
                      split_batch_fn=split_batch, forward=forward, loss_fn=loss_fn, task=task, accelerator=accelerator)
        try:
            with _quiet():
                finding = overfit(model, datamodule, **_accepted(overfit, kwargs))
        except Exception as err:  # a crash in the utility must not hide the other checks
            why = f"overfit_one_batch could not run: {type(err).__name__}: {err}"
            finding = Finding("overfit_one_batch", "skip", why)
        findings.append(finding)
        if isinstance(finding.details.get("figure"), str):
            figures.append(finding.details["figure"])
    holder = _Findings(findings, figures)
    callbacks: list[Callback] = [holder, *preflight_callbacks(steps, causal, overrides)]
    error: Optional[BaseException] = None
    with _quiet():
        trainer = _namespace(model).Trainer(
            default_root_dir=output, max_steps=steps, limit_val_batches=1, num_sanity_val_steps=1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            accelerator=accelerator, devices=1, callbacks=callbacks,
        )  # fmt: skip
        try:
            trainer.fit(model, datamodule=datamodule)
        except Exception as err:  # the user's code crashed: report what was gathered, then the error
            error = err
    report = os.path.join(recipe_dir, "report.html")
    return PreflightResult(
        collect_findings(trainer), report if os.path.exists(report) else None, error, _all_figures(trainer)
    )


def preflight_callbacks(steps: int, causal: Optional[bool] = None, overrides: Optional[dict[str, Any]] = None) -> list[Callback]:
    """The checks of a preflight run of ``steps`` steps: the ``recommended()`` preset tuned for a short run, plus the
    early checks that exist in this installation (batch and input dependence).

    Args:
        steps: optimizer steps of the run.
        causal: ``causal=`` of the batch-independence check (``None``: automatic for next-token targets).
        overrides: ``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``.

    Example::

        >>> names = [type(cb).__name__ for cb in preflight_callbacks(100)]
        >>> names[:2], "LossDecreaseCheck" in names
        (['DataCheck', 'HeadBiasInit'], True)
    """
    from lightning_recipe.checks.loss_decrease import LossDecreaseCheck
    from lightning_recipe.checks.prediction_dynamics import PredictionDynamics
    from lightning_recipe.presets import _bundle

    kw = {k: v for k, v in (overrides or {}).items() if v is not None}
    callbacks = _bundle("warn", kw)
    window = max(5, min(50, steps // 5))
    batch_check = _optional("checks.batch_independence", "BatchIndependenceCheck")
    input_check = _optional("checks.input_dependence", "InputDependenceCheck")
    out: list[Callback] = []
    for cb in callbacks:
        if isinstance(cb, LossDecreaseCheck):  # the whole short run is the warm-up: judged once, at its end
            cb = LossDecreaseCheck("warn", check_every_n_steps=steps, warmup_steps=steps, window=window, **kw)
        elif isinstance(cb, PredictionDynamics):
            cb = PredictionDynamics(every_n_steps=max(1, steps // 10), on_fail="warn", **kw)
        elif batch_check is not None and isinstance(cb, batch_check):
            cb = batch_check("warn", causal=causal, **kw)
        elif input_check is not None and isinstance(cb, input_check):
            cb = input_check("warn", after_steps=steps, **kw)
        out.append(cb)
    if batch_check is not None and not any(isinstance(cb, batch_check) for cb in out):
        out.insert(2, batch_check("warn", causal=causal, **kw))
    if input_check is not None and not any(isinstance(cb, input_check) for cb in out):
        out.append(input_check("warn", after_steps=steps, **kw))
    return out


# -- command line ---------------------------------------------------------------------------------------------------
USAGE = """\
lightning-recipe preflight MODEL [DATA] [options] [--model.init_args.NAME=VALUE ...] [--data.init_args.NAME=VALUE ...]

  MODEL, DATA   import paths `package.module:Class` or files `path/to/file.py:Class` (the current folder is
                importable); DATA is a LightningDataModule, optional when the model has train_dataloader().
                Both may come from a LightningCLI config file instead (--config, keys model/data with class_path).
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lightning-recipe preflight ...``: returns 0 when every check passed, 1 when one failed, the fit crashed or
    a core check (initial loss, loss decrease, overfit one batch, batch independence) could not run, 2 on a usage
    error."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="lightning-recipe preflight",
        usage=USAGE,
        description="Run the recipe's early checks (initial loss, head bias, batch independence, overfit one "
        "batch, input dependence, a short fit with loss decrease) on your own LightningModule; exit 1 if any fails.",
    )
    parser.add_argument("model", nargs="?", help="the LightningModule class, `pkg.module:Class` or `file.py:Class`")
    parser.add_argument("data", nargs="?", help="the LightningDataModule class (optional)")
    parser.add_argument("--config", action="append", default=[], help="LightningCLI-style YAML (model:, data:, "
                        "seed_everything:); may be repeated, later files win")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of the short fit (default 100)")
    parser.add_argument("--overfit-steps", type=int, default=200, help="steps of overfit-one-batch (0: skip)")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None,
                        help="autoregressive model: outputs must not see the future (default: on when the targets are "
                        "the inputs shifted by one)")
    parser.add_argument("--output", default=os.path.join("recipe_runs", "preflight"),
                        help="folder of the run and the report (default recipe_runs/preflight)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: the config's seed_everything, else 0)")
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator, one device (default auto)")
    parser.add_argument("--head", default=None, help="attribute path of the last layer, when it cannot be detected")
    parser.add_argument("--task", choices=["multiclass", "binary", "multilabel", "regression"], default=None)
    parser.add_argument("--loss-fn", default=None, help="import path of the loss, when the module holds none")
    parser.add_argument("--split-batch", default=None, help="import path of `callable(batch) -> (inputs, targets)`")
    parser.add_argument("--forward", default=None, help="import path of `callable(module, inputs) -> predictions`")
    args, rest = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # `pkg.module:Class` relative to where the command runs
        config = _load_configs(args.config)
        _apply_overrides(config, rest)
        model_cls = _import(args.model or _class_path(config.get("model")), "MODEL")
        data_path = args.data or _class_path(config.get("data"))
        data_cls = _import(data_path, "DATA") if data_path else None
        seed = args.seed if args.seed is not None else int(config.get("seed_everything") or 0)
        pl.seed_everything(seed, verbose=False)  # before the classes are built, as LightningCLI does: the same init
        if not _is_lightning(model_cls, "LightningModule"):  # checked before anything is built
            raise RecipeConfigError(f"MODEL must be a LightningModule class, got {_what(model_cls)}.")
        if data_cls is not None and not _is_lightning(data_cls, "LightningDataModule"):
            raise RecipeConfigError(f"DATA must be a LightningDataModule class, got {_what(data_cls)}.")
        model = _instantiate(model_cls, _init_args(config.get("model")), "model")
        data = _instantiate(data_cls, _init_args(config.get("data")), "data") if data_cls is not None else None
        if data is None and _no_train_dataloader(model):
            raise RecipeConfigError(f"{type(model).__name__} has no train_dataloader(): pass a LightningDataModule "
                                    "as DATA (or `data:` with `class_path` in --config).")
        callables = {k: _import(getattr(args, k), f"--{k.replace('_', '-')}", call=True) if getattr(args, k) else None
                     for k in ("loss_fn", "split_batch", "forward")}
    except (RecipeConfigError, ImportError, AttributeError, TypeError, ValueError, OSError) as err:
        print(f"lightning-recipe preflight: error: {err}", file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    try:
        result = preflight(
            model, data, steps=args.steps, overfit_steps=args.overfit_steps, causal=args.causal, output=args.output,
            seed=seed, accelerator=args.accelerator, head=args.head, task=args.task, **callables,
        )  # fmt: skip
    except RecipeConfigError as err:
        print(f"lightning-recipe preflight: error: {err}", file=sys.stderr)
        return 2
    print_result(result, title=f"preflight: {type(model).__name__}" + (f" on {type(data).__name__}" if data else ""))
    return 1 if result.failed or result.incomplete else 0


def print_result(result: PreflightResult, title: str = "preflight", file: Any = None) -> None:
    """Print the findings as a table (``rich``), then every failure in full with its likely causes."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, highlight=False, soft_wrap=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)  # CI logs: no terminal to fit
    styles = {"pass": "green", "fail": "bold red", "warn": "yellow", "note": "cyan", "skip": "dim"}
    table = Table(title=title, show_lines=False, expand=False)
    table.add_column("status")
    table.add_column("check", no_wrap=True)
    table.add_column("measured", justify="right")
    table.add_column("expected", justify="right")
    table.add_column("what was found", ratio=1)
    for f in result.findings:
        table.add_row(f"[{styles[f.status]}]{f.status.upper()}[/]", f.check, _fmt(f.measured), _fmt(f.expected),
                      _headline(f))
    console.print(table)
    for f in result.findings:
        if f.status in ("fail", "warn", "note", "skip"):
            console.print(f"\n[{styles[f.status]}]{f.status.upper()} {f.check}[/]", markup=True)
            console.print(f.message, markup=False)
            if f.causes:
                console.print("Likely causes:", markup=False)
                for c in f.causes:
                    console.print(f"  - {c}", markup=False)
    if result.error is not None:
        console.print("\n[bold red]The short fit crashed[/] (your code raised, not a check):", markup=True)
        console.print("".join(traceback.format_exception_only(type(result.error), result.error)).strip(), markup=False)
    counts = status_counts(result.findings)
    console.print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()), markup=False)
    if result.report:
        console.print(f"report: {result.report} (also report.md, report.json)", markup=False)
    for path in result.figures:
        console.print(f"figure: {path}", markup=False)
    if result.incomplete and not result.failed:
        hint = result.hint()
        console.print(f"\nThe core checks {', '.join(result.incomplete)} could not run (see their SKIP lines above)."
                      + (f" HINT: run again with {hint}." if hint else ""), markup=False)
    verdict = ("[bold red]FAILED[/]" if result.failed else "[bold red]INCOMPLETE[/]" if result.incomplete
               else "[green]passed[/]")
    console.print(f"preflight {verdict}", markup=True)


# -- helpers --------------------------------------------------------------------------------------------------------
class _Findings(Callback):
    """Holds findings made outside the fit (overfit one batch), so that the report of the fit includes them."""

    _is_recipe_callback = True

    def __init__(self, findings: list[Finding], figures: list[str]) -> None:
        self.findings = findings
        self.figures = figures


def _what(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__module__}.{obj.__qualname__}"
    return f"{type(obj).__name__} {getattr(obj, '__qualname__', obj)!r}"


def _no_train_dataloader(model: Any) -> bool:
    """Whether ``model`` keeps the LightningModule's own ``train_dataloader`` (which raises), in either namespace."""
    for c in type(model).__mro__:
        if "train_dataloader" in vars(c):
            return c.__name__ in ("LightningModule", "DataHooks") and c.__module__.split(".")[0] in (
                "lightning", "pytorch_lightning")
    return True


def _optional(module: str, name: str) -> Any:
    """``lightning_recipe.<module>.<name>``, or ``None`` when that check is not part of this installation."""
    try:
        return getattr(importlib.import_module(f"lightning_recipe.{module}"), name)
    except (ImportError, AttributeError):
        return None


def _accepted(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``fn`` takes (the utility's signature may differ between versions)."""
    import inspect

    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}


def _all_figures(trainer: "pl.Trainer") -> list[str]:
    ours = [cb for cb in trainer.callbacks if getattr(cb, "_is_recipe_callback", False)]
    return [p for cb in ours for p in getattr(cb, "figures", [])]


def _headline(f: Finding, limit: int = 100) -> str:
    """The finding's message without the check's name, up to its first top-level ``": "`` or ``"; "`` (the details
    follow there), without parenthesised asides, at most ``limit`` characters (the full text is printed for every
    failure, and is in the report).

    Example::

        >>> _headline(Finding("C", "fail", "C: the loss did not fall (z=3): first 2.3; last 2.3"))
        'the loss did not fall'
    """
    msg = f.message.split("\n", 1)[0]
    for prefix in (f"{f.check}: ", f"{f.check.split('.')[0]}: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
            break
    out, depth = [], 0
    for i, ch in enumerate(msg):
        if depth == 0 and ch in ":;" and msg[i + 1 : i + 2] == " " and i >= 10:
            break
        if ch == "(":
            depth += 1
        if depth == 0:
            out.append(ch)
        if ch == ")":
            depth = max(0, depth - 1)
    text = " ".join("".join(out).split()).replace(" ,", ",").rstrip(" .")
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


@contextlib.contextmanager
def _quiet():
    """Lightning's info lines, the recipe's warnings (they become the table) and prints of the fit, silenced.

    Warnings are recorded (and dropped), not ignored: a filter that ignores them would hide from ``WiringCheck``
    the framework warnings that mean a bug."""
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("default")
            yield
    finally:
        log.setLevel(level)


def _import(path: Optional[str], what: str, call: bool = False) -> Any:
    """``pkg.module:Name``, ``pkg.module.Name`` or ``path/to/file.py:Name``."""
    if not path:
        raise RecipeConfigError(f"{what} is missing: give `pkg.module:Class` (or `file.py:Class`), or a --config with "
                                "`model: {class_path: ...}`.")
    if ":" in path:
        module_name, _, attr = path.rpartition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise RecipeConfigError(f"{what}: cannot read {path!r}; expected `pkg.module:Name` or `file.py:Name`.")
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        file = os.path.abspath(module_name)
        if not os.path.exists(file):
            raise RecipeConfigError(f"{what}: no file {module_name!r} (from {path!r}).")
        name = "_preflight_" + os.path.splitext(os.path.basename(file))[0]
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, os.path.dirname(file))  # its own sibling imports
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise RecipeConfigError(f"{what}: cannot import {module_name!r} ({err}). HINT: run from the folder that "
                                    "contains the package, or give a file path `path/to/file.py:Class`.") from err
    if not hasattr(module, attr):
        raise RecipeConfigError(f"{what}: {module_name!r} has no attribute {attr!r}.")
    obj = getattr(module, attr)
    if call and not callable(obj):
        raise RecipeConfigError(f"{what}: {path!r} is not callable.")
    return obj


def _load_configs(paths: list[str]) -> dict[str, Any]:
    import yaml

    config: dict[str, Any] = {}
    for path in paths:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise RecipeConfigError(
                f"--config {path}: expected a mapping with `model:`/`data:`, got {type(loaded).__name__}."
            )
        _merge(config, loaded)
    return config


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)


def _apply_overrides(config: dict[str, Any], rest: list[str]) -> None:
    """``--model.init_args.NAME=VALUE`` / ``--model.NAME VALUE`` / ``--data...``: values parsed as YAML."""
    import yaml

    i = 0
    while i < len(rest):
        arg = rest[i]
        key, eq, value = arg.partition("=")
        if not key.startswith("--") or key[2:].split(".", 1)[0] not in _OVERRIDE_PREFIXES or "." not in key:
            raise RecipeConfigError(f"unknown argument {arg!r}. Overrides look like `--model.init_args.lr=0.01` or "
                                    "`--data.init_args.batch_size=64`.")
        if not eq:
            if i + 1 >= len(rest):
                raise RecipeConfigError(f"{key} needs a value.")
            value, i = rest[i + 1], i + 1
        i += 1
        section, path = key[2:].split(".", 1)
        parts = path.split(".")
        if parts[0] == "class_path" and len(parts) == 1:
            config.setdefault(section, {})["class_path"] = value
            continue
        if parts[0] == "init_args":
            parts = parts[1:]
        if not parts:
            raise RecipeConfigError(f"{key}: name the argument, e.g. `--{section}.init_args.lr=0.01`.")
        node = config.setdefault(section, {})
        if "class_path" in node or "init_args" in node:
            node = node.setdefault("init_args", {})
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if "class_path" in node:
                node = node.setdefault("init_args", {})
        node[parts[-1]] = yaml.safe_load(value)


def _class_path(section: Any) -> Optional[str]:
    if isinstance(section, dict) and isinstance(section.get("class_path"), str):
        return section["class_path"]
    return None


def _init_args(section: Any) -> dict[str, Any]:
    if not isinstance(section, dict):
        return {}
    if "class_path" in section or "init_args" in section:
        return dict(section.get("init_args") or {})
    return dict(section)


def _instantiate(cls: Any, kwargs: dict[str, Any], what: str) -> Any:
    """``cls(**kwargs)``; nested ``{class_path, init_args}`` values are built first (as in LightningCLI)."""
    built = {k: _build(v) for k, v in kwargs.items()}
    try:
        return cls(**built)
    except TypeError as err:
        raise RecipeConfigError(f"cannot build the {what} {getattr(cls, '__name__', cls)}({', '.join(built)}): {err}. "
                                f"HINT: pass its arguments as `--{what}.init_args.NAME=VALUE` or in --config.") from err


def _buildable(cls: Any) -> bool:
    """What LightningCLI would build from a nested ``class_path``: a class derived from a LightningModule,
    LightningDataModule or Callback (either namespace), a torch optimizer or learning-rate scheduler, or an
    ``nn.Module``; never an arbitrary callable."""
    import torch

    if not isinstance(cls, type):
        return False
    if any(_is_lightning(cls, n) for n in ("LightningModule", "LightningDataModule", "Callback")):
        return True
    return issubclass(cls, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, nn.Module))


def _build(value: Any) -> Any:
    if isinstance(value, dict) and isinstance(value.get("class_path"), str):
        cls = _import(value["class_path"], "class_path")
        if not _buildable(cls):
            raise RecipeConfigError(
                f"class_path {value['class_path']!r} is {_what(cls)}; preflight builds only what LightningCLI would "
                "there: a LightningModule, LightningDataModule, Callback, torch optimizer or scheduler, or nn.Module "
                "class. HINT: pass the value itself, or build it in the model's __init__."
            )
        return _instantiate(cls, dict(value.get("init_args") or {}), "argument")
    if isinstance(value, dict):
        return {k: _build(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_build(v) for v in value]
    return value
