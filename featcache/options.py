"""Every stage's options, one typed and validated set each (``featcache.config``), with no heavy imports: the command
line is generated from them (cli/options.py) and ``featcache --help`` loads no torch.

``ExtractOptions`` (``extract``; the backbone's own, ``BackboneSpec``, live in manifest.py, part of the store
format), ``TrainOptions`` (``train``), ``TrainConfig`` (one sweep member: the training keys of ``--set`` / ``--grid``;
its feature augmentation is an ``AugmentConfig``, featcache.augment), ``PredictOptions`` (``predict``) and
``ExportOptions`` (``export``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from .config import DEVICE_HELP, STORAGE_HELP, Config, StorageOptions, config, did_you_mean, fields, option
from .errors import ConfigError, UsageError
from .manifest import COMPRESSORS, DEFAULT_BATCH_SIZE, DEFAULT_COMPRESSOR, DTYPES, READER_MODES, STREAM_BUFFER_MB

AUGMENTATIONS = ("none", "frofa", "tokendrop", "mixup", "cutmix")  # "none" aside: the order they are applied in
AUG_KEYS = ("aug", "tokendrop_rate", "mixup_alpha", "cutmix_alpha", "frofa_brightness", "frofa_contrast")


def parse_layers(text: str | None) -> list[int] | str | None:
    """``--layers``: ``all`` (None), ``every:G`` (kept as text: resolved against the model's taps, see
    ``taps.every_gth``) or comma-separated tap positions, e.g. ``0,4,8,12``."""
    if text is None or text.strip().lower() == "all":
        return None
    if text.strip().lower().startswith("every"):
        return text.strip().lower()
    try:
        return [int(p) for p in text.split(",") if p.strip() != ""]
    except ValueError:
        raise UsageError(
            f"--layers expects 'all', every:G or comma-separated tap indices like 0,4,8, got {text!r}"
        ) from None


@config(UsageError, cli=True)
class ExtractOptions(Config):
    """Everything about one extraction except the backbone, the data and the store."""

    split: str = option("train", "Split name inside the store.")
    layers: list[int] | str | None = option(
        "all",
        "Taps to store: all, every:G (the embedding, the last block and every G-th block counted back from it: "
        "what LAST with gap G reads), or tap positions.",
        metavar="all|every:G|N,M,..",
        validate_default=True,
    )
    batch_size: int | None = option(
        None,
        "Backbone inputs per forward pass (images x views) [default: "
        f"{DEFAULT_BATCH_SIZE}, or the split's recorded one with --resume].",
        ge=1,
    )
    device: str = option("auto", DEVICE_HELP)
    dtype: Literal[DTYPES] = option(
        "float16", "Cache dtype; int8 and float8_e4m3 store 8-bit codes and one bfloat16 scale per token row."
    )
    resume: bool = option(False, "Continue an interrupted extraction of this split.")
    overwrite: bool = option(False, "Replace an existing split of the same name.")
    repair: bool = option(
        False, "With --resume: read the whole split first and recompute the shards whose data is damaged."
    )
    compressor: Literal[COMPRESSORS] | None = option(
        None,
        "Chunk compressor; auto: lz4 for the taps that a probe batch shows compressible (post-ReLU maps), none "
        f"for dense ones [default: {DEFAULT_COMPRESSOR}, or the split's recorded one with --resume].",
    )
    views: int = option(
        1,
        "Views per image: view 0 the eval transform, views 1..K-1 training-transform draws "
        "(deterministic per image and view); 1 = the eval transform alone.",
        ge=1,
    )
    seed: int = option(0, "Augmentation seed for --views > 1.")
    limit: int | None = option(None, "Use a fixed stratified subset of N images.", ge=1)
    progress: bool = True
    chunk_images: int | None = Field(None, ge=1)  # overrides of feature_store.choose_chunking (tests, tuning)
    shard_images: int | None = Field(None, ge=1)
    loader_workers: int | None = Field(None, ge=0)  # DataLoader processes; None = default_loader_workers()
    writer_threads: int | None = None  # shard writer threads; None = default_writer_threads()
    durable: bool = True  # fsync each shard before its completion record (local paths)
    storage_options: StorageOptions = option(None, STORAGE_HELP, flag="--storage-option", metavar="KEY=VALUE")

    @field_validator("layers", mode="before")
    @classmethod
    def _layers(cls, value: Any) -> Any:
        return parse_layers(value) if isinstance(value, str) else value

    def __post_init__(self) -> None:
        if not self.split or self.split.startswith("_") or "/" in self.split or "://" in self.split:
            raise UsageError(
                f"--split {self.split!r} is not allowed: use letters, digits, '-' or '.' (not a leading '_', no '/')"
            )
        if self.resume and self.overwrite:
            raise UsageError(
                "--resume and --overwrite exclude each other: resume continues a split, overwrite replaces it"
            )
        if self.repair and not self.resume:
            raise UsageError(
                "--repair needs --resume: it continues the split and recomputes the shards that "
                "featcache inspect --verify finds damaged"
            )


@config(UsageError, cli=True)
class TrainOptions(Config):
    """How a sweep is trained, besides the sweep itself: the splits, how taps are read, the device and what
    happens to RUNDIR. What ``featcache train`` parses apart from --method, --set and --grid."""

    split: str = option("train", "Split to train on.")
    val_fraction: float = option(
        0.1,
        "Without a val split: a stratified, seeded share of --split held out to choose "
        "epochs and members (0: no selection, the last epoch is taken).",
        ge=0,
        lt=1,
    )
    val_split: str | None = option(
        None, "A stored split that chooses epochs and members (default: 'val' when the store has one)."
    )
    select_on: str | None = option(
        None, "Choose on this split even if it is the test split (the summary says so).", metavar="NAME"
    )
    val_seed: int = 0  # seeds the held-out draw
    eval_split: str | None = option(
        None,
        "Split reported each evaluation and for the chosen epoch, never used to "
        "choose (default: test when the store has one).",
    )
    reader: Literal[READER_MODES] = option(
        "auto", "How taps are fed: resident on GPU, in RAM, or streamed from the store."
    )
    stream_buffer_mb: float = option(
        STREAM_BUFFER_MB, "stream reader: shuffle window in MB; no single read is larger.", metavar="MB", ge=1
    )
    prefetch: int | None = option(
        None,
        "stream reader: blocks read ahead by background threads (default: as many "
        "as the measured read time needs, at least 2).",
        metavar="N",
        ge=1,
    )
    tensorboard: bool | None = option(
        None,
        "Also write the metrics as TensorBoard event files in "
        "RUNDIR/tensorboard/MEMBER (default: when the tensorboard package is installed).",
    )
    tta: bool = option(
        False,
        "Test-time augmentation: score splits extracted with --views K on the mean logits of all "
        "K views (view 0 eval transform, the others training draws) instead of view 0 alone; predict "
        "--tta computes the same.",
    )
    halving: int | None = option(
        None,
        "Successive halving: at each rung rank the live members on validation (val_acc, then val_loss) and keep the "
        "best ceil(n/ETA); the others stop, their checkpoints kept (docs/training.md).",
        metavar="ETA",
        ge=2,
    )
    halving_min_epochs: int | None = option(
        None,
        "With --halving: epochs before the first rung; the next rungs at ETA times the previous one [default: "
        "epochs / ETA^s, s = ceil(log_ETA(members)) - 1, so that about ETA members reach the last epoch].",
        metavar="N",
        ge=1,
    )
    device: Any = option("auto", DEVICE_HELP)  # or a torch.device
    resume: bool = option(False, "Continue an interrupted run in RUNDIR from its last finished epoch.")
    overwrite: bool = option(False, "Replace an existing run directory.")
    progress: bool = True
    storage_options: StorageOptions = option(None, STORAGE_HELP, flag="--storage-option", metavar="KEY=VALUE")

    def __post_init__(self) -> None:
        if self.resume and self.overwrite:  # (plan_evaluation checks the splits against the store)
            raise UsageError(
                "--resume and --overwrite exclude each other: resume continues RUNDIR, overwrite replaces it"
            )
        if self.halving_min_epochs is not None and self.halving is None:
            raise UsageError("--halving-min-epochs needs --halving ETA: it places the first rung of successive halving")

    def stream_options(self) -> dict[str, Any]:
        return {k: v for k, v in (("buffer_mb", self.stream_buffer_mb), ("prefetch", self.prefetch)) if v is not None}


@config(frozen=True, name="augmentation")
class AugmentConfig(Config):
    """Which feature augmentations to apply and how strongly (featcache.augment); hashable, for grouping members.

    ``aug`` is normalised to the application order ("tokendrop+frofa" -> "frofa+tokendrop"), so equal
    augmentations compare equal. Values may arrive as text (``--set tokendrop_rate=0.1``).
    """

    aug: str = "none"
    tokendrop_rate: float = Field(0.2, ge=0, lt=1, allow_inf_nan=False)  # the fraction of patch tokens replaced
    mixup_alpha: float = Field(0.8, gt=0, allow_inf_nan=False)  # lam ~ Beta(alpha, alpha)
    cutmix_alpha: float = Field(1.0, gt=0, allow_inf_nan=False)
    frofa_brightness: float = Field(0.1, ge=0, le=1, allow_inf_nan=False)  # the largest shift / the channel's range
    frofa_contrast: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False)  # gamma ~ U(1 - k, 1 + k)

    def __post_init__(self) -> None:
        names = [n.strip().lower() for n in self.aug.split("+")]
        for n in names:
            if n not in AUGMENTATIONS:
                raise ConfigError(
                    f"aug: unknown augmentation {n!r}{did_you_mean(n, AUGMENTATIONS)} Choose from "
                    f"{', '.join(AUGMENTATIONS)}, several joined by '+' (e.g. tokendrop+frofa)"
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"aug: {self.aug!r} names an augmentation twice")
        if "none" in names and len(names) > 1:
            raise ConfigError(f"aug: 'none' cannot be combined with others, got {self.aug!r}")
        object.__setattr__(self, "aug", "+".join(n for n in AUGMENTATIONS if n in names))

    @property
    def names(self) -> tuple[str, ...]:
        """The augmentations in application order; () for "none"."""
        return () if self.aug == "none" else tuple(self.aug.split("+"))


_AUG = fields(AugmentConfig)


@config()
class TrainConfig(Config):
    """Optimisation settings of one member: the training keys of ``--set`` / ``--grid`` (docs/training.md)."""

    epochs: int = option(30, "Passes over the training split (shared by all members of a sweep).", ge=1)
    batch_size: int = option(64, "Samples per step (shared by all members of a sweep).", ge=1)
    lr: float = option(1e-3, "Peak learning rate.", gt=0, allow_inf_nan=False)
    weight_decay: float = option(0.05, "AdamW weight decay, on weight matrices only (not biases, norms, gates).", ge=0)
    warmup_epochs: float = option(1.0, "Linear warmup length in epochs, then cosine decay to 0.", ge=0)
    label_smoothing: float = option(0.0, "Cross-entropy label smoothing.", ge=0, lt=1)
    clip_grad: float = option(1.0, "Max global gradient norm per member; 0 = off.", ge=0)
    seed: int = option(0, "Side-network initialisation and batch order.")
    eval_every: int = option(1, "Epochs between evaluations (shared by all members of a sweep).", ge=1)
    # feature-space augmentation of the cached taps per batch: AugmentConfig's fields, checked by it
    aug: str = option(_AUG["aug"].default, "Feature augmentations joined by '+': frofa, tokendrop, mixup, cutmix.")
    tokendrop_rate: float = option(_AUG["tokendrop_rate"].default, "tokendrop: the fraction of patch tokens replaced.")
    mixup_alpha: float = option(_AUG["mixup_alpha"].default, "mixup: lam ~ Beta(alpha, alpha).")
    cutmix_alpha: float = option(_AUG["cutmix_alpha"].default, "cutmix: lam ~ Beta(alpha, alpha).")
    frofa_brightness: float = option(
        _AUG["frofa_brightness"].default, "frofa: the largest shift, a fraction of the channel's range."
    )
    frofa_contrast: float = option(_AUG["frofa_contrast"].default, "frofa: contrast gamma ~ U(1 - k, 1 + k).")

    def __post_init__(self) -> None:
        self.aug = self.augment().aug  # validated and in application order

    def augment(self) -> AugmentConfig:
        """This member's feature augmentation."""
        return AugmentConfig.from_dict({k: getattr(self, k) for k in AUG_KEYS})


