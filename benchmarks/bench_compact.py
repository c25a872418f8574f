"""Compact caches side by side (issue 21): what 8-bit codes, token pooling and fewer taps cost and save.

The same images are extracted once per cache variant (``VARIANTS``): ``fp16-all`` (float16, every tap: the
cache as it was), ``int8`` (int8 codes and one bfloat16 scale per token row), ``pool2`` (float16, each 2x2
window of patch tokens averaged), ``every2`` (float16, only LAST's inputs at gap 2: ``--layers every:2``) and
``compact`` (all three); ``fp8`` (float8_e4m3 codes) on request (``--variants ...,fp8``). Then, per stage:

- ``speed`` (per backbone of ``--models``, N = ``--images``): each variant's extraction timed in paired rounds
  (A B C .., then .. C B A; images/s of the shard loop and of its steady part); bytes per sample from
  ``describe_store`` (stored = on disk, compressed; the ratio is fp16-all's over the variant's) and, for 8-bit
  caches, each tap's relative RMS quantization error; one epoch of the stream reader over LAST's taps (64 MB
  window) per variant, A B A B; LAST's training step (batch B, the ram reader, gap 2) on each variant's store
  and LoRA's step on the same images, A B A B in one process (``speed.time_peers``).
- ``memory``: peak RSS above the post-import baseline of LAST training with the default reader (``auto``) on
  each variant's store, and of LoRA, one subprocess each (``benchmarks.memory``).
- ``accuracy`` (``--acc-model``, ImageNet EfficientNet-Lite0): a fixed stratified subset of Fashion-MNIST
  (``--acc-train`` / ``--acc-test``) extracted per variant, LAST trained with ``--seeds`` initialisations as
  one sweep (``grid seed=0,1``) with the honest protocol: each seed's epoch is chosen on 10% of the training
  split held out (stratified, seeded), and its test accuracy is reported; the batch order is seed 0's for all.

Ratios are medians of per-round ratios (``common.paired_ratio``): a neighbour's load moves this machine's
speed by tens of percent within minutes, and both sides of a pair share it. The result (JSON, written after
every stage and every accuracy variant, so that a run cut short keeps what it measured) goes to
``<out>.json``, the tables to ``<out>.md`` (printed too). ``--resume`` keeps what ``<out>.json`` holds: the entries
of stages this command does not do, and the finished entries of the same sizes of those it does (an accuracy
stage cut short continues with the variants it lacks), so a long run can be split into several commands.

    python -m benchmarks.bench_compact                                # every stage (hours on 2 CPU cores)
    python -m benchmarks.bench_compact --stages accuracy --threads 2  # one stage
    python -m benchmarks.bench_compact --smoke --out /tmp/compact     # tiny models, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from .common import RESULTS, describe_device, interleave, machine, paired_ratio, say, setup_torch, write_json
from .workload import MODELS, ModelPreset, build_store, data_specs

BASE = "fp16-all"  # the cache as it was: every ratio is against it
LAST_GAP = 2  # LAST's default gap (LASTConfig.gap), passed explicitly so that every2 always matches it
LAST_CONFIG: dict[str, Any] = {"gap": LAST_GAP}
STAGES = ("speed", "memory", "accuracy")


@dataclass(frozen=True)
class Variant:
    """One way of caching the same images: storage dtype, token pooling (BackboneSpec), which taps."""

    key: str
    label: str
    dtype: str = "float16"
    pool_tokens: int = 1
    layers: str | None = None

    def preset(self, base: ModelPreset) -> ModelPreset:
        """The backbone preset with this variant's pooling (pooling is part of the backbone spec)."""
        return replace(base, spec={**base.spec, "pool_tokens": self.pool_tokens}) if self.pool_tokens > 1 else base

    def extract_options(self) -> dict[str, Any]:
        """``featcache.extraction`` options of this variant."""
        return {"dtype": self.dtype, **({"layers": self.layers} if self.layers else {})}

    @property
    def eight_bit(self) -> bool:
        return self.dtype in ("int8", "float8_e4m3")


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant(BASE, "float16, every tap"),
        Variant("int8", "int8 codes + a bfloat16 scale per token row", dtype="int8"),
        Variant("pool2", "float16, 2x2 windows of patch tokens averaged", pool_tokens=2),
        Variant("every2", f"float16, LAST's inputs only (--layers every:{LAST_GAP})", layers=f"every:{LAST_GAP}"),
        Variant(
            "compact", f"int8 + pool 2 + every:{LAST_GAP}", dtype="int8", pool_tokens=2, layers=f"every:{LAST_GAP}"
        ),
        Variant("fp8", "float8_e4m3 codes + a bfloat16 scale per token row", dtype="float8_e4m3"),
    )
}
DEFAULT_VARIANTS = ("fp16-all", "int8", "pool2", "every2", "compact")

# the targets; "vit"/"cnn" are the backbones they are read on (Settings.vit / Settings.cnn)
TARGETS: dict[str, float] = {
    "bytes_vit": 8.0,
    "bytes_cnn": 5.0,
    "acc_compact_points": 0.5,
    "acc_int8_points": 0.2,
    "memory_vs_lora": 0.30,
    "stream_vs_base": 4.0,
    "step_pool_vs_lora": 20.0,
}


