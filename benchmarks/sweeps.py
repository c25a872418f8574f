"""What a K-member sweep costs against one member: ``MemberBank`` with K=1 vs K=K, same batches, A B A B.

Contenders (each reads its batch from its own reader with the same seed, so they see the same batches):
- ``K1``: one LAST member; ``K<k>``: K members (an lr grid) stacked in one bank (vmap on CUDA; on CPU
  the bank runs attention methods member by member, see docs/training.md);
- ``K<k>-loop``: the same K members as K separate one-member banks stepping on one shared batch read, a
  diagnostic that shows how much of the bank's cost is the stacking itself.
When the ratio misses the target, one step of each is profiled and the top operators are recorded.
"""

from __future__ import annotations

from typing import Any

import torch

from .common import interleave, say
from .peers import FeatcachePeer, PeerContext


class LoopBank:
    """K one-member banks trained one after the other on the same batch (read once, from one reader: K
    resident readers of a 1000-image ViT-S split would hold K x 2 GB)."""

    def __init__(self, ctx: PeerContext, method: str, k: int) -> None:
        first = FeatcachePeer(ctx, method, 1)
        self.peers = [first] + [FeatcachePeer(ctx, method, 1, reader=first.reader) for _ in range(k - 1)]

    def step(self) -> None:
        batch = self.peers[0].next_batch()
        for p in self.peers:
            p.train_on(batch)


def profile_step(step: Any, device: torch.device, top: int = 8) -> list[dict[str, Any]]:
    """Top operators of one step by self time (CPU, or CUDA on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def self_us(e: Any) -> float:
        if device.type == "cuda":  # renamed from *_cuda_* to *_device_* in recent torch
            return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
        return float(e.self_cpu_time_total)

    rows = sorted(prof.key_averages(), key=self_us, reverse=True)[:top]
    return [{"op": e.key[:60], "self_ms": self_us(e) / 1e3, "calls": e.count} for e in rows]


def measure_sweep(
    ctx: PeerContext, k: int, rounds: int, target: float, method: str = "last", loop: bool = True
) -> dict[str, Any]:
    """Step time of K=1 and K=k (and the loop diagnostic), their ratio, and a profile when it misses."""
    device = torch.device(ctx.device)
    one = FeatcachePeer(ctx, method, 1)
    many = FeatcachePeer(ctx, method, k)
    contenders: dict[str, Any] = {"K1": one.step, f"K{k}": many.step}
    looped = LoopBank(ctx, method, k) if loop else None
    if looped is not None:
        contenders[f"K{k}-loop"] = looped.step
    res = interleave(contenders, rounds, device, warmup=1, log=lambda m: say("  sweep " + m))
    base = res.median("K1")
    out: dict[str, Any] = {
        "method": method,
        "members": k,
        "batch_size": ctx.batch_size,
        "reader": one.reader.mode,
        "step_s": {n: res.median(n) for n in contenders},
        "rounds": res.seconds,
        "ratio": res.median(f"K{k}") / base,
        "target_ratio": target,
        "per_member_samples_per_s": {n: ctx.batch_size * (k if n != "K1" else 1) / res.median(n) for n in contenders},
    }
    if looped is not None:
        out["loop_ratio"] = res.median(f"K{k}-loop") / base
    out["met"] = out["ratio"] <= target
    if not out["met"]:
        out["profile"] = {"K1": profile_step(one.step, device), f"K{k}": profile_step(many.step, device)}
    say(
        f"  sweep: K={k} costs {out['ratio']:.2f}x one member (target <= {target}x)"
        + (f", {k} separate banks {out['loop_ratio']:.2f}x" if looped is not None else "")
    )
    return out
