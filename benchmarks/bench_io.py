"""The cache's I/O against the machine's own limits: a stand-in for a fast device on this CPU.

A GPU makes or eats activations faster than anything on the host, so this benchmark takes the device out: a
producer hands the real writer path ready batches at memory speed, and a consumer that does nothing drains the
real readers. Per store kind (ViT-S/16- and ViT-B/16-shaped taps, all taps in float16 or compact: int8 codes
with row scales, 2x2-pooled tokens, every second block; EfficientNet-Lite0's compact taps), with stores of at
least ``--gb`` GB so that fixed costs do not hide rates, in paired rounds (A B A B, medians):

- ingest: ``TapEncoder`` -> ``ShardWriter`` (shards, checksums, fsync, completion records), fed either batches
  already encoded (what the host does when the device quantizes: the target's case) or float32 taps that the
  encoder thread converts on the CPU (a CPU extraction); next to writing the same bytes to plain files;
- delivery: the ``stream`` and ``ram`` readers (batches as stored, as they go to a device, and decoded to
  float32 on the CPU), samples/s, stored GB/s and time to first batch; next to a numpy copy of the same
  batches' bytes, the ram reader's gathers alone (``np.take`` of the same rows in a loop: random rows cost more
  than a sequential copy), the codec pipeline alone on the same chunks held in memory, zarr reading the same shards,
  plain reads of the shard files from the page cache and cold (``posix_fadvise(DONTNEED)`` on every file
  first, which drops its clean cached pages), and the stream reader cold;
- remote: the stream reader on the same store behind ``slowfile://`` (every request waits ``--latency-ms``);
- stall (``--stages stall``): the share of a LAST training epoch spent waiting for data, per reader.

``python -m benchmarks.bench_io [--stores ...] [--gb 2] [--rounds 3] [--stages ingest,delivery,remote]``;
``--smoke`` runs everything tiny (tests). Results: ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from featcache.extraction import default_writer_threads
from featcache.manifest import Manifest, SplitMeta, TapInfo
from featcache.store.codecs import _numcodec_of, auto_compressors, compressor_codecs, storage_view
from featcache.store.feature_store import FeatureStore, SplitHandle, choose_chunking
from featcache.store.reader import open_reader
from featcache.store.shard_io import _decode_chunk, _parse_index
from featcache.store.writer import ShardWriter, open_split_for_writing
from featcache.tap_encoder import TapEncoder, encode_taps

from . import latency_fs
from .common import RESULTS, machine, paired_ratio, say, setup_torch, write_json


def _vit(blocks: list[int], tokens: int, grid: int, channels: int) -> list[TapInfo]:
    return [
        TapInfo("embed" if b == 0 else f"block{b}", b, b, tokens, 1, channels, (grid, grid), "none") for b in blocks
    ]


@dataclass(frozen=True)
class StoreKind:
    """One cache shape: what a real extraction of that backbone with those options stores."""

    label: str
    dtype: str
    taps: tuple[TapInfo, ...]
    sparse: tuple[str, ...] = ()  # taps after a ReLU: about 70% zeros (lz4 shrinks them, so "auto" compresses them)


EFFNET_COMPACT = tuple(
    TapInfo(n, i, i, 16, 0, c, (4, 4), "avg")
    for i, (n, c) in enumerate([("stem", 32), ("stage2", 24), ("stage4", 80), ("stage6", 192), ("head", 1280)])
)
KINDS = {
    "vit_s-fp16": StoreKind("ViT-S/16, float16, all 13 taps", "float16", tuple(_vit(list(range(13)), 197, 14, 384))),
    "vit_s-compact": StoreKind(
        "ViT-S/16, compact (int8, pool 2, every:2)", "int8", tuple(_vit(list(range(0, 13, 2)), 50, 7, 384))
    ),
    "vit_b-fp16": StoreKind("ViT-B/16, float16, all 13 taps", "float16", tuple(_vit(list(range(13)), 197, 14, 768))),
    "vit_b-compact": StoreKind(
        "ViT-B/16, compact (int8, pool 2, every:2)", "int8", tuple(_vit(list(range(0, 13, 2)), 50, 7, 768))
    ),
    "effnet-compact": StoreKind(
        "EfficientNet-Lite0, compact (int8, pool 2, every:2)", "int8", EFFNET_COMPACT, sparse=("stem", "head")
    ),
}
TARGETS = {
    "stream_gb_s": 1.0,
    "stream_vs_decode": 0.5,
    "effnet_stream_samples_s": 25_000,
    "ram_vs_copy": 0.7,
    "ingest_gb_s": 0.5,
    "remote_vs_local": 0.5,
    "first_batch_s": 1.0,
}
FORWARD_IMAGES_S = 10_000  # a ViT-S/16 forward on one H100 (the estimate the ingest target is read against)
DECODE_LOOP_BYTES = 512 << 20  # the decode loop's input held in memory (its rate, not its total, is what counts)


def activations(kind: StoreKind, n: int, seed: int) -> dict[str, torch.Tensor]:
    """(n, T, C) float32 taps: dense Gaussian (ViT-like), or for the taps after a ReLU 75% of the groups of 16
    channels zero (runs of zeros, as lz4 finds them in real post-ReLU maps) and the rest rectified."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in kind.taps:
        x = torch.randn(n, t.tokens, t.channels, generator=g) * (1 + t.block)
        if t.name in kind.sparse:
            groups = torch.rand(n, 1, -(-t.channels // 16), generator=g) > 0.75
            x = torch.relu(x) * groups.repeat_interleave(16, dim=-1)[..., : t.channels]
        out[t.name] = x
    return out


def plan(kind: StoreKind, gb: float, batch: int) -> tuple[SplitMeta, int]:
    """The split of at least ``gb`` stored GB (after compression), whole shards; and the batch (a divisor of the
    shard)."""
    sample = activations(kind, 64, seed=99)
    arrays, _ = encode_taps(sample, kind.taps, kind.dtype, 1, 0)
    rows = {k: storage_view(v.contiguous()) for k, v in arrays.items()}
    choice = auto_compressors(rows)
    per = stored_bytes_per_image(rows, choice)
    chunk, shard = choose_chunking(list(kind.taps), kind.dtype, 1, max(1, int(gb * 1e9 / per)))
    n = max(shard, math.ceil(gb * 1e9 / per / shard) * shard)
    b = min(batch, shard)
    meta = SplitMeta(
        num_samples=n,
        chunk_images=chunk,
        shard_images=shard,
        classes=[str(c) for c in range(10)],
        data="synthetic",
        batch_size=b,
        compressor="auto",
        tap_compressors=choice,
    )
    return meta, b


def stored_bytes_per_image(rows: dict[str, np.ndarray], compressors: dict[str, str]) -> float:
    """Stored bytes per image of a sample of encoded rows, each array compressed as ``compressors`` says."""
    total = 0
    for name, a in rows.items():
        codec = compressor_codecs(compressors[name])[0] if compressors[name] != "none" else None
        total += a.nbytes if codec is None else len(_numcodec_of(codec).encode(np.ascontiguousarray(a)))
    return total / len(next(iter(rows.values())))


def write_store(
    path: Path, kind: StoreKind, meta: SplitMeta, batches: list[Any], encoded: bool, durable: bool = True
) -> dict[str, Any]:
    """The real writer path over ``meta.num_samples`` images from a producer that cycles through ``batches``."""
    if path.exists():
        shutil.rmtree(path)
    manifest = Manifest(backbone={"spec": {"model": "synthetic"}}, taps=list(kind.taps), dtype=kind.dtype)
    split, _ = open_split_for_writing(
        str(path), manifest, "train", SplitMeta(**meta.to_attrs()), ids=[str(i) for i in range(meta.num_samples)]
    )
    labels, ids = np.arange(meta.num_samples) % 10, [str(i) for i in range(meta.num_samples)]
    b = meta.batch_size
    cpu0, t0 = time.process_time(), time.perf_counter()
    with ShardWriter(split, max_pending=2, durable=durable, threads=default_writer_threads()) as writer:
        encoder = TapEncoder(meta, kind.taps, kind.dtype, writer, labels, ids)
        for i, first in enumerate(range(0, meta.num_samples, b)):
            item = batches[i % len(batches)]
            if encoded:
                encoder.put_encoded(first, *item)
            else:
                encoder.put(first, item)
        encoder.close()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stored = sum(f.stat().st_size for f in (path / "train").rglob("*") if f.is_file())
    return {"seconds": seconds, "cpu_seconds": cpu, "stored_bytes": stored, "images": meta.num_samples}


def plain_write(path: Path, nbytes: int, durable: bool = True, piece: int = 64 << 20) -> float:
    """Seconds to write ``nbytes`` to plain files in ``piece``-sized writes, each file fsync'ed when ``durable``."""
    path.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(0, 255, piece, dtype=np.uint8)
    t0 = time.perf_counter()
    for k in range(math.ceil(nbytes / piece)):
        fd = os.open(path / f"{k}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data[: min(piece, nbytes - k * piece)])
        if durable:
            os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - t0
    shutil.rmtree(path)
    return seconds


def ingest_stage(kinds: list[str], s: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Writer ingest per store kind, encoded and CPU-encoding producers and plain file writes, paired rounds."""
    out: dict[str, Any] = {}
    for key in kinds:
        kind = KINDS[key]
        meta, b = plan(kind, s.gb, s.batch)
        raw = [activations(kind, b, seed=i) for i in range(2)]
        encoded = [encode_taps(x, kind.taps, kind.dtype, 1, 0) for x in raw]
        # encoded: batches as a device hands them over; cpu_encode: float32 taps the encoder thread converts;
        # page_cache: encoded, without the fsync before each completion record (the writer's own rate)
        rows: dict[str, list[dict[str, Any]]] = {"encoded": [], "cpu_encode": [], "page_cache": []}
        plain: dict[str, list[float]] = {"plain": [], "plain_page_cache": []}
        nbytes = int(s.gb * 1e9)
        for r in range(s.rounds):
            cases = [*rows, *plain]
            for case in cases if r % 2 == 0 else cases[::-1]:
                if case in plain:
                    plain[case].append(plain_write(work / "plain", nbytes, durable=case == "plain"))
                    continue
                rows[case].append(
                    write_store(
                        work / f"{key}.zarr",
                        kind,
                        meta,
                        raw if case == "cpu_encode" else encoded,
                        case != "cpu_encode",
                        durable=case != "page_cache",
                    )
                )
                nbytes = rows[case][-1]["stored_bytes"]
            say(
                f"ingest {key} round {r + 1}: "
                + ", ".join(f"{c} {rows[c][-1]['seconds']:.1f}s" for c in rows)
                + ", "
                + ", ".join(f"{c} {v[-1]:.1f}s" for c, v in plain.items())
            )
        stored = rows["encoded"][-1]["stored_bytes"]
        res: dict[str, Any] = {
            "label": kind.label,
            "dtype": kind.dtype,
            "images": meta.num_samples,
            "shard_images": meta.shard_images,
            "batch": b,
            "stored_bytes": stored,
            "stored_bytes_per_image": stored / meta.num_samples,
            "compressors": meta.tap_compressors,
        }
        for case, runs in rows.items():
            sec = statistics.median(x["seconds"] for x in runs)
            cpu = statistics.median(x["cpu_seconds"] for x in runs)
            res[case] = {
                "seconds": sec,
                "gb_s": stored / 1e9 / sec,
                "images_s": meta.num_samples / sec,
                "cpu_seconds": cpu,
                "gb_per_cpu_second": stored / 1e9 / cpu,
                "rounds_s": [x["seconds"] for x in runs],
            }
        for case, secs in plain.items():
            res[f"{case}_write"] = {
                "seconds": statistics.median(secs),
                "gb_s": stored / 1e9 / statistics.median(secs),
                "rounds_s": secs,
            }
        res["encoded_vs_plain"] = paired_ratio(plain["plain"], [x["seconds"] for x in rows["encoded"]])
        res["page_cache_vs_plain"] = paired_ratio(plain["plain_page_cache"], [x["seconds"] for x in rows["page_cache"]])
        out[key] = res
    return out


# ---------------------------------------------------------------------------------------------
# Delivery


def shard_files(split: SplitHandle, names: list[str]) -> list[Path]:
    root = Path(split.store.url)
    return [root / split.shard_keys(k)[n] for k in range(split.meta.num_shards) for n in names]


def drop_cache(files: list[Path]) -> None:
    """Evict the files' pages from the page cache (clean pages: they were fsync'ed when written)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def read_files(files: list[Path], threads: int) -> None:
    """Each file read whole into a reused buffer (one per thread), ``threads`` files at a time."""
    size = max(f.stat().st_size for f in files)
    local: dict[int, np.ndarray] = {}

    def one(f: Path) -> None:
        import threading

        buf = local.setdefault(threading.get_ident(), np.empty(size, dtype=np.uint8))
        fd = os.open(f, os.O_RDONLY)
        try:
            os.preadv(fd, [buf[: f.stat().st_size]], 0)
        finally:
            os.close(fd)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, files))


def decode_loop(objects: list[tuple[Any, bytes]], threads: int) -> None:
    """The codec pipeline alone: every chunk of every shard object (held in memory) checked and decoded into a
    reused buffer, ``threads`` objects at a time (featcache's decode: the one the readers run)."""
    import threading

    local: dict[int, np.ndarray] = {}

    def one(item: tuple[Any, bytes]) -> None:
        layout, raw = item
        data = np.frombuffer(raw, dtype=np.uint8)
        index = _parse_index(data[-layout.index_bytes :], layout, len(data))
        chunk = layout.chunk_rows * layout.row_bytes
        buf = local.setdefault(threading.get_ident(), np.empty(layout.chunks_per_shard * chunk, dtype=np.uint8))
        for c in range(layout.chunks_per_shard):
            off, n = int(index[c, 0]), int(index[c, 1])
            _decode_chunk(layout, data[off : off + n], buf[c * chunk : (c + 1) * chunk], "chunk")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, objects))


