"""Every CLI argument and input file is checked at the boundary: one table of bad inputs.

Each row runs one command that must fail with exit code 1 (bad input or state) or 2 (usage), exactly
one ``Error:`` line on stderr that names the input and the fix, no traceback, nothing on stdout, and
no change to anything that existed before (the store, the run, the images and the row's own files
are hashed before and after). All rows run in-process through ``click.testing.CliRunner``; a
handful also run as real ``featcache`` processes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from safetensors.torch import save_file

from featcache.backbone import Backbone
from featcache.cli import app
from featcache.manifest import BackboneSpec
from featcache.training import train

from .conftest import TINY_CNN, write_image_folder
from .helpers.processes import EXTRACT_KW, assert_one_error_line, cli_env, featcache_cmd
from .helpers.stores import flip_byte, hash_tree, run_extract, shard_file


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What exists before every row: images, a store of them, a run trained on it, weights of another model."""
    root = tmp_path_factory.mktemp("world")
    images = write_image_folder(root / "images", n=12, classes=3)
    store, run = root / "s.zarr", root / "run"
    run_extract(images, store, **{**EXTRACT_KW, "dtype": "float16"})
    train(str(store), "linear", run, {"epochs": 1, "batch_size": 8}, progress=False)
    cnn = Backbone(BackboneSpec(**TINY_CNN))
    save_file({k: v.contiguous() for k, v in cnn.model.state_dict().items()}, str(root / "cnn.safetensors"))
    return {"root": root, "images": images, "store": store, "run": run, "cnn": root / "cnn.safetensors"}


# ---------------------------------------------------------------------------------------------
# Row set-ups: inputs made in the row's own directory T (placeholders {T}, {images}, {store}, {run}, {cnn})


def _store_copy(w: dict, t: Path) -> Path:
    return Path(shutil.copytree(w["store"], t / "s.zarr"))


def _run_copy(w: dict, t: Path) -> Path:
    return Path(shutil.copytree(w["run"], t / "run"))


def _member(run: Path) -> Path:
    return run / "members" / json.loads((run / "best.json").read_text())["name"]


def _set_format(store: Path, version: Any) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["featcache_format"] = version
    (store / "zarr.json").write_text(json.dumps(meta))


def _edit_config(run: Path, change: Callable[[dict], None]) -> None:
    path = _member(run) / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _images_with(w: dict, t: Path, name: str, data: bytes) -> None:
    d = Path(shutil.copytree(w["images"], t / "images"))
    (d / "class_1" / name).write_bytes(data)


def _truncated_image(w: dict, t: Path) -> None:
    d = Path(shutil.copytree(w["images"], t / "images"))
    victim = sorted((d / "class_2").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])


def _nan_features(w: dict, t: Path) -> None:
    arr = zarr.open_array(str(_store_copy(w, t) / "train" / "block6"), mode="r+")
    rows = np.asarray(arr[4:8])
    rows[1, 2, 3] = np.nan
    arr[4:8] = rows


def _labels_out_of_range(w: dict, t: Path) -> None:
    arr = zarr.open_array(str(_store_copy(w, t) / "train" / "labels"), mode="r+")
    labels = np.asarray(arr[8:12])
    labels[0] = 9
    arr[8:12] = labels


def _other_method(w: dict, t: Path) -> None:  # linear weights under a config that says "last"
    from featcache.methods import config_class

    run = _run_copy(w, t)
    _edit_config(run, lambda c: c.update(method="last", method_config=config_class("last")().to_dict()))


def _weights_pickle(w: dict, t: Path) -> None:
    torch.save({"w": print}, t / "w.pth")  # a global to unpickle: never loaded


@dataclass
class Row:
    id: str
    args: list[str]
    code: int
    says: tuple[str, ...]  # substrings of the Error line: the input named, and the fix
    setup: Callable[[dict, Path], Any] | None = None
    tags: set[str] = field(default_factory=set)


def ext(
    *extra: str,
    model: str = "test_vit",
    kwargs: str = "img_size=32",
    weights: str = "random",
    data: str = "{images}",
    out: str = "{T}/s.zarr",
) -> list[str]:
    """``featcache extract`` of the tiny ViT, with one thing changed."""
    return [
        "extract",
        "--model",
        model,
        "--model-kwargs",
        kwargs,
        "--weights",
        weights,
        "--data",
        data,
        "--out",
        out,
        "--quiet",
        *extra,
    ]


T = ["train", "--quiet"]
P = ["predict", "--device", "cpu", "--quiet"]

