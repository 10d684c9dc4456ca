"""What ``WiringCheck`` reads in the first steps: the autograd graph's leaves, tensors a module hides, the loader's
order, warnings."""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Mapping, Optional

import torch
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

from lightning_recipe._core.labels import _single_loader
from lightning_recipe._core.sharding import sharding

# warnings of torch and Lightning that mean a bug: key -> pattern of the message
_KNOWN_WARNINGS = (
    ("no_loss", re.compile(r"`training_step` returned `None`")),
    ("scheduler_order", re.compile(r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`")),
    ("broadcast", re.compile(r"Using a target size \((.*?)\) that is different to the input size \((.*?)\)")),
    ("no_optimizer", re.compile(r"`LightningModule\.configure_optimizers` returned `None`")),
)


_CLASS_LOSSES = ("CrossEntropyLoss", "NLLLoss")


_ELEMENTWISE_LOSSES = ("MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss", "BCELoss", "BCEWithLogitsLoss")


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
    # FSDP's flat parameters (the graph reads them; the module's own parameters are views of them) are registered;
    # under ModelParallelStrategy (FSDP2) the graph reads the all-gathered copy of each DTensor parameter, which has
    # that parameter's (global) shape
    gathered = ({tuple(p.shape) for p in pl_module.parameters()}
                if sharding(getattr(pl_module, "_trainer", None)) == "model_parallel" else set())
    stray = {k: v for k, v in leaves.items() if k not in registered and not getattr(v, "_is_flat_param", False)
             and tuple(v.shape) not in gathered}
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
