"""Training metrics as TensorBoard event files (featcache/tensorboard_log.py): the same numbers as metrics.jsonl."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featcache.cli import app
from featcache.errors import Interrupted, MissingDependencyError
from featcache.training import train

from .helpers.stores import run_extract
from .helpers.tensorboard_events import read_scalars

pytest.importorskip("tensorboard")  # a [dev] dependency; the missing-package path is tested by monkeypatching

SETTINGS = {"epochs": 3, "batch_size": 8, "warmup_epochs": 1}
GRID = {"lr": [1e-3, 1e-2]}


@pytest.fixture(scope="module")
def store(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tb") / "cache.zarr"
    run_extract(images, out)
    return out


def metrics(run: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.pop("member"), []).append(row)
    return rows


def assert_events_equal_metrics(run: Path) -> None:
    rows = metrics(run)
    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == sorted(rows)
    for member, history in rows.items():
        got = read_scalars(run / "tensorboard" / member)
        keys = {k for row in history for k in row if k not in ("epoch", "status")}
        assert {"train_loss", "train_acc", "val_acc", "val_loss"} <= keys and set(got) == keys | {"lr"}
        for key in keys:  # event files hold float32
            assert got[key] == {row["epoch"]: float(np.float32(row[key])) for row in history}, (member, key)
        peak = float(member.removeprefix("lr="))
        expected_lr = [peak * 0.5 * (1 + math.cos(math.pi * (e - 1) / 2)) for e in (1, 2, 3)]  # warmup 1, cosine
        assert np.allclose([got["lr"][e] for e in (1, 2, 3)], expected_lr, rtol=1e-5, atol=1e-12)


def test_a_run_writes_event_files_equal_to_metrics_jsonl(store, tmp_path) -> None:
    run = tmp_path / "run"
    train(str(store), "linear", run, SETTINGS, GRID, progress=False)  # tensorboard=None: on, it is installed
    assert_events_equal_metrics(run)


@pytest.mark.parametrize("committed", [True, False], ids=["after-commit", "before-commit"])
def test_a_resumed_run_logs_each_epoch_once(store, tmp_path, monkeypatch, committed: bool) -> None:
    """Interrupted in epoch 2 after its state was saved (resume at 3), or after its events were written but
    before its state was saved (resume at 2, which logs epoch 2 again): every epoch appears once, as in metrics."""
    from featcache.rundir import RunDir

    real = RunDir.save_state

    def stop_after_epoch_2(self, epoch, *a, **kw):
        if committed or epoch != 1:
            real(self, epoch, *a, **kw)
        if epoch == 1:
            raise KeyboardInterrupt

    run = tmp_path / "run"
    monkeypatch.setattr(RunDir, "save_state", stop_after_epoch_2)
    with pytest.raises(Interrupted):
        train(str(store), "linear", run, SETTINGS, GRID, progress=False, tensorboard=True)
    monkeypatch.setattr(RunDir, "save_state", real)
    train(str(store), "linear", run, SETTINGS, GRID, progress=False, tensorboard=True, resume=True)
    assert_events_equal_metrics(run)


def test_no_tensorboard_writes_none(store, tmp_path) -> None:
    train(str(store), "linear", tmp_path / "run", {"epochs": 1}, progress=False, tensorboard=False)
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "tensorboard").exists()


def test_without_the_package(store, tmp_path, monkeypatch) -> None:
    import featcache.tensorboard_log as tb

    monkeypatch.setattr(tb, "tensorboard_installed", lambda: False)
    with pytest.raises(MissingDependencyError, match="pip install tensorboard"):
        train(str(store), "linear", tmp_path / "asked", {"epochs": 1}, progress=False, tensorboard=True)
    assert not (tmp_path / "asked").exists()  # refused before anything was written
    r = CliRunner().invoke(
        app,
        [
            "train",
            str(store),
            "--method",
            "linear",
            "--out",
            str(tmp_path / "cli"),
            "--epochs",
            "1",
            "--tensorboard",
            "--quiet",
        ],
    )
    assert r.exit_code == 2 and r.stderr.startswith("Error: ") and "pip install tensorboard" in r.stderr, r.output
    train(str(store), "linear", tmp_path / "auto", {"epochs": 1}, progress=False)  # automatic: off, no error
    assert (tmp_path / "auto" / "metrics.jsonl").is_file() and not (tmp_path / "auto" / "tensorboard").exists()


def test_a_broken_install_never_stops_an_automatic_run(store, tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # installed, but its import fails
    with pytest.raises(MissingDependencyError, match="cannot be imported.*pip install -U tensorboard"):
        train(str(store), "linear", tmp_path / "asked", {"epochs": 1}, progress=False, tensorboard=True)
    assert not (tmp_path / "asked").exists()
    train(str(store), "linear", tmp_path / "auto", {"epochs": 1}, progress=False)
    assert (tmp_path / "auto" / "metrics.jsonl").is_file() and not (tmp_path / "auto" / "tensorboard").exists()
    assert "no TensorBoard event files" in caplog.text


def test_cli_switches(store, tmp_path) -> None:
    for flag, written in (("--tensorboard", True), ("--no-tensorboard", False), (None, True)):
        out = tmp_path / str(flag)
        args = ["train", str(store), "--method", "linear", "--out", str(out), "--epochs", "1", "--quiet"]
        r = CliRunner().invoke(app, args + ([flag] if flag else []))
        assert r.exit_code == 0, r.output
        assert (out / "tensorboard").is_dir() == written, flag
