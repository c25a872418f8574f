"""Feature-space augmentation (featcache.augment): configs, determinism, and each augmentation against a
hand-checked case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from featcache.augment import (
    AUG_KEYS,
    AugmentConfig,
    FeatureStats,
    _overlap,
    augment,
    batch_generator,
    cutmix,
    feature_stats,
    frofa,
    token_drop,
)
from featcache.errors import ConfigError
from featcache.manifest import TapInfo


def _vit_infos(grid: int = 4, width: int = 8, blocks: int = 2) -> dict[str, TapInfo]:
    return {
        n: TapInfo(n, b, b, grid * grid + 1, 1, width, (grid, grid), "none")
        for b, n in enumerate(["embed"] + [f"block{k}" for k in range(1, blocks + 1)])
    }


def _cnn_infos() -> dict[str, TapInfo]:
    grids = {"stage1": 4, "stage2": 2, "head": 1}
    return {n: TapInfo(n, i, i + 1, g * g, 0, 6, (g, g), "avg") for i, (n, g) in enumerate(grids.items())}


def _batch(infos: dict[str, TapInfo], n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(n, t.tokens, t.channels, generator=g) for k, t in infos.items()}


ALL = ["tokendrop", "mixup", "cutmix", "frofa", "tokendrop+frofa", "mixup+cutmix", "frofa+tokendrop+cutmix"]


# ---------------------------------------------------------------------------------------------
# Config


def test_config_defaults_normalisation_and_round_trip() -> None:
    cfg = AugmentConfig()
    assert cfg.aug == "none" and cfg.names == ()
    assert (cfg.tokendrop_rate, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.frofa_brightness, cfg.frofa_contrast) == (
        0.2,
        0.8,
        1.0,
        0.1,
        0.0,
    )
    a = AugmentConfig(aug="tokendrop+frofa", tokendrop_rate="0.1")  # text, as --set gives it
    assert a.aug == "frofa+tokendrop" and a.names == ("frofa", "tokendrop") and a.tokendrop_rate == 0.1
    assert (
        a == AugmentConfig(aug=" FroFA + tokendrop ", tokendrop_rate=0.1)
        and len({a, AugmentConfig(aug="frofa+tokendrop", tokendrop_rate=0.1)}) == 1
    )  # hashable: members group by it
    assert AugmentConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    assert list(a.to_dict()) == list(AUG_KEYS)


@pytest.mark.parametrize(
    "values, pattern",
    [
        ({"aug": "tokendorp"}, r"aug: unknown augmentation 'tokendorp'; did you mean tokendrop\? Choose from"),
        ({"aug": "mixup+mixup"}, r"aug: 'mixup\+mixup' names an augmentation twice"),
        ({"aug": "none+frofa"}, r"aug: 'none' cannot be combined"),
        ({"aug": 3}, r"aug must be text"),
        ({"tokendrop_rate": 1.0}, r"tokendrop_rate must be in \[0, 1\)"),
        ({"tokendrop_rate": "abc"}, r"tokendrop_rate must be a number, got 'abc'"),
        ({"mixup_alpha": 0}, r"mixup_alpha must be a positive number, got 0"),
        ({"cutmix_alpha": -1}, r"cutmix_alpha must be a positive number, got -1"),
        ({"frofa_brightness": 1.5}, r"frofa_brightness must be in \[0, 1\]"),
        ({"frofa_contrast": 1.0}, r"frofa_contrast must be in \[0, 1\)"),
        ({"frofa_contrast": float("nan")}, r"frofa_contrast must be a finite number"),
        ({"frofa_brightness": True}, r"frofa_brightness must be a number"),
    ],
)
def test_config_errors_name_the_key(values: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        AugmentConfig(**values)


def test_from_dict_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown augmentation key\(s\) 'lr'; valid keys: aug, tokendrop_rate"):
        AugmentConfig.from_dict({"aug": "mixup", "lr": 0.1})


# ---------------------------------------------------------------------------------------------
# Contract: determinism, no side effects


def test_none_returns_the_batch_untouched() -> None:
    infos = _vit_infos()
    taps, y = _batch(infos), torch.arange(6)
    out = augment(taps, y, infos, AugmentConfig(), batch_generator(0, 0, 0))
    assert out.taps is taps and out.labels is y and not out.mixed and out.lam == 1.0


@pytest.mark.parametrize("aug", ALL)
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_same_generator_state_gives_bitwise_equal_batches(aug: str, kind: str) -> None:
    infos = _vit_infos() if kind == "vit" else _cnn_infos()
    taps, y = _batch(infos), torch.arange(6) % 3
    before = {k: v.clone() for k, v in taps.items()}
    rng = torch.get_rng_state()
    cfg = AugmentConfig(aug=aug, tokendrop_rate=0.25, frofa_contrast=0.2)
    stats = feature_stats([taps])
    a = augment(taps, y, infos, cfg, batch_generator(7, 2, 5), stats)
    b = augment(taps, y, infos, cfg, batch_generator(7, 2, 5), stats)
    c = augment(taps, y, infos, cfg, batch_generator(7, 2, 6), stats)
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is neither used nor moved
    assert all(torch.equal(taps[k], before[k]) for k in taps)  # inputs untouched
    assert a.lam == b.lam and (a.labels_b is None) == (b.labels_b is None)
    assert a.labels_b is None or torch.equal(a.labels_b, b.labels_b)
    for k in taps:
        assert a.taps[k].shape == taps[k].shape and a.taps[k].dtype == taps[k].dtype
        assert torch.equal(a.taps[k], b.taps[k])
    assert any(not torch.equal(a.taps[k], c.taps[k]) for k in taps)  # another step: another augmentation
    assert any(not torch.equal(a.taps[k], taps[k]) for k in taps)


def test_batch_generator_is_a_function_of_seed_epoch_and_step() -> None:
    draw = lambda *key: torch.rand(4, generator=batch_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 1, 2), draw(0, 1, 2))
    assert len({tuple(draw(*k).tolist()) for k in [(0, 1, 2), (0, 2, 1), (1, 1, 2), (0, 1, 3)]}) == 4


def test_bad_batches_are_clear_errors() -> None:
    infos = _vit_infos()
    taps, y = _batch(infos), torch.arange(6)
    cfg, g = AugmentConfig(aug="mixup"), batch_generator(0, 0, 0)
    with pytest.raises(ConfigError, match=r"no TapInfo for tap\(s\) 'extra'"):
        augment({**taps, "extra": taps["embed"]}, y, infos, cfg, g)
    with pytest.raises(ConfigError, match=r"tap 'embed' has shape \(6, 16, 8\), expected \(6, 17, 8\)"):
        augment({**taps, "embed": taps["embed"][:, 1:]}, y, infos, cfg, g)


def test_half_precision_taps_stay_half() -> None:
    infos = _vit_infos()
    taps = {k: v.half() for k, v in _batch(infos).items()}
    out = augment(
        taps,
        torch.arange(6),
        infos,
        AugmentConfig(aug="frofa+tokendrop+mixup"),
        batch_generator(0, 0, 0),
        feature_stats([taps]),
    )
    assert all(v.dtype == torch.float16 and torch.isfinite(v).all() for v in out.taps.values())


# ---------------------------------------------------------------------------------------------
# Token drop


def test_tokendrop_replaces_the_same_patch_positions_in_every_tap_by_the_kept_mean() -> None:
    infos = _vit_infos(grid=4)  # 16 patches + CLS
    taps = _batch(infos, n=8)
    out = token_drop(taps, list(infos.values()), 0.25, batch_generator(0, 0, 0))
    masks = []
    for name, x in taps.items():
        y = out[name]
        torch.testing.assert_close(y[:, 0], x[:, 0], rtol=0, atol=0)  # CLS kept
        changed = (y[:, 1:] != x[:, 1:]).any(-1)  # (B, 16)
        assert changed.sum(1).tolist() == [4] * 8  # round(0.25 * 16) per sample
        kept_mean = torch.stack([x[i, 1:][~changed[i]].mean(0) for i in range(8)])  # (B, C)
        torch.testing.assert_close(y[:, 1:][changed], kept_mean[:, None].expand(-1, 16, -1)[changed])
        # mean pooling of the patches equals pooling over the kept tokens only (what removing them gives)
        torch.testing.assert_close(y[:, 1:].mean(1), kept_mean)
        masks.append(changed)
    assert all(torch.equal(m, masks[0]) for m in masks)  # one set of positions for all taps
    assert not torch.equal(masks[0][0], masks[0][1])  # per sample


def test_tokendrop_maps_positions_to_coarser_grids_and_spares_single_tokens() -> None:
    infos = _cnn_infos()  # 4x4, 2x2, 1x1 grids, no prefix tokens
    taps = _batch(infos, n=16)
    out = token_drop(taps, list(infos.values()), 0.5, batch_generator(1, 0, 0))
    fine = (out["stage1"] != taps["stage1"]).any(-1).view(16, 4, 4)
    coarse = (out["stage2"] != taps["stage2"]).any(-1).view(16, 2, 2)
    assert fine.flatten(1).sum(1).tolist() == [8] * 16
    # a 2x2 cell (i, j) covers fine cells 2i..2i+1; its centre lies on fine cell (2i + 1, 2j + 1)
    expected = fine[:, 1::2, 1::2] & ~fine[:, 1::2, 1::2].flatten(1).all(1)[:, None, None]
    assert torch.equal(coarse, expected)
    assert torch.equal(out["head"], taps["head"])  # a 1x1 grid is never emptied


# ---------------------------------------------------------------------------------------------
# Mixing


def test_mixup_mixes_every_token_with_one_lam_and_permutation() -> None:
    infos = _vit_infos()
    taps, y = _batch(infos, n=8), torch.arange(8)  # labels = sample index: labels_b is the permutation
    out = augment(taps, y, infos, AugmentConfig(aug="mixup"), batch_generator(3, 0, 0))
    perm, lam = out.labels_b, out.lam
    assert 0 < lam < 1 and sorted(perm.tolist()) == list(range(8)) and perm.tolist() != list(range(8))
    for k, x in taps.items():
        torch.testing.assert_close(out.taps[k], lam * x + (1 - lam) * x[perm])
    lams = [
        augment(taps, y, infos, AugmentConfig(aug="mixup", mixup_alpha=0.8), batch_generator(0, 0, s)).lam
        for s in range(400)
    ]
    assert abs(sum(lams) / len(lams) - 0.5) < 0.05  # Beta(a, a) has mean 1/2 (sd of the mean ~0.018)


def test_overlap_fractions_by_hand() -> None:
    torch.testing.assert_close(_overlap(4, 4, 1, 3), torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(_overlap(2, 4, 1, 3), torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(_overlap(3, 4, 0, 2), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(_overlap(1, 4, 0, 4), torch.tensor([1.0], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
def test_cutmix_swaps_one_rectangle_and_every_tap_mixes_the_same_area(seed: int) -> None:
    infos = {**_cnn_infos(), "cls_tap": TapInfo("cls_tap", 9, 3, 5, 1, 6, (2, 2), "none")}
    taps = _batch(infos, n=5, seed=seed)
    perm = torch.tensor([1, 2, 3, 4, 0])
    out, lam = cutmix(taps, list(infos.values()), perm, 0.6, batch_generator(seed, 0, 0))
    # fine grid: tokens are either the sample's own or the permuted sample's, in one rectangle
    x, xb, y = taps["stage1"], taps["stage1"][perm], out["stage1"]
    swapped = (y == xb).all(-1)  # (B, 16)
    assert torch.equal(y[~swapped], x[~swapped]) and torch.equal(swapped, swapped[:1].expand(5, -1))
    grid = swapped[0].view(4, 4)
    rows, cols = grid.any(1).nonzero().flatten(), grid.any(0).nonzero().flatten()
    assert grid.sum() == len(rows) * len(cols) and grid[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert grid.float().mean().item() == pytest.approx(1 - lam)  # lam is the exact area kept
    # area 0.4 of a 4x4 grid: a round(4 sqrt(0.4)) = 3-cell square, 2 cells a side where the border clips it
    assert (len(rows), len(cols)) in {(3, 3), (2, 3), (3, 2), (2, 2)} and 1 - lam == len(rows) * len(cols) / 16
    for name, info in infos.items():
        x, xb, y = taps[name], taps[name][perm], out[name]
        p = info.prefix_tokens
        weight = ((y - x) / (xb - x))[:, p:]  # (B, P, C): each token's share of the permuted sample
        torch.testing.assert_close(weight, weight[:, :, :1].expand_as(weight), atol=1e-4, rtol=1e-4)
        assert weight.mean().item() == pytest.approx(1 - lam, abs=1e-4)  # the same area in every tap
        if p:
            torch.testing.assert_close(y[:, :p], lam * x[:, :p] + (1 - lam) * xb[:, :p])


def test_mixup_plus_cutmix_picks_one_per_batch() -> None:
    infos = _vit_infos()
    taps, y = _batch(infos), torch.arange(6)
    kinds = set()
    for s in range(20):
        out = augment(taps, y, infos, AugmentConfig(aug="mixup+cutmix"), batch_generator(0, 0, s))
        x, xb, z = taps["block1"][:, 1:], taps["block1"][out.labels_b][:, 1:], out.taps["block1"][:, 1:]
        exact = ((z == x).all(-1) | (z == xb).all(-1)).all()  # cutmix: every patch is one sample's
        kinds.add("cutmix" if exact else "mixup")
    assert kinds == {"mixup", "cutmix"}


def test_mixed_targets_and_the_loss_the_trainer_uses() -> None:
    infos = _vit_infos()
    taps, y = _batch(infos), torch.tensor([0, 1, 2, 0, 1, 2])
    out = augment(taps, y, infos, AugmentConfig(aug="mixup"), batch_generator(5, 0, 0))
    t = out.targets(3)
    assert torch.allclose(t.sum(1), torch.ones(6))
    torch.testing.assert_close(
        t, out.lam * F.one_hot(y, 3).float() + (1 - out.lam) * F.one_hot(out.labels_b, 3).float()
    )
    logits = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    for eps in (0.0, 0.1):
        soft = -(out.targets(3, eps) * F.log_softmax(logits, -1)).sum(-1).mean()
        mixed = out.mix_loss(lambda labels, eps=eps: F.cross_entropy(logits, labels, label_smoothing=eps))
        torch.testing.assert_close(mixed, soft)
    plain = augment(taps, y, infos, AugmentConfig(aug="tokendrop"), batch_generator(5, 0, 0))
    assert not plain.mixed and torch.equal(plain.targets(3), F.one_hot(y, 3).float())
    torch.testing.assert_close(
        plain.mix_loss(lambda labels: F.cross_entropy(logits, labels)), F.cross_entropy(logits, y)
    )


# ---------------------------------------------------------------------------------------------
# FroFA


def test_frofa_brightness_shifts_each_channel_by_a_fraction_of_its_range() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 10, 6, generator=g) * torch.tensor([1.0, 2, 5, 0.1, 1, 3])  # channels of different ranges
    span = torch.tensor([6.0, 12, 30, 0.6, 6, 18])  # (C,) the training features' max_c - min_c
    y = frofa(x, 0.3, 0.0, batch_generator(0, 0, 0), span)
    delta = (y - x) / span  # (B, T, C)
    torch.testing.assert_close(delta, delta[:, :1].expand_as(delta))  # one shift per sample and channel
    d = delta[:, 0]  # (B, C)
    assert d.abs().max() <= 0.3 and d.abs().max() > 0.15  # U(-0.3, 0.3): 48 draws reach beyond 0.15
    assert d.std(0).min() > 0 and d.std(1).min() > 0  # differs across samples and across channels


def test_frofa_contrast_scales_around_the_sample_channel_mean() -> None:
    x = torch.randn(8, 10, 6, generator=torch.Generator().manual_seed(1))
    y = frofa(x, 0.0, 0.4, batch_generator(0, 0, 0), torch.ones(6))
    torch.testing.assert_close(y.mean(1), x.mean(1))  # the mean of every sample's channel is kept
    mean = x.mean(1, keepdim=True)
    gamma = (y - mean) / (x - mean)
    torch.testing.assert_close(gamma, gamma[:, :1].expand_as(gamma), atol=1e-4, rtol=1e-4)
    assert ((gamma >= 0.6 - 1e-5) & (gamma <= 1.4 + 1e-5)).all() and gamma.std() > 0.05


def test_frofa_of_a_sample_depends_neither_on_its_batch_nor_on_the_batch_size() -> None:
    """The channel range is the training features' (recorded once), not the batch's: sample 0 is augmented alike
    alone, in a batch of four, and next to other samples of a wider range (before, the range was the batch's)."""
    infos = _vit_infos()
    taps, y = _batch(infos, n=8), torch.arange(8) % 3
    stats = feature_stats([taps])  # the training features
    cfg = AugmentConfig(aug="frofa", frofa_contrast=0.2)
    batches = [
        {k: v[:1] for k, v in taps.items()},
        {k: v[:4] for k, v in taps.items()},
        {k: torch.cat([v[:1], 5 * v[5:8]]) for k, v in taps.items()},
    ]
    outs = [augment(b, y[: len(b["embed"])], infos, cfg, batch_generator(0, 0, 0), stats).taps for b in batches]
    for k in taps:
        assert not torch.equal(outs[0][k][0], taps[k][0])
        assert torch.equal(outs[0][k][0], outs[1][k][0]) and torch.equal(outs[0][k][0], outs[2][k][0]), k


def test_feature_stats_are_the_channel_range_over_every_token_and_sample() -> None:
    infos = _vit_infos()
    parts = [_batch(infos, n=3, seed=s) for s in range(3)]
    stats = feature_stats(parts)
    for k in infos:
        every = torch.cat([p[k] for p in parts]).reshape(-1, 8)
        assert torch.equal(stats.low[k], every.amin(0)) and torch.equal(stats.high[k], every.amax(0))
        assert torch.equal(stats.span(k), every.amax(0) - every.amin(0))
    assert stats.samples == 9
    again = FeatureStats.from_tensors(stats.to_tensors(), 9)
    assert all(torch.equal(again.low[k], stats.low[k]) and torch.equal(again.high[k], stats.high[k]) for k in infos)
    with pytest.raises(ConfigError, match="frofa needs the per-channel minimum and maximum of the training features"):
        augment(parts[0], torch.arange(3), infos, AugmentConfig(aug="frofa"), batch_generator(0, 0, 0))
    with pytest.raises(ConfigError, match="the feature statistics hold no tap 'block1'"):
        augment(
            parts[0],
            torch.arange(3),
            infos,
            AugmentConfig(aug="frofa"),
            batch_generator(0, 0, 0),
            FeatureStats({"embed": stats.low["embed"]}, {"embed": stats.high["embed"]}),
        )


# -- in the trainer ----------------------------------------------------------------------------------------------


def test_training_with_feature_augmentation_grids_banks_and_resumes_bitwise(tmp_path: Path, monkeypatch) -> None:
    """``--grid aug=none,tokendrop+mixup``: one bank per augmentation, the augmented members learn differently,
    and a run interrupted after epoch 2 and resumed equals an uninterrupted one (augmentation seeded per step)."""
    from featcache.backbone import Backbone
    from featcache.errors import Interrupted
    from featcache.manifest import BackboneSpec
    from featcache.training import train

    from .conftest import TINY_VIT, make_separable_images, write_tap_store
    from .helpers.processes import interrupted_run

    vit = Backbone(BackboneSpec(**TINY_VIT))
    path = tmp_path / "s.zarr"
    for split, n, seed in (("train", 64, 0), ("test", 24, 1)):
        imgs, labels = make_separable_images(n, classes=3, seed=seed)
        write_tap_store(path, vit, imgs, labels, split)
    settings, grid = {"epochs": 4, "batch_size": 16}, {"aug": ["none", "tokendrop+mixup"]}
    full = train(str(path), "last", tmp_path / "full", settings, grid, progress=False)
    assert full["num_banks"] == 2
    losses = {m["name"]: m["metrics"]["train_loss"] for m in full["members"]}
    assert losses["aug=none"] != losses["aug=tokendrop+mixup"]
    with interrupted_run(monkeypatch, epochs=2), pytest.raises(Interrupted):
        train(str(path), "last", tmp_path / "part", settings, grid, progress=False)
    resumed = train(str(path), "last", tmp_path / "part", settings, grid, resume=True, progress=False)
    assert [m["metrics"] for m in resumed["members"]] == [m["metrics"] for m in full["members"]]


def test_frofa_statistics_are_computed_once_over_the_training_samples_and_recorded(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One pass over every view of the samples that train (the held-out ones excluded) before the first step; the
    numbers are written to RUNDIR and named in the summary and the checkpoints, and --resume loads them."""
    import numpy as np
    from safetensors.torch import load_file

    import featcache.feature_stats
    from featcache.errors import Interrupted
    from featcache.store.feature_store import FeatureStore
    from featcache.training import train

    from .helpers.processes import interrupted_run
    from .helpers.stores import run_extract

    store = tmp_path / "s.zarr"
    run_extract(images, store, views=2)
    settings = {"epochs": 3, "batch_size": 8, "aug": "frofa", "frofa_brightness": 0.3}
    calls: list[int] = []
    real = featcache.feature_stats.feature_stats
    monkeypatch.setattr(featcache.feature_stats, "feature_stats", lambda b: calls.append(1) or real(b))
    full = train(str(store), "linear", tmp_path / "full", settings, val_fraction=0.25, progress=False)
    assert calls == [1]
    held = json.loads((tmp_path / "full" / "heldout.json").read_text())["ids"]
    split = FeatureStore.open(store).split("train")
    keep = np.asarray([i for i, name in enumerate(split.ids()) if name not in held])
    saved = load_file(str(tmp_path / "full" / "feature_stats.safetensors"))
    for tap in full["feature_stats"]["taps"]:
        x = split.read_values(tap, 0, 24)[keep].float()  # (18, 2 views, T, C)
        assert torch.equal(saved[f"{tap}/min"], x.reshape(-1, x.shape[-1]).amin(0)), tap
        assert torch.equal(saved[f"{tap}/max"], x.reshape(-1, x.shape[-1]).amax(0)), tap
    assert full["feature_stats"]["samples"] == 18 and full["feature_stats"]["views"] == 2
    member = json.loads((tmp_path / "full" / "members" / full["best"]["name"] / "config.json").read_text())
    assert member["feature_stats"] == full["feature_stats"]
    with interrupted_run(monkeypatch, epochs=1), pytest.raises(Interrupted):
        train(str(store), "linear", tmp_path / "part", settings, val_fraction=0.25, progress=False)
    monkeypatch.setattr(featcache.feature_stats, "feature_stats", lambda b: pytest.fail("recomputed on resume"))
    resumed = train(str(store), "linear", tmp_path / "part", settings, val_fraction=0.25, resume=True, progress=False)
    assert [m["metrics"] for m in resumed["members"]] == [m["metrics"] for m in full["members"]]
