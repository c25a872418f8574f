"""``--data SPEC`` -> a data source (one module per form in featcache/sources/): (image, label, id) items in a stable order.

SPEC forms (docs/data.md has each with its labels, ids and classes):
- ``DIR``: ImageFolder layout ``DIR/<class>/<image>`` (classes sorted by name), or a flat directory of
  images (unlabelled, label -1; for ``predict``);
- ``sklearn:digits`` (all 1797), ``sklearn:digits:train`` / ``sklearn:digits:test`` (fixed stratified
  80/20 split);
- ``idx:DIR`` / ``idx:DIR:test``: MNIST-format idx files (``train-*`` / ``t10k-*``, gzipped or not), as
  Debian's ``dataset-fashion-mnist`` ships them in /usr/share/datasets/fashion-mnist;
- ``torchvision:NAME[:ROOT][:train|:test]``: a torchvision dataset already on disk (never downloaded);
- ``wds:PATTERN``: WebDataset tar shards;
- ``hf:PATH[:split]``: a Hugging Face dataset on local disk;
- ``csv:FILE`` / ``jsonl:FILE``: image paths and labels listed in a file.
``hf:``, ``csv:`` and ``jsonl:`` take column choices after a ``?``: ``hf:PATH:train?image=img&label=y``
(``spec_with_columns`` writes them; the CLI's ``--image-column`` / ``--label-column``).
Every source re-opens from its spec string alone (dask workers do), reads items by position without
holding the images in memory, and gives labels and ids without decoding an image.
Images are returned as RGB ``PIL.Image`` (grayscale is replicated to 3 channels); the model's own
transform then resizes and normalises them.
"""

from __future__ import annotations

import os
from urllib.parse import urlencode

import numpy as np

from .errors import DataError
from .sources.base import DataSource, Sample, spec_with_columns, split_spec_options
from .sources.digits import digits_source
from .sources.idx import idx_source
from .sources.image_folder import ImageFolderSource

__all__ = [
    "DataSource",
    "Sample",
    "Subset",
    "open_source",
    "shared_spec",
    "spec_with_columns",
    "split_spec_options",
    "stratified_subset",
]


def shared_spec(spec: str) -> str:
    """``spec`` with its local paths made absolute: the same data for a process that has another working
    directory (a dask worker). URLs, ``sklearn:`` and ``torchvision:`` specs come back unchanged."""

    def absolute(path: str) -> str:
        return path if "://" in path or path.startswith("pipe:") else os.path.abspath(path)

    base, options = split_spec_options(spec)
    query = f"?{urlencode(options)}" if options else ""
    if base.startswith("wds:"):
        return "wds:" + "::".join(absolute(part) for part in base[4:].split("::"))
    if base.startswith(("csv:", "jsonl:")):
        kind, _, path = base.partition(":")
        return f"{kind}:{absolute(path)}{query}"
    if base.startswith("hf:"):
        path, split = hf_path_and_split(base[3:])
        return f"hf:{absolute(path)}" + (f":{split}" if split else "") + query
    if base.startswith("idx:"):
        root, part = idx_root_and_part(base[4:])
        return f"idx:{absolute(root)}" + (f":{part}" if part else "")
    if base.startswith(("sklearn:", "torchvision:")) or not os.path.exists(base):
        return spec
    return os.path.abspath(base)


def hf_path_and_split(rest: str) -> tuple[str, str | None]:
    """``PATH[:split]`` of an ``hf:`` spec: the whole text when it is an existing path, else split at the last ':'."""
    if not os.path.exists(rest) and ":" in rest:
        path, _, split = rest.rpartition(":")
        if os.path.exists(path) and split:
            return path, split
    return rest, None


def idx_root_and_part(rest: str) -> tuple[str, str | None]:
    """``DIR[:train|:test]`` of an ``idx:`` spec."""
    if rest.endswith((":test", ":train")):
        root, _, part = rest.rpartition(":")
        return root, part
    return rest, None


def open_source(spec: str) -> DataSource:
    """Parse ``--data SPEC`` into a data source (see the module docstring for the forms)."""
    if spec.startswith("sklearn:"):
        parts = spec.split(":")
        if parts[1] != "digits" or len(parts) > 3:
            raise DataError(f"unknown scikit-learn data set in {spec!r}; available: sklearn:digits[:train|:test]")
        return digits_source(parts[2] if len(parts) == 3 else None)
    if spec.startswith("idx:"):
        return idx_source(*idx_root_and_part(spec[4:]))
    if spec.startswith("torchvision:"):
        parts = spec.split(":", 2)
        name = parts[1]
        rest = parts[2] if len(parts) > 2 else ""
        part = None
        if rest in ("train", "test") or rest.endswith((":train", ":test")):
            rest, _, part = rest.rpartition(":") if ":" in rest else ("", "", rest)
        from .sources.torchvision_data import TorchvisionSource

        return TorchvisionSource(name, rest or None, part)
    if spec.startswith("wds:"):
        from .sources.wds import TarShardSource

        return TarShardSource(spec[4:])
    base, options = split_spec_options(spec)
    if base.startswith("hf:"):
        from .sources.hf import HFSource

        path, split = hf_path_and_split(base[3:])
        return HFSource(path, split, options.get("image"), options.get("label"))
    if base.startswith(("csv:", "jsonl:")):
        from .sources.path_list import PathListSource

        kind, _, path = base.partition(":")
        return PathListSource(kind, path, options.get("image"), options.get("label"))
    return ImageFolderSource(spec)


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices (sorted) of a fixed class-balanced subset of ``n`` items; all items when n >= len."""
    if n >= len(labels):
        return np.arange(len(labels))
    if n < 1:
        raise DataError(f"--limit must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    share = np.floor(counts / counts.sum() * n).astype(int)
    for i in np.argsort(-(counts / counts.sum() * n - share))[: n - share.sum()]:
        share[i] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, share)]
    return np.sort(np.concatenate(picked))


class Subset:
    """A fixed subset of a source, keeping its ids and classes."""

    def __init__(self, source: DataSource, indices: np.ndarray) -> None:
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)
        self.spec, self.classes = source.spec, source.classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Sample:
        return self.source[int(self.indices[index])]

    def labels(self) -> np.ndarray:
        return self.source.labels()[self.indices]

    def ids(self) -> list[str]:
        ids = self.source.ids()
        return [ids[i] for i in self.indices]
