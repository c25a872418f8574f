"""The evaluation plan of a run: which data chooses (validation) and which is only reported (the eval split).

Every choice a run makes (each member's best epoch, the sweep's best member) is made on validation data:
- ``--val-split NAME``: a stored split; else the store's ``val`` split when it has one; else
- a stratified, seeded ``--val-fraction`` of the training split held out of training (default 0.1): its
  image ids are recorded in RUNDIR/heldout.json, and ``--resume`` uses the recorded ones;
- ``--val-fraction 0`` (and no val split): no selection, the last epoch is taken (one member only).
The eval split (``--eval-split``, default ``test`` when the store has it) is evaluated every epoch and
reported for the selected epoch, never used to choose. Choosing on a split named ``test`` takes an explicit
``--select-on test``, and the summary then says so.

A split with several cached views (``extract --views K``) is scored on its eval view (view 0, the eval transform:
what ``predict`` computes), or with ``--tta`` on the mean logits of all K views (what ``predict --tta`` computes):
``view_scoring``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featcache.checkpoint import write_json
from featcache.errors import ConfigError, StoreError, UsageError
from featcache.store.feature_store import FeatureStore, SplitHandle

HELDOUT_FILE = "heldout.json"
VAL = "val"  # the metric prefix of the validation data, whichever split it comes from


@dataclass
class Evaluation:
    """The plan of a run's evaluations: the validation data (which selects) and the eval splits (reported)."""

    val_split: str | None  # the split the validation data comes from; None: no selection
    val_subset: np.ndarray | None = None  # held-out sample indices of the training split, or None (whole split)
    selected_on: str = "none (last epoch)"  # what the summary says selection used
    eval_splits: list[str] = field(default_factory=list)  # reported each evaluation, never selecting
    train_subset: np.ndarray | None = None  # training samples when some are held out

    @property
    def selects(self) -> bool:
        return self.val_split is not None

    def describe(self) -> dict[str, Any]:
        """For the summary and best.json: what selected, and the size of a held-out set."""
        out: dict[str, Any] = {"selected_on": self.selected_on}
        if self.val_subset is not None:
            out["heldout_size"] = int(len(self.val_subset))
        if self.selected_on == "test":
            out["warning"] = (
                "selected on the test split (--select-on test): its accuracy is an optimistic "
                "estimate, not a held-out result"
            )
        return out


def plan_evaluation(
    store: FeatureStore,
    train_split: str,
    *,
    val_split: str | None,
    val_fraction: float,
    select_on: str | None,
    eval_split: str | None,
    seed: int,
    rundir: Path,
    resume: bool,
) -> Evaluation:
    """Resolve the validation data and the eval splits of a run (refusals before anything is written)."""
    have = store.splits()
    if select_on is not None and val_split is not None:
        raise UsageError("--select-on and --val-split both name the selection split; give one")
    if val_split == "test":
        raise UsageError(
            "choosing epochs and members on the split named 'test' makes its accuracy optimistic; "
            "pass --select-on test if you mean it, or hold out validation data (--val-fraction)"
        )
    chosen = select_on or val_split or (VAL if VAL in have and VAL != train_split else None)
    for option, name in (("--select-on", select_on), ("--val-split", val_split), ("--eval-split", eval_split)):
        if name is not None:
            _require_split(store, name, train_split, option)
    evaluation = Evaluation(val_split=chosen, selected_on=chosen or "none (last epoch)")
    if chosen is None and val_fraction > 0:
        split = store.split(train_split)
        held = _held_out(split, val_fraction, seed, rundir, resume)
        rest = np.setdiff1d(split.completed_indices(), held)
        evaluation = Evaluation(
            val_split=train_split, val_subset=held, selected_on=f"{train_split}[held-out]", train_subset=rest
        )
    evals = [eval_split] if eval_split is not None else (["test"] if "test" in have and train_split != "test" else [])
    if VAL in evals and evaluation.val_split not in (None, VAL):
        raise UsageError(
            f"--eval-split {VAL} would be reported as val_acc, the name of the validation data "
            f"({evaluation.selected_on}); rename the split or pass it as --val-split {VAL}"
        )
    evaluation.eval_splits = evals
    return evaluation


@dataclass(frozen=True)
class ViewScoring:
    """How an evaluated split's cached views are scored: its eval view alone, or the mean logits of all its views
    (test-time augmentation, ``--tta``; the only choice for a multi-view split written before the eval view was
    kept, whose views are all training-transform draws)."""

    split: str
    views: int
    eval_view: int | None  # the view holding the eval transform; None: an old multi-view split (all training draws)
    seed: int  # the views' augmentation seed (what predict --tta draws with)
    all_views: bool  # True: mean logits over every view; False: the eval view alone

    def reader_options(self) -> dict[str, Any]:
        """``open_reader`` keywords that give this scoring's views."""
        if self.all_views:
            return {"all_views": True}
        return {"view": self.eval_view} if self.views > 1 else {}

    @property
    def scored_on(self) -> str:
        if self.views == 1:
            return "its one view (eval transform)"
        if not self.all_views:
            return f"view {self.eval_view} of {self.views} (eval transform)"
        if self.eval_view is None:
            return (
                f"mean logits of {self.views} training-transform views (split written before featcache kept an "
                "eval view)"
            )
        return f"mean logits of {self.views} views (view {self.eval_view} eval transform, the others training draws)"

    def describe(self) -> dict[str, Any]:
        """For the summary and member configs: the split's views and what the accuracy was measured on."""
        return {
            "split": self.split,
            "views": self.views,
            "eval_view": self.eval_view,
            "seed": self.seed,
            "tta": self.all_views and self.views > 1,
            "scored_on": self.scored_on,
        }


