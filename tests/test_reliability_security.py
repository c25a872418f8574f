"""Format evolution and security, through the CLI: unknown format versions are refused with what to do;
loading a store, a checkpoint or weights never runs code from them; paths read from store or run files
are never used as places to write."""

from __future__ import annotations

import ast
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import zarr
from click.testing import CliRunner
from zarr.codecs import Crc32cCodec

from featcache.cli import app
from featcache.manifest import FORMAT_VERSION
from featcache.sweep import expand
from featcache.training import train

from .helpers.processes import EXTRACT_KW, ROOT, TINY_ARGS, assert_one_error_line
from .helpers.stores import hash_tree, run_extract, run_files, shard_file


@pytest.fixture(scope="module")
def world(images: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A store (train split, 24 images) and a run trained on it (linear, 1 epoch)."""
    root = tmp_path_factory.mktemp("world")
    store, run = root / "s.zarr", root / "run"
    run_extract(images, store, **EXTRACT_KW)
    train(str(store), "linear", run, {"epochs": 1, "batch_size": 8}, progress=False)
    return {"store": store, "run": run, "images": images}


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def set_root_attr(store: Path, key: str, value: Any) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"][key] = value
    (store / "zarr.json").write_text(json.dumps(meta))


def edit_config(member: Path, change: Any) -> None:
    path = member / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def member_of(run: Path) -> Path:
    return run / "members" / json.loads((run / "best.json").read_text())["name"]


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


# ---------------------------------------------------------------------------------------------
# Format versions


@pytest.mark.parametrize(
    "version,says",
    [
        (FORMAT_VERSION + 1, f"uses featcache format {FORMAT_VERSION + 1}, newer than this featcache"),
        (0, "uses featcache format 0, which this featcache"),
        ("1", "has no valid featcache format version ('1')"),
    ],
)
def test_store_format_versions_through_the_cli(world: dict, tmp_path: Path, version: Any, says: str) -> None:
    """inspect, train and extract --resume refuse a store of an unknown format, name it, and change nothing."""
    store = copy(world["store"], tmp_path / "s.zarr")
    set_root_attr(store, "featcache_format", version)
    before = hash_tree(store)
    fix = {
        FORMAT_VERSION + 1: "upgrade featcache to read it",
        0: "re-extract it",
        "1": "not written by featcache or is damaged",
    }[version]
    for args in (
        ["inspect", str(store)],
        ["inspect", str(store), "--verify", "--json"],
        ["train", str(store), "--method", "linear", "--out", str(tmp_path / "run")],
        ["extract", *TINY_ARGS, "--data", str(world["images"]), "--out", str(store), "--resume"],
    ):
        r = invoke(*args)
        assert r.exit_code == 1, (args, r.output)
        assert_one_error_line(r.stderr, f"store {store}", says, fix)
        assert r.stdout == ""
    assert hash_tree(store) == before and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "where,version,says",
    [
        ("checkpoint", 2, "uses checkpoint format 2, newer than this featcache"),
        ("checkpoint", 0, "uses checkpoint format 0, which this featcache"),
        ("manifest", FORMAT_VERSION + 1, f"uses featcache format {FORMAT_VERSION + 1}, newer than this featcache"),
    ],
)
def test_checkpoint_format_versions_through_the_cli(
    world: dict, tmp_path: Path, where: str, version: int, says: str
) -> None:
    run = copy(world["run"], tmp_path / "run")
    if where == "checkpoint":
        edit_config(member_of(run), lambda c: c.update(featcache_checkpoint=version))
    else:  # the store manifest recorded in the checkpoint, from which predict rebuilds the backbone
        edit_config(member_of(run), lambda c: c["store"]["manifest"].update(featcache_format=version))
    before = hash_tree(run)
    r = invoke("predict", str(run), "--data", str(world["images"]), "--device", "cpu", "--quiet")
    assert r.exit_code == 1, r.output
    fix = {2: "upgrade featcache", FORMAT_VERSION + 1: "upgrade featcache", 0: "retrain it with this featcache"}[
        version
    ]
    assert_one_error_line(r.stderr, says, fix, "checkpoint")
    assert hash_tree(run) == before


@pytest.mark.parametrize(
    "field,says",
    [
        ("featcache_checkpoint", "was written with checkpoint format 2"),
        ("manifest", f"uses featcache format {FORMAT_VERSION + 1}, newer than this featcache"),
    ],
)
def test_resuming_a_run_of_a_newer_format_is_refused(world: dict, tmp_path: Path, field: str, says: str) -> None:
    run = copy(world["run"], tmp_path / "run")
    if field == "manifest":
        edit_config(member_of(run), lambda c: c["store"]["manifest"].update(featcache_format=FORMAT_VERSION + 1))
    else:
        edit_config(member_of(run), lambda c: c.update(featcache_checkpoint=2))
    before = hash_tree(run)
    r = invoke(
        "train",
        str(world["store"]),
        "--method",
        "linear",
        "--out",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--resume",
    )
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "--resume", says)
    assert hash_tree(run) == before


# ---------------------------------------------------------------------------------------------
# Nothing executes on load


class _Evil:
    """Unpickling this creates a directory: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.mkdir, (str(self.marker),))


