"""``last``: Low-rank Attention Side-Tuning (Tang et al., arXiv 2402.04009).

Taps: z_0 = the embedding output (ViT ``embed``, CNN ``stem``) and z_1..z_m = the outputs of every g-th
block. The side network is a chain of side blocks F_i, each ``depth`` low-rank attention layers

    a(x) = x + W_o softmax(Q K^T / sqrt(r/h)) V,  Q, K, V = LN(x) W_{q,k,v},  W_{q,k,v}: d -> r (h heads),
    W_o: r -> d, zero at start,

run as  u_0 = z_0,  u_i = F_i(u_{i-1} + z_i),  and the bias-corrected feature is

    f = u_m - sum_{i<m} z_i          (= z_m + the side network's corrections)

followed by a LayerNorm (initialised from the ViT's final norm when given), pooling and a linear head.
At initialisation (W_o = 0) f equals the frozen backbone's final tokens z_m, so the network starts as a
linear probe of the backbone's own feature.

Which taps (``taps="auto"``): ``gap`` counts backbone blocks (``TapInfo.block``). Blocks are grouped from
the end, (L-g, L], (L-2g, L-g], ..., and each group contributes its latest tap that the store holds.
With every block stored this is blocks L, L-g, L-2g, ... (> 0): the last block is always included and,
when L is not a multiple of g, the leftover blocks form a shorter first group (L=12, g=5: blocks 2, 7,
12). With a store holding only some taps (``--layers``) groups without a stored tap are skipped, so
g=1 uses every stored block tap. z_0 is the block-0 tap when the store has it, else zero (no z_0 term).
``taps=[...]`` names the taps explicitly (a block-0 tap first becomes z_0).

Several widths (CNN stages): every tap whose width differs from the side width d passes through its own
Linear(C_i, d); d defaults to the width of the last tap, which then needs no projection and keeps the
"starts as the backbone's feature" property. Several token grids (CNN stages at small inputs): every
tap's patch tokens are average-pooled to the smallest grid among the chosen taps (prefix tokens kept;
taps with fewer prefix tokens than the others, e.g. CaiT's blocks before its class-attention ``head``, get
zero tokens in front so that every tap has the same token layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import config
from ..manifest import TapInfo
from .base import (
    MethodConfig,
    MethodInput,
    SideNetwork,
    TokenWeights,
    check,
    common_grid,
    init_layernorm,
    make_head,
    normalize_taps,
    pool_tokens,
    register,
    to_grid,
)
from .linear import POOLS, resolve_pool


@config()
class LASTConfig(MethodConfig):
    """rank r of Q, K, V; heads h (r % h == 0); gap g in blocks; depth T = low-rank attention layers per
    side block; pool "avg"|"cls"; width of the side network (None = the last tap's width); taps "auto"
    (every g-th block, see the module doc) or explicit tap names."""

    rank: int = Field(32, ge=1)  # defaults: chosen by measurement, see docs/methods.md
    heads: int = Field(4, ge=1)
    gap: int = Field(2, ge=1)  # blocks between tapped outputs
    depth: int = Field(2, ge=1)  # attention layers per side block
    pool: Literal[POOLS] = "avg"
    width: int | None = Field(None, ge=1)  # None: the last tap's width
    taps: str | list[str] = "auto"

    def validate(self) -> None:
        check(
            self.rank % self.heads == 0,
            "rank",
            f"rank {self.rank} must be a multiple of heads {self.heads} (each head gets rank/heads dims); "
            f"change rank or heads",
        )
        self.taps = normalize_taps(self.taps, "taps", ("auto",))


def choose_taps(taps: list[TapInfo], gap: int) -> tuple[TapInfo | None, list[TapInfo]]:
    """(z_0 tap or None, [z_1..z_m taps]) by the gap rule of the module doc; ``taps`` sorted by position."""
    base = taps[0] if taps[0].block == 0 else None
    blocks = [t for t in taps if t is not base]
    if not blocks:  # only an embedding tap: it becomes z_1, z_0 = 0
        return None, [base] if base is not None else []
    last = blocks[-1].block
    picked: dict[int, TapInfo] = {}
    for t in reversed(blocks):  # latest tap of each group (last - g*(j+1), last - g*j]
        picked.setdefault((last - t.block) // gap, t)
    return base, sorted(picked.values(), key=lambda t: t.position)


class _NormThenLinear(torch.autograd.Function):
    """``linear(layer_norm(x))`` that keeps x, not the normalised copy, for backward and recomputes the
    LayerNorm there (one cheap pass): one (N, T, d) activation fewer per attention layer (docs/benchmarks.md)."""

    @staticmethod
    def forward(x: Tensor, ln_w: Tensor, ln_b: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
        return F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps), w, b)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, ln_w, ln_b, w, _, eps = inputs
        ctx.save_for_backward(x, ln_w, ln_b, w)
        ctx.eps = eps

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # grad: (N, T, out)
        x, ln_w, ln_b, w = ctx.saved_tensors
        need_x, need_lnw, need_lnb, need_w, need_b, _ = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in ((x, need_x), (ln_w, need_lnw), (ln_b, need_lnb))]
            y = F.layer_norm(leaves[0], (x.shape[-1],), leaves[1], leaves[2], ctx.eps)  # (N, T, d), recomputed
        flat = grad.reshape(-1, grad.shape[-1])  # (N*T, out)
        grad_w = flat.t() @ y.detach().reshape(-1, y.shape[-1]) if need_w else None  # (out, d)
        grad_b = flat.sum(0) if need_b else None
        wanted = [t for t in leaves if t.requires_grad]
        found = iter(torch.autograd.grad(y, wanted, grad @ w) if wanted else ())
        grad_x, grad_lnw, grad_lnb = (next(found) if t.requires_grad else None for t in leaves)
        return grad_x, grad_lnw, grad_lnb, grad_w, grad_b, None


class LowRankAttention(nn.Module):
    """x + W_o SDPA(LN(x) W_q, LN(x) W_k, LN(x) W_v): rank-r self-attention with h heads, W_o zero at start."""

    def __init__(self, width: int, rank: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * rank)
        self.proj = nn.Linear(rank, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        n, t, _ = x.shape  # (N, T, d)
        if (
            torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type)
            and not torch._C._are_functorch_transforms_active()
        ):
            qkv = _NormThenLinear.apply(
                x, self.norm.weight, self.norm.bias, self.qkv.weight, self.qkv.bias, self.norm.eps
            )
        else:  # inference, autocast, or under vmap (the CUDA sweep): the plain modules
            qkv = self.qkv(self.norm(x))
        qkv = qkv.reshape(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (3, N, h, T, r/h)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, h, T, r/h); scale 1/sqrt(r/h)
        return x + self.proj(y.transpose(1, 2).reshape(n, t, -1))  # (N, T, d)


class LAST(SideNetwork):
    """Low-rank attention side network with bias correction; see the module doc for the equations."""

    uses_attention = True

    def __init__(self, config: LASTConfig, tap_info: MethodInput) -> None:
        super().__init__(config, tap_info)
        if config.taps == "auto":
            base, rungs = choose_taps(tap_info.taps, config.gap)
        else:
            chosen = sorted((tap_info.tap(n) for n in config.taps), key=lambda t: t.position)
            base, rungs = choose_taps(chosen, gap=1)
        used = ([base] if base is not None else []) + rungs
        self.prefix_tokens, self.grid = common_grid(used, "taps")
        self.token_weights = TokenWeights.of_grid(used, self.grid)  # pooled windows weigh by size
        resolve_pool(config.pool, self.prefix_tokens)
        self.base_tap = base.name if base is not None else None
        self.rung_taps = [t.name for t in rungs]
        self.required_taps = [t.name for t in used]
        self.width = config.width or rungs[-1].channels
        self.config = dataclasses.replace(config, width=self.width)  # resolved, for checkpoints
        self.proj = nn.ModuleDict({t.name: nn.Linear(t.channels, self.width) for t in used if t.channels != self.width})
        self.side = nn.ModuleList(
            nn.Sequential(*[LowRankAttention(self.width, config.rank, config.heads) for _ in range(config.depth)])
            for _ in rungs
        )
        self.norm = nn.LayerNorm(self.width, eps=1e-6)
        self.norm_from_backbone = init_layernorm(self.norm, tap_info.final_norm)
        self.head = make_head(self.width, tap_info.num_classes)

    def _z(self, taps: dict[str, Tensor], name: str) -> Tensor:
        x = to_grid(self.read_tap(taps, name), self.tap_infos[name], self.grid, self.prefix_tokens)  # (N, T', C_i)
        return self.proj[name](x) if name in self.proj else x  # (N, T', d)

    def corrected(self, taps: dict[str, Tensor]) -> Tensor:
        """The bias-corrected side output f = u_m - sum_{i<m} z_i, (N, T', d), before the final norm."""
        u = self._z(taps, self.base_tap) if self.base_tap is not None else None  # u_0 = z_0
        skipped = u  # sum of the z_i (i < m) that were added into u
        for i, (name, block) in enumerate(zip(self.rung_taps, self.side)):
            z = self._z(taps, name)
            u = block(z if u is None else u + z)
            if i < len(self.rung_taps) - 1:
                skipped = z if skipped is None else skipped + z
        return u if skipped is None else u - skipped

    def features(self, taps: dict[str, Tensor]) -> Tensor:
        h = self.norm(self.corrected(taps))  # (N, T', d)
        return pool_tokens(h, self.prefix_tokens, self.config.pool, self.token_weights)  # (N, d)

    def describe_extra(self) -> dict[str, Any]:
        return {
            "z0_tap": self.base_tap,
            "side_block_taps": self.rung_taps,
            "width": self.width,
            "token_grid": list(self.grid),
            "projected_taps": list(self.proj.keys()),
            "norm_from_backbone": self.norm_from_backbone,
        }


register("last", LASTConfig, LAST)
