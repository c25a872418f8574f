"""Compact caches: 8-bit taps (int8, float8_e4m3) with per-row scales, token pooling, --layers every:G, readers
that hold what is stored, and the sizes inspect reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr
from click.testing import CliRunner

from featcache.cli import app
from featcache.errors import TapOverflowError
from featcache.infer import load_predictor
from featcache.manifest import TapInfo
from featcache.methods.last import choose_taps
from featcache.store import TapDataset, split_to_dask, split_to_xarray
from featcache.store.codecs import decode_array, dequantize, quantize, storage_view
from featcache.store.describe import describe_store
from featcache.store.feature_store import FeatureStore
from featcache.store.reader import open_reader
from featcache.store.verify import verify_store
from featcache.taps import every_gth, pool_token_grid, pooled_info
from featcache.training import train

from .conftest import TINY_VIT
from .helpers.stores import PROBE_FORWARDS, read_split, run_extract

EIGHT_BIT = ["int8", "float8_e4m3"]


@pytest.mark.parametrize("dtype", EIGHT_BIT)
def test_quantize_rows_is_deterministic_bounded_and_keeps_zero_rows(dtype: str) -> None:
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 7).view(1, 7, 1)
    x[1, 2] = 0
    codes, scale = quantize(x, dtype)
    again = quantize(x.clone(), dtype)
    assert torch.equal(codes, again[0]) and torch.equal(scale, again[1])
    assert (
        scale.shape == (3, 7)
        and scale.dtype == torch.bfloat16
        and codes.dtype == (torch.int8 if dtype == "int8" else torch.uint8)
    )
    y = dequantize(codes, scale, dtype)
    assert torch.equal(y[1, 2], torch.zeros(64))
    amax = x.abs().amax(-1, keepdim=True)
    err = (y - x).abs() / torch.where(amax > 0, amax, 1)
    bound = 0.5 / 127 + 1e-3 if dtype == "int8" else 2**-4 + 1e-3  # half a step (int8), half an fp8 ulp
    assert float(err.max()) <= bound
    as_numpy = decode_array(codes.numpy(), dtype, storage_view(scale))  # what plain zarr users get
    assert np.array_equal(as_numpy, y.numpy())


def test_pooling_averages_windows_keeps_prefix_and_handles_odd_grids() -> None:
    info = TapInfo("t", 0, 0, 1 + 49, 1, 4, (7, 7), "none")
    t = torch.arange(2 * 50 * 4, dtype=torch.float32).reshape(2, 50, 4)
    out = pool_token_grid(t, info, 2)
    assert out.shape == (2, 1 + 16, 4) and torch.equal(out[:, 0], t[:, 0])  # class token kept
    fmap = t[:, 1:].transpose(1, 2).reshape(2, 4, 7, 7)
    assert torch.equal(out[:, 1], fmap[:, :, :2, :2].mean((2, 3)))
    assert torch.equal(out[:, -1], fmap[:, :, 6, 6])  # the corner window holds one token
    assert torch.equal(out[:, 4], fmap[:, :, 0:2, 6].mean(2))  # the last column of windows: 2 tokens
    assert pooled_info(info, 2) == TapInfo("t", 0, 0, 17, 1, 4, (4, 4), "avg", windows=((2, 2, 2, 1), (2, 2, 2, 1)))


def test_every_gth_keeps_what_last_with_that_gap_reads() -> None:
    infos = [TapInfo("embed", 0, 0, 5, 1, 8, (2, 2), "none")] + [
        TapInfo(f"block{k}", k, k, 5, 1, 8, (2, 2), "none") for k in range(1, 13)
    ]
    for gap in (1, 2, 3, 5, 12):
        kept = [infos[p] for p in every_gth(infos, f"every:{gap}")]
        base, rungs = choose_taps(infos, gap)
        assert kept == [base, *rungs], gap  # the stored taps are exactly LAST's inputs
    assert [t.block for p in every_gth(infos, "every:5") for t in [infos[p]]] == [0, 2, 7, 12]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, images: Path) -> dict[str, Path]:
    """The same images as float32 (reference), int8 and float8_e4m3 caches, in 6 shards of 4."""
    root = tmp_path_factory.mktemp("compact")
    out = {}
    for dtype in ("float32", *EIGHT_BIT):
        out[dtype] = root / f"{dtype}.zarr"
        run_extract(images, out[dtype], dtype=dtype)
        run_extract(images, out[dtype], dtype=dtype, split="test", limit=12)
    return out


@pytest.mark.parametrize("dtype", EIGHT_BIT)
def test_eight_bit_store_holds_codes_scales_and_its_measured_error(stores: dict, dtype: str) -> None:
    ref = FeatureStore.open(stores["float32"]).split("train")
    split = FeatureStore.open(stores[dtype]).split("train")
    attrs = split.tap("block6").attrs.asdict()
    assert (
        attrs["featcache_dtype"] == dtype
        and attrs["featcache_scale"] == "block6_scale"
        and "x =" in attrs["featcache_decode"]
    )
    assert verify_store(str(stores[dtype])).ok
    d = describe_store(str(stores[dtype]), split="train", stats=True)["splits"]["train"]
    for tap in split.store.manifest.tap_names:
        x, y = ref.read_values(tap), split.read_values(tap)
        codes, scale = quantize(x, dtype)
        assert torch.equal(y, dequantize(codes, scale, dtype))  # extraction stored exactly these codes
        want = float(((y.double() - x.double()) ** 2).sum().sqrt() / (x.double() ** 2).sum().sqrt())
        assert d["taps"][tap]["stats"]["quantization_rel_rms"] == pytest.approx(want, rel=1e-6)
        assert 0 < want < (0.01 if dtype == "int8" else 0.04)
    f32 = describe_store(str(stores["float32"]), split="train")["splits"]["train"]
    assert d["float32_bytes_per_sample"] == f32["float32_bytes_per_sample"] == f32["bytes_per_sample"]
    assert d["bytes_per_sample"] == pytest.approx(f32["bytes_per_sample"] * (64 + 2) / (64 * 4))  # codes + scale


@pytest.mark.parametrize("dtype", EIGHT_BIT)
def test_eight_bit_resume_after_an_error_is_bitwise_equal(
    stores: dict, images: Path, tmp_path: Path, dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featcache.taps import Taps

    real, calls = Taps.forward, [0]

    def fail_on_the_fourth(self, x):  # one batch per shard: shard 3 fails
        calls[0] += 1
        if calls[0] == PROBE_FORWARDS + 4:
            raise RuntimeError("disk on fire")
        return real(self, x)

    monkeypatch.setattr(Taps, "forward", fail_on_the_fourth)
    out = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_extract(images, out, dtype=dtype)
    monkeypatch.undo()
    run_extract(images, out, dtype=dtype, resume=True)
    a, b = read_split(out), read_split(stores[dtype])
    assert a.keys() == b.keys() and {k for k in a if k.endswith(("_scale", "_qerr"))}
    for name in a:
        assert np.array_equal(a[name], b[name]), name


@pytest.mark.parametrize("dtype", EIGHT_BIT)
def test_rows_of_tiny_and_huge_values_round_trip_with_bounded_relative_error(dtype: str) -> None:
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    x = x / x.abs().amax(-1, keepdim=True) * torch.tensor([1e-2, 1e-3, 1e-5, 1e-7, 1e-30, 1e9]).view(6, 1)
    codes, scale = quantize(x, dtype)
    y = dequantize(codes, scale, dtype)
    err = ((y - x).abs() / x.abs().amax(-1, keepdim=True)).amax(-1)  # per row, relative to its max
    bound = 0.5 / 127 * (1 + 2**-8) + 1e-6 if dtype == "int8" else 2**-4 + 1e-6  # half a step (of bfloat16's s)
    assert float(err.max()) <= bound, err
    assert decode_array(codes.numpy(), dtype, storage_view(scale)).tolist() == y.tolist()  # as stored: uint16 bits


def _scaled_taps(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    from featcache.taps import Taps

    real = Taps.forward
    monkeypatch.setattr(Taps, "forward", lambda self, x: {k: v * factor for k, v in real(self, x).items()})


def test_a_store_of_tiny_taps_keeps_them(
    stores: dict, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scaled_taps(monkeypatch, 1e-6)  # row maxima ~1e-6..1e-5: float16 scales were zero or subnormal
    run_extract(images, tmp_path / "s.zarr", dtype="int8")
    ref = FeatureStore.open(stores["float32"]).split("train")
    split = FeatureStore.open(tmp_path / "s.zarr").split("train")
    for tap in split.store.manifest.tap_names:
        x, y = ref.read_values(tap) * 1e-6, split.read_values(tap)
        assert float(((y - x).double().norm() / x.double().norm())) < 0.01, tap
    assert split.array("block6_scale").attrs["featcache_scale_dtype"] == "bfloat16"
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")  # plain numpy, as docs/store.md decodes it
    scale = (g["train/block6_scale"][:].astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(
        g["train/block6"][:].astype(np.float32) * scale[..., None], split.read_values("block6").numpy()
    )


def test_a_float16_scale_store_reads_resumes_and_refuses_overflow(
    stores: dict, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featcache.store import feature_store
    from featcache.taps import Taps

    monkeypatch.setattr(feature_store, "SCALE_DTYPE", "float16")  # the layout of stores before bfloat16 scales
    real, calls = Taps.forward, [0]

    def fail_on_the_fourth(self, x):  # one batch per shard: shard 3 fails
        calls[0] += 1
        if calls[0] == PROBE_FORWARDS + 4:
            raise RuntimeError("disk on fire")
        return real(self, x)

    monkeypatch.setattr(Taps, "forward", fail_on_the_fourth)
    out = tmp_path / "old.zarr"
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_extract(images, out, dtype="int8")
    monkeypatch.undo()  # today's code resumes it, writing float16 scales into its float16 arrays
    run_extract(images, out, dtype="int8", resume=True)
    split = FeatureStore.open(out).split("train")
    assert split.array("block6_scale").dtype == np.float16
    ref = FeatureStore.open(stores["float32"]).split("train")
    for tap in split.store.manifest.tap_names:
        x = ref.read_values(tap)
        assert torch.equal(split.read_values(tap), dequantize(*quantize(x, "int8", "float16"), "int8")), tap
    reader = open_reader(split, ["block6"], "ram", batch_size=24, shuffle=False)
    assert reader.data["block6_scale"].dtype == torch.float16
    assert torch.equal(next(iter(reader.epoch(0))).taps["block6"], split.read_values("block6"))
    monkeypatch.setattr(feature_store, "SCALE_DTYPE", "float16")
    _scaled_taps(monkeypatch, 1e9)  # a scale beyond float16's range: refused, with the fix
    with pytest.raises(TapOverflowError, match="overflows int8"):
        run_extract(images, tmp_path / "big.zarr", dtype="int8")


@pytest.mark.parametrize("mode", ["ram", "stream"])
def test_readers_hold_codes_and_decode_per_batch(stores: dict, mode: str) -> None:
    split = FeatureStore.open(stores["int8"]).split("train")
    reader = open_reader(split, ["embed", "block6"], mode, batch_size=5, shuffle=False)
    if mode == "ram":
        assert reader.data["block6"].dtype == torch.int8 and reader.data["block6_scale"].dtype == torch.bfloat16
    t = split.store.manifest.tap("block6")
    assert reader.nbytes() == 2 * 24 * t.tokens * (t.channels + 2)  # the stored footprint, not float32's
    batches = list(reader.epoch(0))
    values = torch.cat([b.taps["block6"] for b in batches])
    assert values.dtype == torch.float32 and torch.equal(values, split.read_values("block6"))


def test_pooled_every_second_int8_store_trains_and_predicts_as_cached(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    spec = {**TINY_VIT, "model_kwargs": {"img_size": 64}, "pool_tokens": 2}
    for split in ("train", "test"):
        run_extract(images, out, spec=spec, dtype="int8", layers="every:2", split=split)
    store = FeatureStore.open(out)
    assert store.manifest.tap_names == ["embed", "block2", "block4", "block6"]
    assert [(t.tokens, t.grid) for t in store.manifest.taps] == [(5, (2, 2))] * 4  # 4x4 patches -> 2x2, + class
    summary = train(str(out), "last", tmp_path / "run", {"epochs": 2, "batch_size": 8, "gap": 2}, progress=False)
    assert summary["best"]["test_acc"] >= 0
    predictor = load_predictor(tmp_path / "run", device="cpu")
    split = store.split("test")
    from PIL import Image

    x = torch.stack([predictor.transform(Image.open(images / i).convert("RGB")) for i in split.ids()])
    cached = {t: split.read_values(t) for t in predictor.network.required_taps}
    with torch.no_grad():
        assert torch.allclose(predictor(x), predictor.network(cached), atol=1e-5)  # cached == live


def test_pooling_equals_pooling_the_full_taps(images: Path, tmp_path: Path) -> None:
    spec = {**TINY_VIT, "model_kwargs": {"img_size": 64}}
    run_extract(images, tmp_path / "full.zarr", spec=spec, dtype="float32")
    run_extract(images, tmp_path / "pooled.zarr", spec={**spec, "pool_tokens": 3}, dtype="float32")
    full, pooled = (FeatureStore.open(tmp_path / n).split("train") for n in ("full.zarr", "pooled.zarr"))
    info = full.store.manifest.tap("block3")
    want = pool_token_grid(full.read_values("block3"), info, 3)  # 4x4 grid at K=3: 2x2 windows of 3, 3, 1 tokens
    assert pooled.store.manifest.tap("block3").grid == (2, 2)
    assert torch.allclose(pooled.read_values("block3"), want, atol=1e-6)
    assert torch.allclose(
        want[:, 1],
        F.avg_pool2d(
            full.read_values("block3")[:, 1:].transpose(1, 2).reshape(24, -1, 4, 4), 3, 3, ceil_mode=True
        ).flatten(2)[:, :, 0],
        atol=1e-6,
    )


def test_cli_compact_options_and_inspect_json(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    r = CliRunner().invoke(
        app,
        [
            "extract",
            "--model",
            "test_vit",
            "--model-kwargs",
            "img_size=64",
            "--weights",
            "random",
            "--data",
            str(images),
            "--out",
            str(out),
            "--dtype",
            "float8_e4m3",
            "--pool-tokens",
            "2",
            "--layers",
            "every:3",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    d = json.loads(CliRunner().invoke(app, ["inspect", str(out), "--json", "--stats"]).stdout)
    s = d["splits"]["train"]
    assert d["dtype"] == "float8_e4m3" and list(s["taps"]) == ["embed", "block3", "block6"]
    assert s["float32_bytes_per_sample"] == 3 * 5 * 64 * 4 and s["bytes_per_sample"] == 3 * 5 * (64 + 2)
    assert s["float32_ratio"] == s["float32_bytes_per_sample"] / s["stored_bytes_per_sample"]
    assert all(0 < t["stats"]["quantization_rel_rms"] < 0.05 for t in s["taps"].values())


def test_dask_xarray_and_dataset_views_decode_eight_bit_taps(stores: dict) -> None:
    split = FeatureStore.open(stores["int8"]).split("train")
    want = split.read_values("block6").numpy()
    assert np.array_equal(split_to_dask(split, ["block6"])["block6"].compute(), want)
    assert np.array_equal(split_to_xarray(split, ["block6"])["block6"].values, want)
    ds = TapDataset(split, ["block6"])
    assert torch.equal(ds[5][0]["block6"], torch.from_numpy(want[5]))
