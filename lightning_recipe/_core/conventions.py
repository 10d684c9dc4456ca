"""How a callback finds inputs, targets, forward, loss, task, class dimension and head with zero configuration.

Conventional code needs no argument; unconventional code needs one, and every error below names it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Union

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn

from lightning_recipe.exceptions import RecipeCheckError, RecipeConfigError
from lightning_recipe._core.probe_state import _restore_buffers, _snapshot_buffers, eager
from lightning_recipe._core.sharding import full_params

_INPUT_KEYS = ("x", "input", "inputs", "image", "images", "features", "input_ids")
_TARGET_KEYS = ("y", "target", "targets", "label", "labels")
_OUTPUT_KEYS = ("logits", "preds", "output")
_LOSS_ATTRS = ("loss_fn", "criterion", "loss")
_MULTICLASS = ("CrossEntropyLoss", "NLLLoss")
_LOGITS_BINARY = ("BCEWithLogitsLoss",)
_PROBS_BINARY = ("BCELoss",)  # takes probabilities: the model applies the sigmoid (after its head)
_REGRESSION = ("MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss")
TASKS = ("multiclass", "binary", "multilabel", "regression")

SplitBatch = Callable[[Any], tuple[Any, Any]]
ForwardFn = Callable[[Any, Any], Any]


@dataclass(frozen=True)
class _Settings:
    """The overrides a user can pass to any recipe callback (or once to a preset)."""

    split_batch: Optional[SplitBatch] = None
    forward: Optional[ForwardFn] = None
    loss_fn: Optional[Callable] = None
    head: Optional[Union[str, nn.Module]] = None
    task: Optional[str] = None

    def key(self) -> tuple:
        return tuple(id(v) if v is not None else None for v in (self.split_batch, self.forward, self.loss_fn, self.head)) + (
            self.task,
        )


def _validate_settings(s: _Settings) -> None:
    for name in ("split_batch", "forward", "loss_fn"):
        v = getattr(s, name)
        if v is not None and not callable(v):
            raise RecipeConfigError(f"`{name}` must be callable, got {type(v).__name__}.")
    if s.head is not None and not isinstance(s.head, (str, nn.Module)):
        raise RecipeConfigError(f"`head` must be an attribute path such as 'net.3' or a module, got {type(s.head).__name__}.")
    if s.task is not None and s.task not in TASKS:
        raise RecipeConfigError(f"`task` must be one of {TASKS}, got {s.task!r}.")


def split_batch(batch: Any, override: Optional[SplitBatch] = None) -> tuple[Any, Any]:
    """Split a batch into ``(inputs, targets)``: tuple/list → first two items; dict → conventional keys."""
    if override is not None:
        out = override(batch)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise RecipeConfigError("`split_batch` must return a pair (inputs, targets).")
        return out[0], out[1]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        _check_collated(batch)
        return batch[0], batch[1]
    if isinstance(batch, dict):
        x = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if x is not None and y is not None:
            return x, y
        raise RecipeConfigError(
            f"Cannot find inputs and targets in a batch dict with keys {sorted(batch)}: expected one of "
            f"{_INPUT_KEYS} and one of {_TARGET_KEYS}. HINT: pass `split_batch=lambda batch: (inputs, targets)`."
        )
    raise RecipeConfigError(
        f"Cannot split a batch of type {type(batch).__name__} into (inputs, targets). "
        "HINT: pass `split_batch=lambda batch: (inputs, targets)`."
    )


def _check_collated(batch: Union[tuple, list]) -> None:
    """A list of examples that was never collated (dicts, strings): ``batch[0], batch[1]`` would be two examples."""
    kinds = {type(v) for v in batch}
    if all(isinstance(v, dict) for v in batch):
        what = f"a list of {len(batch)} dicts (examples not collated into tensors: a `collate_fn` that returns the list?)"
    elif all(isinstance(v, (str, bytes)) for v in batch):
        what = f"a list of {len(batch)} strings (raw text, tokenised later in the model?)"
    else:
        return
    raise RecipeConfigError(
        f"Cannot split the batch into (inputs, targets): it is {what}; its items are {sorted(k.__name__ for k in kinds)}. "
        "HINT: pass `split_batch=lambda batch: (inputs, targets)` returning the model's input and a target tensor."
    )


def take_examples(inputs: Any, targets: Tensor, n: int) -> tuple[Any, Tensor]:
    """The first ``n`` examples of a batch, detached copies (every tensor of ``inputs``, and ``targets``)."""
    from lightning_utilities.core.apply_func import apply_to_collection

    def cut(t: Tensor) -> Tensor:
        return t[:n].detach().clone() if t.ndim else t

    return apply_to_collection(inputs, Tensor, cut), cut(targets)


def sanity_examples(
    trainer: Any, batch: Any, batch_idx: int, dataloader_idx: int, split: Optional[SplitBatch], n: int
) -> Optional[tuple[Any, Tensor]]:
    """The first ``n`` examples of the first validation batch of Lightning's sanity check, else ``None``.

    Held-out data for a fixed batch, captured without any extra loader (``on_validation_batch_start``). A batch that
    does not split into inputs and a target tensor gives ``None``: the caller falls back to a training batch.
    """
    if not (trainer.sanity_checking and batch_idx == 0 and dataloader_idx == 0):
        return None
    try:
        x, y = split_batch(batch, split)
    except RecipeConfigError:
        return None
    return take_examples(x, y, n) if isinstance(y, Tensor) else None


def run_forward(pl_module: nn.Module, inputs: Any, override: Optional[ForwardFn] = None) -> Tensor:
    """``pl_module(inputs)``; a tuple output gives its first item, a dict its ``logits``/``preds``/``output``.
    Compiled modules run eagerly here (:func:`eager`): this is a probe's forward, never a training step."""
    if override is not None:
        with eager():
            out = override(pl_module, inputs)
    else:
        try:
            with eager():
                out = pl_module(inputs)
        except (RecipeConfigError, RecipeCheckError):
            raise
        except (TypeError, AttributeError, IndexError, KeyError, ValueError, RuntimeError) as err:
            # the model trains, so an error of its forward on the inputs read from the batch means they are not what
            # forward takes (a generator's noise, features made in training_step; a shape mismatch is a RuntimeError)
            raise RecipeConfigError(
                f"`pl_module(inputs)` failed on the inputs taken from the batch ({_describe(inputs)}): "
                f"{type(err).__name__}: {err}. HINT: pass `forward=lambda module, inputs: module(*inputs)` (or what "
                "gives the predictions) if forward takes other arguments, or `split_batch=lambda batch: (inputs, "
                "targets)` if the wrong part of the batch is taken as inputs."
            ) from err
    out = prediction_of(out)
    if not isinstance(out, Tensor):
        keys = f" with keys {sorted(map(str, out))} (recognised: {', '.join(_OUTPUT_KEYS)})" if isinstance(out, dict) else ""
        raise RecipeConfigError(
            f"The model's forward returned {type(out).__name__}{keys}, not a tensor of predictions. "
            "HINT: pass `forward=lambda module, inputs: module(inputs)[...]` returning the logits/predictions."
        )
    return out


