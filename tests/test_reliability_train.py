"""Training survives real failures: kill -9 anywhere in an epoch, Ctrl-C, a damaged or changed cache.

A resumed run must equal an uninterrupted one with the same seed: the bytes of every member's
best and last weights, and metrics.jsonl.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from featcache.backbone import Backbone
from featcache.cli import app
from featcache.manifest import BackboneSpec
from featcache.training import train

from .conftest import TINY_VIT, make_separable_images, write_tap_store
from .helpers.processes import (
    TRAIN_KILL_POINTS,
    TRAIN_KW,
    assert_one_error_line,
    child_cli,
    child_train,
    popen_cli,
    run_child,
    start_child,
    wait_for,
)
from .helpers.stores import flip_byte, hash_tree, leftovers, run_files, shard_file

LONG_EPOCHS = 40  # long enough that an outside kill lands mid-run (well under 0.1 s per epoch here)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, vit: Backbone) -> Path:
    """96 training and 48 test images, 3 classes, shards of 16."""
    path = tmp_path_factory.mktemp("cache") / "cache.zarr"
    for split, n, seed in (("train", 96, 0), ("test", 48, 1)):
        imgs, labels = make_separable_images(n, classes=3, seed=seed)
        write_tap_store(path, vit, imgs, labels, split)
    return path


@pytest.fixture(scope="module")
def short_run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The uninterrupted run of the kill-point tests: LAST, lr 1e-3 and 3e-3, 4 epochs."""
    out = tmp_path_factory.mktemp("short") / "run"
    train(str(store), "last", out, TRAIN_KW["settings"], TRAIN_KW["grid"], progress=False)
    return run_files(out)


def train_args(store: Path, out: Path, epochs: int = LONG_EPOCHS) -> list[str]:
    return [
        "train",
        str(store),
        "--method",
        "last",
        "--out",
        str(out),
        "--epochs",
        str(epochs),
        "--batch-size",
        "16",
        "--grid",
        "lr=1e-3,3e-3",
        "--quiet",
    ]


