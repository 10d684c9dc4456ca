"""What a probe forward leaves as it found it, and how it runs.

* :func:`_snapshot_buffers` / :func:`_restore_buffers`: every buffer's object and values, put back after the probe
  (a call counter, a running statistic updated in eval mode, a cache reassigned in ``forward``).
* :func:`eager`: ``torch.compile``d modules run their original code eagerly inside (torch >= 2.6; a no-op before), so
  a probe's forward hooks see every layer and it can differentiate one graph twice (a graph compiled by inductor
  donates its buffers to one backward: the second gradient of BatchIndependenceCheck failed on it).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn


def eager() -> Any:
    """A context in which compiled modules run eagerly (``torch.compiler.set_stance("force_eager")``)."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def _snapshot_buffers(module: nn.Module) -> list[tuple[nn.Module, str, Tensor, Tensor]]:
    """``(owner, name, tensor, copy)`` for every buffer of ``module``."""
    out = []
    for m in module.modules():
        for name, b in m._buffers.items():
            if isinstance(b, Tensor):
                out.append((m, name, b, b.detach().clone()))
    return out


def _restore_buffers(saved: list[tuple[nn.Module, str, Tensor, Tensor]]) -> None:
    """Put back each buffer object (one reassigned in ``forward`` is replaced by the original) and its values."""
    with torch.no_grad():
        for m, name, b, copy in saved:
            if m._buffers.get(name) is not b:
                m._buffers[name] = b
            b.copy_(copy)  # unconditionally: comparing first would read the device on every probe
