"""Train side networks from a cache: one pass over the store per epoch feeds every sweep member.

Never loads or runs the backbone. ``train(store, method, out, settings, grid, options)`` trains the
members of the sweep (``featcache.sweep``) on the taps of ``options.split`` and writes RUNDIR
(``featcache.rundir``: checkpoints, metrics, best member, curves, summary, resumable state).

``train`` is three steps, public so that a sweep spread over dask workers runs the same ones
(``featcache.distributed.training``): ``plan_run`` (every check, nothing written), ``train_members``
(the epochs, into RUNDIR) and ``finish_run`` (the best member and the summary, over one or more parts).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from featcache.allocator import keep_freed_memory
from featcache.checkpoint import member_config, write_json, write_tensors
from featcache.device import resolve_device
from featcache.errors import CheckpointError, ConfigError, Interrupted, StoreError, UsageError
from featcache.manifest import TapInfo
from featcache.methods.base import MethodInput
from featcache.options import TrainOptions
from featcache.progress import bar, say
from featcache.store.feature_store import FeatureStore, SplitHandle
from featcache.store.reader import CacheReader, open_reader

from .augment import AugmentConfig, AugmentedBatch, FeatureStats, augment, batch_generator
from .evaluation_plan import (
    VAL,
    Evaluation,
    ViewScoring,
    check_classes,
    old_views_warning,
    plan_evaluation,
    record_held_out,
    tta_record,
    view_scoring,
)
from .feature_stats import run_feature_stats, save_feature_stats
from .halving import HalvingPlan, rank
from .member_bank import MemberBank
from .rundir import RunDir, holds_run_lock
from .sweep import SweepMember, TrainConfig, expand, group_banks
from .tensorboard_log import TensorBoardLog, open_tensorboard, use_tensorboard

log = logging.getLogger("featcache.training")


@dataclass
class MemberRecord:
    """Running metrics of one member."""

    member: SweepMember
    bank: int
    slot: int
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    stopped_at: int | None = None  # the halving rung (epoch) at which it stopped and left its bank
    diverged_at: str | None = None  # kept from the bank when it leaves it

    @property
    def in_play(self) -> bool:
        """Still in its bank (not stopped by a halving rung)."""
        return self.stopped_at is None


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def training_sampler(
    split: SplitHandle, subset: np.ndarray | None, seed: int = 0
) -> Callable[[list[str], int], tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``(taps, n) -> ({tap: (n, T, C)}, labels)``: n training samples of ``split`` (only rows of ``subset`` when
    given, i.e. never held-out validation rows), shuffled by ``seed``; read only when called (LST's Fisher init)."""

    def sample(taps: list[str], n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        reader = open_reader(split, taps, "stream", batch_size=n, shuffle=True, seed=seed, subset=subset)
        batch = next(iter(reader.epoch(0)))
        return batch.taps, batch.labels

    return sample


def _method_input(
    store: FeatureStore,
    split: SplitHandle,
    backbone_state: Callable[[], dict] | None,
    train_subset: np.ndarray | None = None,
) -> MethodInput:
    done = split.completed_indices()  # readers use completed shards only; the others hold no labels yet
    if len(done) == 0:
        raise StoreError(
            f"split {split.name!r} of {store.url} has no completed shard yet; finish the extraction "
            "(featcache extract --resume) first"
        )
    if len(done) < split.num_samples:
        log.warning(
            f"split {split.name!r} of {store.url} is incomplete: training on the {len(done)} of "
            f"{split.num_samples} images in completed shards; finish it with featcache extract --resume"
        )
    split.require_objects("labels", np.unique(done // split.meta.shard_images))
    labels = split.labels()[done]
    if labels.min() < 0:
        raise StoreError(f"split {split.name!r} has unlabelled images (label -1); train needs labelled data")
    classes = split.meta.classes
    if classes and labels.max() >= len(classes):
        first = int(done[int(labels.argmax())])
        raise StoreError(
            f"split {split.name!r} of {store.url} holds label {int(labels.max())} (image {first}) but "
            f"has {len(classes)} classes; the store is damaged: run featcache inspect --verify, then "
            "featcache extract --resume --repair"
        )
    num_classes = max(len(classes), int(labels.max()) + 1)
    if num_classes < 2:
        raise StoreError(f"split {split.name!r} has {num_classes} class(es); training a classifier needs at least 2")
    return MethodInput(
        taps=store.manifest.taps,
        num_classes=num_classes,
        final_norm=store.final_norm(),
        backbone_kind=store.manifest.backbone.get("kind", "vit"),
        backbone_state=functools.cache(backbone_state) if backbone_state else None,
        backbone_heads=store.manifest.backbone.get("num_heads"),
        training_sample=training_sampler(split, train_subset),
    )


def _evaluate(banks: list[MemberBank], reader: CacheReader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per bank: (summed loss (K,), correct (K,)) over the whole split."""
    sums = [(torch.zeros(len(b), device=b.device), torch.zeros(len(b), device=b.device)) for b in banks]
    if not any(len(b) for b in banks):
        return sums
    for batch in reader.epoch(0):
        for (loss, correct), bank in zip(sums, banks):
            if len(bank) == 0:  # every member of it stopped at a halving rung
                continue
            l, c, _ = bank.evaluate(batch.taps, batch.labels, batch.views)
            loss += l
            correct += c
    return sums


def _build_banks(
    members: list[SweepMember], mi: MethodInput, device: torch.device
) -> tuple[list[MemberBank], list[MemberRecord]]:
    """One bank per (method, architecture) (``group_banks``); records in member order point to their bank and slot."""
    groups = group_banks(members)
    banks = [MemberBank(group, mi, device) for group in groups]
    records = [MemberRecord(m, b, s) for b, group in enumerate(groups) for s, m in enumerate(group)]
    records.sort(key=lambda r: members.index(r.member))
    return banks, records


def _augmented(
    batch: Any,
    cfg: AugmentConfig,
    infos: dict[str, TapInfo],
    seed: int,
    epoch: int,
    step: int,
    done: dict[AugmentConfig, AugmentedBatch],
    feature_stats: FeatureStats | None,
) -> AugmentedBatch:
    """The batch as the banks with feature augmentation ``cfg`` see it: drawn once per (cfg, step) from a
    generator seeded by (seed, epoch, step), so a resumed run sees the same augmented batches; FroFA's channel
    ranges are the run's ``feature_stats``, never the batch's."""
    if cfg not in done:
        done[cfg] = augment(batch.taps, batch.labels, infos, cfg, batch_generator(seed, epoch, step), feature_stats)
    return done[cfg]


def _train_epoch(
    epoch: int,
    banks: list[MemberBank],
    records: list[MemberRecord],
    reader: CacheReader,
    epochs: int,
    stats: dict[str, Any],
    pbar: Any,
    feature_stats: FeatureStats | None = None,
) -> dict[str, dict[str, float]]:
    """One pass over the cache feeding every bank the same batches (augmented per bank's feature augmentation);
    per-member train loss and accuracy."""
    device = banks[0].device
    sums = [(torch.zeros(len(b), device=device), torch.zeros(len(b), device=device)) for b in banks]
    augs = [b.augment for b in banks]
    infos, seed = {t.name: t for t in reader.split.store.manifest.taps}, records[0].member.train.seed
    t0, seen = time.perf_counter(), 0
    for step, batch in enumerate(reader.epoch(epoch)):
        at, done = epoch + step / len(reader), {}
        for i, ((loss_sum, correct_sum), bank) in enumerate(zip(sums, banks)):
            if len(bank) == 0:  # every member of it stopped at a halving rung
                continue
            tb = time.perf_counter()
            ab = _augmented(batch, augs[i], infos, seed, epoch, step, done, feature_stats)
            loss, correct = bank.train_step(
                ab.taps,
                ab.labels,
                at,
                epochs,
                where=f"epoch {epoch + 1} step {step + 1}",
                labels_b=ab.labels_b,
                lam=ab.lam,
            )
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
    return {
        r.member.name: {
            "train_loss": float(sums[r.bank][0][r.slot] / seen),
            "train_acc": float(sums[r.bank][1][r.slot] / seen),
        }
        for r in records
        if r.in_play
    }


def _eval_epoch(
    banks: list[MemberBank],
    records: list[MemberRecord],
    readers: dict[str, CacheReader],
    rows: dict[str, dict[str, float]],
) -> None:
    """Add ``<split>_acc`` and ``<split>_loss`` of every member to ``rows``."""
    for name, rd in readers.items():
        res = _evaluate(banks, rd)
        for r in (r for r in records if r.in_play):
            rows[r.member.name][f"{name}_acc"] = float(res[r.bank][1][r.slot] / rd.num_samples)
            rows[r.member.name][f"{name}_loss"] = float(res[r.bank][0][r.slot] / rd.num_samples)


def resolve_train_options(options: TrainOptions | None, overrides: dict[str, Any]) -> TrainOptions:
    """``options`` with ``overrides`` replacing fields, validated (an unknown name: an error listing the valid ones)."""
    opts = dataclasses.replace(options or TrainOptions(), **overrides)
    use_tensorboard(opts.tensorboard)  # True without the package: MissingDependencyError
    return opts


@holds_run_lock
def train(
    store: str | FeatureStore,
    method: str | list[SweepMember],
    out: str | os.PathLike[str],
    settings: dict[str, Any] | None = None,
    grid: dict[str, list[Any]] | None = None,
    options: TrainOptions | None = None,
    *,
    backbone_state: Callable[[], dict] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train every member of the sweep from the cache; returns the summary (also RUNDIR/summary.json).

    ``method`` with ``settings`` and ``grid`` makes the sweep (``featcache.sweep.expand``), or ``method``
    is the list of members itself. ``overrides`` replace fields of ``options``
    (``train(store, "last", out, progress=False)``). ``backbone_state``: a callable returning the
    backbone's state dict, for initialisations that copy it (LST's pruning).
    """
    opts = resolve_train_options(options, overrides)
    members = method if isinstance(method, list) else expand(method, settings, grid)
    run = plan_run(store, members, out, opts, backbone_state)
    return finish_run(run, [train_members(run)])


@dataclass
class PlannedRun:
    """A run checked before anything is written (``plan_run``): ``train_members`` trains it (or parts of it,
    each planned on its own), ``finish_run`` summarizes it."""

    store: FeatureStore
    members: list[SweepMember]
    rundir: RunDir
    evaluation: Evaluation
    method_input: MethodInput
    options: TrainOptions
    started: float  # time.perf_counter() at the start of the checks: wall_seconds count from here
    rss_baseline_mb: float
    halving: HalvingPlan | None = None  # --halving: the rungs (featcache.halving)


def plan_run(
    store: str | FeatureStore,
    members: list[SweepMember],
    out: str | os.PathLike[str],
    opts: TrainOptions,
    backbone_state: Callable[[], dict] | None = None,
) -> PlannedRun:
    """Every check of the store, the sweep and RUNDIR that needs no training; nothing is written."""
    keep_freed_memory()  # large tensors reuse heap pages instead of faulting fresh ones (allocator.py)
    started, rss_base = time.perf_counter(), rss_mb()
    store = store if isinstance(store, FeatureStore) else FeatureStore.open(store, "r", opts.storage_options)
    store.split(opts.split)  # an unknown training split: StoreError
    rundir = RunDir(out, members, opts.resume, opts.overwrite)  # every refusal first, nothing written
    evaluation = plan_evaluation(
        store,
        opts.split,
        val_split=opts.val_split,
        val_fraction=opts.val_fraction,
        select_on=opts.select_on,
        eval_split=opts.eval_split,
        seed=opts.val_seed,
        rundir=rundir.path,
        resume=opts.resume,
    )
    if not evaluation.selects and len(members) > 1:
        raise ConfigError(
            f"a sweep of {len(members)} members needs validation data to choose one: keep "
            "--val-fraction above 0, or pass --val-split"
        )
    check_classes(
        store, opts.split, [n for n in [evaluation.val_split, *evaluation.eval_splits] if n not in (None, opts.split)]
    )
    mi = _method_input(store, store.split(opts.split), backbone_state, evaluation.train_subset)
    rundir.check_store(store, opts.split)
    halving = (
        HalvingPlan.make(opts.halving, opts.halving_min_epochs, members[0].train.epochs, len(members))
        if opts.halving is not None
        else None
    )
    if rundir.state is not None:
        _check_resumed_halving(rundir, halving)  # before RUNDIR changes
    return PlannedRun(store, members, rundir, evaluation, mi, opts, started, rss_base, halving)


def train_members(run: PlannedRun) -> TrainedMembers:
    """Train the run's members into RUNDIR: member checkpoints and configs, metrics.jsonl, resumable state.

    Chooses no best member: ``finish_run`` does, over every part of a run (a run in one process is one part).
    """
    store, members, rundir, evaluation, mi, opts = (
        run.store,
        run.members,
        run.rundir,
        run.evaluation,
        run.method_input,
        run.options,
    )
    device = resolve_device(opts.device)
    banks, records = _build_banks(members, mi, device)
    mi.backbone_state, mi.training_sample = None, None  # LST's pruned init is done: free what it read
    mi.memo.clear()
    train_reader, eval_readers, scorings = _open_readers(store, banks, evaluation, opts, members[0].train, device)
    record = _evaluation_record(scorings, opts.tta)
    _check_resumed_tta(rundir, opts.tta)
    stats_of_features = _frofa_stats(store.split(opts.split), banks, evaluation, rundir, opts)
    record["feature_stats"] = stats_of_features[1] if stats_of_features is not None else None
    rundir.start()  # the cache read well (resident readers check every chunk): now RUNDIR may change
    record_held_out(evaluation, store.split(opts.split), rundir.path, opts.val_fraction, opts.val_seed)
    if stats_of_features is not None:
        save_feature_stats(rundir.path, *stats_of_features)
    stats: dict[str, Any] = {"train_seconds": 0.0, "train_samples": 0, "bank_seconds": [0.0] * len(banks)}
    if rundir.state is not None:
        saved, stats = rundir.load_state(banks)  # banks saved after a rung hold only the members in play
        for rec, rec_saved in zip(records, saved):
            rec.history, rec.best = rec_saved["history"], rec_saved["best"]
            rec.stopped_at, rec.diverged_at = rec_saved.get("stopped_at"), rec_saved.get("diverged_at")
        _reslot(banks, records)
        say(f"resuming {rundir.path} after epoch {rundir.first_epoch}", quiet=not opts.progress)
    say(
        f"training {len(members)} member(s) in {len(banks)} bank(s) on {train_reader.num_samples} samples "
        f"({', '.join(train_reader.taps)}), reader {train_reader.mode}: {train_reader.choice.reason}; selecting on "
        f"{evaluation.selected_on}",
        quiet=not opts.progress,
    )
    tensorboard = open_tensorboard(opts.tensorboard, rundir.path, [m.name for m in members], rundir.first_epoch)
    loop = EpochLoop(
        rundir,
        banks,
        records,
        train_reader,
        eval_readers,
        evaluation,
        _member_configs(store, opts.split, banks, records, mi, record),
        tensorboard,
        stats_of_features[0] if stats_of_features is not None else None,
        run.halving,
    )
    try:
        loop.run(stats, opts.progress)
    except KeyboardInterrupt:
        saved_epochs, epochs = rundir.saved_epochs(), members[0].train.epochs
        kept = (
            f"it holds the state after epoch {saved_epochs} of {epochs}"
            if saved_epochs
            else "no epoch had finished, so it starts from the beginning"
        )
        raise Interrupted(
            f"interrupted: training in {rundir.path} stopped, {kept}; run the same featcache train "
            "command with --resume to continue"
        ) from None
    finally:
        if tensorboard is not None:
            tensorboard.close()
    return _trained(run, records, banks, stats, train_reader, device, record)


def _reslot(banks: list[MemberBank], records: list[MemberRecord]) -> None:
    """Point every member in play at its slot in its (possibly shrunk) bank; stopped members at none."""
    for r in records:
        names = [m.name for m in banks[r.bank].members]
        r.slot = names.index(r.member.name) if r.in_play else -1


def _check_resumed_halving(rundir: RunDir, halving: HalvingPlan | None) -> None:
    """A halving sweep resumes with the rungs it started with, and a plain sweep without rungs."""
    assert rundir.state is not None
    was = rundir.state.get("halving")
    now = halving.describe() if halving is not None else None
    if (was or {}).get("rungs") != (now or {}).get("rungs") or (was or {}).get("eta") != (now or {}).get("eta"):
        said = lambda h: f"--halving {h['eta']} (rungs at epochs {h['rungs']})" if h else "no --halving"  # noqa: E731
        raise UsageError(
            f"--resume: {rundir.path} was trained with {said(was)}, this command asks for {said(now)}; resume it with "
            "the --halving and --halving-min-epochs it started with, or start a new --out"
        )


def _open_readers(
    store: FeatureStore,
    banks: list[MemberBank],
    evaluation: Evaluation,
    opts: TrainOptions,
    cfg: TrainConfig,
    device: torch.device,
) -> tuple[CacheReader, dict[str, CacheReader], dict[str, ViewScoring]]:
    """The training reader (shuffled; held-out samples left out; one view per sample and epoch, drawn from all the
    cached views, the eval view among them) and the evaluation readers by metric prefix: ``val`` (the validation
    data) and each eval split, each on its eval view or, with ``--tta``, on all its views (``view_scoring``)."""
    needed = sorted({t for b in banks for t in b.required_taps}, key=store.manifest.tap_names.index)
    stream = opts.stream_options()
    train_reader = open_reader(
        store.split(opts.split),
        needed,
        opts.reader,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        device=device,
        subset=evaluation.train_subset,
        **stream,
    )
    scorings: dict[str, ViewScoring] = {}

    def evaluated(prefix: str, split: str, subset: Any = None) -> CacheReader:
        scorings[prefix] = scoring = view_scoring(store.split(split), opts.tta)
        warning = old_views_warning(scoring, store.url)
        if warning:
            log.warning(warning)
        return open_reader(
            store.split(split),
            needed,
            opts.reader,
            max(cfg.batch_size, 256),
            shuffle=False,
            device=device,
            subset=subset,
            **scoring.reader_options(),
            **stream,
        )

    readers = {VAL: evaluated(VAL, evaluation.val_split, evaluation.val_subset)} if evaluation.val_split else {}
    readers |= {name: evaluated(name, name) for name in evaluation.eval_splits}
    if opts.tta and not any(s.views > 1 for s in scorings.values()):
        log.warning(
            "--tta: no evaluated split holds more than one view per image (extract it with --views K), so "
            "there is nothing to average: each is scored on its one view"
        )
    return train_reader, readers, scorings


def _frofa_stats(
    split: SplitHandle, banks: list[MemberBank], evaluation: Evaluation, rundir: RunDir, opts: TrainOptions
) -> tuple[FeatureStats, dict[str, Any]] | None:
    """FroFA's per-channel ranges over the training samples' taps (``featcache.feature_stats``), when a bank uses
    ``frofa``: computed once before training (a resumed run loads the ones it recorded); None otherwise."""
    taps = sorted(
        {t for b in banks if "frofa" in b.members[0].train.augment().names for t in b.required_taps},
        key=split.store.manifest.tap_names.index,
    )
    if not taps:
        return None
    return run_feature_stats(split, taps, evaluation.train_subset, rundir.path, opts.resume, opts.stream_options())


def _check_resumed_tta(rundir: RunDir, tta: bool) -> None:
    """A resumed run scores its views as it started (``--tta`` or not): its epochs' accuracies must compare."""
    if not rundir.resume:
        return
    try:
        was = json.loads((rundir.member_dir(rundir.members[0].name) / "config.json").read_text())["evaluation"]["tta"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no epoch recorded yet, or a run from before the record
    if was != tta:
        raise UsageError(
            f"--resume: {rundir.path} was evaluated {'with' if was else 'without'} --tta; resume it "
            f"{'with' if was else 'without'} --tta, or start a new --out"
        )


def _evaluation_record(scorings: dict[str, ViewScoring], tta: bool) -> dict[str, Any]:
    """What the summary and every member's config record about the views evaluated: per metric prefix the split's
    views and what was scored, and the views ``predict --tta`` recomputes (``tta``)."""
    return {
        "evaluation": {"tta": tta, "splits": {k: s.describe() for k, s in scorings.items()}},
        "tta": tta_record(scorings),
    }


def _member_configs(
    store: FeatureStore,
    split: str,
    banks: list[MemberBank],
    records: list[MemberRecord],
    mi: MethodInput,
    extra: dict[str, Any],
) -> list[dict[str, Any]]:
    """Each member's checkpoint config: the bank's resolved method config ("auto" widths, heads, ... filled
    in, so that checkpoints rebuild exactly), its training config, the store it was trained on, and ``extra``
    (the evaluation record: views scored, what ``predict --tta`` recomputes)."""
    store_record = {"url": store.url, "split": split, "manifest": store.manifest.to_attrs()}
    classes = store.split(split).meta.classes
    return [
        {
            **member_config(
                r.member.name,
                r.member.method,
                banks[r.bank].template.config.to_dict(),
                r.member.train.to_dict(),
                mi,
                store_record,
                classes,
            ),
            **extra,
        }
        for r in records
    ]


@dataclass
class EpochLoop:
    """The epochs of one run: train every bank on the same batches, evaluate, record, save the state."""

    rundir: RunDir
    banks: list[MemberBank]
    records: list[MemberRecord]
    train_reader: CacheReader
    eval_readers: dict[str, CacheReader]
    evaluation: Evaluation  # which readers' accuracy picks each member's best epoch
    configs: list[dict[str, Any]]  # per member, for its checkpoint
    tensorboard: TensorBoardLog | None = None  # the same rows as event files, plus the lr at the epoch's end
    feature_stats: FeatureStats | None = None  # FroFA's channel ranges over the training features (frofa banks)
    halving: HalvingPlan | None = None  # --halving: rank at its rungs, stop the losers

    def run(self, stats: dict[str, Any], progress: bool) -> None:
        cfg = self.records[0].member.train
        first, steps = self.rundir.first_epoch, len(self.train_reader)
        with bar(cfg.epochs * steps, "train", unit="step", progress=progress, initial=first * steps) as pbar:
            for epoch in range(first, cfg.epochs):
                torch.manual_seed(cfg.seed * 1000 + epoch)  # any randomness inside side networks: fixed per epoch
                rows = _train_epoch(
                    epoch, self.banks, self.records, self.train_reader, cfg.epochs, stats, pbar, self.feature_stats
                )
                rung = self.halving is not None and epoch + 1 in self.halving.rungs
                if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs or rung:
                    _eval_epoch(self.banks, self.records, self.eval_readers, rows)
                _record_epoch(self.rundir, epoch, self.banks, self.records, rows, self.configs, self.evaluation.selects)
                # TensorBoard before the commit point: an epoch interrupted after this is logged again on resume and
                # its first copy dropped (TensorBoardLog's purge_step)
                if self.tensorboard is not None:
                    for r in (r for r in self.records if r.in_play):
                        lr = self.banks[r.bank].lr_at(epoch + 1, cfg.epochs)[r.slot]
                        self.tensorboard.log_epoch(r.member.name, epoch + 1, {**r.history[-1], "lr": float(lr)})
                if rung:
                    assert self.halving is not None
                    _halve(self.rundir, epoch + 1, self.halving, self.banks, self.records, self.configs, progress)
                saved = [
                    {"history": r.history, "best": r.best, "stopped_at": r.stopped_at, "diverged_at": r.diverged_at}
                    for r in self.records
                ]
                extra = {"halving": self.halving.describe()} if self.halving is not None else None
                self.rundir.save_state(epoch, self.banks, saved, stats, extra)  # the epoch's commit point
                _write_metrics(self.rundir, self.records)
                pbar.set_postfix_str(_postfix(self.records), refresh=True)


def _postfix(records: list[MemberRecord]) -> str:
    scored = [(r.best or {}).get("score") for r in records]
    scored = sorted((s for s in scored if s is not None and not math.isnan(s)), reverse=True)[:3]
    return "best val " + ", ".join(f"{s:.3f}" for s in scored) if scored else ""


def _halve(
    rundir: RunDir,
    epoch: int,
    plan: HalvingPlan,
    banks: list[MemberBank],
    records: list[MemberRecord],
    configs: list[dict[str, Any]],
    progress: bool = True,
) -> None:
    """A rung at the end of ``epoch``: rank the members in play on validation (``halving.rank``), keep the best
    ``ceil(n / ETA)``, stop the others (their rung row, status and config.json say so; their checkpoints stay) and
    drop them from their banks, so that the next steps cost what the survivors cost."""
    playing = [r for r in records if r.in_play]
    order = rank([(r.member.name, r.history[-1], not bool(banks[r.bank].alive[r.slot])) for r in playing])
    kept = set(order[: plan.survivors(len(playing))])
    for rec in playing:
        rec.history[-1]["rung"] = plan.rungs.index(epoch) + 1
        if rec.member.name in kept:
            continue
        rec.stopped_at, rec.diverged_at = epoch, banks[rec.bank].diverged_at[rec.slot]
        if rec.history[-1]["status"] == "ok":
            rec.history[-1]["status"] = "stopped"
        status = {"status": rec.history[-1]["status"], "diverged_at": rec.diverged_at, "stopped_at": epoch}
        write_json(
            rundir.member_dir(rec.member.name) / "config.json",
            {**configs[records.index(rec)], "best": rec.best, **status},
        )
    for i, bank in enumerate(banks):
        bank.keep([r.slot for r in records if r.bank == i and r.in_play])
    _reslot(banks, records)
    say(
        f"halving rung {plan.rungs.index(epoch) + 1} (epoch {epoch}): kept {len(kept)} of {len(playing)} members on "
        f"validation: {', '.join(n for n in order if n in kept)}",
        quiet=not progress,
    )


def _record_epoch(
    rundir: RunDir,
    epoch: int,
    banks: list[MemberBank],
    records: list[MemberRecord],
    rows: dict[str, dict[str, float]],
    configs: list[dict[str, Any]],
    selects: bool,
) -> None:
    """Append metrics, update best epochs (by val_acc; without validation data the latest epoch) and write the
    member checkpoints."""
    for rec, config in zip(records, configs):
        if not rec.in_play:
            continue
        bank = banks[rec.bank]
        row = {"epoch": epoch + 1, **rows[rec.member.name]}
        alive = bool(bank.alive[rec.slot])
        row["status"] = "ok" if alive else "diverged"
        rec.history.append(row)
        mdir = rundir.member_dir(rec.member.name)
        mdir.mkdir(parents=True, exist_ok=True)
        weights = bank.member_state(rec.slot)
        score = row.get(f"{VAL}_acc")  # None when this epoch was not evaluated
        better = (score is not None and (rec.best is None or score > rec.best["score"])) if selects else True
        meta = {"epoch": str(epoch + 1)}
        if alive:
            write_tensors(mdir / "last.safetensors", weights, meta)
        if alive and better:
            rec.best = {
                "epoch": epoch + 1,
                "score": score,
                **{k: v for k, v in row.items() if k not in ("epoch", "status")},
            }
            write_tensors(mdir / "best.safetensors", weights, meta)
        write_json(
            mdir / "config.json",
            {
                **config,
                "best": rec.best,
                "status": row["status"],
                "diverged_at": bank.diverged_at[rec.slot],
                "stopped_at": None,
            },
        )


def _write_metrics(rundir: RunDir, records: list[MemberRecord]) -> None:
    rundir.write_metrics([{"member": r.member.name, **row} for r in records for row in r.history])


@dataclass
class TrainedMembers:
    """What ``train_members`` measured over its members, before a best member is chosen: the input of
    ``finish_run`` (picklable: parts trained on dask workers send it back, featcache.distributed.training)."""

    members: list[dict[str, Any]]  # the summary's member entries, in member order
    history: dict[str, list[dict[str, Any]]]  # per member, its metrics.jsonl rows
    selection: dict[str, Any]  # how the best epoch and member are chosen (Evaluation.describe)
    records: dict[str, Any]  # evaluation, tta, feature_stats: run-wide, every member's config.json repeats them
    train_samples: int
    train_seconds: float
    num_banks: int
    reader: dict[str, Any]
    device: str
    peak_rss_mb: float
    rss_baseline_mb: float
    cuda_max_memory_allocated_mb: float | None = None
    halving: dict[str, Any] | None = None  # the plan and, per rung, who was kept and who stopped


def _trained(
    run: PlannedRun,
    records: list[MemberRecord],
    banks: list[MemberBank],
    stats: dict[str, Any],
    reader: CacheReader,
    device: torch.device,
    record: dict[str, Any],
) -> TrainedMembers:
    members = []
    for r in records:
        last = r.history[-1] if r.history else {}
        bank = banks[r.bank]
        members.append(
            {
                "name": r.member.name,
                "method": r.member.method,
                "config": {**r.member.method_config, **r.member.train.to_dict()},
                "metrics": {k: v for k, v in last.items() if k not in ("epoch", "status")},
                "best": r.best,
                "status": last.get("status", "ok"),
                "diverged_at": bank.diverged_at[r.slot] if r.in_play else r.diverged_at,
                "stopped_at": r.stopped_at,
                "params": bank.param_count(),
                "checkpoint": str(run.rundir.member_dir(r.member.name)),
                "train_seconds": stats["bank_seconds"][r.bank],
                "bank_size": len(bank),
            }
        )
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return TrainedMembers(
        members,
        {r.member.name: r.history for r in records},
        {**run.evaluation.describe(), "selects": run.evaluation.selects},
        record,
        stats["train_samples"],
        stats["train_seconds"],
        len(banks),
        {"mode": reader.mode, "reason": reader.choice.reason, **reader.settings()},
        str(device),
        peak_rss_mb(),
        run.rss_baseline_mb,
        cuda,
        _halving_record(run.halving, records, stats),
    )


def _halving_record(
    plan: HalvingPlan | None, records: list[MemberRecord], stats: dict[str, Any]
) -> dict[str, Any] | None:
    """The summary's ``halving``: the plan, and per rung the members in play, kept and stopped (from the records,
    so a resumed run reports the rungs it passed before the interruption), and the member-epochs trained."""
    if plan is None:
        return None
    rungs = []
    for i, epoch in enumerate(plan.rungs):
        ranked = [r for r in records if any(row.get("rung") == i + 1 for row in r.history)]
        if ranked:
            rungs.append(
                {
                    "rung": i + 1,
                    "epoch": epoch,
                    "in_play": len(ranked),
                    "kept": [r.member.name for r in ranked if r.stopped_at != epoch],
                    "stopped": [r.member.name for r in ranked if r.stopped_at == epoch],
                }
            )
    member_epochs = sum(len(r.history) for r in records)
    return {
        **plan.describe(),
        "rung_results": rungs,
        "member_epochs": member_epochs,
        "member_epochs_full_grid": plan.members * plan.epochs,
    }


def finish_run(run: PlannedRun, parts: list[TrainedMembers], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """RUNDIR's metrics.jsonl (member order), best.json, summary.json and curves.png from the trained parts
    of ``run`` (one for a run in one process); returns the summary.

    Parts run in parallel: samples per second are all parts' samples over the longest part's training time,
    memory the largest part's. ``extra`` is added to the summary.
    """
    out = run.rundir.path
    entries = {m["name"]: m for p in parts for m in p.members}
    missing = [m.name for m in run.members if m.name not in entries]
    if missing:
        raise CheckpointError(f"the parts of run {out} lack members {', '.join(missing)}; train again")
    history = {name: rows for p in parts for name, rows in p.history.items()}
    run.rundir.write_metrics([{"member": m.name, **row} for m in run.members for row in history[m.name]])
    ordered = [{**entries[m.name], "checkpoint": str(run.rundir.member_dir(m.name))} for m in run.members]
    peak = max(parts, key=lambda p: p.peak_rss_mb)
    summary = {
        "members": ordered,
        "best": select_best(out, ordered, parts[0].selection, parts[0].halving),
        "samples_per_second": sum(p.train_samples for p in parts) / max(max(p.train_seconds for p in parts), 1e-9),
        "wall_seconds": time.perf_counter() - run.started,
        "peak_rss_mb": peak.peak_rss_mb,
        "rss_baseline_mb": peak.rss_baseline_mb,
        "peak_rss_above_baseline_mb": max(p.peak_rss_mb - p.rss_baseline_mb for p in parts),
        "reader": parts[0].reader,
        "device": parts[0].device,
        "num_members": len(run.members),
        "num_banks": sum(p.num_banks for p in parts),
    }
    cuda = [p.cuda_max_memory_allocated_mb for p in parts if p.cuda_max_memory_allocated_mb is not None]
    if cuda:
        summary["cuda_max_memory_allocated_mb"] = max(cuda)
    if parts[0].halving is not None:
        summary["halving"] = parts[0].halving  # one part: a halving sweep runs in one process
    summary.update({**parts[0].records, **(extra or {})})  # the run records are the same in every part
    write_json(out / "summary.json", summary)
    try:
        from featcache.plots import plot_curves

        rungs = list(run.halving.rungs) if run.halving is not None else None
        plot_curves({m.name: history[m.name] for m in run.members}, out / "curves.png", VAL, rungs)
    except Exception as err:  # a plot must never fail a finished run
        log.warning(f"could not draw curves.png: {err}")
    best = summary["best"]
    scores = "; ".join(f"{k}={v:.4f}" for k, v in best.items() if k.endswith("_acc") and k != "train_acc")
    say(
        f"trained {summary['num_members']} member(s) in {summary['wall_seconds']:.1f}s "
        f"({summary['samples_per_second']:.0f} samples/s); best {best['name']} epoch {best['epoch']} (selected on "
        f"{best['selected_on']}){': ' + scores if scores else ''} -> {out}",
        quiet=not run.options.progress,
    )
    return summary


def select_best(
    out: Path, members: list[dict[str, Any]], selection: dict[str, Any], halving: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The best member that did not diverge by its best val_acc (first in member order on ties; without
    validation data the only member's last epoch), with the accuracies of that epoch; writes best.json.

    In a halving sweep the members stopped at a rung compete with their best epoch up to the rung (they were
    ranked below the survivors there, so one of them wins only if a survivor's later epochs all score lower)."""
    alive = [m for m in members if m["status"] in ("ok", "stopped") and m["best"] is not None]
    if not alive:
        raise ConfigError(f"every member diverged (loss became NaN/Inf); see {out}/metrics.jsonl and lower --lr")
    top = max(alive, key=lambda m: m["best"]["score"]) if selection["selects"] else alive[0]
    scores = {k: v for k, v in top["best"].items() if k.endswith("_acc")}
    best = {
        "name": top["name"],
        "epoch": top["best"]["epoch"],
        **{k: v for k, v in selection.items() if k != "selects"},
        "selected_by": f"{VAL}_acc" if selection["selects"] else "last epoch",
        **scores,
        "checkpoint": top["checkpoint"],
    }
    if halving is not None:
        best["halving"] = {"eta": halving["eta"], "rungs": halving["rungs"], "stopped_at": top.get("stopped_at")}
    write_json(out / "best.json", best)
    return best