ROWS = [
    # --- extract: the model and its weights
    Row(
        "unknown-model",
        ext(model="no_such_net", kwargs="drop_rate=0"),
        1,
        ("unknown timm model 'no_such_net'", "timm.list_models()"),
    ),
    Row("misspelled-model", ext(model="test_vitt"), 1, ("'test_vitt'", "did you mean test_vit")),
    Row(
        "weights-of-another-architecture",
        ext(weights="{cnn}"),
        1,
        ("cnn.safetensors does not fit model 'test_vit'", "choose the --model these weights belong to"),
    ),
    Row("weights-missing", ext(weights="{T}/none.safetensors"), 1, ("none.safetensors not found", "pass --weights")),
    Row(
        "weights-garbage",
        ext(weights="{T}/w.safetensors"),
        1,
        ("cannot read weights file", "w.safetensors", "plain state dict"),
        lambda w, t: (t / "w.safetensors").write_bytes(b"\x00garbage" * 10),
    ),
    Row(
        "weights-pickled-objects",
        ext(weights="{T}/w.pth"),
        1,
        ("w.pth is not a plain state dict", "save the model's state_dict()"),
        _weights_pickle,
    ),
    Row(
        "weights-not-a-state-dict-file",
        ext(weights="{T}/w.txt"),
        1,
        ("w.txt must be .safetensors or .pth",),
        lambda w, t: (t / "w.txt").write_text("weights"),
    ),
    Row(
        "model-kwargs-malformed",
        ext(kwargs="img_size"),
        2,
        ("--model-kwargs expects KEY=VALUE, got 'img_size'", "img_size=224"),
    ),
    Row(
        "model-kwargs-unknown",
        ext(kwargs="no_such_arg=3"),
        1,
        ("does not accept keyword argument 'no_such_arg'", "remove it"),
    ),
    Row("image-size-too-small", ext("--image-size", "4"), 2, ("--image-size must be >= 8, got 4",)),
    # --- extract: options
    Row(
        "layers-out-of-range",
        ext("--layers", "0,99"),
        2,
        ("--layers 0,99 is out of range", "taps 0..6", "use --layers all"),
    ),
    Row(
        "layers-malformed",
        ext("--layers", "first,last"),
        2,
        ("--layers expects 'all', every:G or comma-separated tap indices", "'first,last'"),
    ),
    Row("layers-every-zero", ext("--layers", "every:0"), 2, ("--layers 'every:0'", "every:G with a whole G >= 1")),
    Row("pool-tokens-zero", ext("--pool-tokens", "0"), 2, ("--pool-tokens must be a positive integer, got 0",)),
    Row("batch-size-zero", ext("--batch-size", "0"), 2, ("--batch-size must be a positive integer, got 0",)),
    Row("batch-size-negative", ext("--batch-size", "-4"), 2, ("--batch-size must be a positive integer, got -4",)),
    Row("views-zero", ext("--views", "0"), 2, ("--views must be a positive integer, got 0",)),
    Row("limit-zero", ext("--limit", "0"), 2, ("--limit must be a positive integer, got 0",)),
    Row("split-name-reserved", ext("--split", "_locks"), 2, ("--split '_locks' is not allowed", "not a leading '_'")),
    Row("device-unknown", ext("--device", "tpu"), 2, ("--device must be auto, cpu or cuda",)),
    Row("dtype-unknown", ext("--dtype", "int4"), 2, ("'--dtype'", "'int4'", "--help")),
    Row("resume-and-overwrite", ext("--resume", "--overwrite", out="{store}"), 2, ("exclude each other",)),
    Row("repair-without-resume", ext("--repair", out="{store}"), 2, ("--repair needs --resume",)),
    # --- extract: the data
    Row(
        "data-missing",
        ext(data="{T}/nowhere"),
        1,
        ("data directory", "nowhere does not exist", "ImageFolder directory"),
    ),
    Row(
        "data-empty",
        ext(data="{T}/empty"),
        1,
        ("no images found in", "empty", "add images"),
        lambda w, t: (t / "empty").mkdir(),
    ),
    Row(
        "data-without-images",
        ext(data="{T}/docs"),
        1,
        ("no images found in", "docs"),
        lambda w, t: ((t / "docs" / "a").mkdir(parents=True), (t / "docs" / "a" / "x.txt").write_text("no image")),
    ),
    Row(
        "data-is-a-file",
        ext(data="{T}/f.png"),
        1,
        ("is a file, not a directory",),
        lambda w, t: (t / "f.png").write_bytes(b"x"),
    ),
    Row("data-unknown-spec", ext(data="sklearn:iris"), 1, ("unknown scikit-learn data set", "sklearn:digits")),
    Row(
        "data-truncated-image",
        ext(data="{T}/images"),
        1,
        ("cannot read image", "class_2", "remove or replace the file"),
        _truncated_image,
        {"slow-data"},
    ),
    Row(
        "data-non-image-file",
        ext(data="{T}/images"),
        1,
        ("cannot read image", "notes.png", "remove or replace the file"),
        lambda w, t: _images_with(w, t, "notes.png", b"these are notes, not a PNG"),
        {"slow-data"},
    ),
    # --- extract: the store
    Row(
        "out-is-a-file",
        ext(out="{T}/f"),
        1,
        ("store path", "/f is a file", "choose another --out"),
        lambda w, t: (t / "f").write_text("x"),
    ),
    Row(
        "out-is-another-directory",
        ext(out="{images}"),
        1,
        ("is a non-empty directory that is not a featcache store", "choose another --out"),
    ),
    Row(
        "out-store-of-another-backbone",
        ext("--split", "val", kwargs="img_size=48", out="{store}"),
        1,
        ("was made with model_kwargs = {'img_size': 32}", "write to a new --out store"),
    ),
    Row("out-split-exists", ext(out="{store}"), 1, ("split 'train' already exists", "--resume", "--overwrite")),
    Row(
        "resume-with-other-options",
        ext("--resume", "--limit", "6", out="{store}"),
        1,
        ("cannot resume split 'train'", "limit", "rerun with the same options"),
    ),
    Row(
        "store-of-a-newer-format",
        ext("--resume"),
        1,
        ("uses featcache format 7, newer", "upgrade featcache"),
        lambda w, t: _set_format(_store_copy(w, t), 7),
    ),
    # --- train
    Row(
        "train-store-missing",
        [*T, "{T}/none.zarr", "--out", "{T}/r"],
        1,
        ("none.zarr does not exist", "featcache extract --out"),
    ),
    Row(
        "train-store-is-a-file",
        [*T, "{T}/f", "--out", "{T}/r"],
        1,
        ("is a file, not a Zarr store", "pass the directory featcache extract wrote"),
        lambda w, t: (t / "f").write_text("x"),
    ),
    Row(
        "train-store-is-a-plain-directory",
        [*T, "{images}", "--out", "{T}/r"],
        1,
        ("is not a featcache store", "create one with featcache extract"),
    ),
    Row(
        "train-unknown-method",
        [*T, "{store}", "--out", "{T}/r", "--method", "lora"],
        1,
        ("unknown method 'lora'", "available: last, linear, lst"),
    ),
    Row(
        "train-unknown-config-key",
        [*T, "{store}", "--out", "{T}/r", "--method", "last", "--set", "rnak=4"],
        1,
        ("unknown setting 'rnak'", "did you mean rank"),
    ),
    Row(
        "train-bad-config-value",
        [*T, "{store}", "--out", "{T}/r", "--method", "last", "--set", "rank=many"],
        1,
        ("rank must be an integer, got 'many'",),
    ),
    Row(
        "train-grid-malformed",
        [*T, "{store}", "--out", "{T}/r", "--grid", "lr"],
        2,
        ("--grid expects KEY=VALUE, got 'lr'", "--grid lr=1e-3,3e-3"),
    ),
    Row(
        "train-grid-empty-value",
        [*T, "{store}", "--out", "{T}/r", "--grid", "lr=1e-3,,1e-2"],
        2,
        ("has an empty value", "lr=V1,V2"),
    ),
    Row(
        "train-grid-varies-epochs",
        [*T, "{store}", "--out", "{T}/r", "--grid", "epochs=1,2"],
        1,
        ("epochs cannot vary inside one sweep", "--set epochs=N"),
    ),
    Row(
        "train-epochs-zero",
        [*T, "{store}", "--out", "{T}/r", "--epochs", "0"],
        1,
        ("epochs must be a positive integer, got 0",),
    ),
    Row(
        "train-epochs-negative",
        [*T, "{store}", "--out", "{T}/r", "--epochs", "-3"],
        1,
        ("epochs must be a positive integer, got -3",),
    ),
    Row(
        "train-batch-size-zero",
        [*T, "{store}", "--out", "{T}/r", "--batch-size", "0"],
        1,
        ("batch_size must be a positive integer, got 0",),
    ),
    Row(
        "train-lr-nan", [*T, "{store}", "--out", "{T}/r", "--lr", "nan"], 1, ("lr must be a positive number, got nan",)
    ),
    Row(
        "train-sweep-file-malformed",
        [*T, "{store}", "--out", "{T}/r", "--sweep", "{T}/sweep.json"],
        1,
        ("sweep file", "sweep.json is not valid JSON"),
        lambda w, t: (t / "sweep.json").write_text("{grid: [}"),
    ),
    Row(
        "train-reader-gpu-on-cpu",
        [*T, "{store}", "--out", "{T}/r", "--reader", "gpu", "--device", "cpu"],
        2,
        ("--reader gpu needs --device cuda", "--reader ram or auto"),
    ),
    Row(
        "train-split-missing",
        [*T, "{store}", "--out", "{T}/r", "--split", "nope"],
        1,
        ("has no split 'nope'", "--split nope"),
    ),
    Row(
        "train-eval-split-missing",
        [*T, "{store}", "--out", "{T}/r", "--eval-split", "val"],
        1,
        ("--eval-split 'val' is not in", "featcache extract ... --split val"),
    ),
    Row(
        "train-nan-features",
        [*T, "{T}/s.zarr", "--out", "{T}/r", "--method", "linear"],
        1,
        ("tap 'block6' of split 'train'", "s.zarr holds NaN/Inf values (first at image 5", "re-extract them"),
        _nan_features,
    ),
    Row(
        "train-corrupted-chunk",
        [*T, "{T}/s.zarr", "--out", "{T}/r", "--method", "linear"],
        1,
        ("tap 'block6' of split 'train'", "(shard 1)", "featcache extract --resume --repair"),
        lambda w, t: flip_byte(shard_file(_store_copy(w, t), "block6", 1), 30),
    ),
    Row(
        "train-labels-out-of-range",
        [*T, "{T}/s.zarr", "--out", "{T}/r"],
        1,
        ("holds label 9 (image 8) but has 3 classes", "--repair"),
        _labels_out_of_range,
    ),
    Row(
        "train-store-of-a-newer-format",
        [*T, "{T}/s.zarr", "--out", "{T}/r"],
        1,
        ("uses featcache format 3, newer", "upgrade featcache"),
        lambda w, t: _set_format(_store_copy(w, t), 3),
    ),
    Row(
        "train-out-is-a-file",
        [*T, "{store}", "--out", "{T}/f"],
        1,
        ("--out", "/f is a file", "choose a directory"),
        lambda w, t: (t / "f").write_text("x"),
    ),
    Row(
        "train-run-exists",
        [*T, "{store}", "--out", "{run}", "--method", "linear"],
        1,
        ("run directory", "already exists", "pass --resume", "--overwrite", "new --out"),
    ),
    Row(
        "train-resume-another-sweep",
        [*T, "{store}", "--out", "{run}", "--method", "linear", "--epochs", "5", "--resume"],
        1,
        ("was started with a different sweep", "same options"),
    ),
    Row(
        "train-resume-nothing",
        [*T, "{store}", "--out", "{T}/r", "--resume"],
        1,
        ("holds no featcache run (no sweep.json)", "drop --resume"),
    ),
    # --- predict
    Row(
        "predict-checkpoint-missing",
        [*P, "{T}/nope", "--data", "{images}"],
        1,
        ("checkpoint", "nope does not exist", "pass a run directory made by featcache train"),
    ),
    Row(
        "predict-not-a-checkpoint",
        [*P, "{T}/model.pth", "--data", "{images}"],
        1,
        ("model.pth is not a featcache checkpoint", ".safetensors file written by featcache train"),
        lambda w, t: (t / "model.pth").write_bytes(b"x"),
    ),
    Row(
        "predict-checkpoint-of-another-method",
        [*P, "{T}/run", "--data", "{images}"],
        1,
        ("do not fit method 'last'", "config.json", "or retrain"),
        _other_method,
    ),
    Row(
        "predict-checkpoint-of-a-newer-format",
        [*P, "{T}/run", "--data", "{images}"],
        1,
        ("checkpoint format 5, newer", "upgrade featcache"),
        lambda w, t: _edit_config(_run_copy(w, t), lambda c: c.update(featcache_checkpoint=5)),
    ),
    Row(
        "predict-config-not-json",
        [*P, "{T}/run", "--data", "{images}"],
        1,
        ("config.json is not valid JSON", "the checkpoint is damaged"),
        lambda w, t: (_member(_run_copy(w, t)) / "config.json").write_text("{"),
    ),
    Row(
        "predict-batch-size-zero",
        [*P, "{run}", "--data", "{images}", "--batch-size", "0"],
        2,
        ("--batch-size must be a positive integer, got 0",),
    ),
    Row(
        "predict-other-classes",
        [*P, "{run}", "--data", "{T}/other"],
        1,
        ("differ from the checkpoint's", "same class folders as training"),
        lambda w, t: [shutil.copytree(w["images"] / f"class_{c}", t / "other" / f"kind_{c}") for c in range(3)],
    ),
    Row(
        "predict-weights-of-another-architecture",
        [*P, "{run}", "--data", "{images}", "--weights", "{cnn}"],
        1,
        ("does not fit model 'test_vit'",),
    ),
    # --- inspect
    Row(
        "inspect-store-is-a-file",
        ["inspect", "{T}/f"],
        1,
        ("is a file, not a Zarr store directory", "pass the directory featcache extract"),
        lambda w, t: (t / "f").write_text("x"),
    ),
    Row(
        "inspect-split-missing",
        ["inspect", "{store}", "--split", "test"],
        1,
        ("has no split 'test'", "featcache extract"),
    ),
    Row(
        "inspect-store-of-an-older-format",
        ["inspect", "{T}/s.zarr"],
        1,
        ("uses featcache format 0, which this featcache", "re-extract it"),
        lambda w, t: _set_format(_store_copy(w, t), 0),
    ),
]

