"""A split's missing shards as dask tasks: ``extract_on_cluster``, the extraction pipeline with a dask runner.

``extract_on_cluster`` runs ``featcache.extraction.run_extraction`` (plan, the split's lock, create or
check the split, finalize) with ``DaskShardRunner``, which runs the missing shards as tasks of whole,
consecutive shards (``plan_tasks``). A task runs ``featcache.extraction.extract_shards`` on a worker
that keeps the model loaded between tasks (one model per worker process). The completion records in
the store say what is done: shards whose task failed or whose worker died are submitted again (dask
itself reruns a lost worker's task first). Batches depend on the shard only, so the arrays equal a
one-process extraction on the same device with the same threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, cast

import torch
from distributed import Client, as_completed

from featcache.allocator import keep_freed_memory
from featcache.backbone import Backbone
from featcache.data import DataSource, shared_spec
from featcache.device import resolve_device
from featcache.errors import (
    ClusterError,
    ConfigError,
    DataError,
    FeatcacheError,
    Interrupted,
    ModelError,
    StoreError,
    UsageError,
    WeightsError,
)
from featcache.extraction import (
    ExtractOptions,
    ExtractReport,
    ShardRunStats,
    extract_shards,
    open_split_source,
    resolve_options,
    run_extraction,
    runtime_settings,
)
from featcache.manifest import BackboneSpec
from featcache.progress import bar, say
from featcache.store.feature_store import FeatureStore, SplitHandle

from .cluster import check_shared_url, client_for, drain, shared_path, task_resources, worker_name

# a shard task failing with one of these would fail the same way again: stop at once. Anything else
# (a storage write error, a lost worker) is retried in the next round.
FATAL_ERRORS = (DataError, WeightsError, ModelError, UsageError, ConfigError)
TASKS_PER_WORKER = 4  # extraction tasks per worker (each a group of consecutive shards), see plan_tasks


@dataclass(frozen=True)
class ShardJob:
    """What a worker needs to compute shards of a planned split (small; sent with every task)."""

    spec: dict[str, Any]
    layers: list[int] | str | None
    device: str
    store: str
    split: str
    data: str
    limit: int | None
    num_samples: int
    ids_sha256: str
    weights_sha256: str
    batch_size: int
    loader_workers: int | None
    durable: bool
    storage_options: dict[str, Any] | None
    writer_threads: int | None = None


@dataclass
class ClusterExtractReport(ExtractReport):
    """``ExtractReport`` of an extraction on a cluster, with what the cluster did."""

    workers: int = 0  # workers that could run the tasks
    model_loads: int = 0  # models built on workers (one per worker process that ran a shard)
    rounds: int = 0  # submission rounds (> 1 when shards were submitted again)
    shard_workers: dict[int, str] = field(default_factory=dict)  # shard -> worker that wrote it

    def summary_line(self) -> str:
        return f"{super().summary_line()} on {self.workers} dask worker(s)"


_cache_lock = threading.Lock()
_models: dict[str, Backbone] = {}  # per worker process: the model of the current extraction
_sources: dict[str, DataSource] = {}


def ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def worker_backbone(job: ShardJob) -> tuple[Backbone, bool]:
    """This worker's model for ``job`` (built on first use, then kept); (backbone, built now)."""
    key = json.dumps([job.spec, job.layers, job.device], sort_keys=True, default=str)
    with _cache_lock:
        if key in _models:
            return _models[key], False
        _models.clear()  # one model per worker: a new extraction replaces the previous one
        backbone = Backbone(BackboneSpec.from_dict(job.spec), resolve_device(job.device), job.layers)
        if backbone.weights.get("state_sha256") != job.weights_sha256:
            raise WeightsError(
                f"worker {socket.gethostname()} loaded other weights for {job.spec['model']} than the "
                f"client planned with; --weights {job.spec['weights']} must be the same file on every "
                "worker"
            )
        _models[key] = backbone
        return backbone, True


def worker_source(job: ShardJob) -> DataSource:
    """This worker's data source for ``job``, checked to hold the planned images in the planned order."""
    key = json.dumps([job.data, job.limit])
    with _cache_lock:
        if key not in _sources:
            source = open_split_source(job.data, job.limit)
            if len(source) != job.num_samples or ids_sha256(source.ids()) != job.ids_sha256:
                raise DataError(
                    f"--data {job.data} on worker {socket.gethostname()} holds other images than on the "
                    "client; every worker must see the same data (a shared filesystem)"
                )
            _sources.clear()
            _sources[key] = source
        return _sources[key]


def _worker_split(job: ShardJob) -> SplitHandle:
    try:
        return FeatureStore.open(job.store, "r+", job.storage_options).split(job.split)
    except StoreError as err:
        raise StoreError(
            f"worker {socket.gethostname()} cannot open split {job.split!r} of {job.store} ({err}); "
            "every worker must reach the store at the same path (a shared filesystem) or URL "
            "(s3://...)"
        ) from None


