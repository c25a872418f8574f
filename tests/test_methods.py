"""Side networks: contract (ViT and CNN taps), LAST bias correction, LST gates and pruned init, configs,
learning on separable synthetic taps, and the sweep's vmap over stacked members."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from featcache.backbone import Backbone
from featcache.errors import ConfigError
from featcache.manifest import BackboneSpec, TapInfo
from featcache.methods import (
    TRAINING_KEYS,
    MethodConfig,
    MethodInput,
    SideNetwork,
    config_class,
    create,
    list_methods,
    register,
)
from featcache.methods.last import choose_taps

from .conftest import TINY_CNN, TINY_VIT

METHODS = list_methods()
# vmap over SDPA on CPU loops over members and says so; featcache.methods filters it, pytest resets filters
pytestmark = pytest.mark.filterwarnings(
    "ignore:There is a performance drop because we have not yet implemented the batching rule:UserWarning"
)


@dataclass
class Fixture:
    backbone: Backbone
    taps: dict[str, torch.Tensor]
    info: MethodInput


def _fixture(spec: dict) -> Fixture:
    torch.manual_seed(0)
    b = Backbone(BackboneSpec(**spec))
    images = torch.randn(4, *b.data_config["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        taps = b.taps(images)
    info = MethodInput(
        b.taps.infos, 5, b.final_norm_state(), b.kind, lambda: b.model.state_dict(), backbone_heads=b.num_heads
    )
    return Fixture(b, taps, info)


@pytest.fixture(scope="module")
def vit_taps() -> Fixture:
    """A tiny ViT with its taps of 4 random images and its MethodInput."""
    return _fixture(TINY_VIT)


@pytest.fixture(scope="module")
def cnn() -> Fixture:
    return _fixture(TINY_CNN)


@pytest.fixture(scope="module", params=["vit", "cnn"])
def backbone_fx(request, vit_taps: Fixture, cnn: Fixture) -> Fixture:
    return vit_taps if request.param == "vit" else cnn


def _perturb(net: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its (often zero) initial value, so members differ and all paths carry signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return net


# ---------------------------------------------------------------------------------------------
# Registry and contract


def test_registry_lists_the_three_methods() -> None:
    assert METHODS == ["last", "linear", "lst"]
    assert [config_class(m).__name__ for m in METHODS] == ["LASTConfig", "LinearConfig", "LSTConfig"]


def test_unknown_method_suggests_close_names(vit_taps: Fixture) -> None:
    with pytest.raises(ConfigError, match="unknown method 'lats'.*did you mean last"):
        create("lats", None, vit_taps.info)
    with pytest.raises(ConfigError, match="unknown method"):
        config_class("ladder")


@pytest.mark.parametrize("method", METHODS)
def test_contract_forward_backward(method: str, backbone_fx: Fixture) -> None:
    fx = backbone_fx
    net = create(method, None, fx.info)
    assert isinstance(net, SideNetwork) and net.name == method
    assert set(net.required_taps) <= set(fx.taps) and net.required_taps
    logits = net(fx.taps)
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(4) % 5).backward()
    assert net.head.weight.grad is not None and net.head.weight.grad.abs().sum() > 0
    # only the required taps are needed, and extra taps are ignored (eval mode: LST's dropout off)
    net.eval()
    logits = net(fx.taps)
    only = {k: fx.taps[k] for k in net.required_taps}
    torch.testing.assert_close(net(only), logits)
    assert net.param_count() == sum(p.numel() for p in net.parameters()) > 0
    flops = net.flops_per_sample()
    assert isinstance(flops, int) and flops >= 2 * net.head.in_features * 5
    d = json.loads(json.dumps(net.describe()))
    assert d["method"] == method and d["param_count"] == net.param_count() and d["flops_per_sample"] == flops
    assert d["required_taps"] == net.required_taps and d["config"] == net.config.to_dict()


@pytest.mark.parametrize("method", METHODS)
def test_batch_missing_a_required_tap_is_a_clear_error(method: str, vit_taps: Fixture) -> None:
    net = create(method, None, vit_taps.info)
    missing = net.required_taps[-1]
    with pytest.raises(ConfigError, match=f"lacks tap '{missing}'"):
        net({k: v for k, v in vit_taps.taps.items() if k != missing})
    bad = dict(vit_taps.taps)
    bad[missing] = bad[missing][:, :2]
    with pytest.raises(ConfigError, match="has shape"):
        net(bad)


@pytest.mark.parametrize("method", METHODS)
def test_store_with_a_subset_of_taps_builds(method: str, vit_taps: Fixture) -> None:
    keep = ["embed", "block3", "block6"]
    info = MethodInput([t for t in vit_taps.info.taps if t.name in keep], 5, vit_taps.info.final_norm, "vit")
    net = create(method, None, info)
    assert set(net.required_taps) <= set(keep)
    out = net({k: vit_taps.taps[k] for k in keep})
    assert out.shape == (4, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("method", METHODS)
def test_half_precision_taps_are_cast_when_not_autocasting(method: str, vit_taps: Fixture) -> None:
    net = create(method, None, vit_taps.info).eval()
    out = net({k: v.half() for k, v in vit_taps.taps.items()})
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, net({k: v.half().float() for k, v in vit_taps.taps.items()}))


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_taps_under_autocast(method: str, vit_taps: Fixture) -> None:
    """The trainer feeds bf16 batches under autocast (CUDA); CPU autocast exercises the same path."""
    net = create(method, None, vit_taps.info).eval()
    ref = net(vit_taps.taps)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net({k: v.bfloat16() for k, v in vit_taps.taps.items()})
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and net.head.weight.grad is not None
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=5e-2)


def test_flops_are_counted_analytically_right(vit_taps: Fixture) -> None:
    lin = create("linear", None, vit_taps.info)
    assert lin.flops_per_sample() == 2 * 64 * 5  # one (64 -> 5) matmul
    net = create("last", {"rank": 16, "heads": 2, "gap": 3, "depth": 2}, vit_taps.info)
    t, d, r, h = 5, 64, 16, 2
    layer = 2 * t * d * 3 * r + 2 * t * r * d + 2 * (2 * h * t * t * (r // h))  # qkv, out, QK^T and AV
    assert net.flops_per_sample() == 2 * 2 * layer + 2 * d * 5  # 2 side blocks (block3, block6) x depth 2 + head


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("method", METHODS)
def test_config_json_round_trip(method: str) -> None:
    cls = config_class(method)
    default = cls()
    assert cls.from_dict(json.loads(json.dumps(default.to_dict()))) == default
    changed = {
        "linear": {"taps": ["block3", "block6"], "pool": "cls", "norm": "none"},
        "last": {"rank": 8, "heads": 2, "gap": 3, "depth": 2, "pool": "cls", "width": 32, "taps": ["embed", "block6"]},
        "lst": {
            "reduction": 4,
            "heads": 2,
            "mlp_ratio": 2.0,
            "pool": "cls",
            "taps": ["embed", "block2"],
            "init": "prune",
            "dropout": 0.25,
            "attn_scale": 0.125,
            "prune_by": "fisher",
            "fisher_samples": 64,
        },
    }[method]
    cfg = cls.from_dict(changed)
    assert cfg.to_dict() == changed
    assert cls.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_accepts_command_line_text() -> None:
    cfg = config_class("last").from_dict({"rank": "8", "heads": "2", "width": "null", "taps": "embed,block3,block6"})
    assert (cfg.rank, cfg.heads, cfg.width, cfg.taps) == (8, 2, None, ["embed", "block3", "block6"])
    lst = config_class("lst").from_dict({"mlp_ratio": "3", "heads": "none"})
    assert lst.mlp_ratio == 3.0 and lst.heads is None
    assert config_class("linear").from_dict({"taps": "last"}).taps == "last"


@pytest.mark.parametrize("method", METHODS)
def test_config_unknown_key_lists_valid_keys(method: str) -> None:
    cls = config_class(method)
    with pytest.raises(ConfigError) as err:
        cls.from_dict({"pool": "avg", "bogus_key": 1})
    msg = str(err.value)
    assert "bogus_key" in msg and all(k in msg for k in cls.keys())


@pytest.mark.parametrize(
    "method, values, pattern",
    [
        ("last", {"rank": 0}, r"rank must be a positive integer, got 0"),
        ("last", {"rank": 6, "heads": 4}, r"rank: rank 6 must be a multiple of heads 4"),
        ("last", {"gap": 0}, r"gap must be a positive integer, got 0"),
        ("last", {"depth": -1}, r"depth must be a positive integer, got -1"),
        ("last", {"pool": "agv"}, r"pool must be one of avg, cls, got 'agv'; did you mean avg\?"),
        ("last", {"rank": "abc"}, r"rank must be an integer, got 'abc'"),
        ("last", {"rank": 2.5}, r"rank must be an integer"),
        ("last", {"heads": True}, r"heads must be an integer"),
        ("last", {"taps": []}, r"taps: must be 'auto' or a non-empty list"),
        ("lst", {"reduction": 0}, r"reduction must be a positive integer, got 0"),
        ("lst", {"init": "fisher"}, r"init must be one of auto, random, prune, got 'fisher'"),
        ("lst", {"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ("lst", {"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
        ("lst", {"attn_scale": 0}, r"attn_scale must be a positive number or null, got 0"),
        ("lst", {"heads": 0}, r"heads must be a positive integer or null, got 0"),
        ("lst", {"taps": ["block1", "block1"]}, r"taps: lists a tap twice"),
        ("linear", {"norm": "batchnorm"}, r"norm must be one of layernorm, none, got 'batchnorm'"),
        ("linear", {"pool": "max"}, r"pool must be one of avg, cls, got 'max'"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(method: str, values: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        config_class(method).from_dict(values)


def test_config_values_checked_against_the_store(vit_taps: Fixture, cnn: Fixture) -> None:
    with pytest.raises(ConfigError, match=r"taps: the store has no tap 'blok3'; did you mean block3"):
        create("linear", {"taps": ["blok3"]}, vit_taps.info)
    with pytest.raises(ConfigError, match=r"pool: 'cls' needs a CLS token.*use pool=avg"):
        create("last", {"pool": "cls"}, cnn.info)
    with pytest.raises(ConfigError, match=r"heads: 3 does not divide the side width 8"):
        create("lst", {"heads": 3}, vit_taps.info)
    with pytest.raises(ConfigError, match=r"reduction: 128 leaves no side width"):
        create("lst", {"reduction": 128}, vit_taps.info)
    with pytest.raises(ConfigError, match=r"takes a LASTConfig"):
        create("last", config_class("lst")(), vit_taps.info)


def test_config_fields_never_clash_with_training_keys() -> None:
    for m in METHODS:
        assert not set(config_class(m).keys()) & TRAINING_KEYS

    @dataclass
    class Clashing(MethodConfig):
        lr: float = 0.1

    class Net(SideNetwork):
        pass

    with pytest.raises(ValueError, match=r"\['lr'\] clash with training keys"):
        register("clashing", Clashing, Net)
    assert "clashing" not in list_methods()


def test_method_input_round_trip_rebuilds_a_checkpointed_network(vit_taps: Fixture) -> None:
    d = json.loads(json.dumps(vit_taps.info.to_dict()))
    assert d["has_final_norm"] is True and d["backbone_kind"] == "vit"
    back = MethodInput.from_dict(d)
    assert back.taps == vit_taps.info.taps and back.num_classes == 5 and back.from_checkpoint
    assert back.final_norm is None and back.backbone_state is None
    for method, cfg in [("last", None), ("lst", {"init": "prune", "heads": 2}), ("linear", None)]:
        net = _perturb(create(method, cfg, vit_taps.info), seed=3).eval()
        again = create(method, net.config.to_dict(), back).eval()  # no backbone weights needed to restore
        again.load_state_dict(net.state_dict())
        torch.testing.assert_close(again(vit_taps.taps), net(vit_taps.taps))
    with pytest.raises(ConfigError, match="num_classes"):
        MethodInput(vit_taps.info.taps, 0)
    with pytest.raises(ConfigError, match="backbone_kind"):
        MethodInput(vit_taps.info.taps, 3, backbone_kind="rnn")
    with pytest.raises(ConfigError, match="malformed"):
        MethodInput.from_dict({"num_classes": 3})


# ---------------------------------------------------------------------------------------------
# LAST


def test_last_at_init_reproduces_the_frozen_backbone_feature(vit_taps: Fixture) -> None:
    b, taps = vit_taps.backbone, vit_taps.taps
    net = create("last", {"pool": "cls"}, vit_taps.info)
    assert net.norm_from_backbone and net.rung_taps[-1] == "block6"
    with torch.no_grad():
        ref = b.model.forward_head(b.model.norm(taps["block6"]), pre_logits=True)  # (N, 64)
        torch.testing.assert_close(net.features(taps), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(net(taps), net.head(ref), atol=1e-5, rtol=1e-5)
        avg = create("last", {"pool": "avg"}, vit_taps.info)
        ref_avg = b.model.norm(taps["block6"])[:, 1:].mean(1)  # mean of the normalised patch tokens
        torch.testing.assert_close(avg.features(taps), ref_avg, atol=1e-5, rtol=1e-5)
        # the side network's output projections are what moves it off the backbone's feature
        net.side[0][0].proj.weight.add_(0.1 * torch.randn(net.side[0][0].proj.weight.shape))
        assert (net.features(taps) - ref).abs().max() > 1e-3


def test_last_bias_correction_cancels_cnn_projections(cnn: Fixture) -> None:
    net = create("last", None, cnn.info)
    assert net.width == 1280 and "head" not in net.proj and "stem" in net.proj  # last tap: no projection
    with torch.no_grad():
        torch.testing.assert_close(net.corrected(cnn.taps), cnn.taps["head"], atol=1e-4, rtol=1e-5)


def test_last_tap_choice_follows_the_gap_rule(vit_taps: Fixture, cnn: Fixture) -> None:
    def names(taps: list[TapInfo], gap: int) -> tuple[str | None, list[str]]:
        base, rungs = choose_taps(taps, gap)
        return (base.name if base else None), [t.name for t in rungs]

    full = vit_taps.info.taps  # embed, block1..block6
    assert names(full, 1) == ("embed", ["block1", "block2", "block3", "block4", "block5", "block6"])
    assert names(full, 2) == ("embed", ["block2", "block4", "block6"])
    assert names(full, 4) == ("embed", ["block2", "block6"])  # 6 not divisible by 4: shorter first group
    assert names(full, 5) == ("embed", ["block1", "block6"])
    assert names(full, 6) == ("embed", ["block6"])
    subset = [t for t in full if t.name in ("embed", "block3", "block6")]
    assert names(subset, 1) == names(subset, 2) == names(subset, 3) == ("embed", ["block3", "block6"])
    assert names(subset, 4) == ("embed", ["block6"])
    assert names([t for t in full if t.name in ("block3", "block6")], 3) == (None, ["block3", "block6"])
    assert names(cnn.info.taps, 2) == ("stem", ["stage2", "stage4", "stage6", "head"])
    net = create("last", {"taps": ["embed", "block1", "block5"]}, vit_taps.info)
    assert (net.base_tap, net.rung_taps) == ("embed", ["block1", "block5"])


# ---------------------------------------------------------------------------------------------
# LST


def test_lst_gates_start_at_one_half(vit_taps: Fixture, cnn: Fixture) -> None:
    for fx in (vit_taps, cnn):
        net = create("lst", None, fx.info)
        mu = net.gates()
        assert mu.shape == (len(fx.info.taps) - 1,)  # one gate per side block (all taps but the embedding)
        torch.testing.assert_close(mu, torch.full_like(mu, 0.5))
    net = create("lst", {"taps": ["embed", "block2", "block4", "block6"]}, vit_taps.info)  # layer dropping
    assert net.rung_taps == ["block2", "block4", "block6"] and len(net.blocks) == 3


def _planted_state(vit_taps: Fixture) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """test_vit weights (d=64, 2 heads of 32, MLP 192) with known largest-norm dims planted."""
    state = {k: v.clone() for k, v in vit_taps.backbone.model.state_dict().items()}
    res = [3, 11, 17, 30, 41, 50, 58, 63]  # d / r = 8 residual dims
    qk = [2, 9, 20, 31, 32 + 5, 32 + 6, 32 + 18, 32 + 30]  # 4 per head (side width 8 / 2 heads)
    v = [0, 7, 13, 25, 32 + 1, 32 + 2, 32 + 3, 32 + 29]
    mlp = list(range(5, 192, 8))  # 24 of 192 hidden units (= 3 * 8)
    state["patch_embed.proj.weight"][res] *= 10
    for k in range(6):
        p = f"blocks.{k}."
        w = state[p + "attn.qkv.weight"]  # (192, 64): q, k, v rows
        w[qk] *= 10
        w[[64 + i for i in qk]] *= 10
        w[[128 + i for i in v]] *= 10
        state[p + "attn.proj.weight"][:, v] *= 10
        state[p + "mlp.fc1.weight"][mlp] *= 10
        state[p + "mlp.fc2.weight"][:, mlp] *= 10
    return state, {"res": res, "qk": qk, "v": v, "mlp": mlp}


def test_lst_pruned_init_copies_the_largest_norm_dims(vit_taps: Fixture) -> None:
    state, idx = _planted_state(vit_taps)
    info = MethodInput(vit_taps.info.taps, 5, vit_taps.info.final_norm, "vit", lambda: state, backbone_heads=2)
    net = create("lst", {"init": "prune", "heads": 2}, info)
    res, qk, v, mlp = (torch.tensor(idx[k]) for k in ("res", "qk", "v", "mlp"))
    assert net.kept_dims == idx["res"] and net.hidden == 24 and net.pruned_from == [0, 1, 2, 3, 4, 5]
    for k, block in enumerate(net.blocks):  # side block k reads block{k+1}: initialised from blocks.{k}
        p = f"blocks.{k}."
        q_w, k_w, v_w = state[p + "attn.qkv.weight"].split(64)
        torch.testing.assert_close(block.norm1.weight, state[p + "norm1.weight"][res])
        torch.testing.assert_close(block.norm2.bias, state[p + "norm2.bias"][res])
        torch.testing.assert_close(block.attn.qkv.weight, torch.cat([q_w[qk][:, res], k_w[qk][:, res], v_w[v][:, res]]))
        torch.testing.assert_close(block.attn.qkv.bias[:8], state[p + "attn.qkv.bias"][qk])
        torch.testing.assert_close(block.attn.proj.weight, state[p + "attn.proj.weight"][res][:, v])
        torch.testing.assert_close(block.mlp.fc1.weight, state[p + "mlp.fc1.weight"][mlp][:, res])
        torch.testing.assert_close(block.mlp.fc2.weight, state[p + "mlp.fc2.weight"][res][:, mlp])
        torch.testing.assert_close(block.mlp.fc2.bias, state[p + "mlp.fc2.bias"][res])
    torch.testing.assert_close(net.norm.weight, vit_taps.info.final_norm["weight"][res])
    x = vit_taps.taps["block3"]
    torch.testing.assert_close(net.down["block3"](x), x[..., res])  # ladders start as the kept-dim selection
    auto = create("lst", None, info)  # init="auto" prunes a ViT whose weights it has
    assert auto.kept_dims == idx["res"] and auto.config.init == "prune" and auto.config.heads == 2
    random = create("lst", {"heads": 2, "init": "random"}, info)
    assert random.pruned_from == [] and random.config.init == "random"
    assert not torch.allclose(random.blocks[0].attn.qkv.weight, net.blocks[0].attn.qkv.weight)


def test_lst_pruned_init_errors(vit_taps: Fixture, cnn: Fixture) -> None:
    with pytest.raises(ConfigError, match=r"init: 'prune' copies ViT blocks.*use init=random"):
        create("lst", {"init": "prune"}, cnn.info)
    no_state = MethodInput(vit_taps.info.taps, 5, None, "vit")
    with pytest.raises(ConfigError, match=r"init: 'prune' needs the backbone's weights"):
        create("lst", {"init": "prune"}, no_state)
    with pytest.raises(ConfigError, match=r"mlp_ratio: 4.0 differs from the backbone's MLP ratio 3"):
        create("lst", {"init": "prune", "heads": 2, "mlp_ratio": 4}, vit_taps.info)
    wrong = MethodInput(vit_taps.info.taps, 5, None, "vit", lambda: {"foo": torch.zeros(1)})
    with pytest.raises(ConfigError, match=r"no 'patch_embed.proj.weight'"):
        create("lst", {"init": "prune"}, wrong)


# ---------------------------------------------------------------------------------------------
# Learning and the sweep


_NAMES = ["embed"] + [f"block{k}" for k in range(1, 7)]
_INFOS = [TapInfo(n, i, i, 5, 1, 64, (2, 2), "none") for i, n in enumerate(_NAMES)]


def _separable(n: int, signal_taps: list[str], seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """3 classes; the taps in ``signal_taps`` carry a class mean on every token, all taps carry noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    means = torch.randn(3, 64, generator=torch.Generator().manual_seed(99))
    taps = {}
    for name in _NAMES:
        x = 2 * torch.randn(n, 5, 64, generator=g) + 3 * torch.randn(1, 1, 64, generator=g)  # (N, T, C)
        taps[name] = x + means[y][:, None, :] if name in signal_taps else x
    return taps, y


