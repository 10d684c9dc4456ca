"""``ActivationCheck``: the recipe's "init well for the activation; watch the intermediate activations"."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from typing_extensions import override

from lightning_recipe._core.base import OnFail, _OnceCheck
from lightning_recipe._core.conventions import probe_mode, run_forward
from lightning_recipe.exceptions import RecipeWarning
from lightning_recipe.findings import Finding
from lightning_recipe.functional.activations import _SIGMOID_EDGE, _STATS, _TANH_EDGE, _phi, _stats, _varies
from lightning_recipe.functional.data import _WEIGHT_LAYERS
from lightning_recipe._core.dtypes import wide

_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.Tanhshrink,
    nn.LogSigmoid,
)
_SAT_CAUSES = [
    "weights initialised too large for a tanh/sigmoid (e.g. N(0, 1) or He init on wide layers): use Xavier/Glorot "
    "init (`nn.init.xavier_uniform_`, gain `nn.init.calculate_gain('tanh')`)",
    "inputs not scaled (raw pixel values 0-255, unstandardised features) feeding a tanh/sigmoid layer",
    "a bias initialised far from 0 in front of a tanh/sigmoid",
]
_DEAD_CAUSES = [
    "a large negative bias (or a weight init with a negative mean) in front of a ReLU: every unit is 0 on every "
    "example and no gradient flows through it (dead ReLUs)",
    "weights (or a norm layer's gain) initialised to zero in a layer that every path from the input goes through",
    "an input that is not used (a forward that ignores `x`), or a mask that zeroes every value",
]
_DEPTH = (1e-3, 1e3)
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
# the leaves whose constant output reads as a dead layer (a custom leaf returning a learned constant, e.g. a query or
# a positional table expanded to the batch, is constant by design)
_CUTTERS = _WEIGHT_LAYERS + _ACTIVATIONS + _NORMS


class ActivationCheck(_OnceCheck):
    """Intermediate activations at init: saturated tanh/sigmoid layers, dead layers, std drifting across depth.

    At ``on_train_start`` (after :class:`~lightning_recipe.HeadBiasInit` when listed after it, before the first step)
    the check runs one forward of the fit's probe batch under the probe mode (eval, no grad, isolated random state:
    training stays bit-identical; a BatchNorm layer that trains normalises with the batch's statistics as in training,
    where eval mode would use its initial running statistics, mean 0 and variance 1, and pass uncentred inputs such as
    pixels in [0, 1] through unnormalised) with forward hooks on every leaf module (removed afterwards, also on an
    error). Each call of a leaf gives a few numbers, brought to the host in one transfer after the forward:

    * ``ActivationCheck.saturation`` (``warn``): an ``nn.Tanh`` output with ``|tanh| > 0.99`` (pre-activation beyond
      ``atanh(0.99) = 2.647``) or an ``nn.Sigmoid`` output outside ``[0.01, 0.99]`` (``|pre| > 4.595``) is saturated:
      its gradient is below 2% (tanh) or 4% (sigmoid) of its largest. Warns when more than half of a layer's units are
      saturated on more than half of the probe examples. For pre-activations ``N(0, s^2)`` the saturated share is
      ``2 * (1 - Phi(2.647 / s))`` (tanh), which passes one half at ``s = 3.92`` (sigmoid: ``s = 6.81``). Healthy inits stay
      far below: on standardised inputs PyTorch's default init gives ``s ~ 0.58`` (saturated share ``4e-6``), Xavier
      ``s <= 1`` (``8e-3``; ``s <= 5/3`` with the tanh gain: 11%), even He init ``s = 1.41`` (6%); weights ``N(0, 1)`` on 8
      standardised inputs give ``s = 2.8`` (35%, passes), ``N(0, 3^2)`` ``s = 8.5`` (76%, warns), raw 0-255 pixels ``s``
      in the hundreds. Measured (``benchmarks/activations_calibration.py --sweep``: tanh and sigmoid MLPs, 3 hidden
      layers of 128, on the four bundled tables): under default, Xavier (gain 1 or 5/3), orthogonal and He inits at most
      6.9% of a layer's outputs saturate and at most 1.6% of the examples have half of a layer's units saturated (0 of
      40 configurations warn); ``N(0, 1)`` and ``N(0, 3^2)`` weights give 54-94% saturated, 89-100% of the examples, and
      warn (16 of 16), so do raw inputs (a tanh on digits 0-16, breast cancer, wine: 54-99%; a sigmoid on breast cancer,
      wine: 95-98%); raw 0-16 digits into a sigmoid (29% saturated, no example over half) pass: a missed alarm, not a
      false one. The measured saturated share, the share of examples over half saturated and the pre-activation std are
      in ``details``. Not a ``fail``: a model may saturate on purpose (a gate, a hard attention).
    * ``ActivationCheck.dead`` (``fail``): a leaf whose output is **exactly constant across the probe examples** (zero
      included: a ReLU behind a bias of -100) while its input varies (a weight layer, an activation or a norm layer: a
      custom leaf may return a learned constant, a query or a table, by design), when the signal is cut on every path:
      the head's input (the model's output when no head is known) is constant across the examples too while the model's
      inputs vary. The prediction is then the same for every example, and no gradient reaches the layers before the cut.
      A constant layer that some other path bypasses (a zero-initialised residual branch, "zero-init the last BN gamma",
      ReZero) is a ``note``; a zero-initialised head is its own constant and passes. So is a ReLU layer with more than
      half of its units zero on every probe example (partly dead: a ``note``; with default init a unit is zero on ``B``
      examples with probability about ``2^-B``).
    * ``ActivationCheck.depth`` (``note``): the std of the outputs of the weight layers (``Linear``, ``Conv``,
      ``Embedding``, ``RNN``s, ...) and activations in execution order, the head left out; notes when the last one over
      the first one leaves ``[1e-3, 1e3]``; layers whose output is constant across the probe examples (a
      zero-initialised residual branch) are left out of the ratio, ``.dead`` judges them. Plain nets without
      normalisation drift legitimately (a default-init ReLU MLP loses a factor ~0.41 of std per layer: ``1e-3`` after
      ~8 layers), so this is never a warning. On the 64 healthy fits of the calibration corpus the ratio lies in
      ``[0.0075, 0.35]`` (the unscaled-inputs tabular fit reaches 43); the band ``[1e-3, 1e3]`` leaves a factor 7
      below the lowest healthy one. The per-layer stds are in ``details``.

    Layers that run inside a module (the gates of ``nn.LSTM``, a fused attention) are not leaves and are not seen.
    The batch dimension is taken to be the first of each leaf's output.

    Args:
        on_fail: ``"raise"`` or ``"warn"``: what a ``fail`` (a dead layer cutting the signal) does.
        **kwargs: overrides (``split_batch``, ``forward``, ``loss_fn``, ``head``, ``task``), see
            :class:`~lightning_recipe.RecipeCheck`.

    Example::

        >>> import lightning as L
        >>> trainer = L.Trainer(callbacks=[ActivationCheck(on_fail="warn")], logger=False)
    """

    def __init__(self, on_fail: OnFail = "raise", **kwargs: Any) -> None:
        super().__init__(on_fail, **kwargs)
        self.done = False

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        ctx = self._start(trainer, pl_module)
        if ctx is None:
            return
        rows = self._probe(trainer, pl_module, ctx)
        findings = self._judge(rows, ctx)
        for finding in findings:
            if finding.status == "warn":
                rank_zero_warn(finding.message, category=RecipeWarning)
            self._conclude(trainer, finding)

    # -- measuring ------------------------------------------------------------------------------------------------
    def _probe(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", ctx: Any) -> dict[str, Any]:
        names = {m: n for n, m in pl_module.named_modules()}
        leaves = [m for m in pl_module.modules() if next(m.children(), None) is None]
        head = ctx.head
        if head is not None and head not in leaves:
            leaves.append(head)
        calls: list[tuple[nn.Module, Tensor]] = []
        head_in: list[Tensor] = []
        pending: dict[int, list[tuple[int, Tensor, Tensor]]] = {}

        def pre_hook(module: nn.Module, args: Any) -> None:
            # the input measured before the call: an in-place layer (ReLU(inplace=True)) overwrites it
            i = _first_tensor(args)
            if i is None or i.ndim == 0:
                pending.setdefault(id(module), []).append((-1, torch.ones(()), torch.zeros(())))
                return
            std = i.detach().float().std(unbiased=False) if i.numel() > 1 else i.new_zeros((), dtype=torch.float)
            pending.setdefault(id(module), []).append((int(i.shape[0]), _varies(i.detach()), std))

        def hook(module: nn.Module, args: Any, out: Any) -> None:
            stack = pending.get(id(module))
            n, varies, std = stack.pop() if stack else (-1, torch.ones(()), torch.zeros(()))
            o = _first_tensor(out)
            if module is head:
                head_in.append(varies if n >= 0 else torch.ones((), device=_dev(o)))
            if o is None or not o.is_floating_point() or o.numel() == 0 or o.ndim == 0:
                return
            in_varies = varies.float().to(o.device) if n == o.shape[0] else o.new_zeros(())
            calls.append((module, _stats(module, o, in_varies, std.to(o.device))))

        handles = []
        try:
            for m in leaves:
                try:
                    handles.append(m.register_forward_pre_hook(pre_hook))
                    handles.append(m.register_forward_hook(hook))
                except RuntimeError:  # a scripted (torch.jit) module takes no hook: its layers are not measured
                    continue
            # a BatchNorm that trains normalises with each batch's statistics (its running ones are still their
            # defaults at init): it does so in the probe too (its buffers are restored afterwards); not SyncBatchNorm,
            # whose batch statistics are a collective
            batch_norms = [m for m in pl_module.modules() if m.training and isinstance(m, _BatchNorm)
                           and not isinstance(m, nn.SyncBatchNorm)] if (_batch_size(ctx.inputs) or 0) > 1 else []
            with probe_mode(trainer, pl_module):
                for m in batch_norms:
                    m.train()
                out = run_forward(pl_module, ctx.inputs, self._settings.forward)
                xs = [t for t in _tensors(ctx.inputs) if t.ndim > 0]
                inputs_vary = (torch.stack([_varies(t).to(out.device) for t in xs]).any() if xs
                               else torch.ones((), dtype=torch.bool, device=out.device))
                out_varies = _varies(out.detach()) if out.ndim > 0 else torch.zeros((), device=out.device)
        finally:
            for h in handles:
                h.remove()
        # one transfer to the host
        dev = out.device
        flat = [inputs_vary.float().reshape(1).to(dev), out_varies.float().reshape(1).to(dev)]
        flat += [h.float().reshape(1).to(dev) for h in head_in]
        flat += [s.to(dev) for _, s in calls]
        host = wide(torch.cat(flat)).tolist() if flat else []
        n_head = len(head_in)
        per = host[2 + n_head:]
        counts: dict[str, int] = {}
        layers = []
        for k, (m, _) in enumerate(calls):
            name = names.get(m, type(m).__name__) or type(m).__name__
            j = counts.get(name, 0)
            counts[name] = j + 1
            v = per[k * _STATS:(k + 1) * _STATS]
            layers.append({"name": name if j == 0 else f"{name} (call {j + 1})", "type": type(m).__name__,
                           "module": m, "std": v[0], "constant": v[1] > 0, "zero": v[2] > 0, "input_varies": v[3] > 0,
                           "saturated": v[4], "examples_saturated": v[5], "dead_units": v[6], "input_std": v[7]})
        return {"layers": layers, "inputs_vary": host[0] > 0, "output_varies": host[1] > 0,
                "head_input_varies": [h > 0 for h in host[2:2 + n_head]], "batch": _batch_size(ctx.inputs)}

    # -- judging --------------------------------------------------------------------------------------------------
    def _judge(self, probe: dict[str, Any], ctx: Any) -> list[Finding]:
        layers, head = probe["layers"], ctx.head
        return [self._saturation(layers), self._depth(layers, head), self._dead(probe, head, ctx)]

    def _saturation(self, layers: list[dict[str, Any]]) -> Finding:
        name = f"{self.name}.saturation"
        squash = [r for r in layers if r["type"] in ("Tanh", "Sigmoid")]
        if not squash:
            return Finding(name, "pass", f"{name}: no nn.Tanh/nn.Sigmoid leaf layer ran on the probe batch.")
        table = {r["name"]: {"saturated": r["saturated"], "examples_over_half": r["examples_saturated"],
                             "pre_activation_std": r["input_std"]} for r in squash}
        bad = [r for r in squash if r["examples_saturated"] > 0.5]
        worst = max(squash, key=lambda r: (r["examples_saturated"], r["saturated"]))
        details = {"layers": table, "threshold": 0.5}
        if not bad:
            return Finding(name, "pass", f"{name}: the tanh/sigmoid layers are not saturated at init (worst "
                           f"`{worst['name']}`: {worst['saturated']:.1%} of its outputs saturated).",
                           worst["examples_saturated"], 0.5, 0, [], details)
        r = bad[0]
        edge = _TANH_EDGE if r["type"] == "Tanh" else _SIGMOID_EDGE
        s = r["input_std"]
        closed = 2 * (1 - _phi(edge / s)) if s > 0 else 0.0
        details.update({"layer": r["name"], "closed_form": closed})
        others = f" (also {', '.join('`' + b['name'] + '`' for b in bad[1:4])})" if len(bad) > 1 else ""
        what = "|tanh| > 0.99" if r["type"] == "Tanh" else "sigmoid outside [0.01, 0.99]"
        return Finding(name, "warn", f"{name}: `{r['name']}` ({r['type']}) is saturated at init: {r['saturated']:.1%} of "
                       f"its outputs have {what} and {r['examples_saturated']:.0%} of the probe examples have more "
                       f"than half of its units saturated (threshold 50%){others}. Its pre-activation std is "
                       f"{s:.3g} (N(0, s^2) pre-activations saturate {closed:.1%}; healthy inits give s <= 1.4). "
                       "Saturated units pass almost no gradient. HINT: Xavier/Glorot init for tanh/sigmoid layers "
                       "and standardised inputs.", r["examples_saturated"], 0.5, 0, list(_SAT_CAUSES), details)

    def _depth(self, layers: list[dict[str, Any]], head: Optional[nn.Module]) -> Finding:
        name = f"{self.name}.depth"
        seq = [r for r in layers if isinstance(r["module"], _WEIGHT_LAYERS + _ACTIVATIONS) and r["module"] is not head]
        details = {"stds": {r["name"]: r["std"] for r in seq}, "range": list(_DEPTH)}
        # a layer constant across the probe examples (a zero-initialised residual branch) carries no signal to
        # measure: `.dead` judges it, the ratio is taken over the layers that vary
        seq = [r for r in seq if not r["constant"]]
        if len(seq) < 2 or not seq[0]["std"] > 0:
            return Finding(name, "pass", f"{name}: fewer than two hidden layers with a measurable std.", None, None,
                           0, [], details)
        ratio = seq[-1]["std"] / seq[0]["std"]
        details["ratio"] = ratio
        text = (f"the output std goes from {seq[0]['std']:.3g} (`{seq[0]['name']}`) to {seq[-1]['std']:.3g} "
                f"(`{seq[-1]['name']}`) over {len(seq)} hidden layers: a ratio of {ratio:.3g}")
        if _DEPTH[0] <= ratio <= _DEPTH[1]:
            return Finding(name, "pass", f"{name}: {text}, inside [1e-3, 1e3].", ratio, None, 0, [], details)
        way = "collapses" if ratio < _DEPTH[0] else "explodes"
        return Finding(name, "note", f"{name}: the activation std {way} across depth at init: {text}, outside "
                       "[1e-3, 1e3]. Plain nets without normalisation drift; if training stalls, init for the "
                       "activation (He for ReLU, Xavier for tanh) or add normalisation.", ratio, None, 0,
                       ["weights initialised too small/large for the activation", "no normalisation in a deep net"],
                       details)

    def _dead(self, probe: dict[str, Any], head: Optional[nn.Module], ctx: Any) -> Finding:
        name = f"{self.name}.dead"
        layers = probe["layers"]
        if probe["batch"] is not None and probe["batch"] < 2:
            return Finding(name, "skip", f"{name}: the probe batch has one example: constant layers cannot be told.")
        if not probe["inputs_vary"]:
            return Finding(name, "skip", f"{name}: the model's inputs are the same for every probe example.")
        constant_any = [r for r in layers if r["constant"] and r["input_varies"] and r["module"] is not head]
        constant = [r for r in constant_any if isinstance(r["module"], _CUTTERS)]
        partly = [r for r in layers if isinstance(r["module"], (nn.ReLU, nn.ReLU6)) and not r["constant"]
                  and r["dead_units"] > 0.5]
        head_vary = probe["head_input_varies"]
        cut = (not any(head_vary)) if head_vary else not probe["output_varies"]
        details = {"constant_layers": [r["name"] for r in constant], "zero_layers": [r["name"] for r in constant
                   if r["zero"]], "partly_dead": {r["name"]: r["dead_units"] for r in partly}, "signal_cut": cut,
                   "head": ctx.head_name}
        if cut and (constant or constant_any):
            r = (constant or constant_any)[0]
            value = "exactly 0" if r["zero"] else "the same"
            where = f"the input of the head `{ctx.head_name}`" if head_vary else "the model's output"
            return Finding(name, "fail", f"{name}: `{r['name']}` ({r['type']}) outputs {value} for every probe example "
                           f"at init while its input varies, and {where} is constant across the examples too: the "
                           "signal from the input is cut, every example gets the same prediction and no gradient "
                           "reaches the layers before it. HINT: check the init of this layer and of the one before it "
                           "(a large negative bias before a ReLU, zero weights).", 1.0, 0.0, 0, list(_DEAD_CAUSES),
                           details)
        if cut:  # no leaf cuts it: a functional operation between leaves does, or the model ignores its input
            where = f"the input of the head `{ctx.head_name}`" if head_vary else "the model's output"
            return Finding(name, "note", f"{name}: {where} is the same for every probe example at init while the "
                           "model's inputs vary, but no leaf module's output is constant: a functional operation "
                           "cuts the signal, or the model does not use this part of the batch.", 1.0, 0.0, 0,
                           list(_DEAD_CAUSES), details)
        if constant or partly:
            parts = []
            if constant:
                parts.append(f"{', '.join('`' + r['name'] + '`' for r in constant[:5])} output the same values for every "
                             "probe example at init (another path carries the signal: a zero-initialised residual "
                             "branch or gain is a legitimate practice)")
            if partly:
                parts.append(f"{', '.join('`' + r['name'] + '` (' + format(r['dead_units'], '.0%') + ')' for r in partly[:5])} have more "
                             "than half of their units zero on every probe example (dead ReLUs)")
            return Finding(name, "note", f"{name}: " + "; ".join(parts) + ".", float(len(constant) + len(partly)), 0.0,
                           0, list(_DEAD_CAUSES), details)
        return Finding(name, "pass", f"{name}: no layer is constant across the probe examples at init (the head "
                       "left out).", 0.0, 0.0, 0, [], details)


def _dev(t: Optional[Tensor]) -> torch.device:
    return t.device if t is not None else torch.device("cpu")


def _first_tensor(x: Any) -> Optional[Tensor]:
    """The first tensor in ``x`` (a tensor, or nested tuples/lists/dicts), floating first."""
    found = _tensors(x)
    floating = [t for t in found if t.is_floating_point()]
    return (floating or found or [None])[0]


def _tensors(x: Any) -> list[Tensor]:
    """The tensors in ``x`` (a tensor, or nested tuples/lists/dicts, a ``PackedSequence``'s data), in order."""
    found: list[Tensor] = []

    def walk(v: Any) -> None:
        if isinstance(v, Tensor):
            found.append(v)
        elif isinstance(v, (tuple, list)):
            for e in v:
                walk(e)
        elif isinstance(v, dict):
            for e in v.values():
                walk(e)
        elif hasattr(v, "data") and isinstance(getattr(v, "data", None), Tensor):  # PackedSequence
            found.append(v.data)

    walk(x)
    return found


def _batch_size(inputs: Any) -> Optional[int]:
    x = _first_tensor(inputs)
    return int(x.shape[0]) if x is not None and x.ndim > 0 else None


__all__ = ["ActivationCheck"]
