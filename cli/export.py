"""``featcache export``: a trained run as one deployable model (ONNX or a torch.export program)."""

from __future__ import annotations

from typing import Any

import click

from featcache.options import ExportOptions

from .options import config_options, json_option, print_json, quiet_option, take

CONFIGS = (ExportOptions,)  # the option set whose fields are this command's options


@click.command("export")
@click.argument("run", metavar="RUNDIR_OR_CHECKPOINT")
@click.option("--out", required=True, metavar="FILE", help="The model file to write (model.onnx, model.pt2).")
@config_options(ExportOptions)
@json_option
@quiet_option
def command(run: str, out: str, as_json: bool, quiet: bool, **values: Any) -> None:
    """Export backbone + taps + a trained side network as one model: images (N, 3, H, W) -> logits.

    RUNDIR_OR_CHECKPOINT is a run directory (its best member, or --member NAME), RUNDIR/members/NAME, or a
    .safetensors file. The model is checked (onnx.checker) and compared with featcache's own PyTorch path on
    real images before it is written; docs/deploy.md shows how to run it without featcache.
    """
    from featcache.export import export_run

    report = export_run(run, out, take(ExportOptions, values, progress=not quiet))
    if as_json:
        print_json(report.to_dict())
