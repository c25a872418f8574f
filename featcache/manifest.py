"""The store format's manifest and split metadata, the value types they record, and the user-visible choices.

No heavy imports: every part of featcache speaks these types.

The store, the methods, training and the command line all use these; none of them needs torch, timm or
zarr here, so importing ``featcache.store``, ``featcache.methods`` or ``featcache.training`` never loads timm
and ``featcache --help`` loads neither torch nor timm.

- user-visible choices (cache dtypes, compressors, reader modes);
- ``TapInfo`` (one tapped activation) and ``BackboneSpec`` (how to rebuild the backbone);
- ``Manifest`` and ``SplitMeta``: the store's format, version 2, described below (version 1 still reads:
  format 2 adds the ``auto`` compressor, whose per-array choice ``SplitMeta.tap_compressors`` records, 8-bit
  scales stored as bfloat16 bits (uint16, attribute ``featcache_scale_dtype``) instead of float16, and the
  window sizes of pooled taps, ``TapInfo.windows``).

Root attributes of a store (a Zarr v3 group):
  featcache_format   int, FORMAT_VERSION
  featcache_version  the featcache version that created the store
  created            ISO-8601 UTC time of creation
  backbone           Backbone.describe(): spec (timm name, model kwargs, weights source, image size,
                     cnn grid, seed), weights (source, path, file_sha256, state_sha256), data_config,
                     pretrained_cfg, timm version, all taps the backbone offers
  transform          {"eval", "train"}: the eval and training transforms (repr), and their data config
  taps               the stored taps: list of TapInfo dicts
  dtype              "float16" | "bfloat16" | "float32" | "int8" | "float8_e4m3" (bfloat16 is stored as
                     uint16; the 8-bit dtypes as codes plus a bfloat16 scale per token row, float16 in stores
                     written before: store/codecs.py)
  compressor         {"name", "configuration"} of the first split's chunk compressor ("none" = no
                     compression; "auto": {"arrays": {array: "lz4" | "none"}, "min_ratio", "codec"});
                     every split records its own in SplitMeta.compressor (and .tap_compressors)
  final_norm         true when the group ``_backbone`` holds the ViT's final LayerNorm
  autocast           {"cuda", "cpu": autocast dtype | null, "tf32": bool | null}: the precision of the
                     backbone pass per device (device.AutocastPolicy; predict applies the same). Written now:
                     float32 everywhere, TF32 off. Earlier stores: {"cuda": "bfloat16"} for 16-bit caches
                     (float32 on CPU, TF32 as torch had it); no record at all: the same
  environment        versions of python, torch, timm, zarr and numpy that wrote the store
Split group attributes: ``featcache_split`` = SplitMeta; ``featcache_extraction`` = {finished,
featcache_version, nbytes, stored_bytes, seconds} once every shard is complete. A split of K > 1 views holds
the eval transform in view ``eval_view`` (0) and training-transform draws in the others (``view_transform``
"eval+train"); one without ``eval_view`` was written before that layout, and all its K views are training draws
(``view_transform`` "train").
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pydantic import Field

from featcache import __version__
from featcache.config import Config, config, key_values, option
from featcache.errors import FormatVersionError, StoreError, UsageError

# cache dtypes; bfloat16 is stored as uint16, the 8-bit ones as codes plus a 2-byte scale per token row
DTYPES = ("float16", "bfloat16", "float32", "int8", "float8_e4m3")
COMPRESSORS = ("auto", "lz4", "zstd", "none")  # chunk compressors (crc32c always follows)
# auto: lz4 for the taps that a probe batch shows compressible (post-ReLU maps), none for the rest (docs/store.md)
DEFAULT_COMPRESSOR = "auto"
DEFAULT_BATCH_SIZE = 32  # backbone inputs per forward pass during extraction
READER_MODES = ("auto", "gpu", "ram", "stream")
STREAM_BUFFER_MB = 512.0  # the stream reader's shuffle window, also its largest read
ModelKwargs = key_values("--model-kwargs")
WEIGHT_CHOICES_HELP = "a local .safetensors/.pth state dict, 'pypi:efficientnet-lite0', 'hub' or 'random'"


@dataclass(frozen=True)
class TapInfo:
    """One tapped activation: what the store holds per image as a (tokens, channels) array."""

    name: str
    position: int  # index in the backbone's full tap list; what --layers selects
    block: int  # blocks (ViT) or stages (CNN) run before this tap; 0 = embedding / stem
    tokens: int  # T, prefix tokens included
    prefix_tokens: int  # leading CLS / register tokens inside T
    channels: int  # C
    grid: tuple[int, int]  # spatial token grid (h, w); h * w + prefix_tokens == tokens
    pooling: str  # "none" for ViT tokens, "avg" for CNN maps pooled to `grid`
    # --pool-tokens K: how many rows / columns of the grid before pooling each row / column of `grid`
    # averages (K, .., K, then what is left); None when the tap was not pooled, or an older store's pooled
    # tap whose windows cannot be derived (see Manifest.from_attrs)
    windows: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def __post_init__(self) -> None:
        if self.windows is not None and tuple(map(len, self.windows)) != tuple(self.grid):
            raise StoreError(f"tap {self.name!r}: windows {self.windows} do not match its grid {self.grid}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["grid"] = list(self.grid)
        if self.windows is None:  # unpooled taps are described as before the field existed
            del d["windows"]
        else:
            d["windows"] = [list(w) for w in self.windows]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TapInfo":
        windows = d.get("windows")
        return cls(
            **{
                **d,
                "grid": tuple(d["grid"]),
                "windows": None if windows is None else (tuple(windows[0]), tuple(windows[1])),
            }
        )

    def patch_weights(self) -> list[float] | None:
        """The weight of each patch token (row-major, summing to 1) in a mean over the patch tokens that
        equals the mean over the grid before --pool-tokens: each token's share of the positions it averages.
        None when all tokens weigh the same (not pooled, or windows of one size)."""
        if self.windows is None or (len(set(self.windows[0])) <= 1 and len(set(self.windows[1])) <= 1):
            return None
        rows, cols = self.windows
        total = sum(rows) * sum(cols)
        return [r * c / total for r in rows for c in cols]


def pool_windows(n: int, k: int) -> tuple[int, ...]:
    """Sizes of the windows that ``--pool-tokens k`` averages along an axis of n tokens (ceil windows)."""
    return tuple(min(k, n - i) for i in range(0, n, k))


def derive_windows(
    grid: tuple[int, int], k: int, kind: str, cnn_grid: int
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The pooling windows of a pooled tap of a store written before they were recorded, where the manifest
    determines them: a CNN map is read at min(map, cnn_grid) per axis, so the grid before pooling is the one
    size in (k (g - 1), min(k g, cnn_grid)] when that range holds one (7 x 7 at k = 2 or 3). None otherwise."""
    if kind != "cnn" or k <= 1:
        return None
    sizes = [range(k * (g - 1) + 1, min(k * g, cnn_grid) + 1) for g in grid]
    if any(len(r) != 1 for r in sizes):
        return None
    return pool_windows(sizes[0][0], k), pool_windows(sizes[1][0], k)


