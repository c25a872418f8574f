"""``lst``: Ladder Side-Tuning (Sung, Cho, Bansal, arXiv 2206.06522; official code ylsung/Ladder-Side-Tuning).

A thin transformer of width s = d / r (r = ``reduction``) runs beside the frozen backbone and reads it
through "ladders": every used tap z_i passes through its own Linear(C_i, s) (down_i). With z_0 the
embedding tap and z_1..z_m the kept block outputs (layer dropping: ``taps``):

    h_0 = down_0(z_0)                                   (0 when the store has no embedding tap)
    h_i = B_i( mu_i * h_{i-1} + (1 - mu_i) * down_i(z_i) ),   mu_i = sigmoid(alpha_i / 0.1), alpha_i = 0 at start
    logits = W pool(LN(h_m)) + b

B_i is a pre-norm transformer block of width s (x + Attn(LN(x)), then x + MLP(LN(x)), GELU MLP of
``mlp_ratio`` * s hidden units). d is the backbone width for ViTs; for CNNs (stage widths differ) it is
the width of the last used tap, a featcache choice (EfficientNet-Lite0 head: 1280 -> s = 160 at r = 8).
Token grids that differ are average-pooled to the smallest one and missing prefix tokens are zero-padded,
as in ``last``.

Heads: ``heads=None`` gives d // 64 heads (the backbone's own head count for the standard ViTs, whose
heads are 64 wide; LST keeps the backbone's heads), lowered to the nearest divisor of s.

``init="prune"`` (ViT backbones, timm block layout) initialises B_i from the backbone block that produced
z_i by structured magnitude pruning (LST's "weight magnitude" variant; scores on the unpruned weights):
- residual dims: the s dims with the largest L1 norm of the patch-embedding output channel (the ViT
  counterpart of LST ranking the token-embedding matrix); shared by all blocks, the final norm and the
  ladders, whose down-projections start as the selection of these dims (the official code leaves them
  random; selecting makes the side network start as a pruned copy of the backbone's own stream);
- attention: per backbone head (``heads`` must equal the backbone's head count), the s/heads query/key
  dims with the largest ||W_q[j]||_1 * ||W_k[j]||_1 and the s/heads value dims with the largest
  ||W_v[j]||_1 * ||W_o[:, j]||_1;
- MLP: the hidden units with the largest ||W_fc1[j]||_1 * ||W_fc2[:, j]||_1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..vocabulary import TapInfo
from ..errors import ConfigError
from .base import (MethodConfig, MethodInput, SideNetwork, check, check_choice, common_grid, init_layernorm,
                   make_head, normalize_taps, pool_tokens, register, to_grid)
from .linear import POOLS, resolve_pool

GATE_TEMPERATURE = 0.1
INITS = ("random", "prune")


@dataclass
class LSTConfig(MethodConfig):
    """reduction r (side width d/r); heads (None = d // 64, see module doc); mlp_ratio (None = 4, or the
    backbone's own ratio with init="prune"); pool "avg"|"cls"; taps "all" or the tap names the ladder
    uses (layer dropping); init "random" or "prune" (from the backbone's blocks, ViTs only)."""

    reduction: int = 8
    heads: int | None = None
    mlp_ratio: float | None = None
    pool: str = "avg"
    taps: str | list[str] = "all"
    init: str = "random"

    def validate(self) -> None:
        check(self.reduction >= 1, "reduction",
              f"must be >= 1 (side width = backbone width / reduction), got {self.reduction}")
        check(self.heads is None or self.heads >= 1, "heads", f"must be >= 1 or null (automatic), got {self.heads}")
        check(self.mlp_ratio is None or self.mlp_ratio > 0, "mlp_ratio", f"must be > 0 or null, got {self.mlp_ratio}")
        check_choice(self.pool, "pool", POOLS)
        check_choice(self.init, "init", INITS)
        self.taps = normalize_taps(self.taps, "taps", ("all",))


class SideAttention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, proj), through SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape  # (N, T, s)
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (3, N, h, T, s/h)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (N, h, T, s/h)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class SideMlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SideBlock(nn.Module):
    """Pre-norm transformer block with timm's ViT parameter names, so pruned backbone weights load directly."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = SideAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = SideMlp(width, hidden)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))  # (N, T, s)
        return x + self.mlp(self.norm2(x))


def auto_heads(backbone_width: int, side_width: int) -> int:
    """d // 64, lowered to the nearest divisor of the side width (at least 1)."""
    h = max(1, min(backbone_width // 64, side_width))
    while side_width % h:
        h -= 1
    return h


class LST(SideNetwork):
    """Ladder side network; see the module doc for the equations and the pruned initialisation."""

    uses_attention = True

    def __init__(self, config: LSTConfig, tap_info: MethodInput) -> None:
        super().__init__(config, tap_info)
        infos = list(tap_info.taps) if config.taps == "all" else sorted(
            (tap_info.tap(n) for n in config.taps), key=lambda t: t.position)
        base = infos[0] if infos[0].block == 0 and len(infos) > 1 else None
        rungs = [t for t in infos if t is not base]
        self.prefix_tokens, self.grid = common_grid(infos, "taps")
        resolve_pool(config.pool, self.prefix_tokens)
        self.base_tap = base.name if base is not None else None
        self.rung_taps = [t.name for t in rungs]
        self.required_taps = [t.name for t in infos]
        self.backbone_width = rungs[-1].channels
        self.side_width = self.backbone_width // config.reduction
        check(self.side_width >= 1, "reduction", f"{config.reduction} leaves no side width (backbone width "
              f"{self.backbone_width}); use reduction <= {self.backbone_width}")
        self.heads = config.heads or auto_heads(self.backbone_width, self.side_width)
        self.config = dataclasses.replace(self.config, heads=self.heads)  # resolved, for checkpoints
        check(self.side_width % self.heads == 0, "heads", f"{self.heads} does not divide the side width "
              f"{self.side_width} (= {self.backbone_width} / reduction {config.reduction}); pick a divisor or null")
        state = self._backbone_state(tap_info)
        self.hidden = self._hidden_width(state, rungs)  # resolves mlp_ratio into self.config
        self.down = nn.ModuleDict({t.name: nn.Linear(t.channels, self.side_width) for t in infos})
        self.gate_logits = nn.Parameter(torch.zeros(len(rungs)))  # alpha_i, one per side block
        self.blocks = nn.ModuleList(SideBlock(self.side_width, self.heads, self.hidden) for _ in rungs)
        self.norm = nn.LayerNorm(self.side_width, eps=1e-6)
        self.head = make_head(self.side_width, tap_info.num_classes)
        self.pruned_from: list[int] = []
        self.kept_dims: list[int] = []
        if state is not None:
            self._prune_init(state, infos, rungs, tap_info.final_norm)

    # -- construction
    def _backbone_state(self, tap_info: MethodInput) -> dict[str, Tensor] | None:
        if self.config.init != "prune" or tap_info.from_checkpoint:
            return None  # from a checkpoint: its weights replace any initialisation
        check(tap_info.backbone_kind == "vit", "init",
              "'prune' copies ViT blocks; this backbone is a CNN, use init=random")
        check(tap_info.backbone_state is not None, "init", "'prune' needs the backbone's weights "
              "(MethodInput.backbone_state), which were not provided; use init=random")
        return tap_info.backbone_state()

    def _hidden_width(self, state: dict[str, Tensor] | None, rungs: list[TapInfo]) -> int:
        ratio = self.config.mlp_ratio
        if state is not None:
            fc1 = state.get(f"blocks.{rungs[0].block - 1}.mlp.fc1.weight")
            own = fc1.shape[0] / fc1.shape[1] if fc1 is not None else 4.0
            check(ratio is None or abs(ratio - own) < 1e-6, "mlp_ratio", f"{ratio} differs from the backbone's "
                  f"MLP ratio {own:g}, which init=prune copies; set mlp_ratio={own:g} or null")
            ratio = own
        # record the resolved ratio, so that the saved config rebuilds this shape without the backbone
        self.config = dataclasses.replace(self.config, mlp_ratio=ratio or 4.0)
        return max(1, int(round(self.config.mlp_ratio * self.side_width)))

    @torch.no_grad()
    def _prune_init(self, state: dict[str, Tensor], infos: list[TapInfo], rungs: list[TapInfo],
                    final_norm: dict[str, Tensor] | None) -> None:
        keep = prune_residual_dims(state, self.side_width)
        self.kept_dims = keep.tolist()
        for t, block in zip(rungs, self.blocks):
            check(t.block >= 1, "init", f"'prune' initialises side blocks from backbone blocks, but tap {t.name!r} "
                  "is not a block output; drop it from taps or use init=random")
            block.load_state_dict(pruned_block_state(state, t.block - 1, keep, self.heads, self.hidden))
            self.pruned_from.append(t.block - 1)
        for t in infos:  # ladders start as the selection of the kept dims
            if t.channels == self.backbone_width:
                self.down[t.name].weight.zero_()
                self.down[t.name].weight[torch.arange(self.side_width), keep] = 1.0
                self.down[t.name].bias.zero_()
        if final_norm is not None:
            init_layernorm(self.norm, {k: v[keep] for k, v in final_norm.items()})

    # -- forward
    def _ladder(self, taps: dict[str, Tensor], name: str) -> Tensor:
        x = to_grid(self.read_tap(taps, name), self.tap_infos[name], self.grid, self.prefix_tokens)  # (N, T', C_i)
        return self.down[name](x)  # (N, T', s)

    def gates(self) -> Tensor:
        """mu_i = sigmoid(alpha_i / 0.1), (m,): the weight of the side stream against the ladder input."""
        return torch.sigmoid(self.gate_logits / GATE_TEMPERATURE)

    def features(self, taps: dict[str, Tensor]) -> Tensor:
        mu = self.gates()  # (m,)
        h = self._ladder(taps, self.base_tap) if self.base_tap is not None else None  # (N, T', s)
        for i, (name, block) in enumerate(zip(self.rung_taps, self.blocks)):
            ladder = (1 - mu[i]) * self._ladder(taps, name)
            h = block(ladder if h is None else mu[i] * h + ladder)
        return pool_tokens(self.norm(h), self.prefix_tokens, self.config.pool)  # (N, s)

    def describe_extra(self) -> dict[str, Any]:
        return {"z0_tap": self.base_tap, "side_block_taps": self.rung_taps, "side_width": self.side_width,
                "heads": self.heads, "mlp_hidden": self.hidden, "token_grid": list(self.grid),
                "pruned_from_blocks": self.pruned_from}


# ---------------------------------------------------------------------------------------------
# Structured magnitude pruning of timm ViT blocks


def _get(state: dict[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise ConfigError(f"init: 'prune' expects timm ViT weights, but the backbone state has no {key!r}; "
                          "use init=random for this backbone")
    return state[key].detach().float().cpu()


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, in ascending index order."""
    return torch.topk(scores, k).indices.sort().values


def prune_residual_dims(state: dict[str, Tensor], keep: int) -> Tensor:
    """The ``keep`` residual-stream dims with the largest L1 norm of their patch-embedding weights."""
    w = _get(state, "patch_embed.proj.weight")  # (d, 3, p, p) conv, or (d, in) linear
    return _top(w.abs().flatten(1).sum(1), keep)


def pruned_block_state(state: dict[str, Tensor], block: int, keep: Tensor, heads: int,
                       hidden: int) -> dict[str, Tensor]:
    """State dict of a ``SideBlock`` cut from backbone block ``block`` (0-based) on residual dims ``keep``."""
    p = f"blocks.{block}."
    qkv = _get(state, p + "attn.qkv.weight")  # (3d, d)
    d = qkv.shape[1]
    qkv_b = state.get(p + "attn.qkv.bias")
    qkv_b = torch.zeros(3 * d) if qkv_b is None else qkv_b.detach().float().cpu()
    o = _get(state, p + "attn.proj.weight")  # (d, d)
    check(d % heads == 0, "heads",
          f"{heads} does not divide the backbone width {d}; set heads to the backbone's head count")
    wq, wk, wv = qkv.split(d)
    hd, hs = d // heads, (keep.numel() // heads)
    qk_idx, v_idx = [], []
    for h in range(heads):  # per head: best query/key dims and best value dims
        rows = slice(h * hd, (h + 1) * hd)
        qk_idx.append(h * hd + _top(wq[rows].abs().sum(1) * wk[rows].abs().sum(1), hs))
        v_idx.append(h * hd + _top(wv[rows].abs().sum(1) * o[:, rows].abs().sum(0), hs))
    qk, v = torch.cat(qk_idx), torch.cat(v_idx)
    fc1, fc2 = _get(state, p + "mlp.fc1.weight"), _get(state, p + "mlp.fc2.weight")  # (H, d), (d, H)
    mlp = _top(fc1.abs().sum(1) * fc2.abs().sum(0), hidden)
    out = {
        "attn.qkv.weight": torch.cat([wq[qk][:, keep], wk[qk][:, keep], wv[v][:, keep]]),
        "attn.qkv.bias": torch.cat([qkv_b[:d][qk], qkv_b[d:2 * d][qk], qkv_b[2 * d:][v]]),
        "attn.proj.weight": o[keep][:, v],
        "attn.proj.bias": _get(state, p + "attn.proj.bias")[keep],
        "mlp.fc1.weight": fc1[mlp][:, keep],
        "mlp.fc1.bias": _get(state, p + "mlp.fc1.bias")[mlp],
        "mlp.fc2.weight": fc2[keep][:, mlp],
        "mlp.fc2.bias": _get(state, p + "mlp.fc2.bias")[keep],
    }
    for norm in ("norm1", "norm2"):
        out[f"{norm}.weight"] = _get(state, f"{p}{norm}.weight")[keep]
        out[f"{norm}.bias"] = _get(state, f"{p}{norm}.bias")[keep]
    return out


register("lst", LSTConfig, LST)
