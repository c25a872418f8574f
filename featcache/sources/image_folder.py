"""``DIR``: an ImageFolder directory (``DIR/<class>/<image>``), or a flat directory of unlabelled images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featcache.errors import DataError

from .base import IMAGE_EXTENSIONS, Sample, read_rgb


class ImageFolderSource:
    """``DIR/<class>/<image>`` (sorted classes and files), or a flat directory of unlabelled images."""

    def __init__(self, root: str | Path) -> None:
        self.spec = str(root)
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(
                f"data directory {root} does not exist; pass an ImageFolder directory "
                "(DIR/<class>/<image>) or a SPEC like sklearn:digits"
            )
        if not self.root.is_dir():
            raise DataError(
                f"--data {root} is a file, not a directory; pass an ImageFolder directory (DIR/<class>/<image>)"
            )
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self._paths: list[Path] = []
        labels: list[int] = []
        if class_dirs:
            self.classes = [p.name for p in class_dirs]
            for label, d in enumerate(class_dirs):
                files = sorted(f for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
                self._paths += files
                labels += [label] * len(files)
        else:  # flat directory: unlabelled images
            self.classes = []
            self._paths = sorted(f for f in self.root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            labels = [-1] * len(self._paths)
        if not self._paths:
            raise DataError(
                f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS[:5])}, ... in "
                "DIR/<class>/ subfolders or DIR itself); add images or fix the path"
            )
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> Sample:
        path = self._paths[index]
        return Sample(read_rgb(path, str(path)), int(self._labels[index]), str(path.relative_to(self.root)))

    def labels(self) -> np.ndarray:
        return self._labels

    def ids(self) -> list[str]:
        return [str(p.relative_to(self.root)) for p in self._paths]
