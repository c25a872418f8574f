"""Dask clusters for featcache: start or connect a client, give each worker its share of the host, drain tasks.

``cluster_client(workers=N)`` starts a local cluster of N spawned worker processes (one per GPU when
GPUs exist, each with resource ``GPU=1`` and its own ``CUDA_VISIBLE_DEVICES``), one dask thread each;
``cluster_client(scheduler=ADDRESS)`` connects to a running cluster. Every worker gets
``WorkerSettings``: torch threads = the host's cores / its workers, zarr's codec pool and concurrency to
match, OpenMP threads that sleep while waiting (see docs/scale.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from typing import Any, Iterator

import dask
import torch
import zarr
from distributed import Client, Future, Nanny, Scheduler, SpecCluster, get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from featcache import __version__
from featcache.allocator import ENV as MALLOC_ENV
from featcache.errors import ClusterError, UsageError
from featcache.extraction import ZARR_CONCURRENCY
from featcache.loader import cpu_count
from featcache.progress import say

log = logging.getLogger(__name__)

SETTINGS_PLUGIN = "featcache-settings"
# dask settings while featcache runs a cluster: spawned workers (zarr's event loop needs it), non-daemonic
# (a task may start DataLoader processes), and no MALLOC_TRIM_THRESHOLD_, which makes torch's large
# temporaries fault in fresh pages (docs/scale.md)
MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"
CLUSTER_CONFIG = {
    "distributed.worker.multiprocessing-method": "spawn",
    "distributed.worker.daemon": False,
    f"distributed.nanny.pre-spawn-environ.{MALLOC_TRIM}": None,
}
DRAIN_SECONDS = 60.0  # after Ctrl-C or an error: how long to wait for running shard tasks to finish

# ---------------------------------------------------------------------------------------------
# Where things live: stores and paths every worker can reach


def check_shared_url(url: str, what: str = "store") -> str:
    """The URL as workers must see it: memory:// refused, local paths made absolute."""
    if url.startswith("memory://"):
        raise UsageError(
            f"the {what} {url} is a memory:// store, which lives inside one process: dask workers "
            "cannot write or read it. Use a local path or an object store URL (s3://...) with "
            "--workers/--scheduler, or drop --workers to run in this process"
        )
    return url if "://" in url else os.path.abspath(url)


def shared_path(value: str) -> str:
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

    def __init__(
        self,
        torch_threads: int | None = None,
        workers_per_host: dict[str, int] | None = None,
        zarr_concurrency: int = ZARR_CONCURRENCY,
    ) -> None:
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
    env = {
        "OMP_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "OMP_WAIT_POLICY": "PASSIVE",
        "ZARR_THREADING__MAX_WORKERS": n,
        "ZARR_ASYNC__CONCURRENCY": str(ZARR_CONCURRENCY),
    }
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
    return ids[: torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def local_cluster(workers: int, device: str = "auto", torch_threads: int | None = None) -> SpecCluster:
    """N spawned worker processes on this machine, one dask thread each; one worker per GPU when GPUs exist."""
    import psutil

    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    gpus = local_gpus(device)
    if gpus and workers > len(gpus):
        raise UsageError(
            f"--workers {workers}: this machine has {len(gpus)} GPU(s) and featcache runs one worker per "
            f"GPU; use --workers {len(gpus)}, or --device cpu for CPU workers"
        )
    threads = torch_threads or max(1, cpu_count() // workers)
    memory = int(psutil.virtual_memory().total // workers)
    specs = {}
    for i in range(workers):
        options: dict[str, Any] = {
            "nthreads": 1,
            "host": "127.0.0.1",
            "memory_limit": memory,
            "env": worker_env(threads, gpus[i] if gpus else None),
            "silence_logs": logging.ERROR,
        }
        if gpus:
            options["resources"] = {"GPU": 1}
        specs[f"featcache-{i}"] = {"cls": Nanny, "options": options}
    # the dashboard (when bokeh is installed) on a free port, so that clusters never collide
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0, "dashboard_address": "127.0.0.1:0"}}
    try:
        return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=logging.ERROR, name="featcache")
    except Exception as err:  # noqa: BLE001 - e.g. ports, spawn failures: one clear line
        raise ClusterError(
            f"could not start a local dask cluster of {workers} workers ({type(err).__name__}: {err})"
        ) from None


