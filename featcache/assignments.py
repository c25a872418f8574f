"""Command-line ``KEY=VALUE`` assignments (``--model-kwargs``, ``--storage-option``, ``--set``, ``--grid``) to Python
values."""

from __future__ import annotations

import json
from typing import Any

from .errors import UsageError

_LITERALS = {"true": True, "false": False, "none": None, "null": None}


def parse_value(text: str) -> Any:
    """JSON value if it parses (``224``, ``1e-3``, ``[1,2]``), else True/False/None words, else the string."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    word = text.strip().lower()
    return _LITERALS[word] if word in _LITERALS else text


def split_assignment(item: str, option: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or not key.replace("_", "a").replace(".", "a").replace("-", "a").isalnum():
        example = {"--model-kwargs": "img_size=224", "--grid": "lr=1e-3,3e-3"}.get(option, "lr=1e-3")
        raise UsageError(f"{option} expects KEY=VALUE, got {item!r}: write e.g. {option} {example}")
    return key, value.strip()


def parse_assignments(items: tuple[str, ...] | list[str], option: str = "--set") -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; a repeated key is an error, not a silent override."""
    out: dict[str, Any] = {}
    for item in items:
        key, value = split_assignment(item, option)
        if key in out:
            raise UsageError(f"{option} sets {key!r} twice; give each key once")
        out[key] = parse_value(value)
    return out


def parse_grid(items: tuple[str, ...] | list[str], option: str = "--grid") -> dict[str, list[Any]]:
    """``["lr=1e-3,1e-2"]`` -> ``{"lr": [0.001, 0.01]}``."""
    out: dict[str, list[Any]] = {}
    for item in items:
        key, value = split_assignment(item, option)
        parts = [p.strip() for p in value.split(",")]
        if not value or any(p == "" for p in parts):
            raise UsageError(f"{option} {item!r} has an empty value: write {option} {key}=V1,V2,...")
        if key in out:
            raise UsageError(f"{option} sets {key!r} twice; list all its values once: {key}=V1,V2")
        out[key] = [parse_value(p) for p in parts]
    return out
