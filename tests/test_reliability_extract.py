"""Extraction survives real failures: kill -9 anywhere, a full or read-only disk, corruption (--repair).

Every recovery ends with the same check: the store equals the one an uninterrupted run writes
(every array bitwise, float32 taps; split metadata; manifest identity; final norm), verifies
clean, and holds no temporary or lock files.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import featcache.extraction as extract_module
from featcache.cli import app
from featcache.errors import CorruptionError
from featcache.store.feature_store import FeatureStore
from featcache.store.verify import verify_store

from .helpers.processes import (
    EXTRACT_KILL_POINTS,
    EXTRACT_KW,
    TINY_ARGS,
    assert_one_error_line,
    child_cli,
    child_extract,
    run_child,
)
from .helpers.stores import assert_same_store, flip_byte, hash_tree, leftovers, run_extract, shard_file, split_state


@pytest.fixture(scope="module")
def clean_store(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted extraction: 24 images, 6 shards of 4, chunks of 2, batches of 2, float32."""
    out = tmp_path_factory.mktemp("clean") / "s.zarr"
    run_extract(images, out, **EXTRACT_KW)
    return out


@pytest.fixture(scope="module")
def clean(clean_store: Path) -> dict[str, Any]:
    return split_state(clean_store)


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI has no chunking options: give it the tests' 6 shards of 4 images."""
    monkeypatch.setattr(extract_module, "choose_chunking", lambda *a, **kw: (2, 4))


def cli_extract(images: Path, out: Path, *extra: str) -> list[str]:
    """The CLI arguments of the clean run (with ``small_shards``)."""
    return [
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
        *extra,
    ]


def assert_recovered(out: Path, clean: dict[str, Any]) -> None:
    assert_same_store(split_state(out), clean)
    report = verify_store(str(out))
    assert report.ok and report.warnings == [], report.to_dict()
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------
# kill -9


@pytest.mark.slow
@pytest.mark.parametrize("point", EXTRACT_KILL_POINTS)
def test_sigkill_at_any_point_then_resume_equals_clean_run(
    images: Path, tmp_path: Path, clean: dict, point: str
) -> None:
    """A real process SIGKILLs itself at a precise moment of the extraction; --resume finishes the job."""
    out = tmp_path / "s.zarr"
    assert run_child(child_extract, str(images), str(out), point) == -signal.SIGKILL
    assert (out / "_locks").is_dir()  # a crashed owner's lock is left behind; the resume takes it over
    split_dir = out / "train"
    if point == "store-created":
        assert (out / "zarr.json").exists() and not (out / "_backbone").exists() and not split_dir.exists()
    elif point == "split-half-created":
        assert (split_dir / "block2" / "zarr.json").exists() and "featcache_split" not in (
            split_dir / "zarr.json"
        ).read_text()
    else:
        done = FeatureStore.open(out).split("train").completed_shards()
        if point == "mid-shard-compute":
            assert done.sum() <= 2 and not done[2:].any()
        elif point == "before-finalize":
            assert done.all() and "featcache_extraction" not in (split_dir / "zarr.json").read_text()
        else:
            assert done.tolist() == [True, True, False, False, False, False]
        if point == "shard-half-written":  # half of shard 2 on disk, no record
            assert shard_file(out, "block2", 2).exists() and not shard_file(out, "block3", 2).exists()
        if point == "before-record":  # all of shard 2 on disk, no record
            assert shard_file(out, "ids", 2).exists() and shard_file(out, "block6", 2).exists()
        if point == "mid-file-write":
            assert list(out.rglob("*.partial"))
    report = run_extract(images, out, **EXTRACT_KW, resume=True)
    assert report.complete
    assert_recovered(out, clean)


# ---------------------------------------------------------------------------------------------
# Disk full, permission denied


