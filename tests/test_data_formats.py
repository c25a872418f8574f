"""The data formats users keep: wds: (WebDataset tar shards), hf: (Hugging Face datasets on disk), csv:, jsonl:.

Every form is built here from the same 24 images as an ImageFolder and must extract to the same arrays
(taps, labels, completion records) as the ImageFolder; ids and classes are each format's own. Labels and
ids come without decoding an image, a source holds no image bytes, a spec re-opens from the string alone
(as dask workers do), and bad input is one DataError naming the file, row or sample and the fix.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import sys
import tarfile
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from PIL import Image

from featcache.cli import app
from featcache.data import open_source, shared_spec, spec_with_columns, split_spec_options
from featcache.distributed.extraction import ShardJob, ids_sha256, worker_source
from featcache.errors import DataError, UsageError
from featcache.sources.image_folder import ImageFolderSource
from featcache.store.feature_store import FeatureStore
from featcache.training import train

from .conftest import TINY_VIT
from .helpers.processes import assert_one_error_line
from .helpers.stores import FAST, assert_same_arrays, read_split, run_extract

CLASSES = ["class_0", "class_1", "class_2"]  # the ImageFolder's class folders


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """load_dataset's Arrow cache in the session's temp directory, not the user's ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


# ---------------------------------------------------------------------------------------------
# The same images in each format


def write_shards(folder: Path, out: Path, per_shard: int = 10, label: str = "cls") -> str:
    """The ImageFolder's files, byte for byte, as WebDataset shards (keys = the ImageFolder ids without the
    extension, labels in .cls as integers or in .json as class names); returns the brace pattern."""
    src = ImageFolderSource(folder)
    out.mkdir(parents=True, exist_ok=True)
    ids, labels = src.ids(), src.labels()
    n_shards = -(-len(ids) // per_shard)
    for k in range(n_shards):
        with tarfile.open(out / f"part-{k:06d}.tar", "w") as tar:
            for i in range(k * per_shard, min((k + 1) * per_shard, len(ids))):
                key = ids[i].rsplit(".", 1)[0]
                tar.add(folder / ids[i], arcname=f"{key}.png")
                text = str(labels[i]) if label == "cls" else json.dumps({"label": src.classes[labels[i]]})
                _add_bytes(tar, f"{key}.{label}", text.encode())
    return f"{out}/part-{{000000..{n_shards - 1:06d}}}.tar"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_list(
    folder: Path, file: Path, image_key: str = "path", label_key: str = "label", label: str = "name"
) -> None:
    """A CSV or JSONL file (by suffix) listing the ImageFolder's images relative to ``file``'s folder."""
    src = ImageFolderSource(folder)
    rows = [
        {image_key: os.path.relpath(folder / i, file.parent), label_key: src.classes[y] if label == "name" else int(y)}
        for i, y in zip(src.ids(), src.labels())
    ]
    if file.suffix == ".csv":
        file.write_text(f"{image_key},{label_key}\n" + "".join(f"{r[image_key]},{r[label_key]}\n" for r in rows))
    else:
        file.write_text("".join(json.dumps(r) + "\n" for r in rows))


def hf_dataset(folder: Path, image: str = "image", label: str = "label") -> datasets.Dataset:
    """The ImageFolder's images (file bytes) and labels as a Dataset with an Image and a ClassLabel column."""
    src = ImageFolderSource(folder)
    features = datasets.Features({image: datasets.Image(), label: datasets.ClassLabel(names=src.classes)})
    return datasets.Dataset.from_dict(
        {
            image: [{"bytes": (folder / i).read_bytes(), "path": None} for i in src.ids()],
            label: [int(y) for y in src.labels()],
        },
        features=features,
    )


@pytest.fixture(scope="module")
def forms(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, list[str], list[str]]]:
    """form -> (spec, expected ids, expected classes), all holding the 24 images of ``images`` in its order."""
    root = tmp_path_factory.mktemp("formats")
    folder_ids = ImageFolderSource(images).ids()
    paths = [os.path.relpath(images / i, root) for i in folder_ids]
    datasets.disable_progress_bars()
    try:
        saved = datasets.DatasetDict({"train": hf_dataset(images), "test": hf_dataset(images).select(range(3))})
        saved.save_to_disk(str(root / "hf-saved"))
        (root / "hf-parquet").mkdir()
        hf_dataset(images, image="img", label="y").cast_column("y", datasets.Value("int64")).to_parquet(
            str(root / "hf-parquet" / "train-00000-of-00001.parquet")
        )
    finally:
        datasets.enable_progress_bars()
    write_list(images, root / "list.csv")
    write_list(images, root / "list.jsonl", image_key="file", label_key="y")
    rows = [f"train:{i}" for i in range(len(folder_ids))]
    return {
        "wds": (
            f"wds:{write_shards(images, root / 'shards', per_shard=10)}",
            [i.rsplit(".", 1)[0] for i in folder_ids],
            ["0", "1", "2"],
        ),
        "csv": (f"csv:{root / 'list.csv'}", paths, CLASSES),
        "jsonl": (f"jsonl:{root / 'list.jsonl'}?label=y", paths, CLASSES),
        "hf-saved": (f"hf:{root / 'hf-saved'}:train", rows, CLASSES),
        "hf-parquet": (f"hf:{root / 'hf-parquet'}?label=y", rows, ["0", "1", "2"]),
        "hf-imagefolder": (f"hf:{images}", rows, CLASSES),
    }


