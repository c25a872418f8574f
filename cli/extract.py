"""``featcache extract``: one backbone pass over a data set into a split of a feature store."""

from __future__ import annotations

import click

from featcache.vocabulary import COMPRESSORS, DEFAULT_BATCH_SIZE, DEFAULT_COMPRESSOR, DTYPES, WEIGHT_CHOICES_HELP
from featcache.keyvalue import parse_assignments
from featcache.progress import say

from .options import cluster_options, data_options, storage_option


@click.command("extract")
@click.option("--model", required=True, help="timm model name, e.g. vit_small_patch16_224.")
@click.option("--model-kwargs", "model_kwargs", multiple=True, metavar="KEY=VALUE",
              help="Keyword argument for timm.create_model (repeatable), e.g. img_size=224.")
@click.option("--weights", default="hub", show_default=True, help=f"Weights: {WEIGHT_CHOICES_HELP}.")
@data_options
@click.option("--out", required=True, metavar="STORE", help="Store path or fsspec URL (created if missing).")
@click.option("--split", default="train", show_default=True, help="Split name inside the store.")
@click.option("--layers", default="all", show_default=True, metavar="all|every:G|N,M,..",
              help="Taps to store: all, every:G (the embedding, the last block and every G-th block counted back from "
                   "it: what LAST with gap G reads), or tap positions.")
@click.option("--batch-size", type=int, default=None,
              help=f"Backbone inputs per forward pass (images x views) [default: {DEFAULT_BATCH_SIZE}, or the "
                   "split's recorded one with --resume].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", show_default=True,
              help="Cache dtype; int8 and float8_e4m3 store 8-bit codes and one bfloat16 scale per token row.")
@click.option("--pool-tokens", type=int, default=1, show_default=True, metavar="K",
              help="Average each KxK window of every tap's patch-token grid (prefix tokens kept); predict does the "
                   "same.")
@click.option("--resume", is_flag=True, help="Continue an interrupted extraction of this split.")
@click.option("--overwrite", is_flag=True, help="Replace an existing split of the same name.")
@click.option("--repair", is_flag=True,
              help="With --resume: read the whole split first and recompute the shards whose data is damaged.")
@click.option("--compressor", type=click.Choice(COMPRESSORS), default=None,
              help="Chunk compressor; auto: lz4 for the taps that a probe batch shows compressible (post-ReLU maps), "
                   f"none for dense ones [default: {DEFAULT_COMPRESSOR}, or the split's recorded one with --resume].")
@click.option("--views", type=int, default=1, show_default=True,
              help="Views per image: view 0 the eval transform, views 1..K-1 training-transform draws (deterministic per "
                   "image and view); 1 = the eval transform alone.")
@click.option("--seed", type=int, default=0, show_default=True, help="Augmentation seed for --views > 1.")
@click.option("--image-size", type=int, default=None, help="Square input size (overrides the model's).")
@click.option("--crop-pct", type=float, default=None,
              help="Eval transform: resize to size / F, then centre-crop (default: the model's own crop_pct).")
@click.option("--resize-only", is_flag=True,
              help="Eval transform: resize to the input size, no crop (the VTAB protocol). Recorded in the store; "
                   "predict applies the same.")
@click.option("--limit", type=int, default=None, help="Use a fixed stratified subset of N images.")
@click.option("--quiet", is_flag=True, help="No progress bar and no summary line.")
@cluster_options
@storage_option
def command(model: str, model_kwargs: tuple[str, ...], weights: str, data: str, image_column: str | None,
            label_column: str | None, out: str, split: str, layers: str,
            batch_size: int | None, device: str, dtype: str, resume: bool, overwrite: bool, repair: bool,
            pool_tokens: int, compressor: str | None, views: int, seed: int, image_size: int | None,
            crop_pct: float | None,
            resize_only: bool, limit: int | None,
            quiet: bool, workers: int | None, scheduler: str | None, storage_options: tuple[str, ...]) -> None:
    """Run a frozen timm backbone once over --data and store every tapped activation in --out.

    \b
    Writes all selected taps, labels and ids of split --split, shard by shard; an interrupted run
    continues with --resume and gives the same arrays as an uninterrupted one; --resume --repair
    also recomputes shards that fail their checksums. With --workers N or --scheduler ADDRESS the
    shards are computed by dask workers (docs/scale.md).
    """
    from featcache.backbone import parse_layers
    from featcache.vocabulary import BackboneSpec
    from featcache.data import spec_with_columns
    from featcache.extraction import ExtractOptions, extract

    data = spec_with_columns(data, image_column, label_column)
    spec = BackboneSpec(model=model, model_kwargs=parse_assignments(model_kwargs, "--model-kwargs"), weights=weights,
                        image_size=image_size, crop_pct=crop_pct, resize_only=resize_only, pool_tokens=pool_tokens)
    options = ExtractOptions(split=split, layers=parse_layers(layers), batch_size=batch_size, device=device,
                             dtype=dtype, compressor=compressor, views=views, seed=seed, limit=limit, resume=resume,
                             overwrite=overwrite, repair=repair, progress=not quiet,
                             storage_options=parse_assignments(storage_options, "--storage-option") or None)
    if workers is not None or scheduler is not None:
        from featcache.scale import extract_on_cluster

        report = extract_on_cluster(spec, data, out, options, workers=workers, scheduler=scheduler)
    else:
        report = extract(spec, data, out, options)
    say(report.summary_line(), quiet)
