"""Findings: the results of the checks (a dataclass, the severity policy, collecting them from a trainer).

Severity policy (every check follows it):

* ``fail``: a bug with near certainty (a NaN input, a double softmax, targets that copy the inputs). What happens then
  is the callback's ``on_fail``: :class:`~lightning_recipe.RecipeCheckError` (``"raise"``) or a
  :class:`~lightning_recipe.RecipeWarning` (``"warn"``).
* ``warn``: a likely problem that a person should act on, shown by calibration never to fire on healthy fits of the
  families users train (the numbers are in each rule's docstring). Always a :class:`~lightning_recipe.RecipeWarning`,
  never an exception.
* ``note``: everything else worth a look (a measurement that healthy and broken fits share, an imbalance the head bias
  handles): shown in the report (md, html, json) and listed by :func:`collect_findings`, never a
  :class:`~lightning_recipe.RecipeWarning`, never an exception.
* ``pass``: checked, nothing found; ``skip``: the check could not run (the message says why).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Optional

if TYPE_CHECKING:
    import lightning.pytorch as pl

Status = Literal["pass", "warn", "fail", "skip", "note"]
# every status, worst first: the order of the counts and of the html report
STATUSES: tuple[str, ...] = ("fail", "warn", "note", "pass", "skip")


@dataclass
class Finding:
    """One result of a check.

    Args:
        check: name of the check (the callback's class name, or a sub-check such as ``"LossDecreaseCheck.plateau"``).
        status: ``"fail"`` (a bug with near certainty; what happens then is the callback's ``on_fail``), ``"warn"``
            (a likely problem to act on, calibrated never to fire on healthy fits; a :class:`RecipeWarning`, never
            stops a fit), ``"note"`` (worth a look: in the report and :func:`collect_findings` only, never a warning
            or an exception), ``"pass"`` or ``"skip"`` (the check could not run; the message says why).
        message: what was measured, what was expected and, for a failure, the likely causes.
        measured: the measured number, when there is one.
        expected: the expected number (or threshold), when there is one.
        step: the training step (optimizer steps) at which it was found.
        causes: likely causes, from the recipe.
        details: further numbers, JSON-serialisable.

    Example::

        >>> f = Finding("InitialLossCheck", "pass", "loss 2.31 ~ log(10)", measured=2.31, expected=2.303)
        >>> f.failed
        False
        >>> Finding("DataCheck.balance", "note", "19.8:1, handled by the head bias").failed
        False
    """

    check: str
    status: Status
    message: str
    measured: Optional[float] = None
    expected: Optional[float] = None
    step: Optional[int] = None
    causes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        """Whether the check failed."""
        return self.status == "fail"

    def to_dict(self) -> dict[str, Any]:
        """The finding as plain JSON-serialisable values (non-finite numbers become strings)."""
        return _jsonable(asdict(self))


def collect_findings(trainer: "pl.Trainer") -> list[Finding]:
    """All findings of every recipe callback on ``trainer``, in callback order.

    Args:
        trainer: a Trainer that has (or had) recipe callbacks.

    Example::

        >>> import lightning as L
        >>> from lightning_recipe import InitialLossCheck
        >>> trainer = L.Trainer(callbacks=[InitialLossCheck()], logger=False)
        >>> collect_findings(trainer)
        []
    """
    _recover_spawned(trainer)
    out: list[Finding] = []
    for cb in trainer.callbacks:
        findings = getattr(cb, "findings", None)
        if getattr(cb, "_is_recipe_callback", False) and isinstance(findings, list):
            out.extend(findings)
    return out


def status_counts(findings: list[Finding]) -> dict[str, int]:
    """How many findings have each status, worst first (``fail, warn, note, pass, skip``).

    Args:
        findings: the findings to count.

    Example::

        >>> status_counts([Finding("A", "note", "n"), Finding("B", "pass", "p"), Finding("C", "note", "n")])
        {'fail': 0, 'warn': 0, 'note': 2, 'pass': 1, 'skip': 0}
    """
    return {s: sum(f.status == s for f in findings) for s in STATUSES}


# -- findings made in spawned worker processes -------------------------------------------------------------------------
# Under `ddp_spawn` (and `ddp_fork`, `ddp_notebook`) the fit runs in worker processes on pickled copies of the
# callbacks; Lightning sends back the weights and `callback_metrics`, not the callbacks' state. Global rank zero writes
# what its recipe callbacks found to a small file named after the reporting callback's token (a random id that the
# parent's copy shares), and `collect_findings` in the parent reads it back into the parent's callbacks, once.
def _leaves(trainer: "pl.Trainer") -> list[Any]:
    """The recipe callbacks of ``trainer`` that hold findings themselves (a ``Recipe``'s children, not the Recipe)."""
    out: list[Any] = []
    for cb in trainer.callbacks:
        if not getattr(cb, "_is_recipe_callback", False):
            continue
        children = getattr(cb, "callbacks", None)
        out.extend(children if isinstance(children, list) else [cb])
    return out


def _spawn_file(token: str) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), "lightning_recipe", f"spawned_{token}.json")


def _spawned(trainer: "pl.Trainer") -> bool:
    """Whether this fit runs in worker processes started by Lightning's launcher or a subclass of it (their callbacks
    are copies)."""
    launcher = type(getattr(trainer.strategy, "launcher", None))
    return any(c.__name__ == "_MultiProcessingLauncher" for c in launcher.__mro__)


def _send_to_parent(trainer: "pl.Trainer", token: Optional[str]) -> None:
    """In a spawned worker of global rank zero: leave the findings for the parent process (best effort)."""
    if token is None or not _spawned(trainer):
        return
    payload = [{"findings": [f.to_dict() for f in getattr(cb, "findings", None) or []],
                "figures": list(getattr(cb, "figures", None) or [])} for cb in _leaves(trainer)]
    path = _spawn_file(token)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w") as fh:
            json.dump(payload, fh)
        os.replace(path + ".tmp", path)
    except OSError:  # pragma: no cover - the report next to the logs has them all the same
        pass


def _recover_spawned(trainer: "pl.Trainer") -> None:
    """In the parent of spawned workers: put the findings that global rank zero left back into these callbacks."""
    ours = [cb for cb in trainer.callbacks if getattr(cb, "_is_recipe_callback", False)]
    token = getattr(ours[-1], "_token", None) if ours else None
    if token is None or not _spawned(trainer):
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # a worker itself: its callbacks hold their own findings
        return
    path = _spawn_file(token)
    try:
        with open(path) as fh:
            payload = json.load(fh)
        os.remove(path)
    except (OSError, ValueError):
        return
    leaves = _leaves(trainer)
    if not isinstance(payload, list) or len(payload) != len(leaves):
        return
    for cb, got in zip(leaves, payload):
        if isinstance(getattr(cb, "findings", None), list):
            cb.findings = [_finding(d) for d in got.get("findings", [])]
        if isinstance(getattr(cb, "figures", None), list):
            cb.figures = list(got.get("figures", []))


def _finding(d: dict[str, Any]) -> Finding:
    """A finding back from :meth:`Finding.to_dict` (non-finite numbers were written as strings)."""
    def number(v: Any) -> Optional[float]:
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                return None
        return v

    return Finding(d["check"], d["status"], d["message"], number(d.get("measured")), number(d.get("expected")),
                   d.get("step"), list(d.get("causes") or []), dict(d.get("details") or {}))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _jsonable(obj.item())
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _fmt(x: Optional[float]) -> str:
    if x is None:
        return ""
    if isinstance(x, float) and math.isfinite(x) and x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.4g}"
    if isinstance(x, float):
        return f"{x:.4f}".rstrip("0").rstrip(".") if math.isfinite(x) else str(x)
    return str(x)
