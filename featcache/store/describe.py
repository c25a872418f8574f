"""Describing a store for ``inspect``: what it holds, as one JSON-ready dict, and its human rendering.

The dict is what ``featcache inspect --json`` prints: ``{"featcache_format", "featcache_version",
"store", "backbone", "dtype", "splits": {NAME: {"num_samples", "complete", "taps": {...}, ...}},
"verify"}``. ``tap_stats`` streams a tap shard by shard (bounded memory: one shard of one tap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from dask.utils import format_bytes

from featcache.errors import CorruptionError, StoreError

from .codecs import QERR_SUFFIX, SCALE_SUFFIX, chunk_codec_labels, is_eight_bit, storage_dtype
from .feature_store import COMPLETE, FeatureStore, SplitHandle
from .verify import VerifyReport, verify_store
from .writer import EXTRACTION_ATTR


@dataclass
class RunningStats:
    """Mean, std, min, max and NaN/Inf counts of a stream of arrays (Chan's parallel variance update)."""

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf
    nan: int = 0
    inf: int = 0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float32).reshape(-1)
        finite = np.isfinite(x)
        if not finite.all():
            self.nan += int(np.isnan(x).sum())
            self.inf += int(np.isinf(x).sum())
            x = x[finite]
        if x.size == 0:
            return
        n, mean = x.size, float(x.mean(dtype=np.float64))
        m2 = float(np.square(x - mean, dtype=np.float64).sum())
        total = self.count + n
        delta = mean - self.mean
        self.m2 += m2 + delta * delta * self.count * n / total
        self.mean += delta * n / total
        self.count = total
        self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))

    def to_dict(self) -> dict[str, Any]:
        finite = self.count > 0
        return {
            "count": self.count,
            "mean": self.mean if finite else None,
            "std": math.sqrt(self.m2 / self.count) if finite else None,
            "min": self.min if finite else None,
            "max": self.max if finite else None,
            "nan": self.nan,
            "inf": self.inf,
        }


def tap_stats(split: SplitHandle, name: str) -> dict[str, Any]:
    """Statistics of one tap over the split's completed shards, read one shard at a time.

    Besides the value statistics: ``token_norm_mean`` / ``token_norm_std``, the L2 norm of a token's
    channel vector (how activations grow through the backbone; drawn by ``inspect --plot``).
    """
    split.tap(name)  # a clear error for unknown taps
    stats, norms = RunningStats(), RunningStats()
    for k in np.flatnonzero(split.completed_shards()):
        start, stop = split.meta.shard_bounds(int(k))
        split.require_objects(name, [int(k)])
        block = split.read_values(name, start, stop)  # damage: CorruptionError
        stats.update(block.numpy())
        norms.update(torch.linalg.vector_norm(block, dim=-1).numpy())
    out = stats.to_dict()
    out["token_norm_mean"], out["token_norm_std"] = norms.to_dict()["mean"], norms.to_dict()["std"]
    return out


def _completed_shards(split: SplitHandle) -> np.ndarray:
    """Completion records; with a damaged record chunk, record by record (unreadable = not complete)."""
    try:
        return split.completed_shards()
    except CorruptionError:
        done = np.zeros(split.meta.num_shards, dtype=bool)
        for k in range(split.meta.num_shards):
            try:
                done[k] = int(split.read(COMPLETE, k, k + 1)[0]) == 1
            except CorruptionError:
                pass
        return done


