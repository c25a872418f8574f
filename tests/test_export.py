"""featcache export: one graph from images to logits that computes what featcache predict computes (parity for each
method, cache dtype and backbone family), its metadata, its validation and refusals (nothing half-written), and
predict model.onnx / the docs/deploy.md snippet without timm."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from featcache.backbone import Backbone
from featcache.cli import app
from featcache.deployed import OnnxClassifier, predict_onnx, preprocess
from featcache.errors import CheckpointError, ExportError
from featcache.export import describe_transform, export_run, manifest_sha256
from featcache.infer import load_predictor
from featcache.infer import predict as featcache_predict
from featcache.manifest import BackboneSpec
from featcache.store.feature_store import FeatureStore
from featcache.training import train

from .conftest import TINY_VIT
from .helpers.stores import run_extract

ROOT = Path(__file__).resolve().parents[1]
# a token model, a CNN and a hierarchical transformer (docs/backbones.md), each as small as timm builds it
FAMILIES: dict[str, dict[str, Any]] = {
    "vit": dict(TINY_VIT),
    "cnn": dict(model="test_efficientnet", weights="random", image_size=32),
    "swin": dict(
        model="swin_tiny_patch4_window7_224",
        weights="random",
        model_kwargs=dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), img_size=64, window_size=2),
    ),
}
STORES = {"float16": ({}, {}), "int8": ({}, {"dtype": "int8"}), "pooled": ({"pool_tokens": 2}, {})}
# every method, cache dtype and family once by default (the first three), twice with the slow ones; the slow ones
# skip onnxscript's optimizer (a third of an export's time)
CASES = [
    ("vit", "linear", "float16"),
    ("cnn", "last", "pooled"),
    ("swin", "lst", "int8"),
    pytest.param("vit", "last", "int8", marks=pytest.mark.slow),
    pytest.param("cnn", "lst", "float16", marks=pytest.mark.slow),
    pytest.param("swin", "linear", "pooled", marks=pytest.mark.slow),
]


@pytest.fixture(scope="module")
def make_run(images: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str, str], Path]:
    """(family, method, store) -> a trained run (1 epoch on the 24 synthetic images); each store made once."""
    root = tmp_path_factory.mktemp("export")
    runs: dict[tuple[str, str, str], Path] = {}

    def get(family: str, method: str, store: str) -> Path:
        path = root / f"{family}-{store}.zarr"
        if not path.exists():
            spec_extra, extract_extra = STORES[store]
            run_extract(images, path, spec={**FAMILIES[family], **spec_extra}, **extract_extra)
        key = (family, method, store)
        if key not in runs:
            runs[key] = root / f"{family}-{store}-{method}"
            train(str(path), method, runs[key], {"epochs": 1, "batch_size": 8}, progress=False)
        return runs[key]

    return get


@pytest.fixture(scope="module")
def vit_onnx(make_run: Callable[[str, str, str], Path], images: Path) -> dict[str, Any]:
    """The tiny ViT's linear probe exported through the command line (--json), shared by several tests."""
    run = make_run("vit", "linear", "float16")
    out = run.parent / "vit-linear.onnx"
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(out), "--json", "-q"])
    assert r.exit_code == 0, r.output
    return {"run": run, "path": out, "report": json.loads(r.stdout)}


def _logits_both_ways(run: Path, model: Path, images: Path) -> tuple[np.ndarray, np.ndarray]:
    """(featcache's PyTorch logits on the torchvision transform, onnxruntime's on featcache.deployed.preprocess)."""
    predictor = load_predictor(run, device="cpu")
    classifier = OnnxClassifier(model)
    pics = [Image.open(p).convert("RGB") for p in sorted(images.rglob("*.png"))]
    want = predictor(torch.stack([predictor.transform(im) for im in pics])).numpy()
    got = classifier(np.stack([classifier.preprocess(im) for im in pics]))
    return want, got


@pytest.mark.parametrize("family, method, store", CASES)
def test_exported_onnx_computes_what_featcache_predict_computes(
    family: str,
    method: str,
    store: str,
    make_run: Callable[[str, str, str], Path],
    images: Path,
    request: pytest.FixtureRequest,
) -> None:
    run = make_run(family, method, store)
    if (family, method, store) == ("vit", "linear", "float16"):
        out = request.getfixturevalue("vit_onnx")["path"]  # exported through the command line
    else:
        out = run.parent / f"{run.name}.onnx"
        report = export_run(run, out, progress=False, optimize=(family, method, store) in CASES[:3])
        assert report.validation["max_abs_diff"] <= 1e-3 and report.validation["top1_agreement"] == 1.0
    want, got = _logits_both_ways(run, out, images)
    assert got.shape == want.shape == (24, 3)
    assert np.abs(got - want).max() <= 1e-3
    assert np.array_equal(got.argmax(-1), want.argmax(-1))
    live = featcache_predict(run, str(images), device="cpu", num_workers=0, progress=False)
    deployed = predict_onnx(out, str(images), progress=False)
    assert [r["pred"] for r in deployed["predictions"]] == [r["pred"] for r in live["predictions"]]
    assert max(abs(a["prob"] - b["prob"]) for a, b in zip(deployed["predictions"], live["predictions"])) <= 1e-3
    assert deployed["accuracy"] == live["accuracy"]
    meta = OnnxClassifier(out).record
    cache = FeatureStore.open(str(run.parent / f"{family}-{store}.zarr"))
    assert meta["cache_dtype"] == cache.manifest.dtype and meta["method"] == method
    assert meta["store"]["manifest_sha256"] == manifest_sha256(cache.manifest.to_attrs())