def _train(net: torch.nn.Module, taps: dict[str, torch.Tensor], y: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=g)
        loss = F.cross_entropy(net({k: v[idx] for k, v in taps.items()}), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _accuracy(net: torch.nn.Module, taps: dict[str, torch.Tensor], y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(taps).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("method", METHODS)
def test_learns_a_separable_problem(method: str) -> None:
    train, y_train = _separable(192, _NAMES, seed=0)
    test, y_test = _separable(96, _NAMES, seed=1)
    torch.manual_seed(0)
    net = create(method, None, MethodInput(_INFOS, 3, None, "vit"))
    _train(net, train, y_train, steps=60, lr=1e-2)
    assert _accuracy(net, test, y_test) > 0.9  # chance: 1/3


@pytest.mark.parametrize("method", ["last", "lst"])
def test_side_network_learns_what_only_an_early_tap_knows(method: str) -> None:
    """The class is only in block2: the last tap (all a linear probe sees) is noise; the side path must learn."""
    train, y_train = _separable(192, ["block2"], seed=0)
    test, y_test = _separable(96, ["block2"], seed=1)
    torch.manual_seed(0)
    info = MethodInput(_INFOS, 3, None, "vit")
    net, probe = create(method, None, info), create("linear", None, info)
    _train(net, train, y_train, steps=120, lr=1e-2)
    _train(probe, train, y_train, steps=120, lr=1e-2)
    assert _accuracy(net, test, y_test) > 0.9
    assert _accuracy(probe, test, y_test) < 0.6


@pytest.mark.parametrize("method", METHODS)
def test_vmap_over_stacked_members_equals_each_member(method: str, backbone_fx: Fixture) -> None:
    fx = backbone_fx
    members = []
    for k in range(3):
        torch.manual_seed(k)
        members.append(_perturb(create(method, None, fx.info), seed=10 + k).eval())  # eval: no dropout
    params, buffers = stack_module_state(members)
    template = copy.deepcopy(members[0]).to("meta")

    def call(p: dict, b: dict, x: dict) -> torch.Tensor:
        return functional_call(template, (p, b), (x,))

    out = vmap(call, in_dims=(0, 0, None))(params, buffers, fx.taps)  # (K, N, classes)
    assert out.shape == (3, 4, 5)
    for k, m in enumerate(members):
        torch.testing.assert_close(out[k], m(fx.taps), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out[0], out[1])
    y = torch.arange(4) % 5
    loss = sum(F.cross_entropy(out[k], y) for k in range(3))
    loss.backward()
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad.flatten(1).abs().sum(1) > 0).all(), f"{name}: a member got no gradient"
    # each member's gradient equals the gradient of its own forward
    m = members[1]
    F.cross_entropy(m(fx.taps), y).backward()
    torch.testing.assert_close(params["head.weight"].grad[1], m.head.weight.grad, atol=1e-5, rtol=1e-4)


def test_last_norm_then_linear_recomputes_the_norm_with_exact_gradients() -> None:
    """LAST keeps x, not LayerNorm(x), for backward; its gradients are those of linear(layer_norm(x))."""
    from featcache.methods.last import LowRankAttention, _NormThenLinear

    g = torch.Generator().manual_seed(0)
    args = [
        torch.randn(2, 5, 6, generator=g, dtype=torch.float64),
        1 + torch.randn(6, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64),
        torch.randn(9, 6, generator=g, dtype=torch.float64),
        torch.randn(9, generator=g, dtype=torch.float64),
    ]
    assert torch.autograd.gradcheck(_NormThenLinear.apply, [a.requires_grad_() for a in args] + [1e-6])
    x = args[0].detach()  # an input that needs no gradient (the first side layer reads stored taps)
    assert torch.autograd.gradcheck(_NormThenLinear.apply, [x] + args[1:] + [1e-6])

    layer = LowRankAttention(width=6, rank=4, heads=2).double()
    torch.nn.init.normal_(layer.proj.weight)  # W_o starts at zero: make every path carry gradient
    x = args[0].detach().requires_grad_()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).square().sum().backward()
    fused = [x.grad] + [p.grad for p in layer.parameters()]
    assert not any(t.shape == x.shape and not torch.equal(t, x) and torch.allclose(t, layer.norm(x)) for t in saved)
    x.grad = None
    layer.zero_grad()
    n, t, _ = x.shape
    qkv = layer.qkv(layer.norm(x)).reshape(n, t, 3, 2, -1).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
    (x + layer.proj(y.transpose(1, 2).reshape(n, t, -1))).square().sum().backward()
    for a, b in zip(fused, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(a, b)
