"""Empirical Fisher information of a timm ViT's block weights, computed from cached taps (LST's ``prune_by="fisher"``).

The official LST code (ylsung/Ladder-Side-Tuning: ``load_side_pretrained_weights = "fisher-v2"``, the setting
of its GLUE scripts) ranks what it prunes by the empirical Fisher information of the pretrained model with its
task head: the squared gradient of the task loss, one training sample at a time (batch 1), summed over
``samples_for_fisher`` = 1024 samples; rows are then scored by the L1 norm of their Fisher entries, as the
magnitude variant scores them by the L1 norm of their weights.

Here the backbone's blocks run again from a cached tap (the input of the first pruned block; the store holds
the backbone's own activations, so no image is needed), followed by the final norm, the side network's
pooling and a classifier fitted to those pooled features (a ViT has no task head; a random one would make
the gradients noise), and

    F[W] = sum_n (dL_n / dW)^2                       for every qkv, proj, fc1, fc2 weight of the blocks run
    F_residual[j] = sum_n sum_t (dL_n / dz[n, t, j])^2   at the input tap z (the counterpart of the official
                                                       code's token-embedding Fisher: the squared gradient
                                                       of a per-position embedding such as pos_embed)

Pure torch on a state dict: no timm model, no store.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

WEIGHTS = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
LN_EPS = 1e-6  # timm's ViT LayerNorm


def num_blocks(state: dict[str, Tensor]) -> int:
    """How many ``blocks.<i>`` the state holds."""
    return len({k.split(".")[1] for k in state if k.startswith("blocks.") and k.endswith(".attn.qkv.weight")})


def vit_block(p: dict[str, Tensor], x: Tensor, heads: int) -> Tensor:
    """timm's ViT block (pre-norm attention and MLP, optional LayerScale) from its state ``p``; x: (N, T, d)."""
    n, t, d = x.shape
    one = x.new_ones(d)
    h = F.layer_norm(x, (d,), p["norm1.weight"], p["norm1.bias"], LN_EPS)
    qkv = F.linear(h, p["attn.qkv.weight"], p.get("attn.qkv.bias")).reshape(n, t, 3, heads, d // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (N, h, T, d/h) each
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
    x = x + p.get("ls1.gamma", one) * F.linear(a, p["attn.proj.weight"], p["attn.proj.bias"])
    h = F.layer_norm(x, (d,), p["norm2.weight"], p["norm2.bias"], LN_EPS)
    m = F.linear(F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"])
    return x + p.get("ls2.gamma", one) * m


def _pooled(
    state: dict[str, Tensor], blocks: list[dict[str, Tensor]], x: Tensor, heads: int, pool: str, prefix_tokens: int
) -> Tensor:
    """(N, d): the blocks run on x, the final norm (when the state has one), CLS or the patch-token mean."""
    for p in blocks:
        x = vit_block(p, x, heads)
    if "norm.weight" in state and state["norm.weight"].shape[-1] == x.shape[-1]:
        x = F.layer_norm(x, (x.shape[-1],), state["norm.weight"].float(), state["norm.bias"].float(), LN_EPS)
    return x[:, 0] if pool == "cls" else x[:, prefix_tokens:].mean(1)


def fit_probe(features: Tensor, labels: Tensor, num_classes: int, steps: int = 100) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression (weight decay 1e-3) by L-BFGS from zero: (W (K, d), b (K,)). Hand-written:
    a few lines of torch, deterministic, where scikit-learn is not a dependency of the methods."""
    w = torch.zeros(num_classes, features.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(features, w, b), labels) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def fisher_information(
    state: dict[str, Tensor],
    x: Tensor,
    labels: Tensor,
    first_block: int,
    heads: int,
    num_classes: int,
    pool: str = "avg",
    prefix_tokens: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(F_residual (d,), {state key: F[W]}) for the blocks ``first_block`` .. last, from their input ``x`` (N, T, d)
    and ``labels`` (N,): see the module doc. One backward pass per sample, as the official code does."""
    keys = [f"blocks.{k}." for k in range(first_block, num_blocks(state))]
    blocks = [{k[len(p) :]: v.detach().float() for k, v in state.items() if k.startswith(p)} for p in keys]
    for p in blocks:
        for name in WEIGHTS:
            p[name].requires_grad_(True)
    x, labels = x.detach().float(), labels.long()
    with torch.no_grad():
        w, b = fit_probe(_pooled(state, blocks, x, heads, pool, prefix_tokens), labels, num_classes)
    fisher = {p + name: torch.zeros_like(blocks[i][name]) for i, p in enumerate(keys) for name in WEIGHTS}
    residual = torch.zeros(x.shape[-1])
    for n in range(x.shape[0]):  # batch 1: squared per-sample gradients, not the square of a batch mean
        xn = x[n : n + 1].clone().requires_grad_(True)
        loss = F.cross_entropy(
            F.linear(_pooled(state, blocks, xn, heads, pool, prefix_tokens), w, b), labels[n : n + 1]
        )
        params = [blocks[i][name] for i in range(len(keys)) for name in WEIGHTS]
        grads = torch.autograd.grad(loss, [xn, *params])
        residual += grads[0].square().sum((0, 1))
        for acc, g in zip(fisher.values(), grads[1:]):
            acc += g.square()
    return residual, fisher
