"""Train side networks from a cache: one pass over the store per epoch feeds every sweep member.

Never loads or runs the backbone. ``train(...)`` writes into RUNDIR:
  sweep.json          the members (method, method config, training config)
  metrics.jsonl       one line per member and evaluated epoch
  members/<name>/     best.safetensors, last.safetensors, config.json (checkpoint.py)
  best.json           the best member by the selection split
  curves.png          loss and accuracy curves of all members
  summary.json        the DESIGN.md summary (``train --json`` prints it)
  state/              what ``--resume`` continues from (end of the last finished epoch)

Runs whose members train elsewhere (``featcache.scale``: members spread over dask workers) use three
hooks: ``prepare_run`` (the checks and a fresh RUNDIR, before any training), ``train(members=subset,
partial=True)`` into a part directory per worker, and ``gather_parts`` (one RUNDIR, as a local sweep
of all members writes it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from featcache import __version__
from featcache.allocator import keep_freed_memory
from featcache.checkpoint import (SUPPORTED_CHECKPOINT_FORMATS, member_config, read_tensors, safe_member_name,
                                  write_json, write_tensors)
from featcache.errors import CheckpointError, ConfigError, FeatcacheError, FormatVersionError, Interrupted, StoreError
from featcache.methods.base import MethodInput
from featcache.progress import bar, say
from featcache.store.feature_store import FeatureStore, SplitHandle
from featcache.store.lock import holds_run_lock
from featcache.vocabulary import Manifest
from featcache.store.reader import CacheReader, open_reader

from .bank import MemberBank
from .sweep import SweepMember, expand

log = logging.getLogger("featcache.train")


@dataclass
class MemberRecord:
    """Running metrics of one member."""

    member: SweepMember
    bank: int
    slot: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _method_input(store: FeatureStore, split: SplitHandle, backbone_state: Callable[[], dict] | None) -> MethodInput:
    done = split.completed_indices()  # readers use completed shards only; the others hold no labels yet
    if len(done) == 0:
        raise StoreError(f"split {split.name!r} of {store.url} has no completed shard yet; finish the extraction "
                         "(featcache extract --resume) first")
    if len(done) < split.num_samples:
        log.warning(f"split {split.name!r} of {store.url} is incomplete: training on the {len(done)} of "
                    f"{split.num_samples} images in completed shards; finish it with featcache extract --resume")
    split.require_objects("labels", np.unique(done // split.meta.shard_images))
    labels = split.labels()[done]
    if labels.min() < 0:
        raise StoreError(f"split {split.name!r} has unlabelled images (label -1); train needs labelled data")
    classes = split.meta.classes
    if classes and labels.max() >= len(classes):
        first = int(done[int(labels.argmax())])
        raise StoreError(f"split {split.name!r} of {store.url} holds label {int(labels.max())} (image {first}) but "
                         f"has {len(classes)} classes; the store is damaged: run featcache inspect --verify, then "
                         "featcache extract --resume --repair")
    num_classes = max(len(classes), int(labels.max()) + 1)
    if num_classes < 2:
        raise StoreError(f"split {split.name!r} has {num_classes} class(es); training a classifier needs at least 2")
    return MethodInput(taps=store.manifest.taps, num_classes=num_classes, final_norm=store.final_norm(),
                       backbone_kind=store.manifest.backbone.get("kind", "vit"), backbone_state=backbone_state)


def _eval_splits(store: FeatureStore, train_split: str, eval_split: str | None) -> list[str]:
    """The splits evaluated each time: --eval-split (or test), plus val when present; selection uses the first."""
    have = store.splits()
    if eval_split is not None:
        if eval_split not in have:
            raise StoreError(f"--eval-split {eval_split!r} is not in {store.url} (splits: {', '.join(have)}); "
                             f"extract it with featcache extract ... --split {eval_split}")
        chosen = [eval_split]
    else:
        chosen = [s for s in ("val", "test") if s in have and s != train_split][:1]
    if "val" in have and "val" not in chosen and "val" != train_split:
        chosen.append("val")
    return chosen


def _prepare_rundir(out: Path, members: list[SweepMember], resume: bool, overwrite: bool,
                    create: bool = True) -> dict[str, Any] | None:
    """Create RUNDIR, or check that a resumed one belongs to the same sweep; returns the saved state.

    ``create=False`` only checks (nothing is written), so that every refusal comes before any change.
    """
    sweep = [m.to_dict() for m in members]
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; choose a directory for the run")
    if resume:
        if not (out / "sweep.json").is_file():
            raise CheckpointError(f"--resume: {out} holds no featcache run (no sweep.json); drop --resume to start one")
        saved = _read_json(out / "sweep.json")
        if saved != sweep:
            raise CheckpointError(f"--resume: {out} was started with a different sweep (methods, settings or grid); "
                                  "resume with the same options, or start a new --out")
        pointer = out / "state" / "state.json"
        if not pointer.is_file():
            return None
        state = _read_json(pointer)
        # a name inside RUNDIR/state, never a path from the file: state.json is data, not a place to read or write
        if not isinstance(state, dict) or not re.fullmatch(r"epoch-\d{4,}", str(state.get("dir", ""))) \
                or not isinstance(state.get("epoch"), int):
            raise CheckpointError(f"--resume: {pointer} is damaged (no valid epoch and state directory); start a new "
                                  "--out, or --overwrite this run")
        return state
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"run directory {out} already exists and is not empty; pass --resume to continue it, "
                                  "--overwrite to replace it, or choose a new --out")
        if create:
            shutil.rmtree(out)
    if not create:
        return None
    (out / "members").mkdir(parents=True, exist_ok=True)
    write_json(out / "sweep.json", sweep)
    return None


def _save_state(out: Path, epoch: int, banks: list[MemberBank], records: list[MemberRecord], stats: dict[str, Any]) -> None:
    """End-of-epoch state: a fresh directory, then an atomic pointer update, then old states removed."""
    state_root = out / "state"
    target = state_root / f"epoch-{epoch:04d}"
    target.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, bank in enumerate(banks):
        tensors, info = bank.state()
        write_tensors(target / f"bank{i}.safetensors", tensors)
        infos.append(info)
    write_json(state_root / "state.json", {"epoch": epoch, "dir": target.name, "banks": infos, "stats": stats,
                                           "records": [{"history": r.history, "best": r.best} for r in records]})
    for old in state_root.glob("epoch-*"):
        if old.name != target.name:
            shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(f"--resume: {path} is damaged ({err}); start a new --out, or --overwrite this run") from None


def _load_state(out: Path, state: dict[str, Any], banks: list[MemberBank], records: list[MemberRecord]) -> None:
    target = out / "state" / state["dir"]
    try:
        for i, bank in enumerate(banks):
            bank.load_state(read_tensors(target / f"bank{i}.safetensors"), state["banks"][i])
        for rec, saved in zip(records, state["records"]):
            rec.history, rec.best = saved["history"], saved["best"]
    except (KeyError, IndexError, TypeError) as err:
        raise CheckpointError(f"--resume: the saved state in {target} does not fit this sweep ({type(err).__name__}: "
                              f"{err}); start a new --out, or --overwrite this run") from None


def _check_resumed_store(out: Path, store: FeatureStore, split: str, members: list[SweepMember]) -> None:
    """A resumed run must read the store it started on (same backbone, weights, taps, dtype, split)."""
    config = out / "members" / safe_member_name(members[0].name) / "config.json"
    if not config.is_file():
        return
    try:
        data = json.loads(config.read_text())
        recorded = data["store"]
        manifest = recorded["manifest"]
    except (ValueError, KeyError, TypeError):
        return  # a damaged member config is rewritten at the end of the next epoch
    version = data.get("featcache_checkpoint")
    if isinstance(version, int) and version not in SUPPORTED_CHECKPOINT_FORMATS:  # a run of another featcache
        raise FormatVersionError(f"--resume: {out} was written with checkpoint format {version}; this featcache "
                                 f"({__version__}) reads {SUPPORTED_CHECKPOINT_FORMATS}: resume it with the featcache "
                                 "that started it, or start a new --out")
    try:
        theirs = Manifest.from_attrs(manifest, f"--resume: the store recorded in {config}")  # newer format: refused
    except FormatVersionError:
        raise
    except FeatcacheError:
        return
    if recorded.get("split") != split:
        raise CheckpointError(f"--resume: {out} was trained on split {recorded.get('split')!r}, this run reads split "
                              f"{split!r}; resume with --split {recorded.get('split')}, or start a new --out")
    mine, was = store.manifest.identity(), theirs.identity()
    for key in mine:
        if mine[key] != was[key]:
            raise CheckpointError(f"--resume: {out} was trained on a store made with another {key} than {store.url} "
                                  f"has; resume with the store it started on ({recorded.get('url')}), or start a new "
                                  "--out")


def _saved_epochs(out: Path) -> int:
    """Epochs whose end state RUNDIR/state holds (what --resume continues from)."""
    try:
        return int(json.loads((out / "state" / "state.json").read_text())["epoch"]) + 1
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _remove_leftovers(out: Path, state: dict[str, Any] | None) -> None:
    """Temporary files of writes cut short by a crash, and state directories no pointer names."""
    for tmp in [*out.glob(".*.tmp*"), *out.glob("members/*/.*.tmp*"), *out.glob("state/.*.tmp*"),
                *out.glob("state/*/.*.tmp*")]:
        tmp.unlink(missing_ok=True)
    keep = state["dir"] if state is not None else None
    for old in (out / "state").glob("epoch-*"):
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def _evaluate(banks: list[MemberBank], reader: CacheReader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per bank: (summed loss (K,), correct (K,)) over the whole split."""
    sums = [(torch.zeros(len(b), device=b.device), torch.zeros(len(b), device=b.device)) for b in banks]
    for batch in reader.epoch(0):
        for (loss, correct), bank in zip(sums, banks):
            l, c, _ = bank.evaluate(batch.taps, batch.labels)
            loss += l
            correct += c
    return sums