def several_optimizers(trainer: Any, pl_module: nn.Module) -> int:
    """How many optimizers training_step steps itself when several (manual optimization: a GAN), else 0."""
    n = len(trainer.optimizers) if not getattr(pl_module, "automatic_optimization", True) else 0
    return n if n > 1 else 0


def prediction_of(out: Any) -> Any:
    """The predictions in what forward returned: a tuple's first item, a dict's ``logits``/``preds``/``output``, an
    output object's attribute of those names; anything else as it is."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if isinstance(out, dict):
        out = next((out[k] for k in _OUTPUT_KEYS if k in out), out)
    elif not isinstance(out, Tensor):  # an output object (a dataclass, a namedtuple-like): its attribute
        out = next((getattr(out, k) for k in _OUTPUT_KEYS if isinstance(getattr(out, k, None), Tensor)), out)
    return out


def _describe(x: Any) -> str:
    """A short description of a batch part: ``tuple of 2 (Tensor (32, 4), Tensor (32, 4))``."""
    if isinstance(x, Tensor):
        return f"Tensor {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        inner = ", ".join(_describe(v) for v in list(x)[:3]) + (", ..." if len(x) > 3 else "")
        return f"{type(x).__name__} of {len(x)} ({inner})"
    if isinstance(x, dict):
        return f"dict with keys {sorted(map(str, x))[:6]}"
    return type(x).__name__


def find_loss(pl_module: nn.Module, loss_fn: Optional[Callable] = None) -> Optional[Callable]:
    """The loss: the argument; else a ``torch.nn`` loss module held by the LightningModule; else ``None``."""
    if loss_fn is not None:
        return loss_fn
    for name in _LOSS_ATTRS:
        v = getattr(pl_module, name, None)
        if isinstance(v, nn.modules.loss._Loss) and _input_target_loss(v):
            return v
    for _, child in pl_module.named_children():
        if isinstance(child, nn.modules.loss._Loss) and _input_target_loss(child):
            return child
    return None


def _input_target_loss(loss: nn.Module) -> bool:
    """Whether ``loss(outputs, targets)`` is a valid call (not ``GaussianNLLLoss``, ``CTCLoss``, margin/triplet losses)."""
    params = inspect.signature(loss.forward).parameters.values()
    return sum(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) <= 2


@dataclass
class TaskSpec:
    """What the loss and the targets say about the task.

    ``loss`` works on canonical ``(outputs, targets)`` (see :mod:`lightning_recipe.functional`).
    """

    task: str
    loss: Callable[[Tensor, Tensor], Tensor]
    loss_name: str
    inferred: bool
    num_outputs: int
    class_dim: Optional[int] = None
    soft_targets: bool = False
    weight: Optional[Tensor] = None
    ignore_index: Optional[int] = None
    label_smoothing: float = 0.0
    pos_weight: Optional[Tensor] = None
    reduction: str = "mean"
    floor: Optional[float] = 0.0
    notes: list[str] = field(default_factory=list)
    probabilities: bool = False  # the model outputs probabilities (BCELoss): canonical outputs are their logits
    time_major: bool = False  # outputs (T, N, C) for targets (N, T): a sequence model without batch_first
    channel_dim: Optional[int] = None  # dense non-multiclass outputs: the head's channel dim (1 or -1)
    positions: int = 1  # output positions per example and channel (pixels, time steps): rows per example

    @property
    def dense(self) -> bool:
        """Several positions per example share one constant per channel (segmentation, autoencoders, per-step)."""
        return self.positions > 1

    def canonical_targets(self, targets: Tensor) -> Tensor:
        """Targets in the canonical layout."""
        if self.task == "multiclass":
            if self.soft_targets:
                return targets.movedim(self.class_dim or 1, -1).reshape(-1, self.num_outputs).float()
            return targets.reshape(-1).long()
        if self.channel_dim == 1 and self.num_outputs > 1 and targets.ndim > 2:
            targets = targets.movedim(1, -1)  # (N, C, d...) -> (N, d..., C): one row per position
        return targets.reshape(-1, self.num_outputs).float()

    def canonical_outputs(self, outputs: Tensor) -> Tensor:
        """Model outputs in the canonical layout ``(M, K)``: logits (the log-odds of probabilities for ``BCELoss``)."""
        if self.task == "multiclass" and outputs.ndim > 2 and self.class_dim == 1:
            outputs = outputs.movedim(1, -1)
        if self.time_major and outputs.ndim == 3:
            outputs = outputs.transpose(0, 1)  # (T, N, C) -> (N, T, C), the targets' order
        if self.task != "multiclass" and self.channel_dim == 1 and self.num_outputs > 1 and outputs.ndim > 2:
            outputs = outputs.movedim(1, -1)  # dense (N, C, d...) -> (N, d..., C): one row per position
        if self.probabilities:
            outputs = torch.logit(outputs.float(), eps=1e-7)
        return outputs.reshape(-1, self.num_outputs)

    def valid_mask(self, canonical_targets: Tensor) -> Optional[Tensor]:
        """Positions not ignored by ``ignore_index``."""
        if self.task == "multiclass" and not self.soft_targets and self.ignore_index is not None:
            return canonical_targets != self.ignore_index
        return None


def _loss_name(loss: Optional[Callable]) -> str:
    return type(loss).__name__ if isinstance(loss, nn.Module) else getattr(loss, "__name__", type(loss).__name__)


def _canonical_loss(loss: Callable, name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """Wrap the user's loss so it takes canonical logits: NLLLoss gets log-probabilities, BCELoss probabilities."""
    if isinstance(loss, nn.Module):
        loss = _cpu_copy(loss)
    if name == "NLLLoss":
        return lambda out, y: loss(torch.log_softmax(out, dim=-1), y)
    if name in _PROBS_BINARY:
        return lambda out, y: loss(torch.sigmoid(out), y)
    return loss


