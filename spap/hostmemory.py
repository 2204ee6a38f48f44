"""Handing the host heap's free pages back to the operating system between the prune's stages.

glibc keeps memory that a process frees inside its heap for reuse; only allocations above its mmap
threshold go back to the system on ``free``, and that threshold rises (up to 32 MiB) each time such a
block is freed.  A prune frees tensors of every size (a block's activations per batch, the metric's
per-sequence activations), so the heap fills with free pages that still count as resident, and the
peak creeps up from block to block.  ``malloc_trim(0)`` returns those pages (``MADV_DONTNEED`` on the
free chunks) without moving anything that is in use; docs/performance.md measures what it saves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library or system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)  # musl has none
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the host heap's free pages to the operating system; True if the C library can (glibc).

    Cheap (a walk over the heap's free chunks) and safe at any point: memory in use is not touched.
    The prune calls it after the loss-aware metric's pass, after each block and, on the CPU, before each
    pass of a batch through a block.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
