"""The ``featcache`` command line: thin click wrappers over library functions.

Installed as ``featcache.cli`` (package-dir mapping in pyproject.toml); the console script is ``main``.
"""

from .app import app, main

__all__ = ["app", "main"]