FORMS = ["wds", "csv", "jsonl", "hf-saved", "hf-parquet", "hf-imagefolder"]


@pytest.fixture(scope="module")
def reference(images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The store and arrays of the ImageFolder's extraction (float32: any difference in the images shows)."""
    out = tmp_path_factory.mktemp("reference") / "s.zarr"
    run_extract(images, out, dtype="float32")
    return out, read_split(out)


def without_ids(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in arrays.items() if k != "ids"}


# ---------------------------------------------------------------------------------------------
# Each form extracts to the ImageFolder's arrays


@pytest.mark.parametrize("form", FORMS)
def test_each_form_extracts_the_same_arrays_as_the_image_folder(
    form: str, forms: dict, reference: tuple, tmp_path: Path
) -> None:
    spec, ids, classes = forms[form]
    out = tmp_path / "s.zarr"
    run_extract(spec, out, dtype="float32")
    got = read_split(out)
    assert got["ids"].tolist() == ids
    assert_same_arrays(without_ids(got), without_ids(reference[1]))  # taps, labels, completion records
    assert FeatureStore.open(out).split("train").meta.classes == classes


@pytest.mark.parametrize("form", FORMS)
def test_labels_and_ids_come_without_decoding_an_image(
    form: str, forms: dict, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, ids, classes = forms[form]

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    src = open_source(spec)
    assert src.ids() == ids and src.classes == classes
    assert src.labels().dtype == np.int64 and src.labels().tolist() == ImageFolderSource(images).labels().tolist()
    with pytest.raises(DataError, match="an image was decoded"):  # the patch does stop decoding
        src[0]


@pytest.mark.parametrize("form", FORMS)
def test_a_source_holds_no_image_bytes(form: str, forms: dict, images: Path) -> None:
    """Streaming: a source (as pickled to DataLoader workers) is offsets, paths and labels, not the images."""
    src = open_source(forms[form][0])
    image_bytes = sum(p.stat().st_size for p in images.rglob("*.png"))
    assert len(pickle.dumps(src)) < image_bytes / 4
    item = src[7]
    assert item.image.mode == "RGB" and item.id == forms[form][1][7]
    assert np.array_equal(np.asarray(item.image), np.asarray(ImageFolderSource(images)[7].image))


# ---------------------------------------------------------------------------------------------
# wds: details


def test_wds_reads_jpg_and_webp_members_like_the_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "folder" / "a"
    folder.mkdir(parents=True)
    with tarfile.open(tmp_path / "one.tar", "w") as tar:
        for i, ext in enumerate(["jpg", "webp", "png", "jpeg"]):
            Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)).save(folder / f"{i}.{ext}")
            tar.add(folder / f"{i}.{ext}", arcname=f"s{i}.{ext.upper() if i == 3 else ext}")  # suffixes lower-cased
            _add_bytes(tar, f"s{i}.cls", b"0")
    src, ref = open_source(f"wds:{tmp_path}/one.tar"), ImageFolderSource(tmp_path / "folder")
    assert src.ids() == ["s0", "s1", "s2", "s3"] and len(ref) == 4
    by_name = {Path(i).stem: k for k, i in enumerate(ref.ids())}
    for k in range(4):
        assert np.array_equal(np.asarray(src[k].image), np.asarray(ref[by_name[str(k)]].image))


