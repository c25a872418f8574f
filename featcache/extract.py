"""The one backbone pass: data -> transformed images -> taps -> a split of a feature store.

``extract`` runs the three steps of featcache.store.writer under the split's lock:
plan/create (``open_split_for_writing``), the per-shard work unit (``extract_shards``: given an
open split, a backbone and a data source, compute and write any list of shard ids), finalize.
The scale-out issue reuses ``plan_split``/``open_split_for_writing`` on one process,
``extract_shards`` on each worker (with ``open_split_source(meta.data, meta.limit)`` there), and
``finalize_split``.

Pipeline of ``extract_shards``: a ``DataLoader`` decodes and transforms images in worker
processes; the main thread runs the frozen backbone (inference mode; bf16 autocast on CUDA for
16-bit caches) and copies each batch's taps into the current shard's buffers; finished shards go
to a ``ShardWriter`` thread (bounded queue) that compresses and writes them, so the backbone never
waits for compression or disk. Batches never cross a shard boundary and always start at the same
images, so a resumed extraction computes every shard from exactly the same batches as an
uninterrupted one: the stored arrays are bitwise equal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import timm
import torch
import zarr

from featcache import __version__
from featcache.allocator import keep_freed_memory
from featcache.backbone import Backbone, resolve_device
from featcache.taps import check_finite
from featcache.vocabulary import BackboneSpec
from featcache.vocabulary import COMPRESSORS, DEFAULT_BATCH_SIZE, DEFAULT_COMPRESSOR, DTYPES
from featcache.data import (DataSource, PooledItems, Subset, TransformedDataset, TransformPool, open_source,
                            stratified_subset, unwrap_worker_error)
from featcache.errors import DataError, Interrupted, StoreError, UsageError
from featcache.progress import bar
from featcache.store.layout import FeatureStore, choose_chunking, compressor_record, storage_dtype
from featcache.store.lock import SplitLock
from featcache.vocabulary import Manifest, SplitMeta
from featcache.store.writer import (ShardData, ShardWriteError, ShardWriter, SplitTotals, describe_os_error,
                                    finalize_split, open_split_for_writing)

log = logging.getLogger(__name__)

# Measured on 2 CPU cores (docs/store.md, benchmarks/bench_extract.py settings): see runtime_settings()
ZARR_CONCURRENCY = 4


@dataclass
class ExtractOptions:
    """Everything about one extraction except the backbone, the data and the store."""

    split: str = "train"
    layers: list[int] | None = None  # tap positions; None = all
    batch_size: int | None = None  # backbone inputs per forward (images x views); None: recorded on resume, else 32
    device: str = "auto"
    dtype: str = "float16"
    compressor: str | None = None  # None: recorded on resume, else DEFAULT_COMPRESSOR
    views: int = 1  # > 1: augmented views with the training transform, deterministic in (seed, image, view)
    seed: int = 0  # augmentation seed
    limit: int | None = None  # a fixed stratified subset of this many images
    resume: bool = False
    overwrite: bool = False
    repair: bool = False  # with resume: verify the split first and recompute the shards found damaged
    progress: bool = True
    chunk_images: int | None = None  # overrides of layout.choose_chunking (tests, tuning)
    shard_images: int | None = None
    loader_workers: int | None = None  # DataLoader processes; None = default_loader_workers()
    writer_threads: int | None = None  # shard writer threads; None = default_writer_threads()
    durable: bool = True  # fsync each shard before its completion record (local paths)
    storage_options: dict[str, Any] | None = None  # fsspec options for URL stores

    def validate(self) -> None:
        if not self.split or self.split.startswith("_") or "/" in self.split or "://" in self.split:
            raise UsageError(f"--split {self.split!r} is not allowed: use letters, digits, '-' or '.' (not a leading "
                             "'_', no '/')")
        if self.resume and self.overwrite:
            raise UsageError("--resume and --overwrite exclude each other: resume continues a split, overwrite "
                             "replaces it")
        if self.repair and not self.resume:
            raise UsageError("--repair needs --resume: it continues the split and recomputes the shards that "
                             "featcache inspect --verify finds damaged")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.compressor is not None and self.compressor not in COMPRESSORS:
            raise UsageError(f"--compressor must be one of {', '.join(COMPRESSORS)}, got {self.compressor!r}")
        for name in ("batch_size", "views", "limit", "chunk_images", "shard_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise UsageError(f"loader_workers must be >= 0, got {self.loader_workers}")


@dataclass
class ShardRunStats:
    """What one ``extract_shards`` call did."""

    shards: list[int] = field(default_factory=list)
    images: int = 0
    nbytes: int = 0  # tap bytes produced (storage dtype, before compression)
    seconds: float = 0.0
    forward_seconds: float = 0.0
    write_seconds: float = 0.0  # on the writer thread, overlapping the forward passes
    startup_seconds: float = 0.0  # until the first batch arrived (DataLoader workers starting)
    drain_seconds: float = 0.0  # after the last forward: writing the shards still queued


@dataclass
class ExtractReport:
    """The result of ``extract``: what was written where, sizes and timing."""

    store: str
    split: str
    status: str  # "created" | "resumed" | "replaced"
    num_samples: int
    views: int
    taps: list[str]
    dtype: str
    compressor: str
    shards_total: int
    shards_written: int
    images_written: int
    complete: bool
    nbytes: int  # logical tap bytes of the split's completed shards
    stored_bytes: int  # their size on storage
    seconds: float  # the whole call: model and data loading, all shards, finalize
    loop_seconds: float  # computing and writing the shards
    forward_seconds: float
    write_seconds: float  # on the writer thread, overlapping the forward passes
    startup_seconds: float = 0.0  # of loop_seconds: until the first batch arrived
    drain_seconds: float = 0.0  # of loop_seconds: writing the last shards after the last forward
    shards_repaired: list[int] = field(default_factory=list)  # --repair: damaged shards recomputed

    @property
    def images_per_second(self) -> float:
        """Throughput of the shard loop, start-up and final drain included."""
        return self.images_written / self.loop_seconds if self.loop_seconds > 0 else 0.0

    @property
    def steady_images_per_second(self) -> float:
        """Throughput between the first batch and the last forward (what a long extraction sees)."""
        steady = self.loop_seconds - self.startup_seconds - self.drain_seconds
        return self.images_written / steady if steady > 0 else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.nbytes / self.stored_bytes if self.stored_bytes else 0.0

    def summary_line(self) -> str:
        """The one-line summary the CLI prints on stderr."""
        done = "" if self.status != "resumed" else f", resumed: {self.shards_written} of {self.shards_total} shards redone"
        if self.shards_repaired:
            done += f" ({len(self.shards_repaired)} damaged shard(s) repaired: {', '.join(map(str, self.shards_repaired))})"
        views = f" x {self.views} views" if self.views > 1 else ""
        return (f"extracted {self.num_samples} images{views} x {len(self.taps)} taps into {self.store} "
                f"[{self.split}]{done}: {_fmt_bytes(self.nbytes)} {self.dtype} stored as {_fmt_bytes(self.stored_bytes)} "
                f"({self.compressor}, ratio {self.compression_ratio:.2f}) in {self.seconds:.1f} s "
                f"({self.images_per_second:.1f} images/s)")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": self.images_per_second,
                "steady_images_per_second": self.steady_images_per_second, "compression_ratio": self.compression_ratio}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


# ---------------------------------------------------------------------------------------------
# Runtime settings


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_loader_workers(device: torch.device | str = "cpu", views: int = 1) -> int:
    """DataLoader worker processes: none for a CPU backbone (its forward uses every core: the images are
    transformed on a ``TransformPool`` between forwards instead); for a GPU, or augmented views (seeded per
    image through the global RNGs, so not on threads), 1 on small machines and up to 4 on larger ones."""
    if torch.device(device).type == "cpu" and views == 1:
        return 0
    cpus = _cpus()
    return 1 if cpus <= 4 else min(4, cpus // 4)


def transform_threads(loader_workers: int, views: int) -> int:
    """Threads of the in-process ``TransformPool``: the forward's cores when no DataLoader worker
    transforms the images, 0 (none) with workers or with augmented views (they seed the global RNGs)."""
    if loader_workers or views > 1:
        return 0
    return max(1, min(torch.get_num_threads(), _cpus()))


def transform_pool(loader_workers: int, views: int) -> TransformPool | None:
    """The ``TransformPool`` for a loader with this many workers and views, or None (workers, views, one core)."""
    threads = transform_threads(loader_workers, views)
    return TransformPool(threads) if threads > 1 else None


def default_writer_threads() -> int:
    """Shard writer threads: 1 where the backbone needs the cores, up to 4 where a GPU outruns one writer."""
    cpus = _cpus()
    return 1 if cpus <= 4 else min(4, cpus // 4)


@contextlib.contextmanager
def runtime_settings() -> Iterator[None]:
    """zarr's codec concurrency while extracting (see docs/store.md).

    zarr encodes up to ``async.concurrency`` chunks at once on its thread pool; next to torch's
    intra-op threads on a few cores more parallel compression only preempts the forward pass.
    Scoped to the call (zarr reads the setting per operation); zarr's pool size itself is fixed at
    its first use in a process and left alone.
    """
    with zarr.config.set({"async.concurrency": ZARR_CONCURRENCY}):
        yield


# ---------------------------------------------------------------------------------------------
# Data: the split's images, one or several views


def open_split_source(data: str | DataSource, limit: int | None = None) -> DataSource:
    """The images of a split: ``--data SPEC`` (or a source object), optionally a fixed stratified subset."""
    source = open_source(data) if isinstance(data, str) else data
    if limit is not None and limit < len(source):
        labels = source.labels()
        if (labels < 0).all():  # unlabelled: the first `limit` images
            return Subset(source, np.arange(limit))
        return Subset(source, stratified_subset(labels, limit))
    return source


@contextlib.contextmanager
def seeded_rng(seed: int, index: int, view: int) -> Iterator[None]:
    """Seed torch, numpy and ``random`` from (seed, index, view); restore their states afterwards."""
    state = np.random.SeedSequence([seed, index, view]).generate_state(2)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(state[0]))
        random.seed(int(state[0]))
        np.random.seed(int(state[1]))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class AugmentedViews(torch.utils.data.Dataset):
    """(views (V, 3, H, W), label, index) items: V draws of the training transform, deterministic per image."""

    def __init__(self, source: DataSource, transform: Callable[[Any], torch.Tensor], views: int, seed: int) -> None:
        self.source, self.transform, self.views, self.seed = source, transform, views, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.source[index]
        out = []
        for view in range(self.views):
            with seeded_rng(self.seed, index, view):
                out.append(self.transform(sample.image))
        return torch.stack(out), sample.label, index


class ShardBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of image indices that never cross a shard boundary and always start at the same images."""

    def __init__(self, meta: SplitMeta, shards: Sequence[int], images_per_batch: int) -> None:
        self.meta, self.shards, self.images_per_batch = meta, list(shards), images_per_batch

    def __iter__(self) -> Iterator[list[int]]:
        for k in self.shards:
            start, stop = self.meta.shard_bounds(k)
            for b in range(start, stop, self.images_per_batch):
                yield list(range(b, min(b + self.images_per_batch, stop)))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.images_per_batch)
                   for start, stop in (self.meta.shard_bounds(k) for k in self.shards))


