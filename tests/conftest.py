"""Shared fixtures: tiny models and synthetic data, CPU only, no network."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FEATCACHE_PROGRESS", "0")
torch.set_num_threads(1)  # tiny models: one thread is as fast, and far faster on a loaded machine

TINY_VIT = dict(model="test_vit", model_kwargs={"img_size": 32}, weights="random")
TINY_CNN = dict(model="tf_efficientnet_lite0", weights="random", image_size=32)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATCACHE_CACHE", str(tmp_path_factory.getbasetemp() / "featcache-cache"))


def make_separable_images(n: int, classes: int = 3, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB images (n, size, size, 3) whose class is the colour of a bright square: easy to learn."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    images = rng.integers(0, 40, size=(n, size, size, 3), dtype=np.uint8)
    for i, y in enumerate(labels):
        x0, y0 = rng.integers(0, size // 2, size=2)
        images[i, y0 : y0 + size // 2, x0 : x0 + size // 2, y % 3] = 230
        if y >= 3:
            images[i, :, :, (y + 1) % 3] //= 2
    return images, labels


def write_image_folder(root: Path, n: int = 12, classes: int = 3, size: int = 32, seed: int = 0) -> Path:
    from PIL import Image

    images, labels = make_separable_images(n, classes, size, seed)
    for i, (img, y) in enumerate(zip(images, labels)):
        d = root / f"class_{y}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"img_{i:04d}.png")
    return root


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    import gzip

    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from 2 threads, and on 2 busy cores OpenMP's spinning makes each small op
    cost milliseconds; subprocesses in these tests use 1 thread too (bitwise comparisons). With the module-level
    setting above, every test and every fixture (built between tests) runs on one thread: no module sets it again."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vit():
    """The tiny random-weight ViT (``TINY_VIT``), one per test module."""
    from featcache.backbone import Backbone
    from featcache.manifest import BackboneSpec

    return Backbone(BackboneSpec(**TINY_VIT))


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 synthetic 32x32 images in 3 classes, ImageFolder layout."""
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", n=24, classes=3)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_image_folder(tmp_path / "images")


def write_tap_store(
    path: Path,
    backbone,
    images: np.ndarray,
    labels: np.ndarray,
    split: str = "train",
    dtype: str = "float16",
    classes: list[str] | None = None,
    shard_images: int = 16,
):
    """A store written straight from ``Backbone.taps`` (no extract pipeline): for trainer and reader tests."""
    from PIL import Image

    from featcache.manifest import Manifest, SplitMeta
    from featcache.store.codecs import encode
    from featcache.store.feature_store import FeatureStore

    if FeatureStore.exists(str(path)):
        store = FeatureStore.open(str(path), "r+")
    else:
        m = Manifest(backbone=backbone.describe(), taps=backbone.taps.infos, dtype=dtype)
        store = FeatureStore.create(str(path), m, final_norm=backbone.final_norm_state())
    classes = classes or [f"class_{c}" for c in range(int(labels.max()) + 1)]
    meta = SplitMeta(num_samples=len(images), chunk_images=4, shard_images=shard_images, classes=classes)
    sp = store.create_split(split, meta)
    x = torch.stack([backbone.transform(Image.fromarray(im)) for im in images])
    with torch.inference_mode():
        taps = backbone.taps(x)
    for k in range(meta.num_shards):
        s, e = meta.shard_bounds(k)
        sp.write_shard(
            k, {n: encode(t[s:e], dtype) for n, t in taps.items()}, labels[s:e], [f"{split}:{i}" for i in range(s, e)]
        )
        sp.set_complete(k)
    return store, taps
