"""Tap batches -> whole shards of a split, encoded off the producer's thread.

The backbone's thread only hands batches over (``TapEncoder.put``, a bounded queue). Converting them to the
cache dtype (float16, bfloat16, float32, or 8-bit codes with their scales and quantization error), the NaN/Inf
and overflow check, and filling the shard's buffers happen on the encoder thread; finished shards go on to the
``ShardWriter`` (checksums, compression, files, completion records). Taps on a CUDA device are encoded there
(the kernels are cheap, and 8-bit codes are a quarter of the bytes to copy) and copied to pinned host memory
without blocking the producer; the encoder thread waits for the copy. Batches never cross a shard boundary and
every shard is filled from the same batches in any run, so a resumed extraction is bitwise equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from featcache.errors import TapOverflowError
from featcache.manifest import SplitMeta, TapInfo
from featcache.store.codecs import (
    QERR_SUFFIX,
    SCALE_DTYPE,
    SCALE_SUFFIX,
    TORCH_DTYPES,
    decode,
    decode_scale,
    dequantize,
    is_eight_bit,
    quantize,
    storage_dtype,
)
from featcache.store.reader import PinnedSlots
from featcache.store.work_queue import WorkQueue
from featcache.store.writer import ShardData, ShardWriter

ENCODER_QUEUE = 4  # batches handed over and not yet encoded (bounded memory)


def encode_taps(
    taps: dict[str, torch.Tensor],
    infos: Sequence[TapInfo],
    dtype: str,
    views: int,
    first: int,
    out: dict[str, torch.Tensor] | None = None,
    scale_dtype: str = SCALE_DTYPE,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A batch of taps (B * V, T, C) in the cache ``dtype``, where the taps are: ({array: rows}, {tap: qerr}).

    Rows are (B, [V,] T, C) per tap (8-bit: the codes) and (B, [V,] T) per ``<tap>_scale``; ``qerr`` holds each
    8-bit tap's (sum of squared errors, sum of squares) in float64. ``out``: write the rows into these tensors
    (the shard's buffers) instead of new ones; ``scale_dtype``: the 8-bit scales' type (bfloat16; float16 in
    stores from before). Raises ``TapOverflowError`` for NaN/Inf or a value beyond the
    dtype's range; ``first`` is the split index of the batch's first image, for the message."""
    arrays: dict[str, torch.Tensor] = {}
    qerr: dict[str, torch.Tensor] = {}
    for info in infos:
        name, t = info.name, taps[info.name]
        n = t.shape[0] // views
        src = t.reshape(n, *((views,) if views > 1 else ()), info.tokens, info.channels)  # (n, [V,] T, C)
        if not is_eight_bit(dtype):
            rows = out[name] if out is not None else torch.empty(src.shape, dtype=TORCH_DTYPES[dtype], device=t.device)
            rows.copy_(src)  # one pass: the dtype conversion, into place
            check_finite(name, rows, t, dtype, first)
            arrays[name] = rows
            continue
        x = src.float()
        codes, scale = quantize(x, dtype, scale_dtype)
        check_finite(name, scale, t, dtype, first)  # a float16 scale beyond its range, or NaN/Inf taps
        if out is not None:
            out[name].copy_(codes)
            out[name + SCALE_SUFFIX].copy_(scale)
            codes, scale = out[name], out[name + SCALE_SUFFIX]
        arrays[name], arrays[name + SCALE_SUFFIX] = codes, scale
        err = dequantize(codes, scale, dtype) - x
        qerr[name] = torch.stack([err.double().square().sum(), x.double().square().sum()])
    return arrays, qerr


