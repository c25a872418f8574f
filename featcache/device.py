"""``--device``: which torch device a command runs on, and the precision of a backbone pass there.

``AutocastPolicy`` is the one place that decides whether the frozen backbone runs under autocast: on CUDA,
bfloat16 for 16-bit caches (the rounding to the cache dtype dominates anyway) and full float32 for a float32
cache. Extraction records it in the store manifest and predict applies the recorded policy, so the live path
reproduces the cached taps on a GPU too. On CPU the backbone always runs in float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager

import torch

from featcache.errors import UsageError


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a clear error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


@dataclass(frozen=True)
class AutocastPolicy:
    """The autocast dtype of a backbone pass on CUDA (None: float32); CPU passes never autocast."""

    cuda_dtype: str | None = None

    @classmethod
    def for_cache(cls, cache_dtype: str) -> "AutocastPolicy":
        """The policy extraction uses for a cache of ``cache_dtype``: bfloat16 unless the cache is float32."""
        return cls(None if cache_dtype == "float32" else "bfloat16")

    @classmethod
    def from_manifest(cls, record: dict[str, Any], cache_dtype: str) -> "AutocastPolicy":
        """The recorded policy; stores written before it was recorded ran ``for_cache(cache_dtype)``."""
        return cls(record["cuda"]) if "cuda" in record else cls.for_cache(cache_dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"cuda": self.cuda_dtype}

    def context(self, device: torch.device) -> ContextManager[Any]:
        """Autocast for a forward on ``device`` (a no-op on CPU and for float32)."""
        if device.type != "cuda" or self.cuda_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=getattr(torch, self.cuda_dtype))
