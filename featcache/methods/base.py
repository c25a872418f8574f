"""What every side network shares: its input description, its config base class, the module base class
and the registry that maps method names to (config class, network class).

Side networks read a dict of tap tensors (N, T, C) and return logits (N, num_classes). They never see
the backbone itself (only, optionally, its state dict once at initialisation) and know nothing of the
store. Every network must run under ``torch.func.vmap`` over stacked parameters (the trainer's sweep):
no in-place ops on parameters, no ``.item()``, no data-dependent Python branches, no BatchNorm,
attention through ``F.scaled_dot_product_attention``. Dropout only as ``F.dropout(x, p, self.training)``
(functional, out of place): the bank runs members under ``vmap(randomness="different")`` (each member
draws its own masks) or one by one, sets the template module to train mode for training steps and to
eval mode for evaluation; checkpoints load in eval mode.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..config import Config, config, did_you_mean
from ..errors import ConfigError
from ..manifest import TapInfo
from ..options import TRAIN_KEYS

TRAINING_KEYS = frozenset(TRAIN_KEYS)  # the trainer's (--set routes keys by name): no method config may use them
BACKBONE_KINDS = ("vit", "cnn")

# On CPU, vmap over F.scaled_dot_product_attention falls back to a per-member loop (correct, and the
# same FLOPs) and warns about it on every new shape; the warning is about torch internals, not the user.
warnings.filterwarnings("ignore", message=r".*batching rule for aten::_scaled_dot_product", category=UserWarning)


# ---------------------------------------------------------------------------------------------
# Input description


@dataclass
class MethodInput:
    """What a side network is built from: the store's taps, the task and (optionally) backbone facts.

    ``final_norm`` (the ViT's final LayerNorm ``weight``/``bias``), ``backbone_state`` (a zero-argument
    callable returning the backbone's state dict; LST's pruned init) and ``backbone_heads`` (the ViT's
    attention head count, which a state dict does not show; the manifest's ``backbone.num_heads``) and
    ``training_sample`` (``(tap names, n) -> ({tap: (n, T, C)}, labels (n,))``: n seeded training samples, never
    validation or test rows; LST's Fisher pruning) are used only at initialisation and are not serialised;
    ``memo`` keeps what an initialiser computed from them for the other members built from the same input.
    ``from_checkpoint`` is set by ``from_dict``: the weights
    will be loaded from a checkpoint, so initialisers that need backbone weights are skipped instead of failing.
    """

    taps: list[TapInfo]
    num_classes: int
    final_norm: dict[str, Tensor] | None = None
    backbone_kind: str = "vit"
    backbone_state: Callable[[], dict[str, Tensor]] | None = None
    from_checkpoint: bool = False
    backbone_heads: int | None = None
    training_sample: Callable[[list[str], int], tuple[dict[str, Tensor], Tensor]] | None = None
    memo: dict[Any, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        taps = [TapInfo.from_dict(t) if isinstance(t, dict) else t for t in self.taps]
        if not taps or not all(isinstance(t, TapInfo) for t in taps):
            raise ConfigError("MethodInput.taps must be a non-empty list of TapInfo (the store's taps)")
        self.taps = sorted(taps, key=lambda t: t.position)
        names = [t.name for t in self.taps]
        if len(set(names)) != len(names):
            raise ConfigError(f"tap names must be unique, got {names}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if self.backbone_kind not in BACKBONE_KINDS:
            raise ConfigError(f"backbone_kind must be one of {', '.join(BACKBONE_KINDS)}, got {self.backbone_kind!r}")
        if self.backbone_heads is not None and (
            isinstance(self.backbone_heads, bool) or not isinstance(self.backbone_heads, int) or self.backbone_heads < 1
        ):
            raise ConfigError(f"backbone_heads must be a positive integer or None, got {self.backbone_heads!r}")
        if self.final_norm is not None and not {"weight", "bias"} <= set(self.final_norm):
            raise ConfigError(f"final_norm must hold 'weight' and 'bias', got keys {sorted(self.final_norm)}")

    @property
    def tap_names(self) -> list[str]:
        return [t.name for t in self.taps]

    def tap(self, name: str, key: str = "taps") -> TapInfo:
        """The TapInfo called ``name``; a ConfigError naming the config ``key`` when the store lacks it."""
        for t in self.taps:
            if t.name == name:
                return t
        raise ConfigError(
            f"{key}: the store has no tap {name!r}{did_you_mean(name, self.tap_names)} "
            f"(it holds {', '.join(self.tap_names)}); choose among those"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (no tensors, no callables) for checkpoints."""
        return {
            "taps": [t.to_dict() for t in self.taps],
            "num_classes": self.num_classes,
            "backbone_kind": self.backbone_kind,
            "has_final_norm": self.final_norm is not None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodInput":
        """Rebuild from ``to_dict()`` output; marked ``from_checkpoint`` (weights come from the checkpoint)."""
        try:
            return cls(
                taps=[TapInfo.from_dict(t) for t in d["taps"]],
                num_classes=d["num_classes"],
                backbone_kind=d.get("backbone_kind", "vit"),
                from_checkpoint=True,
            )
        except (KeyError, TypeError) as err:
            raise ConfigError(
                f"method input description is incomplete or malformed ({err}); "
                "expected keys taps, num_classes, backbone_kind"
            ) from None


# ---------------------------------------------------------------------------------------------
# Config base class


@config()
class MethodConfig(Config):
    """Base of the per-method configs (``@config()`` classes too): fields with defaults, coerced to their types
    (values may arrive as text: ``--set rank=8``, "null" for None) and checked by ``featcache.config``, then by
    ``validate()`` (raise ``ConfigError`` naming the key and the fix); JSON round trip.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check value ranges; raise ConfigError naming the key and what to do."""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (list(v) if isinstance(v, (list, tuple)) else v)
            for k, v in ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        }


def check(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError('<key>: <message>')`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def normalize_taps(value: str | list[str], key: str, keywords: tuple[str, ...]) -> str | list[str]:
    """A tap selection: one of ``keywords`` or a non-empty list of tap names (text 'a,b' is split)."""
    if isinstance(value, str):
        if value in keywords:
            return value
        value = [v.strip() for v in value.split(",") if v.strip()]
    check(len(value) > 0, key, f"must be {' or '.join(map(repr, keywords))} or a non-empty list of tap names")
    check(len(set(value)) == len(value), key, f"lists a tap twice: {value}")
    return list(value)


# ---------------------------------------------------------------------------------------------
# Network base class


def _cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


# torch's FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel; add it.
_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


class SideNetwork(nn.Module):
    """Base class: ``forward(taps) -> (N, num_classes)`` logits = ``head(features(taps))``.

    Subclasses set ``self.required_taps`` (the taps ``forward`` reads, in order), ``self.head`` and
    implement ``features``. ``name`` and ``config_class`` are filled in by ``register``. ``config`` is the
    resolved config (automatic values that depend on the backbone filled in): save ``config.to_dict()``
    with the weights, and ``create(name, that dict, MethodInput.from_dict(...))`` rebuilds the same shapes.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    uses_attention: ClassVar[bool] = False  # calls scaled_dot_product_attention (the sweep bank runs such
    # members one by one on CPU, where vmap has no batching rule for the fused attention kernels)

    def __init__(self, config: MethodConfig, tap_info: MethodInput) -> None:
        super().__init__()
        self.config = config
        self.num_classes = tap_info.num_classes
        self.backbone_kind = tap_info.backbone_kind
        self.input_description = tap_info.to_dict()  # JSON-able; the tensors and callables are not kept
        self.tap_infos = {t.name: t for t in tap_info.taps}
        self.required_taps: list[str] = []
        self._flops: int | None = None

    # -- to implement
    def features(self, taps: dict[str, Tensor]) -> Tensor:
        """The pre-logits feature (N, D) the linear head reads."""
        raise NotImplementedError

    def forward(self, taps: dict[str, Tensor]) -> Tensor:
        return self.head(self.features(taps))  # (N, num_classes)

    # -- helpers for subclasses
    def read_tap(self, taps: dict[str, Tensor], name: str) -> Tensor:
        """Tap ``name`` from a batch, shape-checked and cast to the parameters' dtype (unless autocasting)."""
        if name not in taps:
            raise ConfigError(
                f"the batch lacks tap {name!r}, which this {self.name} network reads "
                f"(required_taps = {self.required_taps}); load those taps"
            )
        x = taps[name]  # (N, T, C)
        info = self.tap_infos[name]
        if x.dim() != 3 or tuple(x.shape[1:]) != (info.tokens, info.channels):
            raise ConfigError(
                f"tap {name!r} has shape {tuple(x.shape)}, expected (N, {info.tokens}, {info.channels}) "
                "as the store's manifest says; rebuild the network from this store's taps"
            )
        dtype = self.head.weight.dtype
        if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)
        return x

    # -- reporting
    def param_count(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def example_taps(self, batch: int = 1) -> dict[str, Tensor]:
        """Zero tap tensors (batch, T, C) for the required taps, on the parameters' device."""
        device = self.head.weight.device
        return {
            n: torch.zeros(batch, self.tap_infos[n].tokens, self.tap_infos[n].channels, device=device)
            for n in self.required_taps
        }

    def flops_per_sample(self) -> int:
        """Forward FLOPs for one sample, measured with ``torch.utils.flop_counter.FlopCounterMode``.

        Counts matrix products (linear layers, attention's QK^T and AV; 2 FLOPs per multiply-add); norms,
        activations, softmax, pooling and additions are not counted. Training costs about 3x this.
        """
        if self._flops is None:
            with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
                self(self.example_taps(1))
            self._flops = int(counter.get_total_flops())
        return self._flops

    def describe_extra(self) -> dict[str, Any]:
        """Method-specific structure for ``describe()`` (e.g. which taps feed which side block)."""
        return {}

    def describe(self) -> dict[str, Any]:
        """JSON-able summary: method, config, input, taps read, parameter count, FLOPs."""
        return {
            "method": self.name,
            "config": self.config.to_dict(),
            "input": self.input_description,
            "required_taps": list(self.required_taps),
            "param_count": self.param_count(),
            "flops_per_sample": self.flops_per_sample(),
            "flops_counted": "matmuls (FlopCounterMode)",
            **self.describe_extra(),
        }


class TokenWeights:
    """The weights of a grid's patch tokens in their mean (``TapInfo.patch_weights``: a token pooled from fewer
    positions weighs less), or None for a plain mean. Derived from the taps, so not module state (checkpoints
    and a bank's stacked member states stay as they are); copied once per device and dtype."""

    def __init__(self, weights: list[float] | None) -> None:
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)
        self._copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @classmethod
    def of_tap(cls, info: TapInfo) -> "TokenWeights":
        return cls(info.patch_weights())

    @classmethod
    def of_grid(cls, infos: list[TapInfo], grid: tuple[int, int]) -> "TokenWeights":
        """The weights of the common grid (``common_grid``, ``to_grid``): those of the deepest tap on that grid,
        so that the mean covers the image as the unpooled map does; a plain mean when no tap lies on it."""
        on_grid = [t for t in infos if tuple(t.grid) == tuple(grid)]
        return cls(max(on_grid, key=lambda t: t.position).patch_weights() if on_grid else None)

    def like(self, x: Tensor) -> Tensor | None:
        """The weights on x's device in x's dtype (None: a plain mean)."""
        if self.weights is None:
            return None
        key = (x.device, x.dtype)
        if key not in self._copies:
            self._copies[key] = self.weights.to(x.device, x.dtype)
        return self._copies[key]


def pool_tokens(x: Tensor, prefix_tokens: int, mode: str, weights: TokenWeights | None = None) -> Tensor:
    """(N, T, C) -> (N, C): the first (CLS) token, or the mean of the patch tokens (prefix tokens excluded),
    weighted by ``weights`` where tokens were pooled from windows of different sizes (then it equals the mean
    over the grid before pooling)."""
    if mode == "cls":
        return x[:, 0]
    w = weights.like(x) if weights is not None else None
    if w is None:
        return x[:, prefix_tokens:].mean(dim=1)
    return torch.einsum("ntc,t->nc", x[:, prefix_tokens:], w)


def common_grid(infos: list[TapInfo], key: str) -> tuple[int, tuple[int, int]]:
    """(prefix tokens, token grid) shared by ``infos``: the most prefix tokens and the smallest grid among them.

    Taps with fewer prefix tokens are padded to that count by ``to_grid`` (CaiT's and XCiT's class token
    appears only in their class-attention tail, PiT's class tokens only in its ``head`` tap): a CLS token
    that only the last tap has is kept, not dropped.
    """
    return max(t.prefix_tokens for t in infos), (min(t.grid[0] for t in infos), min(t.grid[1] for t in infos))


def to_grid(x: Tensor, info: TapInfo, grid: tuple[int, int], prefix_tokens: int | None = None) -> Tensor:
    """(N, P + h*w, C) -> (N, P' + grid[0]*grid[1], C): adaptive average pooling of the patch tokens.

    Pooling is linear, so it commutes with the per-tap linear projections that follow; applying it to the
    raw (unbatched under vmap) tap first is cheaper. Prefix tokens pass through unchanged; when the common
    count ``prefix_tokens`` (P', default P) is larger, zero tokens are put in front of them.
    """
    p = info.prefix_tokens
    missing = (p if prefix_tokens is None else prefix_tokens) - p
    if tuple(info.grid) != tuple(grid):
        n, _, c = x.shape
        fmap = x[:, p:].transpose(1, 2).reshape(n, c, *info.grid)  # (N, C, h, w)
        weights = info.patch_weights()
        if weights is None:
            pooled = F.adaptive_avg_pool2d(fmap, grid)
        else:  # tokens pooled from fewer positions weigh less, as in the mean over the unpooled map
            w = torch.tensor(weights, device=x.device, dtype=x.dtype).view(1, 1, *info.grid)
            pooled = F.adaptive_avg_pool2d(fmap * w, grid) / F.adaptive_avg_pool2d(w, grid)
        pooled = pooled.flatten(2).transpose(1, 2)  # (N, h'*w', C)
        x = torch.cat([x[:, :p], pooled], dim=1) if p else pooled
    return F.pad(x, (0, 0, missing, 0)) if missing > 0 else x  # (N, P' + h'*w', C)


def init_layernorm(norm: nn.LayerNorm, state: dict[str, Tensor] | None) -> bool:
    """Copy ``state`` (weight, bias) into ``norm`` when the widths match; returns whether it did."""
    if state is None or tuple(state["weight"].shape) != tuple(norm.weight.shape):
        return False
    with torch.no_grad():
        norm.weight.copy_(state["weight"])
        norm.bias.copy_(state["bias"])
    return True


def make_head(width: int, num_classes: int) -> nn.Linear:
    """The classifier: Linear(width, num_classes), weights N(0, 0.02) truncated, bias 0 (timm's head init)."""
    head = nn.Linear(width, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


# ---------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class _Entry:
    config_class: type[MethodConfig]
    network_class: type[SideNetwork]


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, config_class: type[MethodConfig], network_class: type[SideNetwork]) -> None:
    """Make a method available to ``create`` under ``name`` (one call per method module)."""
    if name in _REGISTRY and _REGISTRY[name].network_class is not network_class:
        raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].network_class.__name__}")
    clash = sorted(set(config_class.keys()) & TRAINING_KEYS)
    if clash:
        raise ValueError(f"{config_class.__name__} fields {clash} clash with training keys; rename them")
    network_class.name = name
    network_class.config_class = config_class
    _REGISTRY[name] = _Entry(config_class, network_class)


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown method {name!r}{did_you_mean(name, list(_REGISTRY))}; available: {', '.join(list_methods())}"
        )
    return _REGISTRY[name]


def config_class(name: str) -> type[MethodConfig]:
    """The config dataclass of method ``name``."""
    return _entry(name).config_class


def create(name: str, config: MethodConfig | dict[str, Any] | None, tap_info: MethodInput) -> SideNetwork:
    """Build method ``name`` from its config (instance, dict or None = defaults) and the store's taps."""
    entry = _entry(name)
    if config is None or isinstance(config, dict):
        config = entry.config_class.from_dict(config)
    elif not isinstance(config, entry.config_class):
        raise ConfigError(f"method {name!r} takes a {entry.config_class.__name__}, got {type(config).__name__}")
    if not isinstance(tap_info, MethodInput):
        raise ConfigError(f"create() needs a MethodInput describing the store's taps, got {type(tap_info).__name__}")
    return entry.network_class(config, tap_info)


__all__ = [
    "TRAINING_KEYS",
    "MethodInput",
    "MethodConfig",
    "SideNetwork",
    "register",
    "create",
    "list_methods",
    "config_class",
    "check",
    "normalize_taps",
    "pool_tokens",
    "TokenWeights",
    "common_grid",
    "to_grid",
    "init_layernorm",
    "make_head",
]
