"""``wds:PATTERN``: WebDataset tar shards, read by position.

``PATTERN`` is what the ``webdataset`` package takes: one shard, a brace range
(``shards/train-{000000..000099}.tar``) or several separated by ``::``; local files, relative to the
working directory. Files are grouped into samples by WebDataset's rule (``webdataset.tariterators``:
consecutive members with the same key, the key being the name up to the first dot of its last part):
``000017.jpg`` + ``000017.cls`` is sample ``000017``. The image is the member whose extension is an image
type (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ...); the label comes from ``.cls`` (an integer as text)
or else ``.json`` (an integer, a class name, or an object with a ``"label"`` field), rules in labels.py;
samples without either are unlabelled. Ids are the sample keys.

The ``webdataset`` package reads shards as a stream, one sample after the other; extraction reads
items by index (its shards are index ranges, spread over processes and dask workers). So each shard's
member headers are scanned once with ``tarfile`` (it seeks past the data), and an image is read from
its byte offset when asked for: nothing but the offsets and labels is held in memory.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

import numpy as np

from featcache.errors import DataError

from .base import IMAGE_EXTENSIONS, Sample, read_rgb, require
from .labels import encode_labels

IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)  # preferred first: jpg, jpeg, png, ...
_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members (skipped, as webdataset does)


class TarShardSource:
    """The samples of WebDataset tar shards in shard order, each image read from its offset on demand."""

    def __init__(self, pattern: str) -> None:
        require("webdataset", "wds", "wds:PATTERN")
        from webdataset.shardlists import expand_urls

        self.spec = f"wds:{pattern}"
        if not pattern:
            raise DataError("--data wds: needs a shard pattern, e.g. wds:shards/train-{000000..000009}.tar")
        self.shards = list(expand_urls(pattern))
        remote = [s for s in self.shards if "://" in s or s.startswith("pipe:")]
        if remote:
            raise DataError(
                f"--data {self.spec}: {remote[0]} is not a local file; featcache reads shards by "
                "position, so copy them to a local or mounted directory first"
            )
        missing = [s for s in self.shards if not os.path.isfile(s)]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(self.shards)} shard(s) of --data {self.spec} do not exist "
                f"(first: {missing[0]}); check the path and the brace range, e.g. "
                "wds:shards/train-{000000..000009}.tar"
            )
        shard_of: list[int] = []
        offsets: list[int] = []
        sizes: list[int] = []
        self._keys: list[str] = []
        self._suffixes: list[str] = []
        raw_labels: list[object] = []
        label_where: list[str] = []
        for k, shard in enumerate(self.shards):
            for key, suffix, offset, size, label, where in self._index(shard):
                shard_of.append(k)
                offsets.append(offset)
                sizes.append(size)
                self._keys.append(key)
                self._suffixes.append(suffix)
                raw_labels.append(label)
                label_where.append(where)
        if not self._keys:
            raise DataError(
                f"no samples in --data {self.spec}; a WebDataset shard holds files like 000001.jpg and 000001.cls"
            )
        self._shard_of = np.asarray(shard_of, dtype=np.int32)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._sizes = np.asarray(sizes, dtype=np.int64)
        self._labels, self.classes = encode_labels(raw_labels, lambda i: label_where[i])

    def _index(self, shard: str) -> list[tuple[str, str, int, int, object, str]]:
        """(key, image suffix, data offset, size, label as written, label's member name) per sample of a shard."""
        from webdataset.tariterators import base_plus_ext  # the package's own rule: key = name up to the first dot

        try:
            tar = tarfile.open(shard, mode="r:")  # plain tar only: a compressed one cannot be read by offset
        except (tarfile.ReadError, OSError) as err:
            with open(shard, "rb") as f:
                magic = f.read(3)
            if magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:3] == b"\xfd7z":
                raise DataError(
                    f"shard {shard} is compressed; featcache reads samples by position, which needs "
                    "plain .tar shards: decompress them (e.g. gunzip)"
                ) from None
            raise DataError(f"shard {shard} is not a tar file ({err}); pass WebDataset .tar shards") from None
        samples: list[tuple[str, str, int, int, object, str]] = []
        group: dict[str, tarfile.TarInfo] = {}
        group_key: str | None = None
        try:
            with tar:
                for member in tar:  # webdataset's grouping: consecutive members with the same key; tarfile
                    # raises ReadError where a shard ends inside a member
                    if not member.isreg() or _META.match(member.name):
                        continue
                    key, suffix = base_plus_ext(member.name)
                    if key is None:
                        continue
                    if key != group_key:
                        if group_key is not None:
                            samples.append(self._sample(tar, shard, group_key, group))
                        group, group_key = {}, key
                    group[suffix.lower()] = member
                if group_key is not None:
                    samples.append(self._sample(tar, shard, group_key, group))
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataError(f"shard {shard} is damaged ({type(err).__name__}: {err}); rewrite or remove it") from None
        return samples

    @staticmethod
    def _sample(
        tar: tarfile.TarFile, shard: str, key: str, group: dict[str, tarfile.TarInfo]
    ) -> tuple[str, str, int, int, object, str]:
        suffix = next((s for s in IMAGE_SUFFIXES if s in group), None)
        if suffix is None:
            raise DataError(
                f"sample {key} in {shard} has no image (found {', '.join('.' + s for s in group)}; "
                f"looked for {', '.join('.' + s for s in IMAGE_SUFFIXES[:5])}, ...); "
                "add the image or remove the sample's files"
            )
        label: object = None
        where = f"{shard}: {key}"
        for kind in ("cls", "json"):
            if kind in group:
                where = f"{shard}: {group[kind].name}"
                f = tar.extractfile(group[kind])
                text = f.read().decode("utf-8", "replace").strip() if f is not None else ""
                label = text if kind == "cls" else _json_label(text, where)
                break
        image = group[suffix]
        return key, suffix, image.offset_data, image.size, label, where

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, index: int) -> Sample:
        shard = self.shards[self._shard_of[index]]
        key, size = self._keys[index], int(self._sizes[index])
        with open(shard, "rb") as f:
            f.seek(int(self._offsets[index]))
            data = f.read(size)
        name = f"{key}.{self._suffixes[index]} in {shard}"
        if len(data) != size:
            raise DataError(f"cannot read image {name} (the shard ends early); rewrite or remove the shard")
        return Sample(read_rgb(io.BytesIO(data), name, "remove or replace the sample"), int(self._labels[index]), key)

    def labels(self) -> np.ndarray:
        return self._labels

    def ids(self) -> list[str]:
        return list(self._keys)


def _json_label(text: str, where: str) -> object:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            f'{where} is not JSON ({err}); write the label as an integer, a class name or {{"label": ...}}'
        ) from None
    if isinstance(value, dict):
        return value.get("label")
    return value
