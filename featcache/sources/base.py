"""What every ``--data`` reader shares: the item type, the ``DataSource`` protocol, image decoding, array-held
images, optional packages, and the ``?image=COLUMN&label=COLUMN`` options of the column-based spec forms."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Protocol
from urllib.parse import parse_qsl, urlencode

import numpy as np
from PIL import Image

from featcache.errors import DataError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass
class Sample:
    image: Image.Image
    label: int  # -1 when unknown
    id: str


def read_rgb(file: str | Path | IO[bytes], name: str, fix: str = "remove or replace the file") -> Image.Image:
    """An image file (a path or an open binary file) decoded to RGB; a DataError naming ``name`` if it cannot be."""
    try:
        with Image.open(file) as img:
            return img.convert("RGB")
    except Exception as err:
        raise DataError(f"cannot read image {name} ({type(err).__name__}: {err}); {fix}") from None


class DataSource(Protocol):
    """What extraction and prediction read: a fixed-order, indexable set of labelled images."""

    spec: str
    classes: list[str]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Sample: ...

    def labels(self) -> np.ndarray: ...

    def ids(self) -> list[str]: ...


class ArraySource:
    """Images held as a uint8 array (N, H, W) or (N, H, W, 3): digits, idx files, tests."""

    def __init__(self, spec: str, images: np.ndarray, labels: np.ndarray, ids: list[str], classes: list[str]) -> None:
        if len(images) == 0:
            raise DataError(f"data source {spec} holds no images")
        self.spec, self._images, self._labels, self._ids, self.classes = (
            spec,
            images,
            labels.astype(np.int64),
            ids,
            classes,
        )

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> Sample:
        img = Image.fromarray(self._images[index])
        return Sample(img.convert("RGB"), int(self._labels[index]), self._ids[index])

    def labels(self) -> np.ndarray:
        return self._labels

    def ids(self) -> list[str]:
        return list(self._ids)


def require(module: str, extra: str, form: str) -> ModuleType:
    """Import an optional package, or a DataError that names the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"--data {form} needs the {module!r} package, which is not installed: pip install 'featcache[{extra}]'"
        ) from None


COLUMN_SPECS = ("hf:", "csv:", "jsonl:")  # the spec forms that take ?image=COLUMN&label=COLUMN
SPEC_OPTIONS = ("image", "label")


def split_spec_options(spec: str) -> tuple[str, dict[str, str]]:
    """``"hf:PATH:train?image=img&label=y"`` -> ``("hf:PATH:train", {"image": "img", "label": "y"})``.

    Options are a URL query after the last ``?`` (``urllib.parse`` encodes names with spaces or ``&``).
    Only ``hf:``, ``csv:`` and ``jsonl:`` specs have options; other specs come back whole.
    """
    base, sep, query = spec.rpartition("?")
    if not spec.startswith(COLUMN_SPECS) or not sep or "=" not in query:
        return spec, {}
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(SPEC_OPTIONS))
    if unknown:
        raise DataError(
            f"unknown option {unknown[0]!r} in --data {spec}; the options after '?' are "
            "image=COLUMN and label=COLUMN (e.g. hf:DIR:train?image=img&label=y)"
        )
    if any(not v for v in options.values()):
        raise DataError(f"empty column name in --data {spec}; write image=COLUMN and label=COLUMN")
    return base, options


def spec_with_columns(spec: str, image_column: str | None = None, label_column: str | None = None) -> str:
    """``spec`` with the chosen image and label columns written into it (what ``--image-column`` and
    ``--label-column`` do), so that the string alone re-opens the same data on a dask worker."""
    if image_column is None and label_column is None:
        return spec
    if not spec.startswith(COLUMN_SPECS):
        raise UsageError(
            f"--image-column and --label-column choose columns of hf:, csv: and jsonl: data, not of --data {spec}"
        )
    base, options = split_spec_options(spec)
    for key, value in (("image", image_column), ("label", label_column)):
        if value is None:
            continue
        if not value:
            raise UsageError(f"--{key}-column needs a column name")
        if options.get(key, value) != value:
            raise UsageError(f"--{key}-column {value} contradicts {key}={options[key]} in --data {spec}")
        options[key] = value
    return f"{base}?{urlencode({k: options[k] for k in SPEC_OPTIONS if k in options})}"