TRAIN_KEYS = tuple(fields(TrainConfig))


@config(UsageError, cli=True)
class PredictOptions(Config):
    """What ``predict`` does besides the checkpoint and the images."""

    batch_size: int = option(64, "Images per forward pass.", ge=1)
    device: str = option("auto", DEVICE_HELP)
    weights: str | None = option(None, "Backbone weights, when the cache's weights source is not at hand here.")
    limit: int | None = option(None, "Predict a fixed stratified subset of N images.", ge=1)
    tta: bool = option(
        False,
        "Average each image's logits over the views the run evaluated with train --tta (view 0 "
        "eval transform, the others the cached training-transform draws, seeded per image and view).",
    )
    csv_path: str | Path | None = option(None, "Also write predictions as CSV.", flag="--csv", metavar="FILE")
    progress: bool = True
    num_workers: int | None = None  # DataLoader processes; None = default_loader_workers()


EXPORT_FORMATS = ("onnx", "pt2")


@config(UsageError, cli=True)
class ExportOptions(Config):
    """What ``export`` does besides the run and the output file (featcache.export, docs/deploy.md)."""

    format: Literal[EXPORT_FORMATS] = option(
        "onnx", "onnx: one ONNX graph (runs in onnxruntime); pt2: a torch.export program (torch.export.load)."
    )
    member: str | None = option(None, "The sweep member to export [default: the run's best, best.json].")
    opset: int = option(20, "ONNX opset of the graph.", ge=18)
    tolerance: float = option(
        1e-3,
        "Largest |logit difference| allowed between the exported model and featcache's PyTorch path on the "
        "validation images; above it nothing is written.",
        gt=0,
        allow_inf_nan=False,
    )
    data: str | None = option(
        None,
        "Validation images (any --data SPEC) [default: the images of the split the run trained on, as the store "
        "records them].",
        metavar="SPEC",
    )
    images: int = option(8, "Validation images compared (one batch).", ge=1)
    weights: str | None = option(None, "Backbone weights, when the cache's weights source is not at hand here.")
    overwrite: bool = option(False, "Replace an existing --out file.")
    progress: bool = True
    optimize: bool = True  # onnxscript's graph optimizer on the ONNX graph (tests skip it to save time)
