"""The click group, its error handling and the console-script entry point.

Every failure reaches the user as one ``Error: ...`` line on stderr with exit code 1 (bad input or
state), 2 (usage) or 130 (interrupted); tracebacks only with ``FEATCACHE_DEBUG=1``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import click

from featcache import __version__
from featcache.errors import FeatcacheError

from . import demo, export, extract, inspect, predict, train


def debug_enabled() -> bool:
    return os.environ.get("FEATCACHE_DEBUG", "") not in ("", "0")


def _fail(message: str, code: int) -> None:
    # exactly one line, whatever the message holds (an error text with newlines from a library, say)
    line = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    click.echo(f"Error: {line}", err=True)
    sys.exit(code)


class App(click.Group):
    """A click group that turns every exception into one ``Error:`` line and an exit code."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as e:
            sys.exit(e.exit_code)
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            _fail(f"{e.format_message()}{hint}", 2)
        except click.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except (click.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        except FeatcacheError as e:
            if debug_enabled():
                raise
            _fail(str(e), e.exit_code)
        except Exception as e:  # a bug: still one line, the traceback on request
            if debug_enabled():
                raise
            _fail(
                f"unexpected {type(e).__name__}: {e} (rerun with FEATCACHE_DEBUG=1 for the traceback, "
                "and please report it)",
                1,
            )
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=App, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="featcache")
def app() -> None:
    """Cache a frozen timm backbone's activations once, then train side networks from the cache.

    \b
    featcache extract  one backbone pass: images -> tapped activations in a Zarr store
    featcache inspect  describe and verify a store
    featcache train    train LAST / LST / linear side networks (and sweeps) from a store
    featcache predict  backbone + trained side network on new images (or an exported .onnx model)
    featcache export   backbone + side network as one ONNX (or torch.export) model
    featcache demo     the whole flow on real weights and data, end to end
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("timm").setLevel(logging.WARNING)  # "Loading pretrained weights from file ..." is noise here


for _module in (extract, inspect, train, predict, export, demo):
    app.add_command(_module.command)


def main() -> None:
    """Console-script entry point. After an error line nothing else may reach the terminal."""
    try:
        app.main(prog_name="featcache")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code != 0:
            # zarr 3.1 can leave background tasks that print "Exception ignored ..." at interpreter
            # exit after a checksum error; the user has their one Error: line already.
            sys.stdout.flush()
            sys.stderr.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
        raise
