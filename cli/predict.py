"""``featcache predict``: backbone + trained side network on new images."""

from __future__ import annotations

import click

from .options import data_options, device_option, json_option, print_json, quiet_option


@click.command("predict")
@click.argument("checkpoint", metavar="RUNDIR_OR_CHECKPOINT")
@data_options
@click.option("--batch-size", type=int, default=64, show_default=True)
@device_option
@click.option("--weights", default=None, help="Backbone weights, when the cache's weights source is not at hand here.")
@click.option("--limit", type=int, default=None, help="Predict a fixed stratified subset of N images.")
@click.option("--tta", is_flag=True,
              help="Average each image's logits over the views the run evaluated with train --tta (view 0 eval "
                   "transform, the others the cached training-transform draws, seeded per image and view).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), default=None, help="Also write predictions as CSV.")
@json_option
@quiet_option
def command(checkpoint: str, data: str, image_column: str | None, label_column: str | None, batch_size: int,
            device: str, weights: str | None, limit: int | None, tta: bool, csv_path: str | None, as_json: bool,
            quiet: bool) -> None:
    """Run the frozen backbone and a trained side network on the images of --data.

    RUNDIR_OR_CHECKPOINT is a run directory (its best member), RUNDIR/members/NAME, or a .safetensors file.
    """
    from featcache.data import spec_with_columns
    from featcache.infer import predict

    data = spec_with_columns(data, image_column, label_column)
    result = predict(checkpoint, data, batch_size=batch_size, device=device, weights=weights, limit=limit,
                     csv_path=csv_path, progress=not quiet, tta=tta)
    if as_json:
        print_json(result)
    elif not quiet:
        for row in result["predictions"][:10]:
            click.echo(f"{row['id']}\t{row['pred_class']}\t{row['prob']:.3f}")
        if len(result["predictions"]) > 10:
            click.echo(f"... {len(result['predictions']) - 10} more (use --json or --csv for all)")
