"""docs/cli.md, generated from the click commands themselves, so that it cannot drift.

``python -m featcache.cli.reference > docs/cli.md`` rewrites it; a test checks it is current.
"""

from __future__ import annotations

import click

from .app import app

WIDTH = 100


def _help(command: click.Command, name: str, parent: click.Context | None = None) -> str:
    settings = {**app.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    ctx = click.Context(command, info_name=name, parent=parent, **settings)
    return command.get_help(ctx)


def render_reference() -> str:
    """Markdown: the top-level help, then every command's --help text."""
    parts = [
        "# featcache command-line reference",
        "",
        "Generated from the commands' own help (`python -m featcache.cli.reference > docs/cli.md`); "
        "a test keeps it in sync.",
        "",
        "Every command prints errors as one `Error: ...` line on stderr (exit code 1, or 2 for usage "
        "errors, no traceback unless `FEATCACHE_DEBUG=1`); `--json` prints one JSON object on stdout and "
        "nothing else there; progress and logs go to stderr (`--quiet` silences them).",
        "",
        "```",
        _help(app, "featcache"),
        "```",
        "",
    ]
    root = click.Context(app, info_name="featcache")
    for name in sorted(app.commands):
        parts += [f"## featcache {name}", "", "```", _help(app.commands[name], name, root), "```", ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render_reference(), end="")
