"""Every timm family through featcache: extract -> train linear, LAST and LST -> predict, cached == live.

    python -m benchmarks.bench_backbones                 # all CASES -> docs/backbones.md (+ JSON)
    python -m benchmarks.bench_backbones --only pit_ti_224,swin_tiny_patch4_window7_224 --out /tmp/b.md

Each case is a small variant of one architecture with random weights (``weights="random"``, no network)
at a small input where the model allows it, run the way a user would: ``extract`` of a dozen synthetic
images (float16; on a float16 overflow the refusal is recorded and the case reruns with bfloat16), one
sweep training ``linear``, ``last`` and ``lst`` for one epoch, and ``load_predictor`` for every member.
A row passes when
- every stored tap has the shape the manifest gives, and its width is the model's real width: the
  ``feature_info`` widths for the stages, ``num_features`` for the final features (``head``);
- every member trained to a finite loss;
- the live path (backbone + side network on the raw images) gives the stored taps (after rounding to the
  cache dtype) and the logits of the side network on the cached taps.
A featcache error (one ``Error:`` line for a user) is a refusal: the row names it. Anything else fails.
The contract test (tests/test_backbone_families.py) runs ``round_trip`` over every timm ``test_*`` model.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the featcache CLI does
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never the network

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from featcache.errors import FeatcacheError, TapOverflowError  # noqa: E402
from featcache.manifest import BackboneSpec, TapInfo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "backbones.md"
RESULTS = Path(__file__).resolve().parent / "results" / "backbones.json"
METHODS = ("linear", "last", "lst")
# small side networks: the point is that they train on these taps, not how well
SETTINGS = {
    "epochs": 1,
    "batch_size": 8,
    "last.rank": 8,
    "last.heads": 2,
    "last.gap": 4,
    "last.depth": 1,
    "lst.reduction": 16,
}


@dataclass(frozen=True)
class Case:
    family: str
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    image_size: int | None = None  # None: the model's own input size

    def spec(self) -> BackboneSpec:
        return BackboneSpec(
            model=self.model, model_kwargs=dict(self.model_kwargs), weights="random", image_size=self.image_size
        )

    @property
    def input_size(self) -> int | None:
        return self.model_kwargs.get("img_size", self.image_size)


def _vit(family: str, model: str, size: int = 64, **kw: Any) -> Case:
    return Case(family, model, {"img_size": size, **kw})


CASES: list[Case] = [
    # token models
    _vit("ViT (class token)", "vit_tiny_patch16_224"),
    _vit("ViT without prefix tokens (SigLIP)", "vit_base_patch16_siglip_224"),
    _vit("ViT + register tokens (DINOv2-reg)", "vit_small_patch14_reg4_dinov2", 56),
    _vit("DeiT distilled (distillation token)", "deit_tiny_distilled_patch16_224"),
    _vit("EVA-02 (RoPE)", "eva02_tiny_patch14_224", 56),
    _vit("BEiT (relative position)", "beit_base_patch16_224"),
    _vit("ViT relative position", "vit_relpos_small_patch16_224"),
    _vit("ViT relative position, no class token", "vit_srelpos_small_patch16_224"),
    _vit("CaiT (class attention)", "cait_xxs24_224"),
    Case("XCiT (class attention)", "xcit_nano_12_p16_224", image_size=64),
    _vit("ConViT", "convit_tiny"),
    _vit("TNT", "tnt_s_patch16_224"),
    _vit("MLP-Mixer", "mixer_s16_224"),
    _vit("ResMLP", "resmlp_12_224"),
    # token count or width changes between stages
    _vit("PiT", "pit_ti_224", 128),
    _vit("PiT distilled", "pit_ti_distilled_224", 128),
    _vit("LeViT", "levit_128s", 128),
    Case("CrossViT (two branches)", "crossvit_tiny_240"),
    _vit("MViTv2", "mvitv2_tiny", 128),
    _vit("VOLO", "volo_d1_224", 128),
    # hierarchical transformers and hybrids
    Case("Swin", "swin_tiny_patch4_window7_224"),
    _vit("Swin-V2", "swinv2_cr_tiny_ns_224", 128),
    Case("MaxViT", "maxvit_rmlp_pico_rw_256"),
    Case("CoAtNet", "coatnet_nano_rw_224"),
    _vit("Hiera", "hiera_tiny_224", 128),
    Case("FastViT", "fastvit_t8", image_size=128),
    Case("EfficientViT (MIT)", "efficientvit_b0", image_size=128),
    _vit("EfficientViT (MSRA)", "efficientvit_m0", 128),
    Case("MobileViT", "mobilevit_xxs", image_size=128),
    Case("TinyViT", "tiny_vit_5m_224"),
    Case("PVT-v2", "pvt_v2_b0", image_size=128),
    _vit("CoaT", "coat_lite_tiny", 128),
    _vit("Twins", "twins_svt_small", 128),
    Case("EfficientFormer", "efficientformer_l1"),
    Case("Sequencer", "sequencer2d_s", image_size=128),
    _vit("GCViT", "gcvit_xxtiny", 128),
    Case("DaViT", "davit_tiny", image_size=128),
    Case("FocalNet", "focalnet_tiny_srf", image_size=128),
    _vit("NesT", "nest_tiny", 128),
    _vit("Swin-V2 (window 8)", "swinv2_tiny_window8_256", 128, window_size=4),
    _vit("Hybrid ViT (ResNet stem)", "vit_small_r26_s32_224", 64),
    _vit("ViTamin (MbConv + ViT)", "vitamin_small_224", 64),
    _vit("SAM ViT (windowed, neck)", "samvit_base_patch16", 64),
    _vit("NaFlexViT", "naflexvit_base_patch16_gap", 64),
    _vit("DeiT-III (layer scale)", "deit3_small_patch16_224"),
    _vit("BoTNet (self-attention ResNet)", "botnet26t_256", 128),
    Case("SAM2 Hiera (HieraDet)", "hieradet_small", image_size=128),
    Case("CAFormer", "caformer_s18", image_size=64),
    Case("EfficientFormer-V2", "efficientformerv2_s0"),
    Case("EfficientViM", "efficientvim_m1", image_size=128),
    Case("LowFormer", "lowformer_b0", image_size=128),
    Case("Next-ViT", "nextvit_small", image_size=128),
    Case("SHViT", "shvit_s1", image_size=128),
    Case("SwiftFormer", "swiftformer_xs", image_size=64),
    _vit("Visformer", "visformer_tiny", 128),
    _vit("Twins-PCPVT", "twins_pcpvt_small", 128),
    Case("Qwen3 ViT encoder", "qwen3_vit_88m_enc", image_size=64),
    Case("Gemma 4 ViT encoder", "gemma4_vit_167m_enc", image_size=96),
    _vit("LeViT (convolution mode)", "levit_conv_128s", 128),
    Case("EfficientViT (MIT, large)", "efficientvit_l1", image_size=128),
    Case("iFormer", "iformer_t", image_size=128),
    Case("CSATv2", "csatv2", image_size=128),
    # CNNs
    Case("ResNet", "resnet18", image_size=64),
    Case("ResNeSt", "resnest14d", image_size=64),
    Case("Res2Net", "res2net50_14w_8s", image_size=64),
    Case("SKNet", "skresnet18", image_size=64),
    Case("SE-ResNet (legacy)", "legacy_seresnet18", image_size=64),
    Case("ResNetV2", "resnetv2_18", image_size=64),
    Case("TResNet", "tresnet_m", image_size=64),
    Case("MobileNetV4", "mobilenetv4_conv_small", image_size=64),
    Case("EfficientNetV2", "tf_efficientnetv2_b0", image_size=64),
    Case("HardCoReNAS", "hardcorenas_a", image_size=64),
    Case("RepGhostNet", "repghostnet_050", image_size=64),
    Case("FasterNet", "fasternet_t0", image_size=64),
    Case("HGNet", "hgnet_tiny", image_size=64),
    Case("InceptionNeXt", "inception_next_atto", image_size=64),
    Case("Inception-v4", "inception_v4", image_size=160),
    Case("Inception-ResNet-v2", "inception_resnet_v2", image_size=160),
    Case("ConvMixer", "convmixer_768_32", image_size=64),
    Case("DPN", "dpn48b", image_size=64),
    Case("CSPDarkNet (CS3)", "cs3darknet_s", image_size=64),
    Case("RDNet", "rdnet_tiny", image_size=64),
    Case("SelecSLS", "selecsls42b", image_size=64),
    Case("CPUBone", "cpubone_b0_bfrobust", image_size=64),
    Case("CSPNeXt", "cspnext_s", image_size=64),
    Case("LCNetV2", "lcnetv2_small", image_size=64),
    Case("MobileNetV5 encoder", "mobilenetv5_300m_enc", image_size=64),
    Case("Xception (legacy)", "legacy_xception", image_size=96),
    Case("NASNet-A", "nasnetalarge", image_size=96),
    Case("PNASNet", "pnasnet5large", image_size=96),
    Case("ConvNeXt", "convnext_atto", image_size=64),
    Case("RegNet", "regnetx_002", image_size=64),
    Case("EfficientNet", "efficientnet_b0", image_size=64),
    Case("MobileNetV3", "mobilenetv3_small_050", image_size=64),
    Case("GhostNet", "ghostnet_100", image_size=64),
    Case("RepViT", "repvit_m1", image_size=64),
    Case("DenseNet", "densenet121", image_size=64),
    Case("Inception-v3 (299 px)", "inception_v3"),
    Case("NFNet", "eca_nfnet_l0", image_size=96),
    Case("MambaOut", "mambaout_femto", image_size=64),
    Case("ConvNeXt-style MetaFormer (PoolFormer)", "poolformer_s12", image_size=64),
    Case("EdgeNeXt", "edgenext_xx_small", image_size=64),
    Case("DLA", "dla34", image_size=64),
    Case("VoVNet", "ese_vovnet19b_dw", image_size=64),
    Case("CSPNet", "cspresnet50", image_size=64),
    Case("HRNet", "hrnet_w18_small", image_size=64),
    Case("ReXNet", "rexnet_100", image_size=64),
    Case("Xception", "xception41", image_size=64),
    Case("StarNet", "starnet_s1", image_size=64),
    Case("VGG", "vgg11", image_size=64),
]


# ---------------------------------------------------------------------------------------------
# One model, the way a user runs it


def write_images(root: Path, n: int = 12, classes: int = 3, size: int = 48, seed: int = 0) -> Path:
    """An ImageFolder of ``n`` synthetic RGB images whose class is the colour of a bright square."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        y = i % classes
        img = rng.integers(0, 40, size=(size, size, 3), dtype=np.uint8)
        x0, y0 = rng.integers(0, size // 2, size=2)
        img[y0 : y0 + size // 2, x0 : x0 + size // 2, y % 3] = 230
        (root / f"class_{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"class_{y}" / f"img_{i:03d}.png")
    return root


def expected_widths(model: torch.nn.Module, infos: list[TapInfo]) -> list[str]:
    """Disagreements between the taps' widths and the widths the model declares (empty: all agree).

    Stage taps must carry the ``feature_info`` widths in order (EfficientNet-style models tap every
    stage, so feature_info's are a subsequence); a ``head`` tap carries ``num_features``.
    """
    declared = [int(d["num_chs"]) for d in getattr(model, "feature_info", [])]
    stages = [i.channels for i in infos if i.name not in ("head", "embed")]
    problems = []
    it = iter(stages)
    if declared and not all(any(c == w for c in it) for w in declared):
        problems.append(f"stage widths {stages} do not contain feature_info's {declared}")
    embed = [i for i in infos if i.name == "embed"]
    if embed and embed[0].channels != stages[0]:
        problems.append(f"embed width {embed[0].channels} != block width {stages[0]}")
    head = [i for i in infos if i.name == "head"]
    if head and head[0].channels not in (getattr(model, "num_features", None), stages[-1]):
        problems.append(f"head width {head[0].channels} != num_features {getattr(model, 'num_features', None)}")
    return problems


def round_trip(
    case: Case, work: Path, dtype: str = "float16", n_images: int = 12, device: str = "cpu"
) -> dict[str, Any]:
    """extract -> train linear, last, lst (one sweep) -> load_predictor per member; the measurements.

    Extraction and prediction both run on ``device`` (CPU by default: the same kernels on both paths,
    also on a machine with a GPU), so that the live taps must equal the cached ones bit for bit.

    Returns {"taps": [TapInfo dicts], "kind", "tap_source", "bytes_per_image", "width_problems",
    "shape_problems", "members": {method: {"train_loss", "tap_diff", "logit_diff", "logit_scale"}}}.
    Raises featcache errors (refusals) as they are.
    """
    from featcache.data import open_source
    from featcache.extraction import ExtractOptions, extract
    from featcache.infer import load_predictor
    from featcache.store.codecs import TORCH_DTYPES as CACHE_DTYPES
    from featcache.store.feature_store import FeatureStore
    from featcache.training import train

    data = write_images(work / "images", n_images)
    store = work / f"cache-{dtype}.zarr"
    report = extract(
        case.spec(),
        str(data),
        store,
        ExtractOptions(
            dtype=dtype, progress=False, batch_size=n_images, overwrite=True, loader_workers=0, device=device
        ),
    )
    fs = FeatureStore.open(str(store))
    split = fs.split("train")
    cached = {t.name: split.decode(split.read(t.name)).float() for t in fs.manifest.taps}  # (N, T, C)
    shape_problems = [
        f"{t.name}: stored {tuple(cached[t.name].shape)}, manifest (N, {t.tokens}, {t.channels})"
        for t in fs.manifest.taps
        if tuple(cached[t.name].shape) != (n_images, t.tokens, t.channels)
    ]
    summary = train(
        str(store),
        METHODS[0],
        work / "run",
        dict(SETTINGS),
        {"method": list(METHODS)},
        progress=False,
        overwrite=True,
        tensorboard=False,
    )
    source = open_source(str(data))
    members: dict[str, dict[str, float]] = {}
    model = None
    for member in summary["members"]:
        predictor = load_predictor(work / "run" / "members" / member["name"], device=device)
        model = predictor.backbone.model
        x = torch.stack([predictor.transform(source[i].image) for i in range(len(source))])
        x = x.to(predictor.backbone.device)  # (N, 3, H, W)
        with torch.inference_mode():
            live_taps = predictor.taps(x)
            live = predictor(x)
            on_cache = predictor.network({k: cached[k].to(x.device) for k in predictor.network.required_taps}).float()
        rounded = {k: v.to(CACHE_DTYPES[dtype]).float().cpu() for k, v in live_taps.items()}
        live, on_cache = live.cpu(), on_cache.cpu()
        tap_diff = max(
            float(((rounded[k] - cached[k]).abs() / cached[k].abs().amax().clamp_min(1e-30)).max()) for k in rounded
        )
        method = member["config"].get("method", member["name"].split("=")[-1])
        members[method] = {
            "train_loss": float(member["metrics"]["train_loss"]),
            "tap_diff": tap_diff,
            "logit_diff": float((live - on_cache).abs().max()),
            "logit_scale": float(on_cache.abs().max()),
        }
    manifest = fs.manifest
    return {
        "taps": [t.to_dict() for t in manifest.taps],
        "kind": manifest.backbone["kind"],
        "tap_source": manifest.backbone.get("tap_source"),
        "dtype": dtype,
        "bytes_per_image": report.nbytes / report.num_samples,
        "width_problems": expected_widths(model, manifest.taps),
        "shape_problems": shape_problems,
        "members": members,
    }


def verdict(result: dict[str, Any]) -> list[str]:
    """What is wrong with a round trip (empty: it passes)."""
    problems = list(result["width_problems"]) + list(result["shape_problems"])
    if sorted(result["members"]) != sorted(METHODS):
        problems.append(f"members trained: {sorted(result['members'])}")
    for method, m in result["members"].items():
        if not np.isfinite(m["train_loss"]):
            problems.append(f"{method}: train loss {m['train_loss']}")
        if m["tap_diff"] > 0:
            problems.append(f"{method}: live taps differ from the cache by {m['tap_diff']:.2e} (relative)")
        if not m["logit_diff"] <= 1e-4 * max(1.0, m["logit_scale"]):
            problems.append(f"{method}: live logits differ from cached ones by {m['logit_diff']:.2e}")
    return problems


def run_case(case: Case) -> dict[str, Any]:
    """One table row: pass, refused (a featcache error, named) or FAIL (anything else)."""
    row: dict[str, Any] = {"case": asdict(case), "notes": []}
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="featcache-bb-"))
    try:
        try:
            result = round_trip(case, work)
        except TapOverflowError as err:
            row["notes"].append(f"float16 refused: {str(err).split(';')[0]}")
            result = round_trip(case, work, dtype="bfloat16")
        row.update(result)
        problems = verdict(result)
        row["result"] = "pass" if not problems else "FAIL: " + "; ".join(problems)
    except FeatcacheError as err:
        row["result"] = f"refused: {err}"
    except Exception as err:  # noqa: BLE001 - a row, not a crash: the table shows it as a failure
        row["result"] = f"FAIL: unexpected {type(err).__name__}: {str(err)[:300]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# ---------------------------------------------------------------------------------------------
# The table


def _compact(values: list[int]) -> str:
    seen = sorted(set(values))
    return ", ".join(map(str, seen)) if len(seen) <= 4 else f"{seen[0]}..{seen[-1]} ({len(seen)} widths)"


def _tokens(taps: list[dict[str, Any]]) -> str:
    shapes = []
    for t in taps:
        grid = f"{t['grid'][0]}x{t['grid'][1]}"
        s = f"{t['prefix_tokens']}+{grid}" if t["prefix_tokens"] else grid
        if s not in shapes:
            shapes.append(s)
    return ", ".join(shapes)


def markdown(rows: list[dict[str, Any]], seconds: float, cpus: int | None = None) -> str:
    passed = sum(r["result"] == "pass" for r in rows)
    refused = sum(r["result"].startswith("refused") for r in rows)
    failed = len(rows) - passed - refused
    lines = [
        "# Backbones: every timm family through featcache",
        "",
        "Generated by `python -m benchmarks.bench_backbones` (do not edit by hand); "
        f"{len(rows)} architectures, timm {timm.__version__}, torch {torch.__version__}, "
        f"{seconds / 60:.0f} min on {cpus or 'the'} CPU cores (all rows in one process).",
        "",
        f"**{passed} pass, {refused} refused by design, {failed} fail.**",
        "",
        'Each row: a small variant with random weights (`weights="random"`), a small input where the model allows',
        "(column *input*; the model's own size otherwise), a dozen synthetic images extracted as float16, one sweep",
        "training `linear`, `last` and `lst` for one epoch, then `predict`'s backbone rebuilt from each checkpoint.",
        "*pass* means: every stored tap has the manifest's shape and the model's real width (`feature_info` for",
        "stages, `num_features` for `head`), every member trained to a finite loss, and the live path gave the",
        "cached taps exactly (after rounding to the cache dtype) and the same logits as the side network on the",
        "cache. *kind*: `vit` = token taps (whole token sequences: `embed`, `block1..`), `cnn` = map taps (each",
        "map average-pooled to at most 7x7 tokens: `stem`, `stage1..`), plus `head` (the final features) when",
        "they hold more than the last tap. *tokens*: the distinct token layouts, `P+HxW` = P prefix tokens (class,",
        "distillation, register) before an HxW grid. *bytes/image*: all taps, in the cache dtype.",
        "",
        "| family | model | input | kind | taps | tokens | widths | bytes/image | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        case = r["case"]
        size = case["model_kwargs"].get("img_size", case["image_size"]) or "own"
        if "taps" in r:
            taps = r["taps"]
            cells = [
                r["kind"],
                str(len(taps)),
                _tokens(taps),
                _compact([t["channels"] for t in taps]),
                f"{r['bytes_per_image'] / 1e3:,.0f} kB",
            ]
        else:
            cells = ["", "", "", "", ""]
        result = r["result"].replace("|", "/")
        if r["notes"]:
            result += " (" + "; ".join(r["notes"]) + f"; stored as {r.get('dtype')})"
        lines.append(f"| {case['family']} | `{case['model']}` | {size} | " + " | ".join(cells) + f" | {result} |")
    lines += [
        "",
        "How taps are found (featcache/taps.py): `forward_intermediates` gives every intermediate as a map; the",
        "width that `feature_info` declares for it tells NCHW from NHWC. An isotropic model (one width, one grid",
        'in every block) whose `forward_intermediates` also speaks `output_fmt="NLC"` with the same values is',
        "read as tokens, with its prefix tokens (`return_prefix_tokens`) and the input of `blocks[0]` as `embed`;",
        "every other model as maps. The final features become the `head` tap when they differ from the last",
        "tap: a norm or head convolution (Swin, EfficientNet), tokens added after the blocks (CaiT's and XCiT's",
        "class attention: a class token the blocks lack) or class tokens kept beside the maps (PiT). Side",
        "networks pad the missing prefix tokens with zeros and pool every tap to the smallest grid. A model whose",
        "`forward_intermediates` is missing or fails is read through hooks at its `feature_info` modules (what",
        "`features_only=True` does); when that fails too, `featcache extract` stops with one `Error:` line.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated model names (default: all CASES)")
    parser.add_argument("--out", default=str(DOC), help="markdown table (default docs/backbones.md)")
    parser.add_argument("--json", default=str(RESULTS), help="raw rows (default benchmarks/results/backbones.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--render", action="store_true", help="only re-render --out from the --json rows")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.json).read_text())
        Path(args.out).write_text(markdown(saved["rows"], saved["seconds"], saved.get("cpus")))
        return saved["rows"]
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("featcache").setLevel(logging.ERROR)
    cases = CASES if not args.only else [c for c in CASES if c.model in args.only.split(",")]
    t0, rows = time.perf_counter(), []
    for case in cases:
        row = run_case(case)
        print(f"{case.model:36s} {row['seconds']:6.1f}s  {row['result'][:150]}", flush=True)
        rows.append(row)
    seconds, cpus = time.perf_counter() - t0, len(os.sched_getaffinity(0))
    Path(args.out).write_text(markdown(rows, seconds, cpus))
    write_json(
        Path(args.json), {"timm": timm.__version__, "torch": torch.__version__, "seconds": seconds, "cpus": cpus}, rows
    )
    return rows


def write_json(path: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``meta`` plus ``rows``, one row per line (readable diffs, a third of indented JSON's size)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = json.dumps(meta)[:-1]
    body = ",\n".join(json.dumps(r, default=str) for r in rows)
    path.write_text(f'{head}, "rows": [\n{body}\n]}}\n')


if __name__ == "__main__":
    main()
