"""Data sources for ``--data SPEC``: each is a sequence of (image, label, id) items in a stable order.

SPEC forms (docs/data.md has each with its labels, ids and classes):
- ``DIR``: ImageFolder layout ``DIR/<class>/<image>`` (classes sorted by name), or a flat directory of
  images (unlabelled, label -1; for ``predict``);
- ``sklearn:digits`` (all 1797), ``sklearn:digits:train`` / ``sklearn:digits:test`` (fixed stratified
  80/20 split);
- ``idx:DIR`` / ``idx:DIR:test``: MNIST-format idx files (``train-*`` / ``t10k-*``, gzipped or not), as
  Debian's ``dataset-fashion-mnist`` ships them in /usr/share/datasets/fashion-mnist;
- ``torchvision:NAME[:ROOT][:train|:test]``: a torchvision dataset already on disk (never downloaded);
- ``wds:PATTERN``: WebDataset tar shards (featcache/sources/wds.py);
- ``hf:PATH[:split]``: a Hugging Face dataset on local disk (featcache/sources/hf.py);
- ``csv:FILE`` / ``jsonl:FILE``: image paths and labels listed in a file (featcache/sources/path_list.py).
``hf:``, ``csv:`` and ``jsonl:`` take column choices after a ``?``: ``hf:PATH:train?image=img&label=y``
(``spec_with_columns`` writes them; the CLI's ``--image-column`` / ``--label-column``).
Every source re-opens from its spec string alone (dask workers do), reads items by position without
holding the images in memory, and gives labels and ids without decoding an image.
Images are returned as RGB ``PIL.Image`` (grayscale is replicated to 3 channels); the model's own
transform then resizes and normalises them.
"""

from __future__ import annotations

import gzip
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Protocol
from urllib.parse import parse_qsl, urlencode

import numpy as np
import torch
from PIL import Image

from .errors import DataError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


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
        self.spec, self._images, self._labels, self._ids, self.classes = spec, images, labels.astype(np.int64), ids, classes

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index: int) -> Sample:
        img = Image.fromarray(self._images[index])
        return Sample(img.convert("RGB"), int(self._labels[index]), self._ids[index])

    def labels(self) -> np.ndarray:
        return self._labels

    def ids(self) -> list[str]:
        return list(self._ids)


class ImageFolderSource:
    """``DIR/<class>/<image>`` (sorted classes and files), or a flat directory of unlabelled images."""

    def __init__(self, root: str | Path) -> None:
        self.spec = str(root)
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"data directory {root} does not exist; pass an ImageFolder directory "
                            "(DIR/<class>/<image>) or a SPEC like sklearn:digits")
        if not self.root.is_dir():
            raise DataError(f"--data {root} is a file, not a directory; pass an ImageFolder directory "
                            "(DIR/<class>/<image>)")
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
            raise DataError(f"no images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS[:5])}, ... in "
                            "DIR/<class>/ subfolders or DIR itself); add images or fix the path")
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
        raise DataError(f"unknown part {part!r} in sklearn:digits:{part}; use sklearn:digits, sklearn:digits:train "
                        "or sklearn:digits:test")
    spec = "sklearn:digits" + (f":{part}" if part else "")
    return ArraySource(spec, images[idx], labels[idx], [f"digits:{i}" for i in idx], [str(c) for c in range(10)])


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
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {arr.size} values")
    return arr.reshape(shape)


def _find_idx(root: Path, prefix: str, kind: str) -> Path:
    for name in (f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte", f"{prefix}-{kind}.idx{3 if kind == 'images' else 1}-ubyte"):
        for cand in (root / f"{name}.gz", root / name):
            if cand.exists():
                return cand
    raise DataError(f"no {prefix}-{kind}-idx*-ubyte[.gz] file in {root}; for Fashion-MNIST on Debian run "
                    "'apt-get install dataset-fashion-mnist' and use idx:/usr/share/datasets/fashion-mnist")


def idx_source(root: str, part: str | None) -> ArraySource:
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"idx directory {root} does not exist; for Fashion-MNIST on Debian run "
                        "'apt-get install dataset-fashion-mnist' and use idx:/usr/share/datasets/fashion-mnist")
    if part not in (None, "train", "test"):
        raise DataError(f"unknown part {part!r} in idx:{root}:{part}; use idx:DIR (train) or idx:DIR:test")
    prefix = "t10k" if part == "test" else "train"
    images = read_idx(_find_idx(path, prefix, "images"))
    labels = read_idx(_find_idx(path, prefix, "labels")).astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise DataError(f"idx files in {root} disagree: {images.shape} images, {labels.shape} labels")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    classes = FASHION_MNIST_CLASSES if "fashion" in str(path).lower() and n_classes == 10 else [str(c) for c in range(n_classes)]
    spec = f"idx:{root}" + (":test" if part == "test" else "")
    return ArraySource(spec, images, labels, [f"{prefix}:{i}" for i in range(len(labels))], classes)