def _loader_workers(job: ShardJob, device: torch.device) -> int:
    """DataLoader processes of a task: as asked; else none on CPU workers (decoding would only take cores
    from the forward pass), and up to 4 on a GPU worker, by its share of the host's cores."""
    import multiprocessing

    if multiprocessing.current_process().daemon:  # daemonic workers (dask's default) cannot have children
        return 0
    if job.loader_workers is not None:
        return job.loader_workers
    return 0 if device.type != "cuda" else max(1, min(4, torch.get_num_threads() // 2))


def extract_shards_task(job: ShardJob, shards: list[int]) -> dict[str, Any]:
    """The work unit on a worker: compute and write whole shards, those whose completion record is not set.

    A shard already complete was written by an earlier try of this task whose worker died before it
    reported: it is skipped, not written twice.
    """
    keep_freed_memory()  # tasks run on worker threads: one shared heap, freed memory reused (allocator.py)
    backbone, built = worker_backbone(job)
    source = worker_source(job)
    with runtime_settings():
        split = _worker_split(job)
        done = split.completed_shards()
        todo = [k for k in shards if not done[k]]
        stats = extract_shards(
            split,
            backbone,
            source,
            todo,
            batch_size=job.batch_size,
            loader_workers=_loader_workers(job, backbone.device),
            progress=False,
            durable=job.durable,
            writer_threads=job.writer_threads,
        )
    return {
        "shards": stats.shards,
        "skipped": [k for k in shards if done[k]],
        "worker": worker_name(),
        "pid": os.getpid(),
        "model_built": built,
        "images": stats.images,
        "nbytes": stats.nbytes,
        "forward_seconds": stats.forward_seconds,
        "write_seconds": stats.write_seconds,
    }


def plan_tasks(shards: list[int], workers: int, shards_per_task: int | None = None) -> list[list[int]]:
    """Consecutive groups of shards, one per task: about ``TASKS_PER_WORKER`` tasks per worker by default.

    Fewer, larger tasks amortise per-task costs (opening the store, DataLoader processes); several
    per worker keep the load balanced and bound what a lost worker's task recomputes.
    """
    size = shards_per_task or max(1, -(-len(shards) // (max(1, workers) * TASKS_PER_WORKER)))
    return [shards[i : i + size] for i in range(0, len(shards), size)]


class DaskShardRunner:
    """``featcache.extraction.ShardRunner`` whose shards are dask tasks: the client plans on its CPU (for the
    manifest), workers keep the model loaded between tasks, and missing shards are submitted again."""

    def __init__(
        self, client: Client, spec: BackboneSpec, data: str, rounds: int = 3, shards_per_task: int | None = None
    ) -> None:
        self.client, self.spec, self.data = client, spec, data
        self.rounds, self.shards_per_task = rounds, shards_per_task
        self.done: dict[str, Any] = {}

    def backbone_device(self, opts: ExtractOptions) -> torch.device:
        return torch.device("cpu")  # for the plan and the manifest; workers run the model

    def run(
        self, split: SplitHandle, backbone: Backbone, source: DataSource, shards: list[int], opts: ExtractOptions
    ) -> ShardRunStats:
        job = _shard_job(self.spec, backbone, source, split, split.store.url, self.data, opts)
        self.done = _run_shards(self.client, job, split, opts.progress, self.rounds, self.shards_per_task)
        results = self.done["results"]
        return ShardRunStats(
            shards=sorted(k for r in results for k in r["shards"]),
            images=sum(r["images"] for r in results),
            nbytes=sum(r["nbytes"] for r in results),
            seconds=self.done["loop_seconds"],
            forward_seconds=sum(r["forward_seconds"] for r in results),
            write_seconds=sum(r["write_seconds"] for r in results),
        )

    def report(self, report: ExtractReport, stats: ShardRunStats) -> ClusterExtractReport:
        results = self.done.get("results", [])
        return ClusterExtractReport(
            **vars(report),
            workers=self.done.get("workers", 0),
            model_loads=sum(r["model_built"] for r in results),
            rounds=self.done.get("rounds", 0),
            shard_workers={k: r["worker"] for r in results for k in r["shards"]},
        )


def extract_on_cluster(
    spec: BackboneSpec,
    data: str,
    out: str | os.PathLike[str],
    options: ExtractOptions | None = None,
    *,
    client: Client | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    rounds: int = 3,
    shards_per_task: int | None = None,
    **overrides: Any,
) -> ClusterExtractReport:
    """``featcache.extraction.extract`` with the shards computed by dask workers (see the module docstring).

    Pass a ``client``, or ``workers`` (a local cluster started and stopped here) or ``scheduler``.
    ``rounds``: how often shards still incomplete after a round are submitted again;
    ``shards_per_task``: shards per task (default: see ``plan_tasks``).
    """
    opts = resolve_options(options, overrides)
    url = check_shared_url(str(out))
    if not isinstance(data, str):
        raise UsageError("extraction on a cluster needs --data as a SPEC string that every worker can open")
    with client_for(client, workers, scheduler, opts.device, opts.progress) as dask_client:
        runner = DaskShardRunner(dask_client, spec, data, rounds, shards_per_task)
        return cast(ClusterExtractReport, run_extraction(spec, data, url, opts, runner))


def _shard_job(
    spec: BackboneSpec,
    backbone: Backbone,
    source: DataSource,
    split: SplitHandle,
    url: str,
    data: str,
    opts: ExtractOptions,
) -> ShardJob:
    worker_spec = replace(spec, weights=shared_path(spec.weights))
    return ShardJob(
        spec=worker_spec.to_dict(),
        layers=opts.layers,
        device=opts.device,
        store=url,
        split=opts.split,
        data=shared_spec(data),
        limit=opts.limit,
        num_samples=len(source),
        ids_sha256=ids_sha256(source.ids()),
        weights_sha256=str(backbone.weights.get("state_sha256")),
        batch_size=split.meta.batch_size,
        loader_workers=opts.loader_workers,
        durable=opts.durable,
        storage_options=opts.storage_options,
        writer_threads=opts.writer_threads,
    )


def _run_shards(
    client: Client, job: ShardJob, split: SplitHandle, progress: bool, rounds: int, shards_per_task: int | None = None
) -> dict[str, Any]:
    """Submit the missing shards until the completion records say all are done (at most ``rounds`` rounds)."""
    meta = split.meta
    todo = [k for k, done in enumerate(split.completed_shards()) if not done]
    total = sum(meta.shard_bounds(k)[1] - meta.shard_bounds(k)[0] for k in todo)
    resources, nworkers = task_resources(client, job.device)
    done: dict[str, Any] = {"results": [], "rounds": 0, "loop_seconds": 0.0, "workers": nworkers}
    failures: dict[int, BaseException] = {}
    t0 = time.perf_counter()
    with bar(total, f"extract {job.split} ({nworkers} workers)", progress=progress) as pbar:
        for attempt in range(max(1, rounds)):
            todo = [k for k, ok in enumerate(split.completed_shards()) if not ok]
            if not todo:
                break
            if attempt:
                say(f"submitting {len(todo)} shard(s) again: {_first_failure(failures)}", quiet=not progress)
            done["rounds"] += 1
            tasks = plan_tasks(todo, nworkers, shards_per_task)
            failures = _run_round(client, job, tasks, resources, pbar, done["results"])
    done["loop_seconds"] = time.perf_counter() - t0
    missing = [k for k, ok in enumerate(split.completed_shards()) if not ok]
    if missing:
        have = meta.num_shards - len(missing)
        first = failures[min(failures)] if failures else None
        kind = type(first) if isinstance(first, FeatcacheError) else ClusterError
        raise kind(
            f"{len(missing)} shard(s) of split {job.split!r} (e.g. shard {missing[0]}) could not be computed in "
            f"{done['rounds']} round(s): {_first_failure(failures)}; the {have} completed shard(s) are kept: "
            "rerun with --resume"
        )
    return done


def _first_failure(failures: dict[int, BaseException]) -> str:
    if not failures:
        return "no error was reported"
    k, err = min(failures.items())
    return f"shard {k}: {type(err).__name__}: {str(err)[:200]}"


def _run_round(
    client: Client,
    job: ShardJob,
    tasks: list[list[int]],
    resources: dict[str, int] | None,
    pbar: Any,
    results: list[dict[str, Any]],
) -> dict[int, BaseException]:
    """One task per group of shards; progress as the scheduler reports completions. Returns the errors of
    failed tasks by their first shard.

    A ``FATAL_ERRORS`` error (bad data, weights, options) stops everything: rerunning would fail the same way.
    """
    token = uuid.uuid4().hex[:8]
    futures = {
        client.submit(
            extract_shards_task,
            job,
            group,
            resources=resources,
            pure=False,
            key=f"featcache-extract-{job.split}-shard{group[0]}-{token}",
        ): group[0]
        for group in tasks
    }
    failures: dict[int, BaseException] = {}
    try:
        for future in as_completed(list(futures), loop=client.loop):
            k = futures[future]
            if future.status == "finished":
                result = future.result()
                results.append(result)
                pbar.update(result["images"])
                continue
            err = future.exception() if future.status == "error" else RuntimeError(f"task {future.status}")
            if isinstance(err, FATAL_ERRORS):
                drain(client, list(futures))
                raise err
            failures[k] = err
    except KeyboardInterrupt:
        drain(client, list(futures))
        raise Interrupted(
            f"interrupted: shards already written by the workers are complete, shards in progress were "
            f"finished or discarded; run the same featcache extract command with --resume to continue "
            f"split {job.split!r} of {job.store}"
        ) from None
    return failures
