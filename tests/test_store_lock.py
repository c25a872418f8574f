"""SplitLock: a live owner is refused (other process, same process), a crashed owner's lock is taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from featcache.errors import StoreError, StoreLockedError
from featcache.store.lock import LockOwner, SplitLock, pid_alive


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not pid_alive(proc.pid)
    return proc.pid


def _write_owner(path: Path, pid: int, host: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host, "started": "2020-01-01T00:00:00+00:00"}))


def test_live_owner_in_another_process_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "s.zarr"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys, time
        from featcache.store.lock import SplitLock
        with SplitLock({str(store)!r}, "train"):
            print("held", flush=True)
            time.sleep(60)
        """),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=rf"process {holder.pid} on host {socket.gethostname()}.*--resume"):
            SplitLock(store, "train").acquire()
        SplitLock(store, "val").acquire()  # other splits are not blocked
    finally:
        holder.kill()
        holder.wait()
    with SplitLock(store, "train") as lock:  # killed owner: the kernel dropped its flock; the file is stale
        assert lock.held
        owner = LockOwner.parse((store / "_locks" / "train.lock").read_bytes())
        assert owner is not None and owner.pid != holder.pid


def test_same_process_second_lock_is_refused(tmp_path: Path) -> None:
    with SplitLock(tmp_path / "s.zarr", "train"):
        with pytest.raises(StoreLockedError):
            SplitLock(tmp_path / "s.zarr", "train").acquire()


def test_stale_lock_of_dead_pid_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.zarr" / "_locks" / "train.lock"
    dead = _dead_pid()
    _write_owner(path, dead, socket.gethostname())
    with SplitLock(tmp_path / "s.zarr", "train"):
        assert json.loads(path.read_text())["pid"] != dead
    assert f"process {dead}" in caplog.text and "stale" in caplog.text
    assert not path.exists() and not path.parent.exists()  # released: no lock files left


def test_unflocked_lock_of_live_pid_or_other_host_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.zarr" / "_locks" / "train.lock"
    _write_owner(path, 1, socket.gethostname())  # pid 1 is alive: cannot be a crashed extraction of ours
    with pytest.raises(StoreLockedError, match=f"delete {path}"):
        SplitLock(tmp_path / "s.zarr", "train").acquire()
    _write_owner(path, _dead_pid(), "another-host.example")
    with pytest.raises(StoreLockedError, match="another-host.example"):
        SplitLock(tmp_path / "s.zarr", "train").acquire()
    assert path.exists()  # refusals do not touch the lock


def test_failed_first_extract_leaves_no_directory(tmp_path: Path) -> None:
    store = tmp_path / "new.zarr"
    with SplitLock(store, "train"):
        assert store.is_dir()
    assert not store.exists()


def test_lock_on_a_file_path(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        SplitLock(f, "train").acquire()


def test_url_lock_live_and_stale(tmp_path: Path) -> None:
    import fsspec

    url = f"memory://lock-test-{uuid.uuid4().hex}"
    with SplitLock(url, "train"):
        with pytest.raises(StoreLockedError, match=f"process {__import__('os').getpid()}"):
            SplitLock(url, "train").acquire()
    fs = fsspec.filesystem("memory")
    root = url.split("://", 1)[1]
    assert not fs.exists(f"/{root}/_locks/train.lock")
    fs.pipe_file(f"/{root}/_locks/train.lock", json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}).encode())
    with SplitLock(url, "train"):
        owner = LockOwner.parse(fs.cat_file(f"/{root}/_locks/train.lock"))
        assert owner is not None and owner.pid == __import__("os").getpid()


def test_run_lock_refuses_a_second_holder_in_this_thread_and_in_others(tmp_path) -> None:
    import threading

    from featcache.rundir import RunLock

    run = tmp_path / "runs" / "a"
    with RunLock(run):
        with pytest.raises(StoreLockedError, match="is being trained into by process"):
            RunLock(run).acquire()  # the same thread again: a plain lock, no re-entrance
        assert (run.parent / ".a.lock").exists()  # the refusal did not drop the held lock
        errors: list[Exception] = []

        def other() -> None:
            try:
                RunLock(run).acquire()
            except StoreLockedError as err:
                errors.append(err)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert len(errors) == 1 and "is being trained into by process" in str(errors[0])
    assert not (run.parent / ".a.lock").exists()
    with RunLock(run):  # free again
        pass
