"""``hf:PATH[:split]``: a Hugging Face dataset on local disk, through the ``datasets`` package, offline.

PATH is one of:
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``datasets.load_from_disk``);
- a folder of parquet files, or one ``.parquet`` file (``load_dataset("parquet", ...)``);
- any other folder: ``load_dataset("imagefolder", data_dir=PATH)`` (class subfolders, or a metadata file).
``load_dataset`` converts the files once into its Arrow cache (``HF_DATASETS_CACHE``); packaged builders
need no network. The split defaults to ``train`` when there is one, else to the only split.

Columns: the image column is the one ``datasets.Image`` feature (``?image=COLUMN`` / ``--image-column``
chooses; a column of file paths or bytes is cast to ``datasets.Image``). The label column is the one
``ClassLabel`` feature (its names are the classes), else a column named ``label``, ``labels`` or
``class`` (integers or class names, labels.py); ``?label=COLUMN`` / ``--label-column`` chooses. Ids are
``SPLIT:ROW``. Rows are read one at a time and only the image column is decoded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from featcache.errors import DataError

from .base import Sample, require, spec_with_columns
from .labels import encode_labels
from .path_list import LABEL_COLUMNS

_TEXT_OR_BYTES = ("string", "large_string", "binary", "large_binary")


class HFSource:
    """One split of a Hugging Face dataset on disk; rows decoded one at a time."""

    def __init__(
        self, path: str, split: str | None = None, image_column: str | None = None, label_column: str | None = None
    ) -> None:
        datasets = require("datasets", "hf", "hf:PATH")
        ds, self.split = _load_split(datasets, path, split)
        self.spec = spec_with_columns(
            f"hf:{path}" + (f":{self.split}" if self.split else ""), image_column, label_column
        )
        where = f"hf:{path}" + (f" (split {self.split})" if self.split else "")
        if len(ds) == 0:
            raise DataError(f"{where} holds no rows")
        features = ds.features
        self.image_column = _image_column(datasets, features, image_column, where)
        if not isinstance(features[self.image_column], datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image())
        self._rows = ds.select_columns([self.image_column])
        self.label_column = _label_column(datasets, features, label_column, where)
        if self.label_column is None:
            self._labels, self.classes = np.full(len(ds), -1, dtype=np.int64), []
        else:
            values = ds.with_format("arrow", columns=[self.label_column])[:][self.label_column].to_pylist()
            feature = features[self.label_column]
            if isinstance(feature, datasets.ClassLabel):
                self._labels = np.asarray([-1 if v is None else v for v in values], dtype=np.int64)
                self.classes = list(feature.names)
            else:
                self._labels, self.classes = encode_labels(
                    values, lambda i: f"{where}, row {i}, column {self.label_column!r}"
                )
        self._where = where

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> Sample:
        name = f"in row {index} of {self._where}"
        try:
            image = self._rows[index][self.image_column]
            if image is None:
                raise DataError(f"no image {name} (column {self.image_column!r} is empty); remove the row")
            image = image.convert("RGB")
        except DataError:
            raise
        except Exception as err:
            raise DataError(
                f"cannot read the image {name} ({type(err).__name__}: {err}); remove or replace the row"
            ) from None
        return Sample(image, int(self._labels[index]), self._id(index))

    def _id(self, index: int) -> str:
        return f"{self.split}:{index}" if self.split else str(index)

    def labels(self) -> np.ndarray:
        return self._labels

    def ids(self) -> list[str]:
        return [self._id(i) for i in range(len(self._rows))]


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """No progress bars or info logs from ``datasets`` while a dataset is opened (featcache prints its own)."""
    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_off:
            datasets.enable_progress_bars()


def _load_split(datasets: Any, path: str, split: str | None) -> tuple[Any, str | None]:
    """(the Dataset of ``split``, its name) for PATH; the split is chosen when not given."""
    p = Path(path)
    if not p.exists():
        raise DataError(
            f"Hugging Face dataset {path} does not exist; pass hf:DIR with DIR written by "
            "save_to_disk, a folder of parquet files or images, or a .parquet file"
        )
    try:
        with _quiet(datasets):
            if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
                loaded = datasets.load_from_disk(str(p))
            elif p.is_file() and p.suffix == ".parquet":
                loaded = datasets.load_dataset("parquet", data_files={"train": str(p)})
            elif p.is_dir() and next(p.rglob("*.parquet"), None) is not None:
                loaded = datasets.load_dataset("parquet", data_dir=str(p))
            elif p.is_dir():
                loaded = datasets.load_dataset("imagefolder", data_dir=str(p))
            else:
                raise DataError(
                    f"hf:{path} is a file but not a .parquet file; pass a directory written by "
                    "save_to_disk, a folder of parquet files or images, or a .parquet file"
                )
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetGenerationError, ...)
        raise DataError(
            f"cannot open Hugging Face dataset {path} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); check that it holds a saved dataset, "
            "parquet files or images"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        if split is None:
            if "train" not in names and len(names) != 1:
                raise DataError(f"hf:{path} has the splits {', '.join(names)}; choose one: hf:{path}:{names[0]}")
            split = "train" if "train" in names else names[0]
        elif split not in names:
            raise DataError(f"hf:{path} has no split {split!r}; its splits: {', '.join(names)}")
        return loaded[split], split
    own = str(loaded.split) if loaded.split is not None else None
    if split is not None and split != own:
        raise DataError(
            f"hf:{path} holds one dataset"
            + (f" (split {own})" if own else "")
            + f", not a split named {split!r}; pass hf:{path}"
        )
    return loaded, own


def _image_column(datasets: Any, features: Any, chosen: str | None, where: str) -> str:
    if chosen is not None:
        if chosen not in features:
            raise DataError(f"{where} has no column {chosen!r} for the images; its columns: {', '.join(features)}")
        feature = features[chosen]
        if not isinstance(feature, datasets.Image) and not (
            isinstance(feature, datasets.Value) and feature.dtype in _TEXT_OR_BYTES
        ):
            raise DataError(
                f"column {chosen!r} of {where} holds {feature}, not images, file paths or bytes; choose "
                "another with --image-column"
            )
        return chosen
    images = [name for name, f in features.items() if isinstance(f, datasets.Image)]
    if len(images) == 1:
        return images[0]
    if not images:
        raise DataError(
            f"{where} has no image column (a datasets.Image feature) among {', '.join(features)}; "
            "name the column of images, file paths or bytes with --image-column"
        )
    raise DataError(f"{where} has several image columns ({', '.join(images)}); choose one with --image-column")


def _label_column(datasets: Any, features: Any, chosen: str | None, where: str) -> str | None:
    if chosen is None:
        class_labels = [name for name, f in features.items() if isinstance(f, datasets.ClassLabel)]
        if len(class_labels) > 1:
            named = [c for c in LABEL_COLUMNS if c in class_labels]
            if not named:
                raise DataError(
                    f"{where} has several class-label columns ({', '.join(class_labels)}); choose one "
                    "with --label-column"
                )
            class_labels = named[:1]
        chosen = class_labels[0] if class_labels else next((c for c in LABEL_COLUMNS if c in features), None)
        if chosen is None:
            return None  # unlabelled
    elif chosen not in features:
        raise DataError(f"{where} has no column {chosen!r} for the labels; its columns: {', '.join(features)}")
    feature = features[chosen]
    is_int = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    is_text = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
    if not (isinstance(feature, datasets.ClassLabel) or is_int or is_text):
        kind = feature.dtype if isinstance(feature, datasets.Value) else type(feature).__name__
        raise DataError(
            f"label column {chosen!r} of {where} holds {kind} values, not integer or class labels; "
            "choose another with --label-column (integers, class names or a ClassLabel)"
        )
    return chosen