def make_loader(source: DataSource, backbone: Backbone, meta: SplitMeta, shards: Sequence[int], batch_size: int,
                workers: int, pool: TransformPool | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over the given shards' images (eval transform, or ``meta.views`` augmented views);
    with ``pool`` (and no workers) each batch is transformed on the pool's threads."""
    if meta.views > 1:
        dataset: torch.utils.data.Dataset = AugmentedViews(source, backbone.train_transform(), meta.views, meta.seed)
    else:
        dataset = TransformedDataset(source, backbone.transform)
        if pool is not None and not workers:
            dataset = PooledItems(dataset, pool)
    images_per_batch = max(1, batch_size // meta.views)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=ShardBatchSampler(meta, shards, images_per_batch), num_workers=workers,
        pin_memory=backbone.device.type == "cuda", prefetch_factor=4 if workers else None)


# ---------------------------------------------------------------------------------------------
# Plan


def build_manifest(backbone: Backbone, dtype: str, compressor: str) -> Manifest:
    """The store manifest of an extraction with this backbone."""
    return Manifest(
        backbone=backbone.describe(), taps=list(backbone.taps.infos), dtype=dtype,
        compressor=compressor_record(compressor),
        transform={"eval": repr(backbone.transform), "train": repr(backbone.train_transform()),
                   "data_config": backbone.describe()["data_config"]},
        environment={"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
                     "zarr": zarr.__version__, "numpy": np.__version__, "platform": sys.platform})


def plan_split(backbone: Backbone, source: DataSource, opts: ExtractOptions, recorded: SplitMeta | None = None) -> SplitMeta:
    """The split's metadata: sizes, chunking, views; batch size and compressor default to the recorded ones."""
    views = opts.views
    chunk, shard = choose_chunking(backbone.taps.infos, opts.dtype, views, len(source))
    chunk = opts.chunk_images or (recorded.chunk_images if recorded and opts.resume else chunk)
    shard = opts.shard_images or (recorded.shard_images if recorded and opts.resume else max(shard, chunk))
    if opts.chunk_images and not opts.shard_images and shard % chunk:
        shard = -(-shard // chunk) * chunk
    use_recorded = recorded is not None and opts.resume
    batch = opts.batch_size or (recorded.batch_size if use_recorded and recorded.batch_size else DEFAULT_BATCH_SIZE)
    compressor = opts.compressor or (recorded.compressor if use_recorded and recorded.compressor else DEFAULT_COMPRESSOR)
    classes = list(source.classes)
    return SplitMeta(num_samples=len(source), chunk_images=chunk, shard_images=shard, views=views, classes=classes,
                     data=source.spec, view_transform="train" if views > 1 else "eval", seed=opts.seed,
                     limit=opts.limit if opts.limit is not None and opts.limit < _source_size(source) else None,
                     batch_size=batch, compressor=compressor)


def _source_size(source: DataSource) -> int:
    return len(source.source) if isinstance(source, Subset) else len(source)


def _recorded_meta(out: str, split: str, storage_options: dict[str, Any] | None) -> SplitMeta | None:
    try:
        store = FeatureStore.open(out, "r", storage_options)
        return store.split(split).meta if split in store.splits() else None
    except StoreError:
        return None


def _check_out(out: str) -> None:
    if "://" not in out and os.path.exists(out) and not os.path.isdir(out):
        raise StoreError(f"store path {out} is a file, not a Zarr store directory; choose another --out path")


# ---------------------------------------------------------------------------------------------
# The per-shard work unit


class ShardBuffers:
    """Preallocated arrays (storage dtype) of the shard being filled, one per tap."""

    def __init__(self, split_meta: SplitMeta, taps: Sequence[Any], dtype: str) -> None:
        self.meta, self.taps, self.dtype = split_meta, list(taps), dtype
        self.shard: int | None = None
        self.arrays: dict[str, np.ndarray] = {}
        self.filled = 0

    def start(self, shard: int) -> None:
        start, stop = self.meta.shard_bounds(shard)
        lead = (self.meta.views,) if self.meta.views > 1 else ()
        self.shard, self.filled = shard, 0
        self.arrays = {t.name: np.empty((stop - start, *lead, t.tokens, t.channels), dtype=storage_dtype(self.dtype))
                       for t in self.taps}

    @property
    def bytes_per_image(self) -> int:
        return sum(int(np.prod(a.shape[1:])) * a.itemsize for a in self.arrays.values())

    def put(self, offset: int, taps: dict[str, torch.Tensor]) -> int:
        """Copy a batch of taps (B * V, T, C) into images [offset, offset + B) of the shard; returns B."""
        n = 0
        for name, dst in self.arrays.items():
            t = taps[name]
            n = t.shape[0] // self.meta.views
            rows = torch.from_numpy(dst[offset:offset + n])
            if self.dtype == "bfloat16":
                rows = rows.view(torch.int16).view(torch.bfloat16)
            rows.copy_(t.reshape(rows.shape))  # one pass: dtype conversion (and device-to-host) into the shard
            check_finite(name, rows, t, self.dtype, self.meta.shard_bounds(self.shard)[0] + offset)
        self.filled += n
        return n

    @property
    def full(self) -> bool:
        start, stop = self.meta.shard_bounds(self.shard) if self.shard is not None else (0, 0)
        return self.shard is not None and self.filled == stop - start


def forward_taps(backbone: Backbone, images: torch.Tensor, views: int, dtype: str) -> dict[str, torch.Tensor]:
    """The taps of a DataLoader batch ((B, 3, H, W), or (B, V, 3, H, W) with views), as (B * V, T, C)."""
    x = images.to(backbone.device, non_blocking=True)
    if views > 1:
        x = x.flatten(0, 1)
    autocast = backbone.device.type == "cuda" and dtype != "float32"
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        return backbone.taps(x)


class _RateBar:
    """The progress bar: images/s from tqdm, MB/s of tap data in the postfix (updated twice a second)."""

    def __init__(self, total: int, desc: str, progress: bool) -> None:
        self.bar, self.t0, self.last, self.nbytes = bar(total, desc, progress=progress), time.perf_counter(), 0.0, 0

    def update(self, images: int, nbytes: int) -> None:
        self.nbytes += nbytes
        self.bar.update(images)
        now = time.perf_counter()
        if now - self.last > 0.5:
            self.bar.set_postfix_str(f"{self.nbytes / 1e6 / (now - self.t0):.1f} MB/s", refresh=False)
            self.last = now

    def close(self) -> None:
        self.bar.close()


def extract_shards(split: Any, backbone: Backbone, source: DataSource, shards: Sequence[int], *,
                   batch_size: int | None = None, loader_workers: int | None = None, progress: bool = True,
                   durable: bool = True, writer_threads: int | None = None) -> ShardRunStats:
    """Compute and write the given shards of an open split (the work unit; any subset, any order).

    ``split`` is a ``SplitHandle`` opened for writing; ``source`` gives the split's images in split
    order (``open_split_source(split.meta.data, split.meta.limit)``). Each shard is written whole
    and then marked complete. On Ctrl-C the shards already computed are written, the partial one
    is dropped and ``Interrupted`` is raised; on other errors too the computed shards are kept.
    """
    meta, dtype = split.meta, split.store.manifest.dtype
    if len(source) != meta.num_samples:
        raise DataError(f"the data source has {len(source)} images but split {split.name!r} was planned for "
                        f"{meta.num_samples}")
    stats, todo = ShardRunStats(), sorted(int(k) for k in shards)
    if not todo:
        return stats
    labels, ids = source.labels(), source.ids()
    buffers = ShardBuffers(meta, backbone.taps.infos, dtype)
    workers = default_loader_workers(backbone.device, meta.views) if loader_workers is None else loader_workers
    pool = transform_pool(workers, meta.views)
    loader = make_loader(source, backbone, meta, todo, batch_size or meta.batch_size or DEFAULT_BATCH_SIZE, workers,
                         pool)
    pbar = _RateBar(sum(stop - start for start, stop in map(meta.shard_bounds, todo)), f"extract {split.name}",
                    progress)
    t0 = time.perf_counter()
    batches = iter(loader)  # fork the DataLoader workers before the writer threads exist
    writer = ShardWriter(split, max_pending=2, durable=durable, threads=default_writer_threads()
                         if writer_threads is None else writer_threads)
    t_drain = t0
    try:
        for images, _labels, index in batches:
            stats.startup_seconds = stats.startup_seconds or time.perf_counter() - t0
            first = int(index[0])
            shard = first // meta.shard_images
            if buffers.shard != shard:
                buffers.start(shard)
            tf = time.perf_counter()
            n = buffers.put(first - meta.shard_bounds(shard)[0], forward_taps(backbone, images, meta.views, dtype))
            stats.forward_seconds += time.perf_counter() - tf
            stats.images += n
            stats.nbytes += buffers.bytes_per_image * n
            pbar.update(n, buffers.bytes_per_image * n)
            if buffers.full:
                start, stop = meta.shard_bounds(shard)
                writer.submit(ShardData(shard, buffers.arrays, labels[start:stop], ids[start:stop]))
                buffers.shard = None
        t_drain = time.perf_counter()
        writer.close()  # the queued shards; a write error is raised here or by submit
    except KeyboardInterrupt:
        writer.close(raise_error=False)  # computed shards are whole: keep them; the partial one is dropped
        pbar.close()
        raise Interrupted(f"interrupted: {int(split.completed_shards().sum())} of {meta.num_shards} shards of split "
                          f"{split.name!r} in {split.store.url} are complete, the shard in progress was discarded; "
                          "run the same featcache extract command with --resume to continue") from None
    except ShardWriteError as err:
        writer.close(raise_error=False)  # the shards written before the failure are complete: keep them
        pbar.close()
        raise StoreError(f"{err}; {_kept(split)}: {err.fix}, then run the same featcache extract command with "
                         "--resume") from err
    except BaseException as err:
        writer.close(raise_error=False)  # shards computed before the error are whole: keep them
        pbar.close()
        unwrapped = unwrap_worker_error(err)  # an error in a DataLoader worker: its own type and message
        if unwrapped is not err:
            raise unwrapped from None
        raise
    finally:
        if pool is not None:
            pool.close()
    pbar.close()
    stats.drain_seconds = time.perf_counter() - t_drain
    stats.seconds = time.perf_counter() - t0
    stats.write_seconds = writer.write_seconds
    stats.shards = sorted(writer.written)
    return stats


def _kept(split: Any) -> str:
    try:
        done = int(split.completed_shards().sum())
    except StoreError:
        return "the shards completed before the failure are kept"
    return f"{done} of {split.meta.num_shards} shards of split {split.name!r} are complete and kept"


# ---------------------------------------------------------------------------------------------
# The whole extraction


def extract(spec: BackboneSpec, data: str | DataSource, out: str | os.PathLike[str],
            options: ExtractOptions | None = None, **overrides: Any) -> ExtractReport:
    """One backbone pass over ``data`` into split ``options.split`` of the store ``out``.

    ``overrides`` replace fields of ``options`` (``extract(spec, data, out, split="val")``).
    Raises featcache errors: ``StoreError`` (refusals leave the store untouched), ``StoreLockedError``,
    ``Interrupted`` (Ctrl-C; completed shards kept, rerun with ``resume=True``).
    """
    unknown = set(overrides) - {f.name for f in fields(ExtractOptions)}
    if unknown:
        raise TypeError(f"unknown extract options: {', '.join(sorted(unknown))}")
    opts = replace(options or ExtractOptions(), **overrides)
    opts.validate()
    keep_freed_memory()  # large activations reuse heap pages instead of faulting fresh ones (allocator.py)
    out = str(out)
    _check_out(out)
    t0 = time.perf_counter()
    with runtime_settings():
        source = open_split_source(data, opts.limit)
        backbone = Backbone(spec, resolve_device(opts.device), opts.layers)
        try:
            with SplitLock(out, opts.split, opts.storage_options):
                recorded = _recorded_meta(out, opts.split, opts.storage_options)
                meta = plan_split(backbone, source, opts, recorded)
                manifest = build_manifest(backbone, opts.dtype, meta.compressor)
                split, status = open_split_for_writing(
                    out, manifest, opts.split, meta, ids=source.ids(), resume=opts.resume, overwrite=opts.overwrite,
                    repair=opts.repair, final_norm=backbone.final_norm_state(), storage_options=opts.storage_options)
                done = split.completed_shards()
                todo = [k for k in range(split.meta.num_shards) if not done[k]]
                stats = extract_shards(split, backbone, source, todo, batch_size=split.meta.batch_size,
                                       loader_workers=opts.loader_workers, progress=opts.progress,
                                       durable=opts.durable, writer_threads=opts.writer_threads)
                seconds = time.perf_counter() - t0
                totals = finalize_split(split, seconds)
        except OSError as err:  # outside the shard writer: creating the store or split, finalizing, the lock
            what, fix = describe_os_error(err)
            raise StoreError(f"cannot write store {out}: {what}; completed shards are kept: {fix}, then run the same "
                             "featcache extract command with --resume") from err
    report = _report(out, split, status, manifest, stats, totals, seconds)
    report.shards_repaired = list(split.repaired_shards)
    return report


def _report(out: str, split: Any, status: str, manifest: Manifest, stats: ShardRunStats, totals: SplitTotals,
            seconds: float) -> ExtractReport:
    return ExtractReport(
        store=out, split=split.name, status=status, num_samples=split.meta.num_samples, views=split.meta.views,
        taps=manifest.tap_names, dtype=manifest.dtype, compressor=split.meta.compressor,
        shards_total=split.meta.num_shards, shards_written=len(stats.shards), images_written=stats.images,
        complete=totals.complete, nbytes=totals.nbytes, stored_bytes=totals.stored_bytes, seconds=seconds,
        loop_seconds=stats.seconds, forward_seconds=stats.forward_seconds, write_seconds=stats.write_seconds,
        startup_seconds=stats.startup_seconds, drain_seconds=stats.drain_seconds)


__all__ = ["AugmentedViews", "ExtractOptions", "ExtractReport", "ShardBatchSampler", "ShardRunStats", "build_manifest",
           "default_loader_workers", "default_writer_threads", "extract", "extract_shards", "forward_taps",
           "make_loader", "open_split_source", "plan_split", "runtime_settings", "seeded_rng", "transform_pool",
           "transform_threads"]
