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
import functools
import sys
from typing import Any, Optional


@functools.cache
def _libc() -> Optional[Any]:
    """glibc, when this process runs on it (the one allocator with ``malloc_trim``); else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") else None


def release_freed_memory() -> None:
    """``malloc_trim(0)`` under glibc (about a millisecond on a heap of a few hundred MiB); nothing elsewhere."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
