"""A file system with a network's latency, for benchmarks and tests of remote stores.

``slowfile:///path/to/store.zarr`` is the local file system behind an fsspec async wrapper whose every request
(``cat_file``, ``info``, ``pipe_file``, ...) first waits ``delay`` seconds (default 20 ms, set with
``LatencyFileSystem.default_delay`` or ``storage_options={"delay": 0.05}``). zarr opens it like any fsspec URL
(``FsspecStore``), so a featcache reader sees what it would see on an object store with that latency and local
bandwidth: only keeping many requests in flight keeps its throughput.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Callable

import fsspec
from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "slowfile"
REQUESTS = (
    "_cat_file",
    "_cat",
    "_pipe_file",
    "_info",
    "_exists",
    "_rm_file",
    "_rm",
    "_ls",
    "_find",
    "_mkdir",
    "_makedirs",
    "_get_file",
    "_put_file",
    "_size",
)


class LatencyFileSystem(AsyncFileSystemWrapper):
    """The local file system; every request waits ``delay`` seconds before it runs (``requests`` counts them)."""

    protocol = PROTOCOL
    default_delay = 0.02

    def __init__(self, delay: float | None = None, **kwargs: Any) -> None:
        super().__init__(fs=LocalFileSystem(), **kwargs)
        self.protocol = PROTOCOL
        self.delay = self.default_delay if delay is None else delay
        self.requests = 0
        self.in_flight = self.max_in_flight = 0  # requests waiting or running at once
        local_strip = LocalFileSystem._strip_protocol
        self._strip_protocol = lambda p: local_strip(
            p.replace(f"{PROTOCOL}://", "file://", 1)  # type: ignore[method-assign]
            if isinstance(p, str)
            else p
        )
        for name in REQUESTS:
            fn = getattr(self, name, None)
            if fn is not None:
                setattr(self, name, self._delayed(fn))

    def _delayed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def call(*args: Any, **kwargs: Any) -> Any:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay)
                return await fn(*args, **kwargs)
            finally:
                self.in_flight -= 1

        return call


def register() -> None:
    """Make ``slowfile://`` URLs open a ``LatencyFileSystem`` (idempotent)."""
    fsspec.register_implementation(PROTOCOL, LatencyFileSystem, clobber=True)


def url(path: str) -> str:
    """The ``slowfile://`` URL of a local path."""
    return f"{PROTOCOL}://{path}"


__all__ = ["LatencyFileSystem", "PROTOCOL", "register", "url"]