def option(default: Any, help: str) -> Any:
    """A Settings field that is also a command-line option (``--name-with-dashes``, typed like its default)."""
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    """The sizes of one run (recorded in the result; ``--resume`` continues only a run of the same sizes)."""

    models: list[str]
    variants: list[str]
    images: int = option(256, "images per backbone (speed, memory)")
    batch_size: int = option(32, "speed and memory batch")
    rounds: int = option(3, "paired rounds")
    buffer_mb: float = 64.0
    min_call_s: float = 1.0
    memory_models: list[str] | None = None  # None: every backbone of models
    memory_steps: int = option(3, "training steps per memory subprocess")
    # memory workers at once (peak RSS is per process; 1 keeps them off each other's cores)
    memory_jobs: int = option(1, "memory subprocesses at once")
    acc_model: str = option("effnet", "accuracy backbone")
    acc_train: int = option(10000, "accuracy training images")
    acc_test: int = option(2000, "accuracy test images")
    epochs: int = option(4, "accuracy epochs")
    acc_batch: int = option(64, "accuracy batch")
    seeds: int = option(2, "accuracy seeds (0, 1, ..)")
    # seeds first_seed, first_seed + 1, ... (a later run adds seeds to an earlier one)
    first_seed: int = option(0, "the first accuracy seed")
    vit: str = "vit_s"  # the backbones the targets are read on
    cnn: str = "effnet"
    device: str = option("cpu", "cpu or cuda")
    threads: int | None = option(1, "CPU torch threads")
    smoke: bool = False

    def sizes(self, stage: str) -> dict[str, Any]:
        """What must agree for ``--resume`` to keep an earlier run's entry of ``stage``."""
        keys = {
            "speed": ("images", "batch_size", "rounds", "buffer_mb", "device", "threads"),
            "memory": ("images", "batch_size", "memory_steps", "device", "threads"),
            "accuracy": ("acc_model", "acc_train", "acc_test", "epochs", "acc_batch", "seeds", "first_seed", "device"),
        }[stage]
        sizes = {k: getattr(self, k) for k in keys}
        if not sizes.get("first_seed", 1):
            del sizes["first_seed"]  # runs recorded before first_seed existed started at seed 0 and still match
        return sizes


def smoke_settings(s: Settings, models: list[str] | None = None) -> Settings:
    """Tiny random models, a few dozen images, one round, one epoch, memory workers 3 at a time: the code path in
    a minute or two. ``models``: the speed stage's backbones (default both tiny ones; memory on the first)."""
    models = models or ["tiny_vit", "tiny_cnn"]
    return replace(
        s,
        models=models,
        images=40,
        batch_size=8,
        rounds=1,
        min_call_s=0.0,
        memory_models=models[:1],
        memory_steps=1,
        memory_jobs=3,
        acc_model="tiny_cnn",
        acc_train=40,
        acc_test=20,
        epochs=1,
        acc_batch=8,
        vit="tiny_vit",
        cnn="tiny_cnn",
        smoke=True,
    )


# ---------------------------------------------------------------------------------------------
# Stores and their sizes


def store_path(workdir: Path, model: str, variant: str) -> Path:
    return workdir / f"{model}-{variant}.zarr"


def store_size(path: Path, variant: Variant) -> dict[str, Any]:
    """Bytes per sample of the train split (``describe_store``), per-tap tokens, and for 8-bit caches each tap's
    relative RMS quantization error (recorded by extraction)."""
    from featcache.store.describe import describe_store

    sp = describe_store(str(path), split="train", stats=variant.eight_bit)["splits"]["train"]
    out = {
        k: sp[k]
        for k in (
            "num_samples",
            "complete",
            "bytes_per_sample",
            "stored_bytes_per_sample",
            "float32_bytes_per_sample",
            "float32_ratio",
        )
    }
    out["taps"] = {
        name: {"tokens": t["tokens"], "channels": t["channels"], "stored_bytes": t["stored_bytes"]}
        for name, t in sp["taps"].items()
    }
    if variant.eight_bit:
        for name, t in sp["taps"].items():
            out["taps"][name]["quantization_rel_rms"] = t["stats"]["quantization_rel_rms"]
        out["max_quantization_rel_rms"] = max(t["quantization_rel_rms"] for t in out["taps"].values())
    return out


def add_size_ratios(sizes: dict[str, dict[str, Any]]) -> None:
    """Each variant's bytes per sample against fp16-all's: stored (on disk, compressed) and raw."""
    base = sizes.get(BASE)
    if not base:
        return
    for row in sizes.values():
        row["stored_ratio_vs_base"] = base["stored_bytes_per_sample"] / row["stored_bytes_per_sample"]
        row["raw_ratio_vs_base"] = base["bytes_per_sample"] / row["bytes_per_sample"]


def is_complete(path: Path) -> bool:
    """A store whose train split was written whole (a run cut short may leave a partial one in --workdir)."""
    from featcache.store.feature_store import FeatureStore

    try:
        return bool(FeatureStore.open(str(path)).split("train").completed_shards().all())
    except Exception:  # missing or unreadable: extract again
        return False