def view_scoring(split: SplitHandle, tta: bool) -> ViewScoring:
    """The eval view of ``split`` (view 0), or with ``tta`` the mean over all its views; an old multi-view split
    (no eval view recorded) is scored on the mean of its training-transform views either way."""
    meta = split.meta
    eval_view = meta.eval_view_index
    return ViewScoring(
        split.name, meta.views, eval_view, meta.seed, all_views=meta.views > 1 and (tta or eval_view is None)
    )


def old_views_warning(scoring: ViewScoring, store_url: str) -> str | None:
    """The warning for a multi-view split without an eval view (what its accuracy means, how to fix it), or None."""
    if scoring.views == 1 or scoring.eval_view is not None:
        return None
    return (
        f"split {scoring.split!r} of {store_url} was extracted before featcache kept an eval-transform view: its "
        f"{scoring.views} views are all training-transform draws, so it is scored on the mean of their logits, "
        "which `featcache predict --tta` reproduces; `featcache predict` without --tta uses the eval transform "
        "and will differ from it. Extract the split again (--overwrite) to get view 0 in the eval transform"
    )


def tta_record(scorings: dict[str, ViewScoring]) -> dict[str, Any] | None:
    """The views ``predict --tta`` recomputes: those of the first reported split with several views, else of the
    validation data's split; None when no evaluated split has more than one view."""
    ordered = [s for name, s in scorings.items() if name != VAL] + [s for name, s in scorings.items() if name == VAL]
    for s in ordered:
        if s.views > 1:
            return {"split": s.split, "views": s.views, "seed": s.seed, "eval_view": s.eval_view}
    return None


def _require_split(store: FeatureStore, name: str, train_split: str, option: str) -> None:
    if name not in store.splits():
        raise StoreError(
            f"{option} {name!r} is not in {store.url} (splits: {', '.join(store.splits())}); extract "
            f"it with featcache extract ... --split {name}"
        )
    if name == train_split:
        raise UsageError(
            f"{option} {name!r} is the training split; evaluate on another one (or hold out validation "
            "data with --val-fraction)"
        )


def check_classes(store: FeatureStore, train_split: str, others: list[str]) -> None:
    """Every evaluated split must name its classes as the training split does (label k = the same class)."""
    want = store.split(train_split).meta.classes
    for name in others:
        have = store.split(name).meta.classes
        if want and have and list(want) != list(have):
            raise StoreError(
                f"split {name!r} has classes {have} but the training split {train_split!r} has {want}; "
                "its labels mean other classes: extract both from data with the same class folders"
            )


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Positions (sorted) of a seeded, class-stratified ``fraction`` of ``labels``: round(fraction * n_c) per
    class, at least one of a class with two or more samples. Written here because scikit-learn's
    train_test_split refuses classes with a single sample, which stay in training here."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = int(round(fraction * len(members)))
        k = min(max(k, 1 if len(members) > 1 else 0), len(members) - 1)
        picked.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def _held_out(split: SplitHandle, fraction: float, seed: int, rundir: Path, resume: bool) -> np.ndarray:
    """The held-out sample indices: recorded in RUNDIR on resume, else drawn from the completed samples."""
    path = rundir / HELDOUT_FILE
    if resume and path.is_file():
        return _recorded_held_out(split, path)
    done = split.completed_indices()
    held = done[stratified_holdout(split.labels()[done], fraction, seed)]
    if len(held) == 0:
        raise UsageError(
            f"--val-fraction {fraction} of the {len(done)} training images holds out none; raise it, "
            "pass --val-split, or --val-fraction 0 to train without selection"
        )
    return held


def _recorded_held_out(split: SplitHandle, path: Path) -> np.ndarray:
    try:
        recorded = json.loads(path.read_text())
        ids = [str(i) for i in recorded["ids"]]
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise ConfigError(f"--resume: {path} is damaged ({err}); start a new --out") from None
    position = {v: i for i, v in enumerate(split.ids())}
    missing = [i for i in ids if i not in position]
    if missing:
        raise ConfigError(
            f"--resume: the held-out images recorded in {path} (e.g. {missing[0]!r}) are not in split "
            f"{split.name!r}; resume with the store the run started on"
        )
    return np.sort(np.asarray([position[i] for i in ids], dtype=np.int64))


def record_held_out(evaluation: Evaluation, split: SplitHandle, rundir: Path, fraction: float, seed: int) -> None:
    """RUNDIR/heldout.json: the held-out images' ids (what --resume and readers of the run rely on)."""
    if evaluation.val_subset is None or (rundir / HELDOUT_FILE).is_file():  # a resumed run keeps its record
        return
    ids = split.ids()
    write_json(
        rundir / HELDOUT_FILE,
        {
            "split": split.name,
            "fraction": fraction,
            "seed": seed,
            "size": int(len(evaluation.val_subset)),
            "ids": [ids[int(i)] for i in evaluation.val_subset],
        },
    )
