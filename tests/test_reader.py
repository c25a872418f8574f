"""Readers: every mode yields every completed sample once per epoch, deterministic, bounded, safe."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
import torch

from featcache.errors import CorruptionError, StoreError, UsageError
from featcache.manifest import Manifest, SplitMeta, TapInfo
from featcache.store.codecs import encode
from featcache.store.feature_store import FeatureStore
from featcache.store.reader import TapDataset, choose_mode, open_reader

N = 50
TAPS = [TapInfo("embed", 0, 0, 3, 1, 4, (1, 2), "none"), TapInfo("block1", 1, 1, 3, 1, 8, (1, 2), "none")]


def tap_values(name: str, n: int, views: int = 1) -> torch.Tensor:
    """Values that encode (image, view): image i, view v holds i + v / 10 + a small channel ramp."""
    c = 4 if name == "embed" else 8
    base = torch.arange(n, dtype=torch.float32)[:, None, None, None] + torch.arange(views)[None, :, None, None] / 10
    t = base + torch.linspace(0, 0.05, c)[None, None, None, :] * torch.ones(1, 1, 3, 1)
    return t if views > 1 else t[:, 0]


def make_store(
    path, dtype: str = "float32", views: int = 1, complete: list[int] | None = None, n: int = N
) -> FeatureStore:
    m = Manifest(backbone={"spec": {"model": "fake"}}, taps=TAPS, dtype=dtype)
    store = FeatureStore.create(str(path), m)
    meta = SplitMeta(num_samples=n, chunk_images=2, shard_images=8, views=views, classes=["a", "b", "c"])
    split = store.create_split("train", meta)
    values = {t.name: tap_values(t.name, n, views) for t in TAPS}
    for k in range(meta.num_shards):
        if complete is not None and k not in complete:
            continue
        s, e = meta.shard_bounds(k)
        split.write_shard(
            k,
            {name: encode(v[s:e], dtype) for name, v in values.items()},
            np.arange(s, e) % 3,
            [f"img{i}" for i in range(s, e)],
        )
        split.set_complete(k)
    return FeatureStore.open(str(path))


@pytest.fixture
def store(tmp_path) -> FeatureStore:
    return make_store(tmp_path / "s.zarr")


MODES = ["ram", "stream"]
STREAM = dict(buffer_mb=0.0005, prefetch=2, block_images=4)  # tiny window: several windows per epoch


def reader(store: FeatureStore, mode: str, **kw):
    extra = STREAM if mode == "stream" else {}
    return open_reader(
        store.split("train"), ["embed", "block1"], mode=mode, batch_size=kw.pop("batch_size", 7), **extra, **kw
    )


def collect(r, epoch: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    batches = list(r.epoch(epoch))
    index = torch.cat([b.index for b in batches])
    taps = {n: torch.cat([b.taps[n] for b in batches]) for n in batches[0].taps}
    return index, taps, torch.cat([b.labels for b in batches])


@pytest.mark.parametrize("mode", MODES)
def test_every_sample_once_with_right_labels_and_values(store, mode: str) -> None:
    r = reader(store, mode)
    assert r.mode == mode and len(r) == 8
    index, taps, labels = collect(r)
    assert sorted(index.tolist()) == list(range(N))
    assert torch.equal(labels, index % 3)
    for name in ("embed", "block1"):
        assert taps[name].dtype == torch.float32
        assert torch.equal(taps[name], tap_values(name, N)[index])


@pytest.mark.parametrize("mode", MODES)
def test_order_depends_only_on_seed_and_epoch(store, mode: str) -> None:
    a0 = collect(reader(store, mode, seed=1), 0)[0]
    b0 = collect(reader(store, mode, seed=1), 0)[0]
    a1 = collect(reader(store, mode, seed=1), 1)[0]
    c0 = collect(reader(store, mode, seed=2), 0)[0]
    assert torch.equal(a0, b0)
    assert not torch.equal(a0, a1) and not torch.equal(a0, c0)
    assert not torch.equal(a0, torch.arange(N))  # actually shuffled


@pytest.mark.parametrize("mode", MODES)
def test_no_shuffle_is_storage_order(store, mode: str) -> None:
    assert torch.equal(collect(reader(store, mode, shuffle=False))[0], torch.arange(N))


def test_modes_agree_on_contents(store) -> None:
    got = {}
    for mode in MODES:
        index, taps, _ = collect(reader(store, mode, seed=3))
        order = torch.argsort(index)
        got[mode] = {n: t[order] for n, t in taps.items()}
    ds = TapDataset(store.split("train"), ["embed", "block1"])
    direct = torch.stack([ds[i][0]["block1"] for i in range(N)])
    assert torch.equal(got["ram"]["block1"], got["stream"]["block1"]) and torch.equal(got["ram"]["block1"], direct)
    assert torch.equal(got["ram"]["embed"], got["stream"]["embed"])


@pytest.mark.parametrize("mode", MODES)
def test_drop_last(store, mode: str) -> None:
    r = reader(store, mode, drop_last=True)
    sizes = [len(b) for b in r.epoch(0)]
    assert sizes == [7] * 7 and len(r) == 7


def test_stream_memory_is_bounded_by_its_window(store) -> None:
    r = reader(store, "stream", batch_size=3)
    assert r.window_blocks == 1
    collect(r)
    assert 0 < r.peak_buffered_images <= r.window_blocks * r.block_images + 3
    big = open_reader(store.split("train"), ["embed"], mode="stream", batch_size=3, buffer_mb=64)
    collect(big)
    assert big.peak_buffered_images == N  # a window larger than the split holds it all
    assert big.block_images == 8  # whole shards when a shard fits the window


def test_stream_blocks_never_exceed_the_window(store) -> None:
    # two taps, float32: 144 bytes per image, a shard of 8 images 1152 bytes, a chunk of 2 images 288
    r = open_reader(store.split("train"), ["embed", "block1"], mode="stream", batch_size=3, buffer_mb=700 / 2**20)
    assert (r.block_images, r.window_blocks) == (4, 1)  # two whole chunks (576 bytes), not the 1152-byte shard
    ids = torch.cat([b.index for b in r.epoch(0)])
    assert sorted(ids.tolist()) == list(range(N))
    assert 0 < r.peak_buffered_images <= 4 + 3


@pytest.mark.parametrize("mode", MODES)
def test_only_completed_shards_are_read(tmp_path, mode: str) -> None:
    store = make_store(tmp_path / "p.zarr", complete=[0, 2, 5])
    index, _, _ = collect(reader(store, mode))
    want = [i for k in (0, 2, 5) for i in range(8 * k, min(8 * k + 8, N))]
    assert sorted(index.tolist()) == want


def test_no_completed_shard_is_an_error(tmp_path) -> None:
    store = make_store(tmp_path / "e.zarr", complete=[])
    with pytest.raises(StoreError, match="no completed shard"):
        reader(store, "ram")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_caches_decode(tmp_path, mode: str, dtype: str) -> None:
    store = make_store(tmp_path / f"{dtype}.zarr", dtype=dtype)
    index, taps, _ = collect(reader(store, mode))
    want = tap_values("block1", N)[index].to(getattr(torch, dtype)).float()
    assert taps["block1"].dtype == torch.float32 and torch.equal(taps["block1"], want)


@pytest.mark.parametrize("mode", MODES)
def test_views_one_drawn_per_sample_per_epoch(tmp_path, mode: str) -> None:
    store = make_store(tmp_path / "v.zarr", views=3)
    seen = []
    for epoch in range(4):
        index, taps, _ = collect(reader(store, mode, seed=5), epoch)
        view = torch.round((taps["embed"][:, 0, 0] - index) * 10).long()  # decode the view from the value
        assert taps["embed"].shape == (N, 3, 4) and set(view.tolist()) <= {0, 1, 2}
        again = collect(reader(store, mode, seed=5), epoch)[1]["embed"]
        assert torch.equal(again, taps["embed"])
        seen.append(view[torch.argsort(index)])
    assert not all(torch.equal(seen[0], s) for s in seen[1:])  # views change between epochs
    assert len(set(torch.cat(seen).tolist())) == 3


@pytest.mark.parametrize("mode", MODES)
def test_corrupt_chunk_is_named(store, mode: str) -> None:
    shard = sorted(glob.glob(os.path.join(store.url, "train", "block1", "c", "1", "*", "*")))[0]
    data = bytearray(open(shard, "rb").read())
    data[20] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(CorruptionError, match=r"tap 'block1' of split 'train'.*shard 1.*--repair"):
        collect(reader(store, mode))


@pytest.mark.parametrize("mode,value", [("ram", float("nan")), ("stream", float("-inf")), ("stream", float("nan"))])
def test_nan_features_are_refused(tmp_path, mode, value) -> None:
    make_store(tmp_path / "n.zarr")
    store = FeatureStore.open(str(tmp_path / "n.zarr"), mode="r+")
    split = store.split("train")
    bad = tap_values("embed", N)[8:16].clone()
    bad[3, 1, 2] = value
    split.group["embed"][8:16] = encode(bad, "float32")
    with pytest.raises(CorruptionError, match="NaN/Inf.*first at image 11"):
        collect(reader(store, mode))


@pytest.mark.parametrize("mode", ["ram", "stream"])
def test_finite_check_runs_once_per_block(tmp_path, monkeypatch, mode) -> None:
    import featcache.store.reader as reader_module

    make_store(tmp_path / "f.zarr")
    checked = []
    monkeypatch.setattr(reader_module, "_check_finite", lambda t, split, tap, start: checked.append((tap, start)))
    r = reader(FeatureStore.open(str(tmp_path / "f.zarr")), mode)
    first = [b.taps["embed"].clone() for b in r.epoch(0)]
    once = list(checked)
    assert len(once) == len(set(once)) > 0 and {t for t, _ in once} == set(r.arrays)
    second = [b.taps["embed"].clone() for b in r.epoch(0)]
    assert checked == once  # the second epoch checks nothing again
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_finite_check_reads_the_bits(dtype) -> None:
    from featcache.store.reader import _all_finite

    x = torch.randn(5, 7, 9).to(dtype) * 1000
    edge = torch.tensor(
        [torch.finfo(dtype).max, -torch.finfo(dtype).max, torch.finfo(dtype).tiny, 0.0, -0.0], dtype=dtype
    )
    assert _all_finite(x) and _all_finite(edge) and _all_finite(torch.zeros(0, 3, dtype=dtype))
    for value in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[3, 2, 1] = value
        assert not _all_finite(y), value


def test_auto_choice(store, monkeypatch) -> None:
    r = open_reader(store.split("train"), ["embed"], mode="auto")
    assert r.mode == "ram" and "fit" in r.choice.reason
    import psutil

    class Tiny:
        available = 100

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    assert choose_mode("auto", 10_000, torch.device("cpu")).mode == "stream"
    with pytest.raises(UsageError, match="--reader gpu needs --device cuda"):
        choose_mode("gpu", 10, torch.device("cpu"))
    with pytest.raises(UsageError, match="must be one of"):
        choose_mode("disk", 10, torch.device("cpu"))


def test_torch_dataloader_compatibility(store) -> None:
    r = reader(store, "ram")
    loader = torch.utils.data.DataLoader(r.as_dataset(epoch=0), batch_size=None)
    assert sum(len(b) for b in loader) == N
    ds = TapDataset(store.split("train"), ["embed"])
    xs, ys = next(iter(torch.utils.data.DataLoader(ds, batch_size=10, shuffle=False)))
    assert xs["embed"].shape == (10, 3, 4) and ys.tolist() == [i % 3 for i in range(10)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["gpu", "ram"])
def test_cuda_modes(store, mode: str) -> None:
    r = open_reader(store.split("train"), ["embed", "block1"], mode=mode, batch_size=7, device="cuda")
    index, taps, labels = collect(r)
    assert taps["block1"].device.type == "cuda" and labels.device.type == "cuda"
    assert torch.equal(taps["block1"].cpu(), tap_values("block1", N)[index.cpu()])
    assert open_reader(store.split("train"), ["embed"], mode="auto", device="cuda").mode == "gpu"
