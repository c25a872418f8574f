"""The live path rebuilds exactly what extraction used: the recorded eval transform (--crop-pct, --resize-only)
and the recorded precision of the backbone pass (AutocastPolicy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision.transforms import functional as TF

from featcache.backbone import Backbone
from featcache.cli import app
from featcache.device import AutocastPolicy
from featcache.errors import CheckpointError, StoreError, UsageError
from featcache.infer import load_predictor
from featcache.store.feature_store import FeatureStore
from featcache.training import train
from featcache.vocabulary import BackboneSpec

from .conftest import TINY_VIT
from .helpers.stores import run_extract


def _wide_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, size=(20, 60, 3), dtype=np.uint8))  # 60 wide, 20 high


def test_resize_only_squashes_the_whole_image_and_crop_pct_crops() -> None:
    img = _wide_image()
    squash = Backbone(BackboneSpec(**TINY_VIT, resize_only=True)).transform(img)
    want = TF.normalize(TF.to_tensor(TF.resize(img, [32, 32], interpolation=TF.InterpolationMode.BICUBIC)),
                        [0.5] * 3, [0.5] * 3)
    assert squash.shape == (3, 32, 32) and torch.allclose(squash, want, atol=1e-6)  # every column kept, no crop
    default = Backbone(BackboneSpec(**TINY_VIT)).transform(img)
    assert not torch.allclose(default, want, atol=1e-3)  # the model's own transform crops the centre
    half = Backbone(BackboneSpec(**TINY_VIT, crop_pct=0.5))
    assert "Resize(size=64" in repr(half.transform) and "CenterCrop(size=(32, 32))" in repr(half.transform)
    with pytest.raises(UsageError, match="exclude each other"):
        BackboneSpec(**TINY_VIT, crop_pct=0.9, resize_only=True)
    with pytest.raises(UsageError, match=r"--crop-pct must be in \(0, 1\]"):
        BackboneSpec(**TINY_VIT, crop_pct=1.5)


def test_the_transform_is_recorded_checked_and_rebuilt_by_predict(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    run_extract(images, out, spec={**TINY_VIT, "resize_only": True})
    manifest = FeatureStore.open(out).manifest
    assert manifest.backbone["spec"]["resize_only"] is True and "Resize(size=(32, 32)" in manifest.transform["eval"]
    with pytest.raises(StoreError, match="made with resize_only = True, but this run uses resize_only = False"):
        run_extract(images, out, split="test")  # one store, one transform
    run_extract(images, out, spec={**TINY_VIT, "resize_only": True}, split="test")
    train(str(out), "linear", tmp_path / "run", {"epochs": 2, "batch_size": 8}, progress=False)
    predictor = load_predictor(tmp_path / "run", device="cpu")
    assert repr(predictor.transform) == manifest.transform["eval"]
    split = FeatureStore.open(out).split("test")
    ids = split.ids()
    x = torch.stack([predictor.transform(Image.open(images / i).convert("RGB")) for i in ids])
    cached = {t: torch.from_numpy(np.asarray(split.read(t))).float() for t in predictor.network.required_taps}
    with torch.no_grad():
        assert torch.allclose(predictor(x), predictor.network(cached), atol=1e-5)  # cached == live
    config_path = next((tmp_path / "run" / "members").glob("*/config.json"))
    config = json.loads(config_path.read_text())
    config["store"]["manifest"]["transform"]["eval"] = "Compose(Resize(size=40) CenterCrop(size=(32, 32)))"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="eval transform rebuilt for test_vit differs from the one the cache"):
        load_predictor(config_path.parent, device="cpu")


def test_cli_crop_options_are_exclusive(images: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["extract", "--model", "test_vit", "--model-kwargs", "img_size=32", "--weights",
                                 "random", "--data", str(images), "--out", str(tmp_path / "s.zarr"), "--crop-pct",
                                 "0.9", "--resize-only"])
    assert r.exit_code == 2 and r.stderr.startswith("Error: --crop-pct and --resize-only exclude each other")
    assert not (tmp_path / "s.zarr").exists()


def test_autocast_policy_follows_the_cache_dtype_and_the_record() -> None:
    assert AutocastPolicy.for_cache("float32").cuda_dtype is None
    assert AutocastPolicy.for_cache("float16").cuda_dtype == AutocastPolicy.for_cache("bfloat16").cuda_dtype == "bfloat16"
    assert AutocastPolicy.from_manifest({"cuda": None}, "float16").cuda_dtype is None  # the record wins
    assert AutocastPolicy.from_manifest({}, "float32") == AutocastPolicy(None)  # older stores: as extraction ran
    assert AutocastPolicy.from_manifest({}, "float16") == AutocastPolicy("bfloat16")
    cpu = AutocastPolicy("bfloat16").context(torch.device("cpu"))
    with cpu:
        assert not torch.is_autocast_enabled("cuda") and not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_predict_applies_the_policy_the_extraction_recorded(images: Path, tmp_path: Path, dtype: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "s.zarr"
    run_extract(images, out, dtype=dtype)
    assert FeatureStore.open(out).manifest.autocast == {"cuda": None if dtype == "float32" else "bfloat16"}
    train(str(out), "linear", tmp_path / "run", {"epochs": 1, "batch_size": 8}, val_fraction=0, progress=False)
    predictor = load_predictor(tmp_path / "run", device="cpu")
    used: list[tuple[str | None, str]] = []
    real = AutocastPolicy.context
    monkeypatch.setattr(AutocastPolicy, "context", lambda self, device: used.append((self.cuda_dtype, device.type))
                        or real(self, device))
    predictor(torch.zeros(2, 3, 32, 32))
    assert used == [(None if dtype == "float32" else "bfloat16", "cpu")]
