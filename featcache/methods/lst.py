"""``lst``: Ladder Side-Tuning (Sung, Cho, Bansal, arXiv 2206.06522; official code ylsung/Ladder-Side-Tuning).

A thin transformer of width s = d / r (r = ``reduction``) runs beside the frozen backbone and reads it
through "ladders": every used tap z_i passes through its own Linear(C_i, s) (down_i). With z_0 the
embedding tap and z_1..z_m the kept block outputs (layer dropping: ``taps``):

    h_0 = down_0(z_0)                                   (0 when the store has no embedding tap)
    h_i = B_i( mu_i * h_{i-1} + (1 - mu_i) * down_i(z_i) ),   mu_i = sigmoid(alpha_i / 0.1), alpha_i = 0 at start
    logits = W pool(drop(LN(h_m))) + b

B_i is a pre-norm transformer block of width s (x + drop(Attn(LN(x))), then x + drop(MLP(LN(x))), GELU MLP
of ``mlp_ratio`` * s hidden units with dropout after the GELU). d is the backbone width for ViTs; for CNNs
(stage widths differ) it is the width of the last used tap, a featcache choice (EfficientNet-Lite0 head:
1280 -> s = 160 at r = 8). Token grids that differ are average-pooled to the smallest one and missing prefix
tokens are zero-padded, as in ``last``.

Dropout (``dropout``, default 0.1) sits where the official T5 side blocks put it: on the attention output
before the residual add, after the MLP activation, on the MLP output before the residual add, and after
the final side norm. T5 also drops attention probabilities; that one is left out (SDPA's internal dropout
has its own random stream and no vmap batching rule). Dropout is ``F.dropout(x, p, self.training)``: off in
eval mode (checkpoints load in eval mode, the bank evaluates in eval mode).

Initialisation (``init``): ``"auto"`` (default) prunes the backbone's blocks when it can (a ViT store,
``MethodInput.backbone_state`` given, timm's plain block layout, ``heads``/``mlp_ratio`` unset or equal
to the backbone's) and initialises randomly otherwise, logging why for a ViT; ``"prune"`` insists (a
ConfigError naming the reason instead of the fallback); ``"random"``: timm's N(0, 0.02). The resolved value
is recorded in ``net.config`` so that a checkpoint rebuilds without the backbone.

``init="prune"`` initialises B_i from the backbone block that produced z_i by structured magnitude pruning
(LST's "weight magnitude" variant; scores on the unpruned weights):
- residual dims: the s dims with the largest L1 norm of the patch-embedding output channel (the ViT
  counterpart of LST ranking the token-embedding matrix); shared by all blocks, the final norm and the
  ladders, whose down-projections start as the selection of these dims (the official code leaves them
  random; selecting makes the side network start as a pruned copy of the backbone's own stream);
- attention: per backbone head, the s/h query/key dims with the largest ||W_q[j]||_1 * ||W_k[j]||_1 and
  the s/h value dims with the largest ||W_v[j]||_1 * ||W_o[:, j]||_1. Heads are pruned, never mixed, so
  ``heads`` must equal the backbone's head count h (``heads=None`` takes it; another value is an error);
- MLP: the hidden units with the largest ||W_fc1[j]||_1 * ||W_fc2[:, j]||_1;
- LayerScale (``ls1.gamma``, ``ls2.gamma``, e.g. DINOv2, DeiT-III) is folded into the copied output rows.

Logit scale: the backbone scores a head as q.k / sqrt(d/h); a pruned head keeps s/h of those query/key
dims, and SDPA's default 1/sqrt(s/h) would sharpen every softmax by sqrt(d/s) = sqrt(r). So a pruned side
attention passes ``scale=1/sqrt(d/h)`` to ``F.scaled_dot_product_attention`` (the copied weights stay
exactly the backbone's rows; rescaling W_q instead would change how AdamW's steps compare to the weights).
The T5 side network of the official code gets this for free: T5 attention has no 1/sqrt scaling at all.
Random init uses the usual 1/sqrt(s/h). The scale is recorded in the config (``attn_scale``); a checkpoint
config without it (written before it was recorded) gets SDPA's default, which is what it was trained with.

Heads with random init: ``heads=None`` gives d // 64 heads (the backbone's own head count for the standard
ViTs, whose heads are 64 wide; LST keeps the backbone's heads), lowered to the nearest divisor of s.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ..config import config
from ..errors import ConfigError, FeatcacheError
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
from .fisher import fisher_information
from .linear import POOLS, resolve_pool

log = logging.getLogger("featcache.methods")

GATE_TEMPERATURE = 0.1
INITS = ("auto", "random", "prune")
PRUNE_BY = ("auto", "magnitude", "fisher")
# the parameters of one timm ViT block that pruning knows how to copy (anything else: not a plain block)
BLOCK_KEYS = frozenset(
    {
        "norm1.weight",
        "norm1.bias",
        "attn.qkv.weight",
        "attn.qkv.bias",
        "attn.proj.weight",
        "attn.proj.bias",
        "ls1.gamma",
        "norm2.weight",
        "norm2.bias",
        "mlp.fc1.weight",
        "mlp.fc1.bias",
        "mlp.fc2.weight",
        "mlp.fc2.bias",
        "ls2.gamma",
    }
)
OPTIONAL_BLOCK_KEYS = frozenset({"attn.qkv.bias", "ls1.gamma", "ls2.gamma"})


@config()
class LSTConfig(MethodConfig):
    """reduction r (side width d/r); heads (None: the backbone's with init="prune", else d // 64, see module
    doc); mlp_ratio (None = 4, or the backbone's own ratio with init="prune"); pool "avg"|"cls"; taps "all" or
    the tap names the ladder uses (layer dropping); init "auto"|"prune"|"random"; dropout p in the side
    blocks and after the final norm; attn_scale (None = 1/sqrt(backbone head dim) when pruned, else
    1/sqrt(side head dim)); prune_by "auto"|"magnitude"|"fisher" (what ranks the pruned dims; auto: Fisher when
    training samples and the tap feeding the first pruned block are there, else magnitude) and fisher_samples
    (training samples the Fisher information is summed over)."""

    reduction: int = Field(8, ge=1)  # side width = backbone width / reduction
    heads: int | None = Field(None, ge=1)
    mlp_ratio: float | None = Field(None, gt=0)
    pool: Literal[POOLS] = "avg"
    taps: str | list[str] = "all"
    init: Literal[INITS] = "auto"
    dropout: float = Field(0.1, ge=0, lt=1)  # 0 = off
    attn_scale: float | None = Field(None, gt=0, allow_inf_nan=False)
    prune_by: Literal[PRUNE_BY] = "auto"  # what ranks the pruned dims (resolved and recorded at init)
    fisher_samples: int = Field(256, ge=1)  # training samples the Fisher information is summed over

    def validate(self) -> None:
        self.taps = normalize_taps(self.taps, "taps", ("all",))


class SideAttention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, proj), through SDPA with a fixed ``scale``."""

    def __init__(self, width: int, heads: int, scale: float | None = None) -> None:
        super().__init__()
        self.heads = heads
        self.scale = scale  # None: SDPA's 1/sqrt(head dim)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape  # (N, T, s)
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # (3, N, h, T, s/h)
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)  # (N, h, T, s/h)
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class SideMlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 (timm's Mlp names)."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = dropout
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.dropout(F.gelu(self.fc1(x)), self.dropout, self.training))


