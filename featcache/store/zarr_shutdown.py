"""Shutting zarr down quietly: its background I/O tasks settle instead of printing tracebacks at interpreter exit.

zarr 3.1 runs its I/O on an event loop in a daemon thread. When one chunk of a multi-chunk read
fails (a checksum mismatch), ``asyncio.gather`` hands the error back at once but leaves the
sibling tasks running; zarr's own atexit hook then closes the loop with them pending, and Python
prints ``Task was destroyed but it is pending!`` or ``Exception ignored ... Traceback`` after the
user's clean ``Error:`` line, or after a command that recovered and exited 0 (``--repair``).

``settle_pending_io`` waits for those tasks (and retrieves their results). It is registered with
``atexit`` when this module is imported, after zarr registered its hook, so it runs first
(atexit runs hooks last-in, first-out). Library callers may also call it after a failed read.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures

import zarr  # noqa: F401  (zarr registers its atexit cleanup on import: ours must come after it)
from zarr.core import sync as _zarr_sync

SETTLE_SECONDS = 5.0


async def _settle(timeout: float) -> None:
    """Wait for every other task, including tasks that those tasks start meanwhile (a read fans out
    into per-chunk tasks and worker-thread calls), until none is left or ``timeout`` has passed."""
    loop = asyncio.get_running_loop()
    me, deadline = asyncio.current_task(), loop.time() + timeout
    while True:
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        if not tasks:
            return
        remaining = deadline - loop.time()
        if remaining <= 0:  # a hung request: cancel it rather than leave it to be destroyed while pending
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks, timeout=1.0)
            return
        done, _pending = await asyncio.wait(tasks, timeout=remaining)
        for t in done:
            if not t.cancelled():
                t.exception()  # mark retrieved: no "Task exception was never retrieved"


def settle_pending_io(timeout: float = SETTLE_SECONDS) -> None:
    """Wait (at most ``timeout`` seconds) for I/O tasks still running on zarr's event loop."""
    loop = _zarr_sync.loop[0]
    if loop is None or loop.is_closed() or not loop.is_running():
        return
    try:
        asyncio.run_coroutine_threadsafe(_settle(timeout), loop).result(timeout + 2.0)
    except (concurrent.futures.TimeoutError, RuntimeError):
        pass


atexit.register(settle_pending_io)

__all__ = ["settle_pending_io"]