def test_pickled_code_in_weights_never_runs(world: dict, tmp_path: Path) -> None:
    marker, weights = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"blocks.0.weight": _Evil(marker)}, weights)
    r = invoke(
        "extract",
        "--model",
        "test_vit",
        "--model-kwargs",
        "img_size=32",
        "--weights",
        str(weights),
        "--data",
        str(world["images"]),
        "--out",
        str(tmp_path / "s.zarr"),
        "--quiet",
    )
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, str(weights), "plain state dict", "weights_only=True")
    r = invoke(
        "predict",
        str(world["run"]),
        "--data",
        str(world["images"]),
        "--weights",
        str(weights),
        "--quiet",
        "--device",
        "cpu",
    )
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, str(weights))
    assert not marker.exists() and not (tmp_path / "s.zarr").exists()


def test_pickle_in_place_of_a_checkpoint_never_runs(world: dict, tmp_path: Path) -> None:
    run, marker = copy(world["run"], tmp_path / "run"), tmp_path / "pwned"
    member = member_of(run)
    torch.save({"head.weight": _Evil(marker)}, member / "best.safetensors")  # a pickle under a safetensors name
    r = invoke("predict", str(run), "--data", str(world["images"]), "--device", "cpu", "--quiet")
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "best.safetensors", "the checkpoint is damaged")
    assert not marker.exists()
    r = invoke(
        "predict",
        str(member / "best.safetensors").replace("best.safetensors", "evil.pth"),
        "--data",
        str(world["images"]),
    )
    assert r.exit_code == 1  # a .pth is never taken for a checkpoint


@dataclass(frozen=True)
class _ExecCodec(Crc32cCodec):
    """A codec that runs code when a chunk is decoded (as an unpickling codec would): the test's stand-in."""

    @classmethod
    def from_dict(cls, data: Any) -> "_ExecCodec":
        return cls()

    def to_dict(self) -> dict[str, Any]:
        return {"name": "featcache-test.exec"}

    async def _decode_single(self, chunk_bytes: Any, chunk_spec: Any) -> Any:
        os.makedirs(os.environ["FEATCACHE_TEST_MARKER"], exist_ok=True)
        return self._decode_sync(chunk_bytes, chunk_spec)


def test_a_store_codec_that_would_run_code_is_never_decoded(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even with such a codec installed, featcache refuses an array that declares it, before decoding a chunk."""
    zarr.registry.register_codec("featcache-test.exec", _ExecCodec)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FEATCACHE_TEST_MARKER", str(marker))
    store = copy(world["store"], tmp_path / "s.zarr")
    meta_path = store / "train" / "block6" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    inner[[c["name"] for c in inner].index("crc32c")] = {"name": "featcache-test.exec"}
    meta_path.write_text(json.dumps(meta))
    r = invoke("train", str(store), "--method", "linear", "--out", str(tmp_path / "run"), "--epochs", "1")
    assert r.exit_code == 1
    assert_one_error_line(
        r.stderr, "array 'block6' of split 'train'", "declares codec(s) featcache-test.exec", "re-extract it"
    )
    r = invoke("inspect", str(store), "--verify", "--stats", "--json")
    assert r.exit_code == 1
    assert not marker.exists()
    r = invoke("inspect", str(store), "--verify", "--json")
    assert r.exit_code == 1 and "featcache-test.exec" in json.loads(r.stdout)["verify"]["errors"][0]
    assert not marker.exists()
    zarr.open_array(str(store / "train" / "block6"), mode="r")[:4]  # plain zarr decodes it: the danger is real
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Paths from files are never write targets


HOSTILE = ("../../../pwned", "../../../pwned.zarr", "../../../pwned.pth", "../../pwned")


def no_escape(root: Path) -> None:
    """Nothing named like the hostile paths exists in the test's directory, nor where they lead from the cwd."""
    hits = [str(p) for p in root.rglob("*pwned*")]
    hits += [str(Path.cwd() / h) for h in HOSTILE if (Path.cwd() / h).exists()]
    assert hits == [], hits


def test_paths_inside_run_files_are_never_write_targets(world: dict, tmp_path: Path) -> None:
    root = tmp_path / "a" / "b"
    run = copy(world["run"], root / "run")
    member = member_of(run)
    # best.json naming a member outside the run
    best = json.loads((run / "best.json").read_text())
    (run / "best.json").write_text(json.dumps({**best, "name": "../../../pwned"}))
    r = invoke("predict", str(run), "--data", str(world["images"]), "--csv", str(tmp_path / "p.csv"))
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "best.json is damaged", "cannot name a directory inside the run")
    (run / "best.json").write_text(json.dumps(best))
    # a checkpoint whose recorded store and weights paths point outside: only ever read, and refused when absent
    edit_config(member, lambda c: c["store"].update(url="../../../pwned.zarr"))
    edit_config(member, lambda c: c["store"]["manifest"]["backbone"]["spec"].update(weights="../../../pwned.pth"))
    r = invoke("predict", str(member), "--data", str(world["images"]), "--device", "cpu", "--quiet")
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "weights file ../../../pwned.pth not found")
    # state.json pointing out of the run
    state = json.loads((run / "state" / "state.json").read_text())
    (run / "state" / "state.json").write_text(json.dumps({**state, "dir": "../../../pwned"}))
    before = hash_tree(run)
    r = invoke(
        "train",
        str(world["store"]),
        "--method",
        "linear",
        "--out",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--resume",
    )
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "state.json is damaged", "start a new --out")
    assert hash_tree(run) == before
    no_escape(tmp_path)


