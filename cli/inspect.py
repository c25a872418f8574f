"""``featcache inspect``: describe a feature store; ``--verify`` reads and checks every chunk."""

from __future__ import annotations

import json
import sys

import click

from featcache.assignments import parse_assignments

from .options import json_option, storage_option


@click.command("inspect")
@click.argument("store", metavar="STORE")
@click.option("--verify", is_flag=True, help="Read every chunk: checksums, shapes, completion records, labels.")
@click.option("--stats", is_flag=True, help="Per-tap mean, std, min, max, NaN/Inf counts (reads all data).")
@json_option
@click.option("--split", default=None, help="Only this split.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Draw per-tap token norms and the label histogram into this PNG (implies --stats).",
)
@storage_option
def command(
    store: str,
    verify: bool,
    stats: bool,
    as_json: bool,
    split: str | None,
    plot_path: str | None,
    storage_options: tuple[str, ...],
) -> None:
    """Describe STORE: backbone, splits, taps (shapes, chunks, codecs, sizes), labels.

    Exit code 1 when --verify finds a problem; each problem names its array and chunk.
    """
    from featcache.store.describe import describe_store, format_summary

    d = describe_store(
        store,
        split=split,
        stats=stats or plot_path is not None,
        verify=verify,
        storage_options=parse_assignments(storage_options, "--storage-option") or None,
    )
    if plot_path is not None:
        from featcache.plots import plot_store_stats

        plot_store_stats(d, plot_path)
    if as_json:
        click.echo(json.dumps(d, indent=2, default=str))
    else:
        click.echo(format_summary(d))
    if d["verify"] is not None and not d["verify"]["ok"]:
        sys.stdout.flush()
        raise click.exceptions.Exit(1)
