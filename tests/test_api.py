"""The Python API (docs/api.md): lazy top-level names, a split as a torch Dataset, dask arrays and an xarray
Dataset equal to the stored arrays, and every example of docs/api.md run as written."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import featcache
from featcache.errors import CorruptionError, MissingDependencyError, StoreError, UsageError
from featcache.store import TapDataset, split_to_dask, split_to_xarray
from featcache.store.feature_store import FeatureStore, SplitHandle

from .helpers.stores import run_extract, shard_file

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "api.md"
N = 24  # the ``images`` fixture; run_extract writes 6 shards of 4 images


# -- featcache: light import, lazy names ---------------------------------------------------------


def test_import_featcache_loads_nothing_heavy_and_every_name_resolves() -> None:
    code = """
import json, sys
import featcache
light = [m for m in ("torch", "timm", "zarr", "dask", "featcache.store") if m in sys.modules]
names = sorted(featcache.__all__)
in_dir = all(n in dir(featcache) for n in names)
import featcache.extraction as ex, featcache.infer as inf, featcache.training as tr, featcache.manifest as voc
import featcache.store.feature_store as fs
same = {"open_store": featcache.open_store is fs.open_store, "load_predictor": featcache.load_predictor is inf.load_predictor,
        "BackboneSpec": featcache.BackboneSpec is voc.BackboneSpec, "ExtractOptions": featcache.ExtractOptions is ex.ExtractOptions,
        "TrainOptions": featcache.TrainOptions is tr.TrainOptions,
        "extract": featcache.extract is ex.extract, "train": featcache.train is tr.train}
try:
    featcache.no_such_name
    missing = "no error"
except AttributeError as err:
    missing = str(err)
