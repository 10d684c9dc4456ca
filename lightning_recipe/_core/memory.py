"""Memory work of the checks' one-time steps: give the heap memory they freed back to the operating system, and keep
the garbage of their figures out of Python's older generations.

The setup of a fit (the data scan, the probes, the first-batch figure) allocates a few MiB of small, short-lived
objects. On Linux, glibc keeps freed heap memory in the process when live objects sit above it, so that memory stays
in the resident set and adds to the peak of the training that follows (the training's large tensors come from fresh
pages). ``malloc_trim(0)`` hands the freed pages back; it touches no live object. Elsewhere (macOS, Windows, musl)
this is a no-op: their allocators return such memory on their own or have no such call.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import sys
from typing import Any, Iterator, Optional


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


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused while a figure is built and drawn, then one collection of the youngest
    generation, which frees the figure (matplotlib's artists reference each other, so only the collector frees them).

    Left running, the collector moves the tens of thousands of objects of a figure being built into the older
    generations, and that can start a full collection of the whole process (torch, Lightning and the user's objects):
    300 ms in the middle of a 50 ms figure, measured at the end of a digits fit. Paused, the figure's objects never
    leave the youngest generation and the ``gc.collect(0)`` at the end frees them in a few milliseconds; the
    process's full collections come at their own pace. Nested uses pause once; a collector the user switched off
    stays off and nothing is collected.

    Example::

        >>> import gc
        >>> with paused_gc():
        ...     gc.isenabled()
        False
        >>> gc.isenabled()
        True
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect(0)
