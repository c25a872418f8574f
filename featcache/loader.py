"""Images -> batches of transformed tensors for a backbone pass (extraction and predict).

Sources (featcache.data) give PIL images in a fixed order; this module turns them into the batches the
frozen backbone reads: the eval transform on in-process threads for a CPU backbone (``TransformPool``),
DataLoader worker processes for a GPU or for augmented views, shard-aligned batches for extraction
(``ShardBatchSampler``), and views seeded per (image, view) so that a resumed extraction is bitwise equal.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from featcache.manifest import SplitMeta
from featcache.sources.base import DataSource

if TYPE_CHECKING:
    from featcache.backbone import Backbone


def cpu_count() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_loader_workers(device: torch.device | str = "cpu", views: int = 1) -> int:
    """DataLoader worker processes: none for a CPU backbone (its forward uses every core: the images are
    transformed on a ``TransformPool`` between forwards instead); for a GPU, or augmented views (seeded per
    image through the global RNGs, so not on threads), 1 on small machines and up to 4 on larger ones."""
    if torch.device(device).type == "cpu" and views == 1:
        return 0
    cpus = cpu_count()
    return 1 if cpus <= 4 else min(4, cpus // 4)


def transform_threads(loader_workers: int, views: int) -> int:
    """Threads of the in-process ``TransformPool``: the forward's cores when no DataLoader worker
    transforms the images, 0 (none) with workers or with augmented views (they seed the global RNGs)."""
    if loader_workers or views > 1:
        return 0
    return max(1, min(torch.get_num_threads(), cpu_count()))


def transform_pool(loader_workers: int, views: int) -> TransformPool | None:
    """The ``TransformPool`` for a loader with this many workers and views, or None (workers, views, one core)."""
    threads = transform_threads(loader_workers, views)
    return TransformPool(threads) if threads > 1 else None


class TransformedDataset(torch.utils.data.Dataset):
    """(image tensor, label, index) items for a ``DataLoader``."""

    def __init__(self, source: DataSource, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.source[index]
        return self.transform(sample.image), sample.label, index


class TransformPool:
    """Threads of this process that load and transform the items of a batch, each with one torch thread.

    For a backbone on the CPU, whose forward keeps every core busy: a DataLoader worker process would
    preempt one of the forward's OpenMP threads and stall the others at the next barrier; transforming
    between two forwards costs about the transform's CPU time over the cores (docs/store.md). PIL and
    torch release the GIL while they work. Each thread runs torch ops single-threaded (a 3x224x224 normalisation would otherwise
    start an OpenMP team per thread); the caller's own thread setting is left as it was.
    """

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        caller = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(
            threads, thread_name_prefix="featcache-transform", initializer=_one_intraop_thread
        )
        # start every thread now: each sets its own intra-op threads to 1 (torch keeps that per thread,
        # and also as the default for threads started later, which the caller's setting then restores)
        started = threading.Barrier(threads + 1, timeout=60)
        waits = [self._pool.submit(started.wait) for _ in range(threads)]
        started.wait()
        for w in waits:
            w.result()
        torch.set_num_threads(caller)

    def map(self, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
        """``[fn(x) for x in items]`` on the pool's threads, in order; the first error is raised here."""
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        """Stop the threads; items not started are dropped (an interrupted batch is not needed)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "TransformPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _one_intraop_thread() -> None:
    torch.get_num_threads()  # torch initialises a thread's setting lazily, from the process default: do it first
    torch.set_num_threads(1)


class PooledItems(torch.utils.data.Dataset):
    """A dataset whose batches a ``DataLoader`` with ``num_workers=0`` fetches on a ``TransformPool``.

    The DataLoader asks for a whole batch through ``__getitems__``; items come back in order and an
    error in one of them is raised as itself (no worker traceback to unwrap). Only for datasets whose
    items do not draw from the global random generators (the eval transform): those are not per thread.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, pool: TransformPool) -> None:
        self.dataset, self.pool = dataset, pool

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        return self.pool.map(self.dataset.__getitem__, indices)


