"""Training metrics as TensorBoard event files, next to metrics.jsonl: RUNDIR/tensorboard/<member>/.

Written when the ``tensorboard`` package is installed (``TrainOptions.tensorboard = None``, ``featcache train``
without ``--tensorboard/--no-tensorboard``), never with ``False``; ``True`` without the package is an error
before anything is written. Each member gets its own run directory (TensorBoard shows members side by side),
with one scalar per metric of metrics.jsonl and epoch (``train_loss``, ``train_acc``, ``val_acc``, ...; step =
the epoch, 1-based as in metrics.jsonl) plus ``lr``. ``torch.utils.tensorboard`` is imported only when a run
writes events (it takes about a second), so importing ``featcache.training`` stays fast.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from featcache.checkpoint import safe_member_name
from featcache.errors import MissingDependencyError

TENSORBOARD_DIR = "tensorboard"
log = logging.getLogger("featcache.training")


def tensorboard_installed() -> bool:
    """Whether the ``tensorboard`` package (which ``torch.utils.tensorboard`` writes with) can be imported."""
    return importlib.util.find_spec("tensorboard") is not None


def use_tensorboard(requested: bool | None) -> bool:
    """Whether a run writes event files: as requested, or (None) when tensorboard is installed. ``True`` checks
    here, before the run writes anything, that the writer can be imported."""
    if requested is None:
        return tensorboard_installed()
    if requested and not tensorboard_installed():
        raise MissingDependencyError(
            "--tensorboard needs the tensorboard package, which is not installed: pip install "
            "tensorboard (or pip install 'featcache[tb]'), or train without --tensorboard "
            "(metrics.jsonl holds the same numbers)"
        )
    if requested:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as err:
            raise MissingDependencyError(
                f"--tensorboard: torch.utils.tensorboard cannot be imported ({err}); reinstall "
                "it with pip install -U tensorboard, or train without --tensorboard"
            ) from None
    return bool(requested)


def open_tensorboard(
    requested: bool | None, rundir: str | Path, members: list[str], first_epoch: int = 0
) -> "TensorBoardLog | None":
    """The run's event-file writer, or None: when off, or when automatic and the writer cannot be imported (a
    broken tensorboard install never stops a training; it says so once)."""
    if not use_tensorboard(requested):
        return None
    try:
        return TensorBoardLog(rundir, members, first_epoch)
    except ImportError as err:
        if requested:
            raise
        log.warning(
            f"no TensorBoard event files: torch.utils.tensorboard cannot be imported ({err}); metrics.jsonl "
            "holds the metrics (pip install -U tensorboard, or --no-tensorboard to silence this)"
        )
        return None


class TensorBoardLog:
    """One ``SummaryWriter`` per member, under RUNDIR/tensorboard/<member>/."""

    def __init__(self, rundir: str | Path, members: list[str], first_epoch: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        root = Path(rundir) / TENSORBOARD_DIR
        # a resumed run (first_epoch > 0) tells TensorBoard to drop any events of later epochs left by the
        # interrupted process, so a curve never holds an epoch twice
        purge = first_epoch + 1 if first_epoch else None
        self.writers = {m: SummaryWriter(str(root / safe_member_name(m)), purge_step=purge) for m in members}

    def log_epoch(self, member: str, epoch: int, row: dict[str, Any]) -> None:
        """Every numeric entry of a metrics row (``epoch`` and ``status`` aside) as a scalar at step ``epoch``."""
        writer = self.writers[member]
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, float(value), global_step=epoch)
        writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
