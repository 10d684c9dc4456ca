"""Give the heap memory freed by the checks' one-time work back to the operating system.

The setup of a fit (the data scan, the probes, the first-batch figure) allocates a few MiB of small, short-lived
objects. On Linux, glibc keeps freed heap memory in the process when live objects sit above it, so that memory stays
in the resident set and adds to the peak of the training that follows (the training's large tensors come from fresh
pages). ``malloc_trim(0)`` hands the freed pages back; it touches no live object. Elsewhere (macOS, Windows, musl)
this is a no-op: their allocators return such memory on their own or have no such call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any, Optional

_libc: Optional[Any] = None
_looked = False


def release_freed_memory() -> None:
    """``malloc_trim(0)`` under glibc (about a millisecond on a heap of a few hundred MiB); nothing elsewhere."""
    global _libc, _looked
    if not _looked:
        _looked = True
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _libc = lib if hasattr(lib, "malloc_trim") else None
            except OSError:
                _libc = None
    if _libc is not None:
        _libc.malloc_trim(0)
