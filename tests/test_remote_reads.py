"""Reading a store over a network-like file system: the same batches as locally, with many requests in flight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import latency_fs
from featcache.store.feature_store import FeatureStore
from featcache.store.reader import open_reader

from .helpers.stores import run_extract


@pytest.fixture(scope="module")
def store(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("remote") / "s.zarr"
    run_extract(images, out, dtype="int8")  # 6 shards of 4 images
    return out


def _epoch(split, mode: str, **kw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    reader = open_reader(split, split.store.manifest.tap_names, mode, batch_size=5, seed=3, **kw)
    batches = list(reader.epoch(1))
    return torch.cat([b.index for b in batches]), {n: torch.cat([b.taps[n] for b in batches]) for n in batches[0].taps}


@pytest.mark.parametrize("mode", ["stream", "ram"])
def test_slow_remote_store_gives_the_local_batches(store: Path, mode: str) -> None:
    latency_fs.register()
    remote = FeatureStore.open(latency_fs.url(str(store)), storage_options={"delay": 0.02}).split("train")
    assert not remote.shard_io.local
    index, taps = _epoch(remote, mode, block_images=4, buffer_mb=0.05)
    local_index, local_taps = _epoch(FeatureStore.open(store).split("train"), mode, block_images=4, buffer_mb=0.05)
    assert torch.equal(index, local_index)
    for name, t in taps.items():
        assert torch.equal(t, local_taps[name])


def test_stream_keeps_requests_in_flight(store: Path) -> None:
    """20 ms per request: the stream reader's shard reads overlap (many requests waiting at once), and the read-ahead
    deepens when reads are slow next to the consumer's work."""
    latency_fs.register()
    url = latency_fs.url(str(store))
    remote = FeatureStore.open(url, storage_options={"delay": 0.02}).split("train")
    fs = remote.group.store.fs
    reader = open_reader(
        remote, remote.store.manifest.tap_names, "stream", batch_size=4, seed=0, block_images=4, buffer_mb=0.01
    )
    assert reader.io_threads >= 16 and reader.window_blocks == 1
    fs.max_in_flight = 0
    assert sum(len(b) for b in reader.epoch(0)) == 24
    assert fs.max_in_flight >= 4  # the 4 arrays of a block at least, and blocks ahead
    assert reader.last_read_ahead.max_ahead_seen >= 2
