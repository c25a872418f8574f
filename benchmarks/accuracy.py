"""Accuracy on real data: side networks from the cache vs fine-tuning on the same wall-clock budget.

ImageNet-pretrained EfficientNet-Lite0 (``pypi:efficientnet-lite0``) and a fixed stratified subset of
Fashion-MNIST (train from the train files, test from the t10k files; sklearn digits when the files are
absent). featcache extracts both splits once, then ``featcache.training.train`` trains the linear probe,
LAST and LST for E epochs each with the honest protocol: the epoch is chosen on validation data held out
of the training split (10%, stratified, seeded), and the test accuracy of that epoch is reported. The
test-selected accuracy (the best test epoch: what featcache printed before it selected on validation) is
kept next to it, once, to show the size of that bias. The
fine-tuning peers (full fine-tuning, LoRA) then get the wall-clock budget featcache spent on LAST: the
train-split extraction plus LAST's training. They train in a time-bounded
loop (shuffled epochs, images transformed on the fly, AdamW, cosine schedule over the steps the budget
allows, estimated after the first steps) and are evaluated on the same test images.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .common import say
from .peers import SIDE_LR, FullFinetunePeer, ImagePeer, LoraPeer, PeerContext
from .workload import MODELS, ImageBatches, StoreInfo, build_store, data_specs, subset

FEATURE_AUG = "frofa+tokendrop"  # the fixed entries' feature augmentation (the sweep entry chooses on validation)
VIEWS = 4  # augmented views per training image of the *-views entries


@dataclass(frozen=True)
class Entry:
    """One featcache row of the accuracy table: a method, its settings, a grid (a sweep chooses its member on
    validation), the training split it reads, the split it is tested on and whether both validation and test are
    scored on the mean logits of all cached views (``tta``, ``featcache train --tta``). A split named
    ``<train|test>_views<K>`` holds K views of the training (test) images: view 0 the eval transform."""

    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    split: str = "train"
    eval_split: str = "test"
    tta: bool = False


ENTRIES: dict[str, Entry] = {
    "linear": Entry("linear"),
    "last": Entry("last"),
    "lst": Entry("lst"),
    "linear+aug": Entry("linear", {"aug": FEATURE_AUG}),
    "last+aug": Entry("last", {"aug": FEATURE_AUG}),
    "lst+aug": Entry("lst", {"aug": FEATURE_AUG}),
    "last-views4": Entry("last", split=f"train_views{VIEWS}"),  # tested on the eval transform (= view 0)
    "last-views4-tta": Entry("last", split=f"train_views{VIEWS}", eval_split=f"test_views{VIEWS}", tta=True),
    "last-sweep": Entry("last", grid={"lr": [1e-3, 3e-3], "aug": ["none", FEATURE_AUG]}),
}


def side_methods(
    store_path: Path, entries: list[str], epochs: int, batch_size: int, device: str, configs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Train each featcache entry from the cache: test accuracy of the epoch (and member) chosen on held-out
    validation data, of the last epoch, and (for comparison only) of the best test epoch; wall time."""
    from featcache.training import train

    rows = {}
    for name in entries:
        entry = ENTRIES[name]
        out = Path(tempfile.mkdtemp(prefix=f"featcache-acc-{name}-"))
        settings = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": SIDE_LR[entry.method],
            **configs.get(entry.method, {}),
            **entry.settings,
        }
        settings = {k: v for k, v in settings.items() if k not in entry.grid}
        try:
            t0 = time.perf_counter()
            summary = train(
                store_path,
                entry.method,
                out,
                settings,
                entry.grid,
                eval_split=entry.eval_split,
                split=entry.split,
                reader="auto",
                device=device,
                progress=False,
                overwrite=True,
                tensorboard=False,
                tta=entry.tta,
            )
            seconds = time.perf_counter() - t0
            history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        finally:
            shutil.rmtree(out, ignore_errors=True)
        best, test = summary["best"], f"{entry.eval_split}_acc"
        m = next(x for x in summary["members"] if x["name"] == best["name"])
        rows[name] = {
            "test_acc": best[test],
            "val_acc": best["val_acc"],
            "best_epoch": best["epoch"],
            "selected_on": best["selected_on"],
            "heldout": best.get("heldout_size"),
            "members": len(summary["members"]),
            "selected_member": best["name"],
            "last_epoch_test_acc": m["metrics"][test],
            "train_acc": m["metrics"]["train_acc"],
            "test_selected_acc": max(row[test] for row in history if test in row),
            "train_s": seconds,
            "epochs": epochs,
            "params": m["params"],
            "split": entry.split,
            "eval_split": entry.eval_split,
            "tta": entry.tta,
            "scored_on": {k: v["scored_on"] for k, v in summary["evaluation"]["splits"].items()},
            "samples_per_s": summary["samples_per_second"],
            "lr": m["config"]["lr"],
            "aug": m["config"].get("aug", "none"),
        }
        say(
            f"  acc {name}: test {rows[name]['test_acc']:.4f} (val {rows[name]['val_acc']:.4f}, {best['name']}) "
            f"in {seconds:.0f}s"
        )
    return rows