assert len(ROWS) >= 25 and len({r.id for r in ROWS}) == len(ROWS)


def _prepare(row: Row, world: dict, tmp: Path) -> list[str]:
    tmp.mkdir(parents=True, exist_ok=True)
    if row.setup is not None:
        row.setup(world, tmp)
    subs = {
        "{T}": str(tmp),
        "{images}": str(world["images"]),
        "{store}": str(world["store"]),
        "{run}": str(world["run"]),
        "{cnn}": str(world["cnn"]),
    }
    out = []
    for a in row.args:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def _snapshot(world: dict, tmp: Path) -> tuple[dict[str, str], dict[str, str]]:
    return hash_tree(world["root"]), hash_tree(tmp)


def _check_unchanged(before: tuple[dict, dict], world: dict, tmp: Path) -> None:
    world_before, tmp_before = before
    assert hash_tree(world["root"]) == world_before, "something that existed before was changed"
    tmp_after = hash_tree(tmp)
    changed = [k for k, v in tmp_before.items() if tmp_after.get(k) != v]
    assert changed == [], changed


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, world: dict, tmp_path: Path) -> None:
    args = _prepare(row, world, tmp_path / "T")
    before = _snapshot(world, tmp_path / "T")
    r = CliRunner().invoke(app, args)
    assert r.exit_code == row.code, (r.exit_code, r.output)
    assert r.stdout == ""
    assert_one_error_line(r.stderr, *row.says)
    _check_unchanged(before, world, tmp_path / "T")


