"""A training run directory (RUNDIR): its files, its lifecycle and its lock.

  sweep.json          the members (method, method config, training config)
  metrics.jsonl       one line per member and evaluated epoch
  members/<name>/     best.safetensors, last.safetensors, config.json (featcache.checkpoint)
  best.json           the best member by the selection split
  curves.png          loss and accuracy curves of all members
  summary.json        the run's summary (``train --json`` prints it)
  state/              what ``--resume`` continues from (end of the last finished epoch)

``RunDir`` checks everything before anything is written (``RunDir(...)`` refuses a file, a non-empty
RUNDIR without --overwrite/--resume, a resume of another sweep or of a damaged state), writes only once
the cache has read well (``start``), and saves each epoch's end state as the commit point of the epoch
(a fresh state directory, then an atomic pointer update). ``RunLock`` (``holds_run_lock``) keeps two
trainings out of one RUNDIR: the split lock's mechanism (flock plus an owner record naming the process
that holds it), not ``filelock``, whose lock file carries no owner to name in the refusal.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

from featcache import __version__
from featcache.checkpoint import SUPPORTED_CHECKPOINT_FORMATS, read_tensors, safe_member_name, write_json, write_tensors
from featcache.errors import CheckpointError, FeatcacheError, FormatVersionError, StoreLockedError
from featcache.manifest import Manifest
from featcache.store.feature_store import FeatureStore
from featcache.store.lock import LockOwner, SplitLock

from .member_bank import MemberBank
from .sweep import SweepMember


class RunDir:
    """RUNDIR of one sweep: checked at construction (nothing written), then ``start``, then epoch states."""

    def __init__(
        self, path: str | os.PathLike[str], members: list[SweepMember], resume: bool = False, overwrite: bool = False
    ) -> None:
        self.path, self.members, self.resume, self.overwrite = Path(path), members, resume, overwrite
        self.sweep = [m.to_dict() for m in members]
        self.state = self._check()  # the saved end-of-epoch state to continue from (resume), else None

    def _check(self) -> dict[str, Any] | None:
        """Every refusal before any change; on resume, the saved state pointer (validated), if any."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"--out {out} is a file; choose a directory for the run")
        if not self.resume:
            if out.exists() and any(out.iterdir()) and not self.overwrite:
                raise CheckpointError(
                    f"run directory {out} already exists and is not empty; pass --resume to continue "
                    "it, --overwrite to replace it, or choose a new --out"
                )
            return None
        if not (out / "sweep.json").is_file():
            raise CheckpointError(f"--resume: {out} holds no featcache run (no sweep.json); drop --resume to start one")
        if _read_json(out / "sweep.json") != self.sweep:
            raise CheckpointError(
                f"--resume: {out} was started with a different sweep (methods, settings or grid); "
                "resume with the same options, or start a new --out"
            )
        pointer = out / "state" / "state.json"
        if not pointer.is_file():
            return None
        state = _read_json(pointer)
        # a name inside RUNDIR/state, never a path from the file: state.json is data, not a place to read or write
        if (
            not isinstance(state, dict)
            or not re.fullmatch(r"epoch-\d{4,}", str(state.get("dir", "")))
            or not isinstance(state.get("epoch"), int)
        ):
            raise CheckpointError(
                f"--resume: {pointer} is damaged (no valid epoch and state directory); start a new "
                "--out, or --overwrite this run"
            )
        return state

    @property
    def first_epoch(self) -> int:
        return self.state["epoch"] + 1 if self.state is not None else 0

    def check_store(self, store: FeatureStore, split: str) -> None:
        """A resumed run must read the store it started on (same backbone, weights, taps, dtype, split)."""
        if not self.resume:
            return
        config = self.member_dir(self.members[0].name) / "config.json"
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
            raise FormatVersionError(
                f"--resume: {self.path} was written with checkpoint format {version}; this "
                f"featcache ({__version__}) reads {SUPPORTED_CHECKPOINT_FORMATS}: resume it with "
                "the featcache that started it, or start a new --out"
            )
        try:
            theirs = Manifest.from_attrs(manifest, f"--resume: the store recorded in {config}")  # newer format: refused
        except FormatVersionError:
            raise
        except FeatcacheError:
            return
        if recorded.get("split") != split:
            raise CheckpointError(
                f"--resume: {self.path} was trained on split {recorded.get('split')!r}, this run reads "
                f"split {split!r}; resume with --split {recorded.get('split')}, or start a new --out"
            )
        mine, was = store.manifest.identity(), theirs.identity()
        for key in mine:
            if mine[key] != was[key]:
                raise CheckpointError(
                    f"--resume: {self.path} was trained on a store made with another {key} than "
                    f"{store.url} has; resume with the store it started on ({recorded.get('url')}), "
                    "or start a new --out"
                )

    def start(self) -> None:
        """The first write: a fresh RUNDIR holding sweep.json, or (resume) leftovers of a crash removed."""
        out = self.path
        if self.resume:
            for tmp in [
                *out.glob(".*.tmp*"),
                *out.glob("members/*/.*.tmp*"),
                *out.glob("state/.*.tmp*"),
                *out.glob("state/*/.*.tmp*"),
            ]:
                tmp.unlink(missing_ok=True)
            self._remove_states(keep=self.state["dir"] if self.state is not None else None)
            return
        if out.exists() and any(out.iterdir()):
            shutil.rmtree(out)  # --overwrite (checked at construction)
        (out / "members").mkdir(parents=True, exist_ok=True)
        write_json(out / "sweep.json", self.sweep)

    def member_dir(self, name: str) -> Path:
        return self.path / "members" / safe_member_name(name)

    def save_state(
        self,
        epoch: int,
        banks: list[MemberBank],
        records: list[dict[str, Any]],
        stats: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> None:
        """End-of-epoch state: a fresh directory, then an atomic pointer update, then old states removed.
        ``extra`` is kept in the pointer (a halving sweep's plan: ``--resume`` checks it)."""
        target = self.path / "state" / f"epoch-{epoch:04d}"
        target.mkdir(parents=True, exist_ok=True)
        infos = []
        for i, bank in enumerate(banks):
            tensors, info = bank.state()
            write_tensors(target / f"bank{i}.safetensors", tensors)
            infos.append(info)
        write_json(
            self.path / "state" / "state.json",
            {"epoch": epoch, "dir": target.name, "banks": infos, "stats": stats, "records": records, **(extra or {})},
        )
        self._remove_states(keep=target.name)

    def load_state(self, banks: list[MemberBank]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Load the saved banks; returns the saved per-member records ({history, best}) and run statistics."""
        assert self.state is not None
        target = self.path / "state" / self.state["dir"]
        try:
            for i, bank in enumerate(banks):
                bank.load_state(read_tensors(target / f"bank{i}.safetensors"), self.state["banks"][i])
            records = list(self.state["records"])
            if len(records) != len(self.members):
                raise IndexError(f"{len(records)} saved members for {len(self.members)}")
            return records, self.state["stats"]
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise CheckpointError(
                f"--resume: the saved state in {target} does not fit this sweep "
                f"({type(err).__name__}: {err}); start a new --out, or --overwrite this run"
            ) from None

    def saved_epochs(self) -> int:
        """Epochs whose end state RUNDIR/state holds (what --resume continues from)."""
        try:
            return int(json.loads((self.path / "state" / "state.json").read_text())["epoch"]) + 1
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """metrics.jsonl, rewritten whole (atomic)."""
        tmp = self.path / f".metrics.jsonl.tmp{os.getpid()}"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(tmp, self.path / "metrics.jsonl")

    def _remove_states(self, keep: str | None) -> None:
        for old in (self.path / "state").glob("epoch-*"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as err:
        raise CheckpointError(
            f"--resume: {path} is damaged ({err}); start a new --out, or --overwrite this run"
        ) from None


class RunLock(SplitLock):
    """One ``featcache train`` per run directory: ``.<RUNDIR name>.lock`` beside RUNDIR (so that
    ``--overwrite`` may delete RUNDIR itself), held with flock like a split's lock."""

    holder, work = "run directory's parent", "train"

    def __init__(self, rundir: str | os.PathLike[str]) -> None:
        rundir = Path(rundir).absolute()
        super().__init__(rundir.parent, rundir.name)
        self.rundir = rundir

    @property
    def where(self) -> str:
        return str(self._path())

    def _path(self) -> Path:
        return self.rundir.parent / f".{self.rundir.name}.lock"

    def _emptied_dirs(self, path: Path) -> tuple[Path, ...]:
        return ()

    def _refuse(self, owner: LockOwner | None, extra: str = "") -> StoreLockedError:
        who = owner.describe() if owner else "another process"
        return StoreLockedError(
            f"run directory {self.rundir} is being trained into by {who}{extra}; wait for it to "
            f"finish (or stop it), or choose another --out. If you are sure nothing is training "
            f"into it, delete {self.where}"
        )


def holds_run_lock(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` holding the ``RunLock`` of its ``out`` argument: one training per RUNDIR at a time."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with RunLock(signature.bind(*args, **kwargs).arguments["out"]):
            return fn(*args, **kwargs)

    return locked
