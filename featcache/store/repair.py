"""``extract --resume --repair``: find the damaged shards of a split and make a resume recompute them.

``plan_repair`` reads every chunk of the split (``SplitVerifier``: checksums, sizes, missing objects,
completion records, label ranges) and maps each problem to the shard whose recomputation fixes it;
``RepairPlan.apply`` clears those shards' completion records (and rewrites the backbone's final
norm when it is damaged). The resume that follows computes exactly the shards without a record,
from the same batches as before, so a repaired split equals an undamaged one. Damage that no
recomputation fixes (an array's metadata, a missing array) is refused before anything is written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from zarr.core.sync import sync

from featcache.errors import StoreError

from .feature_store import BACKBONE_GROUP, COMPLETE, SplitHandle
from .verify import SplitVerifier, VerifyReport, _verify_backbone

log = logging.getLogger(__name__)


@dataclass
class RepairPlan:
    """What ``--repair`` found in one split and what it recomputes."""

    split: str
    damaged_shards: list[int] = field(default_factory=list)
    final_norm: bool = False  # the backbone's final norm must be rewritten
    intact: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # completed and undamaged shards
    problems: list[str] = field(default_factory=list)

    def apply(self, split: SplitHandle, final_norm: dict[str, torch.Tensor] | None) -> None:
        """Clear the damaged shards' completion records; rewrite the final norm (caller holds the split's lock)."""
        if self.final_norm:
            if final_norm is None:
                raise StoreError(
                    f"the backbone's final norm in {split.store.url} is damaged and this backbone has "
                    "none to rewrite it with; re-extract the store"
                )
            split.store.write_final_norm(final_norm)
        for k in self.damaged_shards:
            split.set_complete(k, False)  # first: a crash from here on leaves the shard to any later resume
            _delete_shard_objects(split, k)  # zarr reads an old shard before overwriting it: damaged bytes must go
        split.repaired_shards = list(self.damaged_shards)
        if self.damaged_shards or self.final_norm:
            shards = ", ".join(map(str, self.damaged_shards)) or "none"
            log.warning(
                "repair: split %r of %s: %d problem(s) found; recomputing shard(s) %s%s",
                self.split,
                split.store.url,
                len(self.problems),
                shards,
                " and rewriting the backbone's final norm" if self.final_norm else "",
            )
        else:
            log.info("repair: split %r of %s: no damage found", self.split, split.store.url)


def _delete_shard_objects(split: SplitHandle, shard: int) -> None:
    store = split.group.store
    for name, key in split.shard_keys(shard).items():
        if name != COMPLETE:
            sync(store.delete(key))


def plan_repair(split: SplitHandle, check_final_norm: bool = True) -> RepairPlan:
    """Read the whole split and decide which shards to recompute; unrepairable damage is a ``StoreError``."""
    report = VerifyReport(split.store.url)
    if check_final_norm and split.store.manifest.final_norm:
        _verify_backbone(split.store, report)
    verifier = SplitVerifier(split, report)
    arrays = verifier.check_metadata()
    plan = RepairPlan(split.name)
    if COMPLETE in arrays:
        done = verifier.check_completion(arrays[COMPLETE])
        for name, arr in arrays.items():
            if name != COMPLETE:
                verifier.check_data(name, arr, done)
    else:
        done = np.zeros(split.meta.num_shards, dtype=bool)
    damaged: set[int] = set()
    fatal: list[str] = []
    for p in report.problems:
        if p.severity != "error":
            continue
        plan.problems.append(str(p))
        if p.array is not None and p.array.startswith(BACKBONE_GROUP):
            plan.final_norm = True
        elif p.shard is not None:
            damaged.add(p.shard)
        else:
            fatal.append(str(p))
    if fatal:
        more = f" (and {len(fatal) - 1} more)" if len(fatal) > 1 else ""
        raise StoreError(
            f"cannot repair split {split.name!r} of {split.store.url}: {fatal[0]}{more}; recomputing "
            "shards does not fix this: re-extract the split with --overwrite"
        )
    plan.damaged_shards = sorted(damaged)
    intact = done.copy()
    intact[plan.damaged_shards] = False
    plan.intact = intact
    return plan


__all__ = ["RepairPlan", "plan_repair"]