def test_the_export_has_a_dynamic_batch_and_the_metadata_a_caller_needs(vit_onnx: dict[str, Any]) -> None:
    run, path = vit_onnx["run"], vit_onnx["path"]
    classifier = OnnxClassifier(path)
    assert [d for d in classifier.session.get_inputs()[0].shape] == ["N", 3, 32, 32]
    for n in (1, 5):
        assert classifier(np.zeros((n, 3, 32, 32), np.float32)).shape == (n, 3)
    meta = classifier.record
    best = json.loads((run / "best.json").read_text())
    assert meta["selection"] == best and meta["member"] == best["name"] == "linear"
    assert meta["classes"] == ["class_0", "class_1", "class_2"]
    assert meta["input_size"] == [3, 32, 32] and meta["mean"] == meta["std"] == [0.5] * 3
    assert meta["interpolation"] == "bicubic" and meta["crop_pct"] == 0.95 and meta["crop_mode"] == "center"
    assert meta["preprocess"] == {
        "resize": 33,  # floor(32 / 0.95)
        "interpolation": "bicubic",
        "crop": [32, 32],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    assert meta["featcache_version"] == "0.1.0" and meta["model"] == "test_vit"
    assert meta["store"]["manifest_sha256"] == manifest_sha256(
        json.loads((run / "members" / "linear" / "config.json").read_text())["store"]["manifest"]
    )
    assert meta["validation"] == vit_onnx["report"]["validation"] and meta["validation"]["images"] == 8


@pytest.mark.parametrize("size", [(60, 20), (20, 60), (33, 33), (7, 9)])
@pytest.mark.parametrize("squash", [False, True])
def test_numpy_preprocess_equals_the_torchvision_eval_transform(size: tuple[int, int], squash: bool) -> None:
    backbone = Backbone(BackboneSpec(**TINY_VIT, resize_only=squash))
    record = describe_transform(backbone.transform, "test_vit")
    assert record["resize"] == ([32, 32] if squash else 33)
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))
    assert np.array_equal(preprocess(img, record), backbone.transform(img).numpy())


@pytest.fixture(scope="module")
def vit_pt2(make_run: Callable[[str, str, str], Path]) -> dict[str, Any]:
    """The tiny ViT's linear probe as a torch.export program, and the program export_run traced (kept for reuse)."""
    import featcache.export as export

    run = make_run("vit", "linear", "float16")
    traced: list[Any] = []
    original = export.trace
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "trace", lambda *a: traced.append(original(*a)) or traced[-1])
        report = export_run(run, run.parent / "model.pt2", format="pt2", progress=False)
    return {"run": run, "path": report.path, "report": report, "program": traced[0]}


def test_pt2_export_reloads_with_its_metadata(vit_pt2: dict[str, Any], images: Path) -> None:
    extra = {"featcache.json": ""}
    program = torch.export.load(str(vit_pt2["path"]), extra_files=extra)
    meta = json.loads(extra["featcache.json"])
    assert meta["validation"] == vit_pt2["report"].validation and meta["classes"] == ["class_0", "class_1", "class_2"]
    predictor = load_predictor(vit_pt2["run"], device="cpu")
    x = torch.stack([predictor.transform(Image.open(p).convert("RGB")) for p in sorted(images.rglob("*.png"))[:3]])
    with torch.no_grad():
        assert torch.allclose(program.module()(x), predictor(x), atol=1e-5)
        assert program.module()(x[:1]).shape == (1, 3)  # the batch dimension stayed dynamic


def test_predict_onnx_loads_no_timm_and_prints_what_predict_prints(vit_onnx: dict[str, Any], images: Path) -> None:
    code = (
        "import json, sys\n"
        "from featcache.cli import app\n"
        "try:\n"
        f"    app.main(['predict', {str(vit_onnx['path'])!r}, '--data', {str(images)!r}, '--json', '-q'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print(json.dumps(sorted(m for m in ('timm', 'torch', 'zarr') if m in sys.modules)), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []  # neither timm nor torch nor zarr
    deployed = json.loads(done.stdout)
    live = featcache_predict(vit_onnx["run"], str(images), device="cpu", num_workers=0, progress=False)
    assert deployed.keys() == live.keys() and deployed["num_images"] == 24
    assert [{k: r[k] for k in ("id", "label", "pred", "pred_class")} for r in deployed["predictions"]] == [
        {k: r[k] for k in ("id", "label", "pred", "pred_class")} for r in live["predictions"]
    ]


def test_the_deploy_doc_snippet_gives_predicts_logits(vit_onnx: dict[str, Any], tmp_path: Path) -> None:
    text = (ROOT / "docs" / "deploy.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text.split("## Without featcache", 1)[1], flags=re.S)[0]
    assert "featcache" not in block.replace('["featcache"]', "") and "import torch" not in block
    rng = np.random.default_rng(3)
    photo = tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 255, size=(30, 50, 3), dtype=np.uint8)).save(photo)  # wide: resize and crop
    ns: dict[str, Any] = {}
    code = block.replace('"model.onnx"', repr(str(vit_onnx["path"]))).replace('"photo.jpg"', repr(str(photo)))
    exec(compile(code, "docs/deploy.md", "exec"), ns)
    classifier = OnnxClassifier(vit_onnx["path"])
    want = classifier(classifier.preprocess(Image.open(photo))[None])
    assert np.array_equal(ns["logits"], want)


