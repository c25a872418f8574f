"""``featcache predict``: backbone + trained side network on new images."""

from __future__ import annotations

from typing import Any

import click

from featcache.options import PredictOptions

from .options import config_options, data_options, json_option, print_json, quiet_option, take

CONFIGS = (PredictOptions,)  # the option set whose fields are this command's options


@click.command("predict")
@click.argument("checkpoint", metavar="RUNDIR_OR_CHECKPOINT")
@data_options
@config_options(PredictOptions)
@json_option
@quiet_option
def command(
    checkpoint: str,
    data: str,
    image_column: str | None,
    label_column: str | None,
    as_json: bool,
    quiet: bool,
    **values: Any,
) -> None:
    """Run the frozen backbone and a trained side network on the images of --data.

    RUNDIR_OR_CHECKPOINT is a run directory (its best member), RUNDIR/members/NAME, a .safetensors file, or a
    model.onnx written by featcache export (run with onnxruntime alone: no torch, no timm).
    """
    from featcache.data import spec_with_columns

    data = spec_with_columns(data, image_column, label_column)
    options = take(PredictOptions, values, progress=not quiet)
    if checkpoint.endswith(".onnx"):
        from featcache.deployed import predict_onnx

        result = predict_onnx(checkpoint, data, options)
    else:
        from featcache.infer import predict

        result = predict(checkpoint, data, options)
    if as_json:
        print_json(result)
    elif not quiet:
        for row in result["predictions"][:10]:
            click.echo(f"{row['id']}\t{row['pred_class']}\t{row['prob']:.3f}")
        if len(result["predictions"]) > 10:
            click.echo(f"... {len(result['predictions']) - 10} more (use --json or --csv for all)")
