"""The store writer: round trips of taps, refusals that leave the store untouched, URL stores, plain readers."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from featcache.errors import StoreError, StoreLockedError
from featcache.store.codecs import decode, encode
from featcache.store.feature_store import COMPLETE, FeatureStore
from featcache.store.lock import SplitLock
from featcache.store.verify import verify_store

from .conftest import TINY_CNN, TINY_VIT
from .helpers.stores import assert_same_arrays, hash_tree, read_split, reference_taps, run_extract


def test_float32_taps_round_trip_bitwise(images: Path, tmp_path: Path) -> None:
    report = run_extract(images, tmp_path / "s.zarr", dtype="float32")
    assert report.complete and report.num_samples == 24 and report.shards_total == 6 == report.shards_written
    ref = reference_taps(TINY_VIT, images, batch_size=4, shard_images=4)
    split = FeatureStore.open(tmp_path / "s.zarr").split("train")
    assert split.store.manifest.tap_names == list(ref)
    for name, want in ref.items():
        got = split.decode(split.tap(name)[:])
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.equal(got, want), name
    labels = split.labels()
    assert labels.tolist() == [0] * 8 + [1] * 8 + [2] * 8  # ImageFolder order: class by class
    assert split.ids()[0] == "class_0/img_0000.png" and split.completed_shards().all()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_round_trips(images: Path, tmp_path: Path, dtype: str) -> None:
    run_extract(images, tmp_path / "s.zarr", dtype=dtype)
    ref = reference_taps(TINY_VIT, images, batch_size=4, shard_images=4)
    split = FeatureStore.open(tmp_path / "s.zarr").split("train")
    arr = split.tap("block3")
    assert str(arr.dtype) == ("uint16" if dtype == "bfloat16" else "float16")
    assert arr.attrs["featcache_dtype"] == dtype
    got = split.decode(arr[:])
    assert got.dtype == getattr(torch, dtype)
    want = decode(encode(ref["block3"], dtype), dtype)  # the cast the writer must apply, nothing else
    assert torch.equal(got, want)
    assert torch.allclose(got.float(), ref["block3"], atol=0.05, rtol=0.02)


def test_cnn_taps_round_trip_and_chunking(images: Path, tmp_path: Path) -> None:
    report = run_extract(
        images, tmp_path / "s.zarr", spec=TINY_CNN, dtype="float32", chunk_images=None, shard_images=None
    )
    split = FeatureStore.open(tmp_path / "s.zarr").split("train")
    meta = split.meta
    assert meta.shard_images % meta.chunk_images == 0 and meta.shard_images >= 24  # one shard: a small split
    ref = reference_taps(TINY_CNN, images, batch_size=4, shard_images=meta.shard_images)
    for name, want in ref.items():
        arr = split.tap(name)
        assert arr.chunks == (meta.chunk_images, *want.shape[1:]) and arr.shards == (meta.shard_images, *want.shape[1:])
        assert torch.equal(split.decode(arr[:]), want), name
    assert report.taps == list(ref)


def test_codec_chain_has_checksum_and_compressor(images: Path, tmp_path: Path) -> None:
    for compressor in ("none", "lz4", "zstd"):
        out = tmp_path / f"{compressor}.zarr"
        run_extract(images, out, compressor=compressor, limit=8)
        arr = FeatureStore.open(out).split("train").tap("block1")
        sharding = arr.metadata.codecs[0].to_dict()
        inner = [c["name"] for c in sharding["configuration"]["codecs"]]
        assert inner[-1] == "crc32c"
        assert inner[1:-1] == {"none": [], "lz4": ["blosc"], "zstd": ["zstd"]}[compressor]
        assert FeatureStore.open(out).split("train").meta.compressor == compressor


def test_existing_split_is_refused_and_untouched(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    run_extract(images, out)
    before = hash_tree(out)
    with pytest.raises(StoreError, match="already exists.*--resume.*--overwrite"):
        run_extract(images, out)
    assert hash_tree(out) == before
    with pytest.raises(Exception, match="exclude each other"):
        run_extract(images, out, resume=True, overwrite=True)
    assert hash_tree(out) == before


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(spec=TINY_CNN), "model"),
        (dict(spec={**TINY_VIT, "seed": 1}), "weights"),
        (dict(layers=[0, 6]), "taps"),
        (dict(dtype="float32"), "dtype"),
    ],
)
def test_incompatible_store_is_refused_and_untouched(images: Path, tmp_path: Path, change: dict, match: str) -> None:
    out = tmp_path / "s.zarr"
    run_extract(images, out)
    before = hash_tree(out)
    with pytest.raises(StoreError, match=f"made with {match}.*new --out"):
        run_extract(images, out, split="val", **change)
    assert hash_tree(out) == before


def test_resume_with_another_plan_is_refused(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    run_extract(images, out, limit=12)
    before = hash_tree(out)
    with pytest.raises(StoreError, match="cannot resume.*limit"):
        run_extract(images, out, limit=16, resume=True)
    with pytest.raises(StoreError, match="cannot resume.*compressor"):
        run_extract(images, out, limit=12, resume=True, compressor="zstd")
    assert hash_tree(out) == before


def test_store_path_that_is_a_file(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "not-a-store"
    out.write_bytes(b"precious")
    with pytest.raises(StoreError, match="is a file"):
        run_extract(images, out)
    assert out.read_bytes() == b"precious"


def test_non_store_directory_is_refused(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "dir"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="non-empty directory"):
        run_extract(images, out)
    assert hash_tree(out) == {"notes.txt": hash_tree(out / "notes.txt")["notes.txt"]}


def test_locked_split_is_refused_and_untouched(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    run_extract(images, out, limit=8)
    with SplitLock(out, "train"):  # another writer (this process, another lock handle) holds the split
        before = hash_tree(out)
        with pytest.raises(StoreLockedError, match=r"being written by process \d+ on host"):
            run_extract(images, out, limit=8, resume=True)
        assert hash_tree(out) == before
    run_extract(images, out, limit=8, resume=True)  # released: fine
    assert not (out / "_locks").exists()


def test_overwrite_replaces_the_split(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    run_extract(images, out, limit=8)
    report = run_extract(images, out, limit=12, overwrite=True)
    assert report.status == "replaced"
    split = FeatureStore.open(out).split("train")
    assert split.num_samples == 12 and split.complete


def test_second_split_in_same_store(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    run_extract(images, out, limit=12)
    run_extract(images, out, split="val", limit=6, compressor="zstd")
    store = FeatureStore.open(out)
    assert store.splits() == ["train", "val"]
    assert store.split("val").num_samples == 6 and store.split("val").meta.compressor == "zstd"
    assert store.final_norm() is not None and store.final_norm()["weight"].shape == (64,)


def test_memory_url_store(images: Path) -> None:
    url = f"memory://featcache-test-{uuid.uuid4().hex}"
    report = run_extract(images, url, limit=12)
    assert report.complete
    split = FeatureStore.open(url).split("train")
    assert split.complete and split.tap("block2").shape == (12, 5, 64)
    assert verify_store(url).ok
    with SplitLock(url, "train"):  # the URL lock: a live owner is refused
        with pytest.raises(StoreLockedError):
            run_extract(images, url, limit=12, resume=True)
    assert run_extract(images, url, limit=12, resume=True).shards_written == 0


def test_plain_zarr_dask_and_xarray_read_the_store(images: Path, tmp_path: Path) -> None:
    import dask.array as da
    import xarray as xr

    out = tmp_path / "s.zarr"
    run_extract(images, out, dtype="float32", limit=12)
    ref = read_split(out)
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["featcache_format"] == 2 and "train" in group
    assert np.array_equal(group["train/block4"][:], ref["block4"])
    assert group["train/block4"].metadata.dimension_names == ("image", "token", "channel")
    lazy = da.from_zarr(str(out), component="train/block4")
    assert lazy.chunks[0][0] == 2 and np.array_equal(lazy.compute(), ref["block4"])
    ds = xr.open_zarr(str(out), group="train", consolidated=False)
    assert ds["block4"].dims == ("image", "token", "channel") and ds.sizes["image"] == 12
    assert np.array_equal(ds["block4"].values, ref["block4"]) and np.array_equal(ds["labels"].values, ref["labels"])


def test_xarray_opens_cnn_split_with_taps_of_different_sizes(images: Path, tmp_path: Path) -> None:
    import xarray as xr

    out = tmp_path / "s.zarr"
    run_extract(images, out, spec=TINY_CNN, limit=6, views=2)
    ds = xr.open_zarr(str(out), group="train", consolidated=False)
    assert ds["stage2"].dims == ("image", "view", "stage2_token", "stage2_channel")
    assert ds["head"].shape[:2] == (6, 2)


def test_completion_records_follow_shards(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    run_extract(images, out)
    split = FeatureStore.open(out).split("train")
    assert split.group[COMPLETE].shape == (6,) and split.completed_indices().tolist() == list(range(24))
    keys = split.shard_keys(2)
    assert keys["block1"] == "train/block1/c/2/0/0" and keys[COMPLETE] == "train/_complete/c/2"
    assert all((out / k).is_file() for k in keys.values())


def test_several_writer_threads_give_the_same_store(images: Path, tmp_path: Path) -> None:
    run_extract(images, tmp_path / "one.zarr", dtype="float32", writer_threads=1)
    run_extract(images, tmp_path / "three.zarr", dtype="float32", writer_threads=3)
    assert_same_arrays(read_split(tmp_path / "one.zarr"), read_split(tmp_path / "three.zarr"))


def test_writer_failure_is_reported_and_keeps_earlier_shards(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import featcache.store.writer as writer_module

    real = writer_module.write_complete_shard

    def flaky(split, data, durable=True):  # noqa: ANN001, ANN202
        if data.shard == 2:
            raise OSError(28, "No space left on device")
        return real(split, data, durable)

    monkeypatch.setattr(writer_module, "write_complete_shard", flaky)
    out = tmp_path / "s.zarr"
    with pytest.raises(StoreError, match="writing to .* failed.*No space left"):
        run_extract(images, out)
    done = FeatureStore.open(out).split("train").completed_shards()
    assert done[:2].all() and not done[2] and not (out / "_locks").exists()


def test_bad_split_names_are_refused_before_anything_is_written(images: Path, tmp_path: Path) -> None:
    for name in ("_store", "a/b", ""):
        with pytest.raises(Exception, match="is not allowed"):
            run_extract(images, tmp_path / "s.zarr", split=name)
    assert not (tmp_path / "s.zarr").exists()


def test_auto_compressor_compresses_only_what_lz4_shrinks() -> None:
    from featcache.store.codecs import auto_compressors

    rng = np.random.default_rng(0)
    dense = rng.standard_normal((8, 49, 64)).astype(np.float16)
    relu = np.maximum(dense, 0) * (rng.random((8, 49, 64)) < 0.2)  # mostly zeros, as after a ReLU
    assert auto_compressors(
        {"dense": dense, "relu": relu.astype(np.float16), "codes": (dense * 40).astype(np.int8)}
    ) == {"dense": "none", "relu": "lz4", "codes": "none"}


def test_auto_compressor_choice_is_recorded_applied_and_kept_on_resume(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import featcache.extraction as extraction

    monkeypatch.setattr(extraction, "probe_compressors", lambda *a, **kw: {"embed": "lz4", "block3": "none"})
    out = tmp_path / "s.zarr"
    run_extract(images, out, limit=12, layers=[0, 3])
    split = FeatureStore.open(out).split("train")
    assert split.meta.compressor == "auto" and split.meta.tap_compressors == {"embed": "lz4", "block3": "none"}
    assert [c.to_dict()["name"] for c in split.array("embed").metadata.codecs[0].codecs] == ["bytes", "blosc", "crc32c"]
    assert [c.to_dict()["name"] for c in split.array("block3").metadata.codecs[0].codecs] == ["bytes", "crc32c"]
    monkeypatch.setattr(extraction, "probe_compressors", lambda *a, **kw: pytest.fail("resume must not probe again"))
    report = run_extract(images, out, limit=12, layers=[0, 3], resume=True)
    assert report.complete and verify_store(str(out)).ok