@pytest.mark.parametrize(
    "code,says",
    [(errno.ENOSPC, "the disk is full"), (errno.EACCES, "permission denied"), (errno.EROFS, "permission denied")],
)
def test_write_failure_keeps_completed_shards_and_resumes(
    images: Path,
    tmp_path: Path,
    clean: dict,
    clean_store: Path,
    monkeypatch: pytest.MonkeyPatch,
    small_shards: None,
    code: int,
    says: str,
) -> None:
    """A store whose disk fills up (or turns read-only) at shard 2: one clear error, shards 0-1 intact, resumable."""
    import zarr.storage._local as local

    import featcache.store.shard_io as shard_io

    real_put, real_write_all = local._put, shard_io._write_all

    def failing_put(path: Path, value: Any, exclusive: bool = False) -> int:
        if "/train/" in Path(path).as_posix() and "/c/2" in Path(path).as_posix():  # any object of shard 2
            raise OSError(code, os.strerror(code), str(path))
        return real_put(path, value, exclusive)

    def failing_write_all(fd: int, pieces: list[Any]) -> None:  # the tap shards, written directly
        path = os.readlink(f"/proc/self/fd/{fd}")
        if "/train/" in path and "/c/2/" in path:
            raise OSError(code, os.strerror(code), path)
        real_write_all(fd, pieces)

    monkeypatch.setattr(local, "_put", failing_put)
    monkeypatch.setattr(shard_io, "_write_all", failing_write_all)
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(app, cli_extract(images, out))
    assert r.exit_code == 1, r.output
    assert_one_error_line(
        r.stderr,
        "(shard 2 of split 'train')",
        says,
        "2 of 6 shards of split 'train' are complete and kept",
        "then run the same featcache extract command with --resume",
    )
    monkeypatch.setattr(local, "_put", real_put)  # space freed, permissions fixed
    monkeypatch.setattr(shard_io, "_write_all", real_write_all)
    split = FeatureStore.open(out).split("train")
    assert split.completed_shards().tolist() == [True, True, False, False, False, False]
    assert verify_store(str(out)).ok and leftovers(out) == []  # no lock, no temporary files
    for k in (0, 1):  # the completed shards hold exactly the clean run's data
        for name in ("embed", "block6", "labels"):
            assert np.array_equal(split.read(name, 4 * k, 4 * k + 4), clean["arrays"][name][4 * k : 4 * k + 4])
    r = CliRunner().invoke(app, cli_extract(images, out, "--resume"))
    assert r.exit_code == 0, r.output
    assert_recovered(out, clean)


@pytest.mark.slow
def test_real_file_size_limit_mid_run(images: Path, tmp_path: Path, clean: dict, small_shards: None) -> None:
    """A real OS write failure (RLIMIT_FSIZE: EFBIG) after 2 shards, in a real `featcache extract` process."""
    out, log = tmp_path / "s.zarr", tmp_path / "stderr.txt"
    code = run_child(child_cli, cli_extract(images, out), str(log), ["small-shards", "file-size-limit-after-2-shards"])
    assert code == 1, log.read_text()
    assert_one_error_line(
        log.read_text(), "(shard 2 of split 'train')", "a file size limit was hit", "2 of 6 shards", "--resume"
    )
    assert FeatureStore.open(out).split("train").completed_shards().tolist() == [True] * 2 + [False] * 4
    assert leftovers(out) == []
    r = CliRunner().invoke(app, cli_extract(images, out, "--resume"))
    assert r.exit_code == 0, r.output
    assert_recovered(out, clean)


