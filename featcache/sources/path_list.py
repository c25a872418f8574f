"""``csv:FILE`` / ``jsonl:FILE``: image paths and labels listed in a file, in the file's order.

CSV: a header row, then one image per row (``csv`` module, comma-separated). JSONL: one JSON object per
line (blank lines skipped). The image column is ``path``, ``image``, ``file`` or ``filename`` (the first
present) unless ``?image=COLUMN`` chooses one; the label column ``label``, ``labels`` or ``class`` unless
``?label=COLUMN`` does; without one the images are unlabelled. Paths are relative to the listing file's
folder (absolute paths are kept); every path is checked when the list is opened, so a missing image is
reported with its line before any work starts. Ids are the paths as written; labels follow labels.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from featcache.errors import DataError

from .base import Sample, read_rgb, spec_with_columns
from .labels import encode_labels

IMAGE_COLUMNS = ("path", "image", "file", "filename")
LABEL_COLUMNS = ("label", "labels", "class")


class PathListSource:
    """Images named by the rows of a CSV or JSONL file, read from disk when asked for."""

    def __init__(self, kind: str, file: str, image_column: str | None = None, label_column: str | None = None) -> None:
        if kind not in ("csv", "jsonl"):
            raise ValueError(f"kind must be csv or jsonl, got {kind!r}")
        self.spec = spec_with_columns(f"{kind}:{file}", image_column, label_column)
        self.file = Path(file)
        if not self.file.is_file():
            raise DataError(
                f"{kind} file {file} does not exist"
                if not self.file.exists()
                else f"{file} is not a file; pass {kind}:FILE, a file listing image paths and labels"
            )
        rows = list(_csv_rows(self.file) if kind == "csv" else _jsonl_rows(self.file))
        if not rows:
            raise DataError(f"{file} lists no images; add rows with an image path and a label")
        columns = set(rows[0][1])
        image_column = image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
        if image_column is None or image_column not in columns:
            named = f" {image_column!r}" if image_column else ""
            raise DataError(
                f"{file} has no image column{named} (columns: {', '.join(sorted(columns))}); name the "
                f"column of image paths with --image-column (default: one of {', '.join(IMAGE_COLUMNS)})"
            )
        if label_column is not None and label_column not in columns:
            raise DataError(f"{file} has no label column {label_column!r} (columns: {', '.join(sorted(columns))})")
        label_column = label_column or next((c for c in LABEL_COLUMNS if c in columns), None)
        root = self.file.parent
        self._ids: list[str] = []
        self._paths: list[Path] = []
        lines: list[int] = []
        raw_labels: list[Any] = []
        for line, row in rows:
            value = row.get(image_column)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{file} line {line}: no image path in column {image_column!r}; fix or remove the row")
            path = root / value  # an absolute value replaces root
            if not path.is_file():
                raise DataError(
                    f"{file} line {line}: image {value} does not exist (looked for {path}; paths are "
                    f"relative to the folder of {self.file.name}); fix the path or remove the row"
                )
            self._ids.append(value)
            self._paths.append(path)
            lines.append(line)
            raw_labels.append(row.get(label_column) if label_column else None)
        self._labels, self.classes = encode_labels(raw_labels, lambda i: f"{file} line {lines[i]}")

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> Sample:
        path = self._paths[index]
        return Sample(
            read_rgb(path, str(path), f"replace the file or remove its row from {self.file}"),
            int(self._labels[index]),
            self._ids[index],
        )

    def labels(self) -> np.ndarray:
        return self._labels

    def ids(self) -> list[str]:
        return list(self._ids)


def _csv_rows(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a CSV file with a header."""
    try:
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise DataError(f"{file} is empty; a CSV needs a header row (e.g. path,label) and one row per image")
            for row in reader:
                if any(v for v in row.values() if isinstance(v, str)):  # skip blank rows
                    yield reader.line_num, row
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{file} is not a readable CSV file ({err}); write UTF-8 text with a header row") from None


def _jsonl_rows(file: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of a JSON Lines file."""
    try:
        with open(file, encoding="utf-8") as f:
            for line, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{file} line {line} is not JSON ({err}); write one object per line, e.g. "
                        '{"path": "cat/1.jpg", "label": "cat"}'
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{file} line {line} is not a JSON object; write one object per line, e.g. "
                        '{"path": "cat/1.jpg", "label": "cat"}'
                    )
                yield line, row
    except UnicodeDecodeError as err:
        raise DataError(f"{file} is not UTF-8 text ({err})") from None
