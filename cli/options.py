"""Options shared by several commands, and the options generated from the library's option sets."""

from __future__ import annotations

import json
import sys
import typing
from typing import Any, Callable

import click

from featcache.config import choices_of, fields
from featcache.options import TrainOptions

quiet_option = click.option(
    "--quiet", "-q", is_flag=True, help="No progress bars or summaries on stderr (errors still print)."
)
json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object on stdout and nothing else there."
)
_CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


def config_option(cls: type, key: str, unset: bool = False) -> Callable[[Any], Any]:
    """The click option of field ``key`` of the ``@config`` class ``cls``: its flag, type, choices, default, help and
    metavar from the field. ``unset``: default None (the field's default shown in the help), so that a value given
    elsewhere (``--set``, a sweep file) is not overridden by the option's default."""
    info = fields(cls)[key]
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    flag, members = str(extra.get("flag", f"--{key.replace('_', '-')}")), choices_of(info.annotation)
    default = None if unset or info.is_required() else info.get_default(call_default_factory=True)
    help = f"{info.description}  [default: {info.get_default()}]" if unset else info.description
    kw: dict[str, Any] = {
        "default": default,
        "help": help,
        "metavar": extra.get("metavar"),
        "required": info.is_required(),
        "show_default": not (default is None or isinstance(default, (bool, dict))),
    }
    if members == (bool,) and info.get_default() is None:
        return click.option(f"{flag}/--no-{flag[2:]}", key, **kw)
    if members == (bool,):
        return click.option(flag, key, is_flag=True, **kw)
    if any(typing.get_origin(m) is dict for m in members):  # KEY=VALUE items
        return click.option(flag, key, multiple=True, **{**kw, "default": (), "show_default": False})
    if all(isinstance(m, str) for m in members):  # a Literal
        kw["type"] = click.Choice([str(m) for m in members])
    else:
        kw["type"] = _CLICK_TYPES.get(members[0], click.STRING) if len(members) == 1 else click.STRING
    return click.option(flag, key, **kw)


def config_options(cls: type, *keys: str, unset: bool = False) -> Callable[[Any], Any]:
    """The click options of the fields ``keys`` of ``cls`` (default: every field with a help text), in that order."""
    keys = keys or tuple(k for k, info in fields(cls).items() if info.description)

    def decorate(f: Any) -> Any:
        for key in reversed(keys):
            f = config_option(cls, key, unset)(f)
        return f

    return decorate


storage_option = config_option(TrainOptions, "storage_options")  # the same on every command


def take(cls: type, values: dict[str, Any], **extra: Any) -> Any:
    """``cls`` built from the command's parsed ``values`` of its options (removed from ``values``) and ``extra``."""
    return cls(**{k: values.pop(k) for k in list(values) if k in fields(cls) and fields(cls)[k].description}, **extra)


def print_json(data: Any) -> None:
    """The --json contract: exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def cluster_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--workers N`` (a local dask cluster) and ``--scheduler ADDRESS`` (a running one); see docs/scale.md."""
    f = click.option(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="Run on the dask cluster whose scheduler is at ADDRESS (e.g. tcp://host:8786).",
    )(f)
    return click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        metavar="N",
        help="Run on a local dask cluster of N worker processes (one per GPU when GPUs exist).",
    )(f)


DATA_HELP = (
    "Images: an ImageFolder DIR, sklearn:digits[:train|:test], idx:DIR[:test], torchvision:NAME[:ROOT], "
    "wds:PATTERN (WebDataset tar shards), hf:PATH[:split] (Hugging Face dataset on disk), csv:FILE or "
    "jsonl:FILE (image paths and labels); docs/data.md."
)


def data_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--data SPEC`` and the column choices for hf:, csv: and jsonl: data (written into the spec by the library)."""
    f = click.option(
        "--label-column",
        default=None,
        metavar="NAME",
        help="hf:/csv:/jsonl: data: the column of labels [default: detected].",
    )(f)
    f = click.option(
        "--image-column",
        default=None,
        metavar="NAME",
        help="hf:/csv:/jsonl: data: the column of images or image paths [default: detected].",
    )(f)
    return click.option("--data", required=True, metavar="SPEC", help=DATA_HELP)(f)