def numpy_copy(split: SplitHandle, names: list[str], batch: int) -> None:
    """The same batches' stored bytes copied into fresh arrays, each held until the next (as a loop holds them)."""
    arrays = {n: split.array(n) for n in names}
    src = {n: np.empty((batch, *a.shape[1:]), dtype=a.dtype) for n, a in arrays.items()}
    for v in src.values():
        v.fill(1)
    prev = None
    for _ in range(0, split.num_samples, batch):
        cur = {n: np.empty_like(v) for n, v in src.items()}
        for n, v in src.items():
            np.copyto(cur[n], v)
        prev = cur
    del prev


def gather_loop(ram: Any, batch: int, epoch: int = 1) -> None:
    """The ram reader's gathers alone: the same epoch's rows of the same held arrays (ascending within a batch,
    as the reader takes them) ``np.take``n into buffers reused across batches; no reader, no threads."""
    held = {n: storage_view(t) for n, t in ram.data.items()}
    order = ram.order(epoch).numpy()
    out = {n: np.empty((batch, *a.shape[1:]), dtype=a.dtype) for n, a in held.items()}
    for s in range(0, len(order), batch):
        rows = np.sort(order[s : s + batch])
        for n, a in held.items():
            np.take(a, rows, axis=0, out=out[n][: len(rows)], mode="clip")


