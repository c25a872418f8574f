"""User-facing errors. The CLI turns each into one ``Error: ...`` line and its exit code.

Every message names what is wrong and what to do about it. Library callers can catch
``FeatcacheError`` (or a subclass) without parsing text.
"""

from __future__ import annotations


class FeatcacheError(Exception):
    """Base class: a problem the user can fix. ``exit_code`` 1 = bad input or state, 2 = usage."""

    exit_code: int = 1


class UsageError(FeatcacheError):
    """A malformed command-line value (bad KEY=VALUE, unknown option value)."""

    exit_code = 2


class MissingDependencyError(UsageError):
    """An optional package that a requested feature needs is not installed; the message names the pip command."""


class ModelError(FeatcacheError):
    """Unknown timm model name or bad model keyword arguments."""


class TapOverflowError(FeatcacheError):
    """Taps that leave the range of the cache dtype (float16 overflow) or that the backbone gives as NaN/Inf."""


class WeightsError(FeatcacheError):
    """Weights that cannot be read or do not fit the model."""


class DataError(FeatcacheError):
    """A data source that is missing, empty or holds unreadable items."""


class StoreError(FeatcacheError):
    """A store that is missing, incompatible or in a state that forbids the operation."""


class StoreLockedError(StoreError):
    """Another live process holds the split's write lock."""


class CorruptionError(StoreError):
    """Stored bytes fail their checksum or shape checks."""


class FormatVersionError(StoreError):
    """A store or checkpoint written by an unknown (newer) or unsupported format version."""


class ConfigError(FeatcacheError):
    """Invalid method, training or sweep configuration."""


class CheckpointError(FeatcacheError):
    """A checkpoint or run directory that is missing, damaged or does not fit."""


class Interrupted(FeatcacheError):
    """Ctrl-C: work done so far is kept; the message says how to continue."""

    exit_code = 130


class ClusterError(FeatcacheError):
    """A dask cluster that cannot be reached or started, has no workers, or lost a task too often."""


class ExportError(FeatcacheError):
    """A run whose backbone or side network cannot be exported, or whose exported model differs from featcache's."""