def connect(address: str, timeout: float | None = None) -> Client:
    """A client of the scheduler at ``address`` that has at least one worker, or ``ClusterError``."""
    seconds = (
        timeout
        if timeout is not None
        else dask.utils.parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="s")
    )
    try:
        client = Client(address, timeout=seconds, set_as_default=False)
    except (OSError, TimeoutError, ValueError, TypeError) as err:
        raise ClusterError(
            f"cannot reach the dask scheduler at {address} ({type(err).__name__}: {err}); check the "
            "address (e.g. tcp://HOST:8786), that `dask scheduler` runs there and that this machine can "
            "reach it, or use --workers N for a local cluster"
        ) from None
    try:
        client.wait_for_workers(1, timeout=seconds)
    except (TimeoutError, OSError):
        client.close()
        raise ClusterError(
            f"the dask scheduler at {address} has no workers; start them with `dask worker {address} "
            "--nthreads 1` (one per GPU: --resources GPU=1)"
        ) from None
    return client


def _worker_info() -> dict[str, Any]:
    return {
        "featcache": __version__,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "cpus": cpu_count(),
        "malloc_trim": os.environ.get(MALLOC_TRIM),
        "featcache_malloc": os.environ.get(MALLOC_ENV, "keep"),
    }


def prepare_workers(client: Client, torch_threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Check that every worker runs this featcache version and register ``WorkerSettings``; {address: info}."""
    try:
        info = client.run(_worker_info)
    except Exception as err:  # noqa: BLE001 - featcache missing on a worker fails to unpickle there
        raise ClusterError(
            f"the dask workers cannot run featcache ({type(err).__name__}: {err}); install featcache "
            f"{__version__} and its dependencies on every worker"
        ) from None
    other = {addr: i["featcache"] for addr, i in info.items() if i["featcache"] != __version__}
    if other:
        raise ClusterError(
            f"workers run other featcache versions than this client ({__version__}): {other}; install "
            "the same version everywhere"
        )
    if any(i["malloc_trim"] is not None and i.get("featcache_malloc") == "system" for i in info.values()):
        log.warning(
            "featcache: the dask workers run with %s set (dask's default) and %s=system, which makes torch "
            "about 30%% slower; start them without either (docs/scale.md)",
            MALLOC_TRIM,
            MALLOC_ENV,
        )
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
def cluster_client(
    workers: int | None = None,
    scheduler: str | None = None,
    *,
    device: str = "auto",
    torch_threads: int | None = None,
    timeout: float | None = None,
    progress: bool = False,
) -> Iterator[Client]:
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
    return [
        addr
        for addr, w in client.scheduler_info(n_workers=-1)["workers"].items()
        if w.get("resources", {}).get("GPU", 0) >= 1
    ]


def task_resources(client: Client, device: str) -> tuple[dict[str, int] | None, int]:
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


@contextlib.contextmanager
def client_for(
    client: Client | None, workers: int | None, scheduler: str | None, device: str, progress: bool
) -> Iterator[Client]:
    """``client`` itself (left open), or else a client of ``cluster_client(workers, scheduler)``, closed after."""
    if client is not None:
        yield client
        return
    with cluster_client(workers, scheduler, device=device, progress=progress) as own:
        yield own


def worker_name() -> str:
    """The address of the dask worker running this task (or this process's pid outside a worker)."""
    try:
        return str(get_worker().address)
    except ValueError:  # not on a worker (tests calling the task directly)
        return f"pid {os.getpid()}"
