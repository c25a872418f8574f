"""``featcache extract``: one backbone pass over a data set into a split of a feature store."""

from __future__ import annotations

from typing import Any

import click

from featcache.manifest import BackboneSpec
from featcache.options import ExtractOptions
from featcache.progress import say

from .options import cluster_options, config_options, data_options, quiet_option, take

CONFIGS = (BackboneSpec, ExtractOptions)  # the option sets whose fields are this command's options


@click.command("extract")
@config_options(BackboneSpec, "model", "model_kwargs", "weights")
@data_options
@click.option("--out", required=True, metavar="STORE", help="Store path or fsspec URL (created if missing).")
@config_options(ExtractOptions)
@config_options(BackboneSpec, "pool_tokens", "image_size", "crop_pct", "resize_only")
@quiet_option
@cluster_options
def command(
    data: str,
    image_column: str | None,
    label_column: str | None,
    out: str,
    quiet: bool,
    workers: int | None,
    scheduler: str | None,
    **values: Any,
) -> None:
    """Run a frozen timm backbone once over --data and store every tapped activation in --out.

    \b
    Writes all selected taps, labels and ids of split --split, shard by shard; an interrupted run
    continues with --resume and gives the same arrays as an uninterrupted one; --resume --repair
    also recomputes shards that fail their checksums. With --workers N or --scheduler ADDRESS the
    shards are computed by dask workers (docs/scale.md).
    """
    from featcache.data import spec_with_columns
    from featcache.extraction import extract

    data = spec_with_columns(data, image_column, label_column)
    spec, options = take(BackboneSpec, values), take(ExtractOptions, values, progress=not quiet)
    if workers is not None or scheduler is not None:
        from featcache.distributed.extraction import extract_on_cluster

        report = extract_on_cluster(spec, data, out, options, workers=workers, scheduler=scheduler)
    else:
        report = extract(spec, data, out, options)
    say(report.summary_line(), quiet)
