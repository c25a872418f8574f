"""Stores written by an earlier featcache (store format 1) still open, verify, read, resume and train."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.extraction import extract
from featcache.manifest import BackboneSpec
from featcache.store.codecs import SCALE_SUFFIX, decode_array
from featcache.store.feature_store import FeatureStore
from featcache.store.reader import open_reader
from featcache.store.verify import verify_store
from featcache.training import train

FIXTURE = Path(__file__).parent / "fixtures" / "format1-stores.tar.gz"
KW = dict(progress=False, loader_workers=0, device="cpu", batch_size=4, durable=False)


@pytest.fixture
def stores(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path


def values(split, tap: str) -> np.ndarray:
    """A tap's float32 values read with plain zarr (the reference decode)."""
    dtype = split.store.manifest.dtype
    scale = split.group[tap + SCALE_SUFFIX][:] if dtype in ("int8", "float8_e4m3") else None
    return decode_array(split.group[tap][:], dtype, scale)


@pytest.mark.parametrize("name", ["float16", "compact"])
def test_old_stores_verify_and_read_the_same_in_every_mode(stores: Path, name: str) -> None:
    store = FeatureStore.open(stores / f"{name}.zarr")
    assert store.manifest.featcache_format == 1 and verify_store(str(stores / f"{name}.zarr")).ok
    split = store.split("train")
    for mode in ("ram", "stream"):
        reader = open_reader(split, split.tap_names, mode, batch_size=5, seed=1)
        batches = list(reader.epoch(0))
        index = torch.cat([b.index for b in batches])
        assert sorted(index.tolist()) == list(range(12))
        for tap in split.tap_names:
            got = torch.cat([b.taps[tap] for b in batches]).numpy()
            assert np.array_equal(got, values(split, tap)[index.numpy()]), (mode, tap)


@pytest.mark.parametrize(
    "name,spec,options", [("float16", {}, {}), ("compact", {"pool_tokens": 2}, {"dtype": "int8", "layers": "every:2"})]
)
def test_todays_extraction_reproduces_the_old_stores(
    stores: Path, tmp_path: Path, name: str, spec: dict, options: dict
) -> None:
    old = FeatureStore.open(stores / f"{name}.zarr").split("train")
    out = tmp_path / "new.zarr"
    extract(
        BackboneSpec("test_vit", {"img_size": 32}, weights="random", **spec),
        "sklearn:digits:train",
        out,
        limit=12,
        **KW,
        **options,
    )
    new = FeatureStore.open(out).split("train")
    assert new.store.manifest.identity() == old.store.manifest.identity()
    for tap in old.tap_names:  # cached == live across versions, to the cache dtype's precision
        np.testing.assert_allclose(
            values(new, tap), values(old, tap), rtol=0.02, atol=0.02 * np.abs(values(old, tap)).max()
        )


def test_an_unfinished_old_split_resumes_with_todays_code(stores: Path, tmp_path: Path) -> None:
    path = stores / "partial.zarr"
    assert FeatureStore.open(path).split("train").completed_shards().tolist() == [True, False, True]
    report = extract(
        BackboneSpec("test_vit", {"img_size": 32}, weights="random"),
        "sklearn:digits:train",
        path,
        limit=12,
        resume=True,
        **KW,
    )
    assert report.status == "resumed" and report.shards_written == 1 and report.complete
    assert verify_store(str(path)).ok
    fresh = tmp_path / "fresh.zarr"
    extract(
        BackboneSpec("test_vit", {"img_size": 32}, weights="random"),
        "sklearn:digits:train",
        fresh,
        limit=12,
        compressor="zstd",
        **KW,
    )
    a, b = FeatureStore.open(path).split("train"), FeatureStore.open(fresh).split("train")
    for tap in a.tap_names:
        assert np.array_equal(values(a, tap), values(b, tap))


def test_an_old_store_trains(stores: Path, tmp_path: Path) -> None:
    summary = train(
        str(stores / "float16.zarr"),
        "linear",
        tmp_path / "run",
        {"epochs": 2, "batch_size": 4},
        progress=False,
        tensorboard=False,
        val_fraction=0.25,
    )
    assert summary["best"]["selected_on"] == "train[held-out]" and 0 <= summary["best"]["test_acc"] <= 1


def test_a_new_split_makes_an_old_store_format_2(stores: Path) -> None:
    """Today's featcache may write format-2 features into the new split: an older featcache must then refuse the
    store rather than misread it; the format-1 splits keep reading as before."""
    path = stores / "float16.zarr"
    extract(
        BackboneSpec("test_vit", {"img_size": 32}, weights="random"),
        "sklearn:digits:test",
        path,
        limit=4,
        split="val",
        **KW,
    )
    store = FeatureStore.open(path)
    assert store.manifest.featcache_format == 2 and store.split("val").meta.compressor == "auto"
    assert store.split("train").meta.compressor == "lz4" and verify_store(str(path)).ok
