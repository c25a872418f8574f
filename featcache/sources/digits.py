"""``sklearn:digits[:train|:test]``: scikit-learn's 1,797 8x8 digits, with a fixed stratified 80/20 split."""

from __future__ import annotations

import numpy as np

from featcache.errors import DataError

from .base import ArraySource


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


def digits_source(part: str | None) -> ArraySource:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels))
    if part in ("train", "test"):
        train, test = _stratified_split(labels, 0.2)
        idx = train if part == "train" else test
    elif part is not None:
        raise DataError(
            f"unknown part {part!r} in sklearn:digits:{part}; use sklearn:digits, sklearn:digits:train "
            "or sklearn:digits:test"
        )
    spec = "sklearn:digits" + (f":{part}" if part else "")
    return ArraySource(spec, images[idx], labels[idx], [f"digits:{i}" for i in idx], [str(c) for c in range(10)])
