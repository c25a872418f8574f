"""Readers for the data formats users keep their large image sets in, one module per ``--data`` form.

- ``wds.py``: ``wds:PATTERN``, WebDataset tar shards (the ``webdataset`` package: ``featcache[wds]``);
- ``hf.py``: ``hf:PATH[:split]``, a Hugging Face dataset on local disk (``datasets``: ``featcache[hf]``);
- ``path_list.py``: ``csv:FILE`` / ``jsonl:FILE``, image paths and labels listed in a file;
- ``labels.py``: labels as written (integers, class names) -> int64 labels and class names, shared by all.
``featcache.data.open_source`` parses the spec and picks the reader; each reader is a ``DataSource``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from featcache.errors import DataError


def require(module: str, extra: str, form: str) -> ModuleType:
    """Import an optional package, or a DataError that names the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"--data {form} needs the {module!r} package, which is not installed: "
                        f"pip install 'featcache[{extra}]'") from None
