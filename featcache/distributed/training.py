"""A sweep's members in parts on dask workers: ``train_on_cluster`` writes one RUNDIR as a local sweep writes it.

The client checks the run as ``featcache.training.train`` does (``plan_run``) and creates RUNDIR; the
members are split into parts (``plan_parts``: members of one bank stay in one part unless there are
fewer banks than workers); each part is trained on a worker by ``plan_run`` and ``train_members`` into a
temporary directory whose files come back to the client; ``finish_run`` then summarizes all parts into
RUNDIR. Batch order is a function of (seed, epoch) on every worker, as locally.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from distributed import Client, as_completed

from featcache.errors import ClusterError, FeatcacheError, Interrupted, UsageError
from featcache.progress import bar, say
from featcache.rundir import holds_run_lock
from featcache.sweep import SweepMember, expand, group_banks
from featcache.training import TrainOptions, finish_run, plan_run, resolve_train_options, train_members

from .cluster import check_shared_url, client_for, task_resources, worker_name

PART_FILES_SKIPPED = ("state", "sweep.json", "metrics.jsonl")  # a part's files the client does not copy into RUNDIR


def plan_parts(members: list[SweepMember], workers: int, split_banks: bool = True) -> list[list[SweepMember]]:
    """Members -> at most ``workers`` parts, balanced by member count.

    Members of one bank (``featcache.sweep.group_banks``) stay in one part; only when there are fewer
    banks than workers (and ``split_banks``) are the largest banks halved, so that every worker gets
    work. Each part lists its members in sweep order.
    """
    banks = group_banks(members)
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
    """The work unit on a worker: ``train_members`` of the part in a temporary directory; its files and result."""
    members = [SweepMember.from_dict(d) for d in job.members]
    options = replace(job.options, progress=False, resume=False, overwrite=False)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="featcache-part-") as tmp:
        out = Path(tmp) / "run"
        trained = train_members(plan_run(job.store, members, out, options, job.backbone_state))
        files = {
            str(p.relative_to(out)): p.read_bytes()
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] not in PART_FILES_SKIPPED
        }
    return {
        "files": files,
        "trained": trained,
        "worker": worker_name(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "members": [m.name for m in members],
        "seconds": time.perf_counter() - t0,
    }


@holds_run_lock
def train_on_cluster(
    store: str,
    method: str | list[SweepMember],
    out: str | os.PathLike[str],
    settings: dict[str, Any] | None = None,
    grid: dict[str, list[Any]] | None = None,
    options: TrainOptions | None = None,
    *,
    client: Client | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    backbone_state: Callable[[], dict[str, Any]] | None = None,
    split_banks: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """``featcache.training.train`` with the sweep's members spread over dask workers; one RUNDIR as locally.

    Pass a ``client``, or ``workers`` (a local cluster started and stopped here) or ``scheduler``.
    ``options.device`` is resolved on each worker ("auto": its GPU when it has one); --resume is refused
    (a run is resumed in one process). Returns the summary.
    """
    opts = resolve_train_options(options, overrides)
    if opts.resume:
        raise UsageError(
            "--resume continues a run in this process only: drop --workers/--scheduler to resume a "
            "local run, or start a cluster run again with --overwrite"
        )
    if opts.halving is not None:
        raise UsageError(
            "--halving with --workers/--scheduler is not supported: the rungs rank all members of a sweep at the "
            "same epochs, and the parts of a cluster run train apart to the end; run the halving sweep in one "
            "process (drop --workers/--scheduler)"
        )
    url = check_shared_url(str(store))
    members = method if isinstance(method, list) else expand(method, settings, grid)
    device = str(opts.device)
    run = plan_run(url, members, out, opts)  # every refusal before a cluster starts
    with client_for(client, workers, scheduler, device, opts.progress) as dask_client:
        run.rundir.start()
        resources, nworkers = task_resources(dask_client, device)
        parts = plan_parts(members, nworkers, split_banks)
        jobs = [
            TrainPartJob(url, [m.to_dict() for m in part], replace(opts, device=device), backbone_state)
            for part in parts
        ]
        say(
            f"training {len(members)} member(s) in {len(parts)} part(s) on {nworkers} dask worker(s)",
            quiet=not opts.progress,
        )
        results = _run_parts(dask_client, jobs, resources, opts.progress)
    for result in results:
        for rel, data in result["files"].items():  # relative paths inside the part's RUNDIR
            path = run.rundir.path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    cluster = {
        "workers": nworkers,
        "parts": [{k: r[k] for k in ("worker", "host", "members", "seconds")} for r in results],
    }
    return finish_run(run, [r["trained"] for r in results], extra={"cluster": cluster})


def _run_parts(
    client: Client, jobs: list[TrainPartJob], resources: dict[str, int] | None, progress: bool
) -> list[dict[str, Any]]:
    """Run the parts; results in part order. Any failure stops the sweep (dask already reran lost workers' parts)."""
    token = uuid.uuid4().hex[:8]
    futures = [
        client.submit(train_part_task, job, key=f"featcache-train-part{i}-{token}", resources=resources, pure=False)
        for i, job in enumerate(jobs)
    ]
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
                    raise ClusterError(
                        f"training part {index[future.key]} failed on the cluster "
                        f"({type(err).__name__}: {str(err)[:200]}); train again"
                    ) from None
                results[index[future.key]] = future.result()
                pbar.update(len(jobs[index[future.key]].members))
    except KeyboardInterrupt:
        client.cancel(futures)
        raise Interrupted("interrupted: the sweep's parts were cancelled; nothing was gathered, train again") from None
    return [r for r in results if r is not None]
