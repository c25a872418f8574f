"""The README's commands work as written: the quick start runs end to end on a small image folder."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks(section: str) -> list[str]:
    """Command lines of the bash blocks under a README heading."""
    text = (ROOT / "README.md").read_text()
    part = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", part, flags=re.S)
    return [line.split("#")[0].strip() for b in blocks for line in b.splitlines() if line.split("#")[0].strip()]


def test_readme_shows_the_two_commands_first() -> None:
    head = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)[0]
    assert [ln.split("#")[0].strip() for ln in head.strip().splitlines()] == ["make demo", "make test"]


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path: Path) -> None:
    commands = readme_blocks("Quick start on your own images")
    assert len(commands) == 5 and all(c.startswith("featcache ") for c in commands)
    write_image_folder(tmp_path / "photos" / "train", n=24, classes=3, seed=0)
    write_image_folder(tmp_path / "photos" / "val", n=12, classes=3, seed=1)
    new = tmp_path / "photos" / "new"
    new.mkdir()
    for i, p in enumerate(sorted((tmp_path / "photos" / "val").rglob("*.png"))[:4]):
        p_new = new / f"photo_{i}.png"
        p_new.write_bytes(p.read_bytes())
    env = {**os.environ, "FEATCACHE_PROGRESS": "0"}
    exe = [sys.executable, "-c", "from featcache.cli import main; main()"]
    for line in commands:
        args = shlex.split(line)[1:]
        r = subprocess.run(exe + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
    summary = json.loads((tmp_path / "runs" / "last" / "summary.json").read_text())
    assert len(summary["members"]) == 2 and "val_acc" in summary["best"]
    assert "photo_0.png" in r.stdout