def check_finite(name: str, stored: torch.Tensor, source: torch.Tensor, dtype: str, first_image: int) -> None:
    """Raise ``TapOverflowError`` when a batch of tap ``name`` holds NaN/Inf once cast to the cache ``dtype``.

    ``stored``: the batch as stored (n, [V,] T, C) in ``dtype``; ``source``: the backbone's tensor before the
    cast; ``first_image``: the split index of the batch's first image. Found at extraction, per batch, so
    that a float16 overflow is reported with its fix instead of as NaN losses at train time.
    """
    lo, hi = torch.aminmax(stored)  # one vectorised pass (isfinite().all() is ~40x slower); NaN propagates
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    rows = (~torch.isfinite(stored)).reshape(stored.shape[0], -1).any(dim=1).nonzero().flatten()  # bad images
    more = f" and {len(rows) - 1} more in its batch" if len(rows) > 1 else ""
    images = f"image {first_image + int(rows[0])}{more}"
    if bool(torch.isfinite(source).all()):
        peak = float(source.abs().max())
        raise TapOverflowError(
            f"tap {name!r} overflows {dtype} at {images}: its values reach {peak:.4g}, beyond {dtype}'s range "
            f"(largest float16: 65504); extract again with --dtype bfloat16 (float32's range in 16 bits) or "
            f"--dtype float32, into a new --out or with --overwrite"
        )
    raise TapOverflowError(
        f"the backbone itself gives NaN or Inf in tap {name!r} at {images} (before any cast to {dtype}); "
        "check the weights (--weights) and those images"
    )


class ShardBuffers:
    """Preallocated arrays (storage dtype) of the shard being filled: one per tap, and with an 8-bit cache its
    scale rows and its quantization error (``<tap>_scale``, ``<tap>_qerr``, featcache.store.codecs)."""

    def __init__(
        self, split_meta: SplitMeta, taps: Sequence[TapInfo], dtype: str, scale_dtype: str = SCALE_DTYPE
    ) -> None:
        self.meta, self.taps, self.dtype, self.scale_dtype = split_meta, list(taps), dtype, scale_dtype
        self.shard: int | None = None
        self.arrays: dict[str, np.ndarray] = {}
        self.filled = 0

    def start(self, shard: int) -> None:
        start, stop = self.meta.shard_bounds(shard)
        lead = (stop - start, *((self.meta.views,) if self.meta.views > 1 else ()))
        self.shard, self.filled, self.arrays = shard, 0, {}
        for t in self.taps:
            self.arrays[t.name] = np.empty((*lead, t.tokens, t.channels), dtype=storage_dtype(self.dtype))
            if is_eight_bit(self.dtype):
                self.arrays[t.name + SCALE_SUFFIX] = np.empty((*lead, t.tokens), dtype=storage_dtype(self.scale_dtype))
                self.arrays[t.name + QERR_SUFFIX] = np.zeros((1, 2), dtype=np.float64)

    def rows(self, offset: int, n: int) -> dict[str, torch.Tensor]:
        """Images [offset, offset + n) of the shard's tap and scale buffers, as tensors viewing them."""
        return {
            name: decode_scale(a[offset : offset + n])
            if name.endswith(SCALE_SUFFIX)
            else decode(a[offset : offset + n], self.dtype)
            for name, a in self.arrays.items()
            if not name.endswith(QERR_SUFFIX)
        }

    def add_qerr(self, qerr: dict[str, torch.Tensor]) -> None:
        for name, sums in qerr.items():
            self.arrays[name + QERR_SUFFIX][0] += sums.cpu().numpy()

    @property
    def full(self) -> bool:
        start, stop = self.meta.shard_bounds(self.shard) if self.shard is not None else (0, 0)
        return self.shard is not None and self.filled == stop - start


def bytes_per_image(infos: Sequence[TapInfo], dtype: str, views: int) -> int:
    """Stored bytes one image's taps take (8-bit: codes and scales)."""
    item = np.dtype(storage_dtype(dtype)).itemsize
    return views * sum(t.tokens * (t.channels * item + (2 if is_eight_bit(dtype) else 0)) for t in infos)


@dataclass
class _Staged:
    """An encoded batch: from a CUDA device on its way to host memory (``slot``'s pinned buffers, ``event``), or
    handed over encoded (no slot, no event)."""

    first: int
    n: int
    arrays: dict[str, torch.Tensor]
    qerr: dict[str, torch.Tensor]
    slot: Any
    event: Any