def ensure_stores(s: Settings, model: str, workdir: Path) -> dict[str, Path]:
    """Each variant's store of the N images, extracted once where the speed stage has not left one."""
    spec_train = data_specs()[0]
    paths = {}
    for key in s.variants:
        v, paths[key] = VARIANTS[key], store_path(workdir, model, key)
        if not is_complete(paths[key]):
            say(f"[{model}] extracting {s.images} images as {key}")
            build_store(
                v.preset(MODELS[model]),
                {"train": (spec_train, s.images, v.extract_options())},
                paths[key],
                torch.device(s.device),
                s.batch_size,
            )
    return paths


# ---------------------------------------------------------------------------------------------
# Stage: speed


def time_extractions(s: Settings, model: str, workdir: Path) -> dict[str, dict[str, Any]]:
    """Every variant's extraction of the same N images, ``rounds`` paired rounds (order alternating); the first
    round's stores are kept for the later measurements. An untimed small extraction first pays one-time costs."""
    spec_train = data_specs()[0]
    device = torch.device(s.device)
    base = MODELS[model]
    first = VARIANTS[s.variants[0]]
    warm = workdir / f"{model}-warmup.zarr"
    build_store(
        first.preset(base),
        {"train": (spec_train, min(s.images, s.batch_size), first.extract_options())},
        warm,
        device,
        s.batch_size,
    )
    shutil.rmtree(warm, ignore_errors=True)
    reports: dict[str, list[dict[str, Any]]] = {k: [] for k in s.variants}
    seconds: dict[str, list[float]] = {k: [] for k in s.variants}
    for r in range(s.rounds):
        for key in s.variants if r % 2 == 0 else s.variants[::-1]:
            v = VARIANTS[key]
            path = store_path(workdir, model, key) if r == 0 else workdir / f"{model}-{key}-round{r}.zarr"
            info = build_store(
                v.preset(base), {"train": (spec_train, s.images, v.extract_options())}, path, device, s.batch_size
            )
            reports[key].append(info.reports["train"])
            seconds[key].append(info.seconds["train"])
            if r > 0:
                shutil.rmtree(path, ignore_errors=True)
        say(
            f"[{model}] extraction round {r + 1}/{s.rounds}: "
            + ", ".join(f"{k} {reports[k][-1]['images_per_second']:.1f}" for k in s.variants)
            + " images/s"
        )
    ips = {k: [rep["images_per_second"] for rep in reports[k]] for k in s.variants}
    steady = {k: [rep["steady_images_per_second"] for rep in reports[k]] for k in s.variants}
    return {
        k: {
            "images_per_s": ips[k],
            "steady_images_per_s": steady[k],
            "call_seconds": seconds[k],
            "median_images_per_s": statistics.median(ips[k]),
            "median_steady_images_per_s": statistics.median(steady[k]),
            "vs_base": paired_ratio(ips[k], ips[BASE]),
            "steady_vs_base": paired_ratio(steady[k], steady[BASE]),
            "report": reports[k][0],
        }
        for k in s.variants
    }


def last_taps(path: Path) -> list[str]:
    """The taps LAST (gap 2, default config) reads from a store: what the readers are timed on."""
    from featcache import methods
    from featcache.store.feature_store import FeatureStore

    from .peers import method_input

    return list(methods.create("last", dict(LAST_CONFIG), method_input(FeatureStore.open(str(path)))).required_taps)


def time_stream(s: Settings, paths: dict[str, Path]) -> dict[str, dict[str, Any]]:
    """One epoch of the stream reader (LAST's taps, batch B, ``buffer_mb`` window) per variant, A B A B."""
    from featcache.store.feature_store import FeatureStore
    from featcache.store.reader import open_reader

    device = torch.device(s.device)
    taps = {k: last_taps(p) for k, p in paths.items()}
    readers = {
        k: open_reader(
            FeatureStore.open(str(p)).split("train"),
            taps[k],
            "stream",
            s.batch_size,
            seed=0,
            device=device,
            buffer_mb=s.buffer_mb,
        )
        for k, p in paths.items()
    }

    def epoch(reader: Any) -> Callable[[], int]:
        return lambda: sum(len(b) for b in reader.epoch(0))

    res = interleave(
        {k: epoch(r) for k, r in readers.items()}, s.rounds, device, warmup=1, log=lambda m: say("  stream " + m)
    )
    out = {}
    for k, r in readers.items():
        sec = res.seconds[k]
        out[k] = {
            "taps": taps[k],
            "samples": r.num_samples,
            "reader_nbytes": r.nbytes(),
            "seconds": sec,
            "median_s": statistics.median(sec),
            "samples_per_s": r.num_samples / statistics.median(sec),
            "vs_base": paired_ratio(res.seconds[BASE], sec),
        }
    return out


