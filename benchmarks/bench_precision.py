"""How far a reduced-precision backbone pass moves the cached taps, next to each cache dtype's own rounding.

For every tap of a backbone on real images: the relative error (||a - ref|| / ||ref|| over the whole tap, all
images) of
- the pass under bfloat16 autocast and under float16 autocast (CPU autocast: ``torch.autocast("cpu", ...)``;
  CUDA's kernels round differently, but the formats' precision is the same), against the float32 pass;
- float32 taps rounded to each cache dtype (float16, bfloat16, int8, float8_e4m3: ``featcache.store.codecs``).

This is what ``featcache.device.AutocastPolicy.for_cache`` is chosen from (docs/training.md): an autocast pass
is kept only for a cache dtype whose own rounding error is larger than the autocast pass's error on every tap.

    python -m benchmarks.bench_precision --images 64 --out benchmarks/results/precision-cpu
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from featcache.backbone import Backbone
from featcache.manifest import DTYPES
from featcache.store.codecs import round_trip

from .common import RESULTS, machine, setup_torch
from .workload import MODELS, data_specs, subset

PASSES = ("bfloat16", "float16")  # autocast dtypes measured against the float32 pass


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| over the whole tensor, in float64."""
    return float((a.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


def tap_passes(backbone: Backbone, images: torch.Tensor, batch: int) -> dict[str, dict[str, torch.Tensor]]:
    """{pass: {tap: (N, T, C) float32}} for the float32 pass and each autocast pass."""
    out: dict[str, dict[str, list[torch.Tensor]]] = {}
    for name in ("float32", *PASSES):
        ctx = contextlib.nullcontext() if name == "float32" else torch.autocast("cpu", dtype=getattr(torch, name))
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.inference_mode(), ctx:
            for s in range(0, len(images), batch):
                for tap, t in backbone.taps(images[s : s + batch]).items():
                    parts.setdefault(tap, []).append(t.float())
        out[name] = parts
    return {p: {t: torch.cat(v) for t, v in taps.items()} for p, taps in out.items()}


def measure(model: str, n: int, batch: int) -> dict[str, Any]:
    """Per tap: the autocast passes' and the cache dtypes' relative errors, and the worst over taps."""
    preset = MODELS[model]
    backbone = Backbone(preset.backbone_spec(), "cpu")
    spec_train, _, note = data_specs()
    source = subset(spec_train, n)
    images = torch.stack([backbone.transform(source[i].image) for i in range(len(source))])
    t0 = time.perf_counter()
    passes = tap_passes(backbone, images, batch)
    ref = passes["float32"]
    taps = {}
    for tap, x in ref.items():
        row = {f"autocast_{p}": relative_error(passes[p][tap], x) for p in PASSES}
        row.update({f"round_{d}": relative_error(round_trip(x, d), x) for d in DTYPES if d != "float32"})
        taps[tap] = row
    keys = list(next(iter(taps.values())))
    return {
        "model": model,
        "label": preset.label,
        "data": note,
        "images": len(source),
        "taps": taps,
        "worst": {k: max(r[k] for r in taps.values()) for k in keys},
        "median": {k: sorted(r[k] for r in taps.values())[len(taps) // 2] for k in keys},
        "seconds": time.perf_counter() - t0,
    }


def verdicts(result: dict[str, Any]) -> dict[str, str]:
    """Per cache dtype: whether bfloat16 autocast stays below the dtype's own rounding on every tap."""
    out = {}
    for d in DTYPES:
        if d == "float32":
            continue
        below = all(r["autocast_bfloat16"] <= r[f"round_{d}"] for r in result["taps"].values())
        out[d] = "within its rounding" if below else "exceeds its rounding"
    return out


def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Precision of the backbone pass vs the cache dtype's rounding",
        "",
        f"`{command}`; relative error ||a - ref|| / ||ref|| per tap against the float32 pass, CPU autocast.",
        "",
    ]
    for r in results:
        keys = list(r["worst"])
        lines += [
            f"## {r['label']} ({r['images']} images of {r['data']})",
            "",
            "| tap | " + " | ".join(keys) + " |",
            "|---" * (len(keys) + 1) + "|",
        ]
        for tap, row in r["taps"].items():
            lines.append(f"| {tap} | " + " | ".join(f"{row[k]:.2e}" for k in keys) + " |")
        lines.append("| **worst** | " + " | ".join(f"**{r['worst'][k]:.2e}**" for k in keys) + " |")
        lines += [
            "",
            "bfloat16 autocast vs each dtype's rounding, every tap: "
            + ", ".join(f"{d} {v}" for d, v in verdicts(r).items()),
            "",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="effnet,vit_s")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "precision-cpu")
    args = ap.parse_args()
    setup_torch("cpu", args.threads)
    command = (
        f"python -m benchmarks.bench_precision --models {args.models} --images {args.images} "
        f"--batch {args.batch} --threads {args.threads}"
    )
    results = [measure(m, args.images, args.batch) for m in args.models.split(",")]
    for r in results:
        r["verdicts"] = verdicts(r)
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": command, "machine": machine(torch.device("cpu")), "results": results}, indent=2) + "\n"
    )
    args.out.with_suffix(".md").write_text(markdown(results, command))
    print(markdown(results, command))


if __name__ == "__main__":
    main()
