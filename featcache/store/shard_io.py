"""Shard objects of a split's tap arrays read and written directly: the bulk I/O path of readers and writers.

Hand-written because zarr 3.1 decodes (and encodes) every inner chunk of a shard on its one event-loop thread,
copying each chunk twice, and reads the old shard before a whole-shard write (several times slower than the
same files read or written plainly here; docs/readers.md). This module handles the layout featcache writes and
leaves every other layout to zarr; what it writes is byte for byte what zarr writes (tested):
- a shard object is the Zarr v3 ``sharding_indexed`` codec's: the inner chunks' encoded bytes in order, then the
  index (``(offset, nbytes)`` as little-endian uint64 per chunk, ``2**64 - 1`` for an absent chunk) and the
  index's crc32c; a partial last shard is padded with the fill value, as zarr pads it;
- a chunk's bytes are ``bytes`` (little-endian) -> optional ``blosc`` or ``zstd`` -> ``crc32c``: the checksum of
  every chunk is checked before its rows are used.
On a local store rows are read with ``os.preadv`` (uncompressed chunk bodies land directly in the destination
rows, checksums in a side buffer) and written with ``os.writev`` to a temporary file renamed into place (zarr's
own atomic write); any other zarr store (fsspec URLs, memory) gets one ranged ``get`` per run of chunks and one
``set`` per shard object. Every call is thread-safe, so callers keep several in flight (the syscalls, checksums
and codecs release the GIL).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np
import zarr
from zarr.abc.store import RangeByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from featcache.errors import CorruptionError

if TYPE_CHECKING:
    from .feature_store import SplitHandle

ABSENT = 2**64 - 1  # the sharding index's mark of a chunk that was never written
CRC_BYTES = 4
IOV_MAX = 1024  # buffers per preadv call (Linux)
READ_GROUP_BYTES = 1 << 20  # uncompressed chunks read per preadv: checksummed while still in the CPU's cache


class ChunkDamaged(Exception):
    """A stored object does not decode: checksum mismatch, truncation, or an index that points nowhere."""


def _numcodec(codec: Any) -> Any:
    """The numcodecs codec that decodes the bytes a zarr blosc/zstd codec wrote (zarr wraps the same ones)."""
    import numcodecs

    if isinstance(codec, BloscCodec):
        return numcodecs.Blosc(cname=codec.cname.value, clevel=codec.clevel)
    return numcodecs.Zstd(level=codec.level)


@dataclass(frozen=True)
class ShardLayout:
    """How one array's shards are stored, as far as the bulk reader needs it."""

    path: str  # the array's path in the store ("train/block3")
    rows: int  # the array's length (images)
    shard_rows: int
    chunk_rows: int
    row_shape: tuple[int, ...]
    dtype: np.dtype
    compressor: Any  # a numcodecs codec, or None
    key_of: Any  # shard coordinates -> chunk key
    fill_value: Any = 0

    @cached_property  # read per chunk on the hot path: np.prod costs microseconds a call
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    @cached_property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @cached_property
    def index_bytes(self) -> int:
        return 16 * self.chunks_per_shard + CRC_BYTES

    def key(self, shard: int) -> str:
        return f"{self.path}/{self.key_of((shard,) + (0,) * len(self.row_shape))}"


