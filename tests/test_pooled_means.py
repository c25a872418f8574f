"""Token means over pooled taps (--pool-tokens K on a grid K does not divide) equal the means over the unpooled
taps: each pooled token weighs by the positions its window averages (issue 29, part 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from featcache import methods
from featcache.augment import token_drop
from featcache.infer import load_predictor
from featcache.manifest import Manifest, TapInfo
from featcache.methods.base import MethodInput, TokenWeights, pool_tokens, to_grid
from featcache.store.feature_store import FeatureStore
from featcache.taps import pool_token_grid, pooled_info
from featcache.training import train

from .conftest import TINY_CNN, TINY_VIT
from .helpers.stores import run_extract

ODD_GRIDS = {
    "vit": {**TINY_VIT, "model_kwargs": {"img_size": 112}},  # 7 x 7 patches
    "cnn": TINY_CNN,
}  # stem and stage1 read at 7 x 7, then 4 x 4, 2 x 2, 1 x 1
PROBE = {"taps": "all", "pool": "avg", "norm": "none"}  # the probe's input: per-tap means, concatenated


def test_weights_of_a_pooled_grid_are_the_window_sizes() -> None:
    info = pooled_info(TapInfo("t", 0, 0, 1 + 49, 1, 4, (7, 7), "none"), 2)
    assert info.grid == (4, 4) and info.windows == ((2, 2, 2, 1), (2, 2, 2, 1))
    w = torch.tensor(info.patch_weights()).view(4, 4)
    assert torch.allclose(w * 49, torch.tensor([[4.0, 4, 4, 2], [4, 4, 4, 2], [4, 4, 4, 2], [2, 2, 2, 1]]))
    x = torch.randn(3, 50, 4, generator=torch.Generator().manual_seed(0))
    pooled = pool_token_grid(x, TapInfo("t", 0, 0, 50, 1, 4, (7, 7), "none"), 2)
    mean = pool_tokens(pooled, 1, "avg", TokenWeights.of_tap(info))
    assert torch.allclose(mean, x[:, 1:].mean(1), atol=1e-6)
    fmap = x[:, 1:].reshape(3, 7, 7, 4)
    assert torch.allclose(to_grid(pooled, info, (1, 1))[:, 1], x[:, 1:].mean(1), atol=1e-6)  # a common grid
    coarse = to_grid(pooled, info, (2, 2))  # pooled rows 0-1 and 2-3: source rows 0-3 and 4-6
    assert torch.allclose(coarse[:, 4], fmap[:, 4:, 4:].mean((1, 2)), atol=1e-6)
    assert pooled_info(TapInfo("t", 0, 0, 64, 0, 4, (8, 8), "avg"), 2).patch_weights() is None  # equal windows


def _features(store: Path, split: str) -> torch.Tensor:
    """The linear probe's input (all taps, mean of patch tokens, no norm) from a cached split."""
    fs = FeatureStore.open(store)
    net = methods.create("linear", dict(PROBE), MethodInput(list(fs.manifest.taps), num_classes=3))
    handle = fs.split(split)
    with torch.no_grad():
        return net.features({t: handle.read_values(t) for t in net.required_taps})


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_linear_probe_input_from_a_pooled_store_equals_the_unpooled_one(
    images: Path, tmp_path: Path, kind: str
) -> None:
    spec = ODD_GRIDS[kind]
    full, pooled = tmp_path / "full.zarr", tmp_path / "pooled.zarr"
    for split in ("train", "test"):
        run_extract(images, full, spec=spec, dtype="float32", split=split)
        run_extract(images, pooled, spec={**spec, "pool_tokens": 2}, dtype="float32", split=split)
    grids = [t.grid for t in FeatureStore.open(pooled).manifest.taps]
    assert (4, 4) in grids  # a 7 x 7 grid pooled in windows of 4, 2 and 1 positions
    want = _features(full, "test")
    assert torch.allclose(_features(pooled, "test"), want, rtol=1e-5, atol=1e-6)  # cached path
    train(str(pooled), "linear", tmp_path / "run", {"epochs": 1, "batch_size": 8, **PROBE}, progress=False)
    predictor = load_predictor(tmp_path / "run", device="cpu")  # live path: backbone, pooling, the probe
    ids = FeatureStore.open(pooled).split("test").ids()
    x = torch.stack([predictor.transform(Image.open(images / i).convert("RGB")) for i in ids])
    with torch.no_grad():
        live = predictor.network.features(predictor.taps(x))
    assert torch.allclose(live, want, rtol=1e-5, atol=1e-5)


