"""Input-dependence math: per-example losses, and whether zeroed inputs are clearly worse than real ones."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from lightning_recipe._core.dtypes import wide


def per_example_loss(loss: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor, n: int) -> Tensor:
    """The loss of each of ``n`` examples, from canonical ``outputs`` and ``targets`` (``n * k`` rows, e.g. positions).

    Example::

        >>> out = torch.tensor([[0.0], [2.0]]); y = torch.tensor([[1.0], [1.0]])
        >>> per_example_loss(torch.nn.MSELoss(), out, y, 2).tolist()
        [1.0, 1.0]
    """
    rows = outputs.shape[0] // max(n, 1)
    values = []
    with torch.no_grad():
        for i in range(n):
            sl = slice(i * rows, (i + 1) * rows)
            values.append(float(loss(outputs[sl], targets[sl])))
    return torch.tensor(values, dtype=torch.float64)


def input_dependence_test(
    real: Tensor, zeroed: Tensor, prior: Tensor, floor: Optional[float] = 0.0, rel_margin: float = 0.5, z: float = 3.0
) -> dict[str, Any]:
    """Are zeroed inputs clearly worse than real ones? Paired per-example losses in, a verdict with its numbers out.

    With ``D = mean(zeroed - real)`` and ``A = mean(prior - real)`` (what the real inputs gain over the label prior),
    the model uses its input when zeroing costs significantly (``D > z * se(D)``) **or** costs at least
    ``rel_margin`` of the gain (``A > 0`` and ``D >= rel_margin * A``); both also need ``D`` above ``1e-3`` of the
    prior loss's distance to the floor. Either is evidence of use, so a small batch (a large ``se``) does not turn a
    model that loses its whole gain when the inputs are zeroed into a false alarm; a model that ignores its input
    (``D = 0``) or real inputs that bring nothing on held-out data (``A <= 0``, ``D ~ 0``) fail.

    Args:
        real: ``(N,)`` per-example loss with the real inputs.
        zeroed: ``(N,)`` per-example loss with zeroed inputs.
        prior: ``(N,)`` per-example loss of the best constant prediction.
        floor: the smallest value the loss can take (``None``: unknown, 0 is used for the scale).
        rel_margin: share of ``A`` that zeroing must lose.
        z: standard errors of the paired difference.

    Example::

        >>> r = torch.tensor([0.1, 0.2, 0.1, 0.2]); p = torch.full((4,), 1.386)
        >>> input_dependence_test(r, torch.tensor([2.0, 2.5, 1.9, 2.2]), p)["uses_input"]
        True
        >>> input_dependence_test(r, r.clone(), p)["uses_input"]  # the model ignores its input
        False
    """
    r, zl, p = wide(real), wide(zeroed), wide(prior)
    if r.numel() == 0:
        return {"uses_input": False, "real": math.nan, "zeroed": math.nan, "prior": math.nan, "difference": math.nan,
                "se": math.nan, "advantage": math.nan, "threshold": math.nan}
    d = zl - r
    diff = float(d.mean())
    se = float(d.std() / math.sqrt(d.numel())) if d.numel() > 1 else 0.0
    advantage = float((p - r).mean())
    scale = abs(float(p.mean()) - (floor or 0.0))
    tiny = max(1e-3 * scale, 1e-12)
    significant = diff > max(z * se, tiny)
    takes_the_gain = advantage > 0 and diff >= rel_margin * advantage and diff > tiny
    threshold = min(max(z * se, tiny), max(rel_margin * advantage, tiny) if advantage > 0 else math.inf)
    return {"uses_input": significant or takes_the_gain, "real": float(r.mean()), "zeroed": float(zl.mean()),
            "prior": float(p.mean()), "difference": diff, "se": se, "advantage": advantage, "threshold": threshold}