def time_steps(s: Settings, model: str, paths: dict[str, Path]) -> dict[str, Any]:
    """LAST's training step from each variant's store (ram reader on CPU, gpu-resident on CUDA) and LoRA's on the
    same images, A B A B in one process; each LAST row's speed-up over LoRA is the median of per-round ratios."""
    from .peers import FeatcachePeer, LoraPeer, Peer, PeerContext
    from .speed import time_peers

    reader = "gpu" if s.device.startswith("cuda") else "ram"
    ctx = PeerContext(
        model=model,
        batch_size=s.batch_size,
        device=s.device,
        data=data_specs()[0],
        images=s.images,
        reader=reader,
        method_config={"last": dict(LAST_CONFIG)},
    )
    peers: dict[str, Peer] = {k: FeatcachePeer(replace(ctx, store=str(p)), "last") for k, p in paths.items()}
    peers["lora"] = LoraPeer(ctx)
    say(f"[{model}] LAST step per variant and LoRA, A B A B x {s.rounds}")
    res = time_peers(peers, s.batch_size, torch.device(s.device), s.rounds, s.min_call_s)
    del peers
    lora = res.pop("lora")
    for row in res.values():
        row["vs_lora"] = paired_ratio(lora["step_seconds"], row["step_seconds"])
        row["flop_ratio_vs_lora"] = (
            lora["train_flops_per_sample"] / row["train_flops_per_sample"]
            if row.get("train_flops_per_sample")
            else None
        )
    return {"variants": res, "lora": lora, "reader": reader}


