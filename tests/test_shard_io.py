"""The bulk shard reader gives exactly what zarr gives, for every layout featcache writes, local and remote, and
refuses damaged bytes with the store's own error."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from featcache.errors import CorruptionError
from featcache.manifest import Manifest, SplitMeta, TapInfo
from featcache.store.feature_store import FeatureStore, SplitHandle
from featcache.store.shard_io import ShardIO

N, CHUNK, SHARD = 45, 4, 16  # 3 shards, the last one partial; chunks of 4, the array's last chunk padded
RUNS = [(0, 16), (16, 32), (32, 45), (4, 12), (36, 45), (40, 45), (20, 24)]


def make_split(url: str, compressor: str, dtype: str, views: int = 1) -> SplitHandle:
    taps = [TapInfo("a", 0, 0, 5, 1, 7, (2, 2), "none"), TapInfo("b", 1, 1, 5, 1, 3, (2, 2), "none")]
    store = FeatureStore.create(url, Manifest(backbone={}, taps=taps, dtype=dtype))
    meta = SplitMeta(num_samples=N, chunk_images=CHUNK, shard_images=SHARD, views=views, classes=["x"])
    split = store.create_split("train", meta, compressor)
    rng = np.random.default_rng(0)
    lead = (views,) if views > 1 else ()
    for k in range(meta.num_shards):
        s, e = meta.shard_bounds(k)
        data = {}
        for t in taps:
            values = rng.standard_normal((e - s, *lead, 5, t.channels)) * 20
            data[t.name] = values.astype(np.int8 if dtype == "int8" else np.float16)
            if dtype == "int8":
                data[t.name + "_scale"] = rng.standard_normal((e - s, *lead, 5)).astype(np.float16)
                data[t.name + "_qerr"] = np.zeros((1, 2))
        split.write_shard(k, data, np.zeros(e - s, dtype=np.int64), [str(i) for i in range(s, e)])
        split.set_complete(k)
    return FeatureStore.open(url).split("train")


@pytest.mark.parametrize("compressor", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("dtype,views", [("float16", 1), ("int8", 1), ("float16", 3)])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_rows_equal_zarr(tmp_path: Path, compressor: str, dtype: str, views: int, where: str) -> None:
    url = str(tmp_path / "s.zarr") if where == "local" else f"memory://{uuid.uuid4().hex}.zarr"
    split = make_split(url, compressor, dtype, views)
    reader = ShardIO(split)
    assert reader.local == (where == "local")
    arrays = [n for n in split.tap_array_names() if not n.endswith("_qerr")]
    assert all(reader.supports(n) for n in arrays) and not reader.supports("labels")
    for name in arrays:
        want = split.array(name)[:]
        for start, stop in RUNS:
            out = np.full((stop - start, *want.shape[1:]), 99, dtype=want.dtype)
            reader.read_into(name, start, stop, out)
            assert np.array_equal(out, want[start:stop]), (name, start, stop)


def test_runs_must_be_whole_chunks_of_one_shard(tmp_path: Path) -> None:
    split = make_split(str(tmp_path / "s.zarr"), "none", "float16")
    reader = ShardIO(split)
    with pytest.raises(ValueError, match="not whole chunks of one shard"):
        reader.read_into("a", 2, 8, np.empty((6, 5, 7), np.float16))
    with pytest.raises(ValueError, match="not whole chunks of one shard"):
        reader.read_into("a", 12, 20, np.empty((8, 5, 7), np.float16))


def _shard_file(split: SplitHandle, name: str, shard: int) -> Path:
    return Path(split.store.url) / split.shard_keys(shard)[name]


@pytest.mark.parametrize("compressor", ["none", "lz4"])
def test_every_damaged_byte_is_a_named_corruption_error(tmp_path: Path, compressor: str) -> None:
    split = make_split(str(tmp_path / "s.zarr"), compressor, "float16")
    path = _shard_file(split, "a", 2)  # the last shard: partial, its last chunk padded
    original = path.read_bytes()
    index = 4 * 16 + 4  # (offset, nbytes) per chunk and the index's crc32c, at the end of the object
    for at in sorted({*range(0, len(original), 5), *range(len(original) - index - 8, len(original))}):
        for damaged in (original[:at] + bytes([original[at] ^ 0xFF]) + original[at + 1 :], original[:at]):
            path.write_bytes(damaged)
            with pytest.raises(
                CorruptionError, match=r"tap 'a' of split 'train' .*\(shard 2\) cannot be read.*--repair"
            ):
                ShardIO(split).read_into("a", 32, 45, np.empty((13, 5, 7), np.float16))
    path.unlink()
    with pytest.raises(CorruptionError, match=r"shard 2\) cannot be read \(its object .* is missing\)"):
        ShardIO(split).read_into("a", 32, 45, np.empty((13, 5, 7), np.float16))


def test_reads_in_groups_check_every_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Uncompressed chunks are read a group at a time (one chunk per group here): same rows as zarr, and a
    damaged chunk in a later group is still refused."""
    import featcache.store.shard_io as shard_io

    monkeypatch.setattr(shard_io, "READ_GROUP_BYTES", 1)
    split = make_split(str(tmp_path / "s.zarr"), "none", "float16")
    want = split.array("a")[:]
    for start, stop in RUNS:
        out = np.full((stop - start, *want.shape[1:]), 99, dtype=want.dtype)
        ShardIO(split).read_into("a", start, stop, out)
        assert np.array_equal(out, want[start:stop]), (start, stop)
    path = _shard_file(split, "a", 2)
    data = bytearray(path.read_bytes())
    data[3 * (4 * 5 * 7 * 2 + 4) + 1] ^= 0xFF  # inside the 4th (last, padded) chunk of the shard
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match=r"chunk 3 of the shard"):
        ShardIO(split).read_into("a", 32, 45, np.empty((13, 5, 7), np.float16))


@pytest.mark.parametrize("compressor", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("dtype,views", [("float16", 1), ("int8", 1), ("float16", 3)])
def test_written_objects_are_zarrs_byte_for_byte(tmp_path: Path, compressor: str, dtype: str, views: int) -> None:
    ours = make_split(str(tmp_path / "ours.zarr"), compressor, dtype, views)  # write_shard: shard_io
    make_split(str(tmp_path / "zarr.zarr"), compressor, dtype, views)
    theirs = FeatureStore.open(str(tmp_path / "zarr.zarr"), "r+").split("train")
    for name in [n for n in theirs.tap_array_names() if not n.endswith("_qerr")]:
        values = theirs.array(name)[:]
        for k in range(theirs.meta.num_shards):  # rewrite each shard through zarr itself
            s, e = theirs.meta.shard_bounds(k)
            theirs._writable(name)[s:e] = values[s:e]
        for k in range(theirs.meta.num_shards):
            assert _shard_file(ours, name, k).read_bytes() == _shard_file(theirs, name, k).read_bytes(), (name, k)


def test_writes_to_remote_stores_read_back(tmp_path: Path) -> None:
    split = make_split(f"memory://{uuid.uuid4().hex}.zarr", "lz4", "int8")
    assert not split.shard_io.local
    local = make_split(str(tmp_path / "l.zarr"), "lz4", "int8")
    for name in ("a", "a_scale", "b"):
        assert np.array_equal(split.array(name)[:], local.array(name)[:])
