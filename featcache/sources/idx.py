"""``idx:DIR[:test]``: MNIST-format idx files (``train-*`` / ``t10k-*``, gzipped or not), e.g. Fashion-MNIST as
Debian's ``dataset-fashion-mnist`` ships it in /usr/share/datasets/fashion-mnist."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any, Callable

import numpy as np

from featcache.errors import DataError

from .base import ArraySource

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def read_idx(path: Path) -> np.ndarray:
    """An MNIST idx file (optionally gzipped) as a numpy array."""
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"cannot read idx file {path} ({err}); the file is damaged or not gzip") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an idx file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise DataError(f"{path}: unknown idx element type 0x{data[2]:02x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {arr.size} values")
    return arr.reshape(shape)


def _find_idx(root: Path, prefix: str, kind: str) -> Path:
    for name in (
        f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte",
        f"{prefix}-{kind}.idx{3 if kind == 'images' else 1}-ubyte",
    ):
        for cand in (root / f"{name}.gz", root / name):
            if cand.exists():
                return cand
    raise DataError(
        f"no {prefix}-{kind}-idx*-ubyte[.gz] file in {root}; for Fashion-MNIST on Debian run "
        "'apt-get install dataset-fashion-mnist' and use idx:/usr/share/datasets/fashion-mnist"
    )


def idx_source(root: str, part: str | None) -> ArraySource:
    path = Path(root)
    if not path.is_dir():
        raise DataError(
            f"idx directory {root} does not exist; for Fashion-MNIST on Debian run "
            "'apt-get install dataset-fashion-mnist' and use idx:/usr/share/datasets/fashion-mnist"
        )
    if part not in (None, "train", "test"):
        raise DataError(f"unknown part {part!r} in idx:{root}:{part}; use idx:DIR (train) or idx:DIR:test")
    prefix = "t10k" if part == "test" else "train"
    images = read_idx(_find_idx(path, prefix, "images"))
    labels = read_idx(_find_idx(path, prefix, "labels")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"idx files in {root} disagree: {images.shape} images, {labels.shape} labels")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    classes = (
        FASHION_MNIST_CLASSES
        if "fashion" in str(path).lower() and n_classes == 10
        else [str(c) for c in range(n_classes)]
    )
    spec = f"idx:{root}" + (":test" if part == "test" else "")
    return ArraySource(spec, images, labels, [f"{prefix}:{i}" for i in range(len(labels))], classes)
