"""Readers: batches of cached taps for training, at memory speed.

One API, three modes (``open_reader(split, taps, mode=...)``):
- ``gpu``: the split's selected taps loaded once onto the CUDA device as stored (float16, bfloat16,
  float32, or 8-bit codes plus their per-row scales); batches are gathered by index with a per-epoch
  permutation and decoded to the training dtype there.
- ``ram``: the same in host memory (pinned when the batches go to CUDA), decoded per batch on the
  training device: memory is the stored footprint, not float32's.
- ``stream``: for caches larger than memory: blocks (whole shards of the needed taps, or runs of
  whole chunks when shards are big) are read in a random order by background threads (never
  per-sample reads), a window of blocks is shuffled in memory (FFCV-style quasi-random order), so
  memory stays bounded by the window and the prefetch depth.
``auto`` picks gpu when training on CUDA and the taps fit the free GPU memory with a margin, else
ram when they fit the available RAM with a margin, else stream; the choice and its reason are
kept in ``reader.choice`` (``featcache train`` prints them). Every mode yields every completed
sample exactly once per epoch, in an order fixed by (seed, epoch); with several cached views one
view per sample is drawn per epoch, also fixed by (seed, epoch, sample), unless the reader is asked for
one fixed view (``view``, evaluation on the eval view) or for every view (``all_views``, test-time augmentation).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from featcache.errors import CorruptionError, StoreError, UsageError
from featcache.manifest import READER_MODES, STREAM_BUFFER_MB

from .codecs import (
    SCALE_SUFFIX,
    TORCH_DTYPES,
    decode,
    dequantize,
    is_eight_bit,
    scale_torch_dtype,
    storage_numpy_dtype,
    storage_view,
    stored_bytes_per_row,
)
from .feature_store import FeatureStore, SplitHandle

log = logging.getLogger("featcache.reader")
# stream mode reads whole shards (one zarr request each) up to SHARD_BLOCK_BYTES, else runs of whole chunks of
# about BLOCK_BYTES, never more than the shuffle window (docs/readers.md has the measurements behind all this)
SHARD_BLOCK_BYTES = 256 << 20
BLOCK_BYTES = 32 << 20
FIRST_WINDOW_BYTES = 64 << 20  # an epoch's first window: its first batch waits for about this much reading
REMOTE_REQUESTS = 32  # read threads for a remote store: each mostly waits on its request
MEMORY_MARGIN = 0.6  # use at most this share of free GPU memory / available RAM for a resident cache


@dataclass
class Batch:
    """One training batch: tap tensors (B, T, C) in the training dtype, labels (B,), sample indices (B,).

    With ``views`` > 1 (a reader of all cached views, for test-time augmentation) the taps hold every
    view of each sample, (B * V, T, C), the V views of a sample next to each other."""

    taps: dict[str, torch.Tensor]
    labels: torch.Tensor
    index: torch.Tensor
    views: int = 1
    scales: dict[str, torch.Tensor] = field(default_factory=dict)  # undecoded 8-bit batches: each tap's row scales

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class ReaderChoice:
    mode: str
    reason: str
    nbytes: int = 0


@dataclass
class ReaderOptions:
    """What every mode shares; see ``open_reader``."""

    batch_size: int = 32
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    check_finite: bool = True
    subset: np.ndarray | None = None  # only these sample indices (of completed shards); None: all of them
    all_views: bool = False  # every cached view of each sample (evaluation), not one drawn per epoch
    view: int | None = None  # this view of every sample (evaluation on the eval view), not one drawn per epoch
    decode: bool = True  # False: taps as stored (8-bit codes, with their scales in Batch.scales), for own decoding

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.all_views and self.view is not None:
            raise UsageError("a reader gives every view of a sample (all_views) or one fixed view, not both")
        self.device = torch.device(self.device)


# A float is NaN or Inf exactly when its exponent bits are all ones, i.e. when its bits without the
# sign are >= the exponent mask: (integer view, bits without the sign, exponent mask).
_EXPONENT_MASKS = {
    torch.float16: (torch.int16, np.uint16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, np.uint16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF, 0x7F800000),
}


def _all_finite(t: torch.Tensor) -> bool:
    """Whether a CPU float tensor holds no NaN/Inf: an integer test on the bits (far cheaper than isfinite)."""
    if t.dtype not in _EXPONENT_MASKS or t.device.type != "cpu":
        return bool(torch.isfinite(t).all())
    as_int, unsigned, magnitude, exponent = _EXPONENT_MASKS[t.dtype]
    bits = t.contiguous().view(as_int).numpy().view(unsigned).reshape(-1)
    step = 1 << 18  # slices that stay in cache: one pass over the bits, no block-sized temporary
    scratch = np.empty(min(step, len(bits)), dtype=unsigned)
    for i in range(0, len(bits), step):
        part = scratch[: min(step, len(bits) - i)]
        np.bitwise_and(bits[i : i + step], magnitude, out=part)
        if part.max(initial=0) >= exponent:
            return False
    return True


def _check_finite(t: torch.Tensor, split: SplitHandle, tap: str, start: int) -> None:
    if t.dtype.is_floating_point and not _all_finite(t):
        bad = torch.nonzero(~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)).flatten()
        first = start + int(bad[0])
        raise CorruptionError(
            f"tap {tap!r} of split {split.name!r} in {split.store.url} holds NaN/Inf values (first "
            f"at image {first}, "
            f"{len(bad)} image(s) in this block); the backbone diverged on these inputs or the "
            "cache is damaged: re-extract them, or check the inputs"
        )


def _epoch_generator(seed: int, epoch: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7919 + salt) % (2**63 - 1))


def draw_views(num_views: int, index: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The view (0..V-1) each sample uses in this epoch: fixed by (seed, epoch, sample index)."""
    if num_views <= 1:
        return torch.zeros_like(index)
    g = _epoch_generator(seed, epoch, salt=1)
    table = torch.randint(0, num_views, (int(index.max()) + 1,), generator=g)
    return table[index]