def test_unwritable_store_directory_is_one_clear_error(
    images: Path, tmp_path: Path, clean_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featcache.store.lock import SplitLock

    def denied(self: Any, path: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(SplitLock, "_lock_file", denied)
    store = Path(shutil.copytree(clean_store, tmp_path / "s.zarr"))
    before = hash_tree(store)
    r = CliRunner().invoke(app, cli_extract(images, store, "--resume"))
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "cannot create the lock file", "Permission denied", "must be writable")
    assert hash_tree(store) == before


# ---------------------------------------------------------------------------------------------
# Corruption: --repair


def _damage_everything_but_shards_0_and_2(store: Path) -> None:
    flip_byte(shard_file(store, "block3", 1), 40)  # a flipped byte inside a chunk
    path = shard_file(store, "embed", 4)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated shard object
    shard_file(store, "block2", 3).unlink()  # a lost shard object
    flip_byte(shard_file(store, "labels", 3), 5)  # a damaged labels chunk
    flip_byte(store / "train" / "_complete" / "c" / "5", 0)  # a damaged completion record
    flip_byte(store / "_backbone" / "norm_weight" / "c" / "0", 7)  # the backbone's final norm


def test_repair_recomputes_exactly_the_damaged_shards(
    images: Path, tmp_path: Path, clean: dict, clean_store: Path, small_shards: None
) -> None:
    store = Path(shutil.copytree(clean_store, tmp_path / "s.zarr"))
    _damage_everything_but_shards_0_and_2(store)
    report = verify_store(str(store))
    assert {p.shard for p in report.problems if p.severity == "error"} >= {1, 3, 4, 5}
    intact = {k: hash_tree(shard_file(store, "block4", k)) for k in (0, 2)}
    r = CliRunner().invoke(app, cli_extract(images, store, "--resume", "--repair", "--quiet"))
    assert r.exit_code == 0, r.output
    assert {k: hash_tree(shard_file(store, "block4", k)) for k in (0, 2)} == intact  # not rewritten
    assert_recovered(store, clean)


def test_repair_via_library_reports_the_shards(images: Path, tmp_path: Path, clean: dict, clean_store: Path) -> None:
    store = Path(shutil.copytree(clean_store, tmp_path / "s.zarr"))
    flip_byte(shard_file(store, "block5", 2), 30)
    report = run_extract(images, store, **EXTRACT_KW, resume=True, repair=True)
    assert report.shards_repaired == [2] and report.shards_written == 1
    assert "1 damaged shard(s) repaired: 2" in report.summary_line()
    assert_recovered(store, clean)


def test_repair_refuses_damage_it_cannot_fix_and_changes_nothing(
    images: Path, tmp_path: Path, clean_store: Path, small_shards: None
) -> None:
    store = Path(shutil.copytree(clean_store, tmp_path / "s.zarr"))
    flip_byte(shard_file(store, "block1", 1), 30)  # repairable ...
    shutil.rmtree(store / "train" / "block6")  # ... but a whole array is gone: its metadata too
    before = hash_tree(store)
    r = CliRunner().invoke(app, cli_extract(images, store, "--resume", "--repair"))
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "cannot repair split 'train'", "block6", "re-extract the split with --overwrite")
    assert hash_tree(store) == before


def test_resume_without_repair_names_the_damage_and_the_fix(
    images: Path, tmp_path: Path, clean_store: Path, small_shards: None
) -> None:
    store = Path(shutil.copytree(clean_store, tmp_path / "s.zarr"))
    zarr.open_array(str(store / "train" / "_complete"), mode="r+")[5] = 0  # an unfinished extraction ...
    flip_byte(shard_file(store, "ids", 1), 3)  # ... whose finished shard 1 has damaged ids
    before = hash_tree(store)
    r = CliRunner().invoke(app, cli_extract(images, store, "--resume"))
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "array 'ids' of split 'train'", "(shard 1)", "--resume --repair")
    assert hash_tree(store) == before


def test_inspect_stats_on_a_damaged_store_names_the_chunk(tmp_path: Path, clean_store: Path) -> None:
    store = Path(shutil.copytree(clean_store, tmp_path / "s.zarr"))
    flip_byte(shard_file(store, "block2", 3), 30)
    r = CliRunner().invoke(app, ["inspect", str(store), "--stats"])
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "tap 'block2' of split 'train'", "shard 3", "--repair")
    r = CliRunner().invoke(app, ["inspect", str(store), "--verify", "--json"])  # describing it never fails
    assert r.exit_code == 1 and "train/block2 chunk" in r.stdout and "in shard 3" in r.stdout


