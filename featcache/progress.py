"""Progress bars on stderr (tqdm), silenced by ``quiet`` or ``FEATCACHE_PROGRESS=0``.

Library functions take ``progress: bool``; the CLI passes ``not --quiet``. Logs and bars go to
stderr so that ``--json`` output on stdout stays clean.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress_enabled(progress: bool = True) -> bool:
    return progress and os.environ.get("FEATCACHE_PROGRESS", "1") not in ("0", "false", "no")


def bar(total: int | None, desc: str, unit: str = "img", progress: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr showing rate (unit/s) and ETA; a no-op bar when progress is off."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=False,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not progress_enabled(progress),
        leave=True,
        smoothing=0.1,
        **kwargs,
    )


def say(message: str, quiet: bool = False) -> None:
    """A one-line summary or log message on stderr."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)