@config(UsageError, cli=True)
class BackboneSpec(Config):
    """Everything needed to rebuild the same frozen backbone; recorded in every store manifest."""

    model: str = option(..., "timm model name, e.g. vit_small_patch16_224.")
    model_kwargs: ModelKwargs = option(
        {}, "Keyword argument for timm.create_model (repeatable), e.g. img_size=224.", metavar="KEY=VALUE"
    )
    weights: str = option("hub", f"Weights: {WEIGHT_CHOICES_HELP}.")
    image_size: int | None = option(None, "Square input size (overrides the model's).", ge=8)
    cnn_grid: int = Field(7, ge=1)  # CNN feature maps are pooled to at most cnn_grid x cnn_grid tokens
    seed: int = 0  # initialisation seed for weights="random"
    crop_pct: float | None = option(
        None, "Eval transform: resize to size / F, then centre-crop (default: the model's own crop_pct).", gt=0, le=1
    )
    resize_only: bool = option(
        False,
        "Eval transform: resize to the input size, no crop (the VTAB protocol). "
        "Recorded in the store; predict applies the same.",
    )
    pool_tokens: int = option(
        1,
        "Average each KxK window of every tap's patch-token grid (prefix tokens kept); predict does the same.",
        metavar="K",
        ge=1,
    )

    def __post_init__(self) -> None:
        if self.crop_pct is not None and self.resize_only:
            raise UsageError("--crop-pct and --resize-only exclude each other: --resize-only means no crop")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "BackboneSpec":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