def shard_layout(arr: zarr.Array) -> ShardLayout | None:
    """The layout of ``arr`` when it is one this module reads (sharded along the image axis only, codecs as
    featcache writes them), else None: the caller reads it with zarr."""
    codecs = arr.metadata.codecs if arr.metadata.zarr_format == 3 else ()
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    shard_shape = tuple(arr.metadata.chunk_grid.chunk_shape)
    inner, index = list(sharding.codecs), list(sharding.index_codecs)
    if (
        sharding.index_location.value != "end"
        or shard_shape[1:] != tuple(arr.shape[1:])
        or tuple(sharding.chunk_shape[1:]) != tuple(arr.shape[1:])
        or shard_shape[0] % sharding.chunk_shape[0]
    ):
        return None
    little = lambda c: isinstance(c, BytesCodec) and (c.endian is None or c.endian.value == "little")  # noqa: E731
    if not (len(index) == 2 and little(index[0]) and isinstance(index[1], Crc32cCodec)):
        return None
    if not (2 <= len(inner) <= 3 and little(inner[0]) and isinstance(inner[-1], Crc32cCodec)):
        return None
    if len(inner) == 3 and not isinstance(inner[1], (BloscCodec, ZstdCodec)):
        return None
    dtype = np.dtype(arr.dtype)
    if dtype.kind not in "fiub":
        return None
    return ShardLayout(
        arr.path,
        int(arr.shape[0]),
        int(shard_shape[0]),
        int(sharding.chunk_shape[0]),
        tuple(int(s) for s in arr.shape[1:]),
        dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype,
        _numcodec(inner[1]) if len(inner) == 3 else None,
        arr.metadata.encode_chunk_key,
        arr.metadata.fill_value,
    )


def _check_crc(body: np.ndarray, crc: np.ndarray, what: str) -> None:
    if google_crc32c.value(body) != int(crc.view("<u4")[0]):
        raise ChunkDamaged(f"crc32c checksum mismatch in {what}")


def _parse_index(raw: np.ndarray, layout: ShardLayout, object_size: int) -> np.ndarray:
    """(chunks_per_shard, 2) uint64 (offset, nbytes) of a shard's index bytes, checked against the object size."""
    if len(raw) != layout.index_bytes:
        raise ChunkDamaged(f"the shard index is truncated ({object_size} bytes in the object)")
    _check_crc(raw[:-CRC_BYTES], raw[-CRC_BYTES:], "the shard index")
    index = raw[:-CRC_BYTES].view("<u8").reshape(-1, 2)
    present = index[:, 0] != ABSENT
    ends = index[present, 0] + index[present, 1]
    if (index[present, 1] < CRC_BYTES).any() or (ends > object_size - layout.index_bytes).any():
        raise ChunkDamaged("the shard index points outside the object (truncated or damaged)")
    return index


def _decode_chunk(layout: ShardLayout, data: np.ndarray, dest: np.ndarray, what: str) -> None:
    """One chunk's stored bytes (``data``, crc32c last) -> ``dest`` (uint8, the chunk's rows that are wanted)."""
    body, crc = data[:-CRC_BYTES], data[-CRC_BYTES:]
    _check_crc(body, crc, what)
    full = layout.chunk_rows * layout.row_bytes
    if layout.compressor is None:
        if len(body) != full:
            raise ChunkDamaged(f"{what} holds {len(body)} bytes, expected {full}")
        dest[:] = body[: len(dest)]
        return
    try:
        if len(dest) == full:
            layout.compressor.decode(body, out=dest)
            return
        dest[:] = np.frombuffer(layout.compressor.decode(body), dtype=np.uint8)[: len(dest)]
    except (RuntimeError, ValueError) as err:
        raise ChunkDamaged(f"{what} does not decompress ({err})") from None


def _write_all(fd: int, pieces: list[np.ndarray]) -> None:
    """``os.writev`` every piece (IOV_MAX at a time), resuming after short writes."""
    todo = [memoryview(p).cast("B") for p in pieces if len(p)]
    while todo:
        written = os.writev(fd, todo[:1024])
        while written:
            if written >= len(todo[0]):
                written -= len(todo.pop(0))
            else:
                todo[0], written = todo[0][written:], 0


def _crc_bytes(body: np.ndarray) -> np.ndarray:
    return np.frombuffer(np.uint32(google_crc32c.value(body)).tobytes(), dtype=np.uint8)