class CacheReader:
    """Base: a split's selected taps as batches. Subclasses provide ``_stored_batches(epoch, buffers)``."""

    mode = "base"

    def __init__(self, split: SplitHandle, taps: list[str], options: ReaderOptions) -> None:
        self.split, self.taps, self.options = split, list(taps), options
        for name in self.taps:
            split.store.manifest.tap(name)
        # one snapshot of the completion records: an extraction running meanwhile may complete more shards,
        # which this reader ignores (its sizes, blocks and indices must agree)
        shards = [int(k) for k in np.flatnonzero(split.completed_shards())]
        parts = [np.arange(*split.meta.shard_bounds(k)) for k in shards]
        usable = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if options.subset is not None:
            usable = np.intersect1d(usable, np.asarray(options.subset, dtype=np.int64))
        self.indices = torch.from_numpy(usable)
        self.shards = sorted({int(i) // split.meta.shard_images for i in usable})
        split.require_objects("labels", self.shards)  # a lost labels chunk would read as -1
        if len(self.indices) == 0:
            raise StoreError(
                f"split {split.name!r} of {split.store.url} has no completed shard yet; finish the "
                "extraction (featcache extract --resume) first"
            )
        self.labels_all = torch.from_numpy(split.labels())
        self.views = split.meta.views
        if options.view is not None and not 0 <= options.view < self.views:
            raise UsageError(
                f"view {options.view} does not exist: split {split.name!r} of {split.store.url} holds "
                f"{self.views} view(s) per image"
            )
        self.out_views = self.views if options.all_views else 1  # views per sample in a batch
        self.cache_dtype = split.store.manifest.dtype
        # the stored arrays read per tap: the tap itself, and with an 8-bit cache its per-row scales
        self.arrays = [
            a for t in self.taps for a in ((t, t + SCALE_SUFFIX) if is_eight_bit(self.cache_dtype) else (t,))
        ]
        self.shard_io = split.shard_io
        # (array, first row) of the blocks this reader has checked for NaN/Inf: later epochs skip that pass over
        # memory (the reader reads a snapshot of the split, and every read checks the bytes' crc32c)
        self.checked_finite: set[tuple[str, int]] = set()

    @property
    def num_samples(self) -> int:
        return int(len(self.indices))

    def __len__(self) -> int:
        n, b = self.num_samples, self.options.batch_size
        return n // b if self.options.drop_last else math.ceil(n / b)

    def nbytes(self) -> int:
        """Stored (uncompressed) bytes of the selected taps for the usable samples, all views (8-bit: with scales)."""
        infos = [self.split.store.manifest.tap(t) for t in self.taps]
        per = sum(t.tokens * stored_bytes_per_row(t.channels, self.cache_dtype) for t in infos)
        return per * self.views * self.num_samples

    def order(self, epoch: int) -> torch.Tensor:
        """Sample indices in this epoch's order (resident modes)."""
        if not self.options.shuffle:
            return self.indices
        perm = torch.randperm(len(self.indices), generator=_epoch_generator(self.options.seed, epoch))
        return self.indices[perm]

    def epoch_views(self, epoch: int) -> torch.Tensor | None:
        """The view each usable sample (``self.indices``) gives in this epoch: the fixed ``view``, else one drawn
        per (seed, epoch, sample); None when batches hold every view (or the split has one)."""
        if self.out_views == self.views:
            return None
        if self.options.view is not None:
            return torch.full_like(self.indices, self.options.view)
        return draw_views(self.views, self.indices, self.options.seed, epoch)

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """All usable samples once, in batches; the order depends only on (seed, epoch).

        Batches are assembled on a background thread (row gathers, decoding on a CPU device, pinned staging
        for a CUDA one) and handed over through a short queue, so the training loop's thread only takes them."""
        return self._handed_over(epoch)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def settings(self) -> dict[str, Any]:
        """What this reader was set to, for run summaries (modes with settings add theirs)."""
        return {}

    def _stored_batches(
        self, epoch: int, buffers: "BatchBuffers"
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """(stored rows of ``self.arrays`` in buffers from ``buffers``, sample indices) per batch."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _rows_in(self, start: int, stop: int) -> np.ndarray:
        """The usable sample indices in [start, stop)."""
        idx = self.indices.numpy()
        return idx[np.searchsorted(idx, start) : np.searchsorted(idx, stop)]

    def _row_shape(self, name: str) -> tuple[int, ...]:
        """The shape of one batch row of a stored array: ([V,] T[, C]) with all views, else (T[, C])."""
        shape = tuple(self.split.array(name).shape[1:])
        return shape[1:] if self.views > 1 and self.out_views == 1 else shape

    def _views_of(self, epoch: int) -> np.ndarray | None:
        """Per sample index: this epoch's view (``epoch_views``), when batches hold one view per sample."""
        views = self.epoch_views(epoch)
        if views is None:
            return None
        view_of = np.zeros(self.split.num_samples, dtype=np.int64)
        view_of[self.indices.numpy()] = views.numpy()
        return view_of

    def _to_batch(self, stored: dict[str, torch.Tensor], index: torch.Tensor) -> Batch:
        """Stored rows (``self.arrays``) -> a batch of the training dtype on the training device, decoded there."""
        dev, dt = self.options.device, self.options.dtype
        out, scales = {}, {}
        for name in self.taps:
            codes = stored[name].to(dev, non_blocking=True)  # the stored bytes over the bus, not float32's
            if not self.options.decode:
                out[name] = codes
                if is_eight_bit(self.cache_dtype):
                    scales[name] = stored[name + SCALE_SUFFIX].to(dev, non_blocking=True)
            elif is_eight_bit(self.cache_dtype):
                out[name] = dequantize(
                    codes, stored[name + SCALE_SUFFIX].to(dev, non_blocking=True), self.cache_dtype, dt
                )
            else:
                out[name] = codes if codes.dtype == dt else codes.to(dt)
        if self.out_views > 1:  # (B, V, T, C) -> (B * V, T, C)
            out = {k: v.flatten(0, 1) for k, v in out.items()}
            scales = {k: v.flatten(0, 1) for k, v in scales.items()}
        return Batch(out, self.labels_all[index].to(dev, non_blocking=True), index, self.out_views, scales)

    def _as_tensors(self, stored: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {n: decode(a, _stored_dtype(n, self.cache_dtype, a.dtype)) for n, a in stored.items()}

    def _handed_over(self, epoch: int) -> Iterator[Batch]:
        """Batches assembled on a background thread; on a CUDA device they cross in reused pinned buffers."""
        cuda = self.options.device.type == "cuda"
        batch_bytes = self.nbytes() / max(1, self.num_samples) * self.options.batch_size
        depth = int(max(1, min(HANDOVER_DEPTH, HANDOVER_BYTES // max(1.0, batch_bytes))))  # bounded memory too
        slots = PinnedSlots(depth + 2) if cuda else None

        def assembled() -> Iterator[Any]:
            if slots is None:
                for stored, index in self._stored_batches(epoch, fresh_buffers):
                    yield self._to_batch(self._as_tensors(stored), torch.from_numpy(index))
                return
            slot = slots.acquire()
            for stored, index in self._stored_batches(epoch, slot):
                yield stored, index, slot
                slot = slots.acquire()

        handover = Handover(assembled(), depth, f"featcache-{self.mode}-batches")
        try:
            for item in handover:
                if slots is None:
                    yield item
                    continue
                stored, index, slot = item
                batch = self._to_batch(self._as_tensors(stored), torch.from_numpy(index))
                slots.release(slot, torch.cuda.Event() if torch.cuda.is_available() else None)
                yield batch
        finally:
            if slots is not None:
                slots.close()
            handover.close()

    def as_dataset(self, epoch: int = 0) -> "BatchIterable":
        """A ``torch.utils.data.IterableDataset`` of batches (use ``DataLoader(ds, batch_size=None)``)."""
        return BatchIterable(self, epoch)


# ---------------------------------------------------------------------------------------------
# Handing batches over from the assembling thread


BatchBuffers = Callable[[str, tuple[int, ...], np.dtype], np.ndarray]
HANDOVER_DEPTH = 3  # ready batches queued for the consumer, at most HANDOVER_BYTES of them
HANDOVER_BYTES = 256 << 20


def fresh_buffers(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A new array per batch: batches on the CPU are handed to the caller, who may keep them."""
    return np.empty(shape, dtype=dtype)


class PinnedSlots:
    """Reused pinned host buffers for batches on their way to a CUDA device.

    The assembling thread fills a slot; the consumer copies it to the device (``non_blocking``) and releases it
    with the copy's CUDA event; a slot is filled again only after that event has completed. Pinned memory is
    expensive to allocate, so a few slots are reused rather than one allocated per batch."""

    def __init__(self, count: int, pin: bool = True) -> None:
        self.pin = pin
        self._free: queue.Queue[PinnedSlot | None] = queue.Queue()
        for _ in range(count):
            self._free.put(PinnedSlot(pin))

    def acquire(self) -> "PinnedSlot":
        """A free slot whose last copy has finished; raises ``HandoverClosed`` once ``close`` was called."""
        slot = self._free.get()
        if slot is None:
            self._free.put(None)
            raise HandoverClosed
        slot.wait()
        return slot

    def close(self) -> None:
        """Wake and stop a thread waiting in ``acquire``."""
        self._free.put(None)

    def release(self, slot: "PinnedSlot", event: Any) -> None:
        if event is not None:
            event.record()
        slot.event = event
        self._free.put(slot)


class PinnedSlot:
    """One batch's pinned buffers, grown on demand; callable as ``BatchBuffers``."""

    def __init__(self, pin: bool) -> None:
        self.pin, self.event = pin, None
        self._held: dict[str, torch.Tensor] = {}

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def __call__(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        have = self._held.get(name)
        if have is None or have.numel() < n or storage_view(have).dtype != dtype:
            have = torch.empty(n, dtype=_torch_of(dtype), pin_memory=self.pin)
            self._held[name] = have
        return storage_view(have)[:n].reshape(shape)


def _torch_of(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


class HandoverClosed(Exception):
    """The consumer stopped taking batches."""


class Handover:
    """Runs a generator on a background thread and hands its items over through a bounded queue.

    The thread runs torch ops on one intra-op thread (decoding a batch must not start an OpenMP team that
    competes with the training step); an error there is raised in the consumer; ``close`` stops it early."""

    _END = object()

    def __init__(self, items: Iterator[Any], depth: int, name: str) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        caller, started = torch.get_num_threads(), threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items, started), name=name, daemon=True)
        self._thread.start()
        started.wait()
        torch.set_num_threads(caller)  # torch takes a new thread's setting as the default for later ones

    def _run(self, items: Iterator[Any], started: threading.Event) -> None:
        torch.get_num_threads()  # torch sets a thread's count lazily, from the process default: do it first
        torch.set_num_threads(1)
        started.set()
        try:
            for item in items:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._put(_Failure(err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    def close(self) -> None:
        """Stop the thread (it finishes the read it is waiting for) and drop what it queued."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()


@dataclass
class _Failure:
    error: BaseException


def take_rows(src: np.ndarray, rows: np.ndarray, views: np.ndarray | None, out: np.ndarray) -> None:
    """``out[i] = src[rows[i]]``, or ``src[rows[i], views[i]]`` when one view per sample is drawn from (N, V, ...)."""
    if views is not None:
        rows = rows * src.shape[1] + views
        src = src.reshape(-1, *src.shape[2:])
    np.take(src, rows, axis=0, out=out, mode="clip")  # numpy buffers ``out`` in the default mode: 3-10x slower


def gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of ``t`` (a new tensor); on CPU through ``np.take``, faster than ``index_select``."""
    if t.device.type != "cpu":
        return t.index_select(0, index.to(t.device))
    return decode(np.take(storage_view(t), index.numpy(), axis=0), t.dtype)


def _stored_dtype(array: str, cache_dtype: str, stored: Any) -> torch.dtype:
    """The torch dtype an array of the split is held in: a scale array's scale type (from its stored numpy dtype
    ``stored``: bfloat16, or float16 in older stores), else the cache's stored type."""
    return scale_torch_dtype(stored) if array.endswith(SCALE_SUFFIX) else TORCH_DTYPES[cache_dtype]


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in numpy-allocated memory (huge pages: faster gathers than torch's)."""
    return decode(np.empty(shape, dtype=storage_numpy_dtype(dtype)), dtype)


def read_block(reader: CacheReader, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
    """Stored rows [start, stop) of one array (whole chunks of one shard), checked for NaN/Inf: straight into
    ``out`` through the bulk shard reader where the layout allows, else through zarr."""
    if reader.shard_io.supports(name):
        layout = reader.shard_io.layout(name)
        if out is None:
            out = np.empty((stop - start, *layout.row_shape), dtype=layout.dtype)
        reader.shard_io.read_into(name, start, stop, out)
        rows = out
    else:
        rows = reader.split.read_rows(name, start, stop)
        if out is not None:
            out[...] = rows
            rows = out
    if reader.options.check_finite and (name, start) not in reader.checked_finite:
        _check_finite(decode(rows, _stored_dtype(name, reader.cache_dtype, rows.dtype)), reader.split, name, start)
        reader.checked_finite.add((name, start))
    return rows


class ResidentReader(CacheReader):
    """``ram`` and ``gpu``: the taps loaded once; batches by index gather."""

    def __init__(
        self,
        split: SplitHandle,
        taps: list[str],
        options: ReaderOptions,
        where: str,
        progress: bool = False,
        threads: int = 2,
    ) -> None:
        super().__init__(split, taps, options)
        self.mode = where
        self.host_device = options.device if where == "gpu" else torch.device("cpu")
        pin = where == "ram" and options.device.type == "cuda"
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="featcache-load") as pool:
            self.data = {a: self._load(a, pin, pool) for a in self.arrays}  # as stored
        # position of each usable sample inside the loaded tensors
        self._slot = torch.full((split.num_samples,), -1, dtype=torch.long)
        self._slot[self.indices] = torch.arange(len(self.indices))

    def _load(self, name: str, pin: bool, pool: ThreadPoolExecutor) -> torch.Tensor:
        """(N_usable, [V,] T[, C]) tensor of one stored array, as stored, read shard by shard (threads in parallel)."""
        arr = self.split.array(name)
        shape, dtype = (self.num_samples, *arr.shape[1:]), _stored_dtype(name, self.cache_dtype, arr.dtype)
        out = torch.empty(shape, dtype=dtype, pin_memory=True) if pin else _host_empty(shape, dtype)
        dest, pos, jobs = storage_view(out), 0, []
        for k in self.shards:
            start, stop = self.split.meta.shard_bounds(k)
            rows = self._rows_in(start, stop)
            if len(rows) == stop - start:  # the whole shard, straight into place
                jobs.append(pool.submit(read_block, self, name, start, stop, dest[pos : pos + len(rows)]))
            else:  # a subset: only its rows
                jobs.append(pool.submit(self._load_rows, name, start, stop, rows, dest[pos : pos + len(rows)]))
            pos += len(rows)
        for job in jobs:
            job.result()
        return out.to(self.host_device) if self.host_device.type == "cuda" else out

    def _load_rows(self, name: str, start: int, stop: int, rows: np.ndarray, dest: np.ndarray) -> None:
        dest[...] = read_block(self, name, start, stop)[rows - start]

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        if self.mode == "gpu":  # gathers and decoding are kernels on the device: nothing to hand over
            return self._device_batches(epoch)
        return super().epoch(epoch)

    def _epoch_rows(self, epoch: int) -> Iterator[np.ndarray]:
        order = self.order(epoch).numpy()
        b = self.options.batch_size
        stop = (len(order) // b) * b if self.options.drop_last else len(order)
        for s in range(0, stop, b):
            yield np.sort(order[s : s + b])  # ascending rows: the gather streams through memory

    def _stored_batches(self, epoch: int, buffers: BatchBuffers) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        view_of = self._views_of(epoch)
        held = {name: storage_view(t) for name, t in self.data.items()}
        slot_of = self._slot.numpy()
        for index in self._epoch_rows(epoch):
            slots = slot_of[index]
            views = view_of[index] if view_of is not None else None
            out = {}
            for name, data in held.items():
                out[name] = buffers(name, (len(index), *self._row_shape(name)), data.dtype)
                take_rows(data, slots, views, out[name])
            yield out, index

    def _device_batches(self, epoch: int) -> Iterator[Batch]:
        view_of = self._views_of(epoch)
        views = torch.from_numpy(view_of).to(self.host_device) if view_of is not None else None
        for index in self._epoch_rows(epoch):
            index_t = torch.from_numpy(index)
            slot = self._slot[index_t]
            taps = {}
            for name, data in self.data.items():
                rows = gather(data, slot)  # (B, [V,] T, C)
                if views is not None:
                    rows = rows[torch.arange(len(rows), device=rows.device), views[index_t.to(self.host_device)]]
                taps[name] = rows
            yield self._to_batch(taps, index_t)


@dataclass
class _Block:
    """Stored rows of every array for the usable samples ``index`` of one block; ``buffers``: pooled arrays to
    give back once the block's rows have been gathered into batches."""

    index: np.ndarray
    arrays: dict[str, np.ndarray]
    buffers: list[tuple[tuple[str, int], np.ndarray]] = field(default_factory=list)


class StreamReader(CacheReader):
    """``stream``: blocks of whole chunks in random order, read ahead by threads, shuffled per window."""

    mode = "stream"

    def __init__(
        self,
        split: SplitHandle,
        taps: list[str],
        options: ReaderOptions,
        buffer_mb: float = STREAM_BUFFER_MB,
        prefetch: int | None = None,
        threads: int = 2,
        block_images: int | None = None,
    ) -> None:
        super().__init__(split, taps, options)
        meta = split.meta
        per_image = self.nbytes() / max(1, self.num_samples)
        buffer_bytes = buffer_mb * 2**20
        if block_images is None and per_image * meta.shard_images <= min(SHARD_BLOCK_BYTES, buffer_bytes):
            block_images = meta.shard_images  # one request per shard and array
        elif block_images is None:  # ~BLOCK_BYTES of whole chunks per read, never more than the buffer
            chunks = max(1, int(min(BLOCK_BYTES, buffer_bytes) // max(1.0, per_image * meta.chunk_images)))
            block_images = min(meta.shard_images, chunks * meta.chunk_images)
        self.block_images = block_images
        if self.block_images % meta.chunk_images:
            raise UsageError(
                f"block_images ({self.block_images}) must be a multiple of chunk_images ({meta.chunk_images})"
            )
        self.block_bytes = per_image * self.block_images
        self.window_blocks = max(1, int(buffer_bytes // max(1.0, self.block_bytes)))
        first = max(FIRST_WINDOW_BYTES / max(1.0, self.block_bytes), options.batch_size / self.block_images)
        self.first_window_blocks = min(self.window_blocks, max(1, math.ceil(first)))  # at least one batch
        self.buffer_mb = buffer_mb
        if prefetch is not None and prefetch < 1:
            raise UsageError(f"--prefetch must be >= 1, got {prefetch}")
        self.prefetch = prefetch  # None: adaptive (ReadAhead)
        self.threads = max(1, threads)
        # a remote store's requests mostly wait on the network: more of them in flight than there are cores
        self.io_threads = self.threads if self.shard_io.local else max(self.threads, REMOTE_REQUESTS)
        self.blocks = self._make_blocks()
        self.peak_buffered_images = 0  # for tests and benchmarks: the most images held at once
        self.last_read_ahead: ReadAhead | None = None  # the last epoch's read-ahead, for benchmarks and tests
        self._gatherers: ThreadPoolExecutor | None = None  # the epoch's batch-gathering threads
        self.block_pool: dict[tuple[str, int], list[np.ndarray]] = {}  # (array, rows) -> free block buffers
        self.block_pool_lock = threading.Lock()

    def settings(self) -> dict[str, Any]:
        """What this reader was set to, for run summaries."""
        return {
            "buffer_mb": self.buffer_mb,
            "prefetch": self.prefetch if self.prefetch is not None else "auto",
            "threads": self.threads,
            "io_threads": self.io_threads,
            "block_images": self.block_images,
            "window_blocks": self.window_blocks,
            "first_window_blocks": self.first_window_blocks,
        }

    def _make_blocks(self) -> list[tuple[int, int]]:
        """[start, stop) runs of whole chunks inside completed shards that hold usable samples."""
        out = []
        for k in self.shards:
            start, stop = self.split.meta.shard_bounds(k)
            out += [
                (s, min(s + self.block_images, stop))
                for s in range(start, stop, self.block_images)
                if len(self._rows_in(s, min(s + self.block_images, stop)))
            ]
        return out

    def block_order(self, epoch: int) -> list[tuple[int, int]]:
        if not self.options.shuffle:
            return list(self.blocks)
        perm = torch.randperm(len(self.blocks), generator=_epoch_generator(self.options.seed, epoch, salt=2))
        return [self.blocks[i] for i in perm.tolist()]

    def window_sizes(self, num_blocks: int) -> list[int]:
        """Blocks per window: growing from ``first_window_blocks`` (about FIRST_WINDOW_BYTES, so that the first
        batch waits for one short read, not a whole window) by doubling up to ``window_blocks``."""
        sizes, size, left = [], self.first_window_blocks, num_blocks
        while left > 0:
            sizes.append(min(size, left))
            left -= sizes[-1]
            size = min(self.window_blocks, size * 2)
        return sizes

    def _stored_batches(self, epoch: int, buffers: BatchBuffers) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Each window (plus the samples carried over from the last) is shuffled and cut into batches.

        A batch's rows are copied once, straight from the blocks that hold them (rows sorted by position in
        the window, so that each block fills one contiguous run of the batch); the window is never concatenated.
        """
        gen = _epoch_generator(self.options.seed, epoch, salt=3)
        view_of = self._views_of(epoch)
        b = self.options.batch_size
        carry: _Block | None = None  # samples left over from the last window
        with (
            ReadAhead(self, self.block_order(epoch)) as ahead,
            ThreadPoolExecutor(self.threads, thread_name_prefix="featcache-gather") as gatherers,
        ):
            self.last_read_ahead, self._gatherers = ahead, gatherers
            for window in ahead.windows(self.window_sizes(len(ahead.blocks))):
                parts = ([carry] if carry is not None else []) + window
                index = np.concatenate([p.index for p in parts])
                offsets = np.cumsum([0] + [len(p.index) for p in parts])  # window position of each part's row 0
                self.peak_buffered_images = max(self.peak_buffered_images, len(index))
                perm = (
                    torch.randperm(len(index), generator=gen) if self.options.shuffle else torch.arange(len(index))
                ).numpy()
                emit = (len(index) // b) * b
                for s in range(0, emit, b):
                    sel = np.sort(perm[s : s + b])
                    yield self._gather(parts, offsets, sel, index[sel], view_of, buffers), index[sel]
                rest = np.sort(perm[emit:])
                carry = _Block(index[rest], self._gather(parts, offsets, rest, index[rest], None, fresh_buffers, True))
                ahead.release(window)
            if carry is not None and len(carry.index) and not self.options.drop_last:
                sel = np.arange(len(carry.index))
                yield (
                    self._gather([carry], np.zeros(1, dtype=np.int64), sel, carry.index, view_of, buffers),
                    carry.index,
                )
        self._gatherers = None

    def _gather(
        self,
        parts: list[_Block],
        offsets: np.ndarray,
        sel: np.ndarray,
        index: np.ndarray,
        view_of: np.ndarray | None,
        buffers: BatchBuffers,
        all_views: bool = False,
    ) -> dict[str, np.ndarray]:
        """Rows ``sel`` (sorted window positions) of a window held as consecutive parts, one copy per row; with
        ``view_of`` the epoch's view of each sample. ``all_views``: keep every view (the carried rows)."""
        part_of = np.searchsorted(offsets, sel, side="right") - 1  # non-decreasing, as sel is sorted
        cuts = np.searchsorted(part_of, np.arange(len(parts) + 1))  # sel[cuts[p]:cuts[p + 1]] lie in part p
        views = view_of[index] if view_of is not None and not all_views else None
        out = {}
        for name in self.arrays:
            first = parts[0].arrays[name]
            shape = (len(sel), *(first.shape[1:] if all_views or views is None else first.shape[2:]))
            out[name] = buffers(name, shape, first.dtype)

        def fill(name: str) -> None:
            for p in range(len(parts)):
                lo, hi = cuts[p], cuts[p + 1]
                if hi > lo:
                    take_rows(
                        parts[p].arrays[name],
                        sel[lo:hi] - offsets[p],
                        None if views is None else views[lo:hi],
                        out[name][lo:hi],
                    )

        if self._gatherers is not None and len(self.arrays) > 1:  # arrays in parallel: np.take releases the GIL
            list(self._gatherers.map(fill, self.arrays))
        else:
            for name in self.arrays:
                fill(name)
        return out


class ReadAhead:
    """The blocks of one epoch, read ahead on a thread pool: one task per (block, array), in block order.

    How far ahead: ``prefetch`` blocks when set; else Little's law, measured as the epoch goes: blocks in flight
    beyond the window being consumed = (seconds a block's read takes, submit to done) x (blocks the consumer
    asks for per second of its own work, i.e. excluding the time it waited for a read) + 1, at least 2 and at
    most one window (the memory bound). A slow remote store (long reads) or a fast consumer gets a deeper
    read-ahead; a consumer that does nothing gets the whole window. Block buffers are pooled and reused, across
    epochs too (a fresh 100 MB buffer would fault in every page)."""

    def __init__(self, reader: StreamReader, blocks: list[tuple[int, int]]) -> None:
        self.reader, self.blocks = reader, blocks
        self.pool = ThreadPoolExecutor(reader.io_threads, thread_name_prefix="featcache-read")
        self.pending: collections.deque[tuple[tuple[int, int], dict[str, Future], float]] = collections.deque()
        self.next_block = 0
        self.window_left = 0  # blocks of the current window not taken yet
        self._free, self._lock = reader.block_pool, reader.block_pool_lock  # kept across epochs: no new page faults
        self.read_seconds = 0.0  # summed over taken blocks: submit to done
        self.work_seconds = 0.0  # summed: the consumer's own time between takes (its waits excluded)
        self.taken = 0
        self._last_take: float | None = None
        self.max_ahead_seen = 0

    def __enter__(self) -> "ReadAhead":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    @property
    def depth(self) -> int:
        """Blocks to keep in flight beyond the current window."""
        r = self.reader
        if r.prefetch is not None:
            return r.prefetch
        lo, hi = 2, max(2, r.window_blocks)
        if self.taken < 2:
            return lo
        return int(min(hi, max(lo, math.ceil(self.read_seconds / max(self.work_seconds, 1e-6)) + 1)))

    def _buffer(self, name: str, rows: int) -> np.ndarray | None:
        layout = self.reader.shard_io.layout(name)
        if layout is None:
            return None
        with self._lock:
            free = self._free.get((name, rows))
            if free:
                return free.pop()
        return np.empty((rows, *layout.row_shape), dtype=layout.dtype)

    def release(self, window: list[_Block]) -> None:
        """Give a consumed window's block buffers back for reuse."""
        with self._lock:
            for block in window:
                for key, buf in block.buffers:
                    self._free.setdefault(key, []).append(buf)
                block.buffers.clear()

    def _read(self, name: str, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        buf = self._buffer(name, stop - start)
        rows = read_block(self.reader, name, start, stop, buf)
        usable = self.reader._rows_in(start, stop)
        if len(usable) < stop - start:  # a subset: only its rows (a copy), the buffer goes back at once
            rows = rows[usable - start]
            if buf is not None:
                self.release([_Block(usable, {}, [((name, stop - start), buf)])])
            buf = None
        return rows, buf

    def _top_up(self) -> None:
        while self.next_block < len(self.blocks) and len(self.pending) < self.window_left + self.depth:
            start, stop = self.blocks[self.next_block]
            self.next_block += 1
            futures = {name: self.pool.submit(self._read, name, start, stop) for name in self.reader.arrays}
            self.pending.append(((start, stop), futures, time.perf_counter()))
        self.max_ahead_seen = max(self.max_ahead_seen, len(self.pending) - self.window_left)

    def take(self) -> _Block:
        """The next block in order (waits for its read); keeps the read-ahead topped up."""
        entered = time.perf_counter()
        if self._last_take is not None:
            self.work_seconds += entered - self._last_take
        self._top_up()
        (start, stop), futures, submitted = self.pending.popleft()
        arrays, buffers = {}, []
        for name, future in futures.items():
            rows, buf = future.result()
            arrays[name] = rows
            if buf is not None:
                buffers.append(((name, stop - start), buf))
        now = time.perf_counter()
        self.read_seconds += now - submitted
        self.taken += 1
        self._last_take = now
        self.window_left = max(0, self.window_left - 1)
        self._top_up()
        return _Block(self.reader._rows_in(start, stop), arrays, buffers)

    def windows(self, sizes: list[int]) -> Iterator[list[_Block]]:
        for size in sizes:
            self.window_left = size
            yield [self.take() for _ in range(size)]


class BatchIterable(torch.utils.data.IterableDataset):
    """A reader's epoch as an IterableDataset of ``Batch`` objects, for users with their own loop."""

    def __init__(self, reader: CacheReader, epoch: int = 0) -> None:
        super().__init__()
        self.reader, self.epoch = reader, epoch

    def __iter__(self) -> Iterator[Batch]:
        return self.reader.epoch(self.epoch)

    def __len__(self) -> int:
        return len(self.reader)


class TapDataset(torch.utils.data.Dataset):
    """Map-style dataset of a split's completed images: item i -> ({tap: (T, C) float32 tensor}, label).

    For code that batches and shuffles itself (a ``DataLoader``, PyTorch Lightning); featcache's own readers
    are faster. Reads one chunk at a time and keeps the last one, so in-order access reads each chunk once.
    Picklable: zarr objects are never pickled; a worker process (``spawn`` or ``fork``) reopens the store by
    its URL on first use, so the store must be reachable there (a path or a shared URL, not ``memory://``).
    ``view``: which cached view to return for a split extracted with ``--views``.
    """

    def __init__(self, split: SplitHandle, taps: list[str] | None = None, view: int = 0) -> None:
        self.taps = list(split.tap_names if taps is None else taps)
        for name in self.taps:
            split.tap(name)  # an unknown tap or a damaged array: a StoreError now, not in a worker
        if not 0 <= view < split.meta.views:
            raise UsageError(
                f"view {view} does not exist: split {split.name!r} of {split.store.url} holds "
                f"{split.meta.views} view(s) per image; pass view=0..{split.meta.views - 1}"
            )
        self.url, self.storage_options, self.split_name = split.store.url, split.store.storage_options, split.name
        self.view, self.views, self.cache_dtype = view, split.meta.views, split.store.manifest.dtype
        self.chunk_images, self.num_samples = split.meta.chunk_images, split.num_samples
        self.indices = split.completed_indices()
        self.labels = split.labels()
        self._attach(split)

    def _attach(self, split: SplitHandle | None) -> None:
        self._split, self._pid = split, os.getpid()
        self._lock = threading.Lock()
        self._cached: tuple[int, dict[str, torch.Tensor]] | None = None

    @property
    def split(self) -> SplitHandle:
        """The open split; opened again in a new process (after unpickling or a fork)."""
        if self._split is None or self._pid != os.getpid():
            self._attach(FeatureStore.open(self.url, "r", self.storage_options).split(self.split_name))
        return self._split  # type: ignore[return-value]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_split", "_lock", "_cached", "_pid")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._attach(None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        idx = int(self.indices[i])
        split = self.split
        start = (idx // self.chunk_images) * self.chunk_images
        with self._lock:
            if self._cached is None or self._cached[0] != start:
                stop = min(start + self.chunk_images, self.num_samples)
                self._cached = (start, {t: split.read_values(t, start, stop) for t in self.taps})
            rows = {t: a[idx - start] for t, a in self._cached[1].items()}  # (T, C), or (V, T, C) with views
        out = {t: (a[self.view] if self.views > 1 else a).clone() for t, a in rows.items()}
        return out, int(self.labels[idx])


def choose_mode(mode: str, nbytes: int, device: torch.device) -> ReaderChoice:
    """Resolve ``auto`` (and check explicit modes) against free GPU memory and available RAM; ``nbytes``: the
    stored bytes a resident reader holds."""
    import psutil

    if mode not in READER_MODES:
        raise UsageError(f"--reader must be one of {', '.join(READER_MODES)}, got {mode!r}")
    ram = psutil.virtual_memory().available
    gb = lambda n: f"{n / 2**30:.2f} GB"  # noqa: E731
    if mode == "gpu" and device.type != "cuda":
        raise UsageError("--reader gpu needs --device cuda; use --reader ram or auto on CPU")
    if mode != "auto":
        return ReaderChoice(mode, "asked for", nbytes)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        if nbytes <= MEMORY_MARGIN * free:
            return ReaderChoice("gpu", f"{gb(nbytes)} of taps fit in {gb(free)} of free GPU memory", nbytes)
    if nbytes <= MEMORY_MARGIN * ram:
        return ReaderChoice("ram", f"{gb(nbytes)} of stored taps fit in {gb(ram)} of available RAM", nbytes)
    return ReaderChoice(
        "stream", f"{gb(nbytes)} of stored taps exceed {int(MEMORY_MARGIN * 100)}% of available RAM ({gb(ram)})", nbytes
    )


def open_reader(
    split: SplitHandle,
    taps: list[str],
    mode: str = "auto",
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    drop_last: bool = False,
    check_finite: bool = True,
    progress: bool = False,
    subset: np.ndarray | None = None,
    all_views: bool = False,
    view: int | None = None,
    decode: bool = True,
    **stream_options: Any,
) -> CacheReader:
    """Open a reader over ``split`` for ``taps`` (only these are read); logs the chosen mode and why.

    ``subset``: only these sample indices (e.g. a validation set held out of the split); ``all_views``:
    batches hold every cached view of each sample (``Batch.views``), for test-time augmentation; ``view``: this
    view of every sample (the eval view, for evaluation without it); neither: one view drawn per sample and epoch.
    ``decode=False``: batches hold the taps as stored (float16, bfloat16 or float32 as cached; 8-bit codes with
    their row scales in ``Batch.scales``, decode with ``featcache.store.codecs.dequantize``), for loops that decode
    on their own."""
    options = ReaderOptions(
        batch_size, shuffle, seed, drop_last, torch.device(device), dtype, check_finite, subset, all_views, view, decode
    )
    probe = StreamReader.__new__(StreamReader)
    CacheReader.__init__(probe, split, taps, options)
    choice = choose_mode(mode, probe.nbytes(), options.device)
    log.debug(f"reader: {choice.mode} for split {split.name!r} ({choice.reason})")
    if choice.mode == "stream":
        reader: CacheReader = StreamReader(split, taps, options, **stream_options)
    else:
        reader = ResidentReader(split, taps, options, where=choice.mode, progress=progress)
    reader.choice = choice  # type: ignore[attr-defined]
    return reader