def test_wds_json_labels_give_class_names_and_meta_members_are_skipped(images: Path, tmp_path: Path) -> None:
    pattern = write_shards(images, tmp_path / "s", per_shard=24, label="json")
    with tarfile.open(tmp_path / "s" / "part-000000.tar", "a") as tar:
        _add_bytes(tar, "__index__", b"not a sample")  # WebDataset metadata: skipped, as webdataset does
    src = open_source(f"wds:{pattern}")
    assert len(src) == 24 and src.classes == CLASSES
    assert src.labels().tolist() == ImageFolderSource(images).labels().tolist()


def test_wds_unlabelled_shards_give_label_minus_one(images: Path, tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "u.tar", "w") as tar:
        for i, name in enumerate(ImageFolderSource(images).ids()[:3]):
            tar.add(images / name, arcname=f"{i}.png")
    src = open_source(f"wds:{tmp_path}/u.tar")
    assert src.labels().tolist() == [-1, -1, -1] and src.classes == []


def _one_sample_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            _add_bytes(tar, name, data)
    return path


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "case, says",
    [
        ("missing", ["1 of 2 shard(s)", "do not exist", "part-000001.tar", "brace range"]),
        ("no-image", ["sample x in", "has no image", ".txt", "add the image or remove"]),
        ("float-label", ["x.json: label 1.5 is a float", "integer labels or class names"]),
        ("gzip", ["is compressed", "plain .tar shards", "gunzip"]),
        ("not-tar", ["is not a tar file"]),
        ("truncated", ["is damaged (ReadError", "rewrite or remove it"]),
        ("empty", ["no samples in --data wds:"]),
    ],
)
def test_wds_errors_name_the_shard_and_the_fix(case: str, says: list[str], tmp_path: Path) -> None:
    shard = tmp_path / "part-000000.tar"
    pattern = str(shard)
    if case == "missing":
        _one_sample_tar(shard, {"x.png": _png()})
        pattern = f"{tmp_path}/part-{{000000..000001}}.tar"
    elif case == "no-image":
        _one_sample_tar(shard, {"x.txt": b"hello", "x.cls": b"1"})
    elif case == "float-label":
        _one_sample_tar(shard, {"x.png": _png(), "x.json": b'{"label": 1.5}'})
    elif case == "gzip":
        with tarfile.open(shard, "w:gz") as tar:
            _add_bytes(tar, "x.png", _png())
    elif case == "not-tar":
        shard.write_bytes(b"this is not a tar archive at all" * 40)
    elif case == "truncated":
        _one_sample_tar(shard, {"x.png": os.urandom(5000)})
        shard.write_bytes(shard.read_bytes()[:2048])
    elif case == "empty":
        _one_sample_tar(shard, {"__meta__": b"{}"})
    with pytest.raises(DataError) as info:
        open_source(f"wds:{pattern}")
    for needle in says:
        assert needle in str(info.value), (needle, str(info.value))


def test_wds_unreadable_image_is_named_when_read(tmp_path: Path) -> None:
    _one_sample_tar(tmp_path / "s.tar", {"a.png": _png(), "a.cls": b"1", "b.jpg": b"not a jpeg", "b.cls": b"0"})
    src = open_source(f"wds:{tmp_path}/s.tar")
    assert src[0].label == 1
    with pytest.raises(DataError, match=r"cannot read image b\.jpg in .*s\.tar .*remove or replace the sample"):
        src[1]


# ---------------------------------------------------------------------------------------------
# hf: details


