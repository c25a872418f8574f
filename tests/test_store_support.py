"""Helpers shared by the store, extract and inspect tests (no tests here)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from featcache.backbone import Backbone

from featcache.vocabulary import BackboneSpec
from featcache.loader import TransformedDataset
from featcache.extract import ExtractReport, extract, open_split_source
from featcache.store.feature_store import FeatureStore

from .conftest import TINY_CNN, TINY_VIT, write_image_folder

FAST = dict(loader_workers=0, progress=False, chunk_images=2, shard_images=4, batch_size=4, durable=False, device="cpu")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from 2 threads, and on 2 busy cores OpenMP's spinning makes each small op
    cost milliseconds; subprocesses in these tests use 1 thread too (bitwise comparisons)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic 32x32 images in 3 classes, ImageFolder layout."""
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", n=24, classes=3)


def run_extract(data: Path | str, out: Path | str, spec: dict[str, Any] | None = None, **kw: Any) -> ExtractReport:
    """``extract`` with the tiny ViT and small chunks/shards (6 shards of 4 images for 24 images)."""
    return extract(BackboneSpec(**(spec or TINY_VIT)), str(data), out, **{**FAST, **kw})


def read_split(out: Path | str, split: str = "train") -> dict[str, np.ndarray]:
    """Every array of a split as numpy (taps, labels, ids, completion records)."""
    handle = FeatureStore.open(out).split(split)
    arrays = {name: np.asarray(handle.group[name][:]) for name in handle.array_names()}
    arrays["ids"] = np.asarray([str(v) for v in arrays["ids"]])
    return arrays


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), f"array {name} differs"


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root (a store, or a single file)."""
    root = Path(root)
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def reference_taps(spec: dict[str, Any], data: Path | str, batch_size: int, shard_images: int,
                   limit: int | None = None) -> dict[str, torch.Tensor]:
    """``Backbone.taps`` of the transformed images, in the batches extraction uses (within shards)."""
    backbone = Backbone(BackboneSpec(**spec))
    ds = TransformedDataset(open_split_source(str(data), limit), backbone.transform)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    outs: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for s0 in range(0, len(x), shard_images):
            for b0 in range(s0, min(s0 + shard_images, len(x)), batch_size):
                taps = backbone.taps(x[b0:min(b0 + batch_size, s0 + shard_images, len(x))])
                for name, t in taps.items():
                    outs.setdefault(name, []).append(t)
    return {name: torch.cat(ts) for name, ts in outs.items()}


__all__ = ["FAST", "one_torch_thread", "TINY_CNN", "TINY_VIT", "assert_same_arrays", "hash_tree", "images", "read_split", "reference_taps",
           "run_extract"]
