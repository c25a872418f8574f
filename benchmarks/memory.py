"""Peak training memory of each peer, each in its own subprocess.

The worker imports everything any peer needs (torch, timm, peft, zarr, featcache), records the resident
set (the post-import baseline), builds one peer and runs a few training steps (AdamW state exists after
the first), then reports the process's peak RSS and the peak minus the baseline: the memory training
itself needs. On CUDA it also reports ``torch.cuda.max_memory_allocated`` (reset after the imports).

    python -m benchmarks.memory '{"peer": "lora", "steps": 2, "ctx": {...PeerContext...}}'   # one JSON line out
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import say

REPO = Path(__file__).resolve().parents[1]


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs inside the subprocess: baseline RSS, build, ``steps`` steps, peak RSS."""
    import peft  # noqa: F401  (every worker imports the same modules before the baseline)
    import timm  # noqa: F401
    import torch
    import zarr  # noqa: F401

    import featcache.training  # noqa: F401

    from .common import peak_rss_mb, reset_peak_rss, rss_mb, setup_torch
    from .peers import PeerContext, build_peer

    device = setup_torch(spec["ctx"]["device"], spec.get("threads"))
    import_peak = peak_rss_mb()
    peak_reset = reset_peak_rss()
    baseline = rss_mb()
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    peer = build_peer(spec["peer"], PeerContext(**spec["ctx"]))
    build_s = time.perf_counter() - t0
    after_build = rss_mb()
    step_s = []
    for _ in range(spec.get("steps", 2)):
        t1 = time.perf_counter()
        peer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s.append(time.perf_counter() - t1)
    out = {
        "peer": spec["peer"],
        "baseline_rss_mb": baseline,
        "after_build_rss_mb": after_build,
        "peak_rss_mb": peak_rss_mb(),
        "peak_above_baseline_mb": peak_rss_mb() - baseline,
        "import_peak_rss_mb": import_peak,
        "peak_reset": peak_reset,
        "build_s": build_s,
        "step_s": step_s,
        **peer.describe(),
    }
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def measure(
    peer: str, ctx: dict[str, Any], steps: int = 2, threads: int | None = None, timeout_s: float = 1800
) -> dict[str, Any]:
    """Run one worker subprocess and return its report (or the error it died with)."""
    spec = {"peer": peer, "ctx": ctx, "steps": steps, "threads": threads}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "FEATCACHE_PROGRESS": "0",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=timeout_s,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        say(f"  memory worker for {peer} failed: {' | '.join(tail)}")
        return {"peer": peer, "error": " | ".join(tail)}
    out = json.loads(lines[-1])
    out["subprocess_s"] = time.perf_counter() - t0
    say(
        f"  memory {peer}: peak {out['peak_rss_mb']:.0f} MB, above baseline {out['peak_above_baseline_mb']:.0f} MB"
        + (f", cuda {out['cuda_max_allocated_mb']:.0f} MB" if "cuda_max_allocated_mb" in out else "")
    )
    return out


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    print(json.dumps(worker(json.loads(sys.argv[1]))), flush=True)
