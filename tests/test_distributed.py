"""featcache.distributed (cluster, extraction, training): cluster extraction equals one process, lost workers,
s3:// stores, sweeps, CLI, errors.

One local cluster of 2 spawned worker processes serves the whole module (starting one costs seconds);
it starts after the module's S3 server (moto on 127.0.0.1, a free port), so that the workers inherit
the standard AWS variables that point at it. Faults are injected with worker plugins, which run inside
the worker processes. The test that kills a worker runs last: its worker comes back only seconds later.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import dask
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from distributed import Client
from distributed.diagnostics.plugin import WorkerPlugin

from featcache.backbone import Backbone
from featcache.checkpoint import load_checkpoint
from featcache.cli import app
from featcache.distributed import cluster as dist_cluster
from featcache.distributed import extraction as dist_extraction
from featcache.distributed.cluster import cluster_client
from featcache.distributed.extraction import extract_on_cluster, plan_tasks
from featcache.distributed.training import plan_parts, train_on_cluster
from featcache.errors import ClusterError, ConfigError, DataError, StoreLockedError, UsageError
from featcache.extraction import ExtractOptions, open_split_source
from featcache.loader import cpu_count
from featcache.manifest import BackboneSpec
from featcache.store.describe import describe_store
from featcache.store.feature_store import FeatureStore
from featcache.store.lock import pid_alive
from featcache.store.verify import verify_store
from featcache.sweep import expand
from featcache.tensorboard_log import tensorboard_installed
from featcache.training import train

from .conftest import TINY_VIT, make_separable_images, write_tap_store
from .helpers.processes import TINY_ARGS
from .helpers.stores import FAST, assert_same_arrays, read_split, run_extract
from .helpers.tensorboard_events import read_scalars

SPEC = BackboneSpec(**TINY_VIT)
BUCKET = "featcache-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer at {url}")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """moto's S3 server with one bucket; the AWS_* variables point at it for this module."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        _wait_until_up(endpoint, proc)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(key, raising=False)
            s3fs_client().mkdir(BUCKET)
            yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def s3fs_client() -> Any:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture(scope="module")
def client(s3: dict[str, str]) -> Iterator[Client]:
    """2 local workers, started after the AWS variables are set (the spawned workers inherit them)."""
    with cluster_client(workers=2, device="cpu") as c:
        yield c


