"""PNG plots: training curves of every sweep member, and per-tap statistics of a store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(
    history: dict[str, list[dict[str, Any]]], path: str | Path, select: str, rungs: list[int] | None = None
) -> Path:
    """Loss (left) and accuracy (right) per epoch for every member; evaluated splits dashed. ``rungs``: the epochs
    of a halving sweep's rungs, drawn as dotted vertical lines; a member stopped at one ends there with an x."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax in (ax_loss, ax_acc) if rungs else ():
        for i, epoch in enumerate(rungs or []):
            ax.axvline(epoch, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"rung {i + 1}", (epoch, 1), xycoords=("data", "axes fraction"), fontsize=7, va="top")
    for i, (name, rows) in enumerate(history.items()):
        color = plt.cm.tab10(i % 10)
        epochs = [r["epoch"] for r in rows]
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], color=color, label=name)
        ax_acc.plot(epochs, [r["train_acc"] for r in rows], color=color, alpha=0.45)
        ev = [(r["epoch"], r[f"{select}_acc"]) for r in rows if f"{select}_acc" in r]
        if ev and select != "train":
            ax_acc.plot(*zip(*ev), color=color, linestyle="--", marker="o", markersize=3, label=name)
            lv = [(r["epoch"], r[f"{select}_loss"]) for r in rows if f"{select}_loss" in r]
            ax_loss.plot(*zip(*lv), color=color, linestyle="--")
            if rows and rows[-1].get("status") == "stopped":
                ax_acc.plot(*ev[-1], color=color, marker="x", markersize=6)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (solid: train, dashed: " + select + ")")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title=f"accuracy (faint: train, dashed: {select})")
    ax_loss.set_yscale("log")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    handles, labels = ax_acc.get_legend_handles_labels() if select != "train" else ax_loss.get_legend_handles_labels()
    if len(labels) <= 16:
        ax_acc.legend(handles, labels, fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_store_stats(description: dict[str, Any], path: str | Path) -> Path:
    """``inspect --plot``: per split, token norms by tap (mean +- std) and the label histogram.

    ``description`` is ``describe_store(..., stats=True)``.
    """
    splits = description["splits"]
    fig, axes = plt.subplots(len(splits), 2, figsize=(12, 3.6 * len(splits)), squeeze=False)
    for (name, sp), (ax_norm, ax_lab) in zip(splits.items(), axes):
        taps = list(sp["taps"])
        mean = [sp["taps"][t]["stats"].get("token_norm_mean") or 0.0 for t in taps]
        std = [sp["taps"][t]["stats"].get("token_norm_std") or 0.0 for t in taps]
        xs = range(len(taps))
        ax_norm.errorbar(xs, mean, yerr=std, marker="o", capsize=3)
        ax_norm.set_xticks(list(xs), taps, rotation=45, ha="right", fontsize=8)
        ax_norm.set(title=f"{name}: token L2 norm by tap", ylabel="norm (mean +- std)")
        ax_norm.grid(alpha=0.3)
        counts = sp["label_counts"]
        ax_lab.bar(range(len(counts)), list(counts.values()))
        ax_lab.set_xticks(range(len(counts)), list(counts), rotation=45, ha="right", fontsize=8)
        ax_lab.set(title=f"{name}: labels ({sp['completed_samples']} images)", ylabel="images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
