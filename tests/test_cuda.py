"""CUDA paths: extraction in float32 (TF32 off) for every cache, GPU-resident training, live == cached on the GPU
and on the CPU from a GPU-made cache, stores with the older bf16 autocast record.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest -m gpu`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache.extraction import extract
from featcache.manifest import BackboneSpec
from featcache.store.feature_store import FeatureStore
from featcache.training import train

from .conftest import TINY_VIT, write_image_folder

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    train_dir = write_image_folder(root / "train", n=96, classes=3, seed=0)
    test_dir = write_image_folder(root / "test", n=48, classes=3, seed=1)
    spec = BackboneSpec(**TINY_VIT)
    out = {}
    for device in ("cpu", "cuda"):
        path = str(root / f"{device}.zarr")
        for split, data in (("train", train_dir), ("test", test_dir)):
            extract(spec, str(data), path, split=split, device=device, progress=False, loader_workers=0)
        out[device] = path
    return out, test_dir


def test_cuda_extraction_matches_cpu_within_float16(stores) -> None:
    """A float16 cache made on the GPU holds the CPU's taps to float16's rounding (one unit in the last place):
    the pass is float32 with TF32 off, and the manifest says so (before: bf16 autocast, ~1% apart)."""
    (paths, _) = stores
    assert FeatureStore.open(paths["cuda"]).manifest.autocast == {"cuda": None, "cpu": None, "tf32": False}
    cpu = FeatureStore.open(paths["cpu"]).split("train")
    gpu = FeatureStore.open(paths["cuda"]).split("train")
    for tap in cpu.store.manifest.tap_names:
        a = np.asarray(cpu.tap(tap)[:], dtype=np.float32)
        b = np.asarray(gpu.tap(tap)[:], dtype=np.float32)
        assert (np.abs(a - b) <= 1e-3 * np.abs(a) + 1e-6 * np.abs(a).max()).all(), tap


def test_a_gpu_made_cache_is_predicted_on_the_cpu(stores, tmp_path) -> None:
    """The case the bf16 pass broke: train on a cache extracted on the GPU, predict on the CPU."""
    import json

    from featcache.infer import predict

    (paths, test_dir) = stores
    train(
        paths["cuda"],
        "linear",
        tmp_path / "p",
        {"epochs": 4, "batch_size": 16, "lr": 3e-3},
        device="cpu",
        progress=False,
    )
    best = json.loads((tmp_path / "p" / "best.json").read_text())
    result = predict(tmp_path / "p", str(test_dir), device="cpu", progress=False, num_workers=0)
    assert result["accuracy"] == pytest.approx(best["test_acc"], abs=1e-9)


def test_the_older_bf16_record_still_runs_bf16_autocast_on_cuda() -> None:
    from featcache.device import AutocastPolicy

    policy = AutocastPolicy.from_manifest({"cuda": "bfloat16"}, "float16")  # what stores made before record
    with policy.context(torch.device("cuda")):
        assert torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16
    before = torch.backends.cudnn.allow_tf32
    with AutocastPolicy.for_cache("float16").context(torch.device("cuda")):
        assert not torch.is_autocast_enabled("cuda") and not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 == before


@pytest.mark.parametrize("reader", ["gpu", "ram"])
def test_train_on_cuda_learns(stores, tmp_path, reader: str) -> None:
    (paths, _) = stores
    summary = train(
        paths["cuda"],
        "last",
        tmp_path / reader,
        {"epochs": 8, "batch_size": 16},
        {"lr": [1e-3, 3e-3]},
        reader=reader,
        device="cuda",
        progress=False,
    )
    assert summary["reader"]["mode"] == reader and summary["device"] == "cuda"
    assert summary["cuda_max_memory_allocated_mb"] > 0
    assert max(m["best"]["score"] for m in summary["members"]) >= 0.9


def test_predict_on_cuda_equals_cached_accuracy(stores, tmp_path) -> None:
    import json

    from featcache.infer import predict

    (paths, test_dir) = stores
    train(
        paths["cuda"],
        "last",
        tmp_path / "p",
        {"epochs": 6, "batch_size": 16, "lr": 3e-3},
        reader="gpu",
        device="cuda",
        progress=False,
    )
    best = json.loads((tmp_path / "p" / "best.json").read_text())
    result = predict(tmp_path / "p", str(test_dir), device="cuda", progress=False, num_workers=0)
    assert result["accuracy"] == pytest.approx(best["test_acc"], abs=1 / 48 + 1e-9)


def test_float32_store_is_predicted_in_float32_on_cuda(stores, tmp_path) -> None:
    """A float32 cache is extracted without autocast, and predict recomputes the same taps: cached == live."""
    from PIL import Image

    from featcache.infer import load_predictor

    (_, test_dir) = stores
    path = str(tmp_path / "f32.zarr")
    for split in ("train", "test"):
        extract(
            BackboneSpec(**TINY_VIT),
            str(test_dir),
            path,
            split=split,
            device="cuda",
            dtype="float32",
            progress=False,
            loader_workers=0,
        )
    train(path, "linear", tmp_path / "run", {"epochs": 2, "batch_size": 16}, device="cuda", progress=False)
    predictor = load_predictor(tmp_path / "run", device="cuda")
    assert predictor.autocast.cuda_dtype is None and predictor.autocast.tf32 is False
    split = FeatureStore.open(path).split("test")
    x = torch.stack([predictor.transform(Image.open(test_dir / i).convert("RGB")) for i in split.ids()]).cuda()
    cached = {t: torch.from_numpy(np.asarray(split.read(t))).cuda() for t in predictor.network.required_taps}
    with torch.no_grad():
        assert torch.allclose(predictor(x), predictor.network(cached), atol=1e-4)
