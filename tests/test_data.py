"""Data sources: every SPEC form, stable order and ids, grayscale -> RGB, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featcache.data import Subset, open_source, stratified_subset
from featcache.errors import DataError
from featcache.sources.idx import read_idx
from featcache.sources.image_folder import ImageFolderSource

from .conftest import write_idx


def test_image_folder(image_folder) -> None:
    src = open_source(str(image_folder))
    assert len(src) == 12 and src.classes == ["class_0", "class_1", "class_2"]
    assert list(src.labels()) == [0] * 4 + [1] * 4 + [2] * 4
    s = src[5]
    assert s.image.mode == "RGB" and s.image.size == (32, 32) and s.label == 1
    assert s.id == src.ids()[5] and s.id.startswith("class_1/")
    assert src.ids() == open_source(str(image_folder)).ids()  # stable order


def test_flat_folder_is_unlabelled(tmp_path) -> None:
    for i in range(3):
        Image.new("L", (10, 10), color=i * 50).save(tmp_path / f"{i}.png")
    src = open_source(str(tmp_path))
    assert src.classes == [] and list(src.labels()) == [-1, -1, -1]
    assert src[0].image.mode == "RGB"


def test_digits_and_its_split() -> None:
    full, train, test = (open_source(s) for s in ("sklearn:digits", "sklearn:digits:train", "sklearn:digits:test"))
    assert len(full) == 1797 and len(train) + len(test) == 1797
    assert not set(train.ids()) & set(test.ids())
    assert np.bincount(test.labels()).min() >= 30  # stratified
    s = full[0]
    assert s.image.mode == "RGB" and s.image.size == (8, 8) and s.label == 0 and s.id == "digits:0"
    assert np.asarray(s.image).max() == 255 or np.asarray(s.image).max() > 200


@pytest.mark.parametrize("gz", [True, False])
def test_idx_files(tmp_path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (20, 28, 28), dtype=np.uint8)
    labels = (np.arange(20) % 10).astype(np.uint8)
    ext = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{ext}", imgs, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{ext}", labels, gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{ext}", imgs[:5], gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{ext}", labels[:5], gz)
    src = open_source(f"idx:{tmp_path}")
    assert len(src) == 20 and np.array_equal(np.asarray(src[3].image)[..., 0], imgs[3])
    assert src[3].image.mode == "RGB" and src[3].label == 3
    assert len(open_source(f"idx:{tmp_path}:test")) == 5


def test_idx_truncated(tmp_path) -> None:
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8), gz=False)
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-100])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "train-images-idx3-ubyte")


def test_real_fashion_mnist_when_installed() -> None:
    import os

    root = "/usr/share/datasets/fashion-mnist"
    if not os.path.isdir(root):
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    test = open_source(f"idx:{root}:test")
    assert len(test) == 10000 and test.classes[0] == "T-shirt/top" and test[0].image.size == (28, 28)


def test_torchvision_source_reads_local_files(tmp_path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = np.random.default_rng(0).integers(0, 255, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2], np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs, gz=False)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, gz=False)
    src = open_source(f"torchvision:MNIST:{tmp_path}")
    assert len(src) == 6 and src[1].label == 1 and src[1].image.mode == "RGB"
    assert list(src.labels()) == [0, 1, 2, 0, 1, 2]
    assert len(open_source(f"torchvision:MNIST:{tmp_path}:test")) == 6


def test_stratified_subset_is_fixed_and_balanced() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    a, b = stratified_subset(labels, 40), stratified_subset(labels, 40)
    assert np.array_equal(a, b) and len(a) == 40 and len(set(a)) == 40
    assert list(np.bincount(labels[a])) == [20, 10, 6, 4]
    src = open_source("sklearn:digits")
    sub = Subset(src, stratified_subset(src.labels(), 100))
    assert len(sub) == 100 and sub[0].label == sub.labels()[0] and sub.ids()[0] == src.ids()[sub.indices[0]]


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("/nonexistent/dir", "does not exist"),
        ("sklearn:iris", "unknown scikit-learn data set"),
        ("sklearn:digits:valid", "unknown part"),
        ("idx:/nonexistent", "apt-get install dataset-fashion-mnist"),
        ("torchvision:NoSuchSet", "torchvision has no dataset"),
        ("torchvision:MNIST:/nonexistent", "never downloads"),
    ],
)
def test_bad_specs(spec: str, msg: str) -> None:
    with pytest.raises(DataError, match=msg):
        open_source(spec)


def test_empty_dir_and_file_as_dir(tmp_path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        open_source(str(tmp_path / "f.txt"))


def test_unreadable_image_names_its_path(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "good.png")
    (tmp_path / "a" / "bad.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    src = ImageFolderSource(tmp_path)
    with pytest.raises(DataError, match=r"cannot read image .*bad\.jpg"):
        src[0]
