"""Markdown tables and PNG plots from the result files in benchmarks/results/.

``write_reports(folder)`` regenerates ``README.md`` from every ``<preset>-<device>.json`` there (CPU and
GPU runs side by side) and draws ``<name>.png`` (step throughput, end-to-end time, memory per backbone)
and ``<name>-accuracy.png`` (accuracy against wall time) for each.

    python -m benchmarks.report            # re-render from the JSON files already there
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import RESULTS

EXTRACT_RESULT = "extract.json"  # written by benchmarks/bench_extract.py (store branch)
README = Path(__file__).resolve().parents[1] / "README.md"
QUOTE_START, QUOTE_END = "<!-- benchmark table: start (benchmarks/report.py) -->", "<!-- benchmark table: end -->"


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    """``{name: result}`` of every benchmarks.run result file in ``folder`` (others' JSON files skipped)."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "preset" in data and "models" in data:
            out[path.stem] = data
    return out


def _fmt_n(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 3600:
        return f"{x / 3600:.1f} h"
    if x >= 120:
        return f"{x / 60:.1f} min"
    return f"{x:.1f} s"


def _params(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


# ---------------------------------------------------------------------------------------------
# Tables


def memory_value(row: dict[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """(peak RSS, RSS above the post-import baseline, CUDA max allocated) in MB."""
    if not row or "error" in row:
        return None, None, None
    return row.get("peak_rss_mb"), row.get("peak_above_baseline_mb"), row.get("cuda_max_allocated_mb")


def model_table(m: dict[str, Any], cuda: bool) -> str:
    """One backbone: every peer's step throughput, end-to-end time, memory and trainable parameters."""
    steps, mem, e2e = m["steps"], m.get("memory", {}), m.get("end_to_end")  # None: a run cut short before it
    ref = steps["featcache-last"]["samples_per_s"]
    mem_col = "CUDA max allocated MB" if cuda else "peak RSS MB | above post-import MB"
    lines = [
        f"| peer | trainable params | train GFLOP/sample | step samples/s | featcache-last speed-up (FLOP ratio) "
        f"| {e2e['epochs'] if e2e else 'E'} epochs on {e2e['images'] if e2e else 'N'} images | {mem_col} |",
        "|---|---|---|---|---|---|---|" + ("" if cuda else "---|"),
    ]
    ref_flops = steps["featcache-last"].get("train_flops_per_sample")
    default_reader = m["context"]["reader"]
    used: set[str] = set()
    rows: list[tuple[str, str | None]] = []  # (peer name, the memory row shown with it)
    for name in steps:
        key = f"{name}@{default_reader}" if name.startswith("featcache-") and "@" not in name else name
        rows.append((name, key if key in mem else None))
        used.add(key)
    rows += [(n, n) for n in mem if n not in used]
    for name, mem_key in rows:
        s = steps.get(name, {})
        mrow = mem.get(mem_key) if mem_key else None
        peak, above, cuda_mb = memory_value(mrow)
        er = e2e["rows"].get(name) if e2e and name in steps else None
        real = er is not None and er.get("how", "").startswith("real")
        e2e_txt = "-" if er is None else _fmt_s(er["total_s"]) + ("" if real else " (extrap.)")
        sps = s.get("samples_per_s")
        flops = s.get("train_flops_per_sample")
        speed = "-" if sps is None or name.startswith("featcache-") else f"{ref / sps:.1f}x"
        if speed != "-" and flops and ref_flops:
            speed += f" ({flops / ref_flops:.1f}x)"
        params = s.get("trainable_params", (mrow or {}).get("trainable_params"))
        mem_txt = _fmt_n(cuda_mb) if cuda else f"{_fmt_n(peak)} | {_fmt_n(above)}"
        gflops = "-" if not flops else f"{flops / 1e9:.2f}"
        lines.append(f"| {name} | {_params(params)} | {gflops} | {_fmt_n(sps)} | {speed} | {e2e_txt} | {mem_txt} |")
    return "\n".join(lines)


def extract_ratio(folder: Path) -> dict[str, Any] | None:
    """The extraction / bare-forward throughput ratio from bench_extract.py's result, when it exists."""
    path = folder / EXTRACT_RESULT
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return {k: v["ratio"] for k, v in data.get("results", {}).items() if "ratio" in v}
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def targets(r: dict[str, Any], folder: Path) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows on the preset's first backbone (the ViT)."""
    t = r["preset"]["targets"]
    first = r["preset"]["models"][0]
    m = r["models"].get(first)
    rows: list[tuple[str, str, str]] = []
    if m is None:
        return rows
    steps, e2e, mem = m["steps"], m.get("end_to_end", {}).get("rows"), m.get("memory", {})
    fc = steps["featcache-last"]["samples_per_s"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    fc_flops = steps["featcache-last"].get("train_flops_per_sample")
    for key, peer, label in (("step_vs_lora", "lora", "LoRA"), ("step_vs_in_loop", "last-in-loop", "LAST in the loop")):
        ratio = fc / steps[peer]["samples_per_s"]
        flops = steps[peer].get("train_flops_per_sample")
        bound = f" (FLOP ratio {flops / fc_flops:.1f}x)" if flops and fc_flops else ""
        rows.append(
            (f"featcache step >= {t[key]:g}x {label}'s samples/s", f"{ratio:.1f}x{bound}", verdict(ratio >= t[key]))
        )
    if e2e:
        ratio = e2e["lora"]["total_s"] / e2e["featcache-last"]["total_s"]
        rows.append(
            (
                f"{m['end_to_end']['epochs']} epochs on {m['end_to_end']['images']} images (incl. extraction) "
                f">= {t['e2e_vs_lora']:g}x faster than LoRA (LoRA extrapolated)",
                f"{ratio:.1f}x",
                verdict(ratio >= t["e2e_vs_lora"]),
            )
        )
    lora_above = memory_value(mem.get("lora"))[1]
    for name in ("featcache-last@stream", "featcache-last@ram", "featcache-last@gpu"):
        above = memory_value(mem.get(name))[1]
        key_cuda = "cuda" in r["device"]
        if key_cuda:
            above, lora_above = memory_value(mem.get(name))[2], memory_value(mem.get("lora"))[2]
        if above is not None and lora_above:
            frac = above / lora_above
            rows.append(
                (
                    f"training memory ({name}) <= {100 * t['memory_vs_lora']:.0f}% of LoRA's",
                    f"{100 * frac:.0f}% ({above:.0f} / {lora_above:.0f} MB)",
                    verdict(frac <= t["memory_vs_lora"]),
                )
            )
    ext = extract_ratio(folder)
    if ext:
        txt = ", ".join(f"{k} {v:.2f}x" for k, v in ext.items())
        rows.append(
            (
                f"extraction >= {t['extract_vs_forward']:g}x bare forward (bench_extract.py)",
                txt,
                verdict(all(v >= t["extract_vs_forward"] for v in ext.values())),
            )
        )
    else:
        rows.append(
            (
                f"extraction >= {t['extract_vs_forward']:g}x bare forward",
                "see benchmarks/results/extract.json (bench_extract.py, store branch): not in this folder yet",
                "-",
            )
        )
    sw = m.get("sweep")
    if sw:
        rows.append(
            (
                f"K={sw['members']} sweep <= {t['sweep_k8_vs_k1']:g}x one member (MemberBank, same batches)",
                f"{sw['ratio']:.2f}x",
                verdict(sw["met"]),
            )
        )
    return rows


def limits_table(m: dict[str, Any]) -> str:
    lim = m.get("limits")
    if not lim:
        return ""
    mm = lim["matmul"]
    lines = ["| what | achieved | machine limit (same run) | fraction |", "|---|---|---|---|"]
    for method, c in lim["compute"].items():
        ref = c["matmul"]
        lines.append(
            f"| featcache-{method} training step, GFLOP/s (FlopCounterMode, fwd+bwd; A B A B with the "
            f"matmul) | {c['achieved_gflops']:.1f} | {c['matmul_gflops']:.1f} ({ref['dtype']} matmul "
            f"{ref['n']}^3) | {100 * c['fraction_of_matmul']:.0f}% |"
        )
    for ref in (mm, lim.get("matmul_bf16")):
        if ref:
            lines.append(
                f"| {ref['dtype']} matmul {ref['n']}^3 alone, GFLOP/s (median of {len(ref['seconds'])}) | "
                f"{ref['gflops']:.1f} | | |"
            )
    for mode, rd in lim["reader"].items():
        lines.append(
            f"| reader ({mode}) MB/s, float32 batches | {rd['reader_mb_s']:,.0f} | {rd['memcpy_mb_s']:,.0f} "
            f"(memcpy); {rd['convert_copy_mb_s']:,.0f} (fp16->fp32 copy) | {100 * rd['reader_vs_memcpy']:.0f}%; "
            f"{100 * rd['reader_vs_convert_copy']:.0f}% |"
        )
    for method, ops in lim.get("profile", {}).items():
        top = ", ".join(f"{o['op'].replace('aten::', '')} {o['self_ms']:.0f} ms" for o in ops[:5])
        lines.append(f"| featcache-{method} step profile, top operators by self time | {top} | | |")
    return "\n".join(lines)


def accuracy_table(acc: dict[str, Any]) -> str:
    budget = (
        f"fine-tuning budget {_fmt_s(acc['budget_s'])} ({acc['budget_from']})"
        if acc.get("budget_s") is not None
        else "fine-tuning budget not measured yet"
    )
    sessions = f"; measured in {acc['sessions']} runs (continued with --merge)" if acc.get("sessions", 1) > 1 else ""
    unfinished = "" if acc.get("complete", True) else " **Incomplete**: the rows below are what it measured so far."
    lines = [
        f"{acc['label']} on {acc['data']}: {acc['train_images']:,} train / {acc['test_images']:,} test images, "
        f"side networks {acc['epochs']} epochs, {budget}{sessions}.{unfinished}",
        "",
        "| method | chosen on validation | val accuracy | test accuracy (chosen epoch) | test-selected (old protocol) "
        "| trainable params | training | total incl. extraction | seen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in acc["rows"].items():
        seen = f"{r['epochs']} epochs" if name.startswith("featcache") else f"{r['epochs']:.2f} epochs"
        chosen = (
            (
                f"epoch {r['best_epoch']}"
                + (f", {r['selected_member']} of {r['members']}" if r.get("members", 1) > 1 else "")
            )
            if "best_epoch" in r
            else "last step"
        )
        val = f"{100 * r['val_acc']:.1f}%" if r.get("val_acc") is not None else "-"
        old = f"{100 * r['test_selected_acc']:.1f}%" if r.get("test_selected_acc") is not None else "-"
        lines.append(
            f"| {name} | {chosen} | {val} | {100 * r['test_acc']:.1f}% | {old} | {_params(r.get('params'))} | "
            f"{_fmt_s(r['train_s'])} | {_fmt_s(r['total_s'])} | {seen} |"
        )
    return "\n".join(lines)


def targets_table(rows: list[tuple[str, str, str]]) -> list[str]:
    """Markdown lines of the targets table, a blank line after it."""
    return ["| target | measured | verdict |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows] + [""]


def _when(r: dict[str, Any]) -> str:
    """When the result was measured and the load around it; a file merged from several runs names each
    start (its load averages are the latest run's, and it says so)."""
    load = (
        f"load average at start {r['machine']['load_average']}, at end {r.get('machine_after', {}).get('load_average')}"
    )
    starts = r.get("merged_from") or [r["started"]]
    if len(starts) == 1:
        return f"started {r['started']}, {r['wall_s'] / 60:.1f} min; {load}"
    return (
        f"measured in {len(starts)} runs merged with --merge (started {', '.join(map(str, starts))}), "
        f"{r['wall_s'] / 60:.1f} min in all; the latest run's {load}"
    )


def section(name: str, r: dict[str, Any], folder: Path) -> str:
    """The README section of one result file."""
    cuda = "cuda" in r["device"]
    mach = r["machine"]
    p = r["preset"]
    out = [
        f"## {name}",
        "",
        f"Device: **{r['device']}**; {_when(r)}; torch {mach['torch']}. "
        f"Batch {p['batch_size']}"
        + (f"; step medians over {p['rounds']} A B A B rounds." if r["models"] else ".")
        + (
            ""
            if r.get("complete", True)
            else " **Incomplete**: the run stopped before its last stage; what it measured is below."
        ),
        "",
    ]
    for m in r["models"].values():
        st = m["store"]
        out += [
            f"### {m['label']}",
            "",
            f"{st['splits']['train']} images of {m['data']}; one extraction ({st['extraction']}): "
            f"{_fmt_s(st['seconds']['train'])}, {st['nbytes'] / 2**20:,.0f} MB of float16 taps. "
            f"featcache reader: {m['context']['reader']}.",
            "",
            model_table(m, cuda),
            "",
        ]
        lt = limits_table(m)
        if lt:
            out += ["Distance to the machine's limits:", "", lt, ""]
        sw = m.get("sweep")
        if sw:
            steps = ", ".join(f"{k} {v:.3f} s" for k, v in sw["step_s"].items())
            out += [
                f"Sweep: MemberBank step (batch read included) {steps}: K={sw['members']} costs "
                f"{sw['ratio']:.2f}x one member"
                + (
                    f"; {sw['members']} separate one-member banks on the same batch {sw['loop_ratio']:.2f}x"
                    if "loop_ratio" in sw
                    else ""
                )
                + ".",
                "",
            ]
    rows = targets(r, folder)
    if rows:
        out += [
            f"### Targets ({p['models'][0]})" + (" — set for the 2-core CPU; shown for reference" if cuda else ""),
            "",
            *targets_table(rows),
        ]
    for acc in r.get("accuracy", []):
        out += ["### Accuracy on real data", "", accuracy_table(acc), ""]
    plots = ([f"[{name}.png]({name}.png)"] if r["models"] else []) + (
        [f"[{name}-accuracy.png]({name}-accuracy.png)"] if r.get("accuracy") else []
    )
    out += ["Plots: " + ", ".join(plots), ""] if plots else []
    return "\n".join(out)


def write_reports(folder: Path = RESULTS) -> Path:
    """Regenerate README.md and the plots from every result file in ``folder``."""
    results = load_results(folder)
    parts = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks.run` (see docs/benchmarks.md for what is measured and how). "
        "Peers share backbone, images, batch size and epochs; step timings alternate the peers (A B A B) in "
        'one process; memory is measured in one subprocess per peer. "extrap." = extrapolated from the '
        "median step time (favours the peer: no data loading counted).",
        "",
    ]
    for name, r in results.items():
        parts.append(section(name, r, folder))
        try:
            from .plots import plot_result

            plot_result(name, r, folder)
        except Exception as err:  # a plot must never lose the tables
            parts.append(f"(plots failed: {type(err).__name__}: {err})\n")
    path = folder / "README.md"
    path.write_text("\n".join(parts))
    if folder.resolve() == RESULTS.resolve():
        quote_in_readme(results)
    return path


def readme_quote(name: str, r: dict[str, Any]) -> str:
    """The project README's excerpt of one result: the first backbone's peers, the targets, accuracy."""
    key, m = next(iter(r["models"].items()))
    out = [
        f"From `benchmarks/results/{name}.json` ({r['device']}, {r['started']}; full tables, plots and method "
        f"in [benchmarks/results/README.md](benchmarks/results/README.md)). {m['label']}, batch "
        f"{r['preset']['batch_size']}, {m['store']['splits']['train']} images:",
        "",
        model_table(m, "cuda" in r["device"]),
        "",
    ]
    rows = targets(r, RESULTS)
    if rows:
        out += targets_table(rows)
    for acc in r.get("accuracy", []):
        out += [accuracy_table(acc), ""]
    return "\n".join(out).strip()


def quote_in_readme(results: dict[str, dict[str, Any]], readme: Path = README, name: str = "quick-cpu") -> bool:
    """Replace the README's block between the quote markers with the latest ``name`` result."""
    if name not in results or not readme.is_file():
        return False
    text = readme.read_text()
    start, end = text.find(QUOTE_START), text.find(QUOTE_END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[: start + len(QUOTE_START)] + "\n" + readme_quote(name, results[name]) + "\n" + text[end:])
    return True


if __name__ == "__main__":
    print(write_reports())
