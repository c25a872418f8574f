"""The CLI shell: help for every command, one-line errors with the right exit codes."""

from __future__ import annotations

import subprocess
import sys
import typing
from typing import Any

import click
import pytest
from click.testing import CliRunner

from featcache.cli import app
from featcache.cli.options import config_option, json_option, quiet_option, storage_option
from featcache.config import choices_of, fields
from featcache.options import TrainConfig, TrainOptions


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
    out = subprocess.run(
        [sys.executable, "-c", "from featcache.cli import main; main()", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "featcache" in out.stdout


def test_cli_reference_doc_is_current() -> None:
    from pathlib import Path

    from featcache.cli.reference import render_reference

    doc = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    import difflib

    diff = "\n".join(difflib.unified_diff(doc.read_text().splitlines(), render_reference().splitlines(), lineterm=""))
    assert not diff, "docs/cli.md is stale: python -m featcache.cli.reference > docs/cli.md\n" + diff[:3000]


SHARED = {
    "quiet": quiet_option,
    "as_json": json_option,
    "storage_options": storage_option,
    "device": config_option(TrainOptions, "device"),
}


def _option_of(decorator: Any) -> click.Option:
    return decorator(click.command()(lambda **kw: None)).params[0]


@pytest.mark.parametrize("name", sorted(app.commands))
def test_options_are_their_config_fields(name: str) -> None:
    """Every field with a help text of a command's option sets is one of its options, with the field's flag, type,
    choices, default and help (a default only shown in the help where a value may also come from --set); the shared
    options are the same on every command."""
    command = app.commands[name]
    params = {p.name: p for p in command.params if isinstance(p, click.Option)}
    for key, shared in SHARED.items():
        if key in params:
            want = _option_of(shared)
            assert (params[key].opts, params[key].help, params[key].default) == (want.opts, want.help, want.default)
    for cls in getattr(sys.modules[command.callback.__module__], "CONFIGS", ()):
        for key, info in fields(cls).items():
            option = params.get(key)
            if not info.description or (option is None and cls is TrainConfig):
                continue  # library-only fields; training keys without an option of their own are --set keys
            assert option is not None, f"{cls.__name__}.{key} has no option in featcache {name}"
            extra = info.json_schema_extra or {}
            assert option.opts[0] == extra.get("flag", f"--{key.replace('_', '-')}")
            assert option.help is not None and option.help.startswith(info.description)
            default = None if info.is_required() else info.get_default(call_default_factory=True)
            assert option.required == info.is_required(), key
            members = choices_of(info.annotation)
            assert option.multiple == any(typing.get_origin(m) is dict for m in members), key
            if option.default is None and default is not None:
                assert option.help.endswith(f"[default: {default}]"), key
            else:
                assert option.default == (() if option.multiple else default), key
            if members == (bool,):
                assert option.is_flag or option.secondary_opts, key
            elif all(isinstance(m, str) for m in members):
                assert isinstance(option.type, click.Choice) and tuple(option.type.choices) == members, key
            elif members in ((int,), (float,)):
                assert option.type == {int: click.INT, float: click.FLOAT}[members[0]], key


def test_option_errors_are_the_configs() -> None:
    """A bad option value is refused by its option set, in its words, as a usage error (exit code 2)."""
    r = CliRunner().invoke(app, ["extract", "--model", "m", "--data", "d", "--out", "o", "--views", "0", "-q"])
    assert r.exit_code == 2 and r.stderr.strip() == "Error: --views must be a positive integer, got 0"
    r = CliRunner().invoke(app, ["train", "s", "--out", "o", "--reader", "disk"])
    assert r.exit_code == 2 and "'disk' is not one of 'auto', 'gpu', 'ram', 'stream'" in r.stderr
    r = CliRunner().invoke(app, ["train", "s", "--out", "o", "--storage-option", "a=1", "--storage-option", "x"])
    assert r.exit_code == 2 and "--storage-option expects KEY=VALUE, got 'x'" in r.stderr


def test_option_sets_take_text_values_and_keep_choices() -> None:
    """Text as --set or a sweep file gives it is converted ("null" is None), unless it is a choice itself."""
    from featcache.options import ExtractOptions

    assert ExtractOptions(compressor="none").compressor == "none" and ExtractOptions().layers is None
    opts = ExtractOptions(layers="0,2", storage_options=("a=1",))
    assert (opts.layers, opts.storage_options, ExtractOptions(storage_options=()).storage_options) == (
        [0, 2],
        {"a": 1},
        None,
    )
    assert TrainConfig(epochs="8", lr="1e-2").to_dict() == {**TrainConfig().to_dict(), "epochs": 8, "lr": 0.01}