class SideBlock(nn.Module):
    """Pre-norm transformer block with timm's ViT parameter names, so pruned backbone weights load directly.

    Dropout as in the T5 blocks of the official LST code: on each branch's output before the residual add
    (and inside the MLP, after the activation).
    """

    def __init__(self, width: int, heads: int, hidden: int, dropout: float = 0.0, scale: float | None = None) -> None:
        super().__init__()
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = SideAttention(width, heads, scale)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = SideMlp(width, hidden, dropout)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = x + F.dropout(self.attn(self.norm1(x)), self.dropout, self.training)  # (N, T, s)
        return x + F.dropout(self.mlp(self.norm2(x)), self.dropout, self.training)


def auto_heads(backbone_width: int, side_width: int) -> int:
    """d // 64, lowered to the nearest divisor of the side width (at least 1)."""
    h = max(1, min(backbone_width // 64, side_width))
    while side_width % h:
        h -= 1
    return h


class LST(SideNetwork):
    """Ladder side network; see the module doc for the equations, the initialisation and the logit scale."""

    uses_attention = True

    def __init__(self, config: LSTConfig, tap_info: MethodInput) -> None:
        super().__init__(config, tap_info)
        infos = (
            list(tap_info.taps)
            if config.taps == "all"
            else sorted((tap_info.tap(n) for n in config.taps), key=lambda t: t.position)
        )
        base = infos[0] if infos[0].block == 0 and len(infos) > 1 else None
        rungs = [t for t in infos if t is not base]
        self.prefix_tokens, self.grid = common_grid(infos, "taps")
        self.token_weights = TokenWeights.of_grid(infos, self.grid)  # pooled windows weigh by size
        resolve_pool(config.pool, self.prefix_tokens)
        self.base_tap = base.name if base is not None else None
        self.rung_taps = [t.name for t in rungs]
        self.required_taps = [t.name for t in infos]
        self.backbone_width = rungs[-1].channels
        self.side_width = self.backbone_width // config.reduction
        check(
            self.side_width >= 1,
            "reduction",
            f"{config.reduction} leaves no side width (backbone width "
            f"{self.backbone_width}); use reduction <= {self.backbone_width}",
        )
        state = self._resolve_init(tap_info, rungs)  # records init, heads and mlp_ratio in self.config
        self.heads = self.config.heads
        check(
            self.side_width % self.heads == 0,
            "heads",
            f"{self.heads} does not divide the side width "
            f"{self.side_width} (= {self.backbone_width} / reduction {config.reduction}); pick a divisor or null",
        )
        self.hidden = max(1, int(round(self.config.mlp_ratio * self.side_width)))
        self.attn_scale = self._resolve_scale(tap_info)  # records attn_scale in self.config
        self.dropout = config.dropout
        self.down = nn.ModuleDict({t.name: nn.Linear(t.channels, self.side_width) for t in infos})
        self.gate_logits = nn.Parameter(torch.zeros(len(rungs)))  # alpha_i, one per side block
        self.blocks = nn.ModuleList(
            SideBlock(self.side_width, self.heads, self.hidden, self.dropout, self.attn_scale) for _ in rungs
        )
        self.norm = nn.LayerNorm(self.side_width, eps=1e-6)
        self.head = make_head(self.side_width, tap_info.num_classes)
        self.pruned_from: list[int] = []
        self.kept_dims: list[int] = []
        if state is not None:
            self._prune_init(state, infos, rungs, tap_info)

    # -- construction
    def _resolve_init(self, tap_info: MethodInput, rungs: list[TapInfo]) -> dict[str, Tensor] | None:
        """The backbone state to prune from, or None (random init); records the resolved init, heads, mlp_ratio."""
        cfg, state = self.config, None
        if cfg.init == "prune" and not tap_info.from_checkpoint:  # from a checkpoint: its weights replace any init
            state, heads, ratio = self._prunable(tap_info, rungs)
        elif cfg.init == "auto" and not tap_info.from_checkpoint:
            try:
                state, heads, ratio = self._prunable(tap_info, rungs)
            except FeatcacheError as err:
                if tap_info.backbone_kind == "vit":
                    log.warning("lst: init=auto starts from random weights instead of the pruned backbone: %s", err)
        if state is None:
            init = "random" if cfg.init == "auto" else cfg.init
            heads = cfg.heads or auto_heads(self.backbone_width, self.side_width)
            ratio = cfg.mlp_ratio or 4.0
        else:
            init = "prune"
        # the resolved values, so that the saved config rebuilds these shapes without the backbone
        self.config = dataclasses.replace(cfg, init=init, heads=heads, mlp_ratio=ratio)
        return state

    def _prunable(self, tap_info: MethodInput, rungs: list[TapInfo]) -> tuple[dict[str, Tensor], int, float]:
        """(backbone state, heads, mlp_ratio) for init=prune; a ConfigError naming the reason when it cannot."""
        cfg, d = self.config, self.backbone_width
        check(
            tap_info.backbone_kind == "vit",
            "init",
            "'prune' copies ViT blocks; this backbone is a CNN, use init=random",
        )
        check(
            tap_info.backbone_state is not None,
            "init",
            "'prune' needs the backbone's weights "
            "(MethodInput.backbone_state), which were not provided; use init=random",
        )
        for t in rungs:
            check(
                t.block >= 1,
                "init",
                f"'prune' initialises side blocks from backbone blocks, but tap {t.name!r} "
                "is not a block output; drop it from taps or use init=random",
            )
        own = tap_info.backbone_heads  # heads first: a conflict needs no backbone weights loaded
        heads = cfg.heads
        if heads is not None and own is not None and heads != own:
            raise ConfigError(
                f"heads: init=prune prunes each of the backbone's {own} attention heads (it never mixes "
                f"heads), so heads must be {own}, got heads={heads}; set heads={own} or null, or "
                "init=random for another head count"
            )
        heads = heads or own or max(1, d // 64)
        check(
            d % heads == 0,
            "heads",
            f"{heads} does not divide the backbone width {d}; set heads to the backbone's head count",
        )
        check(
            self.side_width % heads == 0,
            "heads",
            f"init=prune keeps the backbone's {heads} heads, which do not "
            f"divide the side width {self.side_width} (= {d} / reduction {cfg.reduction}); choose a reduction that "
            f"leaves a multiple of {heads}, or init=random",
        )
        state = tap_info.backbone_state()
        _get(state, "patch_embed.proj.weight")
        for t in rungs:
            check_block_layout(state, t.block - 1, d)
        if cfg.heads is None and own is None:
            log.warning(
                "lst: init=prune: the backbone's head count is not recorded (MethodInput.backbone_heads); "
                "assuming %d heads (width %d / 64); set heads to the backbone's head count if it differs",
                heads,
                d,
            )
        fc1 = state[f"blocks.{rungs[0].block - 1}.mlp.fc1.weight"]  # (H, d)
        ratio = fc1.shape[0] / fc1.shape[1]
        check(
            cfg.mlp_ratio is None or abs(cfg.mlp_ratio - ratio) < 1e-6,
            "mlp_ratio",
            f"{cfg.mlp_ratio} differs from "
            f"the backbone's MLP ratio {ratio:g}, which init=prune copies; set mlp_ratio={ratio:g} or null",
        )
        return state, heads, ratio

    def _resolve_scale(self, tap_info: MethodInput) -> float | None:
        """Softmax scale of the side attention (module doc); recorded in the config. None = SDPA's default."""
        if self.config.attn_scale is not None:
            return self.config.attn_scale
        if tap_info.from_checkpoint:
            return None  # a checkpoint config written before the scale was recorded: trained with SDPA's default
        head_dim = (self.backbone_width if self.config.init == "prune" else self.side_width) / self.heads
        scale = head_dim**-0.5
        self.config = dataclasses.replace(self.config, attn_scale=scale)
        return scale

    def _fisher(
        self, state: dict[str, Tensor], rungs: list[TapInfo], tap_info: MethodInput
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Fisher information of the pruned blocks (``featcache.methods.fisher``), from ``fisher_samples`` training
        samples of the tap that feeds the first pruned block; computed once per MethodInput (sweep members share it)."""
        first = min(t.block for t in rungs) - 1
        source = next((t for t in tap_info.taps if t.block == first), None)
        check(
            source is not None,
            "prune_by",
            f"'fisher' runs the backbone's blocks from the tap that feeds block "
            f"{first} (the first pruned one), which the store lacks; extract it, or use prune_by=magnitude",
        )
        check(
            tap_info.training_sample is not None,
            "prune_by",
            "'fisher' needs training samples "
            "(MethodInput.training_sample), which were not provided; use prune_by=magnitude",
        )
        key = ("fisher", source.name, self.config.fisher_samples, self.config.pool, self.heads)
        if key not in tap_info.memo:
            taps, labels = tap_info.training_sample([source.name], self.config.fisher_samples)
            log.info("lst: Fisher information of blocks %d.. from %d samples of %s", first, len(labels), source.name)
            tap_info.memo[key] = fisher_information(
                state,
                taps[source.name],
                labels,
                first,
                self.heads,
                tap_info.num_classes,
                self.config.pool,
                source.prefix_tokens,
            )
        return tap_info.memo[key]

    def _resolve_prune_by(self, rungs: list[TapInfo], tap_info: MethodInput) -> str:
        """``auto``: Fisher (the official code's ranking) when training samples and the tap feeding the first pruned
        block are there, else magnitude, saying why."""
        if self.config.prune_by != "auto":
            return self.config.prune_by
        first = min(t.block for t in rungs) - 1
        if tap_info.training_sample is None:
            log.info("lst: prune_by=auto ranks by magnitude: no training samples were given (MethodInput)")
            return "magnitude"
        if not any(t.block == first for t in tap_info.taps):
            log.warning("lst: prune_by=auto ranks by magnitude: the store lacks the tap feeding block %d", first)
            return "magnitude"
        return "fisher"

    @torch.no_grad()
    def _prune_init(
        self, state: dict[str, Tensor], infos: list[TapInfo], rungs: list[TapInfo], tap_info: MethodInput
    ) -> None:
        residual, importance = None, None
        self.config = dataclasses.replace(self.config, prune_by=self._resolve_prune_by(rungs, tap_info))
        if self.config.prune_by == "fisher":
            with torch.enable_grad():
                residual, importance = self._fisher(state, rungs, tap_info)
        keep = prune_residual_dims(state, self.side_width, residual)
        self.kept_dims = keep.tolist()
        for t, block in zip(rungs, self.blocks):
            block.load_state_dict(pruned_block_state(state, t.block - 1, keep, self.heads, self.hidden, importance))
            self.pruned_from.append(t.block - 1)
        final_norm = tap_info.final_norm
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
        h = F.dropout(self.norm(h), self.dropout, self.training)  # (N, T', s): dropout after the final side norm
        return pool_tokens(h, self.prefix_tokens, self.config.pool, self.token_weights)  # (N, s)

    def describe_extra(self) -> dict[str, Any]:
        scale = self.attn_scale if self.attn_scale is not None else (self.side_width / self.heads) ** -0.5
        return {
            "z0_tap": self.base_tap,
            "side_block_taps": self.rung_taps,
            "side_width": self.side_width,
            "heads": self.heads,
            "mlp_hidden": self.hidden,
            "token_grid": list(self.grid),
            "init": self.config.init,
            "pruned_from_blocks": self.pruned_from,
            "attn_scale": scale,
            "dropout": self.dropout,
        }


# ---------------------------------------------------------------------------------------------
# Structured magnitude pruning of timm ViT blocks


def _get(state: dict[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise ConfigError(
            f"init: 'prune' expects timm ViT weights, but the backbone state has no {key!r}; "
            "use init=random for this backbone"
        )
    return state[key].detach().float().cpu()


def check_block_layout(state: dict[str, Tensor], block: int, width: int) -> None:
    """ConfigError unless backbone block ``block`` is a plain timm ViT block of width ``width`` (see BLOCK_KEYS)."""
    p = f"blocks.{block}."
    have = {k[len(p) :] for k in state if k.startswith(p)}
    missing = sorted(BLOCK_KEYS - OPTIONAL_BLOCK_KEYS - have)
    extra = sorted(have - BLOCK_KEYS)
    if missing or extra:
        what = [f"lacks {', '.join(missing)}"] if missing else []
        what += [f"has parameters pruning cannot copy ({', '.join(extra)})"] if extra else []
        raise ConfigError(
            f"init: 'prune' copies timm's plain ViT blocks, but backbone block {block} "
            f"{' and '.join(what)}; use init=random for this backbone"
        )
    qkv = state[p + "attn.qkv.weight"]
    if tuple(qkv.shape) != (3 * width, width):
        raise ConfigError(
            f"init: 'prune' expects backbone block {block}'s attn.qkv.weight of shape "
            f"({3 * width}, {width}), got {tuple(qkv.shape)}; use init=random for this backbone"
        )


def _top(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest scores, in ascending index order."""
    return torch.topk(scores, k).indices.sort().values


def prune_residual_dims(state: dict[str, Tensor], keep: int, scores: Tensor | None = None) -> Tensor:
    """The ``keep`` residual-stream dims with the largest ``scores`` (d,); default: the L1 norm of their
    patch-embedding weights (magnitude pruning)."""
    if scores is None:
        w = _get(state, "patch_embed.proj.weight")  # (d, 3, p, p) conv, or (d, in) linear
        scores = w.abs().flatten(1).sum(1)
    return _top(scores.float(), keep)


def pruned_block_state(
    state: dict[str, Tensor],
    block: int,
    keep: Tensor,
    heads: int,
    hidden: int,
    importance: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """State dict of a ``SideBlock`` cut from backbone block ``block`` (0-based) on residual dims ``keep``.

    Heads are pruned one by one (s/h query/key and s/h value dims kept inside each of the ``heads`` heads),
    so side head j is a pruned copy of backbone head j. LayerScale gammas are folded into the output rows.
    Rows are ranked by ``importance`` (state key -> a non-negative tensor of the weight's shape, e.g. Fisher
    information); the absolute weights where it has no entry (magnitude pruning).
    """
    p = f"blocks.{block}."
    qkv = _get(state, p + "attn.qkv.weight")  # (3d, d)
    d = qkv.shape[1]
    qkv_b = state.get(p + "attn.qkv.bias")
    qkv_b = torch.zeros(3 * d) if qkv_b is None else qkv_b.detach().float().cpu()
    o = _get(state, p + "attn.proj.weight")  # (d, d)
    check(
        d % heads == 0,
        "heads",
        f"{heads} does not divide the backbone width {d}; set heads to the backbone's head count",
    )
    wq, wk, wv = qkv.split(d)
    fc1, fc2 = _get(state, p + "mlp.fc1.weight"), _get(state, p + "mlp.fc2.weight")  # (H, d), (d, H)
    imp = {
        k: (importance or {}).get(p + k, w.abs())
        for k, w in (
            ("attn.qkv.weight", qkv),
            ("attn.proj.weight", o),
            ("mlp.fc1.weight", fc1),
            ("mlp.fc2.weight", fc2),
        )
    }
    iq, ik, iv = imp["attn.qkv.weight"].float().split(d)
    io, i1, i2 = imp["attn.proj.weight"].float(), imp["mlp.fc1.weight"].float(), imp["mlp.fc2.weight"].float()
    hd, hs = d // heads, (keep.numel() // heads)
    qk_idx, v_idx = [], []
    for h in range(heads):  # per head: best query/key dims and best value dims
        rows = slice(h * hd, (h + 1) * hd)
        qk_idx.append(h * hd + _top(iq[rows].sum(1) * ik[rows].sum(1), hs))
        v_idx.append(h * hd + _top(iv[rows].sum(1) * io[:, rows].sum(0), hs))
    qk, v = torch.cat(qk_idx), torch.cat(v_idx)
    mlp = _top(i1.sum(1) * i2.sum(0), hidden)
    ones = torch.ones(d)
    ls1 = _get(state, p + "ls1.gamma") if p + "ls1.gamma" in state else ones  # (d,) LayerScale, or 1
    ls2 = _get(state, p + "ls2.gamma") if p + "ls2.gamma" in state else ones
    out = {
        "attn.qkv.weight": torch.cat([wq[qk][:, keep], wk[qk][:, keep], wv[v][:, keep]]),
        "attn.qkv.bias": torch.cat([qkv_b[:d][qk], qkv_b[d : 2 * d][qk], qkv_b[2 * d :][v]]),
        "attn.proj.weight": o[keep][:, v] * ls1[keep, None],
        "attn.proj.bias": _get(state, p + "attn.proj.bias")[keep] * ls1[keep],
        "mlp.fc1.weight": fc1[mlp][:, keep],
        "mlp.fc1.bias": _get(state, p + "mlp.fc1.bias")[mlp],
        "mlp.fc2.weight": fc2[keep][:, mlp] * ls2[keep, None],
        "mlp.fc2.bias": _get(state, p + "mlp.fc2.bias")[keep] * ls2[keep],
    }
    for norm in ("norm1", "norm2"):
        out[f"{norm}.weight"] = _get(state, f"{p}{norm}.weight")[keep]
        out[f"{norm}.bias"] = _get(state, f"{p}{norm}.bias")[keep]
    return out


register("lst", LSTConfig, LST)
