"""featcache.allocator: freed memory is reused (no page faults for large tensors); the entry points apply it."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

from featcache import allocator
from featcache.errors import UsageError

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# A forward pass's pattern: each op's 64 MiB output is allocated while its input is alive, then the input
# is freed. 64 MiB is above glibc's largest dynamic mmap threshold (32 MiB): without the settings every
# output is a fresh mmap whose 16,384 pages fault on first touch. With the settings the heap may still
# grow by one block now and then (a small allocation lands in a freed 64 MiB chunk, so the next output no
# longer fits there: 1 run in 5 here, after the warm-up), then reuses it: so the faults are counted per
# step and the median kept, and the heap may grow by a few blocks over 20 steps (two seen in a fresh-clone CI
# run), not by one per step (20 blocks, 1,280 MB).
FAULTS = """
import resource, torch
from featcache.allocator import keep_freed_memory
settings = keep_freed_memory()
usage = lambda: resource.getrusage(resource.RUSAGE_SELF)
x = torch.ones(16 * 2**20)
for _ in range(10):  # warm up: the heap grows to the few blocks this pattern needs
    x = x * 2
rss0, steps = usage().ru_maxrss, []
for _ in range(20):
    f0 = usage().ru_minflt
    x = x * 2
    steps.append(usage().ru_minflt - f0)
print(settings.applied, sorted(steps)[len(steps) // 2], (usage().ru_maxrss - rss0) // 1024)
"""


def faults_per_step(choice: str) -> tuple[bool, int, int]:
    env = {**os.environ, allocator.ENV: choice}
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, env=env, check=True)
    applied, faults, growth_mb = out.stdout.split()
    return applied == "True", int(faults), int(growth_mb)


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_freed_memory_is_reused_without_page_faults_and_the_heap_stops_growing() -> None:
    applied, faults, growth_mb = faults_per_step("keep")
    assert applied and faults < 1000 and growth_mb <= 4 * 64  # the heap hands back the same pages
    applied, faults, _ = faults_per_step("system")
    assert not applied and faults >= 16_000  # malloc as it was: every 64 MiB output faults in again


def test_bad_setting_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="FEATCACHE_MALLOC must be one of keep, system, got 'fast'"):
        allocator._apply("fast")
    assert allocator._apply("system") == allocator.MallocSettings(False, "FEATCACHE_MALLOC=system")


def test_entry_points_apply_the_settings_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """extract, train and load_predictor call keep_freed_memory before anything else (a bad value stops them)."""
    from featcache.extraction import extract
    from featcache.infer import load_predictor
    from featcache.manifest import BackboneSpec
    from featcache.training import train

    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setenv(allocator.ENV, "fast")
    for call in (
        lambda: extract(BackboneSpec(model="test_vit"), "sklearn:digits", tmp_path / "s.zarr"),
        lambda: train(tmp_path / "missing.zarr", "linear", tmp_path / "run"),
        lambda: load_predictor(tmp_path / "missing-run"),
    ):
        with pytest.raises(UsageError, match="FEATCACHE_MALLOC"):
            call()
    assert not (tmp_path / "s.zarr").exists()