def finetune(
    peer: ImagePeer, budget_s: float, test: ImageBatches, seed: int = 0, epochs: int | None = None
) -> dict[str, Any]:
    """Train ``peer`` for ``budget_s`` seconds of wall time (whole steps), or for ``epochs`` epochs (then the
    cosine schedule spans them), then its test accuracy."""
    assert peer.optimizer is not None
    base_lrs = [g["lr"] for g in peer.optimizer.param_groups]
    t0 = time.perf_counter()
    samples, epoch, losses = 0, 0, []
    total_steps = epochs * peer.images.num_batches if epochs else None
    while time.perf_counter() - t0 < budget_s and (epochs is None or epoch < epochs):
        for x, y in peer.images.epoch(seed + epoch):
            elapsed = time.perf_counter() - t0
            if elapsed >= budget_s or (total_steps is not None and peer.steps >= total_steps):
                break
            if total_steps is None and peer.steps >= 2:  # estimate what the budget allows, then cosine over it
                total_steps = max(peer.steps + 1, int(budget_s / (elapsed / peer.steps)))
            frac = min(1.0, peer.steps / total_steps) if total_steps else 0.0
            for g, lr in zip(peer.optimizer.param_groups, base_lrs):
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
            losses.append(float(peer.train_batch(x, y)))
            samples += len(y)
        epoch += 1
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    correct = total = 0
    for x, y in test.in_order():
        correct += int((peer.predict(x) == y).sum())
        total += len(y)
    return {
        "test_acc": correct / total,
        "train_s": train_s,
        "eval_s": time.perf_counter() - t1,
        "samples": samples,
        "epochs": samples / max(1, len(peer.images.source)),
        "steps": peer.steps,
        "final_loss": sum(losses[-5:]) / max(1, len(losses[-5:])),
        "params": peer.trainable_params(),
        "lr": base_lrs[0],
    }


def size_key(model: str, train_n: int | None, test_n: int | None, epochs: int, batch_size: int) -> dict[str, Any]:
    """What identifies one accuracy size in a result file (``requested``; None = all images)."""
    return {"model": model, "train": train_n, "test": test_n, "epochs": epochs, "batch_size": batch_size}