print(json.dumps({"light": light, "names": names, "in_dir": in_dir, "same": same, "missing": missing}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["light"] == []
    assert got["names"] == sorted(
        ["open_store", "extract", "train", "load_predictor", "BackboneSpec", "ExtractOptions", "TrainOptions"]
    )
    assert got["in_dir"] and got["same"] == {name: True for name in got["same"]} and len(got["same"]) == 7
    assert "no attribute 'no_such_name'" in got["missing"]


def test_extract_and_train_are_the_functions_however_the_modules_were_imported(tmp_path: Path) -> None:
    import featcache.extraction as extraction
    import featcache.training as training

    assert featcache.extract is extraction.extract and featcache.train is training.train
    with pytest.raises(StoreError, match="does not exist"):  # the real train(): it opens the store first
        featcache.train(str(tmp_path / "missing.zarr"), "linear", tmp_path / "run")


# -- a split as a Dataset, dask arrays and xarray ------------------------------------------------


@pytest.fixture(scope="module", params=["float16", "bfloat16"])
def store(request, images, tmp_path_factory) -> FeatureStore:
    out = tmp_path_factory.mktemp(f"api-{request.param}") / "cache.zarr"
    run_extract(images, out, dtype=request.param)
    return featcache.open_store(out)


def stored_float32(split: SplitHandle, tap: str) -> np.ndarray:
    """A tap as float32, decoded here by hand from the raw zarr array (bfloat16: the high 16 bits of float32)."""
    raw = np.asarray(split.group[tap][:])
    if split.store.manifest.dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def test_open_store_describes_the_split(store) -> None:
    split = store.split("train")
    assert isinstance(store, FeatureStore) and store.splits() == ["train"]
    assert split.num_samples == N and split.classes == ["class_0", "class_1", "class_2"]
    assert split.tap_names == ["embed", *[f"block{i}" for i in range(1, 7)]] == store.manifest.tap_names
    assert "test_vit" in repr(store) and "24 images" in repr(split)


def test_to_dask_equals_the_stored_arrays_one_block_per_shard(store) -> None:
    split = store.split("train")
    arrays = split_to_dask(split)
    assert list(arrays) == split.tap_names
    for tap, x in arrays.items():
        assert x.dtype == np.float32 and x.chunks[0] == (4,) * 6
        assert np.array_equal(x.compute(), stored_float32(split, tap))
    assert store.manifest.dtype != "bfloat16" or not np.array_equal(  # bfloat16 is really not read as float16
        stored_float32(split, "block6"), np.asarray(split.group["block6"][:]).view(np.float16).astype(np.float32)
    )
    assert list(split_to_dask(split, ["block2"])) == ["block2"]
    with pytest.raises(StoreError, match="block9"):
        split_to_dask(split, ["block9"])


def test_to_xarray_has_taps_labels_ids_and_the_manifest(store) -> None:
    split = store.split("train")
    ds = split_to_xarray(split)
    assert sorted(ds.data_vars) == sorted(split.tap_names)
    assert ds["block3"].dims == ("image", "token", "channel") == tuple(split.group["block3"].metadata.dimension_names)
    assert np.array_equal(ds["block3"].values, stored_float32(split, "block3"))
    assert ds["block3"].attrs["tap"]["name"] == "block3" and ds["block3"].attrs["cache_dtype"] == store.manifest.dtype
    assert ds["image"].values.tolist() == list(range(N))
    from_folders = [int(Path(i).parent.name.removeprefix("class_")) for i in split.ids()]  # class_<label>/img.png
    assert ds["labels"].values.tolist() == split.labels().tolist() == from_folders
    assert ds["ids"].values.tolist() == split.ids()
    assert ds.attrs["backbone"] == store.manifest.backbone and ds.attrs["dtype"] == store.manifest.dtype
    assert ds.attrs["split"] == "train" and ds.attrs["featcache_split"]["num_samples"] == N
    assert ds.chunks["image"] == (4,) * 6  # lazy: dask-backed, one block per shard


def test_to_xarray_without_xarray_names_the_fix(store, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "xarray", None)  # import xarray -> ImportError
    with pytest.raises(MissingDependencyError, match="pip install xarray"):
        split_to_xarray(store.split("train"))


def test_dataset_items_equal_the_stored_rows(store) -> None:
    split = store.split("train")
    ds = TapDataset(split)
    assert len(ds) == N and ds.taps == split.tap_names
    labels = split.labels()
    for i in (0, 5, 23):
        taps, label = ds[i]
        assert label == labels[i] and set(taps) == set(split.tap_names)
        for tap, t in taps.items():
            assert t.dtype == torch.float32 and np.array_equal(t.numpy(), stored_float32(split, tap)[i])
    with pytest.raises(StoreError, match="block9"):
        TapDataset(split, ["block9"])
    with pytest.raises(UsageError, match="holds 1 view"):
        TapDataset(split, view=1)


def test_dataset_pickles_without_zarr_and_feeds_spawned_workers(store) -> None:
    split = store.split("train")
    ds = TapDataset(split, ["embed", "block6"])
    ds[0]  # a chunk is cached and the split is open: neither may travel
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._split is None and copy._cached is None
    assert torch.equal(copy[7][0]["block6"], ds[7][0]["block6"]) and copy._split is not None
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    taps = torch.cat([b[0]["block6"] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    assert np.array_equal(taps.numpy(), stored_float32(split, "block6"))
    assert labels.tolist() == split.labels().tolist()


def test_forked_workers_reopen_the_store(store, monkeypatch) -> None:
    ds = TapDataset(store.split("train"), ["block1"])
    ds[0]  # open in the parent: a forked worker must not reuse its zarr objects
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=1, multiprocessing_context="fork")
    taps = torch.cat([b[0]["block1"] for b in loader])
    assert np.array_equal(taps.numpy(), stored_float32(store.split("train"), "block1"))
    parent = ds.split
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as seen from a forked process
    assert ds.split is not parent and ds.split is ds.split and ds.split.name == "train"


def test_incomplete_split_gives_only_completed_images(images, tmp_path) -> None:
    out = tmp_path / "cache.zarr"
    run_extract(images, out)
    FeatureStore.open(out, "r+").split("train").set_complete(1, False)  # images 4..7 as if never written
    split = featcache.open_store(out).split("train")
    done = [i for i in range(N) if not 4 <= i < 8]
    x = split_to_dask(split, ["block2"])["block2"]
    assert x.shape[0] == 20 and np.array_equal(x.compute(), stored_float32(split, "block2")[done])
    ds = split_to_xarray(split, ["block2"])
    assert ds["image"].values.tolist() == done and ds["labels"].values.tolist() == split.labels()[done].tolist()
    data = TapDataset(split, ["block2"])
    assert len(data) == 20 and np.array_equal(data[4][0]["block2"].numpy(), stored_float32(split, "block2")[8])


def test_to_dask_refuses_a_completed_shard_whose_object_is_lost(images, tmp_path) -> None:
    out = tmp_path / "cache.zarr"
    run_extract(images, out)
    shard_file(out, "block2", 3).unlink()  # zarr would read it as zeros
    split = featcache.open_store(out).split("train")
    split_to_dask(split, ["block1"])  # other taps are fine
    with pytest.raises(CorruptionError, match="shard 3 .*is missing.*--repair"):
        split_to_dask(split, ["block2"])


def test_dataset_of_one_view_of_an_augmented_split(images, tmp_path) -> None:
    out = tmp_path / "cache.zarr"
    run_extract(images, out, views=2, limit=8)
    split = featcache.open_store(out).split("train")
    stored = stored_float32(split, "block1")  # (8, 2, T, C)
    assert split_to_dask(split, ["block1"])["block1"].shape == stored.shape
    assert split_to_xarray(split, ["block1"])["block1"].dims == ("image", "view", "token", "channel")
    for view in (0, 1):
        got = torch.stack([TapDataset(split, ["block1"], view=view)[i][0]["block1"] for i in range(8)])
        assert np.array_equal(got.numpy(), stored[:, view])
    assert not np.array_equal(stored[:, 0], stored[:, 1])
    with pytest.raises(UsageError, match="view=0..1"):
        TapDataset(split, view=2)


# -- docs/api.md runs as written ------------------------------------------------------------------


def api_doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_every_api_doc_example_runs(tmp_path, monkeypatch, capsys) -> None:
    blocks = api_doc_blocks()
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__api_doc__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{DOC}:block{i + 1}", "exec"), namespace)
        except Exception as err:  # name the block that failed
            raise AssertionError(f"docs/api.md block {i + 1} failed: {type(err).__name__}: {err}\n{block}") from err
    printed = capsys.readouterr().out
    assert "into cache.zarr [test]" in printed and "images of class 3" in printed
    assert (tmp_path / "runs" / "last" / "best.json").is_file()
    assert namespace["logits"].shape == (1, 10)  # type: ignore[union-attr]


def test_readme_links_the_api_doc() -> None:
    assert "(docs/api.md)" in (ROOT / "README.md").read_text()
