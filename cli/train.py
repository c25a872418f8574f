"""``featcache train``: side networks (and sweeps) from a cache."""

from __future__ import annotations

import os
from typing import Any

import click

from featcache.assignments import parse_assignments, parse_grid
from featcache.options import TrainConfig, TrainOptions

from .options import cluster_options, config_options, json_option, print_json, quiet_option, take

CONFIGS = (TrainConfig, TrainOptions)  # the option sets whose fields are this command's options
SETTINGS = ("epochs", "batch_size", "lr")  # TrainConfig fields with an option of their own (else --set KEY=VALUE)


@click.command("train")
@click.argument("store")
@click.option(
    "--method", default="last", show_default=True, help="Side network: linear, last or lst (or --grid method=...)."
)
@click.option(
    "--out", required=True, metavar="RUNDIR", help="Run directory for checkpoints, metrics, plots and summary."
)
@config_options(TrainConfig, *SETTINGS, unset=True)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any training or method setting (repeatable); METHOD.KEY=VALUE sets KEY for one method of a --grid method=... sweep.",
)
@click.option(
    "--grid", "grid", multiple=True, metavar="KEY=V1,V2,..", help="Sweep a setting: K members = product of all grids."
)
@click.option(
    "--sweep", "sweep_file", type=click.Path(dir_okay=False), help="JSON/YAML sweep file: {set: {...}, grid: {...}}."
)
@config_options(TrainOptions)
@cluster_options
@json_option
@quiet_option
def command(
    store: str,
    method: str,
    out: str,
    settings: tuple[str, ...],
    grid: tuple[str, ...],
    sweep_file: str | None,
    workers: int | None,
    scheduler: str | None,
    as_json: bool,
    quiet: bool,
    **values: Any,
) -> None:
    """Train side networks on the cached taps in STORE; never runs the backbone.

    \b
    featcache train cache.zarr --method last --out runs/last --epochs 20
    featcache train cache.zarr --method last --out runs/sweep --grid lr=1e-3,3e-3 --grid rank=4,8
    featcache train cache.zarr --out runs/both --grid method=last,linear
    featcache train cache.zarr --out runs/sweep --grid lr=1e-3,3e-3 --grid rank=4,8 --workers 2
    """
    from featcache.backbone import backbone_state_loader
    from featcache.sweep import load_sweep_file
    from featcache.training import train

    base, sweep_grid = load_sweep_file(sweep_file) if sweep_file else ({}, {})
    given = {key: values.pop(key) for key in SETTINGS}
    settings_ = {**base, **parse_assignments(settings, "--set"), **{k: v for k, v in given.items() if v is not None}}
    grids = {**sweep_grid, **parse_grid(grid, "--grid")}
    options = take(TrainOptions, values, progress=not quiet)
    if workers is not None or scheduler is not None:
        from featcache.distributed.training import train_on_cluster

        shared = store if "://" in store else os.path.abspath(store)  # workers have their own working directory
        summary = train_on_cluster(
            store,
            method,
            out,
            settings_,
            grids,
            options,
            workers=workers,
            scheduler=scheduler,
            backbone_state=backbone_state_loader(shared, options.storage_options),
        )
    else:
        summary = train(
            store,
            method,
            out,
            settings_,
            grids,
            options,
            backbone_state=backbone_state_loader(store, options.storage_options),
        )
    if as_json:
        print_json(summary)
