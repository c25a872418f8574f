"""LST on a pretrained ViT: DINOv2-S/14 (``benchmarks.dinov2_onnx``) x Fashion-MNIST at 1,000 training images.

One store, many training runs. ``extract`` writes three splits of 224 px DINOv2-S/14 taps (all 13, float16):
``train`` (1,000 training images: ``--data idx:/usr/share/datasets/fashion-mnist --limit 1000``), ``val``
(1,000 other training images, 100 per class, disjoint from ``train``: a validation set large enough to
choose epochs and defaults on, one standard error ~1.3 points instead of ~4 with 10% held out) and ``test``
(2,000 test images, ``...:test --limit 2000``). ``run`` trains the table's entries from it: every entry
trains on the same 1,000 images, chooses its epoch on ``val`` and reports ``test`` once for that epoch;
LoRA (peft, through ``benchmarks.peers.LoraPeer``) trains the same epochs on the same images (eval
transform, no augmentation) and is scored after its last epoch.

    python -m benchmarks.dinov2_onnx                     # the weights (once)
    nice -n 19 python -m benchmarks.lst_vit extract      # the store (once)
    nice -n 19 python -m benchmarks.lst_vit run --entries linear,last,lst --name lst-vit-cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import RESULTS, say
from .dinov2_onnx import CACHE, MODEL, WEIGHTS_NAME, convert
from .workload import FASHION

STORE = CACHE / "dinov2-fmnist-1k.zarr"
TRAIN_N, VAL_N, TEST_N = 1000, 1000, 2000
IMG_SIZE = 224


def backbone_spec(weights: Path) -> Any:
    from featcache.vocabulary import BackboneSpec

    return BackboneSpec(model=MODEL, weights=str(weights), model_kwargs={"img_size": IMG_SIZE})


def weights_file(cache: Path = CACHE) -> Path:
    """The converted DINOv2-S/14 weights (converted on first use)."""
    path = cache / WEIGHTS_NAME
    return path if path.is_file() else convert(path, cache, IMG_SIZE)


def val_source() -> Any:
    """``VAL_N`` training-file images, stratified, none of them among the ``--limit TRAIN_N`` training images."""
    from featcache.data import Subset, open_source, stratified_subset

    source = open_source(f"idx:{FASHION}")
    labels = np.asarray(source.labels())
    rest = np.setdiff1d(np.arange(len(labels)), stratified_subset(labels, TRAIN_N))
    return Subset(source, rest[stratified_subset(labels[rest], VAL_N, seed=1)])


def extract_store(store: Path = STORE, batch_size: int = 32) -> dict[str, Any]:
    """Write the train, val and test splits (skipping complete ones); returns seconds per split."""
    from featcache.extraction import extract
    from featcache.store.feature_store import FeatureStore

    spec = backbone_spec(weights_file())
    plan = {"train": (f"idx:{FASHION}", TRAIN_N), "val": (val_source(), None), "test": (f"idx:{FASHION}:test", TEST_N)}
    done = set(FeatureStore.open(str(store)).splits()) if store.is_dir() else set()
    seconds = {}
    for split, (data, limit) in plan.items():
        resume = split in done  # finishes an interrupted split; a complete one costs nothing
        t0 = time.perf_counter()
        report = extract(spec, data, store, split=split, limit=limit, batch_size=batch_size, dtype="float16",
                         resume=resume, progress=False)
        seconds[split] = time.perf_counter() - t0
        say(f"  lst-vit: extracted {split}: {report.num_samples} images in {seconds[split]:.0f}s "
            f"({report.images_written} written)")
    return seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="write the store (train, val, test)")
    ex.add_argument("--store", type=Path, default=STORE)
    args = ap.parse_args(argv)
    if args.command == "extract":
        seconds = extract_store(args.store)
        (args.store.parent / "extract-seconds.json").write_text(json.dumps(seconds) + "\n")


if __name__ == "__main__":
    main()
