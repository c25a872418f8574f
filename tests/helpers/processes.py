"""Helpers for the reliability tests (no tests here): real processes killed at chosen points.

Real processes come from a ``multiprocessing`` forkserver whose server imports torch, timm, zarr and
featcache once; each child is a fresh fork of it (not of pytest, which has run threads), so a child
costs a fork instead of ~8 s of imports on a loaded 2-core machine. A child installs a *kill
point* (a patch that sends SIGKILL to its own process at one precise moment: between two tap
arrays of a shard, after a shard's data but before its completion record, ...) and then runs
the real code; the parent sees exit code -9, exactly as after ``kill -9``. Tests that need the
console script itself (interpreter exit, stderr of ``featcache``) use ``run_cli`` instead.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PRELOAD = [
    "torch",
    "timm",
    "zarr",
    "featcache.extraction",
    "featcache.training",
    "featcache.cli",
    "tests.helpers.processes",
]
NOISE = ("Traceback", "Exception ignored", "Task was destroyed", "was never retrieved")
TINY_ARGS = ["--model", "test_vit", "--model-kwargs", "img_size=32", "--weights", "random"]
# the extraction every reliability test uses: 24 images, 6 shards of 4, batches of 2 (so a batch can end mid-shard)
EXTRACT_KW: dict[str, Any] = dict(
    loader_workers=0, progress=False, chunk_images=2, shard_images=4, batch_size=2, device="cpu", dtype="float32"
)


# ---------------------------------------------------------------------------------------------
# Processes


def forkserver() -> Any:
    """The forkserver context (one server per pytest process, started on first use)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # only read when the server starts
    return ctx


def start_child(target: Callable[..., Any], *args: Any) -> Any:
    """Start ``target(*args)`` in a fresh process forked from the preloaded server."""
    proc = forkserver().Process(target=target, args=args)  # not daemonic: the CLI starts DataLoader workers
    proc.start()
    return proc


def run_child(target: Callable[..., Any], *args: Any, timeout: float = 240) -> int:
    """Run ``target(*args)`` in a child process; its exit code (-9 when it was killed with SIGKILL)."""
    proc = start_child(target, *args)
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"child {target.__name__}{args} did not finish in {timeout} s")
    return int(proc.exitcode)