@contextlib.contextmanager
def seeded_rng(seed: int, index: int, view: int) -> Iterator[None]:
    """Seed torch, numpy and ``random`` from (seed, index, view); restore their states afterwards."""
    state = np.random.SeedSequence([seed, index, view]).generate_state(2)
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(state[0]))
        random.seed(int(state[0]))
        np.random.seed(int(state[1]))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class AugmentedViews(torch.utils.data.Dataset):
    """(views (V, 3, H, W), label, index) items: view 0 the eval transform (``eval_transform``), views 1..V-1 draws
    of the training transform seeded by (seed, index, view), so the same image at the same index gets the same
    views in extraction and in ``predict --tta``. Without ``eval_transform`` every view is a training draw (the
    layout of splits written before the eval view was kept)."""

    def __init__(
        self,
        source: DataSource,
        transform: Callable[[Any], torch.Tensor],
        views: int,
        seed: int,
        eval_transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        self.source, self.transform, self.views, self.seed = source, transform, views, seed
        self.eval_transform = eval_transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        sample = self.source[index]
        out = []
        for view in range(self.views):
            if view == 0 and self.eval_transform is not None:
                out.append(self.eval_transform(sample.image))
                continue
            with seeded_rng(self.seed, index, view):
                out.append(self.transform(sample.image))
        return torch.stack(out), sample.label, index


def view_dataset(
    source: DataSource, backbone: Backbone, views: int, seed: int, eval_view: int | None
) -> AugmentedViews:
    """The views a multi-view split stores (or ``predict --tta`` recomputes) in its recorded layout: ``eval_view``
    0 (the eval transform first), or None for a split written before the eval view was kept (all training draws)."""
    if eval_view not in (0, None):
        raise ValueError(f"the eval view is view 0 (or None for an old split), got {eval_view}")
    eval_transform = backbone.transform if eval_view == 0 else None
    return AugmentedViews(source, backbone.train_transform(), views, seed, eval_transform)


class ShardBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of image indices that never cross a shard boundary and always start at the same images."""

    def __init__(self, meta: SplitMeta, shards: Sequence[int], images_per_batch: int) -> None:
        self.meta, self.shards, self.images_per_batch = meta, list(shards), images_per_batch

    def __iter__(self) -> Iterator[list[int]]:
        for k in self.shards:
            start, stop = self.meta.shard_bounds(k)
            for b in range(start, stop, self.images_per_batch):
                yield list(range(b, min(b + self.images_per_batch, stop)))

    def __len__(self) -> int:
        return sum(
            -(-(stop - start) // self.images_per_batch)
            for start, stop in (self.meta.shard_bounds(k) for k in self.shards)
        )


def make_loader(
    source: DataSource,
    backbone: Backbone,
    meta: SplitMeta,
    shards: Sequence[int],
    batch_size: int,
    workers: int,
    pool: TransformPool | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader over the given shards' images (eval transform, or ``meta.views`` views: ``view_dataset``);
    with ``pool`` (and no workers) each batch is transformed on the pool's threads."""
    if meta.views > 1:
        dataset: torch.utils.data.Dataset = view_dataset(source, backbone, meta.views, meta.seed, meta.eval_view_index)
    else:
        dataset = TransformedDataset(source, backbone.transform)
        if pool is not None and not workers:
            dataset = PooledItems(dataset, pool)
    images_per_batch = max(1, batch_size // meta.views)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=ShardBatchSampler(meta, shards, images_per_batch),
        num_workers=workers,
        pin_memory=backbone.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )


def image_loader(
    source: DataSource,
    transform: Callable[[Image.Image], torch.Tensor],
    batch_size: int,
    workers: int,
    pool: TransformPool | None,
) -> torch.utils.data.DataLoader:
    """(images, labels, indices) batches of ``source`` in order, transformed on ``pool`` or by ``workers``."""
    dataset: torch.utils.data.Dataset = TransformedDataset(source, transform)
    if pool is not None and not workers:
        dataset = PooledItems(dataset, pool)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)


def unwrap_worker_error(err: BaseException) -> BaseException:
    """The error a DataLoader worker raised, with its own message instead of the traceback text.

    ``torch.utils.data`` re-raises a worker's exception in the main process as the same type with
    the message ``"Caught DataError in DataLoader worker process 0.\nOriginal Traceback ..."``; a
    user must see one line (``cannot read image ...``), not a traceback. Other errors come back as they are.
    """
    text = str(err)
    first = text.split("\n", 1)[0]
    if not (first.startswith("Caught ") and "DataLoader worker" in first):
        return err
    lines = [line for line in text.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else first
    kind = type(err)
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        if last.startswith(prefix):
            last = last[len(prefix) :]
            break
    try:
        unwrapped = kind(last)
    except Exception:  # noqa: BLE001 - a type that needs other arguments
        unwrapped = RuntimeError(last)
    return unwrapped