def test_hf_splits_and_columns_are_chosen_or_asked_for(images: Path, tmp_path: Path) -> None:
    ds = hf_dataset(images)
    both = ds.add_column("thumb", [{"bytes": _png(), "path": None}] * len(ds)).cast_column("thumb", datasets.Image())
    both = both.add_column("score", [0.5] * len(ds))
    datasets.DatasetDict({"a": both, "b": both.select(range(2))}).save_to_disk(str(tmp_path / "d"))
    spec = f"hf:{tmp_path / 'd'}"
    with pytest.raises(DataError, match=r"has the splits a, b; choose one: hf:.*:a"):
        open_source(spec)
    with pytest.raises(DataError, match=r"has no split 'train'; its splits: a, b"):
        open_source(f"{spec}:train")
    with pytest.raises(DataError, match=r"several image columns \(image, thumb\); choose one with --image-column"):
        open_source(f"{spec}:b")
    src = open_source(f"{spec}:b?image=thumb")
    assert len(src) == 2 and np.asarray(src[1].image).tolist() == np.asarray(Image.open(io.BytesIO(_png()))).tolist()
    assert src.classes == CLASSES and src.ids() == ["b:0", "b:1"]
    with pytest.raises(DataError, match=r"label column 'score' .* holds float64 values, not integer or class labels"):
        open_source(f"{spec}:b?image=image&label=score")
    with pytest.raises(DataError, match=r"no column 'nope' for the images; its columns: image, label, thumb, score"):
        open_source(f"{spec}:b?image=nope")
    with pytest.raises(DataError, match=r"column 'score' .* holds .*float64.*, not images, file paths or bytes"):
        open_source(f"{spec}:b?image=score")


def test_hf_path_column_and_unlabelled_dataset(images: Path, tmp_path: Path) -> None:
    """A column of file paths is read as images (cast to datasets.Image); no label column: unlabelled."""
    src = ImageFolderSource(images)
    ds = datasets.Dataset.from_dict({"file": [str(images / i) for i in src.ids()[:4]]})
    ds.save_to_disk(str(tmp_path / "d"))
    got = open_source(f"hf:{tmp_path / 'd'}?image=file")
    assert got.labels().tolist() == [-1] * 4 and got.classes == [] and got.ids() == ["0", "1", "2", "3"]
    assert np.array_equal(np.asarray(got[3].image), np.asarray(src[3].image))
    with pytest.raises(DataError, match=r"no image column \(a datasets.Image feature\) among file; .*--image-column"):
        open_source(f"hf:{tmp_path / 'd'}")