def _cpu_copy(loss: nn.Module) -> nn.Module:
    import copy

    m = copy.deepcopy(loss)
    return m.to("cpu").float()


def resolve_task(
    loss_fn: Optional[Callable], outputs: Tensor, targets: Any, task: Optional[str] = None,
    head: Optional[nn.Module] = None,
) -> TaskSpec:
    """Infer the task, the class dimension and the number of outputs from the loss, the outputs and the targets.

    Dense outputs (one prediction per pixel or time step) get one constant per *channel*, pooled over positions:
    for class-index targets the class dimension of ``(N, C, d...)`` / ``(N, T, C)``; for the other tasks the
    dimension the ``head``'s bias runs along (``(N, C, d...)`` for a convolution, ``(N, ..., C)`` for a linear layer;
    a bias of one entry is shared by every output). Without a ``head`` (or when its bias matches no dimension) every
    output element of an example is its own output, as for ``(N, D)``.

    Example::

        >>> spec = resolve_task(nn.MSELoss(), torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 8, 8), head=nn.Conv2d(5, 3, 1))
        >>> spec.num_outputs, spec.channel_dim, spec.positions
        (3, 1, 64)
        >>> tuple(spec.canonical_outputs(torch.zeros(4, 3, 8, 8)).shape)  # one row per pixel
        (256, 3)
    """
    if not isinstance(targets, Tensor):
        raise RecipeConfigError(
            f"The batch's targets are a {type(targets).__name__}, not a tensor. "
            "HINT: pass `split_batch=lambda batch: (inputs, targets)` returning a target tensor."
        )
    name = _loss_name(loss_fn) if loss_fn is not None else ""
    inferred = False
    _check_loss_options(loss_fn, name, task)
    if task is None:
        if name in _MULTICLASS:
            task = "multiclass"
        elif name in _LOGITS_BINARY + _PROBS_BINARY:
            per_example = targets[0].numel() if targets.ndim > 0 and targets.shape[0] > 0 else 1
            task = "binary" if per_example == 1 else "multilabel"
        elif name in _REGRESSION:
            task = "regression"
        elif _binary_like(outputs, targets):  # 0/1 labels (floats, or integers with one output each): a sigmoid
            per_example = targets[0].numel() if targets.ndim > 0 and targets.shape[0] > 0 else 1
            task = "binary" if per_example == 1 else "multilabel"
        elif not targets.is_floating_point() and targets.dtype != torch.bool:
            task = "multiclass"
        elif targets.is_floating_point():
            task = "regression"
        else:
            raise RecipeConfigError(
                f"Cannot infer the task from targets of dtype {targets.dtype} and loss {name or 'None'}. "
                "HINT: pass `loss_fn=` (e.g. torch.nn.BCEWithLogitsLoss()) or `task=`."
            )
    if loss_fn is None:
        inferred = True
        loss_fn = {"multiclass": nn.CrossEntropyLoss(), "regression": nn.MSELoss()}.get(task, nn.BCEWithLogitsLoss())
        name = type(loss_fn).__name__
    if task == "multiclass" and targets.is_floating_point() and targets.shape == outputs.shape:
        soft, class_dim = True, 1 if outputs.ndim > 1 else 0
    elif task == "multiclass":
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise RecipeConfigError(
                f"Loss {name} expects class indices, but the targets have dtype {targets.dtype} and shape "
                f"{tuple(targets.shape)} (outputs {tuple(outputs.shape)}). HINT: pass `loss_fn=` or `task=`, or "
                "`split_batch=` if the wrong tensor is taken as targets."
            )
        soft, class_dim = False, _class_dim(outputs, targets)
    else:
        soft, class_dim = False, None
    if task == "multiclass":
        num_outputs = outputs.shape[class_dim] if class_dim is not None else 0
    else:
        n = outputs.shape[0] if outputs.ndim else 1
        per_out = outputs.numel() // max(n, 1)
        per_tgt = targets.numel() // max(targets.shape[0] if targets.ndim else 1, 1)
        if per_out != per_tgt:
            raise RecipeConfigError(
                f"The model outputs {tuple(outputs.shape)} do not match the targets {tuple(targets.shape)} for a "
                f"{task} loss ({name}). HINT: pass `forward=` returning predictions shaped like the targets, or "
                "`split_batch=` / `loss_fn=` / `task=` if they were guessed wrong."
            )
        num_outputs = per_out
    channel_dim, positions = None, 1
    if task == "multiclass":
        per_example = targets[0].numel() if targets.ndim > 1 and targets.shape[0] > 0 else 1
        positions = per_example // max(int(num_outputs), 1) if soft else per_example
    else:
        channel_dim, num_outputs = _channel_dim(outputs, targets, head, num_outputs)
        positions = per_out // max(num_outputs, 1)
        if positions > 1 and num_outputs == 1 and task == "multilabel" and name in _LOGITS_BINARY + _PROBS_BINARY:
            task = "binary"  # one logit per pixel: a binary label at every position
    spec = TaskSpec(task=task, loss=_canonical_loss(loss_fn, name), loss_name=name, inferred=inferred,
                    num_outputs=int(num_outputs), class_dim=class_dim, soft_targets=soft,
                    channel_dim=channel_dim, positions=int(positions),
                    time_major=task == "multiclass" and not soft and _time_major(outputs, targets),
                    probabilities=name in _PROBS_BINARY and task in ("binary", "multilabel") and outputs.numel() > 0
                    and bool(((outputs >= 0) & (outputs <= 1)).all()))
    if isinstance(loss_fn, nn.Module):
        w = getattr(loss_fn, "weight", None)
        spec.weight = w.detach().float().cpu() if isinstance(w, Tensor) and task == "multiclass" else None
        ii = getattr(loss_fn, "ignore_index", None)
        spec.ignore_index = int(ii) if ii is not None else None
        spec.label_smoothing = float(getattr(loss_fn, "label_smoothing", 0.0) or 0.0)
        pw = getattr(loss_fn, "pos_weight", None)
        spec.pos_weight = pw.detach().float().cpu() if isinstance(pw, Tensor) else None
        spec.reduction = str(getattr(loss_fn, "reduction", "mean"))
    if name not in _MULTICLASS + _LOGITS_BINARY + _PROBS_BINARY + _REGRESSION:
        spec.floor = None  # a user's loss: no known lower bound
    if spec.dense and task != "multiclass" and spec.channel_dim is not None:
        spec.notes.append(f"dense outputs {tuple(outputs.shape)}: {spec.num_outputs} channel(s) at {spec.positions} "
                          "positions per example, one constant per channel (the head's bias), label statistics pooled "
                          "over positions")
    _check_scalar_loss(spec, outputs, targets)
    if inferred:
        spec.notes.append(f"the loss was inferred from the targets as {name} ({task}); pass `loss_fn=` (or `task=`) "
                          "if training_step uses another")
    return spec


