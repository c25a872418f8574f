"""Scaling on dask.distributed: one process vs a local cluster of 1 and 2 workers, the same images.

    python -m benchmarks.bench_scale                 # ViT-S/16 (random weights), 256 images, 2 rounds
    python -m benchmarks.bench_scale --tiny          # test_vit at 32 px, 32 images: a smoke run

Extraction: the same synthetic images (ImageFolder, 3 classes) extracted by ``featcache.extraction.extract``
in this process (torch threads = all cores) and by ``featcache.distributed.extraction.extract_on_cluster``
on local clusters of N workers (cores / N torch threads each). Clusters are started once and warmed up (torch
imported, model built on every worker) before timing, so the numbers compare the shard loops; the
start-up time is reported separately. Training: a 4-member sweep (2 banks) from the extracted cache,
``featcache.training.train`` here vs ``train_on_cluster`` (wall time, the gather included).
Configurations alternate within each round so that load from other processes hits all of them;
medians go to benchmarks/results/scale.json and a markdown table to stdout.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the featcache CLI does

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Iterator  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from featcache.distributed.cluster import cluster_client  # noqa: E402
from featcache.distributed.extraction import extract_on_cluster  # noqa: E402
from featcache.distributed.training import train_on_cluster  # noqa: E402
from featcache.extraction import ExtractOptions, extract  # noqa: E402
from featcache.loader import cpu_count  # noqa: E402
from featcache.manifest import BackboneSpec  # noqa: E402
from featcache.training import train  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(model="vit_small_patch16_224", weights="random")
TINY = dict(model="test_vit", model_kwargs={"img_size": 32}, weights="random")


def write_images(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """n RGB images in 3 classes (a bright square whose colour is the class), ImageFolder layout."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)
        x0, y0 = rng.integers(0, size // 2, size=2)
        img[y0 : y0 + size // 2, x0 : x0 + size // 2, i % 3] = 230
        d = root / f"class_{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:05d}.png")
    return root


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_extract(
    run: str, client: Any, spec: BackboneSpec, data: str, out: Path, opts: ExtractOptions
) -> dict[str, float]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    if client is None:
        with torch_threads(cpu_count()):
            report = extract(spec, data, out, opts)
    else:
        report = extract_on_cluster(spec, data, out, opts, client=client)
    wall = time.perf_counter() - t0
    print(
        f"  extract {run}: {report.images_per_second:.1f} img/s (shard loop), {wall:.1f} s wall",
        file=sys.stderr,
        flush=True,
    )
    return {"images_per_second": report.images_per_second, "wall_seconds": wall}


def time_train(
    run: str, client: Any, store: Path, out: Path, settings: dict[str, Any], grid: dict[str, list[Any]]
) -> dict[str, float]:
    t0 = time.perf_counter()
    if client is None:
        with torch_threads(cpu_count()):
            summary = train(str(store), "last", out, settings, grid, overwrite=True, progress=False, tensorboard=False)
    else:
        summary = train_on_cluster(
            str(store),
            "last",
            out,
            settings,
            grid,
            client=client,
            overwrite=True,
            progress=False,
            device="cpu",
            tensorboard=False,
        )
    wall = time.perf_counter() - t0
    print(f"  train {run}: {wall:.1f} s wall, best {summary['best']['name']}", file=sys.stderr, flush=True)
    return {"wall_seconds": wall, "best_score": summary["best"]["val_acc"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = BackboneSpec(**(TINY if args.tiny else FULL))
    images, size = (32, 32) if args.tiny else (args.images, 64)
    workers = [int(w) for w in args.workers.split(",")]
    work = Path(tempfile.mkdtemp(prefix="featcache-bench-scale-"))
    data = str(write_images(work / "images", images, size))
    opts = ExtractOptions(
        batch_size=args.batch_size, chunk_images=4, shard_images=args.shard_images, progress=False, device="cpu"
    )
    settings, grid = {"epochs": args.epochs, "batch_size": 32}, {"lr": [1e-3, 3e-3], "rank": [4, 8]}
    runs = ["1 process"] + [f"{n} worker(s)" for n in workers]
    ext: dict[str, list[dict[str, float]]] = {r: [] for r in runs}
    trn: dict[str, list[dict[str, float]]] = {r: [] for r in runs}
    startup: dict[str, float] = {}
    try:
        with contextlib.ExitStack() as stack:
            clients: dict[str, Any] = {"1 process": None}
            for n, name in zip(workers, runs[1:]):
                t0 = time.perf_counter()
                clients[name] = stack.enter_context(cluster_client(workers=n, device="cpu"))
                extract_on_cluster(
                    spec, data, work / "warm.zarr", opts, client=clients[name], limit=2 * n, overwrite=True
                )  # torch imported and the model built on every worker
                startup[name] = time.perf_counter() - t0
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
                for name in runs:
                    ext[name].append(time_extract(name, clients[name], spec, data, work / "s.zarr", opts))
                    trn[name].append(time_train(name, clients[name], work / "s.zarr", work / "run", settings, grid))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summarize(args, spec, images, size, runs, ext, trn, startup, settings, grid)


def summarize(
    args: argparse.Namespace,
    spec: BackboneSpec,
    images: int,
    size: int,
    runs: list[str],
    ext: dict[str, list[dict[str, float]]],
    trn: dict[str, list[dict[str, float]]],
    startup: dict[str, float],
    settings: dict[str, Any],
    grid: dict[str, list[Any]],
) -> dict[str, Any]:
    med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
    base_e, base_t = med(ext[runs[0]], "images_per_second"), med(trn[runs[0]], "wall_seconds")
    results = {
        name: {
            "extract_images_per_second": med(ext[name], "images_per_second"),
            "extract_wall_seconds": med(ext[name], "wall_seconds"),
            "extract_speedup": med(ext[name], "images_per_second") / base_e,
            "train_wall_seconds": med(trn[name], "wall_seconds"),
            "train_speedup": base_t / med(trn[name], "wall_seconds"),
            "cluster_startup_seconds": startup.get(name),
            "rounds": {"extract": ext[name], "train": trn[name]},
        }
        for name in runs
    }
    return {
        "command": "python -m benchmarks.bench_scale " + " ".join(sys.argv[1:]),
        "model": spec.to_dict(),
        "images": images,
        "image_size": size,
        "batch_size": args.batch_size,
        "shard_images": args.shard_images,
        "sweep": {"method": "last", "settings": settings, "grid": grid},
        "machine": {
            "cpus": cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "gpus": torch.cuda.device_count(),
        },
        "results": results,
    }


def markdown(payload: dict[str, Any]) -> str:
    lines = [
        "| run | extract img/s | speed-up | extract wall s | train wall s | speed-up | cluster start s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in payload["results"].items():
        start = f"{r['cluster_startup_seconds']:.1f}" if r["cluster_startup_seconds"] is not None else "-"
        lines.append(
            f"| {name} | {r['extract_images_per_second']:.1f} | {r['extract_speedup']:.2f}x | "
            f"{r['extract_wall_seconds']:.1f} | {r['train_wall_seconds']:.1f} | {r['train_speedup']:.2f}x | "
            f"{start} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-images", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="cluster sizes to compare, e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="test_vit at 32 px, 32 images")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args(argv)
    payload = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    main()
