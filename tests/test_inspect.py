"""inspect: the summary, --stats, --json schema, and --verify on damaged stores."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from featcache.cli import app
from featcache.errors import StoreError
from featcache.store.describe import RunningStats, describe_store, format_summary
from featcache.store.verify import verify_store

from .conftest import TINY_CNN
from .helpers.stores import run_extract


@pytest.fixture(scope="module")
def pristine(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete store: 24 images, 6 shards of 4 images, chunks of 2 images, float16."""
    out = tmp_path_factory.mktemp("pristine") / "s.zarr"
    run_extract(images, out)
    return out


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine store, to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "s.zarr"))


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_pristine_store_verifies(pristine: Path) -> None:
    report = verify_store(str(pristine))
    assert report.ok and report.errors == [] and report.warnings == []
    assert report.chunks_read == 7 * 12 + 6 + 6 + 6 + 2  # tap chunks, labels, ids, records, final norm


def test_flipped_byte_in_a_chunk_is_named(store: Path) -> None:
    _flip(store / "train" / "block3" / "c" / "1" / "0" / "0", 10)  # inside the first chunk of shard 1
    report = verify_store(str(store))
    assert not report.ok and len(report.errors) == 1
    assert report.errors[0].startswith("train/block3 chunk 2 (images 4-5) in shard 1: crc32c checksum mismatch")
    assert report.problems[0].array == "block3" and report.problems[0].split == "train"


def test_truncated_shard_is_named(store: Path) -> None:
    path = store / "train" / "embed" / "c" / "4" / "0" / "0"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    report = verify_store(str(store))
    assert [p.array for p in report.problems] == ["embed"]
    assert "shard 4 (images 16-19)" in report.errors[0] and "truncated" in report.errors[0]


def test_empty_and_missing_shard_objects(store: Path) -> None:
    (store / "train" / "block1" / "c" / "0" / "0" / "0").write_bytes(b"")  # zarr would read this as zeros
    (store / "train" / "block2" / "c" / "3" / "0" / "0").unlink()
    errors = verify_store(str(store)).errors
    assert any(e.startswith("train/block1 shard 0") and "empty" in e for e in errors)
    assert any(e.startswith("train/block2 shard 3") and "missing" in e for e in errors)


def test_labels_out_of_range_and_bad_records(store: Path) -> None:
    zarr.open_array(str(store / "train" / "labels"), mode="r+")[5] = 7
    zarr.open_array(str(store / "train" / "_complete"), mode="r+")[2] = 3
    errors = verify_store(str(store)).errors
    assert any(
        e.startswith("train/labels shard 1 (images 4-7)") and "outside 0 <= label < 3, e.g. 7 at image 5" in e
        for e in errors
    )
    assert any(e.startswith("train/_complete chunk 2") and "invalid completion record 3" in e for e in errors)


def test_wrong_shape_and_missing_array(store: Path) -> None:
    group = zarr.open_group(str(store / "train"), mode="r+")
    group.create_array("ids", shape=(5,), dtype=str, chunks=(5,), overwrite=True)
    shutil.rmtree(store / "train" / "block6")
    errors = verify_store(str(store)).errors
    assert "train/ids metadata: shape (5,) (expected (24,))" in errors
    assert "train/block6 metadata: array is missing" in errors


def test_incomplete_split_is_a_warning(store: Path) -> None:
    zarr.open_array(str(store / "train" / "_complete"), mode="r+")[4] = 0
    report = verify_store(str(store))
    assert report.ok and len(report.warnings) == 1 and "1 of 6 shards are not complete" in report.warnings[0]
    d = describe_store(str(store))
    assert d["splits"]["train"]["complete"] is False and d["splits"]["train"]["completed_samples"] == 20


def test_describe_schema(pristine: Path) -> None:
    d = describe_store(str(pristine), stats=True, verify=True)
    assert {"featcache_format", "backbone", "splits", "verify"} <= set(d)
    assert d["featcache_format"] == 2 and d["backbone"]["model"] == "test_vit"
    s = d["splits"]["train"]
    assert (
        s["num_samples"] == 24
        and s["complete"] is True
        and list(s["taps"]) == ["embed", "block1", "block2", "block3", "block4", "block5", "block6"]
    )
    assert s["label_counts"] == {"class_0": 8, "class_1": 8, "class_2": 8}
    tap = s["taps"]["block2"]
    assert tap["shape"] == [24, 5, 64] and tap["chunks"] == [2, 5, 64] and tap["shards"] == [4, 5, 64]
    assert tap["dtype"] == "float16" and tap["codecs"][-1] == "crc32c" and tap["stored_bytes"] > 0
    assert tap["nbytes"] == 24 * 5 * 64 * 2 and tap["compression_ratio"] == pytest.approx(
        tap["nbytes"] / tap["stored_bytes"]
    )
    assert set(tap["stats"]) == {
        "count",
        "mean",
        "std",
        "min",
        "max",
        "nan",
        "inf",
        "token_norm_mean",
        "token_norm_std",
    }
    assert d["verify"] == {**d["verify"], "ok": True, "errors": []}
    json.dumps(d)  # JSON-ready
    assert describe_store(str(pristine))["verify"] is None


