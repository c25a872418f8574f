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
from featcache.infer import predict as featcache_predict
from featcache.manifest import DTYPES, BackboneSpec
from featcache.store.feature_store import FeatureStore
from featcache.training import train

from .conftest import TINY_VIT
from .helpers.processes import TINY_ARGS
from .helpers.stores import run_extract


def _wide_image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, size=(20, 60, 3), dtype=np.uint8))  # 60 wide, 20 high


def test_resize_only_squashes_the_whole_image_and_crop_pct_crops() -> None:
    img = _wide_image()
    squash = Backbone(BackboneSpec(**TINY_VIT, resize_only=True)).transform(img)
    want = TF.normalize(
        TF.to_tensor(TF.resize(img, [32, 32], interpolation=TF.InterpolationMode.BICUBIC)), [0.5] * 3, [0.5] * 3
    )
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
    r = CliRunner().invoke(
        app,
        [
            "extract",
            *TINY_ARGS,
            "--data",
            str(images),
            "--out",
            str(tmp_path / "s.zarr"),
            "--crop-pct",
            "0.9",
            "--resize-only",
        ],
    )
    assert r.exit_code == 2 and r.stderr.startswith("Error: --crop-pct and --resize-only exclude each other")
    assert not (tmp_path / "s.zarr").exists()


def test_every_cache_is_extracted_in_float32_and_old_records_keep_their_meaning() -> None:
    for dtype in DTYPES:
        assert AutocastPolicy.for_cache(dtype) == AutocastPolicy(None, None, tf32=False), dtype
    new = AutocastPolicy.for_cache("float16")
    assert new.to_dict() == {"cuda": None, "cpu": None, "tf32": False}
    assert AutocastPolicy.from_manifest(new.to_dict(), "float16") == new
    # what earlier featcache recorded: bf16 autocast on CUDA for 16-bit caches, float32 on CPU, TF32 untouched
    assert AutocastPolicy.from_manifest({"cuda": "bfloat16"}, "float16") == AutocastPolicy("bfloat16", None, None)
    assert AutocastPolicy.from_manifest({"cuda": None}, "float32") == AutocastPolicy(None, None, None)
    assert AutocastPolicy.from_manifest({}, "float16") == AutocastPolicy("bfloat16", None, None)  # no record at all
    assert AutocastPolicy.from_manifest({}, "float32") == AutocastPolicy(None, None, None)
    with AutocastPolicy("bfloat16").context(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cuda") and not torch.is_autocast_enabled("cpu")
    with AutocastPolicy(None, "bfloat16").context(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_extraction_policy_stays_within_the_cache_dtype_rounding(images: Path, dtype: str) -> None:
    """The pass a GPU extraction runs (``for_cache(dtype)``'s CUDA setting, forced onto the CPU, whose autocast
    exists for bfloat16) must give the taps a float32 pass gives, to the cache dtype's own rounding: what a CPU
    predict recomputes. Under bfloat16 autocast (before) the taps moved by ~1%: 50x float16's rounding."""
    from contextlib import nullcontext

    from featcache.store.codecs import round_trip

    backbone = Backbone(BackboneSpec(**TINY_VIT))
    x = torch.stack([backbone.transform(Image.open(p).convert("RGB")) for p in sorted(images.rglob("*.png"))[:8]])
    gpu_dtype = AutocastPolicy.for_cache(dtype).cuda_dtype
    with torch.inference_mode():
        reference = backbone.taps(x)
        with torch.autocast("cpu", dtype=getattr(torch, gpu_dtype)) if gpu_dtype else nullcontext():
            made = backbone.taps(x)
    for tap, ref in reference.items():
        rounding = _relative(round_trip(ref, dtype), ref)  # the cache dtype's own error
        assert _relative(round_trip(made[tap].float(), dtype), round_trip(ref, dtype)) <= 0.5 * rounding, tap


def test_predict_applies_the_recorded_policy_on_the_cpu_too(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store made under an autocast pass (here bfloat16 autocast forced onto the CPU, as a GPU's pass would be)
    records it, and predict recomputes its taps under the same pass: cached == live; a float32 pass would not."""
    monkeypatch.setattr(AutocastPolicy, "for_cache", classmethod(lambda cls, dtype: cls(None, "bfloat16", False)))
    out = tmp_path / "s.zarr"
    run_extract(images, out)
    run_extract(images, out, split="test")
    monkeypatch.undo()
    assert FeatureStore.open(out).manifest.autocast == {"cuda": None, "cpu": "bfloat16", "tf32": False}
    summary = train(str(out), "linear", tmp_path / "run", {"epochs": 2, "batch_size": 8}, progress=False)
    predictor = load_predictor(tmp_path / "run", device="cpu")
    assert predictor.autocast == AutocastPolicy(None, "bfloat16", False)
    split = FeatureStore.open(out).split("test")
    x = torch.stack([predictor.transform(Image.open(images / i).convert("RGB")) for i in split.ids()])
    cached = {t: split.read_values(t).float() for t in predictor.network.required_taps}
    with torch.no_grad():
        assert torch.allclose(predictor(x), predictor.network(cached), atol=1e-4)  # cached == live
        with torch.inference_mode():
            live = predictor.taps(x)
        for tap, t in cached.items():
            assert _relative(live[tap].to(torch.float16).float(), t) > 1e-3  # float32 alone: not the cache
    result = featcache_predict(tmp_path / "run", str(images), device="cpu", progress=False, num_workers=0)
    assert result["accuracy"] == pytest.approx(summary["best"]["test_acc"], abs=1e-6)


def test_a_store_with_the_old_autocast_record_is_still_reproduced(images: Path, tmp_path: Path) -> None:
    """Stores written before this policy record ``{"cuda": "bfloat16"}`` for 16-bit caches (a CPU extraction ran
    float32 all the same): they load, and predict on the CPU runs float32 as their extraction did."""
    out = tmp_path / "s.zarr"
    run_extract(images, out)
    group = FeatureStore.open(out, "r+").group
    group.attrs.update({"autocast": {"cuda": "bfloat16"}})  # today's record, as older featcache wrote it
    assert FeatureStore.open(out).manifest.autocast == {"cuda": "bfloat16"}
    train(str(out), "linear", tmp_path / "run", {"epochs": 1, "batch_size": 8}, val_fraction=0, progress=False)
    predictor = load_predictor(tmp_path / "run", device="cpu")
    assert predictor.autocast == AutocastPolicy("bfloat16", None, None)
    split = FeatureStore.open(out).split("train")
    x = torch.stack([predictor.transform(Image.open(images / i).convert("RGB")) for i in split.ids()])
    cached = {t: split.read_values(t).float() for t in predictor.network.required_taps}
    with torch.no_grad():
        assert torch.allclose(predictor(x), predictor.network(cached), atol=1e-5)