class TapEncoder(WorkQueue):
    """Fills shards from tap batches on a background thread and submits each full shard to ``writer``.

    ``put(first, taps)`` hands a batch over (blocks while ``ENCODER_QUEUE`` batches wait); an error on the
    encoder thread (an overflow, a failed write) is raised by the next ``put`` or by ``close``. ``close`` encodes
    what is queued and submits the full shards (the last, partial one is dropped); ``abort`` drops the queue."""

    def __init__(
        self,
        meta: SplitMeta,
        infos: Sequence[TapInfo],
        dtype: str,
        writer: ShardWriter,
        labels: np.ndarray,
        ids: list[str],
        scale_dtype: str = SCALE_DTYPE,
    ) -> None:
        self.meta, self.infos, self.dtype, self.writer = meta, list(infos), dtype, writer
        self.labels, self.ids, self.scale_dtype = labels, ids, scale_dtype
        self.buffers = ShardBuffers(meta, infos, dtype, scale_dtype)
        self.bytes_per_image = bytes_per_image(infos, dtype, meta.views)
        self._slots: PinnedSlots | None = None
        caller = torch.get_num_threads()
        super().__init__("featcache-encoder", ENCODER_QUEUE)
        torch.set_num_threads(caller)  # torch takes a new thread's setting as the default for later ones

    def thread_setup(self) -> None:
        torch.get_num_threads()  # torch sets a thread's count lazily, from the process default: do it first
        torch.set_num_threads(1)  # encoding must not start an OpenMP team that competes with the forward

    def put(self, first: int, taps: dict[str, torch.Tensor]) -> int:
        """Hand over a batch of taps (B * V, T, C) of images [first, first + B); returns B."""
        self.raise_error()
        n = next(iter(taps.values())).shape[0] // self.meta.views
        item: Any = (first, n, taps)
        if next(iter(taps.values())).device.type == "cuda":
            item = self._stage(first, n, taps)
        self.submit(item)
        return n

    def put_encoded(self, first: int, arrays: dict[str, torch.Tensor], qerr: dict[str, torch.Tensor]) -> int:
        """Hand over a batch already encoded (``encode_taps``' output, on the CPU), e.g. by a device; returns B."""
        n = len(next(iter(arrays.values())))
        self.submit(_Staged(first, n, arrays, qerr, None, None))
        return n

    def _stage(self, first: int, n: int, taps: dict[str, torch.Tensor]) -> _Staged:
        """Encode on the device, then start the copy into pinned host buffers (the producer does not wait)."""
        if self._slots is None:
            self._slots = PinnedSlots(ENCODER_QUEUE + 2)
        arrays, qerr = encode_taps(taps, self.infos, self.dtype, self.meta.views, first, scale_dtype=self.scale_dtype)
        slot = self._slots.acquire()
        host = {}
        for name, t in arrays.items():
            scale = name.endswith(SCALE_SUFFIX)
            dst = slot(name, tuple(t.shape), np.dtype(storage_dtype(self.scale_dtype if scale else self.dtype)))
            host[name] = decode_scale(dst) if scale else decode(dst, self.dtype)
            host[name].copy_(t, non_blocking=True)
        host_qerr = {name: q.to("cpu", non_blocking=True) for name, q in qerr.items()}
        event = torch.cuda.Event()
        event.record()
        return _Staged(first, n, host, host_qerr, slot, event)

    def handle(self, item: Any) -> None:
        first, n = (item.first, item.n) if isinstance(item, _Staged) else item[:2]
        shard = first // self.meta.shard_images
        if self.buffers.shard != shard:
            self.buffers.start(shard)
        offset = first - self.meta.shard_bounds(shard)[0]
        rows = self.buffers.rows(offset, n)
        if isinstance(item, _Staged):
            if item.event is not None:
                item.event.synchronize()
            for name, t in item.arrays.items():
                rows[name].copy_(t)
            if item.slot is not None:
                self._slots.release(item.slot, None)  # type: ignore[union-attr]
            qerr = item.qerr
        else:
            _, qerr = encode_taps(
                item[2], self.infos, self.dtype, self.meta.views, first, out=rows, scale_dtype=self.scale_dtype
            )
        self.buffers.add_qerr(qerr)
        self.buffers.filled += n
        if self.buffers.full:
            start, stop = self.meta.shard_bounds(shard)
            self.writer.submit(ShardData(shard, self.buffers.arrays, self.labels[start:stop], self.ids[start:stop]))
            self.buffers.shard = None

    def _stop(self) -> None:
        super()._stop()
        if self._slots is not None:
            self._slots.close()


__all__ = ["ENCODER_QUEUE", "ShardBuffers", "TapEncoder", "bytes_per_image", "encode_taps"]