def test_hf_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Hugging Face dataset .*nope does not exist; pass hf:DIR"):
        open_source(f"hf:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"cannot open Hugging Face dataset .*empty"):
        open_source(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(DataError, match=r"unknown option 'colour' .* image=COLUMN and label=COLUMN"):
        open_source(f"hf:{tmp_path}?colour=red")


# ---------------------------------------------------------------------------------------------
# csv: and jsonl: details


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_missing_image_names_its_line(kind: str, images: Path, tmp_path: Path) -> None:
    file = tmp_path / f"list.{kind}"
    write_list(images, file)
    lines = file.read_text().splitlines()
    lines[5] = lines[5].replace("img_", "gone_")
    file.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DataError,
        match=rf"list\.{kind} line 6: image .*gone_\d+\.png does not exist .*relative to the "
        "folder of",
    ):
        open_source(f"{kind}:{file}")


def test_list_labels_columns_and_errors(images: Path, tmp_path: Path) -> None:
    file = tmp_path / "l.csv"
    names = ImageFolderSource(images).ids()[:3]
    file.write_text("image,target\n" + "".join(f"{images / n},{k}\n" for k, n in enumerate(names)))  # absolute paths
    src = open_source(f"csv:{file}")
    assert src.labels().tolist() == [-1, -1, -1] and src.classes == []  # no label column found: unlabelled
    src = open_source(f"csv:{file}?label=target")
    assert src.labels().tolist() == [0, 1, 2] and src.classes == ["0", "1", "2"]
    assert src.ids()[0] == str(images / names[0])
    with pytest.raises(DataError, match=r"has no image column 'pic' \(columns: image, target\)"):
        open_source(f"csv:{file}?image=pic")
    file.write_text("name,target\nx.png,1\n")
    with pytest.raises(DataError, match=r"has no image column \(columns: name, target\); .*--image-column"):
        open_source(f"csv:{file}")
    mixed = tmp_path / "m.jsonl"
    mixed.write_text(
        json.dumps({"path": str(images / names[0]), "label": "cat"})
        + "\n\n"
        + json.dumps({"path": str(images / names[1]), "label": 3})
        + "\n"
    )
    with pytest.raises(DataError, match=r"m\.jsonl line 3: label 3 is a number where other rows hold class names"):
        open_source(f"jsonl:{mixed}")
    mixed.write_text('{"path": "a.png"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"m\.jsonl line 2 is not a JSON object"):
        open_source(f"jsonl:{mixed}")
    mixed.write_text('{"path": "a.png"\n')
    with pytest.raises(DataError, match=r"m\.jsonl line 1 is not JSON"):
        open_source(f"jsonl:{mixed}")
    with pytest.raises(DataError, match=r"csv file .*nope\.csv does not exist"):
        open_source(f"csv:{tmp_path / 'nope.csv'}")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(DataError, match=r"e\.csv is empty; a CSV needs a header row"):
        open_source(f"csv:{tmp_path / 'e.csv'}")


# ---------------------------------------------------------------------------------------------
# Optional packages


@pytest.mark.parametrize("module, extra, spec", [("webdataset", "wds", "wds:x.tar"), ("datasets", "hf", "hf:x")])
def test_a_missing_optional_package_names_its_extra(
    module: str, extra: str, spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import fails as when the package is not installed
    with pytest.raises(
        DataError,
        match=rf"needs the '{module}' package, which is not installed: pip install "
        rf"'featcache\[{extra}\]'",
    ):
        open_source(spec)


# ---------------------------------------------------------------------------------------------
# Specs: column options, re-opening elsewhere


def test_column_options_are_written_into_the_spec() -> None:
    spec = spec_with_columns("hf:/d:train", "my img", "y&z")
    assert spec == "hf:/d:train?image=my+img&label=y%26z"
    assert split_spec_options(spec) == ("hf:/d:train", {"image": "my img", "label": "y&z"})
    assert spec_with_columns(spec, "my img") == spec  # the same choice again is fine
    assert spec_with_columns("csv:l.csv?label=y", "file") == "csv:l.csv?image=file&label=y"
    assert spec_with_columns("/photos") == "/photos"
    with pytest.raises(UsageError, match=r"--image-column my img contradicts image=other"):
        spec_with_columns("jsonl:l.jsonl?image=other", "my img")
    with pytest.raises(UsageError, match=r"choose columns of hf:, csv: and jsonl: data, not of --data wds:x.tar"):
        spec_with_columns("wds:x.tar", label_column="y")


@pytest.mark.parametrize("form", FORMS)
def test_a_worker_with_another_cwd_reopens_the_spec_to_the_same_ids(
    form: str, forms: dict, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As extract_on_cluster plans it: the client's relative spec is made absolute (shared_spec), and
    worker_source re-opens it from the string alone and checks length and the ids' sha256."""
    spec, ids, _ = forms[form]
    client_dir = Path(os.path.commonpath([images, split_spec_options(spec)[0].split(":")[1]])).parent
    relative = spec.replace(f"{client_dir}/", "")
    assert str(client_dir) not in relative
    monkeypatch.chdir(client_dir)
    assert open_source(relative).ids() == ids
    shared = shared_spec(relative)
    monkeypatch.chdir(tmp_path)  # the worker's own working directory
    with pytest.raises(DataError):
        open_source(relative)  # the relative spec does not resolve from here
    job = ShardJob(
        spec={},
        layers=None,
        device="cpu",
        store="",
        split="train",
        data=shared,
        limit=None,
        num_samples=len(ids),
        ids_sha256=ids_sha256(ids),
        weights_sha256="",
        batch_size=4,
        loader_workers=0,
        durable=False,
        storage_options=None,
    )
    assert worker_source(job).ids() == ids


def test_plain_specs_keep_their_meaning_when_shared(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(images.parent)
    assert shared_spec(images.name) == str(images)
    assert shared_spec("sklearn:digits:test") == "sklearn:digits:test"
    assert shared_spec("idx:fm:test") == f"idx:{images.parent / 'fm'}:test"
    assert shared_spec("s3://bucket/images") == "s3://bucket/images"


@pytest.mark.slow
def test_cluster_extraction_of_each_new_form_equals_the_image_folder(
    forms: dict, reference: tuple, tmp_path: Path
) -> None:
    """Dask workers (spawned processes) re-open every form from its spec and write the ImageFolder's arrays."""
    from featcache.distributed.cluster import cluster_client
    from featcache.distributed.extraction import extract_on_cluster
    from featcache.manifest import BackboneSpec

    with cluster_client(workers=1, device="cpu", torch_threads=1) as client:
        for form in ("wds", "csv", "jsonl", "hf-saved", "hf-parquet"):
            spec, ids, _ = forms[form]
            out = tmp_path / f"{form}.zarr"
            report = extract_on_cluster(
                BackboneSpec(**TINY_VIT), spec, out, client=client, **{**FAST, "dtype": "float32"}
            )
            assert report.complete and report.shards_written == 6, form
            got = read_split(out)
            assert got["ids"].tolist() == ids, form
            assert_same_arrays(without_ids(got), without_ids(reference[1]))


# ---------------------------------------------------------------------------------------------
# The command line


def _extract_args(out: Path, *data_args: str) -> list[str]:
    return [
        "extract",
        "--model",
        "test_vit",
        "--model-kwargs",
        "img_size=32",
        "--weights",
        "random",
        "--out",
        str(out),
        "--quiet",
        "--batch-size",
        "4",
        "--dtype",
        "float32",
        *data_args,
    ]


def test_cli_column_options_reach_the_source(forms: dict, reference: tuple, tmp_path: Path) -> None:
    parquet = split_spec_options(forms["hf-parquet"][0])[0]  # without ?label=y: the options say it
    r = CliRunner().invoke(
        app, _extract_args(tmp_path / "s.zarr", "--data", parquet, "--image-column", "img", "--label-column", "y")
    )
    assert r.exit_code == 0, r.output
    got, ref = read_split(tmp_path / "s.zarr"), reference[1]
    np.testing.assert_array_equal(got["labels"], ref["labels"])
    for tap in (name for name in ref if name.startswith(("embed", "block"))):  # other shards, the same images
        np.testing.assert_allclose(got[tap], ref[tap], atol=1e-5)


@pytest.mark.parametrize(
    "data_args, code, says",
    [
        (["--data", "csv:{T}/missing.csv"], 1, ["csv file", "missing.csv does not exist"]),
        (["--data", "{T}", "--image-column", "img"], 2, ["--image-column and --label-column choose columns of hf:"]),
        (["--data", "wds:{T}/none-{0..3}.tar"], 1, ["4 of 4 shard(s)", "do not exist"]),
        (["--data", "hf:{T}/nothing"], 1, ["Hugging Face dataset", "nothing does not exist"]),
    ],
)
def test_cli_bad_data_is_one_error_line(data_args: list[str], code: int, says: list[str], tmp_path: Path) -> None:
    data_args = [a.replace("{T}", str(tmp_path)) for a in data_args]
    r = CliRunner().invoke(app, _extract_args(tmp_path / "s.zarr", *data_args))
    assert r.exit_code == code, r.output
    assert r.stdout == ""
    assert_one_error_line(r.stderr, *says)
    assert not (tmp_path / "s.zarr").exists()


def test_predict_reads_the_new_forms_like_the_image_folder(
    forms: dict, reference: tuple, images: Path, tmp_path: Path
) -> None:
    train(str(reference[0]), "linear", tmp_path / "run", {"epochs": 2, "batch_size": 8}, progress=False)
    named_shards = write_shards(images, tmp_path / "shards", label="json")  # class names, as the run's classes
    results = {}
    for name, args in {
        "folder": ["--data", str(images)],
        "jsonl": ["--data", split_spec_options(forms["jsonl"][0])[0], "--label-column", "y"],
        "wds": ["--data", f"wds:{named_shards}"],
    }.items():
        r = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), "--device", "cpu", "--json", "--quiet", *args])
        assert r.exit_code == 0, r.output
        results[name] = json.loads(r.stdout)
    folder = results["folder"]
    assert folder["num_images"] == 24 and "accuracy" in folder
    for name in ("jsonl", "wds"):
        assert [(p["label"], p["pred"]) for p in results[name]["predictions"]] == [
            (p["label"], p["pred"]) for p in folder["predictions"]
        ]
        assert results[name]["accuracy"] == folder["accuracy"]