def describe_tap(split: SplitHandle, name: str, completed_images: int, stats: bool = False) -> dict[str, Any]:
    """Shape, layout and sizes of one tap; ``nbytes``/``stored_bytes`` count its 8-bit scales too, and
    ``float32_bytes`` is what the same values take as float32 (the compact cache's saving)."""
    arr = split.tap(name)
    info = split.store.manifest.tap(name)
    arrays = [arr] + ([split.array(name + SCALE_SUFFIX)] if is_eight_bit(split.store.manifest.dtype) else [])
    per_image = sum(a.nbytes // max(1, a.shape[0]) for a in arrays)
    nbytes, stored = per_image * completed_images, sum(int(a.nbytes_stored()) for a in arrays)
    d: dict[str, Any] = {
        "shape": list(arr.shape),
        "dtype": split.store.manifest.dtype,
        "storage_dtype": str(arr.dtype),
        "chunks": list(arr.chunks),
        "shards": list(arr.shards or arr.chunks),
        "codecs": chunk_codec_labels(arr),
        "dimension_names": list(arr.metadata.dimension_names or ()),
        "nbytes": nbytes,
        "stored_bytes": stored,
        "compression_ratio": nbytes / stored if stored else None,
        "float32_bytes": info.tokens * info.channels * 4 * split.meta.views * completed_images,
        "position": info.position,
        "block": info.block,
        "tokens": info.tokens,
        "prefix_tokens": info.prefix_tokens,
        "channels": info.channels,
        "grid": list(info.grid),
        "pooling": info.pooling,
    }
    if stats:
        d["stats"] = tap_stats(split, name)
    return d


def quantization_error(split: SplitHandle, name: str) -> float | None:
    """Relative RMS error of an 8-bit tap against the float values it was quantized from, over the completed
    shards: sqrt(sum (decoded - x)^2 / sum x^2), from the sums each shard recorded at extraction."""
    if not is_eight_bit(split.store.manifest.dtype):
        return None
    done = np.flatnonzero(split.completed_shards())
    sums = np.asarray(split.read(name + QERR_SUFFIX), dtype=np.float64)[done].sum(axis=0) if len(done) else [0, 0]
    return float(np.sqrt(sums[0] / sums[1])) if sums[1] > 0 else 0.0


def _describe_tap_or_error(split: SplitHandle, name: str, completed_images: int, stats: bool) -> dict[str, Any]:
    """describe_tap, or {"error"} for an array that cannot be opened (missing, unreadable metadata, a foreign
    codec): describing a damaged store never fails, --verify names the damage. --stats reads every chunk, and
    damaged data is then an error."""
    try:
        d = describe_tap(split, name, completed_images)
    except StoreError as err:
        return {"error": str(err)}
    if stats:
        d["stats"] = tap_stats(split, name)
        if is_eight_bit(split.store.manifest.dtype):
            d["stats"]["quantization_rel_rms"] = quantization_error(split, name)
    return d


def describe_split(split: SplitHandle, stats: bool = False) -> dict[str, Any]:
    meta = split.meta
    done = _completed_shards(split)  # describing a damaged store must not fail: --verify names the damage
    completed = (
        np.concatenate([np.arange(*meta.shard_bounds(int(k))) for k in np.flatnonzero(done)])
        if done.any()
        else np.zeros(0, dtype=np.int64)
    )
    try:
        labels = split.labels()[completed]
    except CorruptionError:
        labels = np.zeros(0, dtype=np.int64)
    counts = np.bincount(labels[labels >= 0], minlength=meta.num_classes) if len(labels) else np.zeros(0, int)
    names = meta.classes or [str(c) for c in range(len(counts))]
    taps = {name: _describe_tap_or_error(split, name, len(completed), stats) for name in split.store.manifest.tap_names}
    nbytes = sum(t.get("nbytes", 0) for t in taps.values())
    stored = sum(t.get("stored_bytes", 0) for t in taps.values())
    float32 = sum(t.get("float32_bytes", 0) for t in taps.values())
    per = max(1, len(completed))
    return {
        "num_samples": meta.num_samples,
        "complete": bool(done.all()),
        "completed_samples": int(len(completed)),
        "num_shards": meta.num_shards,
        "completed_shards": int(done.sum()),
        "views": meta.views,
        "view_transform": meta.view_transform,
        "chunk_images": meta.chunk_images,
        "shard_images": meta.shard_images,
        "data": meta.data,
        "limit": meta.limit,
        "seed": meta.seed,
        "batch_size": meta.batch_size,
        "compressor": meta.compressor,
        "classes": meta.classes,
        "label_counts": {names[i] if i < len(names) else str(i): int(c) for i, c in enumerate(counts)},
        "unlabelled": int((labels < 0).sum()),
        "nbytes": nbytes,
        "stored_bytes": stored,
        "compression_ratio": nbytes / stored if stored else None,
        "bytes_per_sample": nbytes / per,
        "stored_bytes_per_sample": stored / per,
        "float32_bytes_per_sample": float32 / per,
        "float32_ratio": float32 / stored if stored else None,
        "extraction": split.group.attrs.asdict().get(EXTRACTION_ATTR),
        "taps": taps,
    }


def describe_store(
    url: str,
    split: str | None = None,
    stats: bool = False,
    verify: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``inspect --json`` object: manifest essentials, splits with taps, optional stats and verify."""
    store = FeatureStore.open(url, "r", storage_options)
    m = store.manifest
    bb = m.backbone
    names = [store.split(split).name] if split is not None else store.splits()
    spec = bb.get("spec", {})
    report: VerifyReport | None = verify_store(url, split, storage_options) if verify else None
    return {
        "featcache_format": m.featcache_format,
        "featcache_version": m.featcache_version,
        "store": str(url),
        "created": m.created,
        "backbone": {
            "model": spec.get("model"),
            "model_kwargs": spec.get("model_kwargs"),
            "kind": bb.get("kind"),
            "weights": bb.get("weights"),
            "input_size": bb.get("data_config", {}).get("input_size"),
            "timm_version": bb.get("timm_version"),
            "num_taps_available": len(bb.get("taps", [])),
        },
        "dtype": m.dtype,
        "storage_dtype": storage_dtype(m.dtype),
        "compressor": m.compressor,
        "taps": m.tap_names,
        "final_norm": m.final_norm,
        "environment": m.environment,
        "splits": {name: describe_split(store.split(name), stats) for name in names},
        "verify": report.to_dict() if report is not None else None,
    }


# ---------------------------------------------------------------------------------------------
# Human rendering


def _size(n: float | None) -> str:
    return "-" if n is None else format_bytes(int(n))


def _shape(v: list[int]) -> str:
    return "(" + ", ".join(map(str, v)) + ")"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_summary(d: dict[str, Any]) -> str:
    """The human summary of ``describe_store``'s dict (``featcache inspect`` without ``--json``)."""
    bb = d["backbone"]
    w = bb.get("weights") or {}
    sha = (w.get("file_sha256") or w.get("state_sha256") or "")[:12]
    lines = [
        f"store     {d['store']}  (featcache format {d['featcache_format']}, written by featcache "
        f"{d['featcache_version']}, {d['created']})",
        f"backbone  {bb['model']} ({bb['kind']}), weights {w.get('source')} (sha256 {sha}...), input "
        f"{'x'.join(map(str, bb['input_size'] or []))}, timm {bb['timm_version']}",
        f"cache     {d['dtype']}"
        + (" (stored as uint16)" if d["dtype"] == "bfloat16" else "")
        + f", {len(d['taps'])} of {bb['num_taps_available']} taps"
        + (", final norm stored" if d["final_norm"] else ""),
    ]
    for name, s in d["splits"].items():
        lines += [""] + _format_split(name, s)
    v = d.get("verify")
    if v is not None:
        lines.append("")
        lines.append(
            f"verify    {'OK' if v['ok'] else 'FAILED'}: {v['chunks_read']} chunks read, "
            f"{len(v['errors'])} errors, {len(v['warnings'])} warnings"
        )
        lines += [f"  ERROR    {e}" for e in v["errors"]] + [f"  warning  {e}" for e in v["warnings"]]
    return "\n".join(lines)


def _format_split(name: str, s: dict[str, Any]) -> list[str]:
    state = "complete" if s["complete"] else f"INCOMPLETE ({s['completed_samples']} images done)"
    views = f", {s['views']} {s['view_transform']} views" if s["views"] > 1 else ""
    lines = [
        f"split {name}: {s['num_samples']} images, {state}, {s['completed_shards']}/{s['num_shards']} shards"
        f"{views}; data {s['data']}" + (f" (--limit {s['limit']})" if s["limit"] else ""),
        f"  stored {_size(s['stored_bytes'])} for {_size(s['nbytes'])} of taps"
        + (f" (ratio {s['compression_ratio']:.2f})" if s["compression_ratio"] else "")
        + f"; per sample {_size(s['stored_bytes_per_sample'])} stored for {_size(s['float32_bytes_per_sample'])} "
        + "as float32"
        + (f" ({s['float32_ratio']:.1f}x smaller)" if s["float32_ratio"] else ""),
    ]
    rows = [["tap", "shape", "dtype", "chunks", "shards", "codec", "stored", "ratio"]]
    has_stats = any("stats" in t for t in s["taps"].values())
    quantized = any("quantization_rel_rms" in t.get("stats", {}) for t in s["taps"].values())
    if has_stats:
        rows[0] += ["mean", "std", "min", "max", "nan", "inf"] + (["8-bit rel. RMS error"] if quantized else [])
    for tap, t in s["taps"].items():
        if "error" in t:
            rows.append(
                [tap, "ERROR", t["error"][:60] + ("..." if len(t["error"]) > 60 else "")] + [""] * (len(rows[0]) - 3)
            )
            continue
        codec = "+".join(c for c in t["codecs"] if c != "bytes")
        row = [
            tap,
            _shape(t["shape"]),
            t["dtype"],
            _shape(t["chunks"]),
            _shape(t["shards"]),
            codec,
            _size(t["stored_bytes"]),
            f"{t['compression_ratio']:.2f}" if t["compression_ratio"] else "-",
        ]
        if has_stats:
            st = t["stats"]
            row += [_num(st["mean"]), _num(st["std"]), _num(st["min"]), _num(st["max"]), str(st["nan"]), str(st["inf"])]
            row += [_num(st.get("quantization_rel_rms"))] if quantized else []
        rows.append(row)
    lines += _table(rows)
    if s["label_counts"]:
        total = max(1, sum(s["label_counts"].values()))
        peak = max(s["label_counts"].values()) or 1
        lines.append("  labels:")
        items = list(s["label_counts"].items())
        label_rows = [
            [f"    {k}", str(c), f"{100 * c / total:.1f}%", "#" * max(0, round(30 * c / peak))]
            for k, c in items[:MAX_LABEL_ROWS]
        ]
        lines += _table(label_rows, indent="")
        if len(items) > MAX_LABEL_ROWS:
            counts = [c for _, c in items]
            lines.append(
                f"    ... {len(items) - MAX_LABEL_ROWS} more classes (all: min {min(counts)}, max {max(counts)} "
                "images per class; --json lists them)"
            )
    if s["unlabelled"]:
        lines.append(f"  unlabelled images: {s['unlabelled']}")
    return lines


MAX_LABEL_ROWS = 40


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


__all__ = ["RunningStats", "describe_split", "describe_store", "describe_tap", "format_summary", "tap_stats"]
