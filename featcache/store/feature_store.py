"""The on-disk layout of a featcache store and the primitives every writer and reader shares.

A store is a Zarr v3 group (local path or fsspec URL such as ``memory://`` or ``s3://``):

  <root>/                      attrs: the Manifest (see manifest.py)
    _backbone/norm_weight      (C,) float32: the ViT's final LayerNorm, when the backbone has one
    _backbone/norm_bias        (C,) float32
    <split>/                   attrs["featcache_split"]: SplitMeta
      <tap>                    (N, T, C) or, with views > 1, (N, V, T, C); chunks (c, [V,] T, C),
                               shards (s, [V,] T, C); codecs: bytes -> compressor -> crc32c;
                               dimension_names ("image", ["view",] "token", "channel"), where a
                               size that differs between taps gets the tap's name ("stage2_token")
      labels                   (N,) int64, chunks (s,)
      ids                      (N,) string, chunks (s,)
      _complete                (num_shards,) uint8, one chunk per shard: 1 = the shard is written whole
    _locks/<split>.lock        only while an extraction runs (or after a crash): the split's write lock,
                               JSON {pid, host, ...}; not a Zarr node (see featcache.store.lock)

Each shard of images [k*s, (k+1)*s) is written by exactly one writer, all taps, labels and ids,
and only then is ``_complete[k]`` set: readers use completed shards only, and an interrupted
extraction redoes exactly the shards whose record is 0. On local paths the shard's files are
fsync'ed before its completion record is written, so a record survives power loss only together
with its data. Tap, labels, ids and ``_complete`` chunks all end in a crc32c checksum.
"""

from __future__ import annotations

import asyncio
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec
from zarr.core.sync import sync

from featcache.errors import CorruptionError, StoreError
from featcache.manifest import DEFAULT_COMPRESSOR, Manifest, SplitMeta

from . import zarr_shutdown  # noqa: F401  (settles zarr's background tasks at exit)
from .codecs import (
    DECODE_HINTS,
    QERR_SUFFIX,
    SCALE_DTYPE,
    SCALE_DTYPE_ATTR,
    SCALE_SUFFIX,
    check_codecs,
    compressor_codecs,
    decode,
    decode_scale,
    dequantize,
    is_eight_bit,
    scale_dtype_name,
    storage_dtype,
    stored_bytes_per_row,
)
from .lock import LOCKS_DIR

if TYPE_CHECKING:
    from .shard_io import ShardIO

SPLIT_ATTR = "featcache_split"
DTYPE_ATTR = "featcache_dtype"
COMPLETE = "_complete"
BACKBONE_GROUP = "_backbone"
RESERVED = ("labels", "ids", COMPLETE)
TARGET_CHUNK_BYTES = 1 << 20  # ~1 MiB per chunk: a few images; decodes fast, reads in big runs
TARGET_SHARD_BYTES = 128 << 20  # ~128 MiB of all taps per shard: the unit of writing and of resume


