"""FroFA's statistics of a run: the training features' per-channel range, computed once, recorded in RUNDIR.

FroFA (featcache.augment) shifts a feature by a fraction of its channel's range, max_c - min_c, taken over the
training features. ``run_feature_stats`` computes it in one pass over the training split's taps (every token,
sample and view of the samples that train, held-out validation samples excluded) through a stream reader
(memory bounded by its window), before the first step, and writes ``RUNDIR/feature_stats.safetensors``
("<tap>/min", "<tap>/max", with the record as metadata). A resumed run, and every part of a run trained on a
cluster, loads that file or computes the same numbers from the same samples; nothing recomputes them from batches.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from featcache.augment import FeatureStats, feature_stats
from featcache.checkpoint import read_tensors, write_tensors
from featcache.errors import CheckpointError
from featcache.store.feature_store import SplitHandle
from featcache.store.reader import open_reader

STATS_FILE = "feature_stats.safetensors"
WHAT = (
    "FroFA's x_min and x_max: per tap, the per-channel minimum and maximum over every token, sample and view "
    "of the training samples (held-out validation samples excluded)"
)


def run_feature_stats(
    split: SplitHandle,
    taps: list[str],
    subset: np.ndarray | None,
    rundir: Path,
    resume: bool,
    stream_options: dict[str, Any] | None = None,
) -> tuple[FeatureStats, dict[str, Any]]:
    """The run's statistics and their record: loaded from RUNDIR on resume when it holds them, else computed."""
    path = rundir / STATS_FILE
    if resume and path.is_file():
        return load_feature_stats(path, taps)
    reader = open_reader(
        split, taps, "stream", batch_size=256, shuffle=False, subset=subset, all_views=True, **(stream_options or {})
    )
    stats = feature_stats(batch.taps for batch in reader.epoch(0))
    record = {
        "file": STATS_FILE,
        "what": WHAT,
        "split": split.name,
        "samples": reader.num_samples,
        "views": split.meta.views,
        "taps": list(taps),
    }
    return stats, record


def save_feature_stats(rundir: Path, stats: FeatureStats, record: dict[str, Any]) -> None:
    """RUNDIR/feature_stats.safetensors (atomic), the record in its metadata; a resumed run keeps its file."""
    path = rundir / STATS_FILE
    if not path.is_file():
        write_tensors(path, stats.to_tensors(), {"record": json.dumps(record)})


def load_feature_stats(path: Path, taps: list[str]) -> tuple[FeatureStats, dict[str, Any]]:
    """The statistics a run recorded; refuses a file that lacks a tap the run augments."""
    tensors = read_tensors(path)
    try:
        with safe_open(str(path), "pt") as f:
            record = json.loads((f.metadata() or {})["record"])
    except (KeyError, ValueError, OSError) as err:
        raise CheckpointError(f"{path} has no valid record ({err}); the run is damaged: start a new --out") from None
    stats = FeatureStats.from_tensors(tensors, int(record.get("samples", 0)))
    missing = [t for t in taps if t not in stats.low]
    if missing:
        raise CheckpointError(
            f"{path} holds no statistics for tap(s) {', '.join(missing)}; it belongs to another "
            "sweep: start a new --out"
        )
    return stats, record


__all__ = ["STATS_FILE", "load_feature_stats", "run_feature_stats", "save_feature_stats"]