def test_side_networks_weigh_pooled_tokens_in_their_token_mean() -> None:
    infos = [pooled_info(TapInfo(f"block{k}", k, k, 1 + 49, 1, 8, (7, 7), "none"), 2) for k in range(4)]
    side = torch.tensor([2.0, 2, 2, 1])  # 7 positions per axis in windows of 2, 2, 2, 1
    weights = torch.outer(side, side).flatten() / 49
    taps = {
        t.name: torch.randn(2, t.tokens, t.channels, generator=torch.Generator().manual_seed(t.position)) for t in infos
    }
    for name, config in (("last", {"gap": 1}), ("lst", {"init": "random", "reduction": 2})):
        net = methods.create(name, config, MethodInput(infos, num_classes=3)).eval()  # LST: no dropout
        captured = []
        handle = net.norm.register_forward_hook(lambda _m, _a, out, captured=captured: captured.append(out))
        with torch.no_grad():
            got = net.features(taps)
        handle.remove()
        want = torch.einsum("ntc,t->nc", captured[0][:, 1:], weights)  # the tokens' mean over the 7 x 7 grid
        assert torch.allclose(got, want, atol=1e-6), name


def test_an_older_pooled_store_gets_windows_derived_where_the_manifest_determines_them() -> None:
    def attrs(kind: str, grid: tuple[int, int], k: int) -> dict:
        tap = TapInfo("stage1", 1, 1, grid[0] * grid[1], 0, 8, grid, "avg").to_dict()  # no windows recorded
        return {
            "featcache_format": 1,
            "taps": [tap],
            "dtype": "float16",
            "backbone": {"kind": kind, "spec": {"model": "m", "cnn_grid": 7, "pool_tokens": k}},
        }

    assert Manifest.from_attrs(attrs("cnn", (4, 4), 2)).taps[0].windows == ((2, 2, 2, 1), (2, 2, 2, 1))
    assert Manifest.from_attrs(attrs("cnn", (3, 3), 3)).taps[0].windows == ((3, 3, 1), (3, 3, 1))
    assert Manifest.from_attrs(attrs("cnn", (2, 2), 4)).taps[0].windows is None  # from 5, 6 or 7: unknown
    assert Manifest.from_attrs(attrs("vit", (4, 4), 2)).taps[0].windows is None  # 7 or 8 patches: unknown
    assert Manifest.from_attrs(attrs("cnn", (4, 4), 1)).taps[0].windows is None  # not pooled
    new = pooled_info(TapInfo("stage1", 1, 1, 49, 0, 8, (7, 7), "avg"), 2)
    assert Manifest.from_attrs(attrs("cnn", (4, 4), 2)).identity()["taps"] == [
        {k: v for k, v in new.to_dict().items() if k != "windows"}
    ]  # a new extraction may resume it


def test_tokendrop_fills_a_pooled_tap_with_the_weighted_kept_mean() -> None:
    info = pooled_info(TapInfo("stage1", 1, 1, 49, 0, 4, (7, 7), "avg"), 2)  # 4 x 4, windows of 4, 2, 1
    x = torch.randn(8, 16, 4, generator=torch.Generator().manual_seed(0))
    y = token_drop({"stage1": x}, [info], 0.25, torch.Generator().manual_seed(1))["stage1"]
    side = torch.tensor([2.0, 2, 2, 1])
    w = torch.outer(side, side).flatten()  # positions per pooled token
    for i in range(8):
        kept = (y[i] == x[i]).all(-1)
        assert int((~kept).sum()) == 4
        want = (x[i][kept] * w[kept, None]).sum(0) / w[kept].sum()  # the mean of the kept positions
        assert torch.allclose(y[i][~kept], want.expand(4, -1), atol=1e-6)
