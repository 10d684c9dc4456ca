"""What a strategy that shards the parameters allows the checks.

* :func:`sharding` names the strategy by its class name (``FSDPStrategy``, ``DeepSpeedStrategy``,
  ``ModelParallelStrategy``): no import of an optional package (DeepSpeed is rarely installed), and a user's
  subclass counts as its base.
* :func:`full_params`: the full parameters, on every rank, for the code inside (FSDP's
  ``summon_full_params``); ``writeback=True`` keeps what the code wrote into them. A collective: every rank enters.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

# the strategies that shard parameters (or their gradients, or the optimizer's copy of them), by class name
_KINDS = {"FSDPStrategy": "fsdp", "DeepSpeedStrategy": "deepspeed", "ModelParallelStrategy": "model_parallel"}
_INSIDE: set[int] = set()  # the FSDP modules whose full parameters are summoned now (the context is not reentrant)


def sharding(trainer: Any) -> Optional[str]:
    """``"fsdp"``, ``"deepspeed"`` or ``"model_parallel"`` for the strategies that shard the model (a subclass counts
    as its base class); ``None`` for every other strategy (single device, DDP).

    Example::

        >>> class FSDPStrategy: ...
        >>> class MyFSDP(FSDPStrategy): ...
        >>> class T: strategy = MyFSDP()
        >>> sharding(T())
        'fsdp'
    """
    strategy = getattr(trainer, "strategy", None)
    for cls in type(strategy).__mro__:
        if cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
    return None


def zero_stage(trainer: Any) -> int:
    """DeepSpeed's ZeRO stage (0 when the strategy's config does not say, or it is not DeepSpeed)."""
    config = getattr(getattr(trainer, "strategy", None), "config", None)
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return int(stage) if isinstance(stage, int) else 0


def sharding_skip(trainer: Any, name: str, what: str, hint: str) -> Optional[str]:
    """The reason ``name`` cannot do ``what`` under this fit's strategy, or ``None`` when it can.

    DeepSpeed: ZeRO stage 1 and up keeps the weights the optimizer steps (fp32, partitioned) apart from the module's
    parameters, stage 2 and up partitions the gradients (``param.grad`` is empty after backward), stage 3 the
    parameters themselves; ``ModelParallelStrategy`` (FSDP2, tensor parallel) gives each rank a shard (``DTensor``).
    FSDP (FSDP1 with ``use_orig_params=True``, Lightning's default) is handled by :func:`full_params`.
    """
    kind = sharding(trainer)
    if kind == "deepspeed":
        stage = zero_stage(trainer)
        return (f"{name}: skipped under DeepSpeed (ZeRO stage {stage}): DeepSpeed keeps the weights its optimizer steps "
                f"apart from the module's parameters and partitions gradients (stage >= 2) and parameters (stage 3), so "
                f"{what} cannot be done from a callback. HINT: {hint}")
    if kind == "model_parallel":
        return (f"{name}: skipped under ModelParallelStrategy: each rank holds a shard of every parameter (DTensor), so "
                f"{what} cannot be done from a callback. HINT: {hint}")
    return None


@contextlib.contextmanager
def full_params(trainer: Any, writeback: bool = False) -> Iterator[None]:
    """The full (unsharded) parameters in the LightningModule's own modules for the code inside, under FSDP; a no-op
    under any other strategy and when already inside. Every rank must enter (it all-gathers)."""
    module = getattr(getattr(trainer, "strategy", None), "model", None) if sharding(trainer) == "fsdp" else None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover - a torch without distributed
        FSDP = None  # type: ignore[assignment,misc]
    if FSDP is None or not isinstance(module, FSDP) or id(module) in _INSIDE:
        yield
        return
    _INSIDE.add(id(module))
    try:
        with FSDP.summon_full_params(module, writeback=writeback, rank0_only=False, recurse=True):
            yield
    finally:
        _INSIDE.discard(id(module))



def full_tensor(t: Any) -> Any:
    """``t`` whole: a ``DTensor`` (``ModelParallelStrategy``, FSDP2) gathered from every rank (a collective: every
    rank calls it), anything else as it is."""
    gather = getattr(t, "full_tensor", None)
    return gather() if callable(gather) else t


def local_tensor(t: Any) -> Any:
    """This rank's shard of a ``DTensor`` (no communication), anything else as it is."""
    local = getattr(t, "to_local", None)
    return local() if callable(local) else t