def test_stats_match_numpy_and_count_nan_inf(store: Path) -> None:
    arr = zarr.open_array(str(store / "train" / "block4"), mode="r+")
    x = arr[:].astype(np.float32)
    shard = arr[4:8]
    shard[0, 0, 0], shard[1, 0, 0], shard[2, 0, 0] = np.nan, np.inf, -np.inf
    arr[4:8] = shard  # a whole shard, as the writer does
    x[4:8] = shard.astype(np.float32)
    stats = describe_store(str(store), stats=True)["splits"]["train"]["taps"]["block4"]["stats"]
    finite = x[np.isfinite(x)]
    assert stats["nan"] == 1 and stats["inf"] == 2 and stats["count"] == finite.size
    assert stats["mean"] == pytest.approx(float(finite.mean(dtype=np.float64)), rel=1e-6)
    assert stats["std"] == pytest.approx(float(finite.std(dtype=np.float64)), rel=1e-5)
    assert stats["min"] == float(finite.min()) and stats["max"] == float(finite.max())


def test_running_stats_merge_equals_one_pass() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(3, 2, size=n).astype(np.float32) for n in (5, 1000, 17)]
    s = RunningStats()
    for p in parts:
        s.update(p)
    allv = np.concatenate(parts)
    assert s.to_dict()["mean"] == pytest.approx(allv.mean(dtype=np.float64))
    assert s.to_dict()["std"] == pytest.approx(allv.std(dtype=np.float64))


def test_human_summary(pristine: Path) -> None:
    text = format_summary(describe_store(str(pristine), stats=True))
    assert "backbone  test_vit (vit), weights random" in text
    assert "split train: 24 images, complete, 6/6 shards" in text
    assert "block2  (24, 5, 64)  float16  (2, 5, 64)  (4, 5, 64)  crc32c" in text
    assert "class_1  8  33.3%" in text


def test_cnn_store_summary(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "cnn.zarr"
    run_extract(images, out, spec=TINY_CNN, limit=6, views=2)
    d = describe_store(str(out), verify=True)
    assert d["verify"]["ok"] and d["splits"]["train"]["views"] == 2
    assert d["splits"]["train"]["taps"]["head"]["shape"][:2] == [6, 2]


def test_unknown_split_and_missing_store(pristine: Path, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no split 'nope'"):
        describe_store(str(pristine), split="nope")
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "none.zarr")])
    assert r.exit_code == 1 and r.stderr.startswith("Error: store") and "does not exist" in r.stderr


def test_cli_inspect_json_is_only_json(pristine: Path) -> None:
    r = CliRunner().invoke(app, ["inspect", str(pristine), "--json", "--stats", "--verify", "--split", "train"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["verify"]["ok"] and "stats" in d["splits"]["train"]["taps"]["embed"]


def test_cli_verify_failure_exit_code_and_clean_stderr(store: Path) -> None:
    """A real process: problems on stdout, exit 1, and no zarr tracebacks at interpreter exit."""
    _flip(store / "train" / "block5" / "c" / "2" / "0" / "0", 3)
    path = store / "train" / "block1" / "c" / "5" / "0" / "0"
    path.write_bytes(path.read_bytes()[:-7])
    proc = subprocess.run(
        [sys.executable, "-c", "from featcache.cli import main; main()", "inspect", str(store), "--verify"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "FEATCACHE_PROGRESS": "0"},
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr and "Task" not in proc.stderr
    assert "verify    FAILED" in proc.stdout
    r = CliRunner().invoke(app, ["inspect", str(store), "--verify", "--json"])
    assert r.exit_code == 1
    for out in (proc.stdout, "\n".join(json.loads(r.stdout)["verify"]["errors"])):
        assert "train/block5 chunk 4 (images 8-9) in shard 2: crc32c checksum mismatch" in out
        assert "train/block1 shard 5 (images 20-23)" in out
