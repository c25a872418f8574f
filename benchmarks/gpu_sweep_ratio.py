"""One member vs a bank of K=8 members per method on ViT-B/16-shaped synthetic taps: ms/step and peak memory.

Usage: python benchmarks/gpu_sweep_ratio.py [cuda|cpu] [BATCH]. Results: benchmarks/results/gpu-h100-sweep.md.
"""

import sys
import time

import torch

from featcache.manifest import TapInfo
from featcache.member_bank import MemberBank
from featcache.methods.base import MethodInput
from featcache.sweep import expand

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
T, C, L, B = 197, 768, 12, int(sys.argv[2]) if len(sys.argv) > 2 else 64
taps = [TapInfo("embed", 0, 0, T, 1, C, (14, 14), "none")] + [
    TapInfo(f"block{k}", k, k, T, 1, C, (14, 14), "none") for k in range(1, L + 1)
]
mi = MethodInput(taps=taps, num_classes=100, backbone_kind="vit")
batch = {t.name: torch.randn(B, T, C, device=dev) for t in taps}
y = torch.randint(0, 100, (B,), device=dev)
for method in ("last", "linear", "lst"):
    res = {}
    for K in (1, 8):
        members = expand(method, {"epochs": 1}, {"lr": [1e-3 * (i + 1) for i in range(K)]} if K > 1 else {})
        bank = MemberBank(members, mi, dev)
        for _ in range(3):
            bank.train_step(batch, y, 0.5, 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        n = 20 if dev.type == "cuda" else 3
        t = time.perf_counter()
        for _ in range(n):
            bank.train_step(batch, y, 0.5, 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res[K] = (time.perf_counter() - t) / n
        mem = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else 0
        print(
            f"{method} K={K}: {res[K] * 1000:.1f} ms/step, {B / res[K]:.0f} samples/s per member-step, peak {mem:.0f} MB",
            flush=True,
        )
    print(f"{method}: K=8 costs {res[8] / res[1]:.2f}x one member", flush=True)
