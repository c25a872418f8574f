"""Selection on validation only: held-out data, every selection path, the report of the test split, class names,
test-time augmentation over cached views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.backbone import Backbone
from featcache.errors import ConfigError, Interrupted, StoreError, UsageError
from featcache.evaluation_plan import plan_evaluation, stratified_holdout
from featcache.store.feature_store import FeatureStore
from featcache.store.reader import open_reader
from featcache.training import train

from .conftest import make_separable_images, write_tap_store
from .helpers.processes import interrupted_run
from .helpers.stores import run_extract

SETTINGS = {"epochs": 4, "batch_size": 16}


def _store(
    path: Path,
    vit: Backbone,
    splits: dict[str, int],
    test_seed: int = 1,
    shuffle_test: bool = False,
    classes: dict[str, list[str]] | None = None,
) -> Path:
    for i, (name, n) in enumerate(splits.items()):
        imgs, labels = make_separable_images(n, classes=3, seed=i if name != "test" else test_seed)
        if shuffle_test and name == "test":
            labels = np.random.default_rng(7).permutation(labels)  # test labels unrelated to the images
        write_tap_store(path, vit, imgs, labels, name, classes=(classes or {}).get(name))
    return path


@pytest.fixture(scope="module")
def train_test(tmp_path_factory, vit) -> Path:
    return _store(tmp_path_factory.mktemp("tt") / "s.zarr", vit, {"train": 96, "test": 48})


def test_stratified_holdout_is_per_class_seeded_and_keeps_singletons_in_training() -> None:
    labels = np.array([0] * 50 + [1] * 30 + [2] * 1 + [3] * 2)
    held = stratified_holdout(labels, 0.1, seed=0)
    counts = {c: int((labels[held] == c).sum()) for c in range(4)}
    assert counts == {0: 5, 1: 3, 2: 0, 3: 1}  # round(0.1 n) per class, at least one of a class of 2+
    assert np.array_equal(held, np.sort(held)) and np.array_equal(held, stratified_holdout(labels, 0.1, seed=0))
    assert not np.array_equal(held, stratified_holdout(labels, 0.1, seed=1))


def test_held_out_validation_is_disjoint_from_training_and_recorded(train_test, tmp_path) -> None:
    store = FeatureStore.open(train_test)
    ev = plan_evaluation(
        store,
        "train",
        val_split=None,
        val_fraction=0.25,
        select_on=None,
        eval_split=None,
        seed=0,
        rundir=tmp_path / "run",
        resume=False,
    )
    assert ev.selected_on == "train[held-out]" and ev.eval_splits == ["test"]
    assert len(np.intersect1d(ev.val_subset, ev.train_subset)) == 0
    assert np.array_equal(np.union1d(ev.val_subset, ev.train_subset), np.arange(96)) and len(ev.val_subset) == 24
    summary = train(str(train_test), "linear", tmp_path / "run", SETTINGS, val_fraction=0.25, progress=False)
    recorded = json.loads((tmp_path / "run" / "heldout.json").read_text())
    ids = store.split("train").ids()
    assert recorded["ids"] == [ids[i] for i in ev.val_subset] and recorded["size"] == 24
    assert summary["best"]["heldout_size"] == 24


def test_test_split_never_selects(tmp_path, vit) -> None:
    """Two stores that differ only in the test labels choose the same epochs and member; the reported test
    accuracy is the selected epoch's, not the best test epoch's."""
    runs = []
    for seed in (1, 2):
        path = _store(tmp_path / f"s{seed}.zarr", vit, {"train": 96, "test": 48}, shuffle_test=True, test_seed=seed)
        runs.append(
            train(
                str(path),
                "last",
                tmp_path / f"run{seed}",
                {"epochs": 5, "batch_size": 16},
                {"lr": [1e-4, 3e-3]},
                progress=False,
            )
        )
    picks = [(r["best"]["name"], r["best"]["epoch"], r["best"]["val_acc"]) for r in runs]
    assert picks[0] == picks[1]
    for summary in runs:
        best = summary["best"]
        member = next(m for m in summary["members"] if m["name"] == best["name"])
        assert best["val_acc"] == max(m["best"]["val_acc"] for m in summary["members"])
        history = [
            json.loads(line)
            for line in (Path(member["checkpoint"]).parents[1] / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["member"] == best["name"]
        ]
        vals = [row["val_acc"] for row in history]
        chosen = history[vals.index(max(vals))]
        assert best["epoch"] == chosen["epoch"] and best["test_acc"] == chosen["test_acc"]
        assert best["selected_on"] == "train[held-out]" and best["selected_by"] == "val_acc"


def test_a_stored_val_split_selects_and_json_reports_the_same_epoch(tmp_path, vit) -> None:
    path = _store(tmp_path / "s.zarr", vit, {"train": 96, "val": 24, "test": 48})
    summary = train(str(path), "linear", tmp_path / "run", SETTINGS, progress=False)
    best = summary["best"]
    assert (
        best["selected_on"] == "val" and "heldout_size" not in best and not (tmp_path / "run" / "heldout.json").exists()
    )
    assert {"name", "epoch", "selected_on", "val_acc", "test_acc", "checkpoint"} <= set(best)
    member = summary["members"][0]
    assert member["metrics"].keys() >= {"train_acc", "val_acc", "test_acc"}
    assert json.loads((tmp_path / "run" / "best.json").read_text())["selected_on"] == "val"


def test_val_split_by_name_select_on_test_and_no_selection(tmp_path, vit) -> None:
    path = _store(tmp_path / "s.zarr", vit, {"train": 96, "dev": 24, "test": 48})
    named = train(str(path), "linear", tmp_path / "dev", SETTINGS, val_split="dev", progress=False)
    assert named["best"]["selected_on"] == "dev" and "warning" not in named["best"]
    with pytest.raises(UsageError, match="--select-on test"):
        train(str(path), "linear", tmp_path / "t1", SETTINGS, val_split="test", progress=False)
    on_test = train(str(path), "linear", tmp_path / "t2", SETTINGS, select_on="test", progress=False)
    assert on_test["best"]["selected_on"] == "test" and "optimistic" in on_test["best"]["warning"]
    assert on_test["best"]["val_acc"] == on_test["best"]["test_acc"]
    last = train(str(path), "linear", tmp_path / "none", SETTINGS, val_fraction=0, progress=False)
    assert last["best"]["selected_by"] == "last epoch" and last["best"]["epoch"] == SETTINGS["epochs"]
    with pytest.raises(ConfigError, match="needs validation data to choose one"):
        train(str(path), "linear", tmp_path / "sweep", SETTINGS, {"lr": [1e-3, 1e-2]}, val_fraction=0, progress=False)
    with pytest.raises(StoreError, match="--val-split 'holdout' is not in"):
        train(str(path), "linear", tmp_path / "x", SETTINGS, val_split="holdout", progress=False)


def test_resume_keeps_the_held_out_images(train_test, tmp_path, monkeypatch) -> None:
    full = train(str(train_test), "linear", tmp_path / "full", SETTINGS, progress=False)
    with interrupted_run(monkeypatch, epochs=2), pytest.raises(Interrupted):
        train(str(train_test), "linear", tmp_path / "part", SETTINGS, progress=False)
    before = (tmp_path / "part" / "heldout.json").read_text()
    # another --val-seed on resume: the recorded images are used, so the run equals the uninterrupted one
    resumed = train(str(train_test), "linear", tmp_path / "part", SETTINGS, resume=True, val_seed=9, progress=False)
    assert (tmp_path / "part" / "heldout.json").read_text() == before
    assert [m["metrics"] for m in resumed["members"]] == [m["metrics"] for m in full["members"]]
    assert resumed["best"]["epoch"] == full["best"]["epoch"]


def test_an_eval_split_with_other_class_names_is_refused(tmp_path, vit) -> None:
    path = _store(
        tmp_path / "s.zarr",
        vit,
        {"train": 48, "test": 24},
        classes={"train": ["cat", "dog", "emu"], "test": ["cat", "emu", "dog"]},
    )
    with pytest.raises(
        StoreError,
        match=r"split 'test' has classes \['cat', 'emu', 'dog'\] but the training split "
        r"'train' has \['cat', 'dog', 'emu'\]",
    ):
        train(str(path), "linear", tmp_path / "run", SETTINGS, progress=False)
    assert not (tmp_path / "run").exists()


def test_an_eval_split_with_views_is_scored_on_mean_logits(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.zarr"
    run_extract(images, out)
    run_extract(images, out, split="test", views=2, limit=12)
    split = FeatureStore.open(out).split("test")
    reader = open_reader(split, ["block6"], "ram", batch_size=5, shuffle=False, all_views=True)
    batches = list(reader.epoch(0))
    assert [b.views for b in batches] == [2, 2, 2] and [len(b) for b in batches] == [5, 5, 2]
    stored = torch.from_numpy(np.asarray(split.read("block6"))).float()  # (12, 2, T, C)
    assert torch.equal(batches[0].taps["block6"], stored[:5].flatten(0, 1))  # both views of a sample, in order

    from featcache.member_bank import MemberBank
    from featcache.methods.base import MethodInput
    from featcache.sweep import expand

    bank = MemberBank(expand("linear"), MethodInput(taps=split.store.manifest.taps, num_classes=3), torch.device("cpu"))
    b = batches[0]
    _, correct, pred = bank.evaluate(b.taps, b.labels, views=2)
    logits = bank.forward(b.taps).reshape(1, 5, 2, -1)  # (K, B, V, classes)
    assert torch.equal(pred, logits.mean(dim=2).argmax(-1)) and int(correct) == int((pred == b.labels).sum())
    summary = train(str(out), "linear", tmp_path / "run", {"epochs": 2, "batch_size": 8}, progress=False)
    assert 0 <= summary["best"]["test_acc"] <= 1