def test_grid_values_never_name_directories_outside_the_run(world: dict, tmp_path: Path) -> None:
    members = expand("linear", {}, {"taps": ["../../pwned", "block6"]})
    assert all("/" not in m.name and m.name != ".." for m in members)
    run = tmp_path / "a" / "run"
    r = invoke(
        "train", str(world["store"]), "--method", "linear", "--out", str(run), "--grid", "taps=../../../pwned,block6"
    )
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "no tap '../../../pwned'")
    assert not run.exists()
    no_escape(tmp_path)


def test_paths_inside_a_store_are_never_write_targets(world: dict, tmp_path: Path) -> None:
    """The recorded --data SPEC and weights path of a store are compared or read, never written."""
    store = copy(world["store"], tmp_path / "a" / "s.zarr")
    meta = json.loads((store / "train" / "zarr.json").read_text())
    meta["attributes"]["featcache_split"]["data"] = "../../pwned"
    (store / "train" / "zarr.json").write_text(json.dumps(meta))
    before = hash_tree(store)
    r = invoke(
        "extract", *TINY_ARGS, "--data", str(world["images"]), "--out", str(store), "--resume", "--dtype", "float32"
    )
    assert r.exit_code == 1
    assert_one_error_line(r.stderr, "cannot resume split 'train'", "data = '../../pwned'", "--overwrite")
    assert hash_tree(store) == before
    no_escape(tmp_path)


def test_source_never_unpickles_or_evaluates() -> None:
    """Audit of featcache/ and cli/: no pickle-family import, torch.load only with weights_only=True, no torch.save
    (checkpoints are safetensors), yaml only via safe_load, no eval/exec, no np.load(allow_pickle=True)."""
    problems = []
    files = sorted([*(ROOT / "featcache").rglob("*.py"), *(ROOT / "cli").rglob("*.py")])
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                )
                for n in names:
                    if n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal", "joblib"):
                        problems.append(f"{where}: imports {n}")
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name.endswith("torch.load") and kw.get("weights_only") != "True":
                problems.append(f"{where}: torch.load without weights_only=True")
            if name.endswith(("torch.save", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load")):
                problems.append(f"{where}: {name}")
            if name in ("eval", "exec"):
                problems.append(f"{where}: {name}()")
            if name.endswith("load") and kw.get("allow_pickle") == "True":
                problems.append(f"{where}: {name}(allow_pickle=True)")
    assert problems == []


def test_a_run_directory_holds_only_json_safetensors_and_png(world: dict) -> None:
    files = [p for p in world["run"].rglob("*") if p.is_file()]
    # besides: TensorBoard's event files (protobuf records that featcache writes and never reads)
    events = [p for p in files if p.relative_to(world["run"]).parts[0] == "tensorboard"]
    assert all(p.name.startswith("events.out.tfevents.") and p.parent.parent.name == "tensorboard" for p in events)
    assert {p.suffix for p in files if p not in events} <= {".json", ".jsonl", ".safetensors", ".png"}
    assert run_files(world["run"])  # weights and metrics are there
    assert shard_file(world["store"], "block6", 0).exists()
