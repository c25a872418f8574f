"""Scale-out on dask.distributed: extraction shards and sweep members as tasks on a cluster.

featcache has no scheduler of its own. dask.distributed places the tasks, reruns those of a lost
worker and reports completions; featcache supplies the work units and the bookkeeping:

- ``cluster_client(workers=N)`` starts a local cluster of N spawned worker processes (one per GPU
  when GPUs exist, each with resource ``GPU=1`` and its own ``CUDA_VISIBLE_DEVICES``), one dask
  thread each; ``cluster_client(scheduler=ADDRESS)`` connects to a running cluster. Every worker
  gets ``WorkerSettings``: torch threads = the host's cores / its workers, zarr's codec pool and
  concurrency to match, OpenMP threads that sleep while waiting (see docs/scale.md).
- ``extract_on_cluster``: the extraction pipeline of ``featcache.extraction.run_extraction`` (plan, the
  split's lock, create or check the split, finalize) with ``DaskShardRunner`` running the missing
  shards as tasks of whole, consecutive shards (``plan_tasks``). A task runs
  ``featcache.extraction.extract_shards`` on a worker that keeps the model loaded between tasks (one model
  per worker process). The completion records in the store say what is done: shards whose task
  failed or whose worker died are submitted again (dask itself reruns a lost worker's task first).
  Batches depend on the shard only, so the arrays equal a one-process extraction on the same device
  with the same threads.
- ``train_on_cluster``: the sweep's members are split into parts (members of one bank stay in one
  part unless there are fewer banks than workers), each part is trained on a worker by
  ``featcache.training.train(store, part, tmp, partial=True)`` into a temporary directory whose files
  come back to the client, and ``featcache.training.gather_parts`` writes one RUNDIR as a local sweep
  writes it. Batch order is a function of (seed, epoch) on every worker, as locally.
Stores must be reachable from every worker at the same URL: a shared filesystem path or an object
store URL (s3://). ``memory://`` stores live inside one process and are refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, cast

import dask
import torch
import zarr
from distributed import Client, Future, Nanny, Scheduler, SpecCluster, as_completed, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from featcache import __version__
from featcache.allocator import ENV as MALLOC_ENV
from featcache.allocator import keep_freed_memory
from featcache.backbone import Backbone
from featcache.device import resolve_device
from featcache.vocabulary import BackboneSpec
from featcache.data import DataSource, shared_spec
from featcache.loader import cpu_count
from featcache.errors import (ClusterError, ConfigError, DataError, FeatcacheError, Interrupted, ModelError, StoreError,
                              UsageError, WeightsError)
from featcache.extraction import (ZARR_CONCURRENCY, ExtractOptions, ExtractReport, ShardRunStats, extract_shards,
                               open_split_source, resolve_options, run_extraction, runtime_settings)
from featcache.progress import bar, say
from featcache.store.feature_store import FeatureStore, SplitHandle
from featcache.rundir import holds_run_lock
from featcache.sweep import SweepMember, expand
from featcache.training import TrainOptions

log = logging.getLogger(__name__)

SETTINGS_PLUGIN = "featcache-settings"
# dask settings while featcache runs a cluster: spawned workers (zarr's event loop needs it), non-daemonic
# (a task may start DataLoader processes), and no MALLOC_TRIM_THRESHOLD_, which makes torch's large
# temporaries fault in fresh pages (docs/scale.md)
MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"
CLUSTER_CONFIG = {"distributed.worker.multiprocessing-method": "spawn", "distributed.worker.daemon": False,
                  f"distributed.nanny.pre-spawn-environ.{MALLOC_TRIM}": None}
DRAIN_SECONDS = 60.0  # after Ctrl-C or an error: how long to wait for running shard tasks to finish
# a shard task failing with one of these would fail the same way again: stop at once. Anything else
# (a storage write error, a lost worker) is retried in the next round.
FATAL_ERRORS = (DataError, WeightsError, ModelError, UsageError, ConfigError)
TASKS_PER_WORKER = 4  # extraction tasks per worker (each a group of consecutive shards), see plan_tasks


# ---------------------------------------------------------------------------------------------
# Where things live: stores and paths every worker can reach


def check_shared_url(url: str, what: str = "store") -> str:
    """The URL as workers must see it: memory:// refused, local paths made absolute."""
    if url.startswith("memory://"):
        raise UsageError(f"the {what} {url} is a memory:// store, which lives inside one process: dask workers "
                         "cannot write or read it. Use a local path or an object store URL (s3://...) with "
                         "--workers/--scheduler, or drop --workers to run in this process")
    return url if "://" in url else os.path.abspath(url)


