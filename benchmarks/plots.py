"""PNG plots of one benchmarks.run result: per backbone, step throughput, end-to-end time and memory;
and test accuracy against wall time for the accuracy benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 80


def _color(name: str) -> str:
    return "tab:green" if name.startswith("featcache") else ("tab:orange" if "in-loop" in name else "tab:gray")


def _bars(ax: Any, labels: list[str], values: list[float], title: str, hatched: set[str] | None = None) -> None:
    if not labels:
        ax.set_axis_off()
        ax.set_title(title + ": not measured", fontsize=8)
        return
    values = [max(v, 1e-9) for v in values]
    y = range(len(labels))
    bars = ax.barh(list(y), values, color=[_color(n) for n in labels])
    for bar, name in zip(bars, labels):
        if hatched and name in hatched:
            bar.set_hatch("//")
            bar.set_alpha(0.6)
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(axis="x", alpha=0.3)


def plot_result(name: str, r: dict[str, Any], folder: Path) -> list[Path]:
    """``<name>.png`` (rows: backbones; columns: samples/s, E-epoch time, memory) and ``<name>-accuracy.png``."""
    models = list(r["models"].values())
    cuda = "cuda" in r["device"]
    paths = []
    if models:
        fig, axes = plt.subplots(len(models), 3, figsize=(12, 2.6 * len(models)), squeeze=False)
        for row, m in zip(axes, models):
            steps = m["steps"]
            _bars(
                row[0],
                list(steps),
                [s["samples_per_s"] for s in steps.values()],
                f"{m['label']}: training step, samples/s",
            )
            if "end_to_end" in m:  # absent when a run was cut short before it
                e2e = m["end_to_end"]["rows"]
                extrap = {n for n, v in e2e.items() if not v.get("how", "").startswith("real")}
                _bars(
                    row[1],
                    list(e2e),
                    [v["total_s"] for v in e2e.values()],
                    f"{m['end_to_end']['epochs']} epochs on {m['end_to_end']['images']} images, s "
                    "(hatched: extrapolated)",
                    extrap,
                )
            mem = {k: v for k, v in m.get("memory", {}).items() if "error" not in v}
            key = "cuda_max_allocated_mb" if cuda else "peak_above_baseline_mb"
            _bars(
                row[2],
                list(mem),
                [max(1e-3, v.get(key, 0.0)) for v in mem.values()],
                "CUDA max allocated, MB" if cuda else "peak RSS above post-import RSS, MB",
            )
        fig.suptitle(f"{name}: {r['device']}", fontsize=9)
        fig.tight_layout()
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    if r.get("accuracy"):
        paths.append(_plot_accuracy(name, r["accuracy"], folder))
    return paths


def _plot_accuracy(name: str, accs: list[dict[str, Any]], folder: Path) -> Path:
    fig, axes = plt.subplots(1, len(accs), figsize=(5.5 * len(accs), 3.6), squeeze=False)
    for ax, acc in zip(axes[0], accs):
        for peer, row in acc["rows"].items():
            ax.scatter(row["total_s"], 100 * row["test_acc"], color=_color(peer), s=30)
            ax.annotate(
                peer, (row["total_s"], 100 * row["test_acc"]), fontsize=7, xytext=(4, 2), textcoords="offset points"
            )
        if acc.get("budget_s") is not None:  # None: a run cut short before its side networks were trained
            ax.axvline(acc["budget_s"], color="k", linestyle=":", linewidth=1)
        ax.set(
            xlabel="wall time incl. extraction, s",
            ylabel="test accuracy, %",
            title=f"{acc['train_images']:,} train / {acc['test_images']:,} test",
        )
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = folder / f"{name}-accuracy.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path