@pytest.mark.slow
def test_corruption_end_to_end_in_real_processes(images: Path, tmp_path: Path, clean: dict, clean_store: Path) -> None:
    """`featcache train` refuses a damaged cache and names it; `extract --resume --repair` exits 0; in both the
    user's stderr holds no zarr background-task noise (exec'd processes: interpreter exit included)."""
    damaged = Path(shutil.copytree(clean_store, tmp_path / "damaged.zarr"))
    for k in (1, 3):  # both chunks of two shards: a multi-chunk read fails with sibling reads in flight
        for offset in (20, 400):
            flip_byte(shard_file(damaged, "block6", k), offset)
    for_train = Path(shutil.copytree(damaged, tmp_path / "for_train.zarr"))
    run = tmp_path / "run"
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for args, env in _both(for_train, run, damaged, images)
    ]
    (train_out, train_err), (repair_out, repair_err) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 1, train_err
    assert_one_error_line(
        train_err,
        "tap 'block6' of split 'train'",
        "(shard 1)",
        "featcache inspect --verify",
        "featcache extract --resume --repair",
    )
    assert not run.exists()  # a refused run leaves no run directory behind
    assert procs[1].returncode == 0, repair_err
    for noise in ("Traceback", "Exception ignored", "Task was destroyed", "never retrieved", "Error"):
        assert noise not in repair_err, repair_err
    assert "2 damaged shard(s) repaired: 1, 3" in repair_err
    assert_recovered(damaged, clean)


def _both(for_train: Path, run: Path, damaged: Path, images: Path) -> list[tuple[list[str], dict[str, str]]]:
    from .helpers.processes import cli_env, featcache_cmd

    train = [
        *featcache_cmd(),
        "train",
        str(for_train),
        "--method",
        "linear",
        "--out",
        str(run),
        "--epochs",
        "1",
        "--quiet",
    ]
    repair = [
        *featcache_cmd(),
        "extract",
        *TINY_ARGS,
        "--data",
        str(images),
        "--out",
        str(damaged),
        "--resume",
        "--repair",
        "--dtype",
        "float32",
    ]  # chunking and batch size: the recorded ones
    return [(train, cli_env()), (repair, cli_env())]


# ---------------------------------------------------------------------------------------------
# zarr's background tasks


_LEFT_RUNNING = textwrap.dedent("""
    import atexit, sys
    left = []  # registered first, so it runs last: after zarr's own atexit hook closed zarr's event loop
    atexit.register(lambda: print("sibling read at exit:", "done" if left[0].done() else "pending"))
    import asyncio
    if sys.argv[1] == "featcache":
        import featcache.store.zarr_shutdown  # noqa: F401
    from zarr.core.sync import sync

    async def bad_chunk():
        raise ValueError("Stored and computed checksum do not match")

    async def other_chunk():  # still being read when the first one fails
        left.append(asyncio.current_task())
        await asyncio.sleep(0.3)
        raise ValueError("Stored and computed checksum do not match")

    async def read():  # what zarr's concurrent_map does: gather, no cancellation of the siblings
        await asyncio.gather(bad_chunk(), other_chunk())

    try:
        sync(read())
    except ValueError:
        print("caught")
""")


def test_zarr_reads_left_running_after_a_failure_are_settled_before_zarr_closes_its_loop() -> None:
    """The cause of 'Task was destroyed ...' / 'Exception ignored ... Traceback' after a clean exit: a failed
    multi-chunk read leaves sibling reads running, and zarr's atexit hook destroys them. Plain zarr: still
    pending when its loop closes; with featcache's hook: finished first."""
    runs = {
        who: subprocess.run([sys.executable, "-c", _LEFT_RUNNING, who], capture_output=True, text=True, timeout=120)
        for who in ("zarr", "featcache")
    }
    assert all(r.returncode == 0 for r in runs.values()), runs
    assert runs["zarr"].stdout.split() == ["caught", "sibling", "read", "at", "exit:", "pending"]
    assert runs["featcache"].stdout.split() == ["caught", "sibling", "read", "at", "exit:", "done"]
    assert runs["featcache"].stderr == ""


