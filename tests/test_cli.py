"""The CLI shell: help for every command, one-line errors with the right exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from featcache.cli import app


def test_top_level_help() -> None:
    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0 and "extract" in r.output


@pytest.mark.parametrize("name", sorted(app.commands))
def test_every_command_has_help(name: str) -> None:
    r = CliRunner().invoke(app, [name, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage: " in r.output and len(r.output.splitlines()) > 3


def test_usage_error_is_one_line_exit_2() -> None:
    r = CliRunner().invoke(app, ["--no-such-option"])
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "--help" in lines[0]


def test_console_script_runs() -> None:
    out = subprocess.run([sys.executable, "-c", "from featcache.cli import main; main()", "--version"],
                         capture_output=True, text=True, check=True)
    assert "featcache" in out.stdout


def test_cli_reference_doc_is_current() -> None:
    from pathlib import Path

    from featcache.cli.reference import render_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    import difflib

    diff = "\n".join(difflib.unified_diff(doc.read_text().splitlines(), render_reference().splitlines(), lineterm=""))
    assert not diff, "docs/cli.md is stale: python -m featcache.cli.reference > docs/cli.md\n" + diff[:3000]