def _channel_dim(
    outputs: Tensor, targets: Tensor, head: Optional[nn.Module], per_out: int
) -> tuple[Optional[int], int]:
    """``(channel_dim, channels)`` of a non-class-index output: the dimension the head's bias runs along.

    A bias with one entry per output element keeps the flat ``(N, D)`` layout; one entry in all is shared by every
    position (``(N, 1, H, W)`` or ``(N, H, W)`` logits of a binary segmentation); one per entry of dim 1 is a
    convolution's channel (``(N, C, d...)``, the targets of the same shape); one per entry of the last dim is a
    linear layer applied at every position (``(N, T, C)``).
    """
    bias = getattr(head, "bias", None) if head is not None else None
    if not isinstance(bias, Tensor) or outputs.ndim < 2 or per_out <= 1:
        return None, per_out
    b, o = bias.numel(), tuple(outputs.shape)
    if b == per_out or b == 0:
        return None, per_out
    if b == 1:
        return -1, 1
    on_last = len(o) >= 3 and o[-1] == b
    on_first = len(o) >= 3 and o[1] == b and tuple(targets.shape) == o
    if on_first and on_last:  # (N, C, L) with L == C: the kind of layer says which dimension its bias runs along
        on_first = not isinstance(head, (nn.Linear, nn.Bilinear))
    if on_first:
        return 1, b
    if on_last:
        return -1, b
    return None, per_out


