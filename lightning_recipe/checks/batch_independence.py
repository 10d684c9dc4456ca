"""``BatchIndependenceCheck``: the recipe's "use backprop to chart dependencies"."""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from typing_extensions import override

from lightning_recipe._core.base import OnFail, _OnceCheck
from lightning_recipe._core.conventions import probe_mode, resolve_module, run_forward
from lightning_recipe.exceptions import RecipeConfigError
from lightning_recipe.findings import Finding
from lightning_recipe.functional.batch_independence import batch_leaks, future_leaks
from lightning_recipe.functional.data import NEXT_TOKEN_FRACTION, labelled_positions, token_alignment

_BATCH_CAUSES = [
    "`view`/`reshape` used where `transpose`/`permute` was meant, which interleaves examples "
    "(e.g. `h.view(T, N, -1)` on an (N, T, ...) tensor)",
    "a statistic over the batch dimension (`x - x.mean(0)`, normalisation by batch statistics, "
    "BatchNorm with track_running_stats=False)",
    "a reduction or softmax over dim 0 where the feature or time dimension was meant",
]
_CAUSAL_CAUSES = [
    "attention without a causal mask (the output at t attends to later positions)",
    "a bidirectional RNN or a centred (non-causal) convolution in an autoregressive model",
    "inputs and targets not shifted by one: the target of position t is fed as an input",
]
_MODEL_PARALLEL = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


