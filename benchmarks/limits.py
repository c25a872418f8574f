"""How far featcache's training is from the machine's limits, measured in the same run.

- Compute: a large float32 matrix product (and bf16 on CUDA) gives the machine's matmul rate; the
  featcache step's achieved rate is FLOPs per step / seconds per step, with the FLOPs of one training step
  counted by ``FlopCounterMode`` around ``MemberBank.train_step`` (matmuls and attention; ~3x the
  side network's ``flops_per_sample()``, which is reported too).
- Memory traffic: the reader's MB/s over a whole epoch (batches in float32, as training gets them) against
  a plain memory copy of the same bytes (``copy_`` of one batch-sized buffer per batch) and a
  float16 -> float32 conversion copy of them (what the reader must at least do).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count

from .common import interleave, sync, timed
from .peers import FeatcachePeer, ImagePeer, Peer, PeerContext


def matmul_rate(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None, reps: int = 5
) -> dict[str, Any]:
    """GFLOP/s of an n x n x n matrix product (median of ``reps``)."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    secs = [timed(lambda: a @ b, device) for _ in range(reps)]
    return {
        "n": n,
        "dtype": str(dtype).replace("torch.", ""),
        "gflops": 2 * n**3 / statistics.median(secs) / 1e9,
        "seconds": secs,
    }


def _cpu_sdpa_backward_flops(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_mapping() -> dict[Any, Any]:
    """featcache's FLOP formulas (CPU flash attention forward) plus the CPU flash attention backward,
    which torch's FlopCounterMode does not know either: without it, attention's backward is not counted."""
    from featcache.methods.base import _EXTRA_FLOPS

    return {
        **_EXTRA_FLOPS,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
    }


def step_flops(peer: FeatcachePeer) -> int:
    """FLOPs of one training step of the bank (forward + backward), counted by FlopCounterMode."""
    batch = peer.next_batch()
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        peer.train_on(batch)
    return int(counter.get_total_flops())


def compute_limit(ctx: PeerContext, method: str, rounds: int = 5, n: int | None = None) -> dict[str, Any]:
    """Achieved GFLOP/s of the featcache step against the matmul rate, the two timed A B A B.

    Interleaving puts the step and the reference product under the same load from other processes. The
    reference is a float32 product: on CUDA with TF32 tensor cores allowed, as the bank computes there
    (float32 + TF32: bf16 autocast does not run under vmap in torch 2.11, see featcache/member_bank.py).
    """
    device = torch.device(ctx.device)
    peer = FeatcachePeer(ctx, method)
    peer.step()
    counted = step_flops(peer)
    fwd = peer.flops_per_sample() * ctx.batch_size
    n = n or (8192 if device.type == "cuda" else 2048)
    dtype = torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    res = interleave({"step": peer.step, "matmul": lambda: a @ b}, rounds, device, warmup=1)
    step_s, mm_s = res.median("step"), res.median("matmul")
    achieved, peak = counted / step_s / 1e9, 2 * n**3 / mm_s / 1e9
    return {
        "method": method,
        "step_s": step_s,
        "flops_per_step_counted": counted,
        "flops_per_step_3x_forward": 3 * fwd,
        "achieved_gflops": achieved,
        "achieved_gflops_3x_forward": 3 * fwd / step_s / 1e9,
        "matmul_gflops": peak,
        "matmul": {"n": n, "dtype": "float32 (TF32)" if device.type == "cuda" else "float32"},
        "fraction_of_matmul": achieved / peak,
        "rounds": res.seconds,
    }


def reader_limit(ctx: PeerContext, method: str, epochs: int = 2) -> dict[str, Any]:
    """Reader MB/s over whole epochs (no training) vs plain and converting copies of the same bytes."""
    device = torch.device(ctx.device)
    peer = FeatcachePeer(ctx, method)
    reader = peer.reader
    out_bytes, batches, secs = 0, 0, []
    first = None
    for e in range(epochs):
        sync(device)
        t0 = time.perf_counter()
        for batch in reader.epoch(e):
            if first is None:
                first = batch
            if e == 0:
                out_bytes += sum(t.numel() * t.element_size() for t in batch.taps.values())
                batches += 1
        sync(device)
        secs.append(time.perf_counter() - t0)
    assert first is not None
    epoch_s = min(secs)
    # the same bytes, batch by batch: a plain copy, and the float16 -> float32 conversion the reader does
    src32 = {n: t.clone() for n, t in first.taps.items()}
    dst32 = {n: torch.empty_like(t) for n, t in first.taps.items()}
    src16 = {n: t.to(torch.float16) for n, t in first.taps.items()}

    def copy_all(src: dict[str, torch.Tensor]) -> None:
        for _ in range(batches):
            for n, d in dst32.items():
                d.copy_(src[n])

    copy_s = min(timed(lambda: copy_all(src32), device) for _ in range(3))
    convert_s = min(timed(lambda: copy_all(src16), device) for _ in range(3))
    mb = out_bytes / 2**20
    return {
        "reader": reader.mode,
        "taps": list(reader.taps),
        "epoch_mb_float32": mb,
        "batches": batches,
        "reader_mb_s": mb / epoch_s,
        "memcpy_mb_s": mb / copy_s,
        "convert_copy_mb_s": mb / convert_s,
        "reader_vs_memcpy": copy_s / epoch_s,
        "reader_vs_convert_copy": convert_s / epoch_s,
        "epoch_seconds": secs,
    }


def step_profile(ctx: PeerContext, method: str, top: int = 8) -> list[dict[str, Any]]:
    """The featcache step's top operators by self time: where the distance to the limit goes."""
    from .sweeps import profile_step

    peer = FeatcachePeer(ctx, method)
    peer.step()
    return profile_step(peer.step, torch.device(ctx.device), top)


def train_flops_per_sample(peer: Peer, n: int = 2) -> float:
    """FLOPs of one training step per sample (forward + backward, FlopCounterMode on a batch of ``n``).

    The ratio of two peers' values is the speed-up their steps would show at equal arithmetic efficiency:
    the bound that the step-time ratios are read against.
    """
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        if isinstance(peer, FeatcachePeer):
            batch = peer.next_batch()
            peer.bank.train_step({k: v[:n] for k, v in batch.taps.items()}, batch.labels[:n], 0.5, 30)
        else:
            assert isinstance(peer, ImagePeer)
            x, y = peer.images.batch(0)
            peer.train_batch(x[:n], y[:n])
    return counter.get_total_flops() / n