def choose_chunking(taps: list[Any], dtype: str, views: int, num_samples: int) -> tuple[int, int]:
    """(chunk_images, shard_images): chunks of ~1 MiB for the largest tap, shards of ~128 MiB of all taps.

    Both are powers of two; shard_images is a multiple of chunk_images and never much larger than the split.
    """
    per_image = [t.tokens * stored_bytes_per_row(t.channels, dtype) * views for t in taps]
    chunk = _pow2_floor(max(1, TARGET_CHUNK_BYTES // max(per_image)))
    chunk = max(1, min(chunk, 64))
    shard = _pow2_floor(max(chunk, TARGET_SHARD_BYTES // sum(per_image)))
    shard = max(chunk, min(shard, 4096, _pow2_ceil(num_samples)))
    chunk = min(chunk, shard)
    return chunk, shard


def tap_dimension_names(taps: list[Any], tap: Any, views: int) -> tuple[str, ...]:
    """``("image", ["view",] "token", "channel")``; a dimension whose size differs between taps (CNN stages)
    is named per tap (``"stage2_token"``), so that xarray can open a split whose taps disagree in size."""
    token = "token" if len({t.tokens for t in taps}) == 1 else f"{tap.name}_token"
    channel = "channel" if len({t.channels for t in taps}) == 1 else f"{tap.name}_channel"
    return ("image", *(("view",) if views > 1 else ()), token, channel)


@dataclass(frozen=True)
class ArraySpec:
    """How one array of a split is laid out (what ``create_split`` makes and ``verify`` checks)."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None
    dtype: str  # zarr dtype; "str" for the ids
    dims: tuple[str, ...]
    compressors: list[Any]
    fill_value: Any = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    per_shard: bool = False  # one row per shard (written with the shard) instead of one per image


def split_array_specs(
    manifest: Manifest, meta: SplitMeta, compressor: str, scale_dtype: str | None = None
) -> dict[str, ArraySpec]:
    """Every array of a split, taps first: a tap (N, [V,] T, C) of the storage dtype; with an 8-bit cache also
    its ``<tap>_scale`` (N, [V,] T) of ``scale_dtype`` (default bfloat16 as uint16 bits; float16 in older splits)
    and ``<tap>_qerr`` (shards, 2) float64; labels, ids, completion."""
    dtype, scale_dtype = manifest.dtype, scale_dtype or SCALE_DTYPE

    def codecs_of(array: str) -> list[Any]:
        """With "auto", the array's recorded choice (none where nothing was recorded)."""
        return compressor_codecs(meta.tap_compressors.get(array, "none") if compressor == "auto" else compressor)

    lead = (meta.views,) if meta.views > 1 else ()
    specs: dict[str, ArraySpec] = {}
    for tap in manifest.taps:
        tail = (*lead, tap.tokens, tap.channels)
        dims = tap_dimension_names(manifest.taps, tap, meta.views)
        attrs = {DTYPE_ATTR: dtype, "tap": tap.to_dict()}
        if is_eight_bit(dtype):
            attrs.update(featcache_scale=tap.name + SCALE_SUFFIX, featcache_decode=DECODE_HINTS[dtype])
        specs[tap.name] = ArraySpec(
            (meta.num_samples, *tail),
            (meta.chunk_images, *tail),
            (meta.shard_images, *tail),
            storage_dtype(dtype),
            dims,
            codecs_of(tap.name),
            attributes=attrs,
        )
        if is_eight_bit(dtype):
            specs[tap.name + SCALE_SUFFIX] = ArraySpec(
                (meta.num_samples, *tail[:-1]),
                (meta.chunk_images, *tail[:-1]),
                (meta.shard_images, *tail[:-1]),
                storage_dtype(scale_dtype),
                dims[:-1],
                codecs_of(tap.name + SCALE_SUFFIX),
                attributes={
                    "featcache_scale_of": tap.name,
                    **({SCALE_DTYPE_ATTR: scale_dtype} if scale_dtype != "float16" else {}),
                },
            )
            specs[tap.name + QERR_SUFFIX] = ArraySpec(
                (meta.num_shards, 2),
                (1, 2),
                None,
                "float64",
                ("shard", "sum"),
                [Crc32cCodec()],
                attributes={"featcache_qerr_of": tap.name, "columns": ["sum of squared errors", "sum of squares"]},
                per_shard=True,
            )
    specs["labels"] = ArraySpec(
        (meta.num_samples,), (meta.shard_images,), None, "int64", ("image",), compressor_codecs("zstd"), fill_value=-1
    )
    specs["ids"] = ArraySpec(
        (meta.num_samples,), (meta.shard_images,), None, "str", ("image",), compressor_codecs("zstd"), fill_value=None
    )
    specs[COMPLETE] = ArraySpec((meta.num_shards,), (1,), None, "uint8", ("shard",), [Crc32cCodec()])
    return specs


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (max(1, n) - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Store and split handles


async def _object_sizes(store: Any, keys: list[str]) -> list[int]:
    """Sizes of stored objects, -1 for a missing one; the requests run concurrently."""

    async def size(key: str) -> int:
        try:
            return int(await store.getsize(key))
        except (FileNotFoundError, KeyError):
            return -1

    return list(await asyncio.gather(*(size(k) for k in keys)))


def _is_url(path: str) -> bool:
    return "://" in path


def open_group(url: str, mode: str, storage_options: dict[str, Any] | None = None) -> zarr.Group:
    """``zarr.open_group`` with featcache's errors: missing stores and files in the way say so."""
    path = str(url)
    if not _is_url(path):
        p = Path(path)
        if p.exists() and not p.is_dir():
            fix = "pass the directory featcache extract wrote" if mode == "r" else "choose another --out path"
            raise StoreError(f"store path {path} is a file, not a Zarr store directory; {fix}")
        if mode == "r" and not p.exists():
            raise StoreError(f"store {path} does not exist; create it with featcache extract --out {path}")
    kwargs: dict[str, Any] = {"mode": mode, "zarr_format": 3}
    if storage_options and _is_url(path):
        kwargs["storage_options"] = storage_options
    try:
        return zarr.open_group(store=path, **kwargs)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise StoreError(
            f"{path} is not a featcache store (no Zarr v3 group there); create one with featcache extract --out {path}"
        ) from None
    except (zarr.errors.ContainsArrayError, ValueError, TypeError, OSError) as err:
        raise StoreError(f"cannot open store {path} ({type(err).__name__}: {err})") from None


class SplitHandle:
    """One split of a store: its arrays, metadata and completion records."""

    def __init__(self, store: "FeatureStore", name: str, group: zarr.Group) -> None:
        self.store, self.name, self.group = store, name, group
        attrs = group.attrs.asdict()
        if SPLIT_ATTR not in attrs:
            raise StoreError(
                f"split {name!r} of {store.url} has no featcache metadata; its creation was interrupted "
                "or it was not written by featcache: rerun featcache extract with --resume (or "
                "--overwrite)"
            )
        try:
            self.meta = SplitMeta.from_attrs(attrs[SPLIT_ATTR])
        except (TypeError, ValueError, AttributeError) as err:
            raise StoreError(
                f"split {name!r} of {store.url} has damaged metadata ({err}); re-extract it with --overwrite"
            ) from None
        self._arrays: dict[str, zarr.Array] = {}
        self.repaired_shards: list[int] = []  # set by extract --resume --repair (featcache.store.repair)
        self._present: set[tuple[str, int]] = set()  # (array, shard) objects found present and non-empty
        self._shard_io: ShardIO | None = None

    def array(self, name: str) -> zarr.Array:
        """An array of the split, its codecs checked once (see ``ALLOWED_CODECS``)."""
        if name not in self._arrays:
            where = f"array {name!r} of split {self.name!r} in {self.store.url}"
            try:
                arr = self.group[name]
            except KeyError:
                raise StoreError(
                    f"{where} is missing; the store is damaged: run featcache inspect --verify, then "
                    "featcache extract --resume --repair (or re-extract)"
                ) from None
            except Exception as err:  # unreadable metadata or an unknown codec  # noqa: BLE001
                raise StoreError(
                    f"{where} has unreadable metadata ({type(err).__name__}: {str(err)[:160]}); the "
                    "store was not written by featcache or is damaged: re-extract it"
                ) from None
            if not isinstance(arr, zarr.Array):
                raise StoreError(f"{where} is a group, not an array; the store is damaged: re-extract it")
            check_codecs(arr, where)
            self._arrays[name] = arr
        return self._arrays[name]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of an array; a failed checksum or an undecodable chunk is a ``CorruptionError``."""
        arr = self.array(name)
        try:
            return arr[slice(start, stop)]
        except (ValueError, OSError, KeyError, RuntimeError, TypeError) as err:
            zarr_shutdown.settle_pending_io()
            last = (stop if stop is not None else arr.shape[0]) - 1
            rows = f"images {start or 0}..{last}"
            if name == COMPLETE:
                rows = f"completion records {start or 0}..{last}"
            elif start is not None:
                rows += f" (shard {start // self.meta.shard_images})"
            what = "tap" if name in self.store.manifest.tap_names else "array"
            raise CorruptionError(
                f"{what} {name!r} of split {self.name!r} in {self.store.url}: {rows} cannot be read "
                f"({type(err).__name__}: {str(err)[:120]}); run featcache inspect --verify, then featcache extract "
                "--resume --repair to recompute the damaged shards"
            ) from None

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of completed shards, whose stored objects must exist (see ``require_objects``)."""
        if name not in self.array_names():
            self.tap(name)  # an unknown tap: StoreError naming the taps
        shards = range(start // self.meta.shard_images, (stop - 1) // self.meta.shard_images + 1)
        self.require_objects(name, shards)
        return self.read(name, start, stop)

    @property
    def num_samples(self) -> int:
        return self.meta.num_samples

    def require_objects(self, name: str, shards: Iterable[int]) -> None:
        """The stored objects of these completed shards must exist and hold bytes: zarr reads a missing or
        empty object as fill values, which would pass for data. Checked once per (array, shard) and process."""
        todo = sorted({int(k) for k in shards} - {k for n, k in self._present if n == name})
        if not todo:
            return
        arr = self.array(name)
        keys = [f"{arr.path}/{arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))}" for k in todo]
        sizes = sync(_object_sizes(self.group.store, keys))  # all requests in flight at once (remote stores)
        for k, key, size in zip(todo, keys, sizes):
            if size <= 0:
                start, stop = self.meta.shard_bounds(k)
                what = "is missing" if size < 0 else "is empty (truncated)"
                raise CorruptionError(
                    f"array {name!r} of split {self.name!r} in {self.store.url}: shard {k} (images {start}..{stop - 1}) "
                    f"is marked complete but its object {key} {what}; run featcache inspect --verify, then featcache "
                    "extract --resume --repair to recompute the damaged shards"
                )
            self._present.add((name, k))

    def tap(self, name: str) -> zarr.Array:
        self.store.manifest.tap(name)  # a clear error for unknown taps
        return self.array(name)

    def labels(self) -> np.ndarray:
        return np.asarray(self.read("labels"), dtype=np.int64)

    def ids(self, start: int | None = None, stop: int | None = None) -> list[str]:
        return [str(v) for v in self.read("ids", start, stop)]

    def completed_shards(self) -> np.ndarray:
        """(num_shards,) bool: shards whose completion record is set."""
        return np.asarray(self.read(COMPLETE), dtype=np.uint8) == 1

    @property
    def complete(self) -> bool:
        return bool(self.completed_shards().all())

    def completed_indices(self) -> np.ndarray:
        """Indices of the images in completed shards (all of them once the split is complete)."""
        done = self.completed_shards()
        if done.all():
            return np.arange(self.num_samples)
        parts = [np.arange(*self.meta.shard_bounds(k)) for k in np.flatnonzero(done)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def decode(self, a: np.ndarray) -> torch.Tensor:
        """Stored rows of a tap array -> a tensor of the stored representation (no copy where possible)."""
        return decode(a, self.store.manifest.dtype)

    def read_values(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) of a tap as float32 values (8-bit codes times their scales)."""
        dtype = self.store.manifest.dtype
        rows = (
            (lambda a: self.read_rows(a, start, stop))
            if start is not None and stop is not None
            else (lambda a: self.read(a, start, stop))
        )
        codes = decode(rows(name), dtype)
        if not is_eight_bit(dtype):
            return codes.float()
        return dequantize(codes, decode_scale(rows(name + SCALE_SUFFIX)), dtype)

    # -- reading with other tools (docs/api.md): a torch Dataset, dask arrays, an xarray Dataset
    @property
    def tap_names(self) -> list[str]:
        """The stored taps, in backbone order."""
        return list(self.store.manifest.tap_names)

    @property
    def classes(self) -> list[str]:
        """Class names by label (empty for unlabelled data)."""
        return list(self.meta.classes)

    def __repr__(self) -> str:
        views = f", {self.meta.views} views" if self.meta.views > 1 else ""
        return (
            f"<SplitHandle {self.name!r} of {self.store.url}: {self.num_samples} images{views}, "
            f"{len(self.meta.classes)} classes, taps {', '.join(self.tap_names)}>"
        )

    # -- writing (one writer per shard; see featcache.store.writer)
    def write_shard(self, shard: int, taps: dict[str, np.ndarray], labels: np.ndarray, ids: list[str]) -> None:
        """Write all arrays of one whole shard (``taps``: every tap array, and with an 8-bit cache its scale rows
        and its one quantization-error row). The completion record is set separately, last."""
        start, stop = self.meta.shard_bounds(shard)
        n = stop - start
        if len(labels) != n or len(ids) != n:
            raise StoreError(
                f"shard {shard} of split {self.name!r} needs {n} labels and ids, got {len(labels)}, {len(ids)}"
            )
        for name in self.tap_array_names():
            a = taps[name]
            rows = (shard, shard + 1) if name.endswith(QERR_SUFFIX) else (start, stop)
            if a.shape[0] != rows[1] - rows[0]:
                raise StoreError(f"shard {shard}: array {name} has {a.shape[0]} rows, expected {rows[1] - rows[0]}")
            if self.shard_io.supports(name):  # the shard object written directly, as zarr would write it
                self.shard_io.write(name, shard, a)
            else:
                self._writable(name)[rows[0] : rows[1]] = a
        self._writable("labels")[start:stop] = np.asarray(labels, dtype=np.int64)
        self._writable("ids")[start:stop] = np.asarray(ids, dtype=str)

    @property
    def shard_io(self) -> "ShardIO":
        """Direct reads and writes of this split's shard objects (featcache.store.shard_io)."""
        if self._shard_io is None:
            from .shard_io import ShardIO

            self._shard_io = ShardIO(self)
        return self._shard_io

    def _writable(self, name: str) -> zarr.Array:
        # every chunk is stored, even one equal to the fill value (e.g. labels -1 of unlabelled images):
        # a completed shard always has its objects, so a missing one means lost data
        return self.array(name).with_config({"write_empty_chunks": True})

    def set_complete(self, shard: int, done: bool = True) -> None:
        self._writable(COMPLETE)[shard] = 1 if done else 0

    @property
    def scale_dtype(self) -> str | None:
        """The type of an 8-bit split's row scales as stored: "bfloat16", or "float16" in splits written before
        bfloat16 scales; None for other caches."""
        if not is_eight_bit(self.store.manifest.dtype):
            return None
        return scale_dtype_name(self.array(self.store.manifest.tap_names[0] + SCALE_SUFFIX).dtype)

    def tap_array_names(self) -> list[str]:
        """The arrays that hold the taps: each tap, and with an 8-bit cache its ``_scale`` and ``_qerr`` arrays."""
        suffixes = ("", SCALE_SUFFIX, QERR_SUFFIX) if is_eight_bit(self.store.manifest.dtype) else ("",)
        return [t + suffix for t in self.store.manifest.tap_names for suffix in suffixes]

    def array_names(self) -> list[str]:
        """All arrays of the split: the tap arrays, then labels, ids and the completion records."""
        return [*self.tap_array_names(), "labels", "ids", COMPLETE]

    def shard_keys(self, shard: int) -> dict[str, str]:
        """{array name: store key (relative to the store root)} of every object that holds ``shard``."""
        keys = {}
        for name in self.array_names():
            arr = self.array(name)
            coords = (shard,) + (0,) * (arr.ndim - 1)
            keys[name] = f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"
        return keys


class FeatureStore:
    """An open featcache store: manifest, splits and the ViT's final norm."""

    def __init__(
        self, url: str, group: zarr.Group, manifest: Manifest, storage_options: dict[str, Any] | None = None
    ) -> None:
        self.url, self.group, self.manifest, self.storage_options = url, group, manifest, storage_options

    @classmethod
    def open(
        cls, url: str | os.PathLike[str], mode: str = "r", storage_options: dict[str, Any] | None = None
    ) -> "FeatureStore":
        """Open an existing store (``mode`` "r" or "r+"); checks the format version."""
        url = str(url)
        group = open_group(url, mode, storage_options)
        attrs = group.attrs.asdict()
        if "featcache_format" not in attrs:
            raise StoreError(f"{url} is a Zarr group but not a featcache store (no featcache_format attribute)")
        return cls(url, group, Manifest.from_attrs(attrs, f"store {url}"), storage_options)

    @classmethod
    def exists(cls, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> bool:
        try:
            cls.open(url, "r", storage_options)
            return True
        except StoreError:
            return False

    @classmethod
    def create(
        cls,
        url: str | os.PathLike[str],
        manifest: Manifest,
        final_norm: dict[str, torch.Tensor] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> "FeatureStore":
        """Create a new store root (refuses to write into a non-empty directory that is not a featcache store)."""
        url = str(url)
        if not _is_url(url) and Path(url).is_dir():
            if (Path(url) / "zarr.json").exists():
                raise StoreError(f"{url} already holds a Zarr store; open it instead of creating it")
            if any(p.name != LOCKS_DIR for p in Path(url).iterdir()):
                raise StoreError(f"{url} is a non-empty directory that is not a featcache store; choose another --out")
        elif not _is_url(url) and Path(url).exists():
            raise StoreError(f"store path {url} is a file, not a Zarr store directory; choose another --out path")
        manifest.final_norm = final_norm is not None
        try:  # never mode "w": that would delete the lock files of the extraction creating the store
            group = zarr.create_group(
                url,
                zarr_format=3,
                overwrite=False,
                attributes=manifest.to_attrs(),
                storage_options=storage_options if _is_url(url) else None,
            )
        except zarr.errors.ContainsGroupError:
            raise StoreError(f"{url} already holds a Zarr store; open it instead of creating it") from None
        except (zarr.errors.ContainsArrayError, ValueError, TypeError, OSError) as err:
            raise StoreError(f"cannot create store {url} ({type(err).__name__}: {err})") from None
        store = cls(url, group, manifest, storage_options)
        if final_norm is not None:
            store.write_final_norm(final_norm)
        return store

    def write_final_norm(self, final_norm: dict[str, torch.Tensor]) -> None:
        """(Re)write the ViT's final LayerNorm arrays (at creation; after a crash or damage, by the extraction
        that resumes or repairs the store, whose backbone the manifest check has shown to be the same)."""
        sub = self.group.require_group(BACKBONE_GROUP)
        for key in ("weight", "bias"):
            v = final_norm[key].detach().cpu().float().numpy()
            arr = sub.create_array(
                f"norm_{key}",
                shape=v.shape,
                dtype="float32",
                chunks=v.shape,
                compressors=[Crc32cCodec()],
                dimension_names=("channel",),
                overwrite=True,
            )
            arr[:] = v

    def final_norm_readable(self) -> bool:
        """Whether the final norm arrays the manifest promises are there and pass their checksums."""
        try:
            self.final_norm()
            return True
        except StoreError:
            return False

    def __repr__(self) -> str:
        model = self.manifest.backbone.get("spec", {}).get("model", "?")
        return (
            f"<FeatureStore {self.url}: {model}, {len(self.manifest.taps)} taps ({self.manifest.dtype}), "
            f"splits {', '.join(self.splits()) or 'none'}>"
        )

    def splits(self) -> list[str]:
        with warnings.catch_warnings():  # the _locks directory of a running extraction is not a Zarr node
            warnings.filterwarnings("ignore", message=f"Object at {LOCKS_DIR} is not recognized")
            # a temporary file of a write in progress (another process extracting into this store)
            warnings.filterwarnings("ignore", message=r"Object at \S+\.partial is not recognized")
            return sorted(name for name, _ in self.group.groups() if not name.startswith("_"))

    def split(self, name: str) -> SplitHandle:
        if name not in self.splits():
            have = ", ".join(self.splits()) or "none"
            raise StoreError(
                f"store {self.url} has no split {name!r} (splits: {have}); extract it with "
                f"featcache extract ... --out {self.url} --split {name}"
            )
        return SplitHandle(self, name, self.group[name])

    def final_norm(self) -> dict[str, torch.Tensor] | None:
        """The ViT's final LayerNorm {weight, bias}, or None when the backbone has none."""
        if not self.manifest.final_norm:
            return None
        out = {}
        for k in ("weight", "bias"):
            try:
                arr = self.group[f"{BACKBONE_GROUP}/norm_{k}"]
                check_codecs(arr, f"array {BACKBONE_GROUP}/norm_{k} of {self.url}")
                out[k] = torch.from_numpy(np.asarray(arr[:]))
            except StoreError:
                raise
            except Exception as err:  # missing (a crash while creating the store) or damaged  # noqa: BLE001
                zarr_shutdown.settle_pending_io()
                raise CorruptionError(
                    f"the backbone's final norm ({BACKBONE_GROUP}/norm_{k}) in {self.url} cannot be "
                    f"read ({type(err).__name__}: {str(err)[:120]}); run featcache extract --resume "
                    "--repair on this store"
                ) from None
        return out

    def create_split(
        self, name: str, meta: SplitMeta, compressor: str = DEFAULT_COMPRESSOR, overwrite: bool = False
    ) -> SplitHandle:
        """Create a split's arrays (all zero, no shard complete). One process does this, then shards are filled."""
        if name.startswith("_") or not name or "/" in name:
            raise StoreError(f"split name {name!r} is not allowed: use letters, digits, '-' or '.' (not a leading '_')")
        if name in self.splits() and not overwrite:
            raise StoreError(
                f"split {name!r} already exists in {self.url}; pass --resume to continue it or "
                "--overwrite to replace it"
            )
        clash = [
            t.name for t in self.manifest.taps if t.name in RESERVED or t.name.endswith((SCALE_SUFFIX, QERR_SUFFIX))
        ]
        if clash:
            raise StoreError(f"tap name {clash[0]!r} clashes with a reserved array name")
        group = self.group.create_group(name, overwrite=True)
        for array, spec in split_array_specs(self.manifest, meta, compressor).items():
            group.create_array(
                array,
                shape=spec.shape,
                dtype=str if spec.dtype == "str" else spec.dtype,
                chunks=spec.chunks,
                shards=spec.shards,
                compressors=spec.compressors,
                dimension_names=spec.dims,
                attributes=spec.attributes,
                **({} if spec.fill_value is None else {"fill_value": spec.fill_value}),
            )
        meta.compressor = compressor
        group.attrs[SPLIT_ATTR] = meta.to_attrs()
        return SplitHandle(self, name, group)


def open_store(url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """Open a featcache store for reading (a local path or an fsspec URL): ``store.splits()``,
    ``store.split(name)`` -> ``SplitHandle`` (``.dataset()``, ``.to_dask()``, ``.to_xarray()``); docs/api.md."""
    return FeatureStore.open(url, "r", storage_options)
