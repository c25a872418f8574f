"""How well LST's pruned side blocks reproduce the backbone's blocks, on cached taps of a real ViT.

For side block i, initialised from backbone block k (input tap z_k, output z_{k+1}), fed the kept dims of the
backbone's own input z_k[:, :, keep]:
- ``update_cos``: cosine between the side block's update B(x) - x and the backbone's update
  (z_{k+1} - z_k)[keep], per sample over all tokens and kept dims (median over samples);
- ``entropy_side`` / ``entropy_backbone``: mean attention entropy (nats) over heads, queries, samples;
- ``kl``: KL(backbone attention || side attention), mean over heads, queries and samples;
- ``ln_ratio``: median over tokens of std(x[keep]) / std(x) at the block input (how far the pruned
  LayerNorm's statistics are from the full one's).

    python -m benchmarks.lst_diagnose --store benchmarks/.cache/dinov2-fmnist-1k.zarr --samples 32
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from featcache.methods.lst import SideBlock, prune_residual_dims, pruned_block_state


def load_taps(store: str, split: str, n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from featcache.store.feature_store import FeatureStore

    sp = FeatureStore.open(store).split(split)
    idx = sp.completed_indices()[:n]
    stop = int(idx[-1]) + 1
    taps = {name: sp.read_values(name, 0, stop)[idx] for name in sp.tap_names}
    return taps, torch.as_tensor(sp.labels()[idx])


def backbone_state(store: str) -> dict[str, torch.Tensor]:
    from featcache.backbone import backbone_state_loader

    return backbone_state_loader(store)()


def attention_maps(block: SideBlock, x: torch.Tensor) -> torch.Tensor:
    """(N, h, T, T) softmax attention of ``block`` on input ``x`` (N, T, C) with the block's own scale."""
    a = block.attn
    n, t, c = x.shape
    qkv = a.qkv(block.norm1(x)).reshape(n, t, 3, a.heads, c // a.heads).permute(2, 0, 3, 1, 4)
    scale = a.scale if a.scale is not None else (c // a.heads) ** -0.5
    return torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) * scale, dim=-1)


def full_block(state: dict[str, torch.Tensor], k: int, heads: int) -> SideBlock:
    """Backbone block ``k`` as a SideBlock of full width (LayerScale folded in): the reference."""
    d = state["patch_embed.proj.weight"].shape[0]
    hidden = state[f"blocks.{k}.mlp.fc1.weight"].shape[0]
    block = SideBlock(d, heads, hidden, 0.0, (d // heads) ** -0.5)
    block.load_state_dict(pruned_block_state(state, k, torch.arange(d), heads, hidden))
    return block.eval()


def entropy(p: torch.Tensor) -> float:
    return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())


@torch.no_grad()
def diagnose(
    state: dict[str, torch.Tensor],
    taps: dict[str, torch.Tensor],
    keep: torch.Tensor,
    heads: int,
    side_blocks: dict[int, SideBlock],
    blocks: list[int],
) -> list[dict[str, Any]]:
    """One row per backbone block in ``blocks``: the side block ``side_blocks[k]`` against backbone block k."""
    rows = []
    for k in blocks:
        z_in, z_out = taps["embed" if k == 0 else f"block{k}"], taps[f"block{k + 1}"]
        ref = full_block(state, k, heads)
        side = side_blocks[k].eval()
        x = z_in[:, :, keep]
        upd_side = side(x) - x
        upd_ref = (z_out - z_in)[:, :, keep]
        cos = F.cosine_similarity(upd_side.flatten(1), upd_ref.flatten(1), dim=1)
        p_ref, p_side = attention_maps(ref, z_in), attention_maps(side, x)
        kl = float((p_ref * (p_ref.clamp_min(1e-12).log() - p_side.clamp_min(1e-12).log())).sum(-1).mean())
        ratio = (z_in[:, :, keep].std(-1) / z_in.std(-1)).median()
        rows.append(
            {
                "block": k,
                "update_cos": float(cos.median()),
                "entropy_side": entropy(p_side),
                "entropy_backbone": entropy(p_ref),
                "kl": kl,
                "ln_ratio": float(ratio),
                "ref_check": float(
                    F.cosine_similarity((ref(z_in) - z_in).flatten(1), (z_out - z_in).flatten(1), dim=1).median()
                ),
            }
        )
    return rows


def pruned_blocks(
    state: dict[str, torch.Tensor],
    reduction: int,
    heads: int,
    blocks: list[int],
    scale: float | None,
    importance: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, dict[int, SideBlock]]:
    """Side blocks pruned from ``blocks`` by magnitude, or by ``importance`` = (residual scores, Fisher dict)."""
    d = state["patch_embed.proj.weight"].shape[0]
    s = d // reduction
    keep = prune_residual_dims(state, s, importance[0] if importance else None)
    hidden = state["blocks.0.mlp.fc1.weight"].shape[0] // reduction
    out = {}
    for k in blocks:
        b = SideBlock(s, heads, hidden, 0.0, scale)
        b.load_state_dict(pruned_block_state(state, k, keep, heads, hidden, importance[1] if importance else None))
        out[k] = b
    return keep, out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--reduction", type=int, default=8)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--blocks", default="0,5,10")
    ap.add_argument("--fisher-samples", type=int, default=0, help="also Fisher-ranked pruning from N train samples")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    state = {k: v.float() for k, v in backbone_state(args.store).items()}
    taps, _ = load_taps(args.store, args.split, args.samples)
    blocks = [int(b) for b in args.blocks.split(",")]
    d = state["patch_embed.proj.weight"].shape[0]
    result = {}
    variants = [
        ("magnitude, scale 1/sqrt(d/h)", (d // args.heads) ** -0.5, None),
        ("magnitude, scale 1/sqrt(s/h)", None, None),
    ]
    if args.fisher_samples:
        from featcache.methods.fisher import fisher_information

        ftaps, labels = load_taps(args.store, "train", args.fisher_samples)
        importance = fisher_information(state, ftaps["embed"], labels, 0, args.heads, int(labels.max()) + 1)
        variants.append(
            (f"fisher ({args.fisher_samples} samples), scale 1/sqrt(d/h)", (d // args.heads) ** -0.5, importance)
        )
    for label, scale, importance in variants:
        keep, side = pruned_blocks(state, args.reduction, args.heads, blocks, scale, importance)
        result[label] = diagnose(state, taps, keep, args.heads, side, blocks)
        for row in result[label]:
            print(label, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