FORMAT_VERSION = 2  # 2: "auto" and per-array compressors, bfloat16 8-bit scales, pooled taps' windows
SUPPORTED_FORMATS = (1, 2)


def check_format_version(found: Any, what: str) -> None:
    """Refuse a store or checkpoint of an unknown format version, with what to do."""
    if not isinstance(found, int):
        raise FormatVersionError(
            f"{what} has no valid featcache format version ({found!r}); it was not written by featcache or is damaged"
        )
    if found > FORMAT_VERSION:
        raise FormatVersionError(
            f"{what} uses featcache format {found}, newer than this featcache "
            f"({__version__}, format {FORMAT_VERSION}): upgrade featcache to read it"
        )
    if found not in SUPPORTED_FORMATS:
        raise FormatVersionError(
            f"{what} uses featcache format {found}, which this featcache ({__version__}) "
            f"no longer reads (supported: {SUPPORTED_FORMATS}); re-extract it"
        )


@dataclass
class Manifest:
    """What a store was made from: enough to reproduce it and to check compatibility."""

    backbone: dict[str, Any]
    taps: list[TapInfo]
    dtype: str = "float16"
    compressor: dict[str, Any] = field(default_factory=lambda: {"name": "none", "configuration": {}})
    transform: dict[str, Any] = field(default_factory=dict)
    final_norm: bool = False
    autocast: dict[str, Any] = field(default_factory=dict)  # the backbone pass's precision (device.AutocastPolicy)
    environment: dict[str, Any] = field(default_factory=dict)  # python, torch, timm, zarr, numpy versions
    featcache_format: int = FORMAT_VERSION
    featcache_version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise StoreError(f"unknown cache dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        names = [t.name for t in self.taps]
        if not names or len(set(names)) != len(names):
            raise StoreError(f"a store needs distinct tap names, got {names}")

    def to_attrs(self) -> dict[str, Any]:
        d = asdict(self)
        d["taps"] = [t.to_dict() for t in self.taps]
        return d

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], where: str = "store") -> "Manifest":
        check_format_version(attrs.get("featcache_format"), where)
        try:
            d = {k: attrs[k] for k in cls.__dataclass_fields__ if k in attrs}
            d["taps"] = [TapInfo.from_dict(t) for t in attrs["taps"]]
            d["taps"] = _with_derived_windows(d["taps"], attrs.get("backbone", {}))
            return cls(**d)
        except (KeyError, TypeError) as err:
            raise StoreError(f"{where} has a damaged manifest ({type(err).__name__}: {err}); re-extract it") from None

    @property
    def tap_names(self) -> list[str]:
        return [t.name for t in self.taps]

    def tap(self, name: str) -> TapInfo:
        for t in self.taps:
            if t.name == name:
                return t
        raise StoreError(f"the store holds no tap {name!r}; it has {', '.join(self.tap_names)}")

    def identity(self) -> dict[str, Any]:
        """The fields two extractions must share to write into one store."""
        spec = self.backbone.get("spec", {})
        return {
            "model": spec.get("model"),
            "model_kwargs": spec.get("model_kwargs"),
            "image_size": spec.get("image_size"),
            "cnn_grid": spec.get("cnn_grid"),
            "crop_pct": spec.get("crop_pct"),
            "resize_only": spec.get("resize_only", False),
            "pool_tokens": spec.get("pool_tokens", 1),
            "weights": self.backbone.get("weights", {}).get("state_sha256"),
            "input_size": self.backbone.get("data_config", {}).get("input_size"),
            # a pooled tap's windows follow from its grid and pool_tokens; older stores may not record them
            "taps": [{k: v for k, v in t.to_dict().items() if k != "windows"} for t in self.taps],
            "dtype": self.dtype,
        }

    def check_compatible(self, other: "Manifest", where: str) -> None:
        """Raise StoreError naming the first difference between this store and a new extraction."""
        mine, theirs = self.identity(), other.identity()
        for key in mine:
            if mine[key] != theirs[key]:
                a, b = _short(mine[key]), _short(theirs[key])
                raise StoreError(
                    f"{where} was made with {key} = {a}, but this run uses {key} = {b}; a store holds "
                    "one backbone, weights, taps and dtype: write to a new --out store"
                )