def _loss_task(name: str) -> Optional[tuple[str, ...]]:
    """The tasks a known loss serves (``None`` for another loss)."""
    if name in _MULTICLASS:
        return ("multiclass",)
    if name in _LOGITS_BINARY + _PROBS_BINARY:
        return ("binary", "multilabel")
    if name in _REGRESSION:
        return ("regression",)
    return None


def _check_loss_options(loss_fn: Optional[Callable], name: str, task: Optional[str]) -> None:
    """Before anything is computed or written: a loss that gives one value per element, a ``task=`` the loss
    contradicts."""
    if isinstance(loss_fn, nn.Module) and getattr(loss_fn, "reduction", "mean") == "none":
        raise RecipeConfigError(
            f"The loss {name}(reduction='none') gives one value per element; the checks need the loss that training "
            f"minimises, one number. HINT: pass `loss_fn=` the loss as training reduces it (e.g. {name}() or "
            "`lambda out, y: criterion(out, y).mean()`)."
        )
    served = _loss_task(name)
    if task is not None and served is not None and task not in served:
        raise RecipeConfigError(
            f"`task={task!r}` was given, but the loss {name} is a {' or '.join(served)} loss. HINT: drop `task=` (the "
            f"loss says it), pass `task=` matching the loss, or `loss_fn=` the loss training uses for a {task} task."
        )


