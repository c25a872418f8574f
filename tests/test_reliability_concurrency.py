"""Concurrency with real processes: one writer per split (a crashed one does not block forever), and
readers that run during a write see completed shards only, with their final values."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

import featcache.extraction as extract_module
from featcache.cli import app
from featcache.errors import StoreError
from featcache.store.feature_store import FeatureStore
from featcache.store.lock import LockOwner
from featcache.store.reader import open_reader

from .helpers.processes import EXTRACT_KW, TINY_ARGS, assert_one_error_line, child_extract, start_child, wait_for
from .helpers.stores import assert_same_store, leftovers, run_extract, split_state


@pytest.fixture(scope="module")
def clean(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("clean") / "s.zarr"
    run_extract(images, out, **EXTRACT_KW)
    return split_state(out)


def completed(out: Path) -> int:
    try:
        return int(FeatureStore.open(out).split("train").completed_shards().sum())
    except StoreError:
        return 0


@pytest.mark.slow
def test_second_extraction_is_refused_and_a_killed_owner_does_not_block(
    images: Path, tmp_path: Path, clean: dict, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "s.zarr"
    first = start_child(child_extract, str(images), str(out), None, None, 0.15)  # a slow extraction
    try:
        wait_for(lambda: completed(out) >= 1, proc=first)
        lock = out / "_locks" / "train.lock"
        owner = LockOwner.parse(lock.read_bytes())
        assert owner is not None and owner.pid == first.pid and owner.host == socket.gethostname()
        args = [
            "extract",
            *TINY_ARGS,
            "--data",
            str(images),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--dtype",
            "float32",
            "--quiet",
        ]
        for extra in ([], ["--resume"], ["--overwrite"]):  # whatever the second one asks for
            r = CliRunner().invoke(app, [*args, *extra])
            assert r.exit_code == 1, r.output
            assert_one_error_line(
                r.stderr,
                f"split 'train' of {out} is being written by process {first.pid} on host {socket.gethostname()}",
                "then rerun with --resume",
            )
            assert LockOwner.parse(lock.read_bytes()) == owner  # the refusal did not touch the lock
        first.kill()  # kill -9 while it holds the lock
        first.join(30)
        assert first.exitcode == -9 and lock.exists()
    finally:
        if first.is_alive():
            first.kill()
            first.join()
    monkeypatch.setattr(extract_module, "choose_chunking", lambda *a, **kw: (2, 4))
    r = CliRunner().invoke(app, [*args, "--resume"])  # the dead owner's lock is stale: taken over
    assert r.exit_code == 0, r.output
    assert f"taking over the stale lock of split 'train': process {first.pid} on host" in caplog.text
    assert_same_store(split_state(out), clean)
    assert leftovers(out) == []


@pytest.mark.slow
def test_readers_during_a_write_see_only_completed_shards(images: Path, tmp_path: Path, clean: dict) -> None:
    """Open the store again and again while a real process writes it: every reader (ram and stream) yields
    exactly the images of shards completed when it opened, with the final values, and never fails otherwise."""
    out = tmp_path / "s.zarr"
    writer = start_child(child_extract, str(images), str(out), None, None, 0.1)
    seen: list[int] = []
    taps = ["embed", "block6"]
    try:
        while True:
            finished = not writer.is_alive()  # read once more after the writer ended: the whole split
            try:
                split = FeatureStore.open(out).split("train")
                mode = "stream" if len(seen) % 2 else "ram"
                reader = open_reader(split, taps, mode, batch_size=3, shuffle=False, block_images=2)
            except StoreError as err:  # no store, no split, or no completed shard yet: said clearly
                assert any(
                    s in str(err)
                    for s in (
                        "does not exist",
                        "not a featcache store",
                        "no split",
                        "no completed shard",
                        "no featcache metadata",
                    )
                ), err
                assert not finished, err
                time.sleep(0.05)
                continue
            usable = set(reader.indices.tolist())
            for k in range(6):  # whole shards or nothing
                assert len(usable & set(range(4 * k, 4 * k + 4))) in (0, 4), sorted(usable)
            got: list[int] = []
            for batch in reader.epoch(0):
                idx = batch.index.numpy()
                got += idx.tolist()
                for name in taps:  # the final values, never a shard being written
                    assert np.array_equal(batch.taps[name].numpy(), clean["arrays"][name][idx]), name
                assert np.array_equal(batch.labels.numpy(), clean["arrays"]["labels"][idx])
            assert sorted(got) == sorted(usable)
            seen.append(len(got))
            if finished:
                break
    finally:
        writer.join(120)
    assert writer.exitcode == 0
    assert seen[-1] == 24 and seen == sorted(seen)
    assert len({n for n in seen if 0 < n < 24}) >= 2, seen  # it did read mid-write, at two stages at least
    assert_same_store(split_state(out), clean)


def test_a_reader_keeps_one_snapshot_of_the_completion_records(
    images: Path, tmp_path: Path, clean: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race above, made deterministic: shard 5 completes while a reader is being opened. The reader yields the
    shards complete when it took its snapshot, in every mode; it neither overflows (ram) nor leaks the new shard
    into its epoch (stream)."""
    import zarr

    from featcache.store.feature_store import SplitHandle

    out = tmp_path / "s.zarr"
    run_extract(images, out, **EXTRACT_KW)
    zarr.open_array(str(out / "train" / "_complete"), mode="r+")[5] = 0  # not yet complete ...
    real, calls = SplitHandle.completed_shards, [0]

    def completing(self: SplitHandle) -> np.ndarray:
        calls[0] += 1
        done = real(self)
        if calls[0] > 2:  # ... until the reader's constructor has taken its snapshot (open_reader probes once first)
            done[5] = True
        return done

    monkeypatch.setattr(SplitHandle, "completed_shards", completing)
    for mode in ("ram", "stream"):
        calls[0] = 0
        reader = open_reader(FeatureStore.open(out).split("train"), ["block6"], mode, batch_size=5, shuffle=False)
        got = np.concatenate([b.index.numpy() for b in reader.epoch(0)])
        assert got.tolist() == list(range(20)) and reader.num_samples == 20, mode
