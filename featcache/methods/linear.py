"""``linear``: a linear probe on pooled tokens of one or several taps.

For each chosen tap z (N, T, C): optional per-token LayerNorm (as a ViT applies its final norm before
pooling; initialised from the backbone's final norm for the store's last tap when that is given), then
pooling (CLS token, or mean of the patch tokens; CNN taps have no CLS token), then the pooled vectors of
all chosen taps are concatenated and a linear layer gives the logits:

    logits = W [pool(LN_1(z_1)); ...; pool(LN_k(z_k))] + b

The LayerNorm's affine part is per channel, so it commutes with pooling (a mean or a token pick): the
probe normalises, pools, then scales and shifts. Same result; in a sweep bank the normalisation of the
shared batch is computed once for all members instead of once per member at full token resolution.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import config
from .base import (
    MethodConfig,
    MethodInput,
    SideNetwork,
    TokenWeights,
    check,
    init_layernorm,
    make_head,
    normalize_taps,
    pool_tokens,
    register,
)

POOLS = ("avg", "cls")
NORMS = ("layernorm", "none")


@config()
class LinearConfig(MethodConfig):
    """taps: "last" (the store's last tap), "all", or tap names (pooled features are concatenated);
    pool: "avg" (mean of patch tokens) or "cls" (first token; ViTs only); norm: per-token LayerNorm before
    pooling ("layernorm") or none."""

    taps: str | list[str] = "last"
    pool: Literal[POOLS] = "avg"
    norm: Literal[NORMS] = "layernorm"

    def validate(self) -> None:
        self.taps = normalize_taps(self.taps, "taps", ("last", "all"))


def resolve_pool(pool: str, prefix_tokens: int, key: str = "pool") -> None:
    """pool="cls" needs a prefix (CLS) token; CNN taps and ViTs without one must use pool=avg."""
    check(
        pool != "cls" or prefix_tokens > 0,
        key,
        "'cls' needs a CLS token, but these taps have no prefix tokens (a CNN, or a ViT without class "
        "token); use pool=avg",
    )


class LinearProbe(SideNetwork):
    """Linear head on pooled (and optionally normalised) tokens of the chosen taps."""

    def __init__(self, config: LinearConfig, tap_info: MethodInput) -> None:
        super().__init__(config, tap_info)
        if config.taps == "last":
            infos = [tap_info.taps[-1]]
        elif config.taps == "all":
            infos = list(tap_info.taps)
        else:
            infos = sorted((tap_info.tap(n) for n in config.taps), key=lambda t: t.position)
        for t in infos:
            resolve_pool(config.pool, t.prefix_tokens)
        self.required_taps = [t.name for t in infos]
        self.token_weights = {t.name: TokenWeights.of_tap(t) for t in infos}  # pooled windows weigh by size
        last = tap_info.taps[-1].name
        self.norms = nn.ModuleDict()
        self.norm_from_backbone: list[str] = []
        if config.norm == "layernorm":
            for t in infos:
                self.norms[t.name] = nn.LayerNorm(t.channels, eps=1e-6)
                if t.name == last and init_layernorm(self.norms[t.name], tap_info.final_norm):
                    self.norm_from_backbone.append(t.name)
        self.head = make_head(sum(t.channels for t in infos), tap_info.num_classes)

    def features(self, taps: dict[str, Tensor]) -> Tensor:
        pooled = []
        for name in self.required_taps:
            x = self.read_tap(taps, name)  # (N, T, C)
            norm = self.norms[name] if name in self.norms else None
            if norm is not None:  # normalise per token; the affine part commutes with pooling, so it comes after
                x = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
            x = pool_tokens(x, self.tap_infos[name].prefix_tokens, self.config.pool, self.token_weights[name])  # (N, C)
            pooled.append(x if norm is None else x * norm.weight + norm.bias)
        return pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=1)  # (N, sum C)

    def describe_extra(self) -> dict[str, Any]:
        return {"feature_width": self.head.in_features, "norm_from_backbone": self.norm_from_backbone}


register("linear", LinearConfig, LinearProbe)
