"""Backbone + trained side network on raw images: the live path that the cache stands in for.

``load_predictor`` rebuilds the frozen backbone from the checkpoint's store manifest (same timm
name, kwargs, weights and transform), checks that its weights fingerprint matches the one the cache
was made with, and joins it with the side network into one ``torch.nn.Module``. Taps are rounded
through the cache dtype, so the live logits equal the cached-path logits to that dtype's precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from featcache.allocator import keep_freed_memory
from featcache.backbone import Backbone
from featcache.checkpoint import Checkpoint, load_checkpoint
from featcache.data import DataSource, Subset, open_source, stratified_subset
from featcache.deployed import check_classes, prediction_result, write_predictions_csv
from featcache.device import AutocastPolicy, resolve_device
from featcache.errors import CheckpointError
from featcache.loader import default_loader_workers, image_loader, transform_pool, view_dataset
from featcache.manifest import BackboneSpec, Manifest, TapInfo
from featcache.methods.base import SideNetwork
from featcache.options import PredictOptions
from featcache.progress import bar, say
from featcache.store.codecs import round_trip


class Predictor(nn.Module):
    """images (N, 3, H, W) -> logits (N, classes): frozen taps in the precision the extraction used (``autocast``),
    rounded to the cache dtype, then the side network."""

    def __init__(
        self,
        backbone: Backbone,
        network: SideNetwork,
        cache_dtype: str,
        classes: list[str],
        autocast: AutocastPolicy | None = None,
    ) -> None:
        super().__init__()
        self.backbone, self.taps, self.network = backbone, backbone.taps, network
        self.cache_dtype, self.classes = cache_dtype, classes
        self.autocast = autocast or AutocastPolicy.for_cache(cache_dtype)

    @property
    def transform(self) -> Any:
        return self.backbone.transform

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), self.autocast.context(images.device):
            taps = self.taps(images)
        with torch.inference_mode():
            return self.logits_from_taps(taps)

    def logits_from_taps(self, taps: dict[str, torch.Tensor]) -> torch.Tensor:
        """Live taps -> logits: rounded through the cache dtype (exactly what the cache holds), then the side network;
        featcache.export traces this with ``self.taps`` into one graph."""
        rounded = {k: round_trip(v, self.cache_dtype) for k, v in taps.items()}
        return self.network(rounded).float()

    def forward_views(self, views: torch.Tensor) -> torch.Tensor:
        """(N, V, 3, H, W) views of each image -> (N, classes): the mean of the views' logits, as training scores
        a split's cached views with ``--tta``."""
        n, v = views.shape[:2]
        return self(views.flatten(0, 1)).reshape(n, v, -1).mean(dim=1)


def load_predictor(checkpoint: str | Path | Checkpoint, device: str = "auto", weights: str | None = None) -> Predictor:
    """A run directory (its best member), a member directory or its .safetensors -> a ``Predictor`` (images ->
    logits, with ``.transform`` and ``.classes``); refuses a backbone whose weights differ from the cache's.

    ``weights``: the backbone's weights when the recorded source is not at hand (a local state dict)."""
    keep_freed_memory()  # the backbone's large activations reuse heap pages (allocator.py)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    manifest = Manifest.from_attrs(ckpt.manifest, f"checkpoint {ckpt.path}")
    spec = BackboneSpec.from_dict(manifest.backbone["spec"])
    if weights is not None:
        spec = replace(spec, weights=weights)
    dev = resolve_device(device)
    by_name = {t.name: t for t in manifest.taps}
    needed = [by_name[n] for n in ckpt.network.required_taps]
    backbone = Backbone(spec, dev, positions=[t.position for t in needed])
    want = manifest.backbone.get("weights", {}).get("state_sha256")
    got = backbone.weights["state_sha256"]
    if want != got:
        raise CheckpointError(
            f"the backbone weights found ({spec.weights}, sha256 {got[:12]}...) are not the ones the "
            f"cache of this checkpoint was made with (sha256 {str(want)[:12]}...); pass the right "
            "--weights file for the backbone"
        )
    if [_layout(live, rec) for live, rec in zip(backbone.taps.infos, needed)] != [t.to_dict() for t in needed]:
        raise CheckpointError(
            f"backbone {spec.model} gives taps that differ from the cache's "
            f"({[t.name for t in needed]}); timm or model kwargs changed since extraction"
        )
    recorded = manifest.transform.get("eval")
    if recorded is not None and recorded != repr(backbone.transform):
        raise CheckpointError(
            f"the eval transform rebuilt for {spec.model} differs from the one the cache was made "
            f"with ({' '.join(recorded.split())[:160]}...); use the timm version that extracted it "
            f"({manifest.environment.get('timm', 'unknown')})"
        )
    policy = AutocastPolicy.from_manifest(manifest.autocast, manifest.dtype)
    return Predictor(backbone, ckpt.network.to(dev), manifest.dtype, ckpt.classes, policy).eval()


