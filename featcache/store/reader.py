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
view per sample is drawn per epoch, also fixed by (seed, epoch, sample).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from featcache.errors import CorruptionError, StoreError, UsageError
from featcache.vocabulary import READER_MODES

from .codecs import (SCALE_SUFFIX, TORCH_DTYPES, decode, dequantize, is_eight_bit, scale_torch_dtype,
                     storage_numpy_dtype, storage_view, stored_bytes_per_row)
from .feature_store import FeatureStore, SplitHandle

log = logging.getLogger("featcache.reader")
# stream mode reads whole shards (one zarr request each) up to SHARD_BLOCK_BYTES, else runs of whole chunks of
# about BLOCK_BYTES, never more than the shuffle window (docs/readers.md has the measurements behind all this)
SHARD_BLOCK_BYTES = 256 << 20
BLOCK_BYTES = 32 << 20
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

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        self.device = torch.device(self.device)


# A float is NaN or Inf exactly when its exponent bits are all ones, i.e. when its bits without the
# sign are >= the exponent mask: (integer view, bits without the sign, exponent mask).
_EXPONENT_MASKS = {torch.float16: (torch.int16, np.uint16, 0x7FFF, 0x7C00),
                   torch.bfloat16: (torch.int16, np.uint16, 0x7FFF, 0x7F80),
                   torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF, 0x7F800000)}


def _all_finite(t: torch.Tensor) -> bool:
    """Whether a CPU float tensor holds no NaN/Inf: an integer test on the bits (far cheaper than isfinite)."""
    if t.dtype not in _EXPONENT_MASKS or t.device.type != "cpu":
        return bool(torch.isfinite(t).all())
    as_int, unsigned, magnitude, exponent = _EXPONENT_MASKS[t.dtype]
    bits = t.contiguous().view(as_int).numpy().view(unsigned)
    return bool((bits & magnitude).max(initial=0) < exponent)


def _check_finite(t: torch.Tensor, split: SplitHandle, tap: str, start: int) -> None:
    if t.dtype.is_floating_point and not _all_finite(t):
        bad = torch.nonzero(~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)).flatten()
        first = start + int(bad[0])
        raise CorruptionError(f"tap {tap!r} of split {split.name!r} in {split.store.url} holds NaN/Inf values (first "
                              f"at image {first}, "
                              f"{len(bad)} image(s) in this block); the backbone diverged on these inputs or the "
                              "cache is damaged: re-extract them, or check the inputs")


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
    """Base: a split's selected taps as batches. Subclasses provide ``_batches(epoch)``."""

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
            raise StoreError(f"split {split.name!r} of {split.store.url} has no completed shard yet; finish the "
                             "extraction (featcache extract --resume) first")
        self.labels_all = torch.from_numpy(split.labels())
        self.views = split.meta.views
        self.out_views = self.views if options.all_views else 1  # views per sample in a batch
        self.cache_dtype = split.store.manifest.dtype
        # the stored arrays read per tap: the tap itself, and with an 8-bit cache its per-row scales
        self.arrays = [a for t in self.taps for a in ((t, t + SCALE_SUFFIX) if is_eight_bit(self.cache_dtype) else (t,))]

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

    def epoch(self, epoch: int = 0) -> Iterator[Batch]:
        """All usable samples once, in batches; the order depends only on (seed, epoch)."""
        return self._batches(epoch)

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch(0)

    def settings(self) -> dict[str, Any]:
        """What this reader was set to, for run summaries (modes with settings add theirs)."""
        return {}

    def _batches(self, epoch: int) -> Iterator[Batch]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _rows_in(self, start: int, stop: int) -> np.ndarray:
        """The usable sample indices in [start, stop)."""
        idx = self.indices.numpy()
        return idx[np.searchsorted(idx, start):np.searchsorted(idx, stop)]

    def _to_batch(self, stored: dict[str, torch.Tensor], index: torch.Tensor) -> Batch:
        """Stored rows (``self.arrays``) -> a batch of the training dtype on the training device, decoded there."""
        dev, dt = self.options.device, self.options.dtype
        out = {}
        for name in self.taps:
            codes = stored[name].to(dev, non_blocking=True)  # the stored bytes over the bus, not float32's
            if is_eight_bit(self.cache_dtype):
                out[name] = dequantize(codes, stored[name + SCALE_SUFFIX].to(dev, non_blocking=True), self.cache_dtype, dt)
            else:
                out[name] = codes if codes.dtype == dt else codes.to(dt)
        if self.out_views > 1:  # (B, V, T, C) -> (B * V, T, C)
            out = {k: v.flatten(0, 1) for k, v in out.items()}
        return Batch(out, self.labels_all[index].to(dev, non_blocking=True), index, self.out_views)

    def as_dataset(self, epoch: int = 0) -> "BatchIterable":
        """A ``torch.utils.data.IterableDataset`` of batches (use ``DataLoader(ds, batch_size=None)``)."""
        return BatchIterable(self, epoch)


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


