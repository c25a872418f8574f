"""``verify_store``: read every stored chunk and check checksums, shapes, completion records, labels.

Each problem names its split, array and chunk or shard (with its image range), so that a user can
tell what is damaged and a resume or re-extraction can be targeted. Errors make the store unfit
to trust; warnings (incomplete shards, leftover temporary files) do not. zarr raises a ValueError
on a crc32c mismatch; a damaged shard index fails its own checksum; an empty shard object reads
as fill values in zarr, so object sizes are checked before reading.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from featcache.errors import StoreError

from . import zarr_shutdown
from .codecs import SCALE_DTYPE, check_codecs
from .feature_store import BACKBONE_GROUP, COMPLETE, FeatureStore, SplitHandle, split_array_specs


@dataclass
class Problem:
    """One finding of ``verify_store``."""

    severity: str  # "error" | "warning"
    message: str
    split: str | None = None
    array: str | None = None
    where: str = ""  # "chunk 5 (images 20-23)", "shard 2 (images 64-95)", "metadata", ...
    shard: int | None = None  # the shard whose recomputation repairs this (extract --resume --repair)

    def __str__(self) -> str:
        name = "/".join(p for p in (self.split, self.array) if p) or "store"
        return f"{name}{' ' + self.where if self.where else ''}: {self.message}"


@dataclass
class VerifyReport:
    """All problems found in a store, and what was read."""

    store: str
    problems: list[Problem] = field(default_factory=list)
    chunks_read: int = 0
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    @property
    def errors(self) -> list[str]:
        return [str(p) for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[str]:
        return [str(p) for p in self.problems if p.severity == "warning"]

    def add(
        self,
        severity: str,
        message: str,
        split: str | None = None,
        array: str | None = None,
        where: str = "",
        shard: int | None = None,
    ) -> None:
        self.problems.append(Problem(severity, message, split, array, where, shard))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "warnings": self.warnings,
            "problems": [asdict(p) for p in self.problems],
            "chunks_read": self.chunks_read,
            "bytes_read": self.bytes_read,
        }


def verify_store(url: str, split: str | None = None, storage_options: dict[str, Any] | None = None) -> VerifyReport:
    """Read every chunk of the store (or of one split) and report each problem; never raises for damage."""
    report = VerifyReport(str(url))
    try:
        store = FeatureStore.open(url, "r", storage_options)
    except StoreError as err:
        report.add("error", str(err))
        return report
    names = [store.split(split).name] if split is not None else store.splits()  # unknown split: StoreError
    if store.manifest.final_norm:
        _verify_backbone(store, report)
    for name in names:
        try:
            handle = store.split(name)
        except StoreError as err:
            report.add("error", str(err), name)
            continue
        SplitVerifier(handle, report).run()
    return report


def _verify_backbone(store: FeatureStore, report: VerifyReport) -> None:
    for key in ("norm_weight", "norm_bias"):
        try:
            np.asarray(store.group[f"{BACKBONE_GROUP}/{key}"][:])
            report.chunks_read += 1
        except KeyError:
            report.add(
                "error",
                "missing array (the manifest says the ViT's final norm is stored)",
                None,
                f"{BACKBONE_GROUP}/{key}",
            )
        except Exception as err:  # noqa: BLE001 - any decode failure is a finding
            report.add("error", _describe(err), None, f"{BACKBONE_GROUP}/{key}", "chunk 0")


class SplitVerifier:
    """Checks one split: metadata, completion records, then every chunk of every completed shard."""

    def __init__(self, split: SplitHandle, report: VerifyReport) -> None:
        self.split, self.report, self.meta = split, report, split.meta
        self.store = split.group.store

    def problem(
        self, severity: str, message: str, array: str | None = None, where: str = "", shard: int | None = None
    ) -> None:
        self.report.add(severity, message, self.split.name, array, where, shard)

    def run(self) -> None:
        arrays = self.check_metadata()
        if COMPLETE not in arrays:
            return
        done = self.check_completion(arrays[COMPLETE])
        for name, arr in arrays.items():
            if name != COMPLETE:
                self.check_data(name, arr, done)
        self.check_leftovers()

    # -- metadata
    def check_metadata(self) -> dict[str, zarr.Array]:
        arrays: dict[str, zarr.Array] = {}
        try:  # the scales' type as stored: bfloat16, or float16 in splits written before (both valid)
            scale_dtype = self.split.scale_dtype or SCALE_DTYPE
        except StoreError:  # a missing scale array: reported below against today's layout
            scale_dtype = SCALE_DTYPE
        self.specs = split_array_specs(
            self.split.store.manifest, self.meta, self.meta.compressor or "none", scale_dtype
        )
        for name in self.split.array_names():
            try:
                arr = self.split.group[name]
            except KeyError:
                self.problem("error", "array is missing", name, "metadata")
                continue
            except Exception as err:  # noqa: BLE001 - unreadable metadata or an unknown codec
                self.problem("error", f"unreadable metadata ({type(err).__name__}: {str(err)[:120]})", name, "metadata")
                continue
            if not isinstance(arr, zarr.Array):
                self.problem("error", "is a group, expected an array", name, "metadata")
                continue
            try:
                check_codecs(arr, f"array {name!r}")
            except StoreError as err:
                self.problem("error", str(err), name, "metadata")
                continue
            spec = self.specs[name]
            found_dtype = "str" if arr.dtype.kind in "OTU" else str(arr.dtype)
            checks = [("shape", tuple(arr.shape), spec.shape), ("dtype", found_dtype, spec.dtype)]
            if spec.shards is not None:
                checks += [("chunks", tuple(arr.chunks), spec.chunks), ("shards", tuple(arr.shards or ()), spec.shards)]
            bad = [f"{what} {got} (expected {want})" for what, got, want in checks if got != want]
            if bad:
                self.problem("error", "; ".join(bad), name, "metadata")
                continue
            arrays[name] = arr
        return arrays

    # -- completion records
    def check_completion(self, arr: zarr.Array) -> np.ndarray:
        """The completed shards (bool); unreadable or invalid records count as not complete."""
        done = np.zeros(self.meta.num_shards, dtype=bool)
        for k in range(self.meta.num_shards):
            try:
                value = int(arr[k])
                self.report.chunks_read += 1
            except Exception as err:  # noqa: BLE001
                zarr_shutdown.settle_pending_io()
                self.problem("error", _describe(err), COMPLETE, f"chunk {k} (record of shard {k})", shard=k)
                continue
            if value not in (0, 1):
                self.problem(
                    "error", f"invalid completion record {value} (expected 0 or 1)", COMPLETE, f"chunk {k}", shard=k
                )
            done[k] = value == 1
        missing = self.meta.num_shards - int(done.sum())
        if missing:
            self.problem(
                "warning",
                f"{missing} of {self.meta.num_shards} shards are not complete (an interrupted "
                "extraction): readers skip them; rerun featcache extract with --resume to finish",
                COMPLETE,
            )
        return done

    # -- data
    def check_data(self, name: str, arr: zarr.Array, done: np.ndarray) -> None:
        for k in np.flatnonzero(done):
            k = int(k)
            start, stop = (k, k + 1) if self.specs[name].per_shard else self.meta.shard_bounds(k)
            where = f"shard {k} (images {start}-{stop - 1})" if not self.specs[name].per_shard else f"shard {k}"
            key = f"{arr.path}/{arr.metadata.encode_chunk_key((k,) + (0,) * (arr.ndim - 1))}"
            size = self.object_size(key)
            if size is None:
                self.problem("error", f"the shard is marked complete but its object {key} is missing", name, where, k)
                continue
            if size == 0:
                self.problem("error", f"object {key} is empty (truncated)", name, where, k)
                continue
            try:
                values = arr[start:stop]
            except Exception as err:  # noqa: BLE001
                zarr_shutdown.settle_pending_io()
                self.locate_damage(name, arr, k, err)
                continue
            self.report.chunks_read += max(1, -(-(stop - start) // arr.chunks[0]))
            self.report.bytes_read += size
            if name == "labels":
                self.check_labels(np.asarray(values), start, where)

    def locate_damage(self, name: str, arr: zarr.Array, shard: int, err: Exception) -> None:
        """Name the chunks of a shard that fail to decode (all of them: the shard index itself is damaged)."""
        start, stop = self.meta.shard_bounds(shard)
        step = arr.chunks[0]
        if arr.shards is None or step >= stop - start:
            self.problem("error", _describe(err), name, f"chunk {shard} (images {start}-{stop - 1})", shard)
            return
        bad = []
        for c0 in range(start, stop, step):
            try:
                arr[c0 : min(c0 + step, stop)]
            except Exception as chunk_err:  # noqa: BLE001
                zarr_shutdown.settle_pending_io()
                bad.append((c0 // step, c0, min(c0 + step, stop), chunk_err))
        total = -(-(stop - start) // step)
        if len(bad) == total and total > 1:
            how = "their crc32c checksum" if "checksum" in str(err).lower() else f"to decode ({_describe(err)})"
            self.problem(
                "error",
                f"all {total} chunks fail {how}: the shard object or its index is damaged or truncated",
                name,
                f"shard {shard} (images {start}-{stop - 1})",
                shard,
            )
            return
        for index, c0, c1, chunk_err in bad or [(start // step, start, stop, err)]:
            self.problem(
                "error", _describe(chunk_err), name, f"chunk {index} (images {c0}-{c1 - 1}) in shard {shard}", shard
            )

    def check_labels(self, labels: np.ndarray, start: int, where: str) -> None:
        n = self.meta.num_classes
        bad = (labels < 0) | (labels >= n) if n else labels != -1
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            allowed = f"0 <= label < {n}" if n else "-1 (unlabelled data)"
            self.problem(
                "error",
                f"{int(bad.sum())} labels outside {allowed}, e.g. {int(labels[first])} at image {start + first}",
                "labels",
                where,
                start // self.meta.shard_images,
            )

    def object_size(self, key: str) -> int | None:
        try:
            return int(sync(self.store.getsize(key)))
        except (FileNotFoundError, KeyError):
            return None

    def check_leftovers(self) -> None:
        root = getattr(self.store, "root", None)
        if root is None:
            return
        partial = sorted(Path(root, self.split.group.path).rglob("*.partial"))
        if partial:
            self.problem(
                "warning",
                f"{len(partial)} temporary files of an interrupted write (e.g. "
                f"{partial[0].relative_to(root)}); --resume removes them",
            )


def _describe(err: Exception) -> str:
    text = str(err)
    if "checksum" in text.lower():
        return "crc32c checksum mismatch (the stored bytes are damaged)"
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"cannot decode ({type(err).__name__}: {text})"