@pytest.fixture(scope="module")
def reference(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Every array of a one-process extraction (float32: any difference in the computation shows)."""
    out = tmp_path_factory.mktemp("ref") / "s.zarr"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the 2 workers on this 2-core machine
    try:
        run_extract(images, out, dtype="float32")
    finally:
        torch.set_num_threads(before)
    return read_split(out)


def cluster_extract(client: Client, images: Path, out: Path, **kw: Any) -> Any:
    return extract_on_cluster(SPEC, str(images), out, client=client, **{**FAST, "dtype": "float32", **kw})


def _extract_args(images: Path, out: str, *extra: str) -> list[str]:
    return [
        "extract",
        *TINY_ARGS,
        "--data",
        str(images),
        "--out",
        out,
        "--quiet",
        "--batch-size",
        "4",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------
# Extraction


def test_cluster_extraction_equals_one_process(client: Client, images: Path, reference: dict, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    report = cluster_extract(client, images, out)
    assert report.complete and report.status == "created" and report.shards_written == 6
    assert report.workers == 2 and report.rounds == 1
    assert len(set(report.shard_workers.values())) == 2  # both workers wrote shards
    assert report.model_loads <= 2  # the model is loaded once per worker, not once per shard
    assert_same_arrays(read_split(out), reference)
    assert verify_store(str(out)).ok and not (out / "_locks").exists()
    assert "featcache_extraction" in FeatureStore.open(out).split("train").group.attrs  # finalized by the client
    again = cluster_extract(client, images, out, resume=True)  # the records say everything is done
    assert again.shards_written == 0 and again.complete and again.rounds == 0


def test_cluster_resume_computes_only_missing_shards(
    client: Client, images: Path, reference: dict, tmp_path: Path
) -> None:
    out = tmp_path / "s.zarr"
    cluster_extract(client, images, out)
    split = FeatureStore.open(out, "r+").split("train")
    for k in (1, 4):
        split.set_complete(k, False)
        split.tap("block3")[k * 4 : (k + 1) * 4] = 0  # as if never written
    report = cluster_extract(client, images, out, resume=True, shards_per_task=3)  # one task: shards 1 and 4
    assert report.status == "resumed" and sorted(report.shard_workers) == [1, 4]
    assert_same_arrays(read_split(out), reference)


def test_task_skips_shards_whose_record_is_set(images: Path, reference: dict, tmp_path: Path) -> None:
    """A task tried again after its worker died between a shard's record and its report writes that shard once."""
    out = tmp_path / "s.zarr"
    run_extract(images, out, dtype="float32")
    split = FeatureStore.open(out, "r+").split("train")
    split.set_complete(1, False)
    opts = ExtractOptions(**{**FAST, "dtype": "float32"})
    job = dist_extraction._shard_job(
        SPEC, Backbone(SPEC), open_split_source(str(images)), split, str(out), str(images), opts
    )
    result = dist_extraction.extract_shards_task(job, [0, 1, 2])  # in this process: the task function itself
    assert result["skipped"] == [0, 2] and result["shards"] == [1] and result["images"] == 4
    assert_same_arrays(read_split(out), reference)


def _worker_settings() -> dict[str, Any]:
    import zarr

    return {
        "torch": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "zarr_pool": zarr.config.get("threading.max_workers"),
        "zarr_concurrency": zarr.config.get("async.concurrency"),
        "malloc_trim": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "wait": os.environ.get("OMP_WAIT_POLICY"),
    }


def test_workers_get_their_share_of_the_machine(client: Client) -> None:
    share = max(1, cpu_count() // 2)
    expected = {
        "torch": share,
        "omp": str(share),
        "zarr_pool": share,
        "zarr_concurrency": 4,
        "malloc_trim": None,
        "wait": "PASSIVE",
    }
    assert list(client.run(_worker_settings).values()) == [expected, expected]
    assert all(w["nthreads"] == 1 for w in client.scheduler_info(n_workers=-1)["workers"].values())


def test_plan_tasks_groups_consecutive_shards() -> None:
    assert plan_tasks(list(range(6)), workers=2) == [[0], [1], [2], [3], [4], [5]]
    assert plan_tasks(list(range(20)), workers=2) == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
        [9, 10, 11],
        [12, 13, 14],
        [15, 16, 17],
        [18, 19],
    ]
    assert plan_tasks([1, 4, 5], workers=1, shards_per_task=2) == [[1, 4], [5]]


class ShardFault(WorkerPlugin):
    """Inside the worker, once (``marker`` records it): writing shard ``shard`` raises OSError (a transient
    storage error), or with ``kill`` the worker SIGKILLs itself after the shard's arrays are written and
    before its completion record (``marker`` then holds the killed pid)."""

    def __init__(self, marker: str, shard: int, kill: bool = False) -> None:
        self.marker, self.shard, self.kill = marker, shard, kill

    def setup(self, worker: Any) -> None:
        import featcache.store.writer as writer

        real = writer.write_complete_shard
        self.real = real

        def write(split: Any, data: Any, durable: bool = True) -> None:
            if data.shard == self.shard and not os.path.exists(self.marker):
                if not self.kill:
                    Path(self.marker).write_text("failed")
                    raise OSError("injected: connection reset by peer")
                split.write_shard(data.shard, data.taps, data.labels, data.ids)
                Path(self.marker).write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
            real(split, data, durable)

        writer.write_complete_shard = write

    def teardown(self, worker: Any) -> None:
        import featcache.store.writer as writer

        writer.write_complete_shard = self.real


@pytest.fixture
def plugin(client: Client) -> Iterator[Any]:
    """Register a fault-injecting worker plugin for one test; unregister it afterwards."""
    names: list[str] = []

    def register(p: WorkerPlugin) -> None:
        names.append(type(p).__name__)
        client.register_plugin(p, name=names[-1])

    yield register
    for name in names:
        client.unregister_worker_plugin(name)


def test_failed_shard_is_submitted_again(
    client: Client, plugin: Any, images: Path, reference: dict, tmp_path: Path
) -> None:
    marker, out = tmp_path / "failed", tmp_path / "s.zarr"
    plugin(ShardFault(str(marker), shard=2))
    report = cluster_extract(client, images, out)
    assert marker.exists(), "the fault was not injected"
    assert report.complete and report.rounds == 2 and 2 in report.shard_workers  # submitted again in round 2
    assert_same_arrays(read_split(out), reference)


def test_ctrl_c_cancels_drains_and_resume_completes(
    client: Client, images: Path, reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featcache.errors import Interrupted
    from featcache.progress import bar

    class InterruptedBar:  # Ctrl-C arrives while the client waits for the second finished task
        def __init__(self, *a: Any, **kw: Any) -> None:
            self.bar, self.calls = bar(*a, **kw), 0

        def __enter__(self) -> "InterruptedBar":
            return self

        def __exit__(self, *exc: Any) -> None:
            self.bar.close()

        def update(self, n: int) -> None:
            self.calls += 1
            if self.calls == 2:
                raise KeyboardInterrupt

    out = tmp_path / "s.zarr"
    monkeypatch.setattr(dist_extraction, "bar", InterruptedBar)
    with pytest.raises(Interrupted, match="--resume") as info:
        cluster_extract(client, images, out)
    monkeypatch.undo()
    assert info.value.exit_code == 130 and not (out / "_locks").exists()  # the lock was released ...
    assert all(ks == [] for ks in client.run(dist_cluster._executing_keys).values())  # ... after the tasks stopped
    assert 2 <= FeatureStore.open(out).split("train").completed_shards().sum() <= 6
    report = cluster_extract(client, images, out, resume=True)
    assert report.complete
    assert_same_arrays(read_split(out), reference)


def test_data_error_on_workers_stops_the_extraction(client: Client, images: Path, tmp_path: Path) -> None:
    out, broken = tmp_path / "s.zarr", tmp_path / "images"
    shutil.copytree(images, broken)
    sorted(broken.rglob("*.png"))[5].write_bytes(b"not a png")  # image 5: shard 1
    with pytest.raises(DataError, match="cannot read image"):
        cluster_extract(client, broken, out)
    split = FeatureStore.open(out).split("train")
    assert not split.completed_shards()[1]  # the shard holding the broken image was not marked complete
    assert not (out / "_locks").exists()


# ---------------------------------------------------------------------------------------------
# s3:// stores (moto)


def test_s3_round_trip_extract_verify_train(client: Client, images: Path, reference: dict, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/store.zarr"
    report = extract_on_cluster(SPEC, str(images), url, client=client, **{**FAST, "dtype": "float32"})
    assert report.complete and report.shards_written == 6 and len(set(report.shard_workers.values())) == 2
    assert_same_arrays(read_split(url), reference)  # equals a one-process extraction to a local path
    assert verify_store(url).ok and describe_store(url)["splits"]["train"]["complete"]
    fs = s3fs_client()
    assert fs.exists(f"{BUCKET}/store.zarr/train/block3/c/0/0/0")  # real objects in the bucket
    assert not fs.exists(f"{BUCKET}/store.zarr/_locks/train.lock")  # the lock object was removed
    settings, grid = {"epochs": 2, "batch_size": 8}, {"lr": [1e-3, 1e-2]}
    train(url, "linear", tmp_path / "local", settings, grid, progress=False)
    summary = train_on_cluster(url, "linear", tmp_path / "dist", settings, grid, client=client, progress=False)
    assert summary["best"]["selected_by"] == "val_acc" and summary["best"]["selected_on"] == "train[held-out]"
    assert_same_run(tmp_path / "local", tmp_path / "dist")


def test_cli_workers_2_to_s3_with_environment_credentials(
    client: Client, images: Path, reference: dict, tmp_path: Path
) -> None:
    """``extract --workers 2`` starts (and stops) its own cluster; endpoint and keys come from AWS_*."""
    url = f"s3://{BUCKET}/cli.zarr"
    r = CliRunner().invoke(app, _extract_args(images, url, "--workers", "2", "--dtype", "float32"))
    assert r.exit_code == 0, r.output
    stored = read_split(url)
    for name in (*FeatureStore.open(url).manifest.tap_names, "labels", "ids"):  # other shard size, same batches
        assert np.array_equal(stored[name], reference[name]), name
    r = CliRunner().invoke(app, ["inspect", url, "--verify", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["verify"]["ok"] and data["splits"]["train"]["num_samples"] == 24
    out = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        [
            "train",
            url,
            "--method",
            "linear",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--grid",
            "lr=1e-3,1e-2",
            "--scheduler",
            client.scheduler.address,
            "--json",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [m["name"] for m in data["members"]] == ["lr=0.001", "lr=0.01"] and data["cluster"]["workers"] == 2
    assert {"curves.png", "best.json", "summary.json", "metrics.jsonl", "sweep.json"} <= set(run_files(out))
    assert {p.name for p in (out / "members").iterdir()} == {"lr=0.001", "lr=0.01"}


def test_cli_storage_options_replace_the_environment(s3: dict, images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    url = f"s3://{BUCKET}/options.zarr"
    r = CliRunner().invoke(
        app,
        _extract_args(
            images,
            url,
            "--limit",
            "6",
            "--storage-option",
            f"endpoint_url={s3['AWS_ENDPOINT_URL']}",
            "--storage-option",
            "key=testing",
            "--storage-option",
            "secret=testing",
        ),
    )
    assert r.exit_code == 0, r.output
    opts = {"endpoint_url": s3["AWS_ENDPOINT_URL"], "key": "testing", "secret": "testing"}
    assert FeatureStore.open(url, "r", opts).split("train").complete


def test_live_lock_object_on_s3_refuses_a_second_writer(client: Client, images: Path) -> None:
    fs, url = s3fs_client(), f"s3://{BUCKET}/locked.zarr"
    owner = {"pid": 4242, "host": "other-host", "started": "2026-01-01T00:00:00+00:00", "featcache_version": "0"}
    fs.pipe_file(f"{BUCKET}/locked.zarr/_locks/train.lock", json.dumps(owner).encode())
    with pytest.raises(StoreLockedError, match="process 4242 on host other-host"):
        extract_on_cluster(SPEC, str(images), url, client=client, **FAST)
    assert fs.find(f"{BUCKET}/locked.zarr") == [f"{BUCKET}/locked.zarr/_locks/train.lock"]  # nothing else written


# ---------------------------------------------------------------------------------------------
# Training


@pytest.fixture(scope="module")
def tap_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("taps") / "cache.zarr"
    vit = Backbone(SPEC)
    imgs, labels = make_separable_images(64, classes=3, seed=0)
    write_tap_store(path, vit, imgs, labels, "train")
    imgs, labels = make_separable_images(32, classes=3, seed=1)
    write_tap_store(path, vit, imgs, labels, "test")
    return path


def run_files(run: Path) -> list[str]:
    """Files of a run, except resumable state and event files (named by time, host and pid; compared by content)."""
    return sorted(
        str(p.relative_to(run))
        for p in run.rglob("*")
        if p.is_file() and p.relative_to(run).parts[0] not in ("state", "tensorboard")
    )


def assert_same_run(local: Path, dist: Path) -> None:
    """Same files, metrics, best member and checkpoints as a local sweep."""
    assert run_files(local) == run_files(dist)
    assert (local / "metrics.jsonl").read_text() == (dist / "metrics.jsonl").read_text()
    assert (local / "sweep.json").read_text() == (dist / "sweep.json").read_text()
    best_l, best_d = (json.loads((r / "best.json").read_text()) for r in (local, dist))
    assert {**best_l, "checkpoint": None} == {**best_d, "checkpoint": None}
    assert best_d["checkpoint"] == str(dist / "members" / best_d["name"])
    sum_l, sum_d = (json.loads((r / "summary.json").read_text()) for r in (local, dist))
    keys = ("name", "method", "config", "metrics", "best", "status", "params")
    assert [{k: m[k] for k in keys} for m in sum_l["members"]] == [{k: m[k] for k in keys} for m in sum_d["members"]]
    assert sum_d["num_members"] == sum_l["num_members"] and sum_d["best"]["name"] == sum_l["best"]["name"]
    for m in sum_l["members"]:
        name = m["name"]
        assert (local / "members" / name / "config.json").read_text() == (
            dist / "members" / name / "config.json"
        ).read_text()
        if m["status"] != "ok":  # a diverged member keeps no weights
            continue
        a, b = (load_checkpoint(r / "members" / name).network.state_dict() for r in (local, dist))
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_sweep_over_two_workers_equals_local_sweep(client: Client, tap_store: Path, tmp_path: Path) -> None:
    settings, grid = {"epochs": 2, "batch_size": 16}, {"lr": [1e-3, 3e-3], "rank": [4, 8]}
    train(str(tap_store), "last", tmp_path / "local", settings, grid, progress=False)
    summary = train_on_cluster(str(tap_store), "last", tmp_path / "dist", settings, grid, client=client, progress=False)
    parts = summary["cluster"]["parts"]
    assert len(parts) == 2 and len({p["worker"] for p in parts}) == 2
    assert sorted(map(sorted, (p["members"] for p in parts))) == [
        ["lr=0.001-rank=4", "lr=0.003-rank=4"],
        ["lr=0.001-rank=8", "lr=0.003-rank=8"],
    ]  # banks whole
    assert_same_run(tmp_path / "local", tmp_path / "dist")
    if tensorboard_installed():  # the parts' event files are gathered into RUNDIR/tensorboard as well
        members = sorted(p.name for p in (tmp_path / "local" / "tensorboard").iterdir())
        assert sorted(p.name for p in (tmp_path / "dist" / "tensorboard").iterdir()) == members and len(members) == 4
        for name in members:
            local = read_scalars(tmp_path / "local" / "tensorboard" / name)
            assert read_scalars(tmp_path / "dist" / "tensorboard" / name) == local and set(local["val_acc"]) == {1, 2}


def test_part_whose_members_all_diverge_does_not_fail_the_sweep(
    client: Client, tap_store: Path, tmp_path: Path
) -> None:
    settings, grid = {"epochs": 1, "batch_size": 16}, {"lr": [3e-3, 1e30]}
    train(str(tap_store), "linear", tmp_path / "local", settings, grid, progress=False)
    summary = train_on_cluster(
        str(tap_store), "linear", tmp_path / "dist", settings, grid, client=client, progress=False
    )
    assert [p["members"] for p in summary["cluster"]["parts"]] in (
        [["lr=0.003"], ["lr=1e+30"]],
        [["lr=1e+30"], ["lr=0.003"]],
    )  # one bank split over the 2 workers
    by = {m["name"]: m for m in summary["members"]}
    assert by["lr=1e+30"]["status"] == "diverged" and summary["best"]["name"] == "lr=0.003"
    assert_same_run(tmp_path / "local", tmp_path / "dist")


def test_sweep_without_validation_data_is_refused_as_locally(client: Client, tap_store: Path, tmp_path: Path) -> None:
    """The client checks the whole sweep as ``train`` does: parts of one member each would not refuse it."""
    settings, grid = {"epochs": 1, "batch_size": 16}, {"lr": [1e-3, 1e-2]}  # one bank, halved over 2 workers
    with pytest.raises(ConfigError, match="a sweep of 2 members needs validation data"):
        train(str(tap_store), "linear", tmp_path / "local", settings, grid, progress=False, val_fraction=0)
    with pytest.raises(ConfigError, match="a sweep of 2 members needs validation data"):
        train_on_cluster(
            str(tap_store), "linear", tmp_path / "dist", settings, grid, client=client, progress=False, val_fraction=0
        )
    assert not (tmp_path / "dist").exists()  # refused before RUNDIR was created


def test_plan_parts_keeps_banks_together() -> None:
    members = expand("last", {}, {"rank": [4, 8, 16], "lr": [1e-3, 3e-3]})  # 3 banks of 2
    parts = plan_parts(members, 2)
    assert sorted(len(p) for p in parts) == [2, 4]
    for p in parts:
        assert len({m.arch_key() for m in p}) * 2 == len(p)  # whole banks only
    assert [m.name for m in plan_parts(members, 1)[0]] == [m.name for m in members]  # sweep order inside a part
    lr_only = expand("last", {}, {"lr": [1e-3, 3e-3, 1e-2]})  # 1 bank, 2 workers: halved
    assert [[m.name for m in p] for p in plan_parts(lr_only, 2)] == [["lr=0.001", "lr=0.003"], ["lr=0.01"]]
    assert len(plan_parts(lr_only, 2, split_banks=False)) == 1


# ---------------------------------------------------------------------------------------------
# Errors


def test_memory_store_with_workers_is_refused(images: Path) -> None:
    with pytest.raises(UsageError, match="memory:// store, which lives inside one process"):
        extract_on_cluster(SPEC, str(images), "memory://s.zarr", workers=2)
    r = CliRunner().invoke(app, _extract_args(images, "memory://s.zarr", "--workers", "2"))
    assert r.exit_code == 2 and r.stderr.startswith("Error: the store memory://s.zarr is a memory:// store")
    r = CliRunner().invoke(app, ["train", "memory://s.zarr", "--out", "x", "--workers", "2"])
    assert r.exit_code == 2 and "memory://" in r.stderr


def test_unreachable_scheduler_is_a_clear_error(images: Path, tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=f"cannot reach the dask scheduler at {address}"):
        with cluster_client(scheduler=address, timeout=1):
            pass
    assert time.monotonic() - t0 < 30
    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        r = CliRunner().invoke(app, _extract_args(images, str(tmp_path / "s.zarr"), "--scheduler", address))
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"Error: cannot reach the dask scheduler at {address}")
    assert not (tmp_path / "s.zarr").exists()  # nothing was written


def test_cluster_option_errors(images: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(
        app, _extract_args(images, str(tmp_path / "s"), "--workers", "2", "--scheduler", "tcp://x:1")
    )
    assert r.exit_code == 2 and "exactly one of --workers N" in r.stderr
    r = CliRunner().invoke(app, _extract_args(images, str(tmp_path / "s"), "--workers", "0"))
    assert r.exit_code == 2 and "--workers" in r.stderr
    r = CliRunner().invoke(app, ["train", str(tmp_path), "--out", str(tmp_path / "r"), "--workers", "2", "--resume"])
    assert r.exit_code == 2 and "--resume continues a run in this process only" in r.stderr


# ---------------------------------------------------------------------------------------------
# Last: a killed worker (its nanny restarts it seconds later, after the module's other tests)


def test_killed_worker_shard_is_recomputed(
    client: Client, plugin: Any, images: Path, reference: dict, tmp_path: Path
) -> None:
    marker, out = tmp_path / "killed", tmp_path / "s.zarr"
    plugin(ShardFault(str(marker), shard=3, kill=True))
    report = cluster_extract(client, images, out)
    assert marker.exists(), "the fault was not injected"
    killed = int(marker.read_text())
    assert not pid_alive(killed)  # that worker process really died mid-shard ...
    assert report.complete and 3 in report.shard_workers  # ... and shard 3 was written again by another one
    assert_same_arrays(read_split(out), reference)
    assert verify_store(str(out)).ok
