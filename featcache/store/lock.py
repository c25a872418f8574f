"""``SplitLock``: one writer per split, refused for a live owner, taken over from a crashed one.

The lock is ``<store>/_locks/<name>.lock`` holding JSON ``{pid, host, started, featcache_version}``.

- Local paths (the core): the file is held with ``fcntl.flock`` for the life of the lock, so the
  kernel releases it when the owner dies (Ctrl-C, kill -9). A file that is not flocked but still
  names an owner is stale when the owner ran on this host and its pid is gone; it is taken over
  (with a warning). An owner on another host, or a live pid that holds no flock (a reused pid),
  is refused: the message names the file to delete once the user is sure nothing runs.
- fsspec URLs (``memory://``, ``s3://``, ...): the lock object is created with exclusive create
  (``mode="xb"``, where the filesystem supports it, else check-then-write, which has a small race
  window). Staleness uses the same rule (same host, pid gone); an owner on another host can only
  be cleared by deleting the object. Object stores have no lease, so this is advisory: it stops a
  second ``featcache extract`` and nothing else.
The lock file is removed on release (and ``_locks`` when empty), so a finished store holds none.

``featcache.rundir.RunLock`` is the same mechanism for a training run directory.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from featcache import __version__
from featcache.errors import StoreError, StoreLockedError

log = logging.getLogger(__name__)

LOCKS_DIR = "_locks"  # lock files of running extractions, inside the store; not a Zarr node


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: recorded in the lock file."""

    pid: int
    host: str
    started: str = ""
    featcache_version: str = ""

    @classmethod
    def me(cls) -> "LockOwner":
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), now, __version__)

    @classmethod
    def parse(cls, data: bytes) -> "LockOwner | None":
        """The owner in a lock file's bytes; None for an empty or unreadable file (a crash while writing it)."""
        try:
            d = json.loads(data.decode() or "null")
            return cls(int(d["pid"]), str(d["host"]), str(d.get("started", "")), str(d.get("featcache_version", "")))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def is_stale(self) -> bool:
        """True when the owner ran on this host and its process is gone."""
        return self.host == socket.gethostname() and not pid_alive(self.pid)

    def describe(self) -> str:
        since = f" since {self.started}" if self.started else ""
        return f"process {self.pid} on host {self.host}{since}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _is_url(path: str) -> bool:
    return "://" in path


class SplitLock:
    """The write lock of one split of a store (or of the store itself while it is created).

    Use as a context manager; ``acquire`` raises ``StoreLockedError`` naming the live owner.
    """

    holder, work = "store", "extract"  # what the lock's directory is, what the owner does there (messages)

    def __init__(self, url: str | os.PathLike[str], name: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url, self.name, self.storage_options = str(url), name, storage_options
        self.held = False
        self._fd: int | None = None
        self._created_root = False

    @property
    def where(self) -> str:
        return f"{self.url.rstrip('/')}/{LOCKS_DIR}/{self.name}.lock"

    def __enter__(self) -> "SplitLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        if self.held:
            raise StoreError(f"lock {self.where} is already held by this SplitLock")
        if _is_url(self.url):
            self._acquire_url()
        else:
            self._acquire_file()
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if _is_url(self.url):
            self._release_url()
        else:
            self._release_file()

    def _refuse(self, owner: LockOwner | None, extra: str = "") -> StoreLockedError:
        who = owner.describe() if owner else "another process"
        return StoreLockedError(
            f"split {self.name!r} of {self.url} is being written by {who}{extra}; wait for it "
            f"to finish (or stop it), then rerun with --resume. If you are sure nothing is "
            f"writing it, delete {self.where}"
        )

    # -- local paths: flock + owner record
    def _acquire_file(self) -> None:
        root = Path(self.url)
        if root.exists() and not root.is_dir():
            raise StoreError(f"{self.holder} path {self.url} is a file, not a directory; choose another --out path")
        self._created_root = not root.exists()
        path = self._path()
        try:
            self._lock_file(path)
        except OSError as err:  # permission denied, read-only file system, disk full
            raise StoreError(
                f"cannot create the lock file {path} ({err.strerror or err}): the {self.holder} directory "
                f"must be writable (and its disk not full) to {self.work} into it"
            ) from None

    def _lock_file(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):  # retry when the file we locked was unlinked by a releasing owner meanwhile
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise StoreError(f"cannot lock {path} ({err})") from None
                raise self._refuse(LockOwner.parse(_read_quietly(path))) from None
            try:
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            owner = LockOwner.parse(os.pread(fd, 1 << 16, 0))
            if owner is not None:  # not flocked, yet it names an owner: a crash, or a pid we cannot check
                if not owner.is_stale():
                    os.close(fd)
                    raise self._refuse(
                        owner, " (its lock file is not held, but that process is alive or on another host)"
                    )
                log.warning("taking over the stale lock of split %r: %s is gone", self.name, owner.describe())
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, LockOwner.me().to_bytes(), 0)
                os.fsync(fd)
            except OSError:
                os.close(fd)
                raise
            self._fd = fd
            return
        raise StoreLockedError(f"could not lock {path}: other processes keep replacing it; try again")

    def _path(self) -> Path:
        return Path(self.url) / LOCKS_DIR / f"{self.name}.lock"

    def _release_file(self) -> None:
        path = self._path()
        try:
            path.unlink(missing_ok=True)  # while still flocked: a waiter sees the inode change and retries
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        for empty in self._emptied_dirs(path):
            try:
                empty.rmdir()  # only succeeds when empty
            except OSError:
                break

    def _emptied_dirs(self, path: Path) -> tuple[Path, ...]:
        """Directories to remove when empty after release: a failed first extract leaves nothing behind."""
        return (path.parent, Path(self.url)) if self._created_root else (path.parent,)

    # -- fsspec URLs: exclusive create + owner record
    def _fs(self) -> tuple[Any, str]:
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url, **(self.storage_options or {}))
        return fs, f"{root.rstrip('/')}/{LOCKS_DIR}/{self.name}.lock"

    def _acquire_url(self) -> None:
        fs, path = self._fs()
        me = LockOwner.me().to_bytes()
        for _ in range(3):
            try:
                with fs.open(path, "xb") as f:
                    f.write(me)
                return
            except FileExistsError:
                pass
            except (ValueError, NotImplementedError, TypeError):  # no exclusive create: check, then write
                if not fs.exists(path):
                    fs.pipe_file(path, me)
                    return
            try:
                owner = LockOwner.parse(fs.cat_file(path))
            except FileNotFoundError:
                continue
            if owner is not None and not owner.is_stale():
                raise self._refuse(owner)
            log.warning(
                "taking over the stale lock of split %r: %s",
                self.name,
                owner.describe() + " is gone" if owner else "unreadable lock object",
            )
            fs.rm_file(path)
        raise StoreLockedError(f"could not lock {self.where}: other processes keep replacing it; try again")

    def _release_url(self) -> None:
        fs, path = self._fs()
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def _read_quietly(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