def _with_derived_windows(taps: list[TapInfo], backbone: dict[str, Any]) -> list[TapInfo]:
    """Taps of a store written before pooling windows were recorded, with the windows where the manifest
    determines them (``derive_windows``); the others are kept as they are (their token means unweighted)."""
    spec = backbone.get("spec", {}) if isinstance(backbone, dict) else {}
    k = spec.get("pool_tokens", 1)
    if not isinstance(k, int) or k <= 1:
        return taps
    kind, cnn_grid = backbone.get("kind", ""), spec.get("cnn_grid", 7)
    return [replace(t, windows=derive_windows(t.grid, k, kind, cnn_grid)) if t.windows is None else t for t in taps]


def _short(value: Any) -> str:
    text = repr(value)
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return value[:12] + "..."
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class SplitMeta:
    """Per-split attributes: sizes, chunking, classes and where the images came from."""

    num_samples: int
    chunk_images: int
    shard_images: int
    views: int = 1
    classes: list[str] = field(default_factory=list)
    data: str = ""  # the --data SPEC
    view_transform: str = "eval"  # "eval" (1 view), "eval+train" (view 0 eval, 1.. training draws); "train": old
    seed: int = 0  # augmentation seed when views > 1
    limit: int | None = None  # --limit: the split is stratified_subset(labels, limit, seed=0) of the data
    batch_size: int = 0  # backbone inputs per forward pass (0 = unknown); resume reuses it for bitwise equality
    compressor: str = ""  # chunk compressor of this split's tap arrays (COMPRESSORS name)
    tap_compressors: dict[str, str] = field(default_factory=dict)  # "auto": each tap array's chosen compressor
    eval_view: int | None = None  # the view holding the eval transform; None: written before it was recorded

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise StoreError("a split needs at least one image")
        if self.chunk_images < 1 or self.shard_images < self.chunk_images or self.shard_images % self.chunk_images:
            raise StoreError(
                f"shard_images ({self.shard_images}) must be a positive multiple of chunk_images ({self.chunk_images})"
            )
        if self.views < 1:
            raise StoreError(f"views must be >= 1, got {self.views}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_images)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """[start, stop) image range of a shard."""
        start = shard * self.shard_images
        return start, min(start + self.shard_images, self.num_samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def eval_view_index(self) -> int | None:
        """The stored view that holds the eval transform: 0 for a one-view split (always the eval transform), the
        recorded one for several views, None for a multi-view split written before featcache recorded it (its views
        are all training-transform draws)."""
        return 0 if self.views == 1 else self.eval_view

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, d: dict[str, Any]) -> "SplitMeta":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