def drain(reader: Any, epoch: int) -> tuple[float, float, int]:
    """(seconds, seconds to the first batch, samples) of one epoch with a consumer that does nothing."""
    t0 = time.perf_counter()
    first, n = None, 0
    for b in reader.epoch(epoch):
        if first is None:
            first = time.perf_counter() - t0
        n += len(b)
    return time.perf_counter() - t0, first or 0.0, n


def delivery_stage(kinds: list[str], s: argparse.Namespace, work: Path, device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in kinds:
        path = work / f"{key}.zarr"
        split = FeatureStore.open(str(path)).split("train")
        names = split.tap_array_names()
        names = [n for n in names if not n.endswith("_qerr")]
        taps = split.store.manifest.tap_names
        files = shard_files(split, names)
        stored = sum(f.stat().st_size for f in files)
        n = split.num_samples
        opts = dict(batch_size=s.batch, seed=0, device=device)
        t0 = time.perf_counter()
        ram = open_reader(split, taps, "ram", decode=False, **opts)  # holds the stored bytes once: both ram rows use it
        ram_load = time.perf_counter() - t0
        stream = open_reader(split, taps, "stream", decode=False, **opts)
        stream32 = open_reader(split, taps, "stream", **opts)
        objects, held = [], 0  # the decode loop's input: shard objects in memory, up to DECODE_LOOP_BYTES
        for k in range(split.meta.num_shards):
            for name in names:
                if held < DECODE_LOOP_BYTES:
                    raw = (Path(split.store.url) / split.shard_keys(k)[name]).read_bytes()
                    objects.append((split.shard_io.layout(name), raw))
                    held += len(raw)
        threads = stream.threads
        epoch = [0]
        firsts: list[float] = []

        def stream_epoch(reader: Any = stream) -> None:
            epoch[0] += 1
            sec, first, got = drain(reader, epoch[0])
            assert got == n
            firsts.append(first)

        def cold(fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> None:
                drop_cache(files)
                fn()

            return run

        def ram_epoch(decode: bool) -> None:
            ram.options.decode = decode
            drain(ram, 1)

        scale = stored / held  # the decode loop's seconds scaled to the whole store (its rate is per byte)
        cases: dict[str, Callable[[], Any]] = {
            "stream": stream_epoch,
            "ram": lambda: ram_epoch(False),
            "numpy_copy": lambda: numpy_copy(split, names, s.batch),
            "gather_loop": lambda: gather_loop(ram, s.batch),
            "decode_loop": lambda: decode_loop(objects, threads),
            "decode_loop_1_thread": lambda: decode_loop(objects, 1),
            "file_reads": lambda: read_files(files, threads),
            "zarr_shards": lambda: [
                split.read(nm, a, b)
                for k in range(split.meta.num_shards)
                for a, b in [split.meta.shard_bounds(k)]
                for nm in names
            ],
            "stream_f32": lambda: drain(stream32, 1),
            "ram_f32": lambda: ram_epoch(True),
        }
        if s.cold:
            cases["file_reads_cold"] = cold(lambda: read_files(files, threads))
            cases["stream_cold"] = cold(lambda: drain(stream, 1))
        times: dict[str, list[float]] = {c: [] for c in cases}
        for c in cases:  # warm-up: every page in the cache, every buffer faulted in once
            cases[c]()
        firsts.clear()
        for r in range(s.rounds):
            for c in list(cases) if r % 2 == 0 else list(cases)[::-1]:
                t0 = time.perf_counter()
                cases[c]()
                times[c].append((time.perf_counter() - t0) * (scale if c.startswith("decode_loop") else 1.0))
            say(
                f"delivery {key} round {r + 1}: "
                + ", ".join(f"{c} {stored / 1e9 / times[c][-1]:.2f}" for c in cases)
                + " GB/s"
            )
        res: dict[str, Any] = {
            "images": n,
            "stored_bytes": stored,
            "batch": s.batch,
            "threads": threads,
            "ram_load_seconds": ram_load,
            "stream_settings": stream.settings(),
            "first_batch_s": statistics.median(firsts),
            "first_batch_rounds_s": firsts,
        }
        for c, v in times.items():
            med = statistics.median(v)
            res[c] = {"seconds": med, "gb_s": stored / 1e9 / med, "samples_s": n / med, "rounds_s": v}
        res["stream_vs_decode_loop"] = paired_ratio(times["decode_loop"], times["stream"])
        res["stream_vs_decode_loop_1_thread"] = paired_ratio(times["decode_loop_1_thread"], times["stream"])
        res["stream_vs_file_reads"] = paired_ratio(times["file_reads"], times["stream"])
        res["ram_vs_numpy_copy"] = paired_ratio(times["numpy_copy"], times["ram"])
        res["ram_vs_gather_loop"] = paired_ratio(times["gather_loop"], times["ram"])
        res["gather_loop_vs_numpy_copy"] = paired_ratio(times["numpy_copy"], times["gather_loop"])
        res["stream_vs_zarr"] = paired_ratio(times["zarr_shards"], times["stream"])
        # the stream reader reads every byte from the page cache, checks (decodes) it and gathers it into a batch:
        # its time is at least the three added up, each on all threads (the gather loop runs on one)
        bound = [
            r + d + g / threads for r, d, g in zip(times["file_reads"], times["decode_loop"], times["gather_loop"])
        ]
        res["pipeline_bound"] = {"seconds": statistics.median(bound), "gb_s": stored / 1e9 / statistics.median(bound)}
        res["stream_vs_pipeline_bound"] = paired_ratio(bound, times["stream"])
        res["pipeline_bound_vs_decode_loop"] = paired_ratio(times["decode_loop"], bound)
        out[key] = res
    return out


def remote_stage(kinds: list[str], s: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The stream reader on ``slowfile://`` (``--latency-ms`` per request) against the same store read locally."""
    latency_fs.register()
    latency_fs.LatencyFileSystem.default_delay = s.latency_ms / 1000
    out: dict[str, Any] = {}
    for key in kinds:
        path = work / f"{key}.zarr"
        local = FeatureStore.open(str(path)).split("train")
        remote = FeatureStore.open(latency_fs.url(str(path))).split("train")
        taps = local.store.manifest.tap_names
        opts = dict(batch_size=s.batch, seed=0, decode=False)
        readers = {
            "local": open_reader(local, taps, "stream", **opts),
            "remote": open_reader(remote, taps, "stream", **opts),
        }
        times: dict[str, list[float]] = {k: [] for k in readers}
        firsts: dict[str, list[float]] = {k: [] for k in readers}
        depth: list[int] = []
        for r in range(s.rounds):
            for name in list(readers) if r % 2 == 0 else list(readers)[::-1]:
                sec, first, _ = drain(readers[name], r)
                times[name].append(sec)
                firsts[name].append(first)
                if name == "remote":
                    depth.append(readers[name].last_read_ahead.max_ahead_seen)
            say(f"remote {key} round {r + 1}: local {times['local'][-1]:.2f}s, remote {times['remote'][-1]:.2f}s")
        n = local.num_samples
        out[key] = {
            "latency_ms": s.latency_ms,
            "io_threads": readers["remote"].io_threads,
            "max_read_ahead_blocks": max(depth),
            "block_images": readers["remote"].block_images,
            **{
                k: {
                    "seconds": statistics.median(v),
                    "samples_s": n / statistics.median(v),
                    "first_batch_s": statistics.median(firsts[k]),
                    "rounds_s": v,
                }
                for k, v in times.items()
            },
            "remote_vs_local": paired_ratio(times["local"], times["remote"]),
        }
    return out


def stall_stage(kinds: list[str], s: argparse.Namespace, work: Path, device: torch.device) -> dict[str, Any]:
    """The share of a LAST training epoch spent waiting for the next batch, fed by ``stream`` and by ``ram``
    (``--stall-images`` samples of the store, batches decoded on the training device)."""
    from featcache.member_bank import MemberBank
    from featcache.methods.base import MethodInput
    from featcache.sweep import expand

    out: dict[str, Any] = {}
    for key in kinds:
        split = FeatureStore.open(str(work / f"{key}.zarr")).split("train")
        taps = split.store.manifest.tap_names
        subset = np.arange(min(s.stall_images, split.num_samples))
        mi = MethodInput(taps=split.store.manifest.taps, num_classes=10, backbone_kind="vit")
        bank = MemberBank(expand("last", {"epochs": 1}), mi, device)
        readers = {
            m: open_reader(split, taps, m, batch_size=64, seed=0, device=device, subset=subset)
            for m in ("ram", "stream")
        }

        def epoch(reader: Any) -> tuple[float, float]:
            waited, batches, t0 = 0.0, reader.epoch(0), time.perf_counter()
            while True:
                t1 = time.perf_counter()
                b = next(batches, None)
                waited += time.perf_counter() - t1
                if b is None:
                    return time.perf_counter() - t0, waited
                bank.train_step(b.taps, b.labels, 0.5, 1)

        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in readers}
        for r in range(s.rounds):
            for m in list(readers) if r % 2 == 0 else list(readers)[::-1]:
                runs[m].append(epoch(readers[m]))
        out[key] = {
            "images": len(subset),
            **{
                m: {"epoch_s": statistics.median(e for e, _ in v), "wait_share": statistics.median(w / e for e, w in v)}
                for m, v in runs.items()
            },
            "stream_vs_ram_epoch": paired_ratio([e for e, _ in runs["stream"]], [e for e, _ in runs["ram"]]),
        }
        say(f"stall {key}: " + ", ".join(f"{m} waits {out[key][m]['wait_share']:.1%}" for m in readers))
    return out


# ---------------------------------------------------------------------------------------------
# Report


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) rows."""
    rows: list[tuple[str, str, bool | None]] = []
    d, ing, rem = r.get("delivery", {}), r.get("ingest", {}), r.get("remote", {})
    for key, v in d.items():
        rows.append(
            (
                f"{key}: stream >= {TARGETS['stream_gb_s']} GB/s stored",
                f"{v['stream']['gb_s']:.2f} GB/s",
                v["stream"]["gb_s"] >= TARGETS["stream_gb_s"],
            )
        )
        rows.append(
            (
                f"{key}: stream >= {TARGETS['stream_vs_decode']}x the decode loop (same threads)",
                f"{v['stream_vs_decode_loop']:.2f}x (reads + decode + gathers bound it at "
                f"{v['pipeline_bound_vs_decode_loop']:.2f}x; the stream is at {v['stream_vs_pipeline_bound']:.2f}x of "
                "that)",
                v["stream_vs_decode_loop"] >= TARGETS["stream_vs_decode"],
            )
        )
        rows.append(
            (
                f"{key}: ram >= {TARGETS['ram_vs_copy']}x a numpy copy of the batches' bytes",
                f"{v['ram_vs_numpy_copy']:.2f}x ({v['ram_vs_gather_loop']:.2f}x its gathers alone, which are "
                f"{v['gather_loop_vs_numpy_copy']:.2f}x the copy)",
                v["ram_vs_numpy_copy"] >= TARGETS["ram_vs_copy"],
            )
        )
        rows.append(
            (
                f"{key}: first batch <= {TARGETS['first_batch_s']} s",
                f"{v['first_batch_s']:.2f} s",
                v["first_batch_s"] <= TARGETS["first_batch_s"],
            )
        )
    if "effnet-compact" in d:
        sps = d["effnet-compact"]["stream"]["samples_s"]
        rows.append(
            (
                f"effnet-compact: stream >= {TARGETS['effnet_stream_samples_s']:,} samples/s",
                f"{sps:,.0f}",
                sps >= TARGETS["effnet_stream_samples_s"],
            )
        )
    for key, v in ing.items():
        if v["dtype"] == "int8":
            rows.append(
                (
                    f"{key}: ingest >= {TARGETS['ingest_gb_s']} GB/s stored (encoded batches, fsync'ed)",
                    f"{v['encoded']['gb_s']:.2f} GB/s (the disk's own plain writes: {v['plain_write']['gb_s']:.2f})",
                    v["encoded"]["gb_s"] >= TARGETS["ingest_gb_s"],
                )
            )
    for key, v in rem.items():
        rows.append(
            (
                f"{key}: stream with {v['latency_ms']} ms per request >= {TARGETS['remote_vs_local']}x local",
                f"{v['remote_vs_local']:.2f}x",
                v["remote_vs_local"] >= TARGETS["remote_vs_local"],
            )
        )
    return rows


def cores_for_extraction(ing: dict[str, Any]) -> dict[str, Any] | None:
    """Host cores that keep a 10,000 images/s ViT-S/16 extraction forward-bound, from the writer's CPU per GB."""
    v = ing.get("vit_s-compact")
    if v is None:
        return None
    need = FORWARD_IMAGES_S * v["stored_bytes_per_image"] / 1e9  # GB/s to write
    return {
        "images_s": FORWARD_IMAGES_S,
        "gb_s": need,
        "gb_per_cpu_second": v["encoded"]["gb_per_cpu_second"],
        "cores": need / v["encoded"]["gb_per_cpu_second"],
    }


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def render(r: dict[str, Any]) -> str:
    lines = [
        f"# Cache I/O against the machine's limits ({r['machine']['device']}, {r['machine']['cpus']} cores)",
        "",
        f"`{r['command']}`; {r['rounds']} paired rounds, medians; stores of >= {r['gb']} GB; "
        f"load average at the start {r['machine']['load_average']}.",
        "",
    ]
    if r.get("ingest"):
        lines += [
            "## Ingest (writer path: encoder thread, shard writer, crc32c, fsync, completion records)",
            "",
            "| store | stored B/image | compressors | encoded batches GB/s (images/s) | plain file writes, fsync | "
            "CPU-encoded | encoded, no fsync | plain writes, no fsync | GB per CPU-second (encoded) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for k, v in r["ingest"].items():
            comp = ", ".join(f"{c} x{n}" for c, n in sorted(_count(v["compressors"].values()).items()))
            lines.append(
                f"| {k} | {v['stored_bytes_per_image']:,.0f} | {comp} | {v['encoded']['gb_s']:.2f} "
                f"({v['encoded']['images_s']:,.0f}) | {v['plain_write']['gb_s']:.2f} | "
                f"{v['cpu_encode']['gb_s']:.2f} | {v['page_cache']['gb_s']:.2f} | "
                f"{v['plain_page_cache_write']['gb_s']:.2f} | {v['encoded']['gb_per_cpu_second']:.2f} |"
            )
        cores = cores_for_extraction(r["ingest"])
        if cores:
            lines += [
                "",
                f"A ViT-S/16 extraction at {cores['images_s']:,} images/s writes {cores['gb_s']:.2f} GB/s of "
                f"compact taps; at {cores['gb_per_cpu_second']:.2f} GB per CPU-second of the writer path that "
                f"takes {cores['cores']:.1f} cores besides the GPU's feeding.",
            ]
        lines.append("")
    if r.get("delivery"):
        lines += [
            "## Delivery (consumer does nothing; GB/s of stored bytes)",
            "",
            "| store | stream GB/s (samples/s) | first batch | ram | stream f32 | ram f32 | numpy copy | gather loop "
            "| decode loop (1 thread) | file reads | file reads cold | stream cold | zarr shards |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        g = lambda v, c: f"{v[c]['gb_s']:.2f}" if c in v else "-"  # noqa: E731
        for k, v in r["delivery"].items():
            lines.append(
                f"| {k} | {v['stream']['gb_s']:.2f} ({v['stream']['samples_s']:,.0f}) | {v['first_batch_s']:.2f} s | "
                f"{g(v, 'ram')} | {g(v, 'stream_f32')} | {g(v, 'ram_f32')} | {g(v, 'numpy_copy')} | {g(v, 'gather_loop')} | "
                f"{g(v, 'decode_loop')} ({g(v, 'decode_loop_1_thread')}) | {g(v, 'file_reads')} | "
                f"{g(v, 'file_reads_cold')} | {g(v, 'stream_cold')} | {g(v, 'zarr_shards')} |"
            )
        lines.append("")
    if r.get("remote"):
        lines += [
            "## Remote (stream reader, every request delayed)",
            "",
            "| store | latency | local samples/s | remote "
            "samples/s | remote / local | first batch remote | read-ahead reached |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, v in r["remote"].items():
            lines.append(
                f"| {k} | {v['latency_ms']} ms | {v['local']['samples_s']:,.0f} | {v['remote']['samples_s']:,.0f} "
                f"| {v['remote_vs_local']:.2f}x | {v['remote']['first_batch_s']:.2f} s | "
                f"{v['max_read_ahead_blocks']} blocks |"
            )
        lines.append("")
    if r.get("stall"):
        lines += [
            "## A LAST epoch fed by each reader (batches decoded on the training device)",
            "",
            "| store | samples | epoch s (ram / stream) | waiting for data: ram | stream | stream epoch / ram |",
            "|---|---|---|---|---|---|",
        ]
        for k, v in r["stall"].items():
            lines.append(
                f"| {k} | {v['images']:,} | {v['ram']['epoch_s']:.1f} / {v['stream']['epoch_s']:.1f} | "
                f"{v['ram']['wait_share']:.1%} | {v['stream']['wait_share']:.1%} | "
                f"{v['stream_vs_ram_epoch']:.2f}x |"
            )
        lines.append("")
    lines += ["## Targets", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {'met' if ok else '**not met**'} |" for t, m, ok in targets(r)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stores", default=",".join(KINDS), help=f"store kinds, of {', '.join(KINDS)}")
    p.add_argument("--stages", default="ingest,delivery,remote", help="ingest, delivery, remote, stall")
    p.add_argument("--stall-images", type=int, default=2048, help="samples of the store the stall stage trains on")
    p.add_argument("--gb", type=float, default=2.0, help="stored GB per store (at least)")
    p.add_argument("--rounds", type=int, default=3, help="paired rounds")
    p.add_argument("--batch", type=int, default=256, help="batch size (writer and readers)")
    p.add_argument("--latency-ms", type=float, default=20.0, help="added to every request of the remote store")
    p.add_argument("--remote-stores", default="vit_s-compact,effnet-compact", help="store kinds of the remote stage")
    p.add_argument(
        "--delivery-stores",
        default="vit_s-fp16,vit_s-compact,vit_b-compact,effnet-compact",
        help="store kinds of the delivery stage (vit_b-fp16's float32 rows hold ~4x its 2 GB in RAM: on "
        "24 GiB shared with other work the process was OOM-killed)",
    )
    p.add_argument("--no-cold", dest="cold", action="store_false", help="skip the cold-cache rows")
    p.add_argument("--device", default="cpu", help="the readers' device (cuda: host-to-device copies included)")
    p.add_argument("--workdir", default=None, help="where the stores go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep each store after its stages (default: delete it)")
    p.add_argument("--name", default="io-cpu", help="results file name")
    p.add_argument("--smoke", action="store_true", help="tiny stores, one round (tests)")
    a = p.parse_args(argv)
    if a.smoke:
        a.gb, a.rounds, a.batch = 0.002, 1, 32
    return a


def main(argv: list[str] | None = None) -> dict[str, Any]:
    s = parse_args(argv)
    device = setup_torch(s.device, None)
    kinds = [k for k in s.stores.split(",") if k]
    stages = set(s.stages.split(","))
    work = Path(s.workdir) if s.workdir else Path(tempfile.mkdtemp(prefix="featcache-io-"))
    work.mkdir(parents=True, exist_ok=True)
    r: dict[str, Any] = {
        "command": "python -m benchmarks.bench_io " + " ".join(sys.argv[1:] if argv is None else argv),
        "gb": s.gb,
        "rounds": s.rounds,
        "batch": s.batch,
        "machine": machine(device),
    }
    r.update(ingest={}, delivery={}, remote={})
    remote = [k for k in s.remote_stores.split(",") if k]
    try:  # one store at a time through every stage: disk and page cache hold one store
        for key in kinds:
            if "ingest" in stages or not (work / f"{key}.zarr").exists():
                r["ingest"].update(ingest_stage([key], s, work))
            if "delivery" in stages and key in s.delivery_stores.split(","):
                r["delivery"].update(delivery_stage([key], s, work, device))
            if "remote" in stages and key in remote:
                r["remote"].update(remote_stage([key], s, work))
            if "stall" in stages:
                r.setdefault("stall", {}).update(stall_stage([key], s, work, device))
            if not s.keep:
                shutil.rmtree(work / f"{key}.zarr", ignore_errors=True)
            say(f"{key} done")
            if not s.smoke:  # after every store: a crash later keeps what was measured
                write_json(RESULTS / f"{s.name}.json", r)
        r["extraction_cores"] = cores_for_extraction(r["ingest"])
    finally:
        if not s.workdir:
            shutil.rmtree(work, ignore_errors=True)
    r["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(r)]
    if not s.smoke:
        write_json(RESULTS / f"{s.name}.json", r)
        (RESULTS / f"{s.name}.md").write_text(render(r))
    print(render(r))
    return r


if __name__ == "__main__":
    main()
