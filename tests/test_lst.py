"""LST as in the official code: pruned init by default for ViTs, the backbone's logit scale in pruned attention,
heads equal to the backbone's when pruning, dropout in the side blocks and after the final norm (train mode only)."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch.func import functional_call, stack_module_state, vmap

from featcache.errors import ConfigError
from featcache.manifest import TapInfo
from featcache.methods import MethodInput, create
from featcache.methods.lst import SideBlock

pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop because we have not yet implemented the batching rule:UserWarning"
)


def _taps(width: int, tokens: int = 5, prefix: int = 1, blocks: int = 1) -> list[TapInfo]:
    side = int(math.isqrt(tokens - prefix))
    return [
        TapInfo("embed" if b == 0 else f"block{b}", b, b, tokens, prefix, width, (side, side), "none")
        for b in range(blocks + 1)
    ]


def _batch(infos: list[TapInfo], n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {t.name: torch.randn(n, t.tokens, t.channels, generator=g) for t in infos}


# ---------------------------------------------------------------------------------------------
# Logit scale of pruned attention


def _hand_state() -> dict[str, torch.Tensor]:
    """A 1-block 'ViT' of width 4 with one head (head dim 4, softmax scale 1/2) whose kept parts are known.

    Residual dims 0 and 2 have the largest patch-embedding norms; query/key rows 1 and 3 read dims 0 and 2
    with weight a (rows 0 and 2 are zero); value rows 0 and 1 read dims 0 and 2; proj writes them back.
    With a^2 = 2 ln 3 a pruned head scored at the backbone's 1/2 sees logits (ln 3, 0): softmax (3/4, 1/4).
    """
    a = math.sqrt(2 * math.log(3))
    wq = torch.zeros(4, 4)
    wq[1, 0] = wq[3, 2] = a
    wv = torch.zeros(4, 4)
    wv[0, 0] = wv[1, 2] = 1.0
    proj = torch.zeros(4, 4)
    proj[0, 0] = proj[2, 1] = 1.0
    fc1, fc2 = torch.zeros(8, 4), torch.zeros(4, 8)
    fc1[:2, 0] = fc2[0, :2] = 1.0  # hidden units 0, 1 score highest (2 of 8 kept at side width 2, ratio 2)
    return {
        "patch_embed.proj.weight": torch.tensor([3.0, 1.0, 2.0, 0.5]).view(4, 1, 1, 1).expand(4, 3, 1, 1).clone(),
        "blocks.0.norm1.weight": torch.ones(4),
        "blocks.0.norm1.bias": torch.zeros(4),
        "blocks.0.attn.qkv.weight": torch.cat([wq, wq, wv]),
        "blocks.0.attn.qkv.bias": torch.zeros(12),
        "blocks.0.attn.proj.weight": proj,
        "blocks.0.attn.proj.bias": torch.zeros(4),
        "blocks.0.norm2.weight": torch.ones(4),
        "blocks.0.norm2.bias": torch.zeros(4),
        "blocks.0.mlp.fc1.weight": fc1,
        "blocks.0.mlp.fc1.bias": torch.zeros(8),
        "blocks.0.mlp.fc2.weight": fc2,
        "blocks.0.mlp.fc2.bias": torch.zeros(4),
    }


def test_pruned_attention_keeps_the_backbone_logit_scale_hand_computed() -> None:
    state = _hand_state()
    info = MethodInput(_taps(4, tokens=2, prefix=0), 3, None, "vit", lambda: state, backbone_heads=1)
    net = create("lst", {"reduction": 2}, info).eval()  # init="auto" prunes: s = 2, one head of 2 dims
    assert net.config.init == "prune" and net.kept_dims == [0, 2] and net.heads == 1
    assert net.config.attn_scale == 0.5 and net.describe()["attn_scale"] == 0.5  # 1/sqrt(4 / 1), not 1/sqrt(2 / 1)
    attn = net.blocks[0].attn
    torch.testing.assert_close(attn.qkv.weight[:2], torch.eye(2) * math.sqrt(2 * math.log(3)))  # q rows 1, 3
    u = torch.eye(2)[None]  # (1, T=2, s=2): token 1 = e_0, token 2 = e_1
    with torch.no_grad():
        out = attn(u)
        torch.testing.assert_close(out, torch.tensor([[[0.75, 0.25], [0.25, 0.75]]]))
        attn.scale = None  # SDPA's default 1/sqrt(side head dim) would sharpen the softmax
        w = 3 ** math.sqrt(2) / (3 ** math.sqrt(2) + 1)  # logits sqrt(2) ln 3
        torch.testing.assert_close(attn(u), torch.tensor([[[w, 1 - w], [1 - w, w]]]))
        assert abs(w - 0.75) > 0.07


def test_random_init_uses_the_side_head_dim_scale() -> None:
    info = MethodInput(_taps(64), 3, None, "vit")
    net = create("lst", {"init": "random"}, info)  # s = 8, heads = 1
    assert net.heads == 1 and net.config.attn_scale == pytest.approx(8**-0.5)


def test_pruned_block_equals_the_timm_block_on_the_kept_dims() -> None:
    """A timm Block (2 heads of 4, LayerScale) whose pruned-away rows are zero: the side block's attention and
    MLP branches equal the backbone's, restricted to the kept residual dims (LayerScale folded in)."""
    torch.manual_seed(0)
    block = Block(dim=8, num_heads=2, mlp_ratio=2.0, qkv_bias=True, init_values=0.5).eval()
    keep = [1, 2, 5, 7]
    qk_drop = [0, 3, 4 + 1, 4 + 2]  # 2 of 4 query/key dims per head pruned
    v_drop = [1, 2, 4 + 0, 4 + 3]
    hidden_drop = list(range(1, 16, 2))  # 8 of 16 hidden units pruned (ratio 2 on side width 4)
    with torch.no_grad():
        block.ls1.gamma.copy_(torch.linspace(0.2, 1.5, 8))
        block.ls2.gamma.copy_(torch.linspace(1.5, 0.2, 8))
        w, b = block.attn.qkv.weight, block.attn.qkv.bias
        w[qk_drop] = 0
        w[[8 + i for i in qk_drop]] = 0
        w[[16 + i for i in v_drop]] = 0
        b[qk_drop] = 0
        b[[8 + i for i in qk_drop]] = 0
        b[[16 + i for i in v_drop]] = 0
        block.mlp.fc1.weight[hidden_drop] = 0
        block.mlp.fc1.bias[hidden_drop] = 0
        block.mlp.fc2.weight[:, hidden_drop] = 0
    embed = torch.ones(8, 3, 1, 1)
    embed[keep] = 5.0
    state = {"patch_embed.proj.weight": embed, **{f"blocks.0.{k}": v for k, v in block.state_dict().items()}}
    info = MethodInput(_taps(8), 3, None, "vit", lambda: state, backbone_heads=2)
    net = create("lst", {"reduction": 2, "dropout": 0.0}, info).eval()
    assert net.kept_dims == keep and net.heads == 2 and net.config.attn_scale == 0.5  # backbone head dim 4
    x = torch.zeros(3, 5, 8)
    x[..., keep] = torch.randn(3, 5, 4)  # the backbone stream restricted to the kept dims
    side = net.blocks[0]
    with torch.no_grad():
        torch.testing.assert_close(side.attn(x[..., keep]), block.ls1(block.attn(x))[..., keep], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(side.mlp(x[..., keep]), block.ls2(block.mlp(x))[..., keep], atol=1e-6, rtol=1e-5)
        side.attn.scale = None  # with SDPA's default scale the copy no longer matches
        assert not torch.allclose(side.attn(x[..., keep]), block.ls1(block.attn(x))[..., keep], atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Heads and the init default


def _vit_state(width: int = 64, heads_dim: int = 32, blocks: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    state = {"patch_embed.proj.weight": torch.randn(width, 3, 4, 4)}
    for k in range(blocks):
        b = Block(dim=width, num_heads=width // heads_dim, mlp_ratio=3.0)
        state.update({f"blocks.{k}.{n}": v for n, v in b.state_dict().items()})
    return state


def test_pruning_needs_the_backbone_head_count() -> None:
    state, loads = _vit_state(), []  # 2 heads of 32
    info = MethodInput(_taps(64), 3, None, "vit", lambda: loads.append(1) or state, backbone_heads=2)
    assert create("lst", {"init": "prune"}, info).heads == 2 and len(loads) == 1  # heads=None: the backbone's
    with pytest.raises(
        ConfigError,
        match=r"heads: init=prune prunes each of the backbone's 2 attention heads.*"
        r"got heads=4; set heads=2 or null",
    ):
        create("lst", {"init": "prune", "heads": 4}, info)
    assert len(loads) == 1  # the conflict is found before the backbone's weights are loaded
    with pytest.raises(
        ConfigError,
        match=r"heads: init=prune keeps the backbone's 2 heads, which do not divide the "
        r"side width 1 \(= 64 / reduction 64\)",
    ):
        create("lst", {"init": "prune", "reduction": 64}, info)


def test_pruning_without_a_recorded_head_count_assumes_64_wide_heads(caplog: pytest.LogCaptureFixture) -> None:
    state = _vit_state()
    info = MethodInput(_taps(64), 3, None, "vit", lambda: state)  # no backbone_heads (a store before num_heads)
    with caplog.at_level(logging.WARNING, logger="featcache.methods"):
        net = create("lst", {"init": "prune"}, info)
    assert net.heads == 1 and "assuming 1 heads (width 64 / 64)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="featcache.methods"):
        assert create("lst", {"init": "prune", "heads": 2}, info).heads == 2  # an explicit count is trusted
    assert caplog.text == ""


def test_init_auto_prunes_vits_and_falls_back_to_random_saying_why(caplog: pytest.LogCaptureFixture) -> None:
    state = _vit_state()
    taps = _taps(64)
    cases = [  # (MethodInput, config, resolved init, why it fell back)
        (MethodInput(taps, 3, None, "vit", lambda: state, backbone_heads=2), {}, "prune", None),
        (MethodInput(taps, 3, None, "vit"), {}, "random", "needs the backbone's weights"),
        (
            MethodInput(taps, 3, None, "vit", lambda: state, backbone_heads=2),
            {"heads": 4},
            "random",
            "so heads must be 2, got heads=4",
        ),
        (
            MethodInput(taps, 3, None, "vit", lambda: state, backbone_heads=2),
            {"mlp_ratio": 4},
            "random",
            "differs from the backbone's MLP ratio 3",
        ),
        (
            MethodInput(
                taps, 3, None, "vit", lambda: {**state, "blocks.0.attn.q_norm.weight": torch.ones(32)}, backbone_heads=2
            ),
            {},
            "random",
            "has parameters pruning cannot copy (attn.q_norm.weight)",
        ),
        (MethodInput(taps, 3, None, "cnn"), {}, "random", None),
    ]
    for info, config, init, why in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="featcache.methods"):
            net = create("lst", config, info)
        assert net.config.init == init and (net.pruned_from == [0]) == (init == "prune")
        if why is None:
            assert caplog.text == ""
        else:
            assert "init=auto starts from random weights" in caplog.text and why in caplog.text
    # the explicit init refuses what auto falls back from
    with pytest.raises(ConfigError, match=r"has parameters pruning cannot copy \(attn.q_norm.weight\)"):
        create("lst", {"init": "prune"}, cases[4][0])
    with pytest.raises(ConfigError, match="needs the backbone's weights"):
        create("lst", {"init": "prune"}, cases[1][0])


def test_resolved_config_rebuilds_from_a_checkpoint_without_the_backbone() -> None:
    state = _vit_state(blocks=2)
    taps = _taps(64, blocks=2)
    net = create("lst", None, MethodInput(taps, 3, None, "vit", lambda: state, backbone_heads=2)).eval()
    cfg = net.config.to_dict()
    assert (cfg["init"], cfg["heads"], cfg["mlp_ratio"], cfg["dropout"]) == ("prune", 2, 3.0, 0.1)
    assert cfg["attn_scale"] == 32**-0.5  # the backbone's head dim, not the side's (8 / 2 = 4)
    back = MethodInput.from_dict(net.input_description)
    again = create("lst", cfg, back).eval()
    assert again.attn_scale == net.attn_scale and again.config.to_dict() == cfg
    again.load_state_dict(net.state_dict())
    x = _batch(taps, 4)
    torch.testing.assert_close(again(x), net(x))
    # a config saved before attn_scale and dropout were recorded: SDPA's default scale, as it was trained
    old = {k: v for k, v in cfg.items() if k not in ("attn_scale", "dropout")}
    assert create("lst", old, back).attn_scale is None


# ---------------------------------------------------------------------------------------------
# Dropout


def test_side_block_dropout_sits_on_the_branch_outputs_and_the_mlp_hidden_units() -> None:
    torch.manual_seed(0)
    p = 0.3
    block = SideBlock(width=16, heads=2, hidden=64, dropout=p)
    x = torch.randn(32, 9, 16)
    with torch.no_grad():
        # attention branch = proj bias only (zero qkv, zero proj weight); MLP branch = 0
        block.attn.qkv.weight.zero_()
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.fill_(2.0)
        block.mlp.fc2.weight.zero_()
        delta = block(x) - x  # entries: 0 (dropped) or 2 / (1 - p)
    dropped = delta == 0
    torch.testing.assert_close(delta[~dropped], torch.full_like(delta[~dropped], 2 / (1 - p)))
    assert abs(dropped.float().mean().item() - p) < 0.03  # 4608 entries: binomial sd 0.007
    with torch.no_grad():
        # MLP branch only: a constant GELU(3) hidden unit averaged by fc2; dropped hidden units make it vary
        block.attn.proj.bias.zero_()
        block.mlp.fc1.weight.zero_()
        block.mlp.fc1.bias.fill_(3.0)
        block.mlp.fc2.weight.fill_(1 / 64)
        block.mlp.fc2.bias.zero_()
        delta = block(x) - x
    kept = delta[delta != 0]  # the output dropout zeroes a fraction p of the entries
    assert abs(1 - kept.numel() / delta.numel() - p) < 0.03
    assert kept.std() > 0.05  # hidden-unit dropout: the mean over 64 masked units differs per entry
    # unbiased: E[kept] = GELU(3) / (1 - p) (output dropout's rescale; the hidden rescale cancels in expectation)
    assert abs(kept.mean().item() - F.gelu(torch.tensor(3.0)).item() / (1 - p)) < 0.05
    block.eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x) - x, torch.full_like(x, F.gelu(torch.tensor(3.0)).item()))


def test_lst_dropout_in_train_mode_only() -> None:
    taps = _taps(64, blocks=2)
    x = _batch(taps, 64)
    torch.manual_seed(0)
    net = create("lst", {"dropout": 0.3, "pool": "cls", "init": "random"}, MethodInput(taps, 3, None, "vit"))
    plain = create("lst", {"dropout": 0.0, "pool": "cls", "init": "random"}, MethodInput(taps, 3, None, "vit"))
    plain.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.manual_seed(1)
        a = net.features(x)
        torch.manual_seed(1)
        b = net.features(x)
        torch.manual_seed(2)
        c = net.features(x)
        torch.testing.assert_close(a, b)  # seeded: reproducible
        assert not torch.allclose(a, c)
        # after the final side norm: CLS features are zero with probability p (64 x 8 entries)
        assert abs((a == 0).float().mean().item() - 0.3) < 0.08
        net.eval()
        torch.testing.assert_close(net(x), plain.eval()(x))  # eval mode: exactly the dropout-free network
        torch.manual_seed(3)
        torch.testing.assert_close(net(x), plain(x))


def test_vmap_members_draw_their_own_dropout_masks() -> None:
    taps = _taps(64)
    x = _batch(taps, 8)
    torch.manual_seed(0)
    net = create("lst", {"dropout": 0.5, "init": "random"}, MethodInput(taps, 3, None, "vit"))
    params, buffers = stack_module_state([net, net])  # two identical members

    def call(p: dict, b: dict, taps: dict) -> torch.Tensor:
        return functional_call(net, (p, b), (taps,))

    out = vmap(call, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
    assert not torch.allclose(out[0], out[1])
    net.eval()
    out = vmap(call, in_dims=(0, 0, None), randomness="different")(params, buffers, x)
    torch.testing.assert_close(out[0], out[1])


def test_bank_trains_with_dropout_and_evaluates_without() -> None:
    from featcache.member_bank import MemberBank
    from featcache.sweep import SweepMember, TrainConfig

    taps = _taps(64, blocks=2)
    mi = MethodInput(taps, 3, None, "vit")
    members = [SweepMember(f"m{k}", "lst", {"dropout": 0.5}, TrainConfig(seed=k)) for k in range(2)]
    bank = MemberBank(members, mi, torch.device("cpu"))
    x, y = _batch(taps, 8), torch.arange(8) % 3
    bank.train_step(x, y, 0.5, 2)
    assert bank.template.training
    loss_a, correct_a, pred_a = bank.evaluate(x, y)
    assert not bank.template.training
    loss_b, _, _ = bank.evaluate(x, y)
    torch.testing.assert_close(loss_a, loss_b)  # eval mode: deterministic
    net = create("lst", bank.template.config.to_dict(), MethodInput.from_dict(mi.to_dict()))
    net.load_state_dict(bank.member_state(1))
    with torch.no_grad():
        ref = F.cross_entropy(net.eval()(x), y, reduction="sum")
    torch.testing.assert_close(loss_a[1], ref)
    bank.template.train()
    with torch.no_grad():
        assert not torch.allclose(bank.forward(x), bank.forward(x))  # train mode: dropout on


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bank_draws_dropout_per_member_under_vmap_and_evaluates_without() -> None:
    """On CUDA the bank vmaps (randomness="different"): identical members still get their own masks."""
    from featcache.member_bank import MemberBank
    from featcache.sweep import SweepMember, TrainConfig

    taps = _taps(64, blocks=2)
    members = [SweepMember(f"m{k}", "lst", {"dropout": 0.5}, TrainConfig(seed=0)) for k in range(2)]
    bank = MemberBank(members, MethodInput(taps, 3, None, "vit"), torch.device("cuda"))
    assert not bank.member_loop
    x, y = {k: v.cuda() for k, v in _batch(taps, 8).items()}, (torch.arange(8) % 3).cuda()
    bank.template.train()
    with torch.no_grad():
        out = bank.forward(x)
    assert not torch.allclose(out[0], out[1])
    losses, _ = bank.train_step(x, y, 0.5, 2)
    assert torch.isfinite(losses).all()
    a, b = bank.evaluate(x, y)[0], bank.evaluate(x, y)[0]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Fisher-ranked pruning (prune_by="fisher")


def _timm_vit(width: int = 16, heads: int = 2, blocks: int = 2) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny timm ViT (LayerScale, final norm) and its state dict, random weights."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        img_size=8,
        patch_size=4,
        embed_dim=width,
        depth=blocks,
        num_heads=heads,
        mlp_ratio=2.0,
        init_values=0.5,
        num_classes=0,
    ).eval()
    return vit, {k: v.detach().clone() for k, v in vit.state_dict().items()}


def test_vit_block_equals_timms_block() -> None:
    from featcache.methods.fisher import vit_block

    vit, state = _timm_vit()
    x = torch.randn(3, 5, 16)
    p = {k[len("blocks.1.") :]: v for k, v in state.items() if k.startswith("blocks.1.")}
    with torch.no_grad():
        torch.testing.assert_close(vit_block(p, x, heads=2), vit.blocks[1](x), atol=1e-5, rtol=1e-5)


def test_fisher_information_is_the_sum_of_per_sample_squared_gradients() -> None:
    """Against autograd through timm's own blocks, final norm and the fitted probe, one sample at a time."""
    from featcache.methods.fisher import fisher_information, fit_probe

    vit, state = _timm_vit()
    x, y = torch.randn(6, 5, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    residual, fisher = fisher_information(state, x, y, first_block=0, heads=2, num_classes=3)
    assert sorted(fisher) == sorted(
        f"blocks.{k}.{n}"
        for k in (0, 1)
        for n in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")
    )

    def pooled(z: torch.Tensor) -> torch.Tensor:
        return vit.norm(vit.blocks(z))[:, 1:].mean(1)

    with torch.no_grad():
        w, b = fit_probe(pooled(x), y, 3)
    vit.requires_grad_(True)
    want = {k: torch.zeros_like(v) for k, v in fisher.items()}
    want_residual = torch.zeros(16)
    for n in range(6):
        xn = x[n : n + 1].clone().requires_grad_(True)
        vit.zero_grad()
        loss = F.cross_entropy(F.linear(pooled(xn), w, b), y[n : n + 1])
        loss.backward()
        want_residual += xn.grad.square().sum((0, 1))
        for k in want:
            want[k] += dict(vit.named_parameters())[k].grad.square()
    torch.testing.assert_close(residual, want_residual, rtol=1e-4, atol=1e-9)
    for k in want:
        torch.testing.assert_close(fisher[k], want[k], rtol=1e-4, atol=1e-9)
        assert fisher[k].abs().sum() > 0
    # a batch's squared mean gradient is not the Fisher sum (the per-sample loop matters)
    _, from_first = fisher_information(state, x[:1], y[:1], 0, 2, 3)
    assert not torch.allclose(from_first["blocks.0.mlp.fc1.weight"], fisher["blocks.0.mlp.fc1.weight"])


def test_pruning_ranks_by_the_importance_given_instead_of_the_magnitude() -> None:
    """Equal-magnitude rows: the importance decides which query/key, value, hidden and residual dims are kept."""
    from featcache.methods.lst import prune_residual_dims, pruned_block_state

    d, hidden = 8, 16
    state = {"patch_embed.proj.weight": torch.ones(d, 3, 1, 1)}
    for k, shape in (
        ("attn.qkv.weight", (3 * d, d)),
        ("attn.proj.weight", (d, d)),
        ("mlp.fc1.weight", (hidden, d)),
        ("mlp.fc2.weight", (d, hidden)),
    ):
        state[f"blocks.0.{k}"] = torch.arange(1, 1 + math.prod(shape), dtype=torch.float).reshape(shape).sin().sign()
    for k, n in (
        ("attn.qkv.bias", 3 * d),
        ("attn.proj.bias", d),
        ("mlp.fc1.bias", hidden),
        ("mlp.fc2.bias", d),
        ("norm1.weight", d),
        ("norm1.bias", d),
        ("norm2.weight", d),
        ("norm2.bias", d),
    ):
        state[f"blocks.0.{k}"] = torch.arange(n, dtype=torch.float)
    residual = torch.zeros(d)
    residual[[1, 6, 7, 2]] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    keep = prune_residual_dims(state, 4, residual)
    assert keep.tolist() == [1, 2, 6, 7]
    importance = {k: torch.zeros_like(v) for k, v in state.items() if k.endswith("weight") and "blocks" in k}
    qkv = importance["blocks.0.attn.qkv.weight"]
    qkv[[2, 3, 5, 7]] = 1.0  # query rows: head 0 dims 2, 3; head 1 dims 5, 7 (4 dims per head, 2 kept)
    qkv[[d + 2, d + 3, d + 5, d + 7]] = 1.0  # the matching key rows
    qkv[[2 * d + 0, 2 * d + 1, 2 * d + 4, 2 * d + 6]] = 1.0  # value rows
    importance["blocks.0.attn.proj.weight"][:, [0, 1, 4, 6]] = 1.0
    importance["blocks.0.mlp.fc1.weight"][[3, 9, 10, 15]] = 1.0
    importance["blocks.0.mlp.fc2.weight"][:, [3, 9, 10, 15]] = 1.0
    out = pruned_block_state(state, 0, keep, heads=2, hidden=4, importance=importance)
    torch.testing.assert_close(out["attn.qkv.bias"], torch.tensor([2.0, 3, 5, 7, 10, 11, 13, 15, 16, 17, 20, 22]))
    torch.testing.assert_close(out["mlp.fc1.bias"], torch.tensor([3.0, 9, 10, 15]))
    torch.testing.assert_close(out["norm1.bias"], keep.float())
    magnitude = pruned_block_state(state, 0, keep, heads=2, hidden=4)  # |W| is 1 everywhere: ties, not these rows
    assert not torch.equal(magnitude["attn.qkv.bias"], out["attn.qkv.bias"])


def test_lst_prune_by_fisher_keeps_the_dims_with_the_largest_squared_gradients() -> None:
    from featcache.methods.fisher import fisher_information

    vit, state = _timm_vit(width=16, heads=2, blocks=2)
    taps = _taps(16, tokens=5, blocks=2)
    data = _batch(taps, 12, seed=3)
    labels = torch.arange(12) % 3
    calls: list[tuple[list[str], int]] = []

    def sample(names: list[str], n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        calls.append((names, n))
        return {k: data[k][:n] for k in names}, labels[:n]

    info = MethodInput(taps, 3, None, "vit", lambda: state, backbone_heads=2, training_sample=sample)
    cfg = {"reduction": 2, "prune_by": "fisher", "fisher_samples": 10}
    net = create("lst", cfg, info)
    residual, fisher = fisher_information(state, data["embed"][:10], labels[:10], 0, 2, 3)
    assert calls == [(["embed"], 10)] and net.config.init == "prune"
    assert net.kept_dims == sorted(residual.topk(8).indices.tolist())
    magnitude = create("lst", {"reduction": 2}, MethodInput(taps, 3, None, "vit", lambda: state, backbone_heads=2))
    assert magnitude.kept_dims != net.kept_dims  # the ranking changed what is kept
    create("lst", cfg, info)
    assert len(calls) == 1  # a second member built from the same input reuses the Fisher information
    saved = net.config.to_dict()
    assert (saved["prune_by"], saved["fisher_samples"]) == ("fisher", 10)
    again = create("lst", saved, MethodInput.from_dict(net.input_description))  # a checkpoint: no samples needed
    assert again.config.to_dict() == saved
    with pytest.raises(ConfigError, match=r"prune_by: 'fisher' needs training samples"):
        create("lst", cfg, MethodInput(taps, 3, None, "vit", lambda: state, backbone_heads=2))
    with pytest.raises(ConfigError, match=r"prune_by must be one of auto, magnitude, fisher, got 'fischer'"):
        create("lst", {"prune_by": "fischer"}, info)
    no_embed = [t for t in taps if t.name != "embed"]
    with pytest.raises(ConfigError, match=r"runs the backbone's blocks from the tap that feeds block 0"):
        create(
            "lst",
            {**cfg, "taps": "block1,block2"},
            MethodInput(no_embed, 3, None, "vit", lambda: state, backbone_heads=2, training_sample=sample),
        )


def test_lst_prune_by_auto_ranks_by_fisher_when_it_can_and_records_what_it_used() -> None:
    vit, state = _timm_vit(width=16, heads=2, blocks=2)
    taps = _taps(16, tokens=5, blocks=2)
    data = _batch(taps, 12, seed=3)
    labels = torch.arange(12) % 3

    def sample(names: list[str], n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        return {k: data[k][:n] for k in names}, labels[:n]

    with_samples = MethodInput(taps, 3, None, "vit", lambda: state, backbone_heads=2, training_sample=sample)
    fisher = create("lst", {"reduction": 2, "prune_by": "fisher", "fisher_samples": 10}, with_samples)
    auto = create("lst", {"reduction": 2, "fisher_samples": 10}, with_samples)  # the default: prune_by="auto"
    assert auto.config.prune_by == "fisher" and auto.kept_dims == fisher.kept_dims
    no_samples = MethodInput(taps, 3, None, "vit", lambda: state, backbone_heads=2)
    magnitude = create("lst", {"reduction": 2, "prune_by": "magnitude"}, no_samples)
    auto = create("lst", {"reduction": 2}, no_samples)
    assert auto.config.prune_by == "magnitude" and auto.kept_dims == magnitude.kept_dims
    no_embed = MethodInput(
        [t for t in taps if t.name != "embed"], 3, None, "vit", lambda: state, backbone_heads=2, training_sample=sample
    )
    auto = create("lst", {"reduction": 2, "taps": "block1,block2"}, no_embed)  # nothing feeds block 0: magnitude
    assert auto.config.prune_by == "magnitude"