def wait_for(predicate: Callable[[], bool], timeout: float = 120, proc: Any = None, every: float = 0.02) -> None:
    """Poll until ``predicate()``; fail when ``proc`` (a child or Popen) exits first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        alive = proc is None or (proc.is_alive() if hasattr(proc, "is_alive") else proc.poll() is None)
        if not alive:
            raise AssertionError("the process finished before the awaited moment; make it slower")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s")


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a ``featcache`` subprocess: no progress bars, one torch thread (bitwise-comparable runs)."""
    return {
        **os.environ,
        "FEATCACHE_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    }


def featcache_cmd() -> list[str]:
    """The installed console script (what a user runs), else the same entry point through python."""
    script = Path(sys.executable).parent / "featcache"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from featcache.cli import main; main()"]


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """``featcache ARGS`` in a real subprocess (exec'd: its own interpreter start and exit)."""
    return subprocess.run(
        [*featcache_cmd(), *args], capture_output=True, text=True, timeout=timeout, env=cli_env(**env), cwd=str(ROOT)
    )


def popen_cli(*args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*featcache_cmd(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(**env),
        cwd=str(ROOT),
        start_new_session=True,
    )


def assert_one_error_line(stderr: str, *needles: str) -> str:
    """stderr holds exactly one ``Error:`` line, no traceback or zarr noise, and every needle."""
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    for noise in NOISE:
        assert noise not in stderr, stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


# ---------------------------------------------------------------------------------------------
# Children (run in forkserver processes)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _child_setup(log: str | None) -> None:
    import torch
    from tqdm import tqdm

    torch.set_num_threads(1)
    # Ctrl-C as in a terminal, even when the test run itself was started in the background (a shell
    # starts background jobs with SIGINT ignored, and the forkserver's children inherit that)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tqdm.set_lock(threading.RLock())  # not tqdm's multiprocessing lock: a SIGKILLed child would leak its semaphore
    import numcodecs.blosc

    if not numcodecs.blosc._MUTEX_IS_INIT:  # the same for Blosc's (only for its own multi-process use)
        numcodecs.blosc._MUTEX, numcodecs.blosc._MUTEX_IS_INIT = threading.Lock(), True
    os.environ["FEATCACHE_PROGRESS"] = "0"
    if log is not None:  # this child's stderr (and stdout) into a file the parent reads
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 2)
        os.dup2(fd, 1)
        os.close(fd)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        sys.stdout = os.fdopen(1, "w", buffering=1)


def install_extract_kill_point(point: str) -> None:
    """Patch the extraction so that this process SIGKILLs itself at ``point`` (see EXTRACT_KILL_POINTS)."""
    import zarr

    import featcache.extraction as ex
    from featcache.backbone import Taps
    from featcache.store.feature_store import FeatureStore, SplitHandle

    from .stores import PROBE_FORWARDS

    if point == "store-created":  # root group written, the backbone's final norm not yet
        FeatureStore.write_final_norm = lambda self, final_norm: _die()  # type: ignore[method-assign]
    elif point == "split-half-created":  # some arrays of the split exist, its metadata does not
        real_create = zarr.Group.create_array

        def create_array(self: Any, name: str, *a: Any, **kw: Any) -> Any:
            if name == "block3":
                _die()
            return real_create(self, name, *a, **kw)

        zarr.Group.create_array = create_array  # type: ignore[method-assign]
    elif point == "mid-shard-compute":  # the 6th extraction forward: the second batch of shard 2
        real_forward, calls = Taps.forward, [0]

        def forward(self: Any, images: Any) -> Any:
            calls[0] += 1
            if calls[0] == PROBE_FORWARDS + 6:
                _die()
            return real_forward(self, images)

        Taps.forward = forward  # type: ignore[method-assign]
    elif point == "shard-half-written":  # shard 2: taps embed..block2 written, block3.., labels, ids not
        from featcache.store.shard_io import ShardIO

        real_write = ShardIO.write

        def write(self: Any, name: str, shard: int, rows: Any) -> None:
            if shard == 2 and name == "block3":
                _die()
            real_write(self, name, shard, rows)

        ShardIO.write = write  # type: ignore[method-assign]
    elif point == "mid-file-write":  # half of shard 2's block4 object in its temporary file, then death
        import featcache.store.shard_io as shard_io

        real_write_all = shard_io._write_all

        def write_all(fd: int, pieces: list[Any]) -> None:
            if "block4/c/2/" in os.readlink(f"/proc/self/fd/{fd}"):
                data = b"".join(bytes(p) for p in pieces)
                os.write(fd, data[: len(data) // 2])
                _die()
            real_write_all(fd, pieces)

        shard_io._write_all = write_all
    elif point == "before-record":  # shard 2's data durable, its completion record not yet set
        real_set = SplitHandle.set_complete

        def set_complete(self: Any, shard: int, done: bool = True) -> None:
            if shard == 2 and done:
                _die()
            real_set(self, shard, done)

        SplitHandle.set_complete = set_complete  # type: ignore[method-assign]
    elif point == "before-finalize":  # every shard complete, the extraction record not written
        ex.finalize_split = lambda split, seconds=None: _die()
    else:
        raise ValueError(point)


EXTRACT_KILL_POINTS = [
    "store-created",
    "split-half-created",
    "mid-shard-compute",
    "shard-half-written",
    "mid-file-write",
    "before-record",
    "before-finalize",
]


def child_extract(
    images: str,
    out: str,
    point: str | None,
    log: str | None = None,
    slow: float = 0.0,
    overrides: dict[str, Any] | None = None,
    own_group: bool = False,
) -> None:
    """Extract ``images`` into ``out`` as the tests' clean run does (``EXTRACT_KW`` with ``overrides``); die
    at ``point`` (None: finish). ``own_group``: lead a process group, so that a signal to the group reaches
    DataLoader workers too, as a terminal's Ctrl-C does. ``overrides["transform_threads"]``: the CPU
    default's in-process transform threads (the tests' torch runs 1 thread, which would mean none)."""
    if own_group:
        os.setsid()
    _child_setup(log)
    from featcache.data import open_source
    from featcache.errors import FeatcacheError
    from featcache.extraction import extract
    from featcache.manifest import BackboneSpec

    kw = {**EXTRACT_KW, **(overrides or {})}
    threads = kw.pop("transform_threads", None)
    if threads is not None:
        import featcache.loader

        featcache.loader.transform_threads = lambda workers, views: threads
    if point is not None:
        install_extract_kill_point(point)
    source = open_source(images) if not slow else SlowSource(open_source(images), slow)
    try:
        extract(BackboneSpec(model="test_vit", model_kwargs={"img_size": 32}, weights="random"), source, out, **kw)
    except FeatcacheError as err:  # as the CLI does
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


class SlowSource:
    """The same images, each ``delay`` seconds late: an extraction that others can watch or disturb."""

    def __init__(self, source: Any, delay: float) -> None:
        self.source, self.delay = source, delay
        self.spec, self.classes = source.spec, source.classes

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Any:
        time.sleep(self.delay)
        return self.source[index]

    def labels(self) -> np.ndarray:
        return self.source.labels()

    def ids(self) -> list[str]:
        return self.source.ids()


def child_cli(argv: list[str], log: str, setups: list[str] = ()) -> None:  # type: ignore[assignment]
    """``featcache ARGV`` (the console-script entry point) in this process, after installing ``setups``."""
    _child_setup(log)
    for setup in setups:
        _install_setup(setup)
    from featcache.cli import main

    sys.argv = ["featcache", *argv]
    main()


def _install_setup(setup: str) -> None:
    if setup == "small-shards":  # the tests' chunking (the CLI has no option for it)
        import featcache.extraction as ex

        ex.choose_chunking = lambda *a, **kw: (2, 4)
    elif setup == "file-size-limit-after-2-shards":  # a real OS error: writes beyond 2 KB fail with EFBIG
        import resource

        from featcache.store.feature_store import SplitHandle

        real_set = SplitHandle.set_complete

        def set_complete(self: Any, shard: int, done: bool = True) -> None:
            real_set(self, shard, done)
            if shard == 1:
                resource.setrlimit(resource.RLIMIT_FSIZE, (2048, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

        SplitHandle.set_complete = set_complete  # type: ignore[method-assign]
    else:
        raise ValueError(setup)


def install_train_kill_point(point: str) -> None:
    """Patch training so that this process SIGKILLs itself at ``point`` (see TRAIN_KILL_POINTS)."""
    import featcache.checkpoint as ck
    import featcache.rundir as rd
    import featcache.training as tr
    from featcache.member_bank import MemberBank
    from featcache.rundir import RunDir

    if point == "mid-epoch":  # epoch 3, step 4: two epochs' state saved
        real_step, _calls = MemberBank.train_step, [0]

        def train_step(self: Any, *a: Any, **kw: Any) -> Any:
            if kw.get("where", "").startswith("epoch 3 step 4"):
                _die()
            return real_step(self, *a, **kw)

        MemberBank.train_step = train_step  # type: ignore[method-assign]
    elif point == "after-member-files":  # epoch 2's member checkpoints written, its state not
        real_save = RunDir.save_state

        def save_state(self: RunDir, epoch: int, *a: Any, **kw: Any) -> None:
            if epoch == 1:
                _die()
            real_save(self, epoch, *a, **kw)

        RunDir.save_state = save_state  # type: ignore[method-assign]
    elif point == "mid-state":  # epoch 2's state directory half written, the pointer still at epoch 1
        real_write = rd.write_tensors

        def write_tensors(path: Path, *a: Any, **kw: Any) -> None:
            real_write(path, *a, **kw)
            if Path(path).parent.name == "epoch-0001":
                _die()

        rd.write_tensors = write_tensors
    elif point == "mid-file-write":  # epoch 2's last.safetensors in its temporary file, not renamed
        real_save_file = ck.save_file

        def save_file(tensors: Any, filename: str, metadata: Any = None) -> None:
            real_save_file(tensors, filename, metadata=metadata)
            if ".last.safetensors.tmp" in filename and (metadata or {}).get("epoch") == "2":
                _die()

        ck.save_file = save_file
    elif point == "before-metrics":  # epoch 2's state saved, metrics.jsonl still at epoch 1
        real_metrics = tr._write_metrics

        def write_metrics(out: Path, records: Any) -> None:
            if len(records[0].history) == 2:
                _die()
            real_metrics(out, records)

        tr._write_metrics = write_metrics
    else:
        raise ValueError(point)


TRAIN_KILL_POINTS = ["mid-epoch", "after-member-files", "mid-state", "mid-file-write", "before-metrics"]
TRAIN_KW: dict[str, Any] = dict(settings={"epochs": 4, "batch_size": 16}, grid={"lr": [1e-3, 3e-3]})


def child_train(store: str, out: str, point: str) -> None:
    """``train`` of the tests' sweep (LAST, 2 members, 4 epochs); die at ``point``."""
    _child_setup(None)
    from featcache.training import train

    install_train_kill_point(point)
    train(store, "last", out, TRAIN_KW["settings"], TRAIN_KW["grid"], progress=False)


def interrupted_run(monkeypatch: Any, epochs: int) -> Any:
    """A context manager: trainings inside it stop with Ctrl-C once ``epochs`` epochs' states are saved."""
    import contextlib

    from featcache.rundir import RunDir

    @contextlib.contextmanager
    def stopping() -> Any:
        real = RunDir.save_state

        def save_then_stop(self: Any, epoch: int, *a: Any, **kw: Any) -> None:
            real(self, epoch, *a, **kw)
            if epoch == epochs - 1:
                raise KeyboardInterrupt

        monkeypatch.setattr(RunDir, "save_state", save_then_stop)
        try:
            yield
        finally:
            monkeypatch.setattr(RunDir, "save_state", real)

    return stopping()
