"""``pip install featcache`` leaves the torch a user already has alone: pyproject.toml holds ranges, not pins.

Offline and in seconds: a throwaway environment sees this test environment's packages (a ``.pth`` line)
behind stand-in ``torch`` / ``torchvision`` distributions of other versions (bare ``.dist-info``
metadata, which is all pip reads to decide), and pip resolves ``pip install <this project>`` with
``--dry-run --report``, no index and no build isolation. A stand-in torch inside the range stays; one
below it would be replaced (the second test: the check does see a replacement). A real install over
another torch (README, "Installing") needs the network and is not run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _stand_in(site: Path, name: str, version: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("pip\n")
    (info / "RECORD").write_text("")


def _environment(root: Path, torch: str, torchvision: str) -> Path:
    """A venv whose own site-packages holds stand-in torch/torchvision, then (by .pth) this environment's packages."""
    env = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    _stand_in(site, "torch", torch)
    _stand_in(site, "torchvision", torchvision)
    (site / "zz_featcache_test.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return env


def _wheel(folder: Path, name: str, version: str) -> None:
    """A metadata-only wheel: what an index would offer pip as a replacement."""
    folder.mkdir(exist_ok=True)
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def _dry_run(env: Path, report: Path, *extra: str) -> dict[str, str]:
    """name -> version of what ``pip install ROOT`` would install into ``env``; no index, no config files."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    clean["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip.conf adds indexes and a torch cap
    done = subprocess.run(
        [
            str(env / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--report",
            str(report),
            "--no-index",
            "--no-build-isolation",
            "--disable-pip-version-check",
            *extra,
            str(ROOT),
        ],
        env=clean,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return {
        item["metadata"]["name"].lower(): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }


@pytest.mark.slow
def test_pip_install_keeps_an_installed_torch_in_the_supported_range(tmp_path: Path) -> None:
    env = _environment(tmp_path, torch="2.5.1", torchvision="0.20.1")
    _wheel(tmp_path / "wheels", "torch", "2.14.1")  # a newer torch on offer changes nothing
    installs = _dry_run(env, tmp_path / "report.json", "--find-links", str(tmp_path / "wheels"))
    assert "featcache" in installs
    assert "torch" not in installs and "torchvision" not in installs


@pytest.mark.slow
def test_an_installed_torch_below_the_range_would_be_replaced(tmp_path: Path) -> None:
    env = _environment(tmp_path, torch="2.3.1", torchvision="0.18.1")
    _wheel(tmp_path / "wheels", "torch", "2.14.1")
    _wheel(tmp_path / "wheels", "torchvision", "0.29.1")
    installs = _dry_run(env, tmp_path / "report.json", "--find-links", str(tmp_path / "wheels"))
    assert installs.get("torch") == "2.14.1" and installs.get("torchvision") == "0.29.1"