def encode_shard(layout: ShardLayout, rows: np.ndarray) -> list[np.ndarray]:
    """The byte pieces (uint8 arrays, in order) of the shard object holding ``rows`` (a whole shard, or the
    array's partial last one): each chunk's encoded body and crc32c, then the index and its crc32c.
    Uncompressed bodies are views of ``rows``: nothing is copied until the pieces are written."""
    rows = np.ascontiguousarray(rows, dtype=layout.dtype)
    if len(rows) < layout.shard_rows:  # padded to the whole shard, as zarr writes an edge shard
        full = np.full((layout.shard_rows, *layout.row_shape), layout.fill_value, dtype=layout.dtype)
        full[: len(rows)] = rows
        rows = full
    chunks = rows.reshape(layout.chunks_per_shard, -1)
    pieces, index, offset = [], np.empty((layout.chunks_per_shard, 2), dtype="<u8"), 0
    for c in range(layout.chunks_per_shard):
        body = chunks[c]
        if layout.compressor is not None:
            body = np.frombuffer(
                layout.compressor.encode(rows[c * layout.chunk_rows : (c + 1) * layout.chunk_rows]), dtype=np.uint8
            )
        else:
            body = body.view(np.uint8)
        pieces += [body, _crc_bytes(body)]
        index[c] = (offset, len(body) + CRC_BYTES)
        offset += len(body) + CRC_BYTES
    raw = index.view(np.uint8).reshape(-1)
    return pieces + [raw, _crc_bytes(raw)]