class BatchIndependenceCheck(_OnceCheck):
    """The output of example ``i`` must depend on example ``i`` of the batch only (and, in causal mode, the output at
    position ``t`` on positions ``<= t`` only).

    At fit start, on the model itself in eval mode (BatchNorm uses its running statistics, dropout is off; each
    submodule's mode, every parameter's ``requires_grad`` flag and every buffer are put back afterwards, the random
    state is isolated, and no parameter's ``.grad`` is touched: parameters are taken out of the autograd graph for the
    probe and only the inputs are differentiated, with ``torch.autograd.grad``), the check takes the probe batch (at
    most ``max_batch_size`` examples), computes for ``num_examples`` examples ``i`` the gradient of a fixed random
    projection of output ``i`` with respect to the whole input batch, and measures per example ``j`` the size
    ``m_j = sum |grad_j|``. A healthy model gives exactly zero outside ``i`` (no arithmetic mixes examples), so the
    threshold is a relative round-off tolerance: example ``j`` leaks when ``m_j > rtol * max_k m_k``. Integer inputs
    (token ids) cannot be differentiated: the gradient is taken with respect to the output of the ``nn.Embedding``
    that consumes them (or the module named by ``embedding=``).

    In causal mode (autoregressive models, inputs and outputs ``(N, T, ...)`` with time on ``time_dim``), for
    ``num_positions`` positions ``t``, each on another example ``i`` of the batch, the gradient of output ``(i, t)``
    must also vanish on the input positions of ``i`` after ``t``: a missing attention mask, a bidirectional layer or
    a target fed as an input shows up here. The positions share one backward pass (their examples are distinct and
    do not mix, so each gradient stays within its own example); when examples do mix, the batch failure is reported
    and the causal verdict is not given. Causal mode is on with ``causal=True``, off with ``causal=False``, and by
    default (``causal=None``) turned on automatically when the probe batch is next-token prediction: integer
    ``(N, T)`` inputs and targets, ``T > 1``, the targets the inputs shifted by one (``y[:, t] == x[:, t + 1]``) on
    at least 95% of the labelled positions (see :func:`~lightning_recipe.functional.data.token_alignment`); the finding
    says so. When the outputs are not ``(N, T, ...)`` (a model that flattens them itself) the automatic causal mode
    is left out with a note instead of an error.

    Two host syncs in all (the automatic causal detection and the gradients). No copy of the model: the memory added
    is the probe's activations and a snapshot of the buffers (on the device up to 5% of the parameters' bytes, the
    rest on the host). Skipped on a resume and under model-parallel strategies (FSDP, DeepSpeed), where one rank
    cannot differentiate the sharded model on its own.

    Args:
        on_fail: ``"raise"`` or ``"warn"``.
        num_examples: examples ``i`` whose output is differentiated (spread over the batch).
        causal: also check that no output depends on later positions: ``True``, ``False``, or ``None`` (default) to
            turn it on when the targets are the inputs shifted by one position.
        time_dim: time dimension of the inputs (or of the embedding output) in causal mode; the outputs have time on
            dimension 1 (class-first logits ``(N, C, T)`` of a ``CrossEntropyLoss`` are read as ``(N, T, C)``).
        num_positions: positions ``t`` checked in causal mode (at most one per example of the probe batch).
        max_batch_size: examples of the probe batch used.
        rtol: relative size of a gradient that counts as a dependence.
        embedding: for integer inputs, the module whose output is differentiated (attribute path or module);
            default: the ``nn.Embedding`` that consumes the inputs.
        seed: seed of the private generator of the output projection.
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see :class:`RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[BatchIndependenceCheck(num_examples=2)], logger=False)
    """

    def __init__(
        self,
        on_fail: OnFail = "raise",
        num_examples: int = 3,
        causal: Optional[bool] = None,
        time_dim: int = 1,
        num_positions: int = 4,
        max_batch_size: int = 64,
        rtol: float = 1e-5,
        embedding: Optional[Union[str, nn.Module]] = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(on_fail, **kwargs)
        for name, v, low in (("num_examples", num_examples, 1), ("num_positions", num_positions, 1),
                             ("max_batch_size", max_batch_size, 2)):
            if not isinstance(v, int) or v < low:
                raise RecipeConfigError(f"{self.name}: `{name}` must be an int >= {low}, got {v!r}.")
        if not (0 < rtol < 1):
            raise RecipeConfigError(f"{self.name}: `rtol` must be in (0, 1), got {rtol!r}.")
        if embedding is not None and not isinstance(embedding, (str, nn.Module)):
            raise RecipeConfigError(f"{self.name}: `embedding` must be an attribute path or a module, got "
                                    f"{type(embedding).__name__}.")
        self.num_examples = num_examples
        self.causal = None if causal is None else bool(causal)
        self.time_dim = int(time_dim)
        self.num_positions = num_positions
        self.max_batch_size = max_batch_size
        self.rtol = float(rtol)
        self.embedding = embedding
        self.seed = int(seed)
        self.done = False

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        ctx = self._start(trainer, pl_module)
        if ctx is None:
            return
        causal, auto = self.causal, None
        if causal is None:
            auto = _next_token(ctx.inputs, ctx.targets, ctx.spec.ignore_index)
            causal = auto is not None
        try:
            class_first = ctx.spec.task == "multiclass" and ctx.spec.class_dim == 1
            labelled = _labelled(ctx.targets, ctx.spec.ignore_index) if causal else None
            finding = self._measure(trainer, pl_module, ctx.inputs, causal, auto, class_first, labelled)
        except RecipeConfigError as err:
            self._config_error(str(err))
            return
        self._conclude(trainer, finding)

    # -- measurement ----------------------------------------------------------------------------------------------
    def _skip(self, why: str) -> Finding:
        return Finding(self.name, "skip", f"{self.name}: {why}")

    def _measure(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", inputs: Any, causal: bool,
                 auto: Optional[float] = None, class_first: bool = False,
                 labelled: Optional[Tensor] = None) -> Finding:
        """The finding; ``auto`` is the fraction of next-token positions when causal mode was turned on by itself,
        ``class_first`` says that the outputs are class-first logits ``(N, C, T, ...)``."""
        finding = self._probe(trainer, pl_module, inputs, causal, auto, class_first, labelled)
        if auto is not None and finding.details.get("causal"):
            finding.details["causal"] = "auto"
            finding.details["next_token_fraction"] = auto
            finding.message += (" Causal mode was turned on automatically: the targets are the inputs shifted by one "
                                f"position (next-token prediction, on {auto:.1%} of the labelled positions of the "
                                "probe batch); pass `causal=False` to turn it off.")
        return finding

    def _probe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", inputs: Any, causal: bool,
               auto: Optional[float], class_first: bool, labelled: Optional[Tensor] = None) -> Finding:
        if type(trainer.strategy).__name__ in _MODEL_PARALLEL:
            return self._skip(f"not run under {type(trainer.strategy).__name__} (a sharded model cannot be "
                              "differentiated on one rank).")
        found = _batched(inputs, self.max_batch_size)
        if found is None:
            return self._skip(f"the inputs are a {type(inputs).__name__} holding no batched tensor (N, ...) to "
                              "differentiate. HINT: pass `split_batch=` returning the input tensor and `forward=` "
                              "consuming it.")
        x, wrap, n = found
        if n < 2:
            return self._skip("the probe batch has a single example: nothing to compare.")
        with _Frozen(pl_module):  # parameters out of the graph, buffers put back: the model is probed in place
            return self._probe_frozen(trainer, pl_module, x, n, causal, auto, class_first, labelled, wrap)

    def _probe_frozen(self, trainer: "pl.Trainer", model: "pl.LightningModule", x: Tensor, n: int, causal: bool,
                      auto: Optional[float], class_first: bool, labelled: Optional[Tensor],
                      wrap: Callable[[Tensor], Any] = lambda t: t) -> Finding:
        holder: dict[str, Any] = {}
        handles = []
        what = "the inputs"
        try:
            if x.is_floating_point():
                holder["leaf"] = x.clone().requires_grad_(True)
                feed = wrap(holder["leaf"])
            else:
                modules = self._embeddings(model)
                if not modules:
                    return self._skip(f"the inputs are {x.dtype} (token ids?) and no nn.Embedding was found to "
                                      "differentiate through. HINT: pass `embedding=` naming the module that consumes "
                                      "them.")

                def hook(mod: nn.Module, args: tuple, out: Any) -> Any:
                    if "leaf" in holder or not isinstance(out, Tensor) or not out.is_floating_point():
                        return None
                    if not (args and isinstance(args[0], Tensor) and args[0].shape == x.shape):
                        return None
                    holder["leaf"], holder["module"] = out.detach().requires_grad_(True), mod
                    return holder["leaf"]

                for m in modules:
                    try:
                        handles.append(m.register_forward_hook(hook))
                    except RuntimeError as err:  # a scripted module takes no hook
                        return self._skip(f"the embedding ({type(m).__name__}) takes no forward hook ({err}). HINT: "
                                          "pass `embedding=` naming an eager module that consumes the inputs.")
                feed = wrap(x)
            with probe_mode(trainer, model), torch.enable_grad():
                try:
                    out = run_forward(model, feed, self._settings.forward)
                    if class_first and out.ndim > 2:
                        out = out.movedim(1, -1)  # (N, C, T, ...) logits, PyTorch's layout: time on dimension 1
                except RecipeConfigError:
                    raise
                except Exception as err:  # e.g. a forward that cannot run with its parameters frozen
                    return self._skip(f"the probe forward of the model failed ({type(err).__name__}: {err}).")
                leaf = holder.get("leaf")
                if leaf is None:
                    return self._skip(f"no embedding consumed the inputs {tuple(x.shape)}. HINT: pass `embedding=`.")
                if "module" in holder:
                    name = next((k for k, m in model.named_modules() if m is holder["module"]), "embedding")
                    what = f"the output of `{name}`"
                return self._gradients(out, leaf, n, what, causal, auto is not None, labelled)
        finally:
            for h in handles:
                h.remove()

    def _embeddings(self, model: nn.Module) -> list[nn.Module]:
        if self.embedding is None:
            return [m for m in model.modules() if isinstance(m, nn.Embedding)]
        if isinstance(self.embedding, str):
            return [resolve_module(model, self.embedding, arg="embedding")]
        if not any(m is self.embedding for m in model.modules()):
            raise RecipeConfigError(f"`embedding` is not a submodule of {type(model).__name__}.")
        return [self.embedding]

    def _gradients(self, out: Tensor, leaf: Tensor, n: int, what: str, causal: bool, auto: bool,
                   labelled: Optional[Tensor] = None) -> Finding:
        if out.ndim == 0 or out.shape[0] != n:
            return self._skip(f"the output has shape {tuple(out.shape)}; its first dimension is not the batch ({n}). "
                              "HINT: pass `forward=` returning per-example outputs (N, ...).")
        if not out.requires_grad:
            return self._skip(f"the output does not depend on {what} at all (no gradient path): see "
                              "InputDependenceCheck.")
        gen = torch.Generator().manual_seed(self.seed)
        proj = torch.randn(tuple(out.shape[1:]), generator=gen).to(device=out.device, dtype=torch.float32)
        examples = _spread(n - 1, min(self.num_examples, n))
        t_dim = self.time_dim if self.time_dim >= 0 else leaf.ndim + self.time_dim
        note = ""
        if causal and (out.ndim < 2 or leaf.ndim <= t_dim or t_dim == 0 or leaf.shape[t_dim] != out.shape[1]):
            shapes = f"outputs {tuple(out.shape)} and {what} {tuple(leaf.shape)}"
            if not auto:
                raise RecipeConfigError(
                    f"`causal=True` needs outputs (N, T, ...) and inputs with the same T on `time_dim`="
                    f"{self.time_dim}; got {shapes}. HINT: set `time_dim=` or pass `forward=` returning (N, T, ...) "
                    "outputs.")
            causal = False
            note = (f" The targets are the inputs shifted by one, but causal mode could not run on {shapes} (no time "
                    "axis T on dimension 1 of the outputs): pass `forward=` returning (N, T, ...) outputs, or "
                    "`causal=False`.")
        rows: list[Tensor] = []  # per probed output: (n,) dependence on each example
        for i in examples:
            scalar = (out[i].float() * proj).sum()
            rows.append(self._grad(scalar, leaf).reshape(n, -1).sum(1))
        causal_m, causal_keys, owners = None, [], []
        if causal and out.shape[1] > 1:
            # one position per example, all in one backward: examples do not mix, so each gradient stays in its own
            steps = out.shape[1]
            positions = _spread(steps - 2, min(self.num_positions, steps - 1, n))
            owners = _spread(n - 1, len(positions))
            if labelled is not None and labelled.shape[0] >= n and labelled.shape[1] == steps:
                # only outputs that are trained: a prefix language model's unlabelled prefix sees both ways on purpose
                pairs = [(ex, min(ok, key=lambda u: abs(u - t))) for ex, t in zip(owners, positions)
                         if (ok := labelled[ex, : steps - 1].nonzero().flatten().tolist())]
                owners, positions = [ex for ex, _ in pairs], [t for _, t in pairs]
        if owners:
            scalar = sum((out[ex, t].float() * proj[t]).sum() for ex, t in zip(owners, positions))
            g = self._grad(scalar, leaf)[owners]  # (P, ..., T on t_dim, ...)
            causal_m = g.movedim(t_dim, 1).reshape(len(owners), g.shape[t_dim], -1).sum(2)
            causal_keys = list(zip(owners, positions))
        batch_m = torch.stack(rows).cpu()  # the one host sync (with the next line)
        finding = self._judge(batch_m, examples, causal_m.cpu() if causal_m is not None else None, causal_keys, n, what)
        finding.message += note
        return finding

    @staticmethod
    def _grad(scalar: Tensor, leaf: Tensor) -> Tensor:
        """``|d scalar / d leaf|`` (zeros where the scalar does not depend on the leaf)."""
        (grad,) = torch.autograd.grad(scalar, leaf, retain_graph=True, allow_unused=True)
        return torch.zeros_like(leaf, dtype=torch.float32) if grad is None else grad.detach().float().abs()

    def _judge(self, batch_m: Tensor, owners: list[int], causal_m: Optional[Tensor], causal_keys: list[tuple[int, int]],
               n: int, what: str) -> Finding:
        leaks = {}
        worst = 0.0
        for row, i in zip(batch_m, owners):
            res = batch_leaks(row, i, self.rtol)
            worst = max(worst, res["ratio"])
            if res["leaking"]:
                leaks.setdefault(i, res)
        future = {}
        worst_future = 0.0
        if causal_m is not None and not leaks:  # examples that mix would spread one position's gradient to others
            for row, (ex, t) in zip(causal_m, causal_keys):
                res = future_leaks(row, t, self.rtol)
                worst_future = max(worst_future, res["ratio"])
                if res["leaking"]:
                    future[(ex, t)] = res
        details = {"batch_size": n, "examples": sorted(set(owners)), "max_leak_ratio": worst,
                   "max_future_ratio": worst_future, "wrt": what, "rtol": self.rtol, "causal": causal_m is not None}
        msgs, causes = [], []
        if leaks:
            parts = []
            for i, res in list(leaks.items())[:3]:
                shown = res["leaking"][:8]
                more = f" and {len(res['leaking']) - len(shown)} more" if len(res["leaking"]) > len(shown) else ""
                parts.append(f"output {i} depends on examples {shown}{more} ({len(res['leaking'])} of {n - 1} others; "
                             f"largest gradient there {res['ratio']:.3g} x the largest)")
            msgs.append(f"examples of the batch are mixed: the gradient of an example's output w.r.t. {what} must be "
                        f"zero outside that example, measured: " + "; ".join(parts) + ".")
            causes += _BATCH_CAUSES
            details["leaks"] = {str(i): r["leaking"] for i, r in leaks.items()}
            if causal_m is not None:
                msgs.append("causal mode not judged while examples mix.")
        if future:
            parts = []
            for (ex, t), res in list(future.items())[:3]:
                shown = res["leaking"][:8]
                parts.append(f"output (example {ex}, position {t}) depends on later positions {shown} (largest "
                             f"gradient there {res['ratio']:.3g} x the largest at positions <= {t})")
            msgs.append("the model sees the future: " + "; ".join(parts) + ".")
            causes += _CAUSAL_CAUSES
            details["future"] = {f"{ex},{t}": r["leaking"] for (ex, t), r in future.items()}
        if msgs:
            hint = (" HINT: if examples are meant to interact (set or contrastive models, batch-level attention), leave "
                    "this check out (`strict(exclude=[\"BatchIndependenceCheck\"])`); if the output's batch dimension "
                    "is not dim 0, pass `forward=`.")
            if future:
                hint += " For a model allowed to see the whole sequence, pass `causal=False`; set `time_dim=` if time is not dim 1."
            return Finding(self.name, "fail", f"{self.name}: " + " ".join(msgs) + hint, max(worst, worst_future), 0.0,
                           0, causes, details)
        scope = f"{len(set(owners))} outputs over a batch of {n}"
        if causal_m is not None:
            scope += f"; {len(causal_keys)} positions, one per example, depend on no later position"
        return Finding(self.name, "pass", f"{self.name}: the gradient of each probed output w.r.t. {what} is zero "
                       f"outside its own example ({scope}; largest relative leak {worst:.3g}).", worst, 0.0, 0, [],
                       details)


