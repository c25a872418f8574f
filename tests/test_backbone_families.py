"""Any timm backbone: every model family extracts, trains and predicts (the contract), plus the families'
special cases one by one: tokens with and without prefix tokens, class-attention tails, NHWC final
features, the feature_info hooks fallback, and float16 overflow found at extraction.

The wide list (about 100 architectures) is benchmarks/bench_backbones.py -> docs/backbones.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from benchmarks.bench_backbones import METHODS, Case, markdown, round_trip, run_case
from featcache.backbone import Backbone
from featcache.cli import app
from featcache.errors import ModelError, TapOverflowError
from featcache.extraction import ExtractOptions, extract
from featcache.manifest import BackboneSpec, TapInfo
from featcache.methods import create
from featcache.methods.base import MethodInput, common_grid, to_grid
from featcache.store.feature_store import FeatureStore
from featcache.taps import FEATURE_HOOKS, LayoutError, Taps
from featcache.training import train

from .conftest import write_image_folder
from .helpers.processes import assert_one_error_line

TAKES_IMG_SIZE = {
    "test_byobnet",
    "test_coatnet",
    "test_maxvit",
    "test_vit",
    "test_vit2",
    "test_vit3",
    "test_vit4",
    "test_vit_relpos",
}


def case_for(name: str) -> Case:
    """A timm test_* model at 64 px (through img_size where the model is built for a size)."""
    if name in TAKES_IMG_SIZE:
        return Case("timm test model", name, {"img_size": 64})
    return Case("timm test model", name, image_size=64)


def _images(b: Backbone, n: int = 2) -> torch.Tensor:
    return torch.randn(n, *b.data_config["input_size"], generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------
# The contract: every timm test_* model, extract -> train linear, LAST, LST -> predict


@pytest.mark.parametrize("name", timm.list_models("test_*"))
def test_every_timm_test_model_extracts_trains_and_predicts(name: str, tmp_path: Path) -> None:
    result = round_trip(case_for(name), tmp_path, n_images=8)
    assert result["width_problems"] == [] and result["shape_problems"] == []
    assert sorted(result["members"]) == sorted(METHODS)
    for method, m in result["members"].items():
        assert np.isfinite(m["train_loss"]), method
        assert m["tap_diff"] == 0, method  # the live taps, rounded to float16, are the cached ones
        assert m["logit_diff"] <= 1e-4 * max(1.0, m["logit_scale"]), method
    b = Backbone(case_for(name).spec())
    x = _images(b)
    with torch.inference_mode():  # the taps hold the model's own result: its logits follow from the last tap
        assert torch.allclose(b.logits_from_taps(b.taps(x)), b.model(x), atol=1e-5, rtol=1e-4)


def test_benchmark_rows_pass_refuse_or_fail() -> None:
    """bench_backbones' table: a featcache error is a named refusal, anything else a failure."""
    rows = [
        run_case(Case("ViT", "test_vit", {"img_size": 32})),
        run_case(Case("typo", "test_vitt")),
        run_case(Case("broken", "test_vit", {"img_size": 32, "depth": "two"})),
    ]
    assert rows[0]["result"] == "pass" and rows[0]["kind"] == "vit" and rows[0]["bytes_per_image"] == 7 * 5 * 64 * 2
    assert rows[1]["result"].startswith("refused: unknown timm model 'test_vitt'")
    assert rows[2]["result"].startswith("refused: timm cannot build model 'test_vit'")
    rows[2]["result"] = "FAIL: unexpected TypeError"
    table = markdown(rows, 60.0, 2)
    assert "**1 pass, 1 refused by design, 1 fail.**" in table
    assert "| ViT | `test_vit` | 32 | vit | 7 | 1+2x2 | 64 | 4 kB | pass |" in table


# ---------------------------------------------------------------------------------------------
# Token models


def test_vit_without_prefix_tokens_siglip() -> None:
    b = Backbone(
        BackboneSpec(
            model="vit_base_patch16_siglip_224",
            weights="random",
            model_kwargs=dict(embed_dim=32, depth=2, num_heads=2, img_size=32),
        )
    )
    assert b.kind == "vit" and [i.name for i in b.taps.all_infos] == ["embed", "block1", "block2"]
    assert all(i.prefix_tokens == 0 and i.tokens == 4 and i.channels == 32 for i in b.taps.all_infos)
    x = _images(b)
    with torch.inference_mode():
        taps = b.taps(x)
        assert torch.equal(taps["block1"], b.model.blocks[0](taps["embed"]))
        assert torch.allclose(b.logits_from_taps(taps), b.model(x), atol=1e-6)  # through the attention-pool head


def test_relative_position_vit_without_class_token() -> None:
    b = Backbone(BackboneSpec(model="test_vit_relpos", weights="random", model_kwargs={"img_size": 32}))
    assert b.kind == "vit" and b.taps.all_infos[0].name == "embed"
    assert {(i.tokens, i.prefix_tokens, i.grid) for i in b.taps.all_infos} == {(4, 0, (2, 2))}