@pytest.fixture(scope="module")
def long_run(store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The uninterrupted run of the outside-kill tests, through the CLI."""
    out = tmp_path_factory.mktemp("long") / "run"
    r = CliRunner().invoke(app, train_args(store, out))
    assert r.exit_code == 0, r.output
    return run_files(out)


def saved_epoch(run: Path) -> int:
    try:
        return int(json.loads((run / "state" / "state.json").read_text())["epoch"]) + 1
    except (OSError, ValueError, KeyError):
        return 0


def resume_cli(store: Path, run: Path, epochs: int = LONG_EPOCHS) -> None:
    r = CliRunner().invoke(app, [*train_args(store, run, epochs), "--resume"])
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------------------------------------
# kill -9


@pytest.mark.slow
@pytest.mark.parametrize("point", TRAIN_KILL_POINTS)
def test_sigkill_at_any_point_of_an_epoch_then_resume_equals_uninterrupted(
    store: Path, tmp_path: Path, short_run: dict, point: str
) -> None:
    """A real training process SIGKILLs itself at a precise moment; --resume gives the uninterrupted result."""
    run = tmp_path / "run"
    assert run_child(child_train, str(store), str(run), point) == -signal.SIGKILL
    assert (
        saved_epoch(run)
        == {"mid-epoch": 2, "after-member-files": 1, "mid-state": 1, "mid-file-write": 1, "before-metrics": 2}[point]
    )
    if point == "mid-file-write":
        assert any(".tmp" in p.name for p in run.rglob("*"))
    resumed = train(str(store), "last", run, TRAIN_KW["settings"], TRAIN_KW["grid"], resume=True, progress=False)
    assert run_files(run) == short_run
    assert len(resumed["members"]) == 2 and leftovers(run) == []
    assert sorted(p.name for p in (run / "state").iterdir()) == ["epoch-0003", "state.json"]


@pytest.mark.slow
def test_sigkill_of_a_real_featcache_train_then_resume_equals_uninterrupted(
    store: Path, tmp_path: Path, long_run: dict
) -> None:
    """`featcache train` (the console script) killed from outside with SIGKILL after at least one epoch's state."""
    run = tmp_path / "run"
    proc = popen_cli(*train_args(store, run))
    try:
        wait_for(lambda: saved_epoch(run) >= 1, timeout=240, proc=proc, every=0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= saved_epoch(run) < LONG_EPOCHS
    resume_cli(store, run)
    assert run_files(run) == long_run
    assert leftovers(run) == []


# ---------------------------------------------------------------------------------------------
# Ctrl-C


@pytest.mark.slow
def test_ctrl_c_in_a_real_train_process_says_how_to_resume(store: Path, tmp_path: Path, long_run: dict) -> None:
    """SIGINT to a real process running `featcache train`: exit 130, one line saying how to resume; it resumes."""
    run, log = tmp_path / "run", tmp_path / "stderr.txt"
    proc = start_child(child_cli, train_args(store, run), str(log))
    try:
        wait_for(lambda: saved_epoch(run) >= 1, timeout=240, proc=proc, every=0.01)
        os.kill(proc.pid, signal.SIGINT)
    finally:
        proc.join(120)
    assert proc.exitcode == 130, log.read_text()
    line = assert_one_error_line(
        log.read_text(),
        f"interrupted: training in {run} stopped",
        "run the same featcache train command with --resume to continue",
    )
    assert f"state after epoch {saved_epoch(run)} of {LONG_EPOCHS}" in line
    resume_cli(store, run)
    assert run_files(run) == long_run


def test_ctrl_c_before_the_first_epoch_ends(
    store: Path, tmp_path: Path, short_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import featcache.member_bank as bank

    real = bank.MemberBank.train_step

    def interrupted(self: Any, *a: Any, **kw: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(bank.MemberBank, "train_step", interrupted)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, [*train_args(store, run, 4)])
    assert r.exit_code == 130
    assert_one_error_line(r.stderr, "no epoch had finished, so it starts from the beginning", "--resume")
    monkeypatch.setattr(bank.MemberBank, "train_step", real)
    resume_cli(store, run, 4)
    assert run_files(run) == short_run


# ---------------------------------------------------------------------------------------------
# The cache under the run


def test_damaged_cache_is_refused_by_name_and_leaves_no_run(store: Path, tmp_path: Path) -> None:
    damaged = Path(shutil.copytree(store, tmp_path / "damaged.zarr"))
    flip_byte(shard_file(damaged, "block6", 2), 30)
    run = tmp_path / "run"
    r = CliRunner().invoke(app, train_args(damaged, run, 2))
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "tap 'block6' of split 'train'", "images 32..47 (shard 2)", "--repair")
    assert not run.exists()


def test_damaged_cache_on_resume_leaves_the_run_as_it_was(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = CliRunner().invoke(app, train_args(store, run, 3))
    assert r.exit_code == 0, r.output
    damaged = Path(shutil.copytree(store, tmp_path / "damaged.zarr"))
    flip_byte(shard_file(damaged, "labels", 1), 3)
    before = hash_tree(run)
    r = CliRunner().invoke(app, [*train_args(damaged, run, 3), "--resume"])
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "array 'labels' of split 'train'", "--repair")
    assert hash_tree(run) == before


def test_resume_against_another_store_is_refused(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = CliRunner().invoke(app, train_args(store, run, 2))
    assert r.exit_code == 0, r.output
    other = tmp_path / "other.zarr"
    vit = Backbone(BackboneSpec(**{**TINY_VIT, "seed": 7}))  # other weights
    imgs, labels = make_separable_images(96, classes=3, seed=0)
    write_tap_store(other, vit, imgs, labels, "train")
    before = hash_tree(run)
    r = CliRunner().invoke(app, [*train_args(other, run, 2), "--resume"])
    assert r.exit_code == 1
    assert_one_error_line(
        r.stderr, "was trained on a store made with another weights", "resume with the store it started on"
    )
    assert hash_tree(run) == before


def test_incomplete_split_trains_on_its_completed_shards(
    store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    partial = Path(shutil.copytree(store, tmp_path / "partial.zarr"))
    zarr.open_array(str(partial / "train" / "_complete"), mode="r+")[1] = 0  # an extraction still running
    summary = train(str(partial), "linear", tmp_path / "run", {"epochs": 1}, progress=False)
    assert summary["members"][0]["metrics"]["train_loss"] > 0
    assert "training on the 80 of 96 images in completed shards" in caplog.text


def test_labels_outside_the_classes_are_refused(store: Path, tmp_path: Path) -> None:
    bad = Path(shutil.copytree(store, tmp_path / "bad.zarr"))
    arr = zarr.open_array(str(bad / "train" / "labels"), mode="r+")
    labels = np.asarray(arr[16:32])
    labels[3] = 7
    arr[16:32] = labels  # checksummed like any write: only verify's range check or training can tell
    r = CliRunner().invoke(app, train_args(bad, tmp_path / "run", 1))
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "holds label 7 (image 19) but has 3 classes", "--repair")
    assert not (tmp_path / "run").exists()
