"""Successive halving over a sweep (``featcache train --halving ETA``): where the rungs fall and who survives one.

All members start together; at the end of each rung epoch the members still in play are ranked on the
validation data (``rank``) and the best ``ceil(n / ETA)`` go on, the others stop (featcache.training keeps
their checkpoints and curves and drops them from their bank). Every member keeps the schedule of a full run
(warm-up and cosine over all epochs), so a survivor is the model it would have been without halving.

Pure arithmetic (no torch): the plan is checked before anything is trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from featcache.errors import UsageError


def default_rungs(eta: int, epochs: int, members: int) -> list[int]:
    """Rungs at ``epochs / eta^(s - i)`` for i < s, with s = ceil(log_eta(members)) - 1 (at least 1): about ``eta``
    members reach the last epoch (27 members, ETA 3: rungs at E/9 and E/3, 27 -> 9 -> 3)."""
    s = 0
    while eta**s < members:
        s += 1
    s = max(1, s - 1)
    return sorted({max(1, round(epochs / eta ** (s - i))) for i in range(s)})


def geometric_rungs(eta: int, epochs: int, members: int, first: int) -> list[int]:
    """Rungs at ``first * eta^i`` before the last epoch, while more than one member is in play."""
    rungs, rung, alive = [], first, members
    while rung < epochs and alive > 1:
        rungs.append(rung)
        alive, rung = math.ceil(alive / eta), rung * eta
    return rungs


@dataclass(frozen=True)
class HalvingPlan:
    """The rung schedule of one halving sweep: ``rungs`` are 1-based epochs, each ranked after that epoch ends."""

    eta: int
    epochs: int
    members: int
    min_epochs: int | None  # as given (None: the default placement)
    rungs: tuple[int, ...]

    @classmethod
    def make(cls, eta: int, min_epochs: int | None, epochs: int, members: int) -> HalvingPlan:
        """The plan, or a UsageError naming what does not fit (one member, no rung before the last epoch)."""
        if members < 2:
            raise UsageError(
                f"--halving {eta} needs a sweep of more than one member (this one has {members}); add a --grid"
            )
        rungs = (
            default_rungs(eta, epochs, members)
            if min_epochs is None
            else geometric_rungs(eta, epochs, members, min_epochs)
        )
        rungs = [r for r in rungs if r < epochs]
        if not rungs:
            raise UsageError(
                f"--halving {eta}: no rung falls before the last epoch (--epochs {epochs}"
                + (f", --halving-min-epochs {min_epochs}" if min_epochs is not None else "")
                + "); train for more epochs or lower --halving-min-epochs"
            )
        return cls(eta, epochs, members, min_epochs, tuple(rungs))

    def survivors(self, in_play: int) -> int:
        """How many of ``in_play`` members go on past a rung."""
        return math.ceil(in_play / self.eta)

    def alive_per_epoch(self) -> list[int]:
        """Members trained in each epoch (1..epochs) when none diverges."""
        out, alive = [], self.members
        for epoch in range(1, self.epochs + 1):
            out.append(alive)
            if epoch in self.rungs:
                alive = self.survivors(alive)
        return out

    def predicted_fraction(self) -> float:
        """Member-epochs of the schedule over those of the full grid (27 members, ETA 3, rungs E/9, E/3: 7/27)."""
        return sum(self.alive_per_epoch()) / (self.members * self.epochs)

    def describe(self) -> dict[str, Any]:
        return {
            "eta": self.eta,
            "min_epochs": self.min_epochs,
            "rungs": list(self.rungs),
            "members_per_rung": [
                self.alive_per_epoch()[r - 1] for r in self.rungs
            ],  # in play when each rung ranks them
            "predicted_fraction": self.predicted_fraction(),
            "ranked_by": "val_acc at the rung epoch, then lower val_loss, then member order; diverged members last",
        }


def rank(rows: list[tuple[str, dict[str, Any], bool]]) -> list[str]:
    """Member names best first, from (name, the rung epoch's metrics row, diverged) in member order.

    Ranked on validation only: higher ``val_acc``, then lower ``val_loss``, then earlier in the sweep; a diverged
    member (or one without a finite validation score) comes last. Never reads a test split's metrics."""

    def key(item: tuple[int, tuple[str, dict[str, Any], bool]]) -> tuple[int, float, float, int]:
        i, (_, row, diverged) = item
        acc, loss = row.get("val_acc"), row.get("val_loss")
        ok = not diverged and acc is not None and math.isfinite(acc)
        return (
            0 if ok else 1,
            -(acc if ok else 0.0),
            loss if ok and loss is not None and math.isfinite(loss) else math.inf,
            i,
        )

    return [name for _, (name, _, _) in sorted(enumerate(rows), key=key)]
