"""The one backbone pass: data -> transformed images -> taps -> a split of a feature store.

Every extraction runs one pipeline, ``run_extraction``: plan the split, take its lock, create it (or
check that it can be resumed) with ``featcache.store.writer.open_split_for_writing``, run its missing
shards, finalize. Only how the shards run differs, behind ``ShardRunner``: ``InProcessRunner`` here
(``extract``), the dask runner in ``featcache.distributed.extraction`` (``extract_on_cluster``). Both run
the work unit ``extract_shards``: given an open split, a backbone and a data source, compute and write any
list of shards.

Inside ``extract_shards`` the images come in shard-aligned batches (``featcache.loader``); the main
thread runs the frozen backbone (inference mode; ``AutocastPolicy``: float32, TF32 off, as the store records) and copies
each batch's taps into the current shard's buffers; finished shards go to a ``ShardWriter`` thread
(bounded queue) that compresses and writes them, so the backbone never waits for compression or disk.
Batches never cross a shard boundary and always start at the same images, so a resumed extraction
computes every shard from exactly the same batches as an uninterrupted one: the arrays are bitwise equal.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
import timm
import torch
import zarr
from dask.utils import format_bytes

from featcache.allocator import keep_freed_memory
from featcache.backbone import Backbone
from featcache.data import DataSource, Subset, open_source, stratified_subset
from featcache.device import AutocastPolicy, resolve_device
from featcache.errors import DataError, Interrupted, StoreError, TapOverflowError
from featcache.loader import (
    TransformedDataset,
    cpu_count,
    default_loader_workers,
    make_loader,
    transform_pool,
    unwrap_worker_error,
)
from featcache.manifest import DEFAULT_BATCH_SIZE, DEFAULT_COMPRESSOR, BackboneSpec, Manifest, SplitMeta
from featcache.options import ExtractOptions
from featcache.progress import bar
from featcache.store.codecs import SCALE_DTYPE, auto_compressors, compressor_record, storage_view
from featcache.store.feature_store import FeatureStore, SplitHandle, choose_chunking
from featcache.store.lock import SplitLock
from featcache.store.writer import (
    ShardWriteError,
    ShardWriter,
    SplitTotals,
    describe_os_error,
    finalize_split,
    open_split_for_writing,
)
from featcache.tap_encoder import TapEncoder, encode_taps

log = logging.getLogger(__name__)

# Measured on 2 CPU cores (docs/store.md, benchmarks/bench_extract.py settings): see runtime_settings()
ZARR_CONCURRENCY = 4
PROBE_IMAGES = 8  # images forwarded to choose each tap's compressor (--compressor auto)


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
        done = (
            "" if self.status != "resumed" else f", resumed: {self.shards_written} of {self.shards_total} shards redone"
        )
        if self.shards_repaired:
            done += (
                f" ({len(self.shards_repaired)} damaged shard(s) repaired: {', '.join(map(str, self.shards_repaired))})"
            )
        views = f" x {self.views} views" if self.views > 1 else ""
        return (
            f"extracted {self.num_samples} images{views} x {len(self.taps)} taps into {self.store} "
            f"[{self.split}]{done}: {format_bytes(self.nbytes)} {self.dtype} stored as {format_bytes(self.stored_bytes)} "
            f"({self.compressor}, ratio {self.compression_ratio:.2f}) in {self.seconds:.1f} s "
            f"({self.images_per_second:.1f} images/s)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "images_per_second": self.images_per_second,
            "steady_images_per_second": self.steady_images_per_second,
            "compression_ratio": self.compression_ratio,
        }


# ---------------------------------------------------------------------------------------------
# Runtime settings


def default_writer_threads() -> int:
    """Shard writer threads: 1 where the backbone needs the cores, up to 4 where a GPU outruns one writer."""
    cpus = cpu_count()
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


# ---------------------------------------------------------------------------------------------
# Plan


def build_manifest(
    backbone: Backbone, dtype: str, compressor: str, per_array: dict[str, str] | None = None
) -> Manifest:
    """The store manifest of an extraction with this backbone."""
    return Manifest(
        backbone=backbone.describe(),
        taps=list(backbone.taps.infos),
        dtype=dtype,
        compressor=compressor_record(compressor, per_array),
        autocast=AutocastPolicy.for_cache(dtype).to_dict(),
        transform={
            "eval": repr(backbone.transform),
            "train": repr(backbone.train_transform()),
            "data_config": backbone.describe()["data_config"],
        },
        environment={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "zarr": zarr.__version__,
            "numpy": np.__version__,
            "platform": sys.platform,
        },
    )


def plan_split(
    backbone: Backbone, source: DataSource, opts: ExtractOptions, recorded: SplitMeta | None = None
) -> SplitMeta:
    """The split's metadata: sizes, chunking, views; batch size and compressor default to the recorded ones."""
    views = opts.views
    chunk, shard = choose_chunking(backbone.taps.infos, opts.dtype, views, len(source))
    chunk = opts.chunk_images or (recorded.chunk_images if recorded and opts.resume else chunk)
    shard = opts.shard_images or (recorded.shard_images if recorded and opts.resume else max(shard, chunk))
    if opts.chunk_images and not opts.shard_images and shard % chunk:
        shard = -(-shard // chunk) * chunk
    use_recorded = recorded is not None and opts.resume
    batch = opts.batch_size or (recorded.batch_size if use_recorded and recorded.batch_size else DEFAULT_BATCH_SIZE)
    compressor = opts.compressor or (
        recorded.compressor if use_recorded and recorded.compressor else DEFAULT_COMPRESSOR
    )
    per_array: dict[str, str] = {}
    if compressor == "auto":  # the recorded choice on resume; else measured on a probe batch
        per_array = (
            dict(recorded.tap_compressors)
            if use_recorded and recorded.compressor == "auto"
            else probe_compressors(backbone, source, opts.dtype)
        )
    classes = list(source.classes)
    return SplitMeta(
        num_samples=len(source),
        chunk_images=chunk,
        shard_images=shard,
        views=views,
        classes=classes,
        data=source.spec,
        view_transform="eval+train" if views > 1 else "eval",
        eval_view=0,
        seed=opts.seed,
        limit=opts.limit if opts.limit is not None and opts.limit < _source_size(source) else None,
        batch_size=batch,
        compressor=compressor,
        tap_compressors=per_array,
    )


def probe_compressors(backbone: Backbone, source: DataSource, dtype: str, images: int = PROBE_IMAGES) -> dict[str, str]:
    """``--compressor auto``: each tap array's compressor, from the first images of the split encoded in the cache
    dtype (``featcache.store.codecs.auto_compressors``: lz4 where it saves a third of the bytes, else none)."""
    dataset, x = TransformedDataset(source, backbone.transform), []
    for i in range(min(4 * images, len(source))):  # an unreadable image is the extraction's to report, in context
        with contextlib.suppress(DataError):
            x.append(dataset[i][0])
        if len(x) == images:
            break
    try:
        taps = forward_taps(backbone, torch.stack(x), 1, AutocastPolicy.for_cache(dtype)) if x else {}
        arrays, _ = encode_taps({k: v.cpu() for k, v in taps.items()}, backbone.taps.infos, dtype, 1, 0)
    except TapOverflowError:  # the first batch of the extraction reports it, with its images and the fix
        return {}
    return auto_compressors({name: storage_view(t.contiguous()) for name, t in arrays.items()})


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


def forward_taps(
    backbone: Backbone, images: torch.Tensor, views: int, policy: AutocastPolicy
) -> dict[str, torch.Tensor]:
    """The taps of a DataLoader batch ((B, 3, H, W), or (B, V, 3, H, W) with views), as (B * V, T, C), in the
    precision of ``policy`` (the store's recorded one)."""
    x = images.to(backbone.device, non_blocking=True)
    if views > 1:
        x = x.flatten(0, 1)
    with torch.inference_mode(), policy.context(backbone.device):
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


def extract_shards(
    split: Any,
    backbone: Backbone,
    source: DataSource,
    shards: Sequence[int],
    *,
    batch_size: int | None = None,
    loader_workers: int | None = None,
    progress: bool = True,
    durable: bool = True,
    writer_threads: int | None = None,
) -> ShardRunStats:
    """Compute and write the given shards of an open split (the work unit; any subset, any order).

    ``split`` is a ``SplitHandle`` opened for writing; ``source`` gives the split's images in split
    order (``open_split_source(split.meta.data, split.meta.limit)``). Each shard is written whole
    and then marked complete. On Ctrl-C the shards already computed are written, the partial one
    is dropped and ``Interrupted`` is raised; on other errors too the computed shards are kept.
    """
    meta, dtype = split.meta, split.store.manifest.dtype
    if len(source) != meta.num_samples:
        raise DataError(
            f"the data source has {len(source)} images but split {split.name!r} was planned for {meta.num_samples}"
        )
    stats, todo = ShardRunStats(), sorted(int(k) for k in shards)
    if not todo:
        return stats
    labels, ids = source.labels(), source.ids()
    policy = AutocastPolicy.from_manifest(split.store.manifest.autocast, dtype)  # one store, one precision
    scale_dtype = split.scale_dtype or SCALE_DTYPE  # as the split's scale arrays hold them (float16 in older ones)
    workers = default_loader_workers(backbone.device, meta.views) if loader_workers is None else loader_workers
    pool = transform_pool(workers, meta.views)
    loader = make_loader(
        source, backbone, meta, todo, batch_size or meta.batch_size or DEFAULT_BATCH_SIZE, workers, pool
    )
    pbar = _RateBar(
        sum(stop - start for start, stop in map(meta.shard_bounds, todo)), f"extract {split.name}", progress
    )
    t0 = time.perf_counter()
    batches = iter(loader)  # fork the DataLoader workers before the writer threads exist
    writer = ShardWriter(
        split,
        max_pending=2,
        durable=durable,
        threads=default_writer_threads() if writer_threads is None else writer_threads,
    )
    encoder = TapEncoder(meta, backbone.taps.infos, dtype, writer, labels, ids, scale_dtype)
    t_drain = t0
    try:
        for images, _labels, index in batches:
            stats.startup_seconds = stats.startup_seconds or time.perf_counter() - t0
            tf = time.perf_counter()
            n = encoder.put(int(index[0]), forward_taps(backbone, images, meta.views, policy))
            stats.forward_seconds += time.perf_counter() - tf
            stats.images += n
            stats.nbytes += encoder.bytes_per_image * n
            pbar.update(n, encoder.bytes_per_image * n)
        t_drain = time.perf_counter()
        encoder.close()  # the queued batches: an overflow or a write error is raised here or by put
        writer.close()  # the queued shards
    except KeyboardInterrupt:
        encoder.close(raise_error=False)  # batches already computed fill their shards
        writer.close(raise_error=False)  # computed shards are whole: keep them; the partial one is dropped
        pbar.close()
        raise Interrupted(
            f"interrupted: {int(split.completed_shards().sum())} of {meta.num_shards} shards of split "
            f"{split.name!r} in {split.store.url} are complete, the shard in progress was discarded; "
            "run the same featcache extract command with --resume to continue"
        ) from None
    except ShardWriteError as err:
        encoder.abort()
        writer.close(raise_error=False)  # the shards written before the failure are complete: keep them
        pbar.close()
        raise StoreError(
            f"{err}; {_kept(split)}: {err.fix}, then run the same featcache extract command with --resume"
        ) from err
    except BaseException as err:
        encoder.abort()
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
# The whole extraction: one pipeline, two runners


class ShardRunner(Protocol):
    """How the shards of a planned split are computed: in this process, or as dask tasks (featcache.distributed)."""

    def backbone_device(self, opts: ExtractOptions) -> torch.device:
        """Where the planning process puts its backbone (the one that also computes shards in-process)."""

    def run(
        self, split: SplitHandle, backbone: Backbone, source: DataSource, shards: list[int], opts: ExtractOptions
    ) -> ShardRunStats:
        """Compute and write ``shards`` of the open split; completed shards are kept on any error."""

    def report(self, report: ExtractReport, stats: ShardRunStats) -> ExtractReport:
        """The report of the whole extraction, with what this runner adds."""


class InProcessRunner:
    """Shards computed here, in order, by ``extract_shards``."""

    def backbone_device(self, opts: ExtractOptions) -> torch.device:
        return resolve_device(opts.device)

    def run(
        self, split: SplitHandle, backbone: Backbone, source: DataSource, shards: list[int], opts: ExtractOptions
    ) -> ShardRunStats:
        return extract_shards(
            split,
            backbone,
            source,
            shards,
            batch_size=split.meta.batch_size,
            loader_workers=opts.loader_workers,
            progress=opts.progress,
            durable=opts.durable,
            writer_threads=opts.writer_threads,
        )

    def report(self, report: ExtractReport, stats: ShardRunStats) -> ExtractReport:
        return report


def resolve_options(options: ExtractOptions | None, overrides: dict[str, Any]) -> ExtractOptions:
    """``options`` with ``overrides`` replacing fields, validated (an unknown name: an error listing the valid ones)."""
    return dataclasses.replace(options or ExtractOptions(), **overrides)


def open_planned_split(
    out: str, backbone: Backbone, source: DataSource, opts: ExtractOptions
) -> tuple[SplitHandle, str]:
    """Plan the split (recorded settings on --resume), then create it or check it can be resumed.

    The caller holds the split's lock. Returns (split, "created" | "resumed" | "replaced").
    """
    recorded = _recorded_meta(out, opts.split, opts.storage_options)
    meta = plan_split(backbone, source, opts, recorded)
    manifest = build_manifest(backbone, opts.dtype, meta.compressor, meta.tap_compressors)
    return open_split_for_writing(
        out,
        manifest,
        opts.split,
        meta,
        ids=source.ids(),
        resume=opts.resume,
        overwrite=opts.overwrite,
        repair=opts.repair,
        final_norm=backbone.final_norm_state(),
        storage_options=opts.storage_options,
    )


def run_extraction(
    spec: BackboneSpec, data: str | DataSource, out: str, opts: ExtractOptions, runner: ShardRunner
) -> ExtractReport:
    """The one pipeline of every extraction: plan -> lock -> open the split -> run its missing shards -> finalize."""
    keep_freed_memory()  # large activations reuse heap pages instead of faulting fresh ones (allocator.py)
    _check_out(out)
    t0 = time.perf_counter()
    with runtime_settings():
        source = open_split_source(data, opts.limit)
        backbone = Backbone(spec, runner.backbone_device(opts), opts.layers)
        try:
            with SplitLock(out, opts.split, opts.storage_options):
                split, status = open_planned_split(out, backbone, source, opts)
                done = split.completed_shards()
                stats = runner.run(
                    split, backbone, source, [k for k in range(split.meta.num_shards) if not done[k]], opts
                )
                seconds = time.perf_counter() - t0
                totals = finalize_split(split, seconds)
        except OSError as err:  # outside the shard writer: creating the store or split, finalizing, the lock
            what, fix = describe_os_error(err)
            raise StoreError(
                f"cannot write store {out}: {what}; completed shards are kept: {fix}, then run the same "
                "featcache extract command with --resume"
            ) from err
    report = _report(out, split, status, stats, totals, seconds)
    return runner.report(report, stats)


def extract(
    spec: BackboneSpec,
    data: str | DataSource,
    out: str | os.PathLike[str],
    options: ExtractOptions | None = None,
    **overrides: Any,
) -> ExtractReport:
    """One backbone pass over ``data`` into split ``options.split`` of the store ``out``, in this process.

    ``overrides`` replace fields of ``options`` (``extract(spec, data, out, split="val")``).
    Raises featcache errors: ``StoreError`` (refusals leave the store untouched), ``StoreLockedError``,
    ``Interrupted`` (Ctrl-C; completed shards kept, rerun with ``resume=True``).
    """
    return run_extraction(spec, data, str(out), resolve_options(options, overrides), InProcessRunner())


def _report(
    out: str, split: SplitHandle, status: str, stats: ShardRunStats, totals: SplitTotals, seconds: float
) -> ExtractReport:
    manifest = split.store.manifest
    return ExtractReport(
        store=out,
        split=split.name,
        status=status,
        num_samples=split.meta.num_samples,
        views=split.meta.views,
        taps=manifest.tap_names,
        dtype=manifest.dtype,
        compressor=split.meta.compressor,
        shards_total=split.meta.num_shards,
        shards_written=len(stats.shards),
        images_written=stats.images,
        complete=totals.complete,
        nbytes=totals.nbytes,
        stored_bytes=totals.stored_bytes,
        seconds=seconds,
        loop_seconds=stats.seconds,
        forward_seconds=stats.forward_seconds,
        write_seconds=stats.write_seconds,
        startup_seconds=stats.startup_seconds,
        drain_seconds=stats.drain_seconds,
        shards_repaired=list(split.repaired_shards),
    )


__all__ = [
    "ExtractOptions",
    "ExtractReport",
    "InProcessRunner",
    "ShardRunStats",
    "ShardRunner",
    "build_manifest",
    "default_writer_threads",
    "extract",
    "extract_shards",
    "forward_taps",
    "open_planned_split",
    "open_split_source",
    "plan_split",
    "resolve_options",
    "run_extraction",
    "runtime_settings",
]