def _layout(live: TapInfo, recorded: TapInfo) -> dict[str, Any]:
    """A live tap's description, compared with the recorded one; an older store's pooled tap may not record its
    windows (they follow from the grid and --pool-tokens; its side networks were trained with plain means)."""
    d = live.to_dict()
    return {k: v for k, v in d.items() if k != "windows"} if recorded.windows is None else d


@dataclass(frozen=True)
class TTAViews:
    """The views ``predict --tta`` averages per image (``featcache.loader.view_dataset``)."""

    views: int
    seed: int
    eval_view: int | None  # 0: view 0 the eval transform; None: all training draws (a split of the old layout)


def tta_views(ckpt: Checkpoint, predictor: Predictor) -> TTAViews:
    """The views ``predict --tta`` computes for each image, as the checkpoint's run recorded them (``tta``: the
    views of the evaluated split with several): view 0 the eval transform and views 1..K-1 training-transform draws
    seeded by (seed, image index, view), or all K training draws for a split written before the eval view was kept.
    Refuses a checkpoint whose evaluated splits hold one view, or whose training transform rebuilds differently."""
    record = ckpt.config.get("tta")
    if not record:
        raise CheckpointError(
            f"--tta: the splits checkpoint {ckpt.path.parent} was evaluated on hold one view per "
            "image, so there are no views to average; extract the evaluated split with --views K "
            "and train again, or predict without --tta"
        )
    recorded = Manifest.from_attrs(ckpt.manifest, f"checkpoint {ckpt.path}").transform.get("train")
    rebuilt = repr(predictor.backbone.train_transform())
    if recorded is not None and recorded != rebuilt:
        raise CheckpointError(
            f"--tta: the training transform rebuilt for this backbone differs from the one the "
            f"cache's views were drawn with ({' '.join(recorded.split())[:160]}...); use the timm "
            "version that extracted them"
        )
    return TTAViews(int(record["views"]), int(record["seed"]), record.get("eval_view"))


def predict(
    checkpoint: str | Path, data: str | DataSource, options: PredictOptions | None = None, **overrides: Any
) -> dict[str, Any]:
    """Predictions for every image of ``data``; accuracy when labels are known. ``overrides`` replace fields of
    ``options`` (``predict(run, data, device="cpu")``).

    ``tta``: each image's logits are the mean over the views the checkpoint's run evaluated (``tta_views``): the
    same views of the same images as the cached split, so the accuracy equals the cached ``--tta`` accuracy."""
    opts = replace(options or PredictOptions(), **overrides)
    ckpt = load_checkpoint(checkpoint)
    predictor = load_predictor(ckpt, opts.device, opts.weights)
    views = tta_views(ckpt, predictor) if opts.tta else None
    source = open_source(data) if isinstance(data, str) else data
    check_classes(source, predictor.classes)
    if opts.limit is not None:
        source = Subset(source, stratified_subset(source.labels(), opts.limit))
    dev = predictor.backbone.device
    k = views.views if views is not None else 1
    workers = opts.num_workers if opts.num_workers is not None else default_loader_workers(dev, views=k)
    if views is not None:  # seeded per (image, view) through the global RNGs: worker processes, not threads
        pool = None
        loader = torch.utils.data.DataLoader(
            view_dataset(source, predictor.backbone, views.views, views.seed, views.eval_view),
            batch_size=max(1, opts.batch_size // k),
            num_workers=workers,
        )
    else:
        pool = transform_pool(workers, views=1)  # as in extraction: on a CPU, transform between forwards
        loader = image_loader(source, predictor.transform, opts.batch_size, workers, pool)
    ids = source.ids()
    preds, probs, labels = [], [], []
    with pool or contextlib.nullcontext(), bar(len(source), "predict", progress=opts.progress) as pbar:
        for images, y, _ in loader:
            images = images.to(dev)
            logits = predictor.forward_views(images) if views is not None else predictor(images)
            p = logits.softmax(-1)
            preds.append(p.argmax(-1).cpu())
            probs.append(p.max(-1).values.cpu())
            labels.append(y)
            pbar.update(len(y))
    pred, prob, label = torch.cat(preds).numpy(), torch.cat(probs).numpy(), torch.cat(labels).numpy()
    result = prediction_result(ids, pred, prob, label, predictor.classes)
    if views is not None:
        tta = {"views": views.views, "seed": views.seed, "eval_view": views.eval_view}
        result = {"num_images": result.pop("num_images"), "tta": tta, **result}  # the order predict always had
    if opts.csv_path is not None:
        write_predictions_csv(opts.csv_path, result["predictions"])
    rows = result["predictions"]
    acc = f", accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""
    say(f"predicted {len(rows)} images{acc}", quiet=not opts.progress)
    return result