REAL = [
    "unknown-model",
    "data-truncated-image",
    "train-nan-features",
    "predict-checkpoint-of-another-method",
    "layers-out-of-range",
]


@pytest.mark.slow
def test_bad_inputs_in_real_processes(world: dict, tmp_path: Path) -> None:
    """A handful of rows as real `featcache` processes, run side by side: the console script's exit path too."""
    rows = [r for r in ROWS if r.id in REAL]
    assert len(rows) == len(REAL)
    runs = []
    for row in rows:
        t = tmp_path / row.id
        args = _prepare(row, world, t)
        before = _snapshot(world, t)
        proc = subprocess.Popen(
            [*featcache_cmd(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env()
        )
        runs.append((row, t, before, proc))
    for row, t, before, proc in runs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == row.code, (row.id, proc.returncode, err)
        assert out == ""
        assert_one_error_line(err, *row.says)
        assert all(line.startswith(("Error:", "reader:")) for line in err.strip().splitlines()), (row.id, err)
        _check_unchanged(before, world, t)


def test_debug_mode_shows_the_traceback(world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the contract: FEATCACHE_DEBUG=1 re-raises, so the traceback is there when asked for."""
    from featcache.errors import ConfigError

    monkeypatch.setenv("FEATCACHE_DEBUG", "1")
    r = CliRunner().invoke(app, ["train", str(world["store"]), "--out", str(tmp_path / "r"), "--method", "lora"])
    assert r.exit_code == 1 and isinstance(r.exception, ConfigError)