def _check_scalar_loss(spec: TaskSpec, outputs: Tensor, targets: Tensor) -> None:
    """The loss must reduce to one number (a user's ``loss_fn=`` returning a vector would fail later, raw)."""
    try:
        with torch.no_grad():
            out = spec.canonical_outputs(outputs.detach().float().cpu())
            value = spec.loss(out, spec.canonical_targets(targets.detach().cpu()))
    except Exception:  # a loss that does not take the canonical layout is judged where it is used
        return
    if isinstance(value, Tensor) and value.numel() != 1:
        raise RecipeConfigError(
            f"The loss {spec.loss_name} returned a tensor of shape {tuple(value.shape)}, not one number. HINT: pass "
            "`loss_fn=` a loss that reduces to a scalar, as training uses it (e.g. `lambda out, y: "
            "criterion(out, y).mean()`)."
        )


def _binary_like(outputs: Tensor, targets: Tensor) -> bool:
    """Float targets that are all 0 or 1, one per output: labels for a sigmoid, not regression values."""
    n_out = outputs.numel() // max(outputs.shape[0] if outputs.ndim else 1, 1)
    n_tgt = targets.numel() // max(targets.shape[0] if targets.ndim else 1, 1)
    return targets.numel() > 0 and n_out == n_tgt and bool(((targets == 0) | (targets == 1)).all())


def _time_major(outputs: Tensor, targets: Tensor) -> bool:
    """Outputs ``(T, N, C)`` for targets ``(N, T)`` (``T != N``: the order is then unambiguous), as a recurrent or
    transformer layer without ``batch_first=True`` returns them."""
    o, t = tuple(outputs.shape), tuple(targets.shape)
    return len(o) == 3 and len(t) == 2 and t[0] != t[1] and o[:2] == (t[1], t[0])


def _class_dim(outputs: Tensor, targets: Tensor) -> int:
    """Class dimension for class-index targets: ``(N, C)``/``(N, C, d...)`` → 1, ``(N, T, C)`` and the time-major
    ``(T, N, C)`` → -1."""
    o, t = tuple(outputs.shape), tuple(targets.shape)
    if len(o) == len(t) + 1:
        if o[0] == t[0] and o[2:] == t[1:]:
            return 1
        if o[:-1] == t or _time_major(outputs, targets):
            return -1
    if len(o) == 2 and len(t) == 2 and t[1] == 1 and o[0] == t[0]:
        return 1
    if len(o) == 2 and o[0] == targets.numel():
        return 1  # the model flattens (N*T, C) itself
    raise RecipeConfigError(
        f"Cannot match the model outputs {o} to class-index targets {t}: expected (N, C) with (N,), (N, C, d...) "
        "with (N, d...), or (N, T, C) or (T, N, C) with (N, T). HINT: pass `forward=` returning logits in one of these layouts, or "
        "`split_batch=` if the wrong tensor is taken as targets."
    )