class _Frozen:
    """The model probed in place: parameters out of the autograd graph, buffers put back as they were.

    On entry every parameter's ``requires_grad`` flag is recorded and set to ``False`` (the probe differentiates the
    inputs only, with ``torch.autograd.grad``: no parameter's ``.grad`` is read or written), and every buffer is
    snapshotted; on exit the flags are set back exactly, buffers that the forward replaced are put back (the original
    tensor objects, which optimizers or other modules may hold) and every buffer's values are copied back. Snapshots
    stay on the device up to :data:`_BUFFER_BUDGET` of the parameters' bytes, smallest buffers first (BatchNorm
    statistics); larger buffers (a big positional table or cache) are snapshotted on the host, so that the device
    holds no more than that budget (on a CPU model the host is the device: only a model whose buffers outweigh 5% of
    its parameters exceeds it).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> "_Frozen":
        params = list(self.model.parameters())
        self.flags = [(p, p.requires_grad) for p in params]
        budget = _BUFFER_BUDGET * sum(p.numel() * p.element_size() for p in params)
        self.buffers: list[tuple[nn.Module, str, Tensor, Tensor]] = []
        owned = [(m, k, b) for m in self.model.modules() for k, b in m._buffers.items() if isinstance(b, Tensor)]
        with torch.no_grad():
            for m, k, b in sorted(owned, key=lambda e: e[2].numel() * e[2].element_size()):
                size = b.numel() * b.element_size()
                on_device = size <= budget or b.device.type == "cpu"
                budget -= size if size <= budget else 0
                self.buffers.append((m, k, b, b.clone() if on_device else b.to("cpu", copy=True)))
        for p, _ in self.flags:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc: Any) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for m, k, b, snap in self.buffers:
                m._buffers[k] = b
                b.copy_(snap)
        self.flags, self.buffers = [], []


_BUFFER_BUDGET = 0.05  # buffers snapshotted on the device, as a fraction of the parameters' bytes


def _spread(last: int, k: int) -> list[int]:
    """``k`` integers spread evenly over ``[0, last]`` (distinct when ``k <= last + 1``)."""
    return sorted({int(round(v)) for v in torch.linspace(0, last, k).tolist()})


def _labelled(targets: Any, ignore_index: Optional[int]) -> Optional[Tensor]:
    """``(N, T)`` positions of class-index targets that carry a label (not negative, not ``ignore_index``), on the
    host, or ``None`` for other targets."""
    if not isinstance(targets, Tensor) or targets.ndim != 2 or targets.is_floating_point() or targets.dtype == torch.bool:
        return None
    return labelled_positions(targets, ignore_index).cpu()


def _batched(inputs: Any, max_batch: int) -> Optional[tuple[Tensor, Callable[[Tensor], Any], int]]:
    """The tensor of ``inputs`` to differentiate, a function putting a tensor in its place, and the examples probed.

    A tensor is itself (its first ``max_batch`` examples). A tuple, list or dict (``(x, mask)``, ``(x, lengths)``,
    ``{"ids": ..., "mask": ...}``): the first floating tensor of at least two dimensions whose first dimension is the
    batch's (``N``, the first dimension of the first tensor), else the first such integer tensor (token ids, through
    their embedding); every other tensor with first dimension ``N`` is cut to the same examples, the rest is left as
    it is. ``None`` when there is no such tensor.

    Example::

        >>> x, mask = torch.randn(5, 3, 2), torch.ones(5, 3, dtype=torch.bool)
        >>> t, wrap, n = _batched((x, mask), 4)
        >>> tuple(t.shape), n, [tuple(v.shape) for v in wrap(t)]
        ((4, 3, 2), 4, [(4, 3, 2), (4, 3)])
    """
    if isinstance(inputs, Tensor):
        if inputs.ndim == 0:
            return None
        n = min(inputs.shape[0], max_batch)
        return inputs[:n].detach(), lambda t: t, n
    found: list[Tensor] = []
    apply_to_collection(inputs, Tensor, lambda t: found.append(t) or t)
    batched = [t for t in found if t.ndim >= 1]
    if not batched:
        return None
    size = batched[0].shape[0]
    n = min(size, max_batch)
    candidates = [t for t in batched if t.ndim >= 2 and t.shape[0] == size]
    chosen = [t for t in candidates if t.is_floating_point()] or [t for t in candidates if t.dtype != torch.bool]
    if not chosen:
        return None
    x = chosen[0]

    def wrap(leaf: Tensor) -> Any:
        def put(t: Tensor) -> Tensor:
            if t is x:
                return leaf
            return t[:n] if t.ndim >= 1 and t.shape[0] == size else t

        return apply_to_collection(inputs, Tensor, put)

    return x[:n].detach(), wrap, n


def _next_token(inputs: Any, targets: Any, ignore_index: Optional[int]) -> Optional[float]:
    """The fraction of labelled positions where ``y[:, t] == x[:, t + 1]`` when the batch is next-token prediction
    (integer ``(N, T)`` inputs and targets, ``T > 1``, at least ``NEXT_TOKEN_FRACTION``), else ``None``."""
    if not (isinstance(inputs, Tensor) and isinstance(targets, Tensor)) or inputs.ndim != 2 or inputs.shape[1] < 2:
        return None
    a = token_alignment(inputs, targets, ignore_index)
    if a is None or a["shifted"] is None or a["shifted"] < NEXT_TOKEN_FRACTION:
        return None
    return a["shifted"]


