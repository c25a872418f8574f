"""Work handed to background threads through a bounded queue: the shape of the shard writer and the tap encoder.

``submit`` blocks while ``max_pending`` items wait (bounded memory); each item is handled by one of ``threads``
background threads (``handle``, in a subclass). An error there is raised by the next ``submit`` or by ``close``
(through ``wrap_error``), and nothing more is handled after it. ``close`` handles what is queued; ``abort``
drops it (items being handled are finished).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from featcache.errors import StoreError


class WorkQueue:
    """Items handled in order of submission by background threads (see the module docstring)."""

    def __init__(self, name: str, max_pending: int = 2, threads: int = 1) -> None:
        self.name = name
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, max_pending, threads))
        self._error: BaseException | None = None
        self._error_item: Any = None
        self._drop = threading.Event()
        self._failed = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(max(1, threads))
        ]
        for t in self._threads:
            t.start()

    def handle(self, item: Any) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def thread_setup(self) -> None:
        """Runs first on each background thread."""

    def wrap_error(self, err: BaseException, item: Any) -> BaseException:
        """The error the caller sees for ``err`` raised while handling ``item``."""
        return err

    def _run(self) -> None:
        self.thread_setup()
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._drop.is_set() or self._failed.is_set():  # after a failure nothing more is handled
                continue
            try:
                self.handle(item)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                self._error, self._error_item = err, item
                self._failed.set()

    def raise_error(self) -> None:
        """Raise the error of a background thread (once)."""
        if self._error is not None:
            err, self._error = self._error, None
            wrapped = self.wrap_error(err, self._error_item)
            if wrapped is err:
                raise err
            raise wrapped from err

    def submit(self, item: Any) -> None:
        """Queue an item; blocks while the queue is full, raises a background error."""
        while True:
            self.raise_error()
            if not any(t.is_alive() for t in self._threads):
                raise StoreError(f"the {self.name} stopped unexpectedly")
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def _stop(self) -> None:
        for t in self._threads:
            if t.is_alive():
                self._queue.put(None)  # one stop mark per thread, after everything queued
        for t in self._threads:
            t.join()

    def close(self, raise_error: bool = True) -> None:
        """Handle every queued item, stop the threads; raise a background error."""
        self._stop()
        if raise_error:
            self.raise_error()

    def abort(self) -> None:
        """Drop the queued items, finish the ones being handled, stop the threads."""
        self._drop.set()
        self._stop()


__all__ = ["WorkQueue"]
