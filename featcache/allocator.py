"""glibc malloc settings that keep freed memory for reuse, so that large tensors stop costing page faults.

torch allocates CPU tensors with malloc. glibc serves a request above its mmap threshold (dynamic, at
most 32 MiB) with a fresh ``mmap`` and hands it back with ``munmap`` when it is freed, so every large
activation of every forward pass is paid again: the kernel faults in and zeroes each 4 KiB page on first
touch (measurements in docs/store.md, "Runtime settings").

``keep_freed_memory()`` sets, once per process:
- ``M_MMAP_MAX=0``: every allocation comes from the heap, which reuses freed blocks;
- ``M_TRIM_THRESHOLD=1 GiB``: freed memory at the top of the heap is kept, not returned to the system;
- ``M_ARENA_MAX=1``: threads share the main heap, so work on a thread (a dask worker's task) reuses it too.
The cost: a process keeps the memory of its peak until it exits (its RSS does not shrink after a large
step). featcache's entry points (``extract``, ``train``, ``load_predictor``, the dask tasks) call it;
``FEATCACHE_MALLOC=system`` leaves malloc as it is. Where the C library is not glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass

from .errors import UsageError

log = logging.getLogger(__name__)

ENV = "FEATCACHE_MALLOC"
CHOICES = ("keep", "system")
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's <malloc.h>
TRIM_THRESHOLD_BYTES = 1 << 30
SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES), (M_ARENA_MAX, 1))


@dataclass(frozen=True)
class MallocSettings:
    """What ``keep_freed_memory`` did in this process, and why."""

    applied: bool
    reason: str

    def describe(self) -> str:
        return (
            f"glibc malloc keeps freed memory ({self.reason})" if self.applied else f"malloc unchanged ({self.reason})"
        )


_done: MallocSettings | None = None


def keep_freed_memory() -> MallocSettings:
    """Apply the settings of the module doc (once; later calls return the first call's result)."""
    global _done
    if _done is None:
        _done = _apply(os.environ.get(ENV, "keep"))
        log.debug(_done.describe())
    return _done


def _apply(choice: str) -> MallocSettings:
    if choice not in CHOICES:
        raise UsageError(f"{ENV} must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "system":
        return MallocSettings(False, f"{ENV}=system")
    libc = _glibc()
    if libc is None:
        return MallocSettings(False, "the C library is not glibc")
    refused = [opt for opt, value in SETTINGS if libc.mallopt(opt, value) != 1]
    if refused:
        return MallocSettings(False, f"mallopt refused options {refused}")
    return MallocSettings(True, "mmap off, trim threshold 1 GiB, one arena")


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)  # the process's own symbols: the C library it runs with
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their mallopt differs or is a stub
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc
