"""Cached views (extract --views K): view 0 is the eval transform, evaluation scores it (or, with --tta, the mean
of all K views), and predict (--tta) computes exactly the same: the cached test accuracy is what predict gives."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import featcache.extraction
from featcache.cli import app
from featcache.data import open_source
from featcache.errors import CheckpointError, UsageError
from featcache.evaluation_plan import view_scoring
from featcache.infer import load_predictor, predict
from featcache.loader import view_dataset
from featcache.store.feature_store import FeatureStore
from featcache.store.reader import open_reader
from featcache.training import train

from .conftest import write_image_folder
from .helpers.stores import run_extract

VIEWS = 3
SETTINGS = {"epochs": 3, "batch_size": 8, "lr": 3e-3}


@pytest.fixture(scope="module")
def test_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("views") / "test", n=24, classes=3, seed=1)


@pytest.fixture(scope="module")
def store(images: Path, test_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train and test splits of 3 views each (tiny ViT, float16)."""
    out = tmp_path_factory.mktemp("views") / "s.zarr"
    run_extract(images, out, views=VIEWS)
    run_extract(test_images, out, split="test", views=VIEWS)
    return out


def cached_logits(run: Path, store: Path, tta: bool) -> torch.Tensor:
    """The best member's logits on the cached test split, scored as training scores it (eval view, or the mean of
    every view with tta)."""
    predictor = load_predictor(run, device="cpu")
    split = FeatureStore.open(store).split("test")
    reader = open_reader(
        split,
        list(predictor.network.required_taps),
        "ram",
        batch_size=64,
        shuffle=False,
        **view_scoring(split, tta).reader_options(),
    )
    (batch,) = list(reader.epoch(0))
    with torch.no_grad():
        logits = predictor.network(batch.taps)
    return logits.reshape(len(batch), batch.views, -1).mean(dim=1)


def live_logits(run: Path, data: Path, tta: bool) -> torch.Tensor:
    """The same logits through the backbone, from the images (view 0 eval transform; with tta all the views)."""
    predictor = load_predictor(run, device="cpu")
    source = open_source(str(data))
    if not tta:
        x = torch.stack([predictor.transform(source[i].image) for i in range(len(source))])
        return predictor(x)
    ds = view_dataset(source, predictor.backbone, VIEWS, seed=0, eval_view=0)
    return predictor.forward_views(torch.stack([ds[i][0] for i in range(len(ds))]))


def test_view_zero_is_the_eval_transform_and_the_others_training_draws(
    images: Path, store: Path, tmp_path: Path
) -> None:
    split = FeatureStore.open(store).split("train")
    assert split.meta.eval_view == 0 and split.meta.view_transform == "eval+train" and split.meta.views == VIEWS
    run_extract(images, tmp_path / "one.zarr")  # the eval transform alone
    one = FeatureStore.open(tmp_path / "one.zarr").split("train")
    for tap in ("embed", "block6"):
        views, single = split.read_values(tap, 0, 24), one.read_values(tap, 0, 24)
        assert torch.allclose(views[:, 0].float(), single.float(), atol=2e-3, rtol=2e-3), tap
        assert not torch.allclose(views[:, 1].float(), single.float(), atol=0.05), tap  # random crops, flips
        assert not torch.allclose(views[:, 1].float(), views[:, 2].float(), atol=0.05), tap


def test_reported_test_accuracy_is_what_predict_gives_on_a_multi_view_split(
    store: Path, test_images: Path, tmp_path: Path
) -> None:
    """Without --tta the test split is scored on view 0, the eval transform that predict applies: equal logits and
    equal accuracy (before, the mean over training-transform views was reported)."""
    summary = train(str(store), "linear", tmp_path / "run", SETTINGS, progress=False)
    assert summary["evaluation"]["splits"]["test"]["scored_on"] == "view 0 of 3 (eval transform)"
    assert summary["evaluation"]["splits"]["val"]["tta"] is False
    result = predict(tmp_path / "run", str(test_images), device="cpu", progress=False, num_workers=0)
    assert result["accuracy"] == pytest.approx(summary["best"]["test_acc"], abs=1e-6)
    assert torch.allclose(
        cached_logits(tmp_path / "run", store, tta=False),
        live_logits(tmp_path / "run", test_images, tta=False),
        atol=1e-3,
    )


def test_tta_scores_every_view_and_predict_tta_recomputes_them(store: Path, test_images: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = CliRunner().invoke(
        app,
        [
            "train",
            str(store),
            "--method",
            "linear",
            "--out",
            str(run),
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--lr",
            "3e-3",
            "--tta",
            "--json",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["evaluation"] == {
        "tta": True,
        "splits": {
            "val": {
                "split": "train",
                "views": 3,
                "eval_view": 0,
                "seed": 0,
                "tta": True,
                "scored_on": "mean logits of 3 views (view 0 eval transform, the others training draws)",
            },
            "test": {
                "split": "test",
                "views": 3,
                "eval_view": 0,
                "seed": 0,
                "tta": True,
                "scored_on": "mean logits of 3 views (view 0 eval transform, the others training draws)",
            },
        },
    }
    assert summary["tta"] == {"split": "test", "views": 3, "seed": 0, "eval_view": 0}
    member = json.loads((run / "members" / summary["best"]["name"] / "config.json").read_text())
    assert member["tta"] == summary["tta"]  # predict --tta reads it from the checkpoint
    r = CliRunner().invoke(
        app, ["predict", str(run), "--data", str(test_images), "--device", "cpu", "--tta", "--json", "--quiet"]
    )
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["tta"] == {"views": 3, "seed": 0, "eval_view": 0}
    assert result["accuracy"] == pytest.approx(summary["best"]["test_acc"], abs=1e-6)
    cached, live = cached_logits(run, store, tta=True), live_logits(run, test_images, tta=True)
    assert torch.allclose(cached, live, atol=1e-3)
    assert not torch.allclose(cached, cached_logits(run, store, tta=False), atol=1e-3)  # the views do count
    with pytest.raises(UsageError, match="was evaluated with --tta; resume it with --tta"):
        train(str(store), "linear", run, SETTINGS, resume=True, progress=False)


def test_an_old_multi_view_split_is_scored_on_its_views_with_a_warning(
    images: Path, test_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A split written before the eval view was kept (no eval_view: all K views are training draws) still reads:
    it is scored on the mean of its views, which predict --tta reproduces, and training says so."""
    planned = featcache.extraction.plan_split
    monkeypatch.setattr(
        featcache.extraction,
        "plan_split",
        lambda *a, **k: replace(planned(*a, **k), view_transform="train", eval_view=None),
    )  # the old layout, as old featcache wrote it
    out = tmp_path / "old.zarr"
    run_extract(images, out, views=VIEWS)
    run_extract(test_images, out, split="test", views=VIEWS)
    monkeypatch.undo()
    split = FeatureStore.open(out).split("test")
    assert split.meta.eval_view is None and split.meta.eval_view_index is None
    with caplog.at_level(logging.WARNING, logger="featcache.training"):
        summary = train(str(out), "linear", tmp_path / "run", SETTINGS, progress=False)
    assert "split 'test' of" in caplog.text and "its 3 views are all training-transform draws" in caplog.text
    assert summary["evaluation"]["splits"]["test"]["scored_on"].startswith("mean logits of 3 training-transform views")
    assert summary["tta"]["eval_view"] is None
    result = predict(tmp_path / "run", str(test_images), device="cpu", progress=False, num_workers=0, tta=True)
    assert result["accuracy"] == pytest.approx(summary["best"]["test_acc"], abs=1e-6)
    predictor = load_predictor(tmp_path / "run", device="cpu")
    source = open_source(str(test_images))
    ds = view_dataset(source, predictor.backbone, VIEWS, seed=0, eval_view=None)  # every view a training draw
    live = predictor.forward_views(torch.stack([ds[i][0] for i in range(len(ds))]))
    cached = cached_logits(tmp_path / "run", out, tta=False)  # old layout: all views even without --tta
    assert torch.allclose(cached, live, atol=1e-3)


def test_predict_tta_needs_views_and_readers_check_the_view(images: Path, store: Path, tmp_path: Path) -> None:
    out = tmp_path / "one.zarr"
    run_extract(images, out)
    train(str(out), "linear", tmp_path / "run", {"epochs": 1, "batch_size": 8}, progress=False)
    with pytest.raises(CheckpointError, match="hold one view per image, so there are no views to average"):
        predict(tmp_path / "run", str(images), device="cpu", progress=False, num_workers=0, tta=True)
    split = FeatureStore.open(store).split("train")
    with pytest.raises(UsageError, match="view 3 does not exist: split 'train' of .* holds 3 view"):
        open_reader(split, ["embed"], "ram", view=3)
    with pytest.raises(UsageError, match="every view of a sample .* or one fixed view, not both"):
        open_reader(split, ["embed"], "ram", view=0, all_views=True)
    batch = next(iter(open_reader(split, ["embed"], "ram", batch_size=24, shuffle=False, view=0).epoch(0)))
    assert torch.equal(batch.taps["embed"], split.read_values("embed", 0, 24)[:, 0].float())