@contextlib.contextmanager
def probe_mode(trainer: Any, pl_module: nn.Module) -> Iterator[None]:
    """Run a forward that leaves training bit-identical: eval mode, no grad, isolated RNG, the precision's context.

    Each submodule's own ``training`` flag is restored afterwards (a frozen BatchNorm stays in eval), and so is every
    buffer: a forward that changes state without a ``self.training`` guard (a call counter, a running statistic
    updated in eval mode, a cache) ends with the values and the tensor objects it had before the probe. Only buffers
    are copied (small next to the parameters, which a probe under ``no_grad`` cannot change), and only on probe
    calls, never on the per-step path.
    """
    modes = [(m, m.training) for m in pl_module.modules()]
    buffers = _snapshot_buffers(pl_module)
    ctx = trainer.precision_plugin.forward_context() if trainer is not None else contextlib.nullcontext()
    try:  # under FSDP the module's own parameters are shards: a probe forward runs on the full ones (every rank)
        with isolate_rng(), torch.no_grad(), full_params(trainer), ctx:
            pl_module.eval()
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        _restore_buffers(buffers)


def resolve_module(root: nn.Module, path: str, arg: str = "head") -> nn.Module:
    """``root.<path>`` for a dotted attribute path (``"net.3"``)."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        names = [n for n, m in root.named_modules() if getattr(m, "bias", None) is not None][-5:]
        raise RecipeConfigError(
            f"`{arg}={path!r}` is not a submodule of {type(root).__name__}. Modules with a bias include: {names}."
        ) from None


def find_head(pl_module: nn.Module, call: Callable[[], Tensor]) -> tuple[Optional[nn.Module], Optional[str], Tensor, str]:
    """Detect the head: the last module, in execution order, that has a bias and whose output is the model's output.

    Runs ``call`` (one probe forward) with forward hooks on every module that has a bias. Returns
    ``(module, name, model_output, how)``; ``module`` is ``None`` when no candidate exists.
    """
    names = {m: n for n, m in pl_module.named_modules()}
    seen: list[tuple[nn.Module, Any]] = []
    handles = []
    try:
        for m in pl_module.modules():
            if isinstance(getattr(m, "bias", None), nn.Parameter):
                try:
                    handles.append(m.register_forward_hook(lambda mod, _i, out: seen.append((mod, out))))
                except RuntimeError:  # a scripted/traced submodule takes no hook: it cannot be found (pass `head=`)
                    pass
        output = call()
    finally:
        for h in handles:
            h.remove()
    flat = output.detach().reshape(-1)
    exact = [m for m, o in seen if isinstance(o, Tensor) and (o is output or (o.numel() == flat.numel() and torch.equal(o.detach().reshape(-1), flat)))]
    if exact:
        return exact[-1], names.get(exact[-1]), output, "output identical to the model output"
    same_size = [m for m, o in seen if isinstance(o, Tensor) and o.numel() == flat.numel()]
    if same_size:
        return same_size[-1], names.get(same_size[-1]), output, "last biased module with the output's size (output is transformed after it)"
    if seen and output.ndim >= 3 and isinstance(seen[-1][1], Tensor):
        last, o = seen[-1]
        if o.ndim == output.ndim and tuple(o.shape[:2]) == tuple(output.shape[:2]):
            # a dense head resized after it (segmentation logits upsampled to the input size): a constant map stays
            # constant, so its bias per channel is still the constant prediction
            return last, names.get(last), output, "last biased module, with the output's channels (resized after it)"
    return None, None, output, "no module with a bias produces the model output"


def planned_batches(trainer: Any) -> Optional[float]:
    """The number of training batches the fit plans to run (``estimated_stepping_batches`` times the accumulation),
    or ``None`` when it is unknown (an iterable without length, ``max_steps=-1`` with ``max_epochs=-1``)."""
    try:
        planned = float(trainer.estimated_stepping_batches) * trainer.accumulate_grad_batches
    except Exception:  # an iterable dataset without length, or a dataloader that cannot be measured
        return None
    return planned if math.isfinite(planned) and planned > 0 else None


def read_losses(losses: list[Tensor]) -> list[float]:
    """One-element loss tensors kept on the device, as host floats: one stack and one copy (the one host sync)."""
    try:
        stacked = torch.stack(losses)  # the usual case: every loss has the same shape, () or (1,)
    except RuntimeError:
        stacked = torch.stack([t.reshape(()) for t in losses])
    return stacked.float().reshape(-1).tolist()