def test_an_operator_without_onnx_translation_is_one_error_line_and_nothing_written(
    make_run: Callable[[str, str, str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from featcache.methods.linear import LinearProbe

    run = make_run("vit", "linear", "float16")
    plain = LinearProbe.features
    monkeypatch.setattr(
        LinearProbe, "features", lambda self, taps: torch.special.zeta(plain(self, taps).abs() + 2, 2.0)
    )
    out = run.parent / "bad" / "model.onnx"
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(out)])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: test_vit + linear member 'linear' cannot be exported")
    assert "zeta" in lines[0] and "(LinearProbe)" in lines[0], lines[0]
    assert not out.parent.exists()  # neither the model, nor a temporary file, nor the folder made for it


def test_a_model_beyond_the_tolerance_is_refused_and_nothing_written(
    vit_pt2: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import featcache.export as export

    def traced_then_head_changed(predictor: Any, example: torch.Tensor, label: str) -> Any:
        head = predictor.network.head  # the program keeps the traced weights; the PyTorch path gets these
        predictor.network.head = torch.nn.Linear(head.in_features, head.out_features)
        predictor.network.head.load_state_dict({"weight": head.weight, "bias": head.bias + 0.01})
        return vit_pt2["program"]

    monkeypatch.setattr(export, "trace", traced_then_head_changed)
    out = vit_pt2["run"].parent / "off" / "model.pt2"
    with pytest.raises(ExportError, match=r"differ from featcache's by up to 0\.01.* \(tolerance 0\.001\)"):
        export_run(vit_pt2["run"], out, format="pt2", progress=False)
    assert not out.parent.exists()
    report = export_run(vit_pt2["run"], out, format="pt2", tolerance=0.02, progress=False)  # allowed: written
    assert 0.009 < report.validation["max_abs_diff"] < 0.011 and out.is_file()


def test_refusals_before_any_export(vit_onnx: dict[str, Any], tmp_path: Path) -> None:
    run, path = vit_onnx["run"], vit_onnx["path"]
    before = path.read_bytes()
    with pytest.raises(ExportError, match="already exists; pass --overwrite"):
        export_run(run, path, progress=False)
    assert path.read_bytes() == before
    with pytest.raises(CheckpointError, match="has no such member; its members: linear"):
        export_run(run, tmp_path / "m.onnx", member="lienar", progress=False)
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "m.onnx"), "--tolerance", "0"])
    assert r.exit_code == 2 and r.stderr.strip() == "Error: --tolerance must be a positive number, got 0.0"
    r = CliRunner().invoke(app, ["predict", str(path), "--data", str(tmp_path), "--tta"])
    assert r.exit_code == 2 and "predict the run directory, not its export" in r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_export_bench_report_renders_rows_into_the_doc_table(tmp_path: Path) -> None:
    from benchmarks.export_bench import MARKERS, report, write_doc_table

    row = {
        "backbone": "B",
        "store": "int8",
        "method": "last",
        "parity": {
            "images": 1000,
            "max_abs_logit_diff": 2.5e-5,
            "top1_agreement": 0.999,
            "accuracy_featcache": 0.81,
            "accuracy_onnxruntime": 0.812,
        },
        "speed": {"images_per_s": {"featcache": 10.0, "onnxruntime": 25.0}, "onnxruntime_over_featcache": 2.5},
        "onnx_bytes": 14_000_000,
        "backbone_weights_bytes": 18_500_000,
    }
    payload = {"device": "cpu", "date": "d", "command": "c", "train": 5, "test": 1000, "epochs": 3}
    path = tmp_path / "export-cpu.json"
    path.write_text(json.dumps({**payload, "batch": 32, "threads": 2, "rounds": 5, "rows": [row]}))
    table = report(path)
    assert "| B | int8 | last | 2.50e-05 | 99.90% (1000) | 81.0% / 81.2% | 10.0 | 25.0 | 2.50x | 14.0 | 18.5 |" in table
    doc = tmp_path / "deploy.md"
    doc.write_text(f"# d\n\n{MARKERS[0]}\nold\n{MARKERS[1]}\n\nafter\n")
    write_doc_table(table, doc)
    assert doc.read_text() == f"# d\n\n{MARKERS[0]}\n{table}{MARKERS[1]}\n\nafter\n"
