"""``--device``: which torch device a command runs on, and the precision of a backbone pass there.

``AutocastPolicy`` is the one place that decides the precision of the frozen backbone's pass, per device type:
the autocast dtype (None: float32) and, on CUDA, whether TF32 tensor cores may round the float32 matmuls and
convolutions. Extraction runs every cache dtype in float32 with TF32 off, on every device: a bfloat16 or
float16 autocast pass moves the taps by far more than the cache dtype's own rounding, for every dtype, 8-bit
ones included (benchmarks/results/precision-cpu.md), so a cache made on a GPU would not be what a CPU
``predict`` computes. Extraction records the policy in the store manifest (``autocast``) and predict applies
the recorded one, so the live path reproduces the cached taps within the cache dtype's rounding on any device;
stores written earlier (bfloat16 autocast on CUDA for 16-bit caches) keep being reproduced as they were made.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator

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


@contextlib.contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    """TF32 for CUDA matmuls and cuDNN convolutions set to ``allowed`` inside, restored after (global switches)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclass(frozen=True)
class AutocastPolicy:
    """The precision of a backbone pass: the autocast dtype per device type (None: float32) and TF32 on CUDA.

    ``tf32``: False turns TF32 off during the pass (true float32 matmuls and convolutions); None leaves torch's
    switches as they are, as stores written before this was recorded were made.
    """

    cuda_dtype: str | None = None
    cpu_dtype: str | None = None
    tf32: bool | None = False

    @classmethod
    def for_cache(cls, cache_dtype: str) -> "AutocastPolicy":
        """The policy extraction uses for a cache of ``cache_dtype``: float32 without TF32, on every device (an
        autocast pass exceeds every cache dtype's own rounding; module doc)."""
        return cls(None, None, tf32=False)

    @classmethod
    def from_manifest(cls, record: dict[str, Any], cache_dtype: str) -> "AutocastPolicy":
        """The recorded policy. Stores written before ``cpu`` and ``tf32`` were recorded ran float32 on CPU and
        torch's TF32 settings on CUDA; stores written before any record ran bfloat16 autocast on CUDA for 16-bit
        caches."""
        if "cuda" not in record:
            return cls(None if cache_dtype == "float32" else "bfloat16", None, tf32=None)
        return cls(record["cuda"], record.get("cpu"), record.get("tf32"))

    def to_dict(self) -> dict[str, Any]:
        return {"cuda": self.cuda_dtype, "cpu": self.cpu_dtype, "tf32": self.tf32}

    def dtype_on(self, device: torch.device) -> str | None:
        """The autocast dtype of a pass on ``device`` (None: float32)."""
        return {"cuda": self.cuda_dtype, "cpu": self.cpu_dtype}.get(device.type)

    def context(self, device: torch.device) -> ContextManager[Any]:
        """Autocast (and the TF32 switches) for a forward on ``device``; a no-op for a float32 pass on CPU."""
        stack = contextlib.ExitStack()
        dtype = self.dtype_on(device)
        if dtype is not None:
            stack.enter_context(torch.autocast(device.type, dtype=getattr(torch, dtype)))
        if device.type == "cuda" and self.tf32 is not None:
            stack.enter_context(_tf32(self.tf32))
        return stack