class ResidentReader(CacheReader):
    """``ram`` and ``gpu``: the taps loaded once; batches by index gather."""

    def __init__(self, split: SplitHandle, taps: list[str], options: ReaderOptions, where: str, progress: bool = False) -> None:
        super().__init__(split, taps, options)
        self.mode = where
        self.host_device = options.device if where == "gpu" else torch.device("cpu")
        pin = where == "ram" and options.device.type == "cuda"
        self.data = {a: self._load(a, pin, progress) for a in self.arrays}  # as stored
        # position of each usable sample inside the loaded tensors
        self._slot = torch.full((split.num_samples,), -1, dtype=torch.long)
        self._slot[self.indices] = torch.arange(len(self.indices))

    def _load(self, name: str, pin: bool, progress: bool) -> torch.Tensor:
        """(N_usable, [V,] T[, C]) tensor of one stored array, as stored, filled shard by shard."""
        arr = self.split.array(name)
        shape, dtype = (self.num_samples, *arr.shape[1:]), _stored_dtype(name, self.cache_dtype, arr.dtype)
        out = torch.empty(shape, dtype=dtype, pin_memory=True) if pin else _host_empty(shape, dtype)
        pos = 0
        for k in self.shards:
            start, stop = self.split.meta.shard_bounds(k)
            block = decode(self.split.read_rows(name, start, stop), dtype)
            rows = self._rows_in(start, stop)
            if len(rows) < len(block):  # a subset: only its rows
                block = block[torch.from_numpy(rows - start)]
            if self.options.check_finite:
                _check_finite(block, self.split, name, start)
            out[pos:pos + len(block)] = block
            pos += len(block)
        return out.to(self.host_device) if self.host_device.type == "cuda" else out

    def _batches(self, epoch: int) -> Iterator[Batch]:
        order = self.order(epoch)
        b = self.options.batch_size
        stop = (len(order) // b) * b if self.options.drop_last else len(order)
        views = draw_views(self.views, self.indices, self.options.seed, epoch) if self.out_views < self.views else None
        for s in range(0, stop, b):
            index = order[s:s + b].sort().values  # ascending rows: the gather streams through memory
            slot = self._slot[index]
            taps = {}
            for name, data in self.data.items():
                rows = gather(data, slot)  # (B, [V,] T, C)
                if views is not None:
                    v = views[slot].to(self.host_device)
                    rows = rows[torch.arange(len(rows), device=rows.device), v]
                taps[name] = rows
            yield self._to_batch(taps, index)


class StreamReader(CacheReader):
    """``stream``: blocks of whole chunks in random order, read ahead by threads, shuffled per window."""

    mode = "stream"

    def __init__(self, split: SplitHandle, taps: list[str], options: ReaderOptions, buffer_mb: float = 512.0,
                 prefetch: int = 2, threads: int = 2, block_images: int | None = None) -> None:
        super().__init__(split, taps, options)
        meta = split.meta
        per_image = self.nbytes() / max(1, self.num_samples)
        buffer_bytes = buffer_mb * 2**20
        if block_images is None and per_image * meta.shard_images <= min(SHARD_BLOCK_BYTES, buffer_bytes):
            block_images = meta.shard_images  # one zarr request per shard and tap
        elif block_images is None:  # ~BLOCK_BYTES of whole chunks per read, never more than the buffer
            chunks = max(1, int(min(BLOCK_BYTES, buffer_bytes) // max(1.0, per_image * meta.chunk_images)))
            block_images = min(meta.shard_images, chunks * meta.chunk_images)
        self.block_images = block_images
        if self.block_images % meta.chunk_images:
            raise UsageError(f"block_images ({self.block_images}) must be a multiple of chunk_images ({meta.chunk_images})")
        self.window_blocks = max(1, int(buffer_bytes // max(1.0, per_image * self.block_images)))
        self.buffer_mb = buffer_mb
        self.prefetch = max(1, prefetch)
        self.threads = max(1, threads)
        self.blocks = self._make_blocks()
        self.peak_buffered_images = 0  # for tests and benchmarks: the most images held at once

    def settings(self) -> dict[str, Any]:
        """What this reader was set to, for run summaries."""
        return {"buffer_mb": self.buffer_mb, "prefetch": self.prefetch, "threads": self.threads,
                "block_images": self.block_images, "window_blocks": self.window_blocks}

    def _make_blocks(self) -> list[tuple[int, int]]:
        """[start, stop) runs of whole chunks inside completed shards that hold usable samples."""
        out = []
        for k in self.shards:
            start, stop = self.split.meta.shard_bounds(k)
            out += [(s, min(s + self.block_images, stop)) for s in range(start, stop, self.block_images)
                    if len(self._rows_in(s, min(s + self.block_images, stop)))]
        return out

    def _read_block(self, block: tuple[int, int]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(usable sample indices, their stored rows (numpy, stored dtype)) of one block, checked for NaN/Inf."""
        start, stop = block
        rows = self._rows_in(start, stop)
        out = {}
        for name in self.arrays:
            a = self.split.read_rows(name, start, stop)
            if len(rows) < stop - start:  # a subset: only its rows
                a = a[rows - start]
            if self.options.check_finite:
                _check_finite(decode(a, _stored_dtype(name, self.cache_dtype, a.dtype)), self.split, name, start)
            out[name] = a
        return rows, out

    def block_order(self, epoch: int) -> list[tuple[int, int]]:
        if not self.options.shuffle:
            return list(self.blocks)
        perm = torch.randperm(len(self.blocks), generator=_epoch_generator(self.options.seed, epoch, salt=2))
        return [self.blocks[i] for i in perm.tolist()]

    def _windows(self, blocks: list[tuple[int, int]]) -> Iterator[tuple[np.ndarray, list[dict[str, np.ndarray]]]]:
        """(sample indices, blocks' rows) of consecutive windows of blocks; threads read ahead in block order."""
        with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="featcache-read") as pool:
            ahead = iter(blocks)
            futures: list[Future] = [pool.submit(self._read_block, b)
                                     for b in itertools.islice(ahead, self.prefetch + self.window_blocks)]
            for w in range(0, len(blocks), self.window_blocks):
                window = blocks[w:w + self.window_blocks]
                indices, parts = [], []
                for _ in window:
                    rows, part = futures.pop(0).result()
                    indices.append(rows)
                    parts.append(part)
                    nxt = next(ahead, None)
                    if nxt is not None:
                        futures.append(pool.submit(self._read_block, nxt))
                yield np.concatenate(indices), parts

    def _batches(self, epoch: int) -> Iterator[Batch]:
        """Each window (plus the samples carried over from the last) is shuffled and cut into batches.

        All data movement is numpy: a batch's rows are copied once, straight from the blocks that hold
        them (rows sorted by position inside the batch, so each block fills one contiguous run); only the
        batch handed out becomes a torch tensor. The window itself is never concatenated.
        """
        gen = _epoch_generator(self.options.seed, epoch, salt=3)
        view_of = None
        if self.out_views < self.views:
            view_of = np.zeros(self.split.num_samples, dtype=np.int64)
            view_of[self.indices.numpy()] = draw_views(self.views, self.indices, self.options.seed, epoch).numpy()
        b = self.options.batch_size
        carry_index, carry = np.zeros(0, dtype=np.int64), None  # samples left over from the last window
        for index, parts in self._windows(self.block_order(epoch)):
            if carry is not None:
                index, parts = np.concatenate([carry_index, index]), [carry] + parts
            offsets = np.cumsum([0] + [len(p[self.arrays[0]]) for p in parts])  # window position of each part's row 0
            self.peak_buffered_images = max(self.peak_buffered_images, len(index))
            perm = (torch.randperm(len(index), generator=gen) if self.options.shuffle else torch.arange(len(index))).numpy()
            emit = (len(index) // b) * b
            for s in range(0, emit, b):
                sel = np.sort(perm[s:s + b])
                yield self._window_batch(parts, offsets, sel, index[sel], view_of)
            rest = np.sort(perm[emit:])
            carry_index, carry = index[rest], _gather_rows(parts, offsets, rest, self.arrays)
        if carry is not None and len(carry_index) and not self.options.drop_last:
            yield self._window_batch([carry], np.zeros(1, dtype=np.int64), np.arange(len(carry_index)), carry_index, view_of)

    def _window_batch(self, parts: list[dict[str, np.ndarray]], offsets: np.ndarray, sel: np.ndarray,
                      index: np.ndarray, view_of: np.ndarray | None) -> Batch:
        """The batch of window positions ``sel`` (sorted); ``index``: their sample indices."""
        rows = _gather_rows(parts, offsets, sel, self.arrays)
        if view_of is not None:  # (B, V, ...) -> (B, ...): this epoch's view of each sample
            rows = {n: t[np.arange(len(index)), view_of[index]] for n, t in rows.items()}
        stored = {n: decode(t, _stored_dtype(n, self.cache_dtype, t.dtype)) for n, t in rows.items()}
        return self._to_batch(stored, torch.from_numpy(index))


def _part_cuts(parts: list[dict[str, np.ndarray]], offsets: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """sel[cuts[p]:cuts[p + 1]] are the (sorted) window positions that lie in part p."""
    part_of = np.searchsorted(offsets, sel, side="right") - 1  # non-decreasing, as sel is sorted
    return np.searchsorted(part_of, np.arange(len(parts) + 1))


def _gather_rows(parts: list[dict[str, np.ndarray]], offsets: np.ndarray, sel: np.ndarray,
                 taps: list[str]) -> dict[str, np.ndarray]:
    """Rows ``sel`` (sorted window positions) of a window held as consecutive parts, one copy per row."""
    cuts = _part_cuts(parts, offsets, sel)
    out = {}
    for name in taps:
        first = parts[0][name]
        dst = np.empty((len(sel),) + first.shape[1:], dtype=first.dtype)
        for p in range(len(parts)):
            lo, hi = cuts[p], cuts[p + 1]
            if hi > lo:
                np.take(parts[p][name], sel[lo:hi] - offsets[p], axis=0, out=dst[lo:hi])
        out[name] = dst
    return out


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
            raise UsageError(f"view {view} does not exist: split {split.name!r} of {split.store.url} holds "
                             f"{split.meta.views} view(s) per image; pass view=0..{split.meta.views - 1}")
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
    return ReaderChoice("stream", f"{gb(nbytes)} of stored taps exceed {int(MEMORY_MARGIN * 100)}% of available RAM "
                        f"({gb(ram)})", nbytes)


def open_reader(split: SplitHandle, taps: list[str], mode: str = "auto", batch_size: int = 32, shuffle: bool = True,
                seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                drop_last: bool = False, check_finite: bool = True, progress: bool = False,
                subset: np.ndarray | None = None, all_views: bool = False, **stream_options: Any) -> CacheReader:
    """Open a reader over ``split`` for ``taps`` (only these are read); logs the chosen mode and why.

    ``subset``: only these sample indices (e.g. a validation set held out of the split); ``all_views``:
    batches hold every cached view of each sample (``Batch.views``), for test-time augmentation."""
    options = ReaderOptions(batch_size, shuffle, seed, drop_last, torch.device(device), dtype, check_finite, subset,
                            all_views)
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
