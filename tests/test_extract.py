"""Extraction: resume after a crash equals a clean run, Ctrl-C, views, --limit, the CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from featcache.backbone import Backbone, Taps
from featcache.cli import app
from featcache.errors import DataError, Interrupted
from featcache.extraction import open_split_source
from featcache.loader import AugmentedViews, ShardBatchSampler, TransformPool, default_loader_workers, transform_threads
from featcache.manifest import BackboneSpec, SplitMeta
from featcache.store.feature_store import FeatureStore
from featcache.store.verify import verify_store

from .conftest import TINY_VIT
from .helpers.processes import TINY_ARGS, child_extract, start_child, wait_for
from .helpers.stores import FAST, PROBE_FORWARDS, assert_same_arrays, read_split, run_extract


@pytest.fixture(scope="module")
def clean_run(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The arrays of an uninterrupted extraction (float32: any difference in the computation shows)."""
    out = tmp_path_factory.mktemp("clean") / "s.zarr"
    run_extract(images, out, dtype="float32")
    return read_split(out)


class _FailAfter:
    """Patches Taps.forward to raise ``error`` on call number ``n`` (1-based)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, n: int, error: BaseException) -> None:
        self.calls, self.n, self.error = 0, n, error
        real = Taps.forward

        def forward(taps_self: Taps, images: torch.Tensor) -> dict[str, torch.Tensor]:
            self.calls += 1
            if self.calls == self.n:
                raise self.error
            return real(taps_self, images)

        monkeypatch.setattr(Taps, "forward", forward)


def test_resume_after_injected_error_equals_clean_run(
    images: Path, tmp_path: Path, clean_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "s.zarr"
    _FailAfter(monkeypatch, PROBE_FORWARDS + 5, RuntimeError("disk on fire"))  # one batch per shard: fails in shard 4
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_extract(images, out, dtype="float32")
    monkeypatch.undo()
    split = FeatureStore.open(out).split("train")
    assert split.completed_shards().tolist() == [True] * 4 + [False] * 2  # computed shards kept, not the failed one
    assert not (out / "_locks").exists()  # the lock was released
    report = run_extract(images, out, dtype="float32", resume=True)
    assert report.status == "resumed" and report.shards_written == 2 and report.complete
    assert_same_arrays(read_split(out), clean_run)


def test_ctrl_c_keeps_completed_shards_and_says_how_to_resume(
    images: Path, tmp_path: Path, clean_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean, out = tmp_path / "clean.zarr", tmp_path / "s.zarr"
    run_extract(images, clean, dtype="float32", batch_size=2)
    _FailAfter(monkeypatch, PROBE_FORWARDS + 6, KeyboardInterrupt())  # batches of 2 images: the 2nd batch of shard 2
    with pytest.raises(
        Interrupted, match=r"2 of 6 shards .* complete, the shard in progress was discarded.*--resume"
    ) as info:
        run_extract(images, out, dtype="float32", batch_size=2)
    monkeypatch.undo()
    assert info.value.exit_code == 130
    split = FeatureStore.open(out).split("train")
    assert split.completed_shards().tolist() == [True, True, False, False, False, False]
    assert not split.group["block1"][8:12].any()  # the half-computed shard 2 never reached the store
    assert not (out / "_locks").exists()
    run_extract(images, out, dtype="float32", resume=True, batch_size=None)  # batch size: the recorded one
    assert_same_arrays(read_split(out), read_split(clean))


def test_resume_of_complete_split_writes_nothing(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    run_extract(images, out, limit=8)
    report = run_extract(images, out, limit=8, resume=True)
    assert report.shards_written == 0 and report.complete


@pytest.mark.parametrize("sig,workers", [(signal.SIGKILL, "0"), (signal.SIGINT, "1"), (signal.SIGINT, "pool")])
def test_resume_after_kill_or_ctrl_c_equals_clean_run(
    images: Path, tmp_path: Path, clean_run: dict, sig: int, workers: str
) -> None:
    """A real process killed with SIGKILL (lock left stale), or sent Ctrl-C (a clean stop), mid-run; Ctrl-C
    with a DataLoader worker process (it reaches the worker too) and with the in-process transform threads."""
    out, log = tmp_path / "s.zarr", tmp_path / "child.log"
    settings = dict(FAST, dtype="float32", progress=False, loader_workers=0 if workers == "pool" else int(workers))
    if workers == "pool":  # no worker process: the images are transformed on 2 threads of this process
        settings["transform_threads"] = 2
    proc = start_child(child_extract, str(images), str(out), None, str(log), 0.25, settings, True)
    try:
        wait_for(
            lambda: (out / "train").exists() and len(list((out / "train" / "_complete" / "c").glob("*"))) >= 2,
            timeout=60,
            proc=proc,
        )
        os.killpg(proc.pid, sig)  # the whole process group, as a terminal's Ctrl-C does
    finally:
        proc.join(60)
    stderr = log.read_text()
    if sig == signal.SIGKILL:
        assert proc.exitcode == -signal.SIGKILL
        assert (out / "_locks" / "train.lock").exists()  # a crashed owner's lock is left behind ...
    else:
        assert proc.exitcode == 130 and "Traceback" not in stderr
        assert re.search(
            r"Error: interrupted: \d of 6 shards .* discarded; run the same featcache extract command "
            r"with --resume",
            stderr,
        ), stderr
        assert not (out / "_locks").exists()
    done = FeatureStore.open(out).split("train").completed_shards()
    assert 2 <= done.sum() < 6
    report = run_extract(images, out, dtype="float32", resume=True)  # ... and taken over as stale
    assert report.shards_written == 6 - done.sum()
    assert_same_arrays(read_split(out), clean_run)
    assert verify_store(str(out)).ok and not list(out.rglob("*.partial"))


def test_transform_pool_keeps_order_runs_torch_single_threaded_and_raises_item_errors() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with TransformPool(3) as pool:
            assert torch.get_num_threads() == 2  # the caller's setting is left as it was
            out = pool.map(lambda i: (i, torch.get_num_threads(), threading.current_thread().name), list(range(20)))
            assert [o[0] for o in out] == list(range(20))
            assert {o[1] for o in out} == {1}  # each pool thread runs torch ops on one thread
            assert {o[2] for o in out} <= {f"featcache-transform_{k}" for k in range(3)}

            def decode(i: int) -> int:
                if i == 7:
                    raise DataError("cannot decode image 7.png")
                return i

            with pytest.raises(DataError, match="cannot decode image 7.png"):  # itself, not wrapped
                pool.map(decode, list(range(10)))
        threads: list[int] = []
        later = threading.Thread(target=lambda: threads.append(torch.get_num_threads()))
        later.start()
        later.join()
        assert threads == [2]  # threads started later get the process setting, not the pool's 1
        assert not [t for t in threading.enumerate() if t.name.startswith("featcache-transform")]  # closed
    finally:
        torch.set_num_threads(before)


def test_cpu_extraction_transforms_on_threads_and_equals_a_worker_process(
    images: Path, tmp_path: Path, clean_run: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU default (no DataLoader worker, a TransformPool) stores the same arrays as a worker process."""
    assert default_loader_workers("cpu") == 0 and default_loader_workers("cuda") >= 1
    assert default_loader_workers("cpu", views=3) >= 1  # augmented views: a worker process, not threads
    assert transform_threads(0, views=1) == min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
    assert transform_threads(1, views=1) == 0 and transform_threads(0, views=2) == 0  # workers; seeded views
    import featcache.loader as fx
    from featcache.loader import PooledItems

    monkeypatch.setattr(fx, "transform_threads", lambda workers, views: 3)  # the tests' torch runs 1 thread
    fetched: list[str] = []
    items = PooledItems.__getitems__
    monkeypatch.setattr(
        PooledItems,
        "__getitems__",
        lambda self, idx: (
            fetched.append(self.pool.map(lambda i: threading.current_thread().name, idx)[0]) or items(self, idx)
        ),
    )
    out = tmp_path / "pool.zarr"
    run_extract(images, out, dtype="float32", loader_workers=None)
    assert len(fetched) == 6 and all(name.startswith("featcache-transform") for name in fetched)
    assert_same_arrays(read_split(out), clean_run)
    run_extract(images, tmp_path / "worker.zarr", dtype="float32", loader_workers=1)
    assert_same_arrays(read_split(tmp_path / "worker.zarr"), clean_run)