def _shared_path(value: str) -> str:
    """A local file or directory given relative to the client's cwd -> absolute (workers have their own cwd)."""
    return os.path.abspath(value) if "://" not in value and ":" not in value and os.path.exists(value) else value


# ---------------------------------------------------------------------------------------------
# Worker settings


def apply_worker_settings(torch_threads: int, zarr_concurrency: int = ZARR_CONCURRENCY) -> None:
    """Set this process's torch threads and zarr's codec pool and concurrency (one worker's share of the host)."""
    torch.set_num_threads(max(1, torch_threads))
    zarr.config.set({"async.concurrency": zarr_concurrency, "threading.max_workers": max(1, torch_threads)})


class WorkerSettings(WorkerPlugin):
    """Applied on every worker as it starts (and on workers that join later).

    ``torch_threads``: a fixed count, or None for the host's cores divided by the number of workers
    on that host (``workers_per_host``, counted by the client when it registers the plugin).
    """

    idempotent = False

    def __init__(self, torch_threads: int | None = None, workers_per_host: dict[str, int] | None = None,
                 zarr_concurrency: int = ZARR_CONCURRENCY) -> None:
        self.torch_threads, self.workers_per_host = torch_threads, dict(workers_per_host or {})
        self.zarr_concurrency = zarr_concurrency

    def threads_for(self, host: str) -> int:
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, cpu_count() // max(1, self.workers_per_host.get(host, 1)))

    def setup(self, worker: Any) -> None:
        from distributed.comm import get_address_host

        apply_worker_settings(self.threads_for(get_address_host(worker.address)), self.zarr_concurrency)


def worker_env(torch_threads: int, gpu: str | None = None) -> dict[str, str]:
    """Environment of a local worker process: thread pools sized before torch and zarr are imported."""
    n = str(max(1, torch_threads))
    env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "OMP_WAIT_POLICY": "PASSIVE",
           "ZARR_THREADING__MAX_WORKERS": n, "ZARR_ASYNC__CONCURRENCY": str(ZARR_CONCURRENCY)}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


# ---------------------------------------------------------------------------------------------
# Clusters