class TorchvisionSource:
    """A torchvision dataset that is already on disk; featcache never downloads."""

    def __init__(self, name: str, root: str | None, part: str | None) -> None:
        import torchvision.datasets as tvd

        cls = getattr(tvd, name, None)
        if cls is None or not inspect.isclass(cls):
            raise DataError(f"torchvision has no dataset {name!r}; see torchvision.datasets (e.g. MNIST, CIFAR10)")
        params = inspect.signature(cls.__init__).parameters
        kwargs: dict[str, Any] = {}
        root = root or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "featcache", "data")
        if "root" in params:
            kwargs["root"] = root
        if "download" in params:
            kwargs["download"] = False
        if "train" in params:
            kwargs["train"] = part != "test"
        elif "split" in params and part:
            kwargs["split"] = part
        try:
            self._ds = cls(**kwargs)
        except Exception as err:
            raise DataError(f"torchvision dataset {name} is not available under {root} ({str(err)[:160]}); featcache "
                            f"never downloads: place the files there first") from None
        if len(self._ds) == 0:
            raise DataError(f"torchvision dataset {name} under {root} is empty")
        self.spec = f"torchvision:{name}" + (f":{root}" if "root" in params else "") + (f":{part}" if part else "")
        self.classes = [str(c) for c in getattr(self._ds, "classes", [])]
        targets = getattr(self._ds, "targets", None)
        self._labels = np.asarray(targets, dtype=np.int64) if targets is not None else None

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index: int) -> Sample:
        image, label = self._ds[index]
        if isinstance(image, torch.Tensor):
            from torchvision.transforms.functional import to_pil_image

            image = to_pil_image(image)
        return Sample(image.convert("RGB"), int(label), str(index))

    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = np.asarray([int(self._ds[i][1]) for i in range(len(self._ds))], dtype=np.int64)
        if not self.classes:
            self.classes = [str(c) for c in range(int(self._labels.max()) + 1)]
        return self._labels

    def ids(self) -> list[str]:
        return [str(i) for i in range(len(self._ds))]


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
        raise DataError(f"unknown option {unknown[0]!r} in --data {spec}; the options after '?' are "
                        "image=COLUMN and label=COLUMN (e.g. hf:DIR:train?image=img&label=y)")
    if any(not v for v in options.values()):
        raise DataError(f"empty column name in --data {spec}; write image=COLUMN and label=COLUMN")
    return base, options


def spec_with_columns(spec: str, image_column: str | None = None, label_column: str | None = None) -> str:
    """``spec`` with the chosen image and label columns written into it (what ``--image-column`` and
    ``--label-column`` do), so that the string alone re-opens the same data on a dask worker."""
    if image_column is None and label_column is None:
        return spec
    if not spec.startswith(COLUMN_SPECS):
        raise UsageError(f"--image-column and --label-column choose columns of hf:, csv: and jsonl: data, not of "
                         f"--data {spec}")
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


def unwrap_worker_error(err: BaseException) -> BaseException:
    """The error a DataLoader worker raised, with its own message instead of the traceback text.

    ``torch.utils.data`` re-raises a worker's exception in the main process as the same type with
    the message ``"Caught DataError in DataLoader worker process 0.\nOriginal Traceback ..."``; a
    user must see one line (``cannot read image ...``), not a traceback. Other errors come back as they are.
    """
    text = str(err)
    first = text.split("\n", 1)[0]
    if not (first.startswith("Caught ") and "DataLoader worker" in first):
        return err
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else first
    kind = type(err)
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        if last.startswith(prefix):
            last = last[len(prefix):]
            break
    try:
        unwrapped = kind(last)
    except Exception:  # noqa: BLE001 - a type that needs other arguments
        unwrapped = RuntimeError(last)
    return unwrapped


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
