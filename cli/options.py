"""Options shared by several commands."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import click

quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars or summaries on stderr (errors still print).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout and nothing else there.")
device_option = click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")


def storage_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
                        help="fsspec storage option for remote stores (repeatable), e.g. endpoint_url=http://...")(f)


def print_json(data: Any) -> None:
    """The --json contract: exactly one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def cluster_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--workers N`` (a local dask cluster) and ``--scheduler ADDRESS`` (a running one); see docs/scale.md."""
    f = click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="Run on the dask cluster whose scheduler is at ADDRESS (e.g. tcp://host:8786).")(f)
    return click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N",
                        help="Run on a local dask cluster of N worker processes (one per GPU when GPUs exist).")(f)


DATA_HELP = ("Images: an ImageFolder DIR, sklearn:digits[:train|:test], idx:DIR[:test], torchvision:NAME[:ROOT], "
             "wds:PATTERN (WebDataset tar shards), hf:PATH[:split] (Hugging Face dataset on disk), csv:FILE or "
             "jsonl:FILE (image paths and labels); docs/data.md.")


def data_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--data SPEC`` and the column choices for hf:, csv: and jsonl: data (written into the spec by the library)."""
    f = click.option("--label-column", default=None, metavar="NAME",
                     help="hf:/csv:/jsonl: data: the column of labels [default: detected].")(f)
    f = click.option("--image-column", default=None, metavar="NAME",
                     help="hf:/csv:/jsonl: data: the column of images or image paths [default: detected].")(f)
    return click.option("--data", required=True, metavar="SPEC", help=DATA_HELP)(f)