def local_gpus(device: str) -> list[str]:
    """The GPU ids local workers are pinned to (empty for --device cpu or without CUDA)."""
    if device == "cpu" or not torch.cuda.is_available():
        if device.startswith("cuda"):
            raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return ids[:torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def local_cluster(workers: int, device: str = "auto", torch_threads: int | None = None) -> SpecCluster:
    """N spawned worker processes on this machine, one dask thread each; one worker per GPU when GPUs exist."""
    import psutil

    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    gpus = local_gpus(device)
    if gpus and workers > len(gpus):
        raise UsageError(f"--workers {workers}: this machine has {len(gpus)} GPU(s) and featcache runs one worker per "
                         f"GPU; use --workers {len(gpus)}, or --device cpu for CPU workers")
    threads = torch_threads or max(1, cpu_count() // workers)
    memory = int(psutil.virtual_memory().total // workers)
    specs = {}
    for i in range(workers):
        options: dict[str, Any] = {"nthreads": 1, "host": "127.0.0.1", "memory_limit": memory,
                                   "env": worker_env(threads, gpus[i] if gpus else None), "silence_logs": logging.ERROR}
        if gpus:
            options["resources"] = {"GPU": 1}
        specs[f"featcache-{i}"] = {"cls": Nanny, "options": options}
    # the dashboard (when bokeh is installed) on a free port, so that clusters never collide
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard_address": "127.0.0.1:0"}}
    try:
        return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.ERROR, name="featcache")
    except Exception as err:  # noqa: BLE001 - e.g. ports, spawn failures: one clear line
        raise ClusterError(f"could not start a local dask cluster of {workers} workers ({type(err).__name__}: "
                           f"{err})") from None


def connect(address: str, timeout: float | None = None) -> Client:
    """A client of the scheduler at ``address`` that has at least one worker, or ``ClusterError``."""
    seconds = timeout if timeout is not None else dask.utils.parse_timedelta(
        dask.config.get("distributed.comm.timeouts.connect"), default="s")
    try:
        client = Client(address, timeout=seconds, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as err:
        raise ClusterError(f"cannot reach the dask scheduler at {address} ({type(err).__name__}: {err}); check the "
                           "address (e.g. tcp://HOST:8786), that `dask scheduler` runs there and that this machine can "
                           "reach it, or use --workers N for a local cluster") from None
    try:
        client.wait_for_workers(1, timeout=seconds)
    except (TimeoutError, OSError):
        client.close()
        raise ClusterError(f"the dask scheduler at {address} has no workers; start them with `dask worker {address} "
                           "--nthreads 1` (one per GPU: --resources GPU=1)") from None
    return client


def _worker_info() -> dict[str, Any]:
    return {"featcache": __version__, "host": socket.gethostname(), "pid": os.getpid(), "cpus": cpu_count(),
            "malloc_trim": os.environ.get(MALLOC_TRIM), "featcache_malloc": os.environ.get(MALLOC_ENV, "keep")}


def prepare_workers(client: Client, torch_threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Check that every worker runs this featcache version and register ``WorkerSettings``; {address: info}."""
    try:
        info = client.run(_worker_info)
    except Exception as err:  # noqa: BLE001 - featcache missing on a worker fails to unpickle there
        raise ClusterError(f"the dask workers cannot run featcache ({type(err).__name__}: {err}); install featcache "
                           f"{__version__} and its dependencies on every worker") from None
    other = {addr: i["featcache"] for addr, i in info.items() if i["featcache"] != __version__}
    if other:
        raise ClusterError(f"workers run other featcache versions than this client ({__version__}): {other}; install "
                           "the same version everywhere")
    if any(i["malloc_trim"] is not None and i.get("featcache_malloc") == "system" for i in info.values()):
        log.warning("featcache: the dask workers run with %s set (dask's default) and %s=system, which makes torch "
                    "about 30%% slower; start them without either (docs/scale.md)", MALLOC_TRIM, MALLOC_ENV)
    hosts: dict[str, int] = {}
    for w in client.scheduler_info(n_workers=-1)["workers"].values():
        hosts[w["host"]] = hosts.get(w["host"], 0) + 1
    client.register_plugin(WorkerSettings(torch_threads, hosts), name=SETTINGS_PLUGIN)
    return info


@contextlib.contextmanager
def quiet_dask_logs(level: int = logging.ERROR) -> Iterator[None]:
    """dask's INFO and WARNING chatter (workers starting, a lost worker restarting) off the user's terminal,
    unless FEATCACHE_DEBUG is set: featcache reports what matters itself."""
    if os.environ.get("FEATCACHE_DEBUG", "") not in ("", "0"):
        yield
        return
    loggers = [logging.getLogger(name) for name in ("distributed", "bokeh", "tornado")]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, before):
            lg.setLevel(old)


@contextlib.contextmanager
def cluster_client(workers: int | None = None, scheduler: str | None = None, *, device: str = "auto",
                   torch_threads: int | None = None, timeout: float | None = None,
                   progress: bool = False) -> Iterator[Client]:
    """A client of a new local cluster (``workers``) or of the scheduler at ``scheduler``; closed afterwards.

    ``progress``: say on stderr how many workers there are and where dask's dashboard is.
    """
    if (workers is None) == (scheduler is None):
        raise UsageError("give exactly one of --workers N (a local cluster) or --scheduler ADDRESS (a running one)")
    with dask.config.set(CLUSTER_CONFIG), quiet_dask_logs():
        cluster = None
        if scheduler is not None:
            client = connect(scheduler, timeout)
        else:
            cluster = local_cluster(workers or 1, device, torch_threads)
            client = Client(cluster, set_as_default=False)
        try:
            info = prepare_workers(client, torch_threads if scheduler is None else None)
            where = f", dashboard {client.dashboard_link}" if _has_dashboard(client) else ""
            say(f"dask cluster at {client.scheduler.address}: {len(info)} worker(s){where}", quiet=not progress)
            yield client
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def _has_dashboard(client: Client) -> bool:
    try:
        return "dashboard" in client.scheduler_info().get("services", {})
    except Exception:  # noqa: BLE001 - only a hint
        return False


def _gpu_workers(client: Client) -> list[str]:
    return [addr for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()
            if w.get("resources", {}).get("GPU", 0) >= 1]


def _task_resources(client: Client, device: str) -> tuple[dict[str, int] | None, int]:
    """(resources each task asks for, number of workers that can run it): GPU workers for GPU work."""
    gpu = _gpu_workers(client) if device != "cpu" else []
    if gpu:
        return {"GPU": 1}, len(gpu)
    return None, len(client.scheduler_info(n_workers=-1)["workers"])


def _executing_keys(dask_worker: Any) -> list[str]:
    return [str(ts.key) for ts in dask_worker.state.executing]


def drain(client: Client, futures: list[Future], timeout: float = DRAIN_SECONDS) -> None:
    """Cancel the futures, then wait until none of their tasks still runs on a worker (bounded).

    A running task cannot be stopped; waiting for it keeps the rule that a shard has one writer
    at a time once the split's lock is released (a later --resume may write the same shard).
    """
    keys = {str(f.key) for f in futures}
    client.cancel(futures)
    deadline, running = time.monotonic() + timeout, keys
    while time.monotonic() < deadline:
        try:
            running = keys & {k for ks in client.run(_executing_keys).values() for k in ks}
        except Exception:  # noqa: BLE001 - a cluster going down runs nothing
            return
        if not running:
            return
        time.sleep(0.2)
    log.warning("featcache: %d task(s) still run on workers after %.0f s", len(running), timeout)


# ---------------------------------------------------------------------------------------------
# Extraction: tasks of whole shards


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
            raise WeightsError(f"worker {socket.gethostname()} loaded other weights for {job.spec['model']} than the "
                               f"client planned with; --weights {job.spec['weights']} must be the same file on every "
                               "worker")
        _models[key] = backbone
        return backbone, True


def worker_source(job: ShardJob) -> DataSource:
    """This worker's data source for ``job``, checked to hold the planned images in the planned order."""
    key = json.dumps([job.data, job.limit])
    with _cache_lock:
        if key not in _sources:
            source = open_split_source(job.data, job.limit)
            if len(source) != job.num_samples or ids_sha256(source.ids()) != job.ids_sha256:
                raise DataError(f"--data {job.data} on worker {socket.gethostname()} holds other images than on the "
                                "client; every worker must see the same data (a shared filesystem)")
            _sources.clear()
            _sources[key] = source
        return _sources[key]


def _worker_split(job: ShardJob) -> SplitHandle:
    try:
        return FeatureStore.open(job.store, "r+", job.storage_options).split(job.split)
    except StoreError as err:
        raise StoreError(f"worker {socket.gethostname()} cannot open split {job.split!r} of {job.store} ({err}); "
                         "every worker must reach the store at the same path (a shared filesystem) or URL "
                         "(s3://...)") from None


def _worker_name() -> str:
    try:
        return str(get_worker().address)
    except ValueError:  # not on a worker (tests calling the task directly)
        return f"pid {os.getpid()}"


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
        stats = extract_shards(split, backbone, source, todo, batch_size=job.batch_size,
                               loader_workers=_loader_workers(job, backbone.device), progress=False,
                               durable=job.durable, writer_threads=job.writer_threads)
    return {"shards": stats.shards, "skipped": [k for k in shards if done[k]], "worker": _worker_name(),
            "pid": os.getpid(), "model_built": built, "images": stats.images, "nbytes": stats.nbytes,
            "forward_seconds": stats.forward_seconds, "write_seconds": stats.write_seconds}


def plan_tasks(shards: list[int], workers: int, shards_per_task: int | None = None) -> list[list[int]]:
    """Consecutive groups of shards, one per task: about ``TASKS_PER_WORKER`` tasks per worker by default.

    Fewer, larger tasks amortise per-task costs (opening the store, DataLoader processes); several
    per worker keep the load balanced and bound what a lost worker's task recomputes.
    """
    size = shards_per_task or max(1, -(-len(shards) // (max(1, workers) * TASKS_PER_WORKER)))
    return [shards[i:i + size] for i in range(0, len(shards), size)]


class DaskShardRunner:
    """``featcache.extraction.ShardRunner`` whose shards are dask tasks: the client plans on its CPU (for the
    manifest), workers keep the model loaded between tasks, and missing shards are submitted again."""

    def __init__(self, client: Client, spec: BackboneSpec, data: str, rounds: int = 3,
                 shards_per_task: int | None = None) -> None:
        self.client, self.spec, self.data = client, spec, data
        self.rounds, self.shards_per_task = rounds, shards_per_task
        self.done: dict[str, Any] = {}

    def backbone_device(self, opts: ExtractOptions) -> torch.device:
        return torch.device("cpu")  # for the plan and the manifest; workers run the model

    def run(self, split: SplitHandle, backbone: Backbone, source: DataSource, shards: list[int],
            opts: ExtractOptions) -> ShardRunStats:
        job = _shard_job(self.spec, backbone, source, split, split.store.url, self.data, opts)
        self.done = _run_shards(self.client, job, split, opts.progress, self.rounds, self.shards_per_task)
        results = self.done["results"]
        return ShardRunStats(shards=sorted(k for r in results for k in r["shards"]),
                             images=sum(r["images"] for r in results), nbytes=sum(r["nbytes"] for r in results),
                             seconds=self.done["loop_seconds"],
                             forward_seconds=sum(r["forward_seconds"] for r in results),
                             write_seconds=sum(r["write_seconds"] for r in results))

    def report(self, report: ExtractReport, stats: ShardRunStats) -> ClusterExtractReport:
        results = self.done.get("results", [])
        return ClusterExtractReport(**vars(report), workers=self.done.get("workers", 0),
                                    model_loads=sum(r["model_built"] for r in results),
                                    rounds=self.done.get("rounds", 0),
                                    shard_workers={k: r["worker"] for r in results for k in r["shards"]})


def extract_on_cluster(spec: BackboneSpec, data: str, out: str | os.PathLike[str],
                       options: ExtractOptions | None = None, *, client: Client | None = None,
                       workers: int | None = None, scheduler: str | None = None, rounds: int = 3,
                       shards_per_task: int | None = None, **overrides: Any) -> ClusterExtractReport:
    """``featcache.extraction.extract`` with the shards computed by dask workers (see the module docstring).

    Pass a ``client``, or ``workers`` (a local cluster started and stopped here) or ``scheduler``.
    ``rounds``: how often shards still incomplete after a round are submitted again;
    ``shards_per_task``: shards per task (default: see ``plan_tasks``).
    """
    opts = resolve_options(options, overrides)
    url = check_shared_url(str(out))
    if not isinstance(data, str):
        raise UsageError("extraction on a cluster needs --data as a SPEC string that every worker can open")
    if client is None:
        with cluster_client(workers, scheduler, device=opts.device, progress=opts.progress) as own:
            return extract_on_cluster(spec, data, url, opts, client=own, rounds=rounds,
                                      shards_per_task=shards_per_task)
    runner = DaskShardRunner(client, spec, data, rounds, shards_per_task)
    return cast(ClusterExtractReport, run_extraction(spec, data, url, opts, runner))


def _shard_job(spec: BackboneSpec, backbone: Backbone, source: DataSource, split: SplitHandle, url: str, data: str,
               opts: ExtractOptions) -> ShardJob:
    worker_spec = replace(spec, weights=_shared_path(spec.weights))
    return ShardJob(spec=worker_spec.to_dict(), layers=opts.layers, device=opts.device, store=url, split=opts.split,
                    data=shared_spec(data), limit=opts.limit, num_samples=len(source),
                    ids_sha256=ids_sha256(source.ids()),
                    weights_sha256=str(backbone.weights.get("state_sha256")), batch_size=split.meta.batch_size,
                    loader_workers=opts.loader_workers, durable=opts.durable, storage_options=opts.storage_options,
                    writer_threads=opts.writer_threads)


def _run_shards(client: Client, job: ShardJob, split: SplitHandle, progress: bool, rounds: int,
                shards_per_task: int | None = None) -> dict[str, Any]:
    """Submit the missing shards until the completion records say all are done (at most ``rounds`` rounds)."""
    meta = split.meta
    todo = [k for k, done in enumerate(split.completed_shards()) if not done]
    total = sum(meta.shard_bounds(k)[1] - meta.shard_bounds(k)[0] for k in todo)
    resources, nworkers = _task_resources(client, job.device)
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
        raise kind(f"{len(missing)} shard(s) of split {job.split!r} (e.g. shard {missing[0]}) could not be computed in "
                   f"{done['rounds']} round(s): {_first_failure(failures)}; the {have} completed shard(s) are kept: "
                   "rerun with --resume")
    return done


def _first_failure(failures: dict[int, BaseException]) -> str:
    if not failures:
        return "no error was reported"
    k, err = min(failures.items())
    return f"shard {k}: {type(err).__name__}: {str(err)[:200]}"


def _run_round(client: Client, job: ShardJob, tasks: list[list[int]], resources: dict[str, int] | None, pbar: Any,
               results: list[dict[str, Any]]) -> dict[int, BaseException]:
    """One task per group of shards; progress as the scheduler reports completions. Returns the errors of
    failed tasks by their first shard.

    A ``FATAL_ERRORS`` error (bad data, weights, options) stops everything: rerunning would fail the same way.
    """
    token = uuid.uuid4().hex[:8]
    futures = {client.submit(extract_shards_task, job, group, resources=resources, pure=False,
                             key=f"featcache-extract-{job.split}-shard{group[0]}-{token}"): group[0] for group in tasks}
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
        raise Interrupted(f"interrupted: shards already written by the workers are complete, shards in progress were "
                          f"finished or discarded; run the same featcache extract command with --resume to continue "
                          f"split {job.split!r} of {job.store}") from None
    return failures


# ---------------------------------------------------------------------------------------------
# Training: sweep members in parts


def plan_parts(members: list[SweepMember], workers: int, split_banks: bool = True) -> list[list[SweepMember]]:
    """Members -> at most ``workers`` parts, balanced by member count.

    Members of one bank (same method and architecture) stay in one part; only when there are fewer
    banks than workers (and ``split_banks``) are the largest banks halved, so that every worker
    gets work. Each part lists its members in sweep order.
    """
    groups: dict[str, list[SweepMember]] = {}
    for m in members:
        groups.setdefault(m.arch_key(), []).append(m)
    banks = list(groups.values())
    while split_banks and len(banks) < workers and max(len(b) for b in banks) > 1:
        i = max(range(len(banks)), key=lambda j: len(banks[j]))
        big = banks.pop(i)
        half = (len(big) + 1) // 2
        banks[i:i] = [big[:half], big[half:]]
    parts: list[list[SweepMember]] = [[] for _ in range(min(max(1, workers), len(banks)))]
    for bank in sorted(banks, key=len, reverse=True):  # largest first into the emptiest part
        min(parts, key=len).extend(bank)
    order = {m.name: i for i, m in enumerate(members)}
    return [sorted(p, key=lambda m: order[m.name]) for p in parts if p]


@dataclass(frozen=True)
class TrainPartJob:
    """One part of a sweep, trained on one worker."""

    store: str
    members: list[dict[str, Any]]
    options: TrainOptions  # the run's options; the worker resolves options.device itself
    backbone_state: Callable[[], dict[str, Any]] | None = None


def train_part_task(job: TrainPartJob) -> dict[str, Any]:
    """The work unit on a worker: ``train(store, part, tmp, partial=True)`` in a temporary directory; its files."""
    from featcache.training import train

    members = [SweepMember.from_dict(d) for d in job.members]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featcache-part-") as tmp:
        out = Path(tmp) / "run"
        train(job.store, members, out, options=replace(job.options, progress=False, resume=False, overwrite=False),
              backbone_state=job.backbone_state, partial=True)
        files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                 if p.is_file() and p.relative_to(out).parts[0] != "state"}
    return {"files": files, "worker": _worker_name(), "host": socket.gethostname(), "pid": os.getpid(),
            "members": [m.name for m in members], "seconds": time.perf_counter() - t0}


@holds_run_lock
def train_on_cluster(store: str, method: str | list[SweepMember], out: str | os.PathLike[str],
                     settings: dict[str, Any] | None = None, grid: dict[str, list[Any]] | None = None,
                     options: TrainOptions | None = None, *, client: Client | None = None,
                     workers: int | None = None, scheduler: str | None = None,
                     backbone_state: Callable[[], dict[str, Any]] | None = None, split_banks: bool = True,
                     **overrides: Any) -> dict[str, Any]:
    """``featcache.training.train`` with the sweep's members spread over dask workers; one RUNDIR as locally.

    Pass a ``client``, or ``workers`` (a local cluster started and stopped here) or ``scheduler``.
    ``options.device`` is resolved on each worker ("auto": its GPU when it has one); --resume is refused
    (a run is resumed in one process). Returns the summary.
    """
    from featcache.training import gather_parts, prepare_run, resolve_train_options

    opts = resolve_train_options(options, overrides)
    if opts.resume:
        raise UsageError("--resume continues a run in this process only: drop --workers/--scheduler to resume a "
                         "local run, or start a cluster run again with --overwrite")
    url = check_shared_url(str(store))
    members = method if isinstance(method, list) else expand(method, settings, grid)
    device = str(opts.device)
    if client is None:
        with cluster_client(workers, scheduler, device=device, progress=opts.progress) as own:
            return train_on_cluster(url, members, out, options=opts, client=own, backbone_state=backbone_state,
                                    split_banks=split_banks)
    t0, out = time.perf_counter(), Path(out)
    prepare_run(url, members, out, opts)
    resources, nworkers = _task_resources(client, device)
    parts = plan_parts(members, nworkers, split_banks)
    jobs = [TrainPartJob(url, [m.to_dict() for m in part], replace(opts, device=device), backbone_state)
            for part in parts]
    say(f"training {len(members)} member(s) in {len(parts)} part(s) on {nworkers} dask worker(s)",
        quiet=not opts.progress)
    results = _run_parts(client, jobs, resources, opts.progress)
    with tempfile.TemporaryDirectory(prefix="featcache-gather-") as tmp:
        dirs = [_unpack(r["files"], Path(tmp) / f"part{i}") for i, r in enumerate(results)]
        cluster = {"workers": nworkers, "parts": [{k: r[k] for k in ("worker", "host", "members", "seconds")}
                                                  for r in results]}
        return gather_parts(out, members, dirs, t0, opts.progress, extra={"cluster": cluster})


def _run_parts(client: Client, jobs: list[TrainPartJob], resources: dict[str, int] | None,
               progress: bool) -> list[dict[str, Any]]:
    """Run the parts; results in part order. Any failure stops the sweep (dask already reran lost workers' parts)."""
    token = uuid.uuid4().hex[:8]
    futures = [client.submit(train_part_task, job, key=f"featcache-train-part{i}-{token}", resources=resources,
                             pure=False) for i, job in enumerate(jobs)]
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    try:
        with bar(sum(len(j.members) for j in jobs), "train (members)", unit="member", progress=progress) as pbar:
            for future in as_completed(futures, loop=client.loop):
                if future.status != "finished":
                    err = future.exception() if future.status == "error" else RuntimeError(f"task {future.status}")
                    client.cancel(futures)
                    if isinstance(err, FeatcacheError):
                        raise err
                    raise ClusterError(f"training part {index[future.key]} failed on the cluster "
                                       f"({type(err).__name__}: {str(err)[:200]}); train again") from None
                results[index[future.key]] = future.result()
                pbar.update(len(jobs[index[future.key]].members))
    except KeyboardInterrupt:
        client.cancel(futures)
        raise Interrupted("interrupted: the sweep's parts were cancelled; nothing was gathered, train again") from None
    return [r for r in results if r is not None]


def _unpack(files: dict[str, bytes], root: Path) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


__all__ = ["CLUSTER_CONFIG", "ClusterExtractReport", "DaskShardRunner", "ShardJob", "TrainPartJob", "WorkerSettings",
           "apply_worker_settings", "check_shared_url", "cluster_client", "quiet_dask_logs", "connect", "drain", "extract_on_cluster",
           "extract_shards_task", "local_cluster", "plan_parts", "plan_tasks", "prepare_workers", "train_on_cluster",
           "train_part_task", "worker_env"]