def test_views_differ_and_are_deterministic(images: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    run_extract(images, a, views=3, limit=6, dtype="float32")
    run_extract(images, b, views=3, limit=6, dtype="float32", loader_workers=1, batch_size=6)
    split = FeatureStore.open(a).split("train")
    x = split.tap("block2")[:]
    assert x.shape == (6, 3, 5, 64) and split.meta.view_transform == "eval+train" and split.meta.views == 3
    assert not np.array_equal(x[:, 0], x[:, 1]) and not np.array_equal(x[:, 1], x[:, 2])
    y = FeatureStore.open(b).split("train").tap("block2")[:]
    assert np.allclose(x, y, atol=1e-5)  # same (seed, image, view) -> same augmentation, other batching/workers
    c = tmp_path / "c.zarr"
    run_extract(images, c, views=3, limit=6, dtype="float32", seed=1)
    assert not np.allclose(FeatureStore.open(c).split("train").tap("block2")[:], x)


def test_augmented_views_dataset_restores_global_rng(images: Path) -> None:
    backbone = Backbone(BackboneSpec(**TINY_VIT))
    ds = AugmentedViews(open_split_source(str(images)), backbone.train_transform(), views=2, seed=0)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    v1 = ds[5][0]
    assert torch.equal(torch.rand(1), expected)  # the caller's RNG stream is untouched
    assert torch.equal(ds[5][0], v1) and not torch.equal(v1[0], v1[1])


def test_batches_never_cross_shards() -> None:
    meta = SplitMeta(num_samples=10, chunk_images=2, shard_images=4)
    batches = list(ShardBatchSampler(meta, [0, 2, 1], images_per_batch=3))
    assert batches == [[0, 1, 2], [3], [8, 9], [4, 5, 6], [7]]
    assert len(ShardBatchSampler(meta, [0, 2, 1], 3)) == 5


def test_limit_is_a_fixed_stratified_subset(images: Path, tmp_path: Path) -> None:
    run_extract(images, tmp_path / "a.zarr", limit=9)
    split = FeatureStore.open(tmp_path / "a.zarr").split("train")
    assert np.bincount(split.labels()).tolist() == [3, 3, 3] and split.meta.limit == 9
    run_extract(images, tmp_path / "b.zarr", limit=9)
    assert FeatureStore.open(tmp_path / "b.zarr").split("train").ids() == split.ids()


def test_manifest_records_what_reproduces_the_store(images: Path, tmp_path: Path) -> None:
    run_extract(images, tmp_path / "s.zarr", limit=4, layers=[0, 3])
    m = FeatureStore.open(tmp_path / "s.zarr").manifest
    assert m.backbone["spec"]["model"] == "test_vit" and m.backbone["weights"]["source"] == "random"
    assert len(m.backbone["weights"]["state_sha256"]) == 64
    assert m.tap_names == ["embed", "block3"] and m.dtype == "float16" and m.featcache_format == 2
    assert "Normalize" in m.transform["eval"] and "RandomResizedCrop" in m.transform["train"]
    assert m.environment["torch"] == torch.__version__ and m.compressor["name"] == "auto"
    meta = FeatureStore.open(tmp_path / "s.zarr").split("train").meta
    assert meta.compressor == "auto" and m.compressor["configuration"]["arrays"] == meta.tap_compressors
    assert set(meta.tap_compressors) == {"embed", "block3"}  # the test ViT's taps are dense: no compression


# ---------------------------------------------------------------------------------------------
# CLI


def _cli_args(images: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract",
        *TINY_ARGS,
        "--data",
        str(images),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def test_cli_extract_and_refusals(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(app, _cli_args(images, out, "--limit", "6", "--layers", "0,6", "--dtype", "bfloat16"))
    assert r.exit_code == 0, r.output
    split = FeatureStore.open(out).split("train")
    assert split.store.manifest.tap_names == ["embed", "block6"] and split.store.manifest.dtype == "bfloat16"
    r = CliRunner().invoke(app, _cli_args(images, out, "--limit", "6", "--layers", "0,6", "--dtype", "bfloat16"))
    assert r.exit_code == 1 and r.stderr.startswith("Error: split 'train' already exists")
    r = CliRunner().invoke(app, _cli_args(images, out, "--resume", "--overwrite"))
    assert r.exit_code == 2 and "exclude each other" in r.stderr
    r = CliRunner().invoke(app, _cli_args(images, out, "--layers", "0,99"))
    assert r.exit_code == 2 and "out of range" in r.stderr


def test_cli_subprocess_prints_summary_line(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    args = _cli_args(images, out, "--limit", "6", "--batch-size", "4")
    args.remove("--quiet")
    proc = subprocess.run(
        [sys.executable, "-c", "from featcache.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "FEATCACHE_PROGRESS": "0"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("extracted 6 images x 7 taps into") and "ratio" in last and "images/s" in last
    assert FeatureStore.open(out).split("train").complete


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_matches_cpu(images: Path, tmp_path: Path) -> None:
    """On CUDA the forward runs in float32 with TF32 off for every cache dtype: a bfloat16 cache holds the CPU's
    taps to bfloat16's rounding."""
    run_extract(images, tmp_path / "cpu.zarr", dtype="float32", limit=12)
    run_extract(images, tmp_path / "gpu32.zarr", dtype="float32", limit=12, device="cuda", loader_workers=1)
    run_extract(images, tmp_path / "gpu16.zarr", dtype="bfloat16", limit=12, device="cuda")
    cpu = read_split(tmp_path / "cpu.zarr")
    gpu32 = read_split(tmp_path / "gpu32.zarr")
    gpu16 = FeatureStore.open(tmp_path / "gpu16.zarr").split("train")
    assert np.array_equal(cpu["labels"], gpu32["labels"]) and np.array_equal(cpu["ids"], gpu32["ids"])
    for name in FeatureStore.open(tmp_path / "cpu.zarr").manifest.tap_names:
        assert np.allclose(gpu32[name], cpu[name], atol=2e-3, rtol=1e-3), name  # float32 with TF32 off during the pass
        got = gpu16.decode(gpu16.tap(name)[:]).float().numpy()
        assert np.allclose(got, cpu[name], atol=1e-4 * np.abs(cpu[name]).max(), rtol=8e-3), name