def measure_accuracy(
    model: str,
    train_n: int | None,
    test_n: int | None,
    epochs: int,
    batch_size: int,
    device: str,
    workdir: Path,
    methods: tuple[str, ...] = ("linear", "last", "lst"),
    peers: tuple[str, ...] = ("full-ft", "lora"),
    configs: dict[str, dict[str, Any]] | None = None,
    previous: dict[str, Any] | None = None,
    done: Callable[[dict[str, Any]], None] = lambda entry: None,
) -> dict[str, Any]:
    """The whole accuracy benchmark for one data size; see the module doc.

    ``methods``: names of ``ENTRIES`` (featcache rows). ``peers``: fine-tuning peers given the wall-clock
    budget (extraction included) of the featcache entry with the best validation accuracy; ``<peer>@epochs``
    trains that peer for the same number of epochs instead. ``done(entry)`` is called after the extraction and
    after every method and peer, with ``complete`` false until the last. ``previous``, such an entry of an
    earlier run of the same size and batch, is continued (the 60k/10k size takes longer than a session here):
    its rows are kept, its store in ``workdir`` is reused when it is still there (with the extraction time that
    run measured), and only the methods and peers it lacks are run; the peers' budget is the one it measured."""
    spec_train, spec_test, note = data_specs()
    preset = MODELS[model]
    requested = size_key(model, train_n, test_n, epochs, batch_size)
    store_path = workdir / f"acc-{model}-{train_n}.zarr"
    if previous is not None and not (
        previous.get("requested") == requested and store_path.is_dir() and Path(previous["store"]["path"]) == store_path
    ):
        say(f"  acc: not continuing the earlier run: other sizes, or its store {store_path} is gone")
        previous = None
    if previous is not None:
        store = StoreInfo.from_dict(previous["store"])
        say(f"  acc: continuing {previous.get('started')}'s run: store {store.path}, rows {sorted(previous['rows'])}")
    else:
        store = build_store(
            preset,
            {"train": (spec_train, train_n), "test": (spec_test, test_n)},
            store_path,
            torch.device(device),
            batch_size,
        )
        say(f"  acc: extracted {store.splits} in {sum(store.seconds.values()):.0f}s ({store.extraction})")
    extra = {s for m in methods for s in (ENTRIES[m].split, ENTRIES[m].eval_split)} - set(store.splits)
    for split in sorted(extra):  # views of the training (test) images: <train|test>_views<K>
        views = int(split.rsplit("views", 1)[1])
        spec, n = (spec_test, test_n) if split.startswith("test") else (spec_train, train_n)
        more = build_store(
            preset, {split: (spec, n, {"views": views})}, store_path, torch.device(device), batch_size, fresh=False
        )
        store.splits.update(more.splits)
        store.seconds.update(more.seconds)
        say(f"  acc: extracted {split} ({views} views per image) in {more.seconds[split]:.0f}s")
    entry: dict[str, Any] = {
        "model": model,
        "label": preset.label,
        "data": note,
        "train_images": store.splits["train"],
        "test_images": store.splits["test"],
        "epochs": epochs,
        "batch_size": batch_size,
        "requested": requested,
        "started": previous.get("started") if previous else time.strftime("%Y-%m-%d %H:%M:%S"),
        "sessions": (previous.get("sessions", 1) + 1) if previous else 1,
        "budget_s": previous.get("budget_s") if previous else None,
        "budget_from": None,
        "store": store.to_dict(),
        "rows": dict(previous["rows"]) if previous else {},
        "complete": False,
    }
    rows = entry["rows"]
    done(entry)
    for method in methods:
        if f"featcache-{method}" not in rows:
            r = side_methods(store.path, [method], epochs, batch_size, device, configs or {})[method]
            extraction_s = store.seconds[r["split"]]
            rows[f"featcache-{method}"] = {**r, "extraction_s": extraction_s, "total_s": extraction_s + r["train_s"]}
            done(entry)
    side = {k: r for k, r in rows.items() if k.startswith("featcache-")}
    chosen = max(side, key=lambda k: side[k]["val_acc"])  # the budget of featcache's entry chosen on validation
    entry["budget_s"] = budget = entry["budget_s"] or side[chosen]["total_s"]
    entry["budget_from"] = f"{chosen} (best validation accuracy): its extraction + training"
    from featcache.store.feature_store import FeatureStore

    num_classes = len(FeatureStore.open(store.path).split("train").meta.classes) or 10
    for name in (p for p in peers if p not in rows):
        kind, _, how = name.partition("@")
        ctx = PeerContext(
            model=model,
            batch_size=batch_size,
            device=device,
            data=spec_train,
            images=store.splits["train"],
            num_classes=num_classes,
            preload=False,
        )
        peer: ImagePeer = FullFinetunePeer(ctx) if kind == "full-ft" else LoraPeer(ctx)
        peer.images = ImageBatches(
            subset(spec_train, train_n), peer.images.transform, batch_size, peer.device, preload=False
        )
        test = ImageBatches(
            subset(spec_test, test_n), peer.images.transform, batch_size * 2, peer.device, preload=False
        )
        r = finetune(peer, math.inf, test, epochs=epochs) if how == "epochs" else finetune(peer, budget, test)
        rows[name] = {**r, "total_s": r["train_s"], "budget_s": None if how == "epochs" else budget}
        say(
            f"  acc {name}: test {r['test_acc']:.4f} after {r['samples']} samples ({r['epochs']:.2f} epochs) "
            f"in {r['train_s']:.0f}s"
        )
        del peer
        done(entry)
    shutil.rmtree(store.path, ignore_errors=True)
    entry["complete"] = True
    done(entry)
    return entry