def test_settle_pending_io_waits_for_reads_left_running(clean_store: Path, tmp_path: Path) -> None:
    """In process: a failed read of a damaged shard leaves zarr work in flight; settling finishes all of it."""
    import asyncio

    from zarr.core.sync import sync

    from featcache.store.zarr_shutdown import settle_pending_io

    store = Path(shutil.copytree(clean_store, tmp_path / "s.zarr"))
    for k in range(6):
        flip_byte(shard_file(store, "block1", k), 20)
    arr = zarr.open_array(str(store / "train" / "block1"), mode="r")

    async def others() -> int:
        return len([t for t in asyncio.all_tasks() if t is not asyncio.current_task()])

    with pytest.raises(ValueError, match="checksum"):
        arr[:]
    settle_pending_io()
    assert sync(others()) == 0


# ---------------------------------------------------------------------------------------------
# Checksums catch any flipped or truncated byte


def _probes(store: Path) -> dict[str, tuple[Path, str, Callable[[], Any]]]:
    """One stored object of each kind, and the featcache read that consumes it (a fresh handle each time)."""
    from featcache.store.reader import open_reader

    def split() -> Any:
        return FeatureStore.open(store).split("train")

    def ids() -> Any:
        s = split()
        s.require_objects("ids", [2])  # as resume checks the ids of completed shards
        return s.ids(8, 12)

    def records() -> Any:  # a damaged record may read as "not complete" (recomputed by resume), never as garbage
        done = split().completed_shards()
        assert done.tolist() in ([True] * 6, [True, True, False, True, True, True])
        if not done[2]:
            raise CorruptionError("array '_complete' of split 'train': record 2 reads as not complete")

    return {
        "tap shard (chunks + index)": (
            shard_file(store, "block4", 2),
            "block4",
            lambda: open_reader(split(), ["block4"], "ram"),
        ),
        "labels chunk": (shard_file(store, "labels", 2), "labels", lambda: open_reader(split(), ["embed"], "ram")),
        "ids chunk": (shard_file(store, "ids", 2), "ids", ids),
        "completion record": (store / "train" / "_complete" / "c" / "2", "_complete", records),
    }


def test_every_flipped_or_truncated_byte_is_caught(clean_store: Path, tmp_path: Path) -> None:
    """Flip each byte (all of them for small objects; a spread plus the whole shard index for shard objects) and
    truncate at every length (a spread for shard objects, 0 included): every read featcache makes of the object is
    a CorruptionError naming the array, and verify names it too. Nothing damaged ever reads back as data."""
    store = Path(shutil.copytree(clean_store, tmp_path / "s.zarr"))
    checked = 0
    for kind, (path, array, probe) in _probes(store).items():
        original = path.read_bytes()
        n = len(original)
        index = 2 * 16 + 4  # a shard's index: (offset, length) per chunk and its crc32c, at the end
        flips = range(n) if n <= 256 else sorted({*range(0, n, 53), *range(n - index - 4, n)})
        cuts = range(n) if n <= 256 else sorted({*range(0, n, 331), *range(n - index - 4, n, 3)})
        damaged = [("flip", i) for i in flips] + [("cut", c) for c in cuts]
        for how, at in damaged:
            data = bytearray(original)
            if how == "flip":
                data[at] ^= 0xFF
            else:
                data = data[:at]
            path.write_bytes(bytes(data))
            with pytest.raises(CorruptionError, match=f"'{array}' of split 'train'"):
                probe()
            checked += 1
            if (how, at) in (damaged[len(damaged) // 3], damaged[-1], ("cut", 0)):  # verify reads all: a sample
                errors = verify_store(str(store)).errors
                assert errors and all(e.startswith(f"train/{array} ") for e in errors), (kind, how, at, errors)
        path.write_bytes(original)
    assert checked > 300
    assert verify_store(str(store)).ok