def test_class_attention_tail_is_a_head_tap_with_the_class_token() -> None:
    """CaiT: blocks hold patch tokens only; the class token appears in the class-attention tail."""
    b = Backbone(
        BackboneSpec(
            model="cait_xxs24_224",
            weights="random",
            model_kwargs=dict(depth=2, depth_token_only=1, img_size=32, embed_dim=32, num_heads=2),
        )
    )
    infos = {i.name: i for i in b.taps.all_infos}
    assert list(infos) == ["embed", "block1", "block2", "head"]
    assert (infos["block2"].tokens, infos["block2"].prefix_tokens) == (4, 0)
    assert (infos["head"].tokens, infos["head"].prefix_tokens, infos["head"].channels) == (5, 1, 32)
    assert b.final_norm_state() is None  # the head tap is already normalised
    x = _images(b)
    with torch.inference_mode():
        taps = b.taps(x)
        assert torch.equal(taps["head"], b.model.forward_features(x))
        assert torch.allclose(b.logits_from_taps(taps), b.model(x), atol=1e-6)
    mi = MethodInput(b.taps.all_infos, 3, backbone_kind=b.kind)
    taps = {k: v.clone() for k, v in taps.items()}
    for method in ("last", "lst"):
        net = create(method, {"pool": "cls"}, mi)
        with torch.no_grad():
            assert net.prefix_tokens == 1 and net(taps).shape == (2, 3)


def test_prefix_tokens_are_padded_and_grids_pooled_to_the_common_layout() -> None:
    blocks = TapInfo("block2", 2, 2, 16, 0, 8, (4, 4), "none")
    head = TapInfo("head", 3, 3, 5, 1, 8, (2, 2), "none")
    assert common_grid([blocks, head], "taps") == (1, (2, 2))
    x = torch.randn(2, 16, 8)
    out = to_grid(x, blocks, (2, 2), 1)  # (2, 1 + 4, 8)
    fmap = x.transpose(1, 2).reshape(2, 8, 4, 4)
    want = torch.nn.functional.adaptive_avg_pool2d(fmap, 2).flatten(2).transpose(1, 2)
    assert out.shape == (2, 5, 8) and torch.equal(out[:, 0], torch.zeros(2, 8)) and torch.allclose(out[:, 1:], want)
    h = torch.randn(2, 5, 8)
    assert torch.equal(to_grid(h, head, (2, 2), 1), h)


# ---------------------------------------------------------------------------------------------
# Maps: hierarchical transformers, NHWC features, class tokens beside maps


def _tiny_swin() -> Backbone:
    return Backbone(
        BackboneSpec(
            model="swin_tiny_patch4_window7_224",
            weights="random",
            model_kwargs=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), img_size=64, window_size=2),
        )
    )


def test_swin_nhwc_final_features_keep_their_width() -> None:
    b = _tiny_swin()
    assert b.model.output_fmt == "NHWC"
    assert [(i.name, i.channels) for i in b.taps.all_infos] == [
        ("stem", 16),
        ("stage1", 32),
        ("stage2", 64),
        ("stage3", 128),
        ("head", 128),
    ]
    x = _images(b)
    with torch.inference_mode():
        taps = b.taps(x)
        final = b.model.forward_features(x)  # (N, 2, 2, 128) NHWC
        assert torch.equal(taps["head"], final.flatten(1, 2))
        assert torch.allclose(b.logits_from_taps(taps), b.model(x), atol=1e-6)


def test_pit_class_tokens_are_kept_in_the_head_tap() -> None:
    b = Backbone(BackboneSpec(model="pit_ti_distilled_224", weights="random", model_kwargs={"img_size": 64}))
    head = b.taps.all_infos[-1]
    assert (head.name, head.prefix_tokens, head.channels) == ("head", 2, 256)  # class + distillation tokens
    assert all(i.prefix_tokens == 0 for i in b.taps.all_infos[:-1])
    x = _images(b)
    with torch.inference_mode():
        taps = b.taps(x)
        assert torch.equal(taps["head"][:, :2], b.model.forward_features(x))
        assert torch.allclose(b.logits_from_taps(taps), b.model(x), atol=1e-6)


def test_channels_are_checked_against_feature_info() -> None:
    b = Backbone(BackboneSpec(model="test_mambaout", weights="random", image_size=64))
    widths = [d["num_chs"] for d in b.model.feature_info]
    assert [i.channels for i in b.taps.all_infos] == widths  # NHWC final = last stage: no head tap
    b.model.feature_info[1]["num_chs"] += 1  # a map that does not have the declared width is never stored
    with pytest.raises(LayoutError, match=r"no dimension of 33 channels.*hooks failed too.*no dimension of 33"):
        Taps(b.model, probe_size=(3, 64, 64))


# ---------------------------------------------------------------------------------------------
# The feature_info hooks fallback and the one-line refusal


