"""Entry point: ``python -m benchmarks.run --preset quick|full|gpu|tiny [--device cpu|cuda]``.

Runs, per backbone of the preset: one extraction of N images, the training-step comparison of every peer
(A B A B, one process), peak memory of every peer (one subprocess each), E-epoch end-to-end times, and on
the first (ViT) backbone the distance to the machine's limits and the K-member sweep cost; then the
accuracy benchmark on real data. Writes ``benchmarks/results/<preset>-<device>.json``, the PNG plots and
regenerates ``benchmarks/results/README.md`` from every result file there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .common import RESULTS, describe_device, machine, say, setup_torch, write_json


@dataclass(frozen=True)
class Preset:
    """Sizes of one benchmark run; see docs/benchmarks.md for what each stage measures."""

    name: str
    models: tuple[str, ...]  # keys of workload.MODELS; the first is the ViT used for limits and sweeps
    images: int  # N: images extracted per backbone (steps cycle over them; end-to-end trains on them)
    batch_size: int
    epochs: int  # E of the end-to-end comparison
    rounds: int  # A B A B rounds of the step comparison
    e2e_real: tuple[str, ...]  # featcache methods whose E epochs are really run (others extrapolated)
    memory_models: tuple[str, ...]
    memory_peers: tuple[str, ...]
    memory_steps: int
    sweep_k: int
    sweep_rounds: int
    accuracy: tuple[tuple[int | None, int | None, int], ...]  # (train, test images (None = all), epochs)
    accuracy_model: str
    accuracy_peers: tuple[str, ...] = ("full-ft", "lora")  # fine-tuning peers given featcache's budget
    accuracy_entries: tuple[str, ...] = ("linear", "last", "lst")  # featcache rows (benchmarks.accuracy.ENTRIES)
    device: str = "cpu"
    threads: int | None = 1  # CPU: torch threads (1: stable on a shared machine); None = torch's default
    min_call_s: float = 1.0
    targets: dict[str, float] = field(default_factory=lambda: dict(TARGETS))


TARGETS = {
    "step_vs_lora": 20.0,
    "step_vs_in_loop": 8.0,
    "e2e_vs_lora": 8.0,
    "memory_vs_lora": 0.35,
    "extract_vs_forward": 0.9,
    "sweep_k8_vs_k1": 6.0,
}
STEP_PEERS = ("featcache-last", "featcache-lst", "featcache-linear", "last-in-loop", "lora", "full-ft")
QUICK_MEMORY_PEERS = ("featcache-last@ram", "featcache-last@stream", "last-in-loop", "lora", "full-ft")
LIMIT_METHODS = {"quick": ("last",), "tiny": ("last",)}  # others: last and lst
MEMORY_PEERS = (
    "featcache-last@ram",
    "featcache-last@stream",
    "featcache-lst@ram",
    "featcache-linear@ram",
    "last-in-loop",
    "lora",
    "full-ft",
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        "tiny",
        ("tiny_vit",),
        images=16,
        batch_size=8,
        epochs=1,
        rounds=1,
        e2e_real=("last", "lst", "linear"),
        memory_models=("tiny_vit",),
        memory_peers=("featcache-last@stream",),
        memory_steps=1,
        sweep_k=2,
        sweep_rounds=1,
        accuracy=((40, 20, 1),),
        accuracy_model="tiny_cnn",
        min_call_s=0.0,
    ),
    "quick": Preset(
        "quick",
        ("vit_s", "effnet"),
        images=128,
        batch_size=32,
        epochs=30,
        rounds=3,
        e2e_real=("last", "linear"),
        memory_models=("vit_s", "effnet"),
        memory_peers=QUICK_MEMORY_PEERS,
        memory_steps=2,
        sweep_k=8,
        sweep_rounds=2,
        accuracy=((600, 400, 6),),
        accuracy_model="effnet",
        accuracy_peers=("full-ft",),
    ),
    "full": Preset(
        "full",
        ("vit_s", "effnet"),
        images=1000,
        batch_size=32,
        epochs=30,
        rounds=5,
        e2e_real=("last", "lst", "linear"),
        memory_models=("vit_s", "effnet"),
        memory_peers=MEMORY_PEERS,
        memory_steps=3,
        sweep_k=8,
        sweep_rounds=5,
        accuracy=((10000, 2000, 10), (None, None, 3)),
        accuracy_model="effnet",
    ),
    "gpu": Preset(
        "gpu",
        ("vit_b", "effnet"),
        images=1000,
        batch_size=32,
        epochs=30,
        rounds=3,
        e2e_real=("last", "lst", "linear"),
        memory_models=("vit_b", "effnet"),
        memory_peers=(
            "featcache-last@gpu",
            "featcache-last@ram",
            "featcache-lst@gpu",
            "featcache-linear@gpu",
            "last-in-loop",
            "lora",
            "full-ft",
        ),
        memory_steps=3,
        sweep_k=8,
        sweep_rounds=3,
        accuracy=((10000, 2000, 10),),
        accuracy_model="effnet",
        device="cuda",
        threads=None,
        min_call_s=0.5,
    ),
}


def model_stage(
    p: Preset,
    model: str,
    device: str,
    workdir: Path,
    first: bool,
    done: Callable[[dict[str, Any]], None] = lambda out: None,
) -> dict[str, Any]:
    """Extraction, step comparison, memory, end to end (and limits + sweep on the first backbone).

    ``done(out)`` is called with the rows measured so far after each stage, so that a run cut short
    (killed, out of memory) keeps them."""
    import torch

    from . import limits, memory, speed, sweeps
    from .peers import PeerContext
    from .workload import MODELS, build_store, data_specs

    spec_train, _, note = data_specs()
    say(f"[{model}] extracting {p.images} images of {note}")
    store = build_store(
        MODELS[model], {"train": (spec_train, p.images)}, workdir / f"{model}.zarr", torch.device(device), p.batch_size
    )
    say(
        f"[{model}] extraction: {store.seconds['train']:.1f}s, {store.nbytes / 2**20:.0f} MB of taps ({store.extraction})"
    )
    reader = "gpu" if device.startswith("cuda") else "ram"
    ctx = PeerContext(
        model=model,
        batch_size=p.batch_size,
        device=device,
        store=str(store.path),
        data=spec_train,
        images=p.images,
        reader=reader,
    )
    step_peers = list(STEP_PEERS) + (["featcache-last@ram"] if reader == "gpu" else [])
    say(f"[{model}] training steps, A B A B x {p.rounds}")
    steps = speed.measure_steps(step_peers, ctx, p.rounds, p.min_call_s)
    out: dict[str, Any] = {
        "model": model,
        "label": MODELS[model].label,
        "data": note,
        "store": store.to_dict(),
        "context": ctx.to_dict(),
        "steps": steps,
        "featcache_last_read_share": speed.reader_share(ctx, "last"),
    }
    done(out)
    if model in p.memory_models:
        say(f"[{model}] memory, one subprocess per peer")
        mem_ctx = replace(ctx, preload=False, reader_options={})
        out["memory"] = {}
        for name in p.memory_peers:
            c = mem_ctx.to_dict()
            if name.endswith("@stream"):
                c["reader_options"] = {"buffer_mb": 64, "prefetch": 1}
            out["memory"][name] = memory.measure(name, c, p.memory_steps, p.threads)
        done(out)
    say(f"[{model}] end to end: {p.epochs} epochs on {p.images} images")
    out["end_to_end"] = speed.end_to_end(store, ctx, ["last", "lst", "linear"], p.epochs, steps, list(p.e2e_real))
    done(out)
    if first:
        say(f"[{model}] limits and sweep")
        methods = LIMIT_METHODS.get(p.name, ("last", "lst"))
        out["limits"] = {
            "matmul": limits.matmul_rate(torch.device(device)),
            "compute": {m: limits.compute_limit(ctx, m, p.rounds) for m in methods},
            "reader": {
                r: limits.reader_limit(replace(ctx, reader=r, reader_options=opts), "last")
                for r, opts in ((reader, {}), ("stream", {"buffer_mb": 64}))
            },
        }
        out["limits"]["profile"] = {m: limits.step_profile(ctx, m) for m in methods}
        if device.startswith("cuda"):
            out["limits"]["matmul_bf16"] = limits.matmul_rate(torch.device(device), torch.bfloat16)
        done(out)
        out["sweep"] = sweeps.measure_sweep(ctx, p.sweep_k, p.sweep_rounds, p.targets["sweep_k8_vs_k1"])
        done(out)
    shutil.rmtree(store.path, ignore_errors=True)
    return out


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` plus the backbones and the accuracy sizes that only ``old`` holds (an accuracy size that ``new``
    measured, or continued, replaces ``old``'s)."""
    out = dict(new)
    out["models"] = {**old.get("models", {}), **new.get("models", {})}
    redone = [a.get("requested") for a in new.get("accuracy", [])]
    kept = [a for a in old.get("accuracy", []) if "requested" not in a or a["requested"] not in redone]
    if "accuracy" not in new:
        out["accuracy"] = old.get("accuracy", [])
    elif kept:
        out["accuracy"] = kept + new["accuracy"]
    out["wall_s"] = old.get("wall_s", 0.0) + new["wall_s"]
    out["merged_from"] = old.get("merged_from", [old.get("started")]) + [new.get("started")]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the preset's)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the preset's)")
    ap.add_argument("--models", default=None, help="comma-separated model keys (default: the preset's)")
    ap.add_argument("--skip", default="", help="comma-separated stages to skip: models, accuracy")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    ap.add_argument("--name", default=None, help="result name (default: <preset>-<device>)")
    ap.add_argument("--workdir", type=Path, default=None, help="where stores are written (default: a temp dir)")
    ap.add_argument(
        "--accuracy",
        default=None,
        metavar="TRAIN,TEST,EPOCHS",
        help="one accuracy size instead of the preset's, e.g. 2000,500,10 (0 = all images)",
    )
    ap.add_argument(
        "--accuracy-peers",
        default=None,
        help="comma-separated fine-tuning peers, PEER@epochs for the same epochs (default: the preset's)",
    )
    ap.add_argument(
        "--accuracy-entries",
        default=None,
        help="comma-separated featcache rows of benchmarks.accuracy.ENTRIES (default: linear,last,lst)",
    )
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the backbones and accuracy rows of an existing result file of the same name that this "
        "run does not redo (to split a long run into several commands); an accuracy size that file "
        "left incomplete is continued (its rows kept, its store reused from --workdir)",
    )
    args = ap.parse_args(argv)
    base = PRESETS[args.preset]
    p = replace(
        base, device=args.device or base.device, threads=args.threads if args.threads is not None else base.threads
    )
    if args.accuracy:
        tr, te, ep = (int(x) for x in args.accuracy.split(","))
        p = replace(p, accuracy=((tr or None, te or None, ep),))
    if args.accuracy_peers is not None:
        p = replace(p, accuracy_peers=tuple(filter(None, args.accuracy_peers.split(","))))
    if args.accuracy_entries is not None:
        p = replace(p, accuracy_entries=tuple(filter(None, args.accuracy_entries.split(","))))
    models = tuple(args.models.split(",")) if args.models else p.models
    os.environ.setdefault("FEATCACHE_PROGRESS", "0")
    device = setup_torch(p.device, p.threads if p.device == "cpu" else None)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="featcache-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "preset": asdict(p),
        "device": describe_device(device),
        "machine": machine(device),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "models": {},
    }
    path = args.out / f"{args.name or f'{p.name}-{device.type}'}.json"
    old = json.loads(path.read_text()) if args.merge and path.is_file() else None

    def save(final: bool = False) -> dict[str, Any]:
        """Write what is measured so far (after every stage: a run cut short keeps its finished stages)."""
        result["machine_after"] = machine(device)
        result["wall_s"] = time.perf_counter() - t0
        result["complete"] = final
        out = merge(old, result) if old is not None else result
        write_json(path, out)
        return out

    try:
        if "models" not in skip:
            for model in models:
                # limits and the sweep run on the preset's first backbone (the ViT), whichever backbones this run does
                def stage_done(out: dict[str, Any], model: str = model) -> None:
                    result["models"][model] = out  # the same dict each time, growing: saved after every stage
                    save()

                model_stage(p, model, str(device), workdir, first=model == p.models[0], done=stage_done)
        if "accuracy" not in skip:
            from .accuracy import measure_accuracy, size_key

            result["accuracy"] = []
            earlier = old.get("accuracy", []) if old is not None else []
            for tr, te, epochs in p.accuracy:
                key = size_key(p.accuracy_model, tr, te, epochs, p.batch_size)
                previous = next((a for a in earlier if not a.get("complete", True) and a.get("requested") == key), None)

                def accuracy_done(entry: dict[str, Any], i: int = len(result["accuracy"])) -> None:
                    result["accuracy"][i:] = [entry]  # saved after the extraction and every method and peer
                    save()

                measure_accuracy(
                    p.accuracy_model,
                    tr,
                    te,
                    epochs,
                    p.batch_size,
                    str(device),
                    workdir,
                    methods=p.accuracy_entries,
                    peers=p.accuracy_peers,
                    previous=previous,
                    done=accuracy_done,
                )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    final = save(final=True)
    from .report import write_reports

    write_reports(args.out)
    say(f"done in {result['wall_s'] / 60:.1f} min: {path}, {args.out / 'README.md'}")
    return final


if __name__ == "__main__":
    main()
