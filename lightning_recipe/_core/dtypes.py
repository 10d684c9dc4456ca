"""The dtype for exact sums and statistics on a device: float64 where the device has it, float32 on Apple's MPS.

Every check that widens a tensor on the model's device (a checksum of the parameters, a sum of per-example losses,
label counts before the cross-rank reduction) goes through :func:`wide` or :func:`wide_dtype`, so that a fit on a Mac
(``accelerator="mps"``, which has no float64) runs the same checks at float32 precision instead of crashing. Tensors
already on the host (``.cpu()`` first) stay float64 either way.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor


def wide_dtype(device: Union[torch.device, str]) -> torch.dtype:
    """float64 on ``device``, or float32 on Apple's MPS, which has no float64.

    Example::

        >>> wide_dtype(torch.device("cpu")), wide_dtype(torch.device("mps"))
        (torch.float64, torch.float32)
    """
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def wide(t: Tensor) -> Tensor:
    """``t`` in :func:`wide_dtype` of its own device (``t.double()`` wherever float64 exists).

    Example::

        >>> wide(torch.tensor([1.5], dtype=torch.float16)).dtype
        torch.float64
    """
    return t.to(wide_dtype(t.device))