@pytest.mark.parametrize(
    "build",
    [lambda: Backbone(BackboneSpec(model="test_resnet", weights="random", image_size=64)), _tiny_swin],
    ids=["resnet", "swin-nhwc"],
)
def test_hooks_fallback_reads_the_same_taps(build) -> None:
    b = build()
    model = b.model
    model.forward_intermediates = None  # a model without forward_intermediates: read feature_info's modules
    hooked = Taps(model, probe_size=tuple(b.data_config["input_size"]))
    assert hooked.source == FEATURE_HOOKS and "no forward_intermediates" in hooked.fallback_reason
    assert [i.to_dict() for i in hooked.all_infos] == [i.to_dict() for i in b.taps.all_infos]
    x = _images(b)
    del model.forward_intermediates
    with torch.inference_mode():
        want, got = b.taps(x), hooked(x)
    assert list(got) == list(want)  # equal up to float rounding: pooling an NHWC view sums in another order
    assert all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6) for k in want)


def test_a_model_featcache_cannot_read_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import featcache.backbone

    def opaque(spec: BackboneSpec) -> tuple[nn.Module, dict]:
        return nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), {"source": "random", "state_sha256": "0"}

    monkeypatch.setattr(featcache.backbone, "create_model", opaque)
    images = write_image_folder(tmp_path / "images", n=4)
    r = CliRunner().invoke(
        app,
        [
            "extract",
            "--model",
            "resnet18",
            "--weights",
            "random",
            "--data",
            str(images),
            "--out",
            str(tmp_path / "s.zarr"),
            "--quiet",
        ],
    )
    assert r.exit_code == 1, r.output
    assert_one_error_line(r.stderr, "model 'resnet18'", "no usable forward_intermediates()", "featcache supports")
    assert "Traceback" not in r.output and "unexpected" not in r.output


def test_model_constructor_errors_are_model_errors() -> None:
    with pytest.raises(ModelError, match=r"timm cannot build model 'vit_tiny_patch16_224'.*num_heads.*arguments"):
        Backbone(
            BackboneSpec(model="vit_tiny_patch16_224", weights="random", model_kwargs={"embed_dim": 10, "num_heads": 3})
        )


def test_input_size_the_model_does_not_take_says_what_to_do() -> None:
    with pytest.raises(ModelError, match=r"cannot run at input size \(3, 48, 48\).*img_size=N"):
        Backbone(BackboneSpec(model="vit_tiny_patch16_224", weights="random", image_size=48))


# ---------------------------------------------------------------------------------------------
# float16 overflow: found per batch at extraction, with the fix


def _loud_vit(tmp_path: Path, scale: float) -> Path:
    """test_vit weights whose patch embedding is ``scale`` times larger: activations beyond float16."""
    b = Backbone(BackboneSpec(model="test_vit", weights="random", model_kwargs={"img_size": 32}))
    state = {k: v.contiguous() for k, v in b.model.state_dict().items()}
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"] * scale
    path = tmp_path / "loud.safetensors"
    save_file(state, str(path))
    return path


def test_float16_overflow_is_refused_at_extraction_and_bfloat16_works(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", n=12)
    spec = BackboneSpec(model="test_vit", weights=str(_loud_vit(tmp_path, 1e5)), model_kwargs={"img_size": 32})
    opts = ExtractOptions(progress=False, batch_size=4, shard_images=4, chunk_images=4, loader_workers=0)
    with pytest.raises(
        TapOverflowError,
        match=r"tap 'embed' overflows float16 at image 0 and 3 more in its batch"
        r".*--dtype bfloat16.*--dtype float32",
    ):
        extract(spec, str(images), tmp_path / "f16.zarr", opts, dtype="float16")
    assert not FeatureStore.open(str(tmp_path / "f16.zarr")).split("train").completed_shards().any()
    extract(spec, str(images), tmp_path / "bf16.zarr", opts, dtype="bfloat16")
    summary = train(
        str(tmp_path / "bf16.zarr"), "linear", tmp_path / "run", {"epochs": 1, "batch_size": 4}, progress=False
    )
    assert np.isfinite(summary["members"][0]["metrics"]["train_loss"])


def test_float16_overflow_through_the_cli_is_one_error_line(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", n=4)
    r = CliRunner().invoke(
        app,
        [
            "extract",
            "--model",
            "test_vit",
            "--model-kwargs",
            "img_size=32",
            "--weights",
            str(_loud_vit(tmp_path, 1e5)),
            "--data",
            str(images),
            "--out",
            str(tmp_path / "s.zarr"),
            "--quiet",
        ],
    )
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "tap 'embed' overflows float16", "--dtype bfloat16")


def test_backbone_nan_is_named_as_such(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", n=4)
    spec = BackboneSpec(model="test_vit", weights=str(_loud_vit(tmp_path, float("nan"))), model_kwargs={"img_size": 32})
    with pytest.raises(TapOverflowError, match="the backbone itself gives NaN or Inf in tap 'embed'"):
        extract(spec, str(images), tmp_path / "s.zarr", progress=False, dtype="float32", loader_workers=0)
