"""``featcache train``: side networks (and sweeps) from a cache."""

from __future__ import annotations

import os

import click

from featcache.keyvalue import parse_assignments, parse_grid

from .options import cluster_options, device_option, json_option, print_json, quiet_option, storage_option


@click.command("train")
@click.argument("store")
@click.option("--method", default="last", show_default=True, help="Side network: linear, last or lst (or --grid method=...).")
@click.option("--out", required=True, metavar="RUNDIR", help="Run directory for checkpoints, metrics, plots and summary.")
@click.option("--epochs", type=int, default=None, help="Epochs (default 30).")
@click.option("--batch-size", type=int, default=None, help="Batch size shared by all members (default 64).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (default 1e-3).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any training or method setting (repeatable); METHOD.KEY=VALUE sets KEY for one method of a --grid method=... sweep.")
@click.option("--grid", "grid", multiple=True, metavar="KEY=V1,V2,..", help="Sweep a setting: K members = product of all grids.")
@click.option("--sweep", "sweep_file", type=click.Path(dir_okay=False), help="JSON/YAML sweep file: {set: {...}, grid: {...}}.")
@click.option("--split", default="train", show_default=True, help="Split to train on.")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Without a val split: a stratified, seeded share of --split held out to choose epochs and members "
                   "(0: no selection, the last epoch is taken).")
@click.option("--val-split", default=None, help="A stored split that chooses epochs and members (default: 'val' when "
              "the store has one).")
@click.option("--select-on", default=None, metavar="NAME",
              help="Choose on this split even if it is the test split (the summary says so).")
@click.option("--eval-split", default=None, help="Split reported each evaluation and for the chosen epoch, never "
              "used to choose (default: test when the store has one).")
@click.option("--reader", type=click.Choice(["auto", "gpu", "ram", "stream"]), default="auto", show_default=True,
              help="How taps are fed: resident on GPU, in RAM, or streamed from the store.")
@click.option("--stream-buffer-mb", type=click.FloatRange(min=1.0), default=None, metavar="MB",
              help="stream reader: shuffle window in MB (default 512); no single read is larger.")
@click.option("--prefetch", type=click.IntRange(min=1), default=None, metavar="N",
              help="stream reader: blocks read ahead by background threads (default 2).")
@click.option("--tensorboard/--no-tensorboard", default=None,
              help="Also write the metrics as TensorBoard event files in RUNDIR/tensorboard/MEMBER (default: when the "
                   "tensorboard package is installed).")
@click.option("--tta", is_flag=True,
              help="Test-time augmentation: score splits extracted with --views K on the mean logits of all K views "
                   "(view 0 eval transform, the others training draws) instead of view 0 alone; predict --tta "
                   "computes the same.")
@device_option
@click.option("--resume", is_flag=True, help="Continue an interrupted run in RUNDIR from its last finished epoch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@cluster_options
@storage_option
@json_option
@quiet_option
def command(store: str, method: str, out: str, epochs: int | None, batch_size: int | None, lr: float | None,
            settings: tuple[str, ...], grid: tuple[str, ...], sweep_file: str | None, split: str, val_fraction: float,
            val_split: str | None, select_on: str | None, eval_split: str | None,
            reader: str, stream_buffer_mb: float | None, prefetch: int | None, tensorboard: bool | None, tta: bool,
            device: str, resume: bool,
            overwrite: bool, workers: int | None, scheduler: str | None,
            storage_options: tuple[str, ...], as_json: bool, quiet: bool) -> None:
    """Train side networks on the cached taps in STORE; never runs the backbone.

    \b
    featcache train cache.zarr --method last --out runs/last --epochs 20
    featcache train cache.zarr --method last --out runs/sweep --grid lr=1e-3,3e-3 --grid rank=4,8
    featcache train cache.zarr --out runs/both --grid method=last,linear
    featcache train cache.zarr --out runs/sweep --grid lr=1e-3,3e-3 --grid rank=4,8 --workers 2
    """
    from featcache.infer import backbone_state_loader
    from featcache.sweep import load_sweep_file
    from featcache.training import TrainOptions, train

    base, sweep_grid = load_sweep_file(sweep_file) if sweep_file else ({}, {})
    values = {**base, **parse_assignments(settings, "--set")}
    for key, value in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)):
        if value is not None:
            values[key] = value
    grids = {**sweep_grid, **parse_grid(grid, "--grid")}
    storage = parse_assignments(storage_options, "--storage-option") or None
    options = TrainOptions(split=split, val_fraction=val_fraction, val_split=val_split, select_on=select_on,
                           eval_split=eval_split, reader=reader, stream_buffer_mb=stream_buffer_mb,
                           prefetch=prefetch, device=device, resume=resume, overwrite=overwrite, progress=not quiet,
                           storage_options=storage, tensorboard=tensorboard, tta=tta)
    if workers is not None or scheduler is not None:
        from featcache.scale import train_on_cluster

        shared = store if "://" in store else os.path.abspath(store)  # workers have their own working directory
        summary = train_on_cluster(store, method, out, values, grids, options, workers=workers, scheduler=scheduler,
                                   backbone_state=backbone_state_loader(shared, storage))
    else:
        summary = train(store, method, out, values, grids, options, backbone_state=backbone_state_loader(store, storage))
    if as_json:
        print_json(summary)