def _build_banks(members: list[SweepMember], mi: MethodInput, device: torch.device) -> tuple[list[MemberBank], list[MemberRecord]]:
    """One bank per (method, architecture); records in member order point to their bank and slot."""
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(members):
        groups.setdefault(m.arch_key(), []).append(i)
    banks = [MemberBank([members[i] for i in idx], mi, device) for idx in groups.values()]
    records = [MemberRecord(members[i], b, s) for b, idx in enumerate(groups.values()) for s, i in enumerate(idx)]
    records.sort(key=lambda r: members.index(r.member))
    return banks, records


def _train_epoch(epoch: int, banks: list[MemberBank], records: list[MemberRecord], reader: CacheReader,
                 epochs: int, stats: dict[str, Any], pbar: Any) -> dict[str, dict[str, float]]:
    """One pass over the cache feeding every bank the same batches; per-member train loss and accuracy."""
    device = banks[0].device
    sums = [(torch.zeros(len(b), device=device), torch.zeros(len(b), device=device)) for b in banks]
    t0, seen = time.perf_counter(), 0
    for step, batch in enumerate(reader.epoch(epoch)):
        at = epoch + step / len(reader)
        for i, ((loss_sum, correct_sum), bank) in enumerate(zip(sums, banks)):
            tb = time.perf_counter()
            loss, correct = bank.train_step(batch.taps, batch.labels, at, epochs, where=f"epoch {epoch + 1} step {step + 1}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stats["bank_seconds"][i] += time.perf_counter() - tb
            loss_sum += torch.nan_to_num(loss.detach(), nan=float("inf")) * len(batch)
            correct_sum += correct
        seen += len(batch)
        pbar.update(1)
        if step % 10 == 0:
            pbar.set_postfix_str(_postfix(records), refresh=False)
    stats["train_seconds"] += time.perf_counter() - t0
    stats["train_samples"] += seen
    return {r.member.name: {"train_loss": float(sums[r.bank][0][r.slot] / seen),
                            "train_acc": float(sums[r.bank][1][r.slot] / seen)} for r in records}


def _eval_epoch(banks: list[MemberBank], records: list[MemberRecord], readers: dict[str, CacheReader],
                rows: dict[str, dict[str, float]]) -> None:
    """Add ``<split>_acc`` and ``<split>_loss`` of every member to ``rows``."""
    for name, rd in readers.items():
        res = _evaluate(banks, rd)
        for r in records:
            rows[r.member.name][f"{name}_acc"] = float(res[r.bank][1][r.slot] / rd.num_samples)
            rows[r.member.name][f"{name}_loss"] = float(res[r.bank][0][r.slot] / rd.num_samples)


@holds_run_lock
def train(store: str | FeatureStore, method: str, out: str | os.PathLike[str], settings: dict[str, Any] | None = None,
          grid: dict[str, list[Any]] | None = None, split: str = "train", eval_split: str | None = None,
          reader: str = "auto", device: str | torch.device = "cpu", resume: bool = False, overwrite: bool = False,
          progress: bool = True, backbone_state: Callable[[], dict] | None = None,
          storage_options: dict[str, Any] | None = None, members: list[SweepMember] | None = None,
          partial: bool = False, stream_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train every member of the sweep from the cache; returns the summary (also RUNDIR/summary.json).

    ``stream_options`` go to the ``stream`` reader when that mode is used (``buffer_mb``: the shuffle
    window, which also bounds the size of one read; ``prefetch``: blocks read ahead).

    ``members`` replaces the sweep built from method, settings and grid (e.g. a subset of one);
    ``partial``: RUNDIR is one part of a larger sweep: no best member is chosen, no best.json or
    curves.png are written, and a part whose members all diverged is no error (``gather_parts``
    decides over all parts).
    """
    keep_freed_memory()  # large tensors reuse heap pages instead of faulting fresh ones (allocator.py)
    t_start, rss_base, device = time.perf_counter(), rss_mb(), torch.device(device)
    fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store, "r", storage_options)
    members = members or expand(method, settings, grid)
    out = Path(out)
    train_split = fs.split(split)
    eval_names = _eval_splits(fs, split, eval_split)
    mi = _method_input(fs, train_split, backbone_state)
    state = _prepare_rundir(out, members, resume, overwrite, create=False)  # refusals first, nothing written
    if resume:
        _check_resumed_store(out, fs, split, members)
    banks, records = _build_banks(members, mi, device)
    mi.backbone_state = None  # LST's pruned init is done: free the backbone weights
    needed = sorted({t for b in banks for t in b.required_taps}, key=fs.manifest.tap_names.index)
    cfg = members[0].train
    stream_options = stream_options or {}
    train_reader = open_reader(train_split, needed, reader, cfg.batch_size, shuffle=True, seed=cfg.seed, device=device,
                               **stream_options)
    eval_readers = {n: open_reader(fs.split(n), needed, reader, max(cfg.batch_size, 256), shuffle=False, device=device,
                                   **stream_options) for n in eval_names}
    if resume:  # the cache read well (resident readers check every chunk): now RUNDIR may change
        _remove_leftovers(out, state)
    else:
        _prepare_rundir(out, members, resume, overwrite)
    first_epoch, stats = 0, {"train_seconds": 0.0, "train_samples": 0, "bank_seconds": [0.0] * len(banks)}
    if state is not None:
        _load_state(out, state, banks, records)
        first_epoch, stats = state["epoch"] + 1, state["stats"]
        say(f"resuming {out} after epoch {state['epoch'] + 1}", quiet=not progress)
    store_record = {"url": fs.url, "split": split, "manifest": fs.manifest.to_attrs()}
    # the bank's resolved config ("auto" widths, heads, ... filled in), so that checkpoints rebuild exactly
    configs = [member_config(r.member.name, r.member.method, banks[r.bank].template.config.to_dict(),
                             r.member.train.to_dict(), mi, store_record, train_split.meta.classes) for r in records]
    select = eval_names[0] if eval_names else split
    say(f"training {len(members)} member(s) in {len(banks)} bank(s) on {train_reader.num_samples} samples "
        f"({', '.join(needed)}), reader {train_reader.mode}: {train_reader.choice.reason}", quiet=not progress)
    try:
        with bar(cfg.epochs * len(train_reader), "train", unit="step", progress=progress,
                 initial=first_epoch * len(train_reader)) as pbar:
            for epoch in range(first_epoch, cfg.epochs):
                torch.manual_seed(cfg.seed * 1000 + epoch)  # any randomness inside side networks: fixed per epoch
                rows = _train_epoch(epoch, banks, records, train_reader, cfg.epochs, stats, pbar)
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
                    _eval_epoch(banks, records, eval_readers, rows)
                _record_epoch(out, epoch, banks, records, rows, configs, select)
                _save_state(out, epoch, banks, records, stats)  # the commit point of the epoch
                _write_metrics(out, records)
                pbar.set_postfix_str(_postfix(records), refresh=True)
        summary = _summary(out, records, banks, stats, select, t_start, rss_base, train_reader, device, partial)
        if partial:
            write_json(out / "summary.json", summary)
        else:
            _finish(out, summary, records, select, progress)
    except KeyboardInterrupt:
        saved = _saved_epochs(out)
        kept = (f"it holds the state after epoch {saved} of {cfg.epochs}" if saved else
                "no epoch had finished, so it starts from the beginning")
        raise Interrupted(f"interrupted: training in {out} stopped, {kept}; run the same featcache train command with "
                          "--resume to continue") from None
    return summary


def _finish(out: Path, summary: dict[str, Any], records: list[MemberRecord], select: str, progress: bool) -> None:
    """summary.json, curves.png and the closing line."""
    write_json(out / "summary.json", summary)
    try:
        from featcache.plots import plot_curves

        plot_curves(records_history(records), out / "curves.png", select)
    except Exception as err:  # a plot must never fail a finished run
        log.warning(f"could not draw curves.png: {err}")
    best = summary["best"]
    say(f"trained {summary['num_members']} member(s) in {summary['wall_seconds']:.1f}s "
        f"({summary['samples_per_second']:.0f} samples/s); best {best['name']} "
        f"{select}_acc={best.get(f'{select}_acc', float('nan')):.4f} -> {out}", quiet=not progress)


def _postfix(records: list[MemberRecord]) -> str:
    scored = [(r.best or {}).get("score", float("nan")) for r in records]
    scored = sorted((s for s in scored if not math.isnan(s)), reverse=True)[:3]
    return "best " + ", ".join(f"{s:.3f}" for s in scored) if scored else ""


def _record_epoch(out: Path, epoch: int, banks: list[MemberBank], records: list[MemberRecord],
                  rows: dict[str, dict[str, float]], configs: list[dict[str, Any]], select: str) -> None:
    """Append metrics, update best epochs and write the member checkpoints."""
    for rec, config in zip(records, configs):
        bank = banks[rec.bank]
        row = {"epoch": epoch + 1, **rows[rec.member.name]}
        alive = bool(bank.alive[rec.slot])
        row["status"] = "ok" if alive else "diverged"
        rec.history.append(row)
        mdir = out / "members" / safe_member_name(rec.member.name)
        mdir.mkdir(parents=True, exist_ok=True)
        weights = bank.member_state(rec.slot)
        score = row.get(f"{select}_acc")  # None when this epoch was not evaluated
        meta = {"epoch": str(epoch + 1)}
        if alive:
            write_tensors(mdir / "last.safetensors", weights, meta)
        if alive and score is not None and (rec.best is None or score > rec.best["score"]):
            rec.best = {"epoch": epoch + 1, "score": score, **{k: v for k, v in row.items() if k not in ("epoch", "status")}}
            write_tensors(mdir / "best.safetensors", weights, meta)
        write_json(mdir / "config.json", {**config, "best": rec.best, "status": row["status"],
                                          "diverged_at": bank.diverged_at[rec.slot]})


def records_history(records: list[MemberRecord]) -> dict[str, list[dict[str, Any]]]:
    return {r.member.name: r.history for r in records}


def _write_metrics(out: Path, records: list[MemberRecord]) -> None:
    lines = [json.dumps({"member": r.member.name, **row}) for r in records for row in r.history]
    tmp = out / f".metrics.jsonl.tmp{os.getpid()}"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out / "metrics.jsonl")


def _summary(out: Path, records: list[MemberRecord], banks: list[MemberBank], stats: dict[str, Any], select: str,
             t_start: float, rss_base: float, reader: CacheReader, device: torch.device,
             partial: bool = False) -> dict[str, Any]:
    members = []
    for r in records:
        last = r.history[-1] if r.history else {}
        bank = banks[r.bank]
        members.append({
            "name": r.member.name, "method": r.member.method,
            "config": {**r.member.method_config, **r.member.train.to_dict()},
            "metrics": {k: v for k, v in last.items() if k not in ("epoch", "status")},
            "best": r.best, "status": last.get("status", "ok"), "diverged_at": bank.diverged_at[r.slot],
            "params": bank.param_count(), "checkpoint": str(out / "members" / safe_member_name(r.member.name)),
            "train_seconds": stats["bank_seconds"][r.bank], "bank_size": len(bank),
        })
    best = None if partial else select_best(out, members, select)
    secs = max(stats["train_seconds"], 1e-9)
    summary = {
        "members": members, "best": best,
        "samples_per_second": stats["train_samples"] / secs,
        "wall_seconds": time.perf_counter() - t_start,
        "peak_rss_mb": peak_rss_mb(), "rss_baseline_mb": rss_base,
        "peak_rss_above_baseline_mb": peak_rss_mb() - rss_base,
        "reader": {"mode": reader.mode, "reason": reader.choice.reason, **reader.settings()},
        "device": str(device), "num_members": len(members), "num_banks": len(banks),
    }
    if device.type == "cuda":
        summary["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if partial:
        summary["part"] = {"select": select, "train_samples": stats["train_samples"],
                           "train_seconds": stats["train_seconds"]}
    return summary


def select_best(out: Path, members: list[dict[str, Any]], select: str) -> dict[str, Any]:
    """The best live member by its best ``<select>_acc`` (first in member order on ties); writes best.json."""
    alive = [m for m in members if m["status"] == "ok" and m["best"] is not None]
    if not alive:
        raise ConfigError(f"every member diverged (loss became NaN/Inf); see {out}/metrics.jsonl and lower --lr")
    top = max(alive, key=lambda m: m["best"]["score"])
    best = {"name": top["name"], f"{select}_acc": top["best"]["score"], "epoch": top["best"]["epoch"],
            "checkpoint": top["checkpoint"], "selected_by": f"{select}_acc"}
    write_json(out / "best.json", best)
    return best


# ---------------------------------------------------------------------------------------------
# Runs trained in parts (featcache.scale): prepare, then gather


def prepare_run(store: str | FeatureStore, members: list[SweepMember], out: str | os.PathLike[str],
                split: str = "train", eval_split: str | None = None, overwrite: bool = False,
                storage_options: dict[str, Any] | None = None) -> FeatureStore:
    """The checks ``train`` makes before writing anything, then a fresh RUNDIR holding sweep.json."""
    fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store, "r", storage_options)
    _eval_splits(fs, split, eval_split)
    _method_input(fs, fs.split(split), None)
    _prepare_rundir(Path(out), members, resume=False, overwrite=overwrite)
    return fs


def gather_parts(out: str | os.PathLike[str], members: list[SweepMember], parts: list[Path], t_start: float,
                 progress: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge part directories written by ``train(members=subset, partial=True)`` into RUNDIR.

    RUNDIR (made by ``prepare_run``) then holds what one local sweep of ``members`` writes: member
    directories, metrics.jsonl in member order, best.json, summary.json, curves.png (no state/).
    Timing and memory are aggregated over the parts (which ran in parallel); ``extra`` is added to
    the summary. Returns the summary.
    """
    out = Path(out)
    summaries = [json.loads((p / "summary.json").read_text()) for p in parts]
    entries: dict[str, dict[str, Any]] = {}
    history: dict[str, list[dict[str, Any]]] = {}
    for part, summary in zip(parts, summaries):
        for m in summary["members"]:
            name = safe_member_name(m["name"])  # from a part's summary.json: a name inside RUNDIR, never a path
            entries[name] = {**m, "checkpoint": str(out / "members" / name)}
            shutil.copytree(part / "members" / name, out / "members" / name, dirs_exist_ok=True)
        for line in (part / "metrics.jsonl").read_text().splitlines():
            row = json.loads(line)
            history.setdefault(row.pop("member"), []).append(row)
    missing = [m.name for m in members if m.name not in entries]
    if missing:
        raise CheckpointError(f"the parts of run {out} lack members {', '.join(missing)}; train again")
    records = [MemberRecord(m, -1, -1, history.get(m.name, []), entries[m.name]["best"]) for m in members]
    _write_metrics(out, records)
    select = summaries[0]["part"]["select"]
    ordered = [entries[m.name] for m in members]
    peak = max(summaries, key=lambda s: s["peak_rss_mb"])
    secs = max(max(s["part"]["train_seconds"] for s in summaries), 1e-9)
    summary = {
        "members": ordered, "best": select_best(out, ordered, select),
        "samples_per_second": sum(s["part"]["train_samples"] for s in summaries) / secs,
        "wall_seconds": time.perf_counter() - t_start,
        "peak_rss_mb": peak["peak_rss_mb"], "rss_baseline_mb": peak["rss_baseline_mb"],
        "peak_rss_above_baseline_mb": max(s["peak_rss_above_baseline_mb"] for s in summaries),
        "reader": summaries[0]["reader"], "device": summaries[0]["device"], "num_members": len(members),
        "num_banks": sum(s["num_banks"] for s in summaries),
    }
    cuda = [s["cuda_max_memory_allocated_mb"] for s in summaries if "cuda_max_memory_allocated_mb" in s]
    if cuda:
        summary["cuda_max_memory_allocated_mb"] = max(cuda)
    summary.update(extra or {})
    _finish(out, summary, records, select, progress)
    return summary
