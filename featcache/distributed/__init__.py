"""Runs on dask.distributed: extraction shards and sweep members as tasks on a cluster (docs/scale.md).

featcache has no scheduler of its own. dask.distributed places the tasks, reruns those of a lost worker
and reports completions; featcache supplies the work units, which call the functions a single process
calls, and the bookkeeping. One module per job: ``cluster`` (start or connect a client, each worker's
thread settings, draining tasks), ``extraction`` (a split's missing shards as tasks) and ``training``
(a sweep's members in parts, one RUNDIR as a local sweep writes it). Stores must be reachable from
every worker at the same URL: a shared filesystem path or an object store URL (s3://); ``memory://``
stores live inside one process and are refused.
"""
