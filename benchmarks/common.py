"""Shared helpers: thread and device setup, A B A B timing, memory readings, machine facts, JSON.

Every comparison in this package is measured the same way: the contenders run in one process, in
rounds (A B C, then C B A, ...), each round timing one call of each, and the result is the median
over rounds. Load from other processes on a shared machine then hits all contenders alike, and the
ratios of medians are what the reports quote.
"""

from __future__ import annotations

import os

# as featcache's CLI does: idle OpenMP threads sleep instead of spinning (matters on a shared 2-core box)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
import torch  # noqa: E402

from featcache.allocator import keep_freed_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def setup_torch(device: str, threads: int | None) -> torch.device:
    """Intra-op threads (CPU), the device, and featcache's malloc settings for every peer alike (the ones
    ``featcache.extraction`` and ``featcache.training`` apply); ``threads=None`` keeps torch's default."""
    keep_freed_memory()
    if threads is not None:
        torch.set_num_threads(max(1, threads))
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda was asked for but torch sees no CUDA device")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, GPU work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@dataclass
class Interleaved:
    """Per-contender seconds of each round of an A B A B measurement."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def spread(self, name: str) -> tuple[float, float]:
        return min(self.seconds[name]), max(self.seconds[name])

    def to_dict(self) -> dict[str, Any]:
        return {
            name: {"median_s": self.median(name), "min_s": min(v), "max_s": max(v), "rounds": v}
            for name, v in self.seconds.items()
        }


def interleave(
    contenders: dict[str, Callable[[], Any]],
    rounds: int,
    device: torch.device,
    warmup: int = 1,
    log: Callable[[str], None] | None = None,
) -> Interleaved:
    """Run each contender ``warmup`` times, then ``rounds`` rounds, alternating the order every round."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    sync(device)
    out = Interleaved({n: [] for n in names})
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            out.seconds[name].append(timed(contenders[name], device))
        if log is not None:
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {out.seconds[n][-1]:.3f}s" for n in names))
    return out


# ---------------------------------------------------------------------------------------------
# Memory


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-round ratios of two cases timed back to back: a neighbour's load moves this
    machine's speed by 25-50% within minutes, and both sides of a pair share it."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def rss_mb() -> float:
    """Current resident set of this process, MiB."""
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    """Peak resident set of this process since the start or the last ``reset_peak_rss()``, MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where that is not possible.

    Imports can allocate transiently more than they keep; without the reset such a transient would be
    reported as the training peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Facts and files


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: CPUs, load, threads, versions, GPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "device": str(device),
        "cpus": cpus,
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "malloc": keep_freed_memory().describe(),
    }
    try:
        import timm

        info["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe_device(device: torch.device) -> str:
    """'cpu (2 cores)' or the GPU's name: the device as the reports name it."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu ({cpus} cores, {torch.get_num_threads()} torch thread{'s' if torch.get_num_threads() > 1 else ''})"


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.device):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def say(message: str) -> None:
    """Progress on stderr, time-stamped."""
    import sys

    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