def speed_stage(s: Settings, model: str, workdir: Path, done: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Extraction, sizes, stream reader and LAST step of every variant on one backbone; ``done`` after each part."""
    preset = MODELS[model]
    out: dict[str, Any] = {
        "model": model,
        "label": preset.label,
        "data": data_specs()[2],
        "complete": False,
        "sizes": s.sizes("speed"),
    }
    say(f"[{model}] extraction of {s.images} images per variant, {s.rounds} paired rounds")
    out["extraction"] = time_extractions(s, model, workdir)
    paths = {k: store_path(workdir, model, k) for k in s.variants}
    out["size"] = {k: store_size(paths[k], VARIANTS[k]) for k in s.variants}
    add_size_ratios(out["size"])
    done(out)
    say(f"[{model}] stream reader, one epoch per variant, {s.rounds} rounds")
    out["stream"] = time_stream(s, paths)
    done(out)
    out["steps"] = time_steps(s, model, paths)
    out["complete"] = True
    done(out)
    return out


# ---------------------------------------------------------------------------------------------
# Stage: memory


def memory_stage(s: Settings, model: str, workdir: Path, done: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Peak RSS above the post-import baseline: LAST with the default reader on each variant's store, and LoRA;
    one subprocess each. Ratio to LoRA's (on CUDA: of ``torch.cuda.max_memory_allocated``)."""
    from . import memory
    from .peers import PeerContext

    paths = ensure_stores(s, model, workdir)
    ctx = PeerContext(
        model=model,
        batch_size=s.batch_size,
        device=s.device,
        data=data_specs()[0],
        images=s.images,
        reader="auto",
        preload=False,
        method_config={"last": dict(LAST_CONFIG)},
    )
    out: dict[str, Any] = {
        "model": model,
        "label": MODELS[model].label,
        "reader": "auto",
        "complete": False,
        "sizes": s.sizes("memory"),
        "rows": {},
    }
    say(f"[{model}] memory: LAST (default reader) per variant and LoRA, one subprocess each, {s.memory_jobs} at once")
    jobs = {"lora": ("lora", ctx), **{k: ("featcache-last", replace(ctx, store=str(p))) for k, p in paths.items()}}

    def run(key: str) -> dict[str, Any]:
        peer, c = jobs[key]
        return memory.measure(peer, c.to_dict(), s.memory_steps, s.threads)

    with ThreadPoolExecutor(max(1, s.memory_jobs)) as pool:  # threads only wait for their subprocess
        for key, row in zip(jobs, pool.map(run, jobs)):  # results in order; saved by this thread only
            out["rows"][key] = row
            done(out)
    lora = memory_mb(out["rows"]["lora"])
    for key in paths:
        mb = memory_mb(out["rows"][key])
        out["rows"][key]["vs_lora"] = mb / lora if mb is not None and lora else None
    out["complete"] = True
    done(out)
    return out


def memory_mb(row: dict[str, Any] | None) -> float | None:
    """The memory a peer's training needs: CUDA max allocated on a GPU, else peak RSS above the post-import RSS."""
    if not row or "error" in row:
        return None
    return row.get("cuda_max_allocated_mb", row.get("peak_above_baseline_mb"))


# ---------------------------------------------------------------------------------------------
# Stage: accuracy


def seed_list(s: Settings | dict[str, Any]) -> list[int]:
    """The accuracy seeds of a run (its settings, or their recorded dict)."""
    first, n = (s.first_seed, s.seeds) if isinstance(s, Settings) else (s.get("first_seed", 0), s["seeds"])
    return list(range(first, first + n))


def train_last(s: Settings, path: Path) -> dict[str, Any]:
    """LAST with ``seeds`` initialisations as one sweep, epoch chosen per seed on held-out validation; per seed the
    test accuracy of its chosen epoch."""
    from featcache.training import train

    from .peers import SIDE_LR

    out = Path(tempfile.mkdtemp(prefix="featcache-compact-acc-"))
    try:
        t0 = time.perf_counter()
        summary = train(
            str(path),
            "last",
            out,
            {"epochs": s.epochs, "batch_size": s.acc_batch, "lr": SIDE_LR["last"], **LAST_CONFIG},
            {"seed": seed_list(s)},
            eval_split="test",
            reader="auto",
            device=s.device,
            progress=False,
            overwrite=True,
        )
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    members = [
        {
            "name": m["name"],
            "seed": m["config"].get("seed"),
            "test_acc": m["best"]["test_acc"],
            "val_acc": m["best"]["val_acc"],
            "epoch": m["best"]["epoch"],
            "last_epoch_test_acc": m["metrics"].get("test_acc"),
        }
        for m in summary["members"]
    ]
    return {
        "members": members,
        "mean_test_acc": statistics.mean(m["test_acc"] for m in members),
        "mean_val_acc": statistics.mean(m["val_acc"] for m in members),
        "train_s": seconds,
        "samples_per_s": summary["samples_per_second"],
        "selected_on": summary["best"].get("selected_on"),
        "heldout": summary["best"].get("heldout_size"),
        "params": summary["members"][0].get("params"),
    }


def accuracy_stage(
    s: Settings, workdir: Path, previous: dict[str, Any] | None, done: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Per variant: extract train and test subsets, train LAST (``seeds`` seeds), record test/val per seed and the
    store's bytes per sample; variants ``previous`` (an unfinished earlier entry of the same sizes) holds are kept."""
    spec_train, spec_test, note = data_specs()
    model, device = s.acc_model, torch.device(s.device)
    out: dict[str, Any] = {
        "model": model,
        "label": MODELS[model].label,
        "data": note,
        "train": s.acc_train,
        "test": s.acc_test,
        "epochs": s.epochs,
        "batch_size": s.acc_batch,
        "seeds": seed_list(s),
        "sizes": s.sizes("accuracy"),
        "complete": False,
        "protocol": "epoch chosen per seed on 10% of the training split held out (stratified, "
        "seeded); test accuracy of that epoch; seeds = side-network initialisations "
        "(one sweep, seed 0's batch order)",
        "variants": dict((previous or {}).get("variants", {})),
    }
    for key in s.variants:
        if key in out["variants"]:
            say(f"  acc {key}: kept from the earlier run")
            continue
        v, path = VARIANTS[key], workdir / f"acc-{model}-{key}.zarr"
        say(f"[accuracy] {key}: extracting {s.acc_train} + {s.acc_test} images")
        info = build_store(
            v.preset(MODELS[model]),
            {
                "train": (spec_train, s.acc_train, v.extract_options()),
                "test": (spec_test, s.acc_test, v.extract_options()),
            },
            path,
            device,
        )
        row: dict[str, Any] = {
            "extraction": {
                "seconds": info.seconds,
                "images_per_s": {k: r["images_per_second"] for k, r in info.reports.items()},
                "steady_images_per_s": {k: r["steady_images_per_second"] for k, r in info.reports.items()},
            },
            "size": store_size(path, v),
        }
        row.update(train_last(s, path))
        shutil.rmtree(path, ignore_errors=True)
        out["variants"][key] = row
        say(
            f"  acc {key}: test "
            + ", ".join(f"{m['test_acc']:.4f}" for m in row["members"])
            + f" (mean {row['mean_test_acc']:.4f}) in {row['train_s']:.0f}s"
        )
        add_accuracy_deltas(out)
        done(out)
    out["complete"] = True
    done(out)
    return out


def add_accuracy_deltas(acc: dict[str, Any]) -> None:
    """Each variant's mean test (and validation) accuracy minus fp16-all's, in points; and its bytes ratio."""
    add_size_ratios({k: r["size"] for k, r in acc["variants"].items()})
    base = acc["variants"].get(BASE)
    for row in acc["variants"].values():
        if base is not None and "mean_test_acc" in row:
            row["test_delta_points"] = 100 * (row["mean_test_acc"] - base["mean_test_acc"])
            row["val_delta_points"] = 100 * (row["mean_val_acc"] - base["mean_val_acc"])


# ---------------------------------------------------------------------------------------------
# Markdown


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB"


def _x(r: float | None, digits: int = 1) -> str:
    return "-" if r is None else f"{r:.{digits}f}x"


def _n(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _pts(d: float | None) -> str:
    return "-" if d is None else f"{d:+.2f}"


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    """d[k1][k2]... or None where any level is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def backbone_table(r: dict[str, Any], model: str) -> list[str]:
    """One backbone: a row per variant (and LoRA's), the issue's columns."""
    sp, mem = r.get("speed", {}).get(model, {}), r.get("memory", {}).get(model, {})
    acc = r.get("accuracy") if _get(r, "accuracy", "model") == model else None
    variants = r["settings"]["variants"]
    lines = [
        "| variant | stored bytes/sample (fewer than fp16-all) | vs float32 | extraction images/s, steady "
        "(x fp16-all) | stream reader samples/s (x fp16-all) | LAST step samples/s (x LoRA) | training memory "
        "above post-import MB (x LoRA) | test accuracy, mean of seeds (points vs fp16-all) | 8-bit rel. RMS "
        "error (worst tap) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in variants:
        size = _get(sp, "size", key) or _get(acc, "variants", key, "size")
        ex, st = _get(sp, "extraction", key), _get(sp, "stream", key)
        step, mrow = _get(sp, "steps", "variants", key), _get(mem, "rows", key)
        arow = _get(acc, "variants", key)
        bytes_txt = (
            "-" if not size else f"{_bytes(size['stored_bytes_per_sample'])} ({_x(size.get('stored_ratio_vs_base'))})"
        )
        f32 = "-" if not size else _x(size.get("float32_ratio"))
        ex_txt = (
            "-"
            if not ex
            else (f"{_n(ex['median_images_per_s'])}, {_n(ex['median_steady_images_per_s'])} ({_x(ex['vs_base'], 2)})")
        )
        st_txt = "-" if not st else f"{_n(st['samples_per_s'])} ({_x(st['vs_base'], 2)})"
        step_txt = "-" if not step else f"{_n(step['samples_per_s'])} ({_x(step['vs_lora'])})"
        mb = memory_mb(mrow)
        mem_txt = "-" if mb is None else f"{_n(mb)} ({_x(mrow.get('vs_lora'), 2)})"
        acc_txt = (
            "-"
            if not arow or "mean_test_acc" not in arow
            else f"{100 * arow['mean_test_acc']:.2f}% ({_pts(arow.get('test_delta_points'))})"
        )
        q = (size or {}).get("max_quantization_rel_rms")
        lines.append(
            f"| {key} | {bytes_txt} | {f32} | {ex_txt} | {st_txt} | {step_txt} | {mem_txt} | {acc_txt} | "
            f"{'-' if q is None else f'{100 * q:.2f}%'} |"
        )
    lora_step, lora_mem = _get(sp, "steps", "lora"), memory_mb(_get(mem, "rows", "lora"))
    if lora_step or lora_mem is not None:
        lines.append(
            f"| LoRA (r=8, images) | - | - | - | - | {_n(_get(lora_step, 'samples_per_s'))} | {_n(lora_mem)} | - | - |"
        )
    return lines


def accuracy_table(acc: dict[str, Any]) -> list[str]:
    """Per variant and seed: test accuracy of the epoch chosen on validation, the validation accuracy, the epoch."""
    seeds = acc["seeds"]
    head = " | ".join(f"seed {k}: test / val (epoch)" for k in seeds)
    lines = [
        f"{acc['label']} on {acc['data']}: {acc['train']:,} train / {acc['test']:,} test images, LAST (gap "
        f"{LAST_GAP}) {acc['epochs']} epochs, batch {acc['batch_size']}; {acc['protocol']}."
        + ("" if acc.get("complete") else " **Incomplete**: the rows below are what it measured so far."),
        "",
        f"| variant | {head} | mean test | vs fp16-all (points) | mean val | stored bytes/sample | extraction "
        "(train) images/s | training |",
        "|---|" + "---|" * (len(seeds) + 6),
    ]
    for key, row in acc["variants"].items():
        if "members" not in row:
            continue
        per = " | ".join(
            f"{100 * m['test_acc']:.2f}% / {100 * m['val_acc']:.2f}% ({m['epoch']})" for m in row["members"]
        )
        lines.append(
            f"| {key} | {per} | {100 * row['mean_test_acc']:.2f}% | {_pts(row.get('test_delta_points'))} | "
            f"{100 * row['mean_val_acc']:.2f}% | {_bytes(row['size']['stored_bytes_per_sample'])} "
            f"({_x(row['size'].get('stored_ratio_vs_base'))}) | "
            f"{_n(row['extraction']['images_per_s'].get('train'))} | {row['train_s']:.0f} s |"
        )
    return lines


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**not met**")


def target_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for each of the issue's targets; '-' where the run did not measure it."""
    s, t = r["settings"], r["targets"]
    vit, cnn = s["vit"], s["cnn"]
    label = {m: MODELS[m].label for m in (vit, cnn)}
    acc = r.get("accuracy") or {}
    rows: list[tuple[str, str, str]] = []
    for model, key in ((vit, "bytes_vit"), (cnn, "bytes_cnn")):
        size = _get(r, "speed", model, "size") or (
            {k: v["size"] for k, v in acc.get("variants", {}).items()} if acc.get("model") == model else None
        )
        ratio = _get(size, "compact", "stored_ratio_vs_base")
        txt = (
            "-"
            if ratio is None
            else (
                f"{ratio:.1f}x ({_bytes(size['compact']['stored_bytes_per_sample'])} vs "
                f"{_bytes(size[BASE]['stored_bytes_per_sample'])} stored per sample)"
            )
        )
        rows.append(
            (
                f"compact: >= {t[key]:g}x fewer stored bytes per sample than fp16-all ({label[model]})",
                txt,
                verdict(None if ratio is None else ratio >= t[key]),
            )
        )
    for key, tkey in (("compact", "acc_compact_points"), ("int8", "acc_int8_points")):
        row = _get(acc, "variants", key)
        d = _get(row, "test_delta_points")
        txt = (
            "-"
            if d is None
            else (
                f"{d:+.2f} points ({100 * row['mean_test_acc']:.2f}% vs "
                f"{100 * acc['variants'][BASE]['mean_test_acc']:.2f}%, mean of seeds "
                f"{', '.join(map(str, acc['seeds']))})"
            )
        )
        rows.append(
            (
                f"{key}: test accuracy at most {t[tkey]:g} points below fp16-all ({acc.get('label', label[cnn])}, "
                "honest protocol)",
                txt,
                verdict(None if d is None else d >= -t[tkey]),
            )
        )
    mem = _get(r, "memory", vit, "rows")
    ratio = _get(mem, "compact", "vs_lora")
    txt = (
        "-"
        if ratio is None
        else (
            f"{ratio:.2f}x ({_n(memory_mb(mem['compact']))} / {_n(memory_mb(mem['lora']))} MB, "
            f"reader {mem['compact'].get('reader')}; fp16-all "
            f"{_x(_get(mem, BASE, 'vs_lora'), 2)})"
        )
    )
    rows.append(
        (
            f"compact: training memory with the default reader <= {t['memory_vs_lora']:.2f}x LoRA's "
            f"({label[vit]}, {s['images']} images, batch {s['batch_size']}, above post-import RSS)",
            txt,
            verdict(None if ratio is None else ratio <= t["memory_vs_lora"]),
        )
    )
    for model in (m for m in s["models"] if _get(r, "speed", m, "stream")):
        ratio = _get(r, "speed", model, "stream", "compact", "vs_base")
        rows.append(
            (
                f"stream reader on the compact store >= {t['stream_vs_base']:g}x fp16-all's samples/s "
                f"({label.get(model, MODELS[model].label)})",
                _x(ratio, 2),
                verdict(None if ratio is None else ratio >= t["stream_vs_base"]),
            )
        )
    steps = _get(r, "speed", vit, "steps", "variants")
    ratio = _get(steps, "pool2", "vs_lora")
    cost = _get(acc, "variants", "pool2", "test_delta_points")
    txt = (
        "-"
        if ratio is None
        else (
            f"{ratio:.1f}x (FLOP ratio {_x(_get(steps, 'pool2', 'flop_ratio_vs_lora'))}; compact "
            f"{_x(_get(steps, 'compact', 'vs_lora'))}, fp16-all {_x(_get(steps, BASE, 'vs_lora'))}); accuracy cost of "
            f"pooling: {_pts(cost)} points (pool2 vs fp16-all, {acc.get('label', '-')})"
        )
    )
    rows.append(
        (
            f"LAST step from pooled taps (pool2) >= {t['step_pool_vs_lora']:g}x LoRA's samples/s ({label[vit]}, "
            f"batch {s['batch_size']}, {r['device']})",
            txt,
            verdict(None if ratio is None else ratio >= t["step_pool_vs_lora"]),
        )
    )
    return rows


def render_markdown(r: dict[str, Any]) -> str:
    """The report: one table per backbone, the accuracy table, the targets, how it was measured."""
    s = r["settings"]
    out = [
        "# Compact cache (issue 21): bytes, speed, memory and accuracy per cache variant",
        "",
        f"Device: **{r['device']}**; started {r['started']}, {r.get('wall_s', 0) / 60:.1f} min; load average at "
        f"start {r['machine']['load_average']}, at end {_get(r, 'machine_after', 'load_average')}; torch "
        f"{r['machine']['torch']}."
        + (
            ""
            if r.get("complete")
            else " **Incomplete**: the run stopped before its last stage; what it measured is below."
        ),
        "",
        f"Speed: {s['images']} images per backbone, batch {s['batch_size']}, medians over {s['rounds']} paired "
        "rounds (order alternating); ratios are medians of per-round ratios. Bytes: `describe_store` of the train "
        "split, stored = on disk (lz4, checksums), ratio = fp16-all's over the variant's. Stream: one epoch over "
        f"LAST's taps (gap {LAST_GAP}), {s['buffer_mb']:g} MB window. LAST step: ram reader, gap {LAST_GAP}, "
        f"paired with LoRA (r=8) on the same images. Memory: one subprocess each, {s['memory_steps']} steps, "
        "LAST with the default reader (auto). Seeds: " + ", ".join(map(str, seed_list(s))) + ".",
        "",
        "Variants: " + "; ".join(f"`{k}` {VARIANTS[k].label}" for k in s["variants"]) + ".",
        "",
    ]
    shown = list(
        dict.fromkeys(
            [*r.get("speed", {}), *r.get("memory", {}), *([r["accuracy"]["model"]] if r.get("accuracy") else [])]
        )
    )
    for model in shown:
        how = "; ".join(
            f"{stage} stage: " + ", ".join(f"{k} {v}" for k, v in entry["sizes"].items())
            for stage in ("speed", "memory")
            for entry in [_get(r, stage, model)]
            if entry
        )
        out += [f"## {MODELS[model].label}", "", *backbone_table(r, model), ""] + (
            [f"Measured with: {how}.", ""] if how else []
        )
    if r.get("accuracy"):
        out += ["## Accuracy (honest protocol)", "", *accuracy_table(r["accuracy"]), ""]
    out += [
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *(f"| {a} | {b} | {c} |" for a, b, c in target_rows(r)),
        "",
        "## Commands",
        "",
        "```",
        r["command"],
        "```",
        "",
        f"Machine: {json.dumps(r['machine'])}",
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Entry point


SIZE_OPTIONS = {f.name: f for f in fields(Settings) if "help" in f.metadata}  # the Settings fields that are options


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    """Options -> Settings: the defaults (or ``--smoke``'s), and every option given on the command line over them."""
    d = Settings(models=["vit_s", "effnet"], variants=list(DEFAULT_VARIANTS))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated: speed, memory, accuracy")
    ap.add_argument(
        "--models",
        default=None,
        help=f"backbones of the speed and memory stages (default {','.join(d.models)}; with --smoke tiny_vit,tiny_cnn)",
    )
    ap.add_argument("--variants", default=",".join(d.variants), help=f"of {', '.join(VARIANTS)} ({BASE} is required)")
    for name, f in SIZE_OPTIONS.items():
        ap.add_argument(
            "--" + name.replace("_", "-"),
            type=type(f.default),
            default=None,
            help=f"{f.metadata['help']} (default {getattr(d, name)})",
        )
    ap.add_argument(
        "--out", type=Path, default=RESULTS / "compact-cpu", help="result path without suffix: <out>.json and <out>.md"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="where stores go (default: a temporary folder)")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep what <out>.json of an earlier run holds: entries of "
        "stages this run does not do, and finished entries of the same sizes of those it does",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny models, 40 images, 1 round, 1 epoch (the test); options given on the command line still apply",
    )
    a = ap.parse_args(argv)
    models = a.models.split(",") if a.models else None
    s = smoke_settings(d, models) if a.smoke else replace(d, models=models or d.models)
    s = replace(
        s, variants=a.variants.split(","), **{k: getattr(a, k) for k in SIZE_OPTIONS if getattr(a, k) is not None}
    )
    if s.device != "cpu":
        s = replace(s, threads=None, min_call_s=min(s.min_call_s, 0.5))
    unknown = [v for v in s.variants if v not in VARIANTS] + [m for m in s.models if m not in MODELS]
    if unknown or BASE not in s.variants:
        ap.error(f"unknown variants or models {unknown}; variants must include {BASE}")
    return a, s


def earlier(path: Path, resume: bool) -> dict[str, Any] | None:
    """The earlier result at ``path`` when resuming (its entries are kept only where their sizes match)."""
    if not resume or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def kept(old: dict[str, Any] | None, s: Settings, stage: str, model: str | None = None) -> dict[str, Any] | None:
    """An earlier entry of ``stage`` (and backbone) measured with the same sizes, or None."""
    entry = _get(old, stage, model) if model else _get(old, stage)
    if (
        not entry
        or entry.get("sizes") != s.sizes(stage)
        or (old or {}).get("settings", {}).get("variants") != s.variants
    ):
        return None
    return entry


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, s = parse_args(argv)
    stages = [x for x in args.stages.split(",") if x]
    if set(stages) - set(STAGES):
        raise SystemExit(f"--stages: unknown {sorted(set(stages) - set(STAGES))}; use {', '.join(STAGES)}")
    os.environ.setdefault("FEATCACHE_PROGRESS", "0")
    device = setup_torch(s.device, s.threads)
    out = args.out.with_suffix("") if args.out.suffix in (".json", ".md") else args.out
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    old = earlier(json_path, args.resume)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="featcache-compact-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r: dict[str, Any] = {
        "benchmark": "compact",
        "issue": 21,
        "command": "python -m benchmarks.bench_compact " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": describe_device(device),
        "machine": machine(device),
        "settings": asdict(s),
        "stages": stages,
        "targets": dict(TARGETS),
        "variants": {k: asdict(VARIANTS[k]) for k in s.variants},
        "speed": {},
        "memory": {},
        "accuracy": None,
        "complete": False,
    }
    # --resume: the earlier run's entries of stages this run does not do, and of those it does where they were
    # measured with the same sizes (finished ones are skipped below, unfinished ones redone or continued)
    for stage in ("speed", "memory"):
        for model, entry in (old or {}).get(stage, {}).items():
            if stage not in stages or kept(old, s, stage, model) is not None:
                r[stage][model] = entry
    r["accuracy"] = kept(old, s, "accuracy") if "accuracy" in stages else (old or {}).get("accuracy")

    def save(final: bool = False) -> None:
        r["machine_after"], r["wall_s"], r["complete"] = machine(device), time.perf_counter() - t0, final
        write_json(json_path, r)
        md_path.write_text(render_markdown(r))

    try:
        for model in s.models if "speed" in stages else []:
            if not _get(r, "speed", model, "complete"):
                speed_stage(s, model, workdir, lambda e, m=model: (r["speed"].__setitem__(m, e), save()))
        for model in (s.memory_models or s.models) if "memory" in stages else []:
            if not _get(r, "memory", model, "complete"):
                memory_stage(s, model, workdir, lambda e, m=model: (r["memory"].__setitem__(m, e), save()))
        if "accuracy" in stages and not _get(r, "accuracy", "complete"):
            accuracy_stage(s, workdir, r["accuracy"], lambda e: (r.__setitem__("accuracy", e), save()))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    save(final=True)
    text = render_markdown(r)
    print(text)
    say(f"done in {r['wall_s'] / 60:.1f} min: {json_path}, {md_path}")
    return r


if __name__ == "__main__":
    main()
