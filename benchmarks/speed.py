"""Training-step throughput of every peer, A B A B in one process, and end-to-end wall time for E epochs.

Step: each peer is built once (same backbone, same images, same batch size), warmed up, then timed in
rounds that alternate the order of the peers; a timed call runs enough steps to last about
``min_call_s`` (one step for the slow peers). samples/s = batch size / median seconds per step.

End to end (E epochs on N images): featcache really runs ``featcache.training.train`` for E epochs from the
store that one extraction wrote, and the extraction's wall time is added. The peers' E epochs are
extrapolated from their median step time (ceil(N / B) steps per epoch, no data loading counted), which
favours them; the featcache step extrapolation is reported next to its real run as a check.
"""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .common import interleave, say, sync, timed
from .peers import SIDE_LR, FeatcachePeer, Peer, PeerContext, build_peer
from .workload import StoreInfo


def steps_per_call(peer: Peer, device: torch.device, min_call_s: float, max_steps: int = 64) -> int:
    """How many steps one timed call runs: enough to last ``min_call_s``.

    The first (warm-up) step is timed too; a peer whose warm-up step already lasts ``min_call_s`` runs one
    step per call without a second calibration step (the slow peers' steps are the expensive ones).
    """
    t = timed(peer.step, device)
    if t < min_call_s:
        t = timed(peer.step, device)
    return max(1, min(max_steps, math.ceil(min_call_s / max(t, 1e-6))))


def measure_steps(names: list[str], ctx: PeerContext, rounds: int, min_call_s: float = 1.0) -> dict[str, Any]:
    """Median seconds per training step of each peer, measured A B A B; plus what each peer is."""
    peers: dict[str, Peer] = {}
    for name in names:
        t0 = time.perf_counter()
        peers[name] = build_peer(name, ctx)
        say(f"  built {name} in {time.perf_counter() - t0:.1f}s")
    out = time_peers(peers, ctx.batch_size, torch.device(ctx.device), rounds, min_call_s)
    del peers
    return out


def time_peers(
    peers: dict[str, Peer], batch_size: int, device: torch.device, rounds: int, min_call_s: float = 1.0
) -> dict[str, Any]:
    """Time peers that are already built (any contexts: e.g. one store per cache variant) A B A B: per peer its
    per-round seconds per step, the median, samples/s, and its training FLOPs per sample."""
    calls = {name: steps_per_call(p, device, min_call_s) for name, p in peers.items()}
    say(f"  steps per timed call: {calls}")

    def call(peer: Peer, n: int) -> Any:
        return lambda: [peer.step() for _ in range(n)]

    res = interleave(
        {n: call(p, calls[n]) for n, p in peers.items()}, rounds, device, warmup=0, log=lambda m: say("  " + m)
    )
    from .limits import train_flops_per_sample

    out: dict[str, Any] = {}
    for name, p in peers.items():
        per_step = [s / calls[name] for s in res.seconds[name]]
        med = statistics.median(per_step)
        out[name] = {
            **p.describe(),
            "step_seconds": per_step,
            "median_step_s": med,
            "samples_per_s": batch_size / med,
            "steps_per_call": calls[name],
            "train_flops_per_sample": train_flops_per_sample(p),
        }
    return out


def reader_share(ctx: PeerContext, method: str, rounds: int = 5) -> dict[str, float]:
    """How much of a featcache step is the batch read (reader) and how much the bank's train step."""
    peer = FeatcachePeer(ctx, method)
    device = torch.device(ctx.device)
    peer.step()
    read, train = [], []
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        batch = peer.next_batch()
        sync(device)
        t1 = time.perf_counter()
        peer.train_on(batch)
        sync(device)
        read.append(t1 - t0)
        train.append(time.perf_counter() - t1)
    return {"read_s": statistics.median(read), "train_step_s": statistics.median(train)}


def end_to_end(
    store: StoreInfo, ctx: PeerContext, methods: list[str], epochs: int, steps: dict[str, Any], real: list[str]
) -> dict[str, Any]:
    """E epochs on the store's N training images: featcache real (extraction + train), peers extrapolated."""
    from featcache.training import train

    n = store.splits["train"]
    steps_per_epoch = math.ceil(n / ctx.batch_size)
    extraction_s = store.seconds["train"]
    rows: dict[str, Any] = {}
    for method in methods:
        name = f"featcache-{method}"
        row: dict[str, Any] = {"extraction_s": extraction_s}
        if name in steps:
            row["train_extrapolated_s"] = steps[name]["median_step_s"] * steps_per_epoch * epochs
        if method in real:
            out = Path(tempfile.mkdtemp(prefix=f"featcache-bench-{method}-"))
            try:
                t0 = time.perf_counter()
                summary = train(
                    store.path,
                    method,
                    out,
                    settings={
                        "epochs": epochs,
                        "batch_size": ctx.batch_size,
                        "lr": SIDE_LR[method],
                        **ctx.method_config.get(method, {}),
                    },
                    reader=ctx.reader,
                    device=ctx.device,
                    progress=False,
                    overwrite=True,
                    tensorboard=False,
                )  # timed: no event files (importing them takes ~1 s)
                row["train_s"] = time.perf_counter() - t0
                row["train_samples_per_s"] = summary["samples_per_second"]
            finally:
                shutil.rmtree(out, ignore_errors=True)
            row["total_s"] = extraction_s + row["train_s"]
            row["how"] = "real: featcache.extraction + featcache.training.train"
        else:
            row["total_s"] = extraction_s + row["train_extrapolated_s"]
            row["how"] = "extraction real, training extrapolated from the median step"
        rows[name] = row
        say(f"  e2e {name}: {row['total_s']:.0f}s ({row['how']})")
    for name, s in steps.items():
        if name.startswith("featcache-"):
            continue
        rows[name] = {
            "total_s": s["median_step_s"] * steps_per_epoch * epochs,
            "how": f"extrapolated: median step x {steps_per_epoch} steps/epoch x {epochs} epochs",
        }
    return {
        "images": n,
        "epochs": epochs,
        "batch_size": ctx.batch_size,
        "steps_per_epoch": steps_per_epoch,
        "rows": rows,
    }
