"""Stores made and compared by tests: a small extraction, its arrays, hashes of files, damaged bytes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featcache.backbone import Backbone
from featcache.extraction import ExtractReport, extract, open_split_source
from featcache.loader import TransformedDataset
from featcache.manifest import BackboneSpec
from featcache.store.feature_store import FeatureStore

from ..conftest import TINY_VIT

PROBE_FORWARDS = 1  # the forward of --compressor auto's probe batch, before the extraction's own
FAST = dict(loader_workers=0, progress=False, chunk_images=2, shard_images=4, batch_size=4, durable=False, device="cpu")


def run_extract(data: Path | str, out: Path | str, spec: dict[str, Any] | None = None, **kw: Any) -> ExtractReport:
    """``extract`` with the tiny ViT and small chunks/shards (6 shards of 4 images for 24 images)."""
    return extract(BackboneSpec(**(spec or TINY_VIT)), str(data), out, **{**FAST, **kw})


def read_split(out: Path | str, split: str = "train") -> dict[str, np.ndarray]:
    """Every array of a split as numpy (taps, labels, ids, completion records)."""
    handle = FeatureStore.open(out).split(split)
    arrays = {name: np.asarray(handle.group[name][:]) for name in handle.array_names()}
    arrays["ids"] = np.asarray([str(v) for v in arrays["ids"]])
    return arrays


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name]), f"array {name} differs"


def reference_taps(
    spec: dict[str, Any], data: Path | str, batch_size: int, shard_images: int, limit: int | None = None
) -> dict[str, torch.Tensor]:
    """``Backbone.taps`` of the transformed images, in the batches extraction uses (within shards)."""
    backbone = Backbone(BackboneSpec(**spec))
    ds = TransformedDataset(open_split_source(str(data), limit), backbone.transform)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    outs: dict[str, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for s0 in range(0, len(x), shard_images):
            for b0 in range(s0, min(s0 + shard_images, len(x)), batch_size):
                taps = backbone.taps(x[b0 : min(b0 + batch_size, s0 + shard_images, len(x))])
                for name, t in taps.items():
                    outs.setdefault(name, []).append(t)
    return {name: torch.cat(ts) for name, ts in outs.items()}


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root, and every directory (so that new empty directories show too)."""
    root = Path(root)
    if not root.exists():
        return {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def flip_byte(path: Path, offset: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0xFF
    path.write_bytes(bytes(data))


def shard_file(store: Path, array: str, shard: int, split: str = "train") -> Path:
    """The object of one shard of a tap array (chunk key c/<shard>/0/0) or of labels/ids (c/<shard>)."""
    base = store / split / array / "c" / str(shard)
    return base / "0" / "0" if (base / "0").is_dir() else base


def split_state(store: Path, split: str = "train") -> dict[str, Any]:
    """Every array of a split as numpy, its metadata, and the store's final norm: what 'equal stores' means."""
    from featcache.store.feature_store import FeatureStore

    fs = FeatureStore.open(store)
    handle = fs.split(split)
    arrays = {name: np.asarray(handle.array(name)[:]) for name in handle.array_names()}
    arrays["ids"] = np.asarray([str(v) for v in arrays["ids"]])
    norm = fs.final_norm() or {}
    arrays.update({f"norm_{k}": v.numpy() for k, v in norm.items()})
    return {
        "arrays": arrays,
        "meta": handle.meta.to_attrs(),
        "identity": fs.manifest.identity(),
        "finished": "featcache_extraction" in handle.group.attrs.asdict(),
    }


def assert_same_store(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["meta"] == b["meta"] and a["identity"] == b["identity"] and a["finished"] == b["finished"]
    assert a["arrays"].keys() == b["arrays"].keys()
    for name, x in a["arrays"].items():
        y = b["arrays"][name]
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), f"array {name} differs"


def leftovers(root: Path) -> list[str]:
    """Temporary files of interrupted writes and lock files."""
    return sorted(
        str(p.relative_to(root))
        for p in Path(root).rglob("*")
        if p.name.endswith(".partial") or ".tmp" in p.name or p.name == "_locks"
    )


def run_files(run: Path) -> dict[str, bytes]:
    """What must be equal between a resumed and an uninterrupted run: member weights and metrics."""
    run = Path(run)
    files = {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.glob("members/*/*.safetensors"))}
    files["metrics.jsonl"] = (run / "metrics.jsonl").read_bytes()
    best = {k: v for k, v in json.loads((run / "best.json").read_text()).items() if k != "checkpoint"}  # a path
    files["best.json"] = json.dumps(best, sort_keys=True).encode()
    return files
