"""Activation math: the saturation edges of tanh and sigmoid, the normal CDF, one leaf call's statistics."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lightning_recipe._core.dtypes import wide

# |tanh| > 0.99 <=> |pre-activation| > atanh(0.99) = 2.647; sigmoid outside [0.01, 0.99] <=> |pre| > logit(0.99) = 4.595
_SAT = 0.99
_TANH_EDGE = math.atanh(_SAT)
_SIGMOID_EDGE = math.log(_SAT / (1 - _SAT))
# per call of a leaf: output std, output constant across the batch, all outputs zero, input varies across the batch,
# saturated share of the outputs, share of the examples with more than half of their units saturated, share of the
# units zero on every example, input std
_STATS = 8


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def _varies(t: Tensor) -> Tensor:
    """A 0-dim bool tensor: ``t`` differs between examples (along its first dimension). No host sync."""
    if t.ndim == 0 or t.shape[0] < 2:
        return torch.zeros((), dtype=torch.bool, device=t.device)
    return (t != t[:1]).any()


def _stats(module: nn.Module, out: Tensor, in_varies: Tensor, in_std: Tensor) -> Tensor:
    """The ``_STATS`` numbers of one call of a leaf (see the module constants), on the output's device; ``in_varies``
    and ``in_std`` were measured on its input before the call."""
    o = out.detach().float()
    b = o.shape[0]
    flat = o.reshape(b, -1)
    std = o.std(unbiased=False) if o.numel() > 1 else o.new_zeros(())
    constant = (~_varies(o)).float() if b > 1 else o.new_zeros(())
    zero = (o == 0).all().float()
    nan = o.new_full((), math.nan)
    sat, examples = nan, nan
    if isinstance(module, nn.Tanh):
        s = flat.abs() > _SAT
    elif isinstance(module, nn.Sigmoid):
        s = (flat < 1 - _SAT) | (flat > _SAT)
    else:
        s = None
    if s is not None:
        sat = s.float().mean()
        examples = (s.float().mean(1) > 0.5).float().mean()
    dead = (flat == 0).all(0).float().mean() if isinstance(module, (nn.ReLU, nn.ReLU6)) else o.new_zeros(())
    return wide(torch.stack([std, constant, zero, in_varies.float(), sat, examples, dead, in_std.float()]))