class ShardIO:
    """Reads rows of whole chunks of one split's arrays into numpy buffers, and writes whole shard objects;
    thread-safe.

    ``supports(name)`` says whether an array has the layout handled here (else read and write it with zarr).
    Damage (checksum, truncation, a missing or empty object of a completed shard) is a ``CorruptionError``
    worded as the split's own reads word it, naming the array and shard and the repair command.
    """

    def __init__(self, split: "SplitHandle") -> None:
        self.split = split
        store = split.group.store
        self.root = store.root if isinstance(store, zarr.storage.LocalStore) else None
        self.store = store
        self._layouts: dict[str, ShardLayout | None] = {}
        self._index_cache: dict[tuple[str, int], np.ndarray] = {}

    def layout(self, name: str) -> ShardLayout | None:
        if name not in self._layouts:
            self._layouts[name] = shard_layout(self.split.array(name))
        return self._layouts[name]

    def supports(self, name: str) -> bool:
        return self.layout(name) is not None

    @property
    def local(self) -> bool:
        return self.root is not None

    def write(self, name: str, shard: int, rows: np.ndarray) -> None:
        """Write the whole shard object of array ``name`` holding ``rows`` (all rows of the shard), atomically:
        a reader sees the old object or the new one, never a part."""
        layout = self.layout(name)
        assert layout is not None, f"{name} is written with zarr"
        first = shard * layout.shard_rows
        if len(rows) != min(layout.shard_rows, layout.rows - first):
            raise ValueError(
                f"shard {shard} of {name} holds {min(layout.shard_rows, layout.rows - first)} rows, got {len(rows)}"
            )
        if self.store.read_only:
            raise ValueError("store was opened in read-only mode and does not support writing")
        pieces, key = encode_shard(layout, rows), layout.key(shard)
        if self.root is None:
            data = np.concatenate(pieces)
            sync(self.store.set(key, default_buffer_prototype().buffer.from_array_like(data)))
            return
        path = os.path.join(self.root, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.partial"  # the name zarr gives its own temporary files
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            _write_all(fd, pieces)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, path)

    def read_into(self, name: str, start: int, stop: int, out: np.ndarray) -> None:
        """Rows [start, stop) of array ``name`` into ``out`` (C-contiguous, shape (stop - start, *row_shape)).

        ``start`` is a multiple of the chunk rows; [start, stop) lies in one shard, ``stop`` at a chunk boundary
        or the array's end."""
        layout = self.layout(name)
        assert layout is not None, f"{name} is read with zarr"
        shard = start // layout.shard_rows
        if (stop - 1) // layout.shard_rows != shard or start % layout.chunk_rows:
            raise ValueError(f"rows {start}..{stop} of {name} are not whole chunks of one shard")
        dest = out.reshape(-1).view(np.uint8)
        if len(dest) != (stop - start) * layout.row_bytes:
            raise ValueError(f"the buffer for rows {start}..{stop} of {name} has {out.nbytes} bytes")
        try:
            if self.root is not None:
                self._read_local(layout, shard, start, stop, dest)
            else:
                self._read_remote(layout, shard, start, stop, dest)
        except ChunkDamaged as err:
            raise self._damaged(name, shard, start, stop, str(err)) from None
        except FileNotFoundError:
            raise self._damaged(name, shard, start, stop, f"its object {layout.key(shard)} is missing") from None

    def _damaged(self, name: str, shard: int, start: int, stop: int, why: str) -> CorruptionError:
        what = "tap" if name in self.split.store.manifest.tap_names else "array"
        return CorruptionError(
            f"{what} {name!r} of split {self.split.name!r} in {self.split.store.url}: images {start}..{stop - 1} "
            f"(shard {shard}) cannot be read ({why}); run featcache inspect --verify, then featcache extract --resume "
            "--repair to recompute the damaged shards"
        )

    def _chunk_runs(
        self, layout: ShardLayout, shard: int, start: int, stop: int, index: np.ndarray
    ) -> list[tuple[int, int, int]]:
        """(chunk in shard, first wanted row, wanted rows) of the chunks that hold [start, stop)."""
        first = shard * layout.shard_rows
        out = []
        for c in range((start - first) // layout.chunk_rows, -(-(stop - first) // layout.chunk_rows)):
            row = first + c * layout.chunk_rows
            if index[c, 0] == ABSENT:
                raise ChunkDamaged(f"chunk {c} of the shard was never written")
            out.append((c, row, min(layout.chunk_rows, stop - row, layout.rows - row)))
        return out

    # -- local files: pread the index, preadv the chunk bytes
    def _read_local(self, layout: ShardLayout, shard: int, start: int, stop: int, dest: np.ndarray) -> None:
        fd = os.open(os.path.join(self.root, layout.key(shard)), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < layout.index_bytes:
                raise ChunkDamaged(f"the object is truncated ({size} bytes)" if size else "the object is empty")
            raw = np.frombuffer(os.pread(fd, layout.index_bytes, size - layout.index_bytes), dtype=np.uint8)
            index = _parse_index(raw, layout, size)
            chunks = self._chunk_runs(layout, shard, start, stop, index)
            if layout.compressor is None and self._contiguous(index, chunks):
                self._preadv_plain(fd, layout, index, chunks, start, dest)
                return
            lo = int(index[chunks[0][0], 0])
            hi = int(index[chunks[-1][0], 0] + index[chunks[-1][0], 1])
            if any(int(index[c, 0]) < lo or int(index[c, 0] + index[c, 1]) > hi for c, _, _ in chunks):
                lo, hi = min(int(index[c, 0]) for c, _, _ in chunks), max(int(index[c].sum()) for c, _, _ in chunks)
            data = np.frombuffer(os.pread(fd, hi - lo, lo), dtype=np.uint8)
            if len(data) != hi - lo:
                raise ChunkDamaged("the object is truncated")
            self._decode_run(layout, index, chunks, lo, data, start, dest, shard)
        finally:
            os.close(fd)

    @staticmethod
    def _contiguous(index: np.ndarray, chunks: list[tuple[int, int, int]]) -> bool:
        return all(
            int(index[a, 0] + index[a, 1]) == int(index[b, 0]) for (a, _, _), (b, _, _) in zip(chunks, chunks[1:])
        )

    def _preadv_plain(
        self,
        fd: int,
        layout: ShardLayout,
        index: np.ndarray,
        chunks: list[tuple[int, int, int]],
        start: int,
        dest: np.ndarray,
    ) -> None:
        """Uncompressed, consecutive chunks: bodies straight into ``dest``, padding and checksums aside; read in
        groups of about ``READ_GROUP_BYTES``, each group's checksums computed right after its read, while its
        bytes are still in the CPU's cache (one pass over memory instead of two)."""
        full = layout.chunk_rows * layout.row_bytes
        if any(int(index[c, 1]) != full + CRC_BYTES for c, _, _ in chunks):
            raise ChunkDamaged("a chunk of the shard has the wrong size")
        crcs = np.empty((len(chunks), CRC_BYTES), dtype=np.uint8)
        per_group = max(1, min(IOV_MAX // 3, READ_GROUP_BYTES // (full + CRC_BYTES)))
        offset, numbered = int(index[chunks[0][0], 0]), list(enumerate(chunks))
        for g in range(0, len(chunks), per_group):
            group = numbered[g : g + per_group]
            buffers: list[Any] = []
            bodies: list[tuple[np.ndarray, np.ndarray | None]] = []
            for k, (_c, row, n) in group:
                part = dest[(row - start) * layout.row_bytes : (row - start + n) * layout.row_bytes]
                # the array's last chunk is stored whole: its padding rows are read aside
                pad = np.empty(full - len(part), dtype=np.uint8) if n < layout.chunk_rows else None
                buffers += [part, crcs[k]] if pad is None else [part, pad, crcs[k]]
                bodies.append((part, pad))
            want = len(group) * (full + CRC_BYTES)
            if os.preadv(fd, buffers, offset) != want:
                raise ChunkDamaged("the object is truncated")
            offset += want
            for (k, (c, _row, _n)), (part, pad) in zip(group, bodies):
                body = np.concatenate([part, pad]) if pad is not None else part  # the checksum covers the padding
                _check_crc(body, crcs[k], f"chunk {c} of the shard")

    # -- any other zarr store: ranged gets
    def _get(self, key: str, lo: int | None = None, hi: int | None = None) -> np.ndarray:
        byte_range = RangeByteRequest(lo, hi) if lo is not None else None
        buf = sync(self.store.get(key, prototype=default_buffer_prototype(), byte_range=byte_range))
        if buf is None:
            raise FileNotFoundError(key)
        return np.asarray(buf.as_numpy_array()).view(np.uint8)

    def _index(self, layout: ShardLayout, shard: int) -> tuple[np.ndarray, int]:
        """(index, object size) of a shard: fetched once per reader (a reader reads a snapshot of the split)."""
        key = (layout.path, shard)
        if key not in self._index_cache:
            size = sync(self.store.getsize(layout.key(shard)))
            if size < layout.index_bytes:
                raise ChunkDamaged(f"the object is truncated ({size} bytes)" if size else "the object is empty")
            raw = self._get(layout.key(shard), size - layout.index_bytes, size)
            self._index_cache[key] = _parse_index(raw, layout, size)
        return self._index_cache[key]

    def _read_remote(self, layout: ShardLayout, shard: int, start: int, stop: int, dest: np.ndarray) -> None:
        first = shard * layout.shard_rows
        whole = start == first and stop >= min(first + layout.shard_rows, layout.rows)
        if whole and (layout.path, shard) not in self._index_cache:  # one request: the object, its index at the end
            data = self._get(layout.key(shard))
            if len(data) < layout.index_bytes:
                raise ChunkDamaged(
                    f"the object is truncated ({len(data)} bytes)" if len(data) else "the object is empty"
                )
            index = _parse_index(data[-layout.index_bytes :], layout, len(data))
            chunks = self._chunk_runs(layout, shard, start, stop, index)
            self._decode_run(layout, index, chunks, 0, data, start, dest, shard)
            return
        index = self._index(layout, shard)
        chunks = self._chunk_runs(layout, shard, start, stop, index)
        lo = min(int(index[c, 0]) for c, _, _ in chunks)
        hi = max(int(index[c].sum()) for c, _, _ in chunks)
        data = self._get(layout.key(shard), lo, hi)
        if len(data) != hi - lo:
            raise ChunkDamaged("the object is truncated")
        self._decode_run(layout, index, chunks, lo, data, start, dest, shard)

    def _decode_run(
        self,
        layout: ShardLayout,
        index: np.ndarray,
        chunks: list[tuple[int, int, int]],
        lo: int,
        data: np.ndarray,
        start: int,
        dest: np.ndarray,
        shard: int,
    ) -> None:
        for c, row, n in chunks:
            off, nbytes = int(index[c, 0]) - lo, int(index[c, 1])
            part = dest[(row - start) * layout.row_bytes : (row - start + n) * layout.row_bytes]
            _decode_chunk(layout, data[off : off + nbytes], part, f"chunk {c} of the shard")


__all__ = ["ChunkDamaged", "ShardIO", "ShardLayout", "encode_shard", "shard_layout"]
