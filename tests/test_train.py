"""Training from the cache: sweeps, selection, checkpoints, resume, divergence isolation, predict parity."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from featcache.backbone import Backbone
from featcache.checkpoint import load_checkpoint
from featcache.cli import app
from featcache.errors import CheckpointError, ConfigError, Interrupted
from featcache.manifest import BackboneSpec
from featcache.store.feature_store import FeatureStore
from featcache.sweep import TrainConfig, expand, load_sweep_file
from featcache.training import train

from .conftest import TINY_CNN, TINY_VIT, make_separable_images, write_tap_store
from .helpers.processes import interrupted_run


@pytest.fixture(scope="module")
def vit_store(tmp_path_factory, vit):
    path = tmp_path_factory.mktemp("vit") / "cache.zarr"
    imgs, labels = make_separable_images(96, classes=3, seed=0)
    write_tap_store(path, vit, imgs, labels, "train")
    imgs, labels = make_separable_images(48, classes=3, seed=1)
    _, test_taps = write_tap_store(path, vit, imgs, labels, "test")
    return path, test_taps, imgs, labels


# -- sweeps -----------------------------------------------------------------------------------


def test_expand_grid_routes_keys_and_names_members() -> None:
    members = expand("last", {"epochs": 3, "rank": 4}, {"lr": [1e-3, 1e-2], "heads": [1, 2]})
    assert len(members) == 4
    assert [m.name for m in members] == ["lr=0.001-heads=1", "lr=0.001-heads=2", "lr=0.01-heads=1", "lr=0.01-heads=2"]
    assert all(m.train.epochs == 3 and m.method_config["rank"] == 4 for m in members)
    assert members[1].method_config["heads"] == 2 and members[2].train.lr == 1e-2
    assert len({m.arch_key() for m in members}) == 2  # lr does not change shapes; heads does


def test_expand_method_grid() -> None:
    members = expand("last", {}, {"method": ["last", "linear"]})
    assert [m.method for m in members] == ["last", "linear"] and members[1].name == "method=linear"
    # a method's own keys apply to that method only, and do not multiply the other method's members
    members = expand("last", {"width": 32, "pool": "cls"}, {"method": ["last", "linear"], "rank": [4, 8]})
    assert [m.name for m in members] == ["method=last-rank=4", "method=last-rank=8", "method=linear"]
    assert members[0].method_config["width"] == 32 and members[2].method_config["pool"] == "cls"
    with pytest.raises(ConfigError, match="unknown setting 'bogus'"):
        expand("last", {"bogus": 1}, {"method": ["last", "linear"]})


@pytest.mark.parametrize(
    "settings,grid,msg",
    [
        ({"rnak": 4}, {}, r"unknown setting 'rnak'.*did you mean rank"),
        ({}, {"epochs": [1, 2]}, "cannot vary inside one sweep"),
        ({"lr": 1e-3}, {"lr": [1e-3, 1e-2]}, "both by --set and by --grid"),
        ({}, {"lr": [1e-3, 1e-3]}, "repeats a value"),
        ({"epochs": 0}, {}, "epochs must be a positive integer"),
        ({"batch_size": -1}, {}, "batch_size must be a positive integer"),
        ({"lr": float("nan")}, {}, "lr must be a positive number"),
        ({}, {"method": ["last", "lora"]}, "lora"),
    ],
)
def test_bad_sweeps(settings, grid, msg) -> None:
    with pytest.raises(ConfigError, match=msg):
        expand("last", settings, grid)


def test_method_prefixed_settings_apply_to_one_method() -> None:
    members = expand(
        "last", {"lr": 1e-3, "linear.lr": 1e-2, "last.rank": 8}, {"method": ["last", "linear"], "last.heads": [1, 2]}
    )
    by = {m.name: m for m in members}
    assert sorted(by) == ["method=last-last.heads=1", "method=last-last.heads=2", "method=linear"]
    assert by["method=linear"].train.lr == 1e-2 and "rank" not in by["method=linear"].method_config
    assert {(m.train.lr, m.method_config["rank"], m.method_config["heads"]) for m in members if m.method == "last"} == {
        (1e-3, 8, 1),
        (1e-3, 8, 2),
    }
    with pytest.raises(ConfigError, match="'lst' is not a method of this sweep"):
        expand("last", {"lst.lr": 1e-2}, {"method": ["last", "linear"]})
    with pytest.raises(ConfigError, match="unknown setting 'rnak'"):
        expand("last", {"last.rnak": 8}, {"method": ["last", "linear"]})


def test_sweep_file(tmp_path) -> None:
    (tmp_path / "s.yaml").write_text("set:\n  epochs: 2\ngrid:\n  lr: [0.001, 0.01]\n")
    assert load_sweep_file(tmp_path / "s.yaml") == ({"epochs": 2}, {"lr": [0.001, 0.01]})
    (tmp_path / "s.json").write_text('{"grid": {"lr": 0.1}}')
    with pytest.raises(ConfigError, match="lists of values"):
        load_sweep_file(tmp_path / "s.json")


# -- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "last", "lst"])
def test_training_learns_and_writes_the_run(vit_store, tmp_path, method: str) -> None:
    path, _, _, _ = vit_store
    out = tmp_path / "run"
    summary = train(str(path), method, out, {"epochs": 8, "batch_size": 16, "lr": 3e-3}, progress=False)
    m = summary["members"][0]
    assert m["metrics"]["test_acc"] >= 0.9, summary
    best = summary["best"]
    assert best["name"] == m["name"] and best["val_acc"] == m["best"]["score"] == m["best"]["val_acc"]
    assert best["test_acc"] == m["best"]["test_acc"] and best["selected_on"] == "train[held-out]"
    assert summary["samples_per_second"] > 0 and summary["peak_rss_mb"] > 0
    assert (out / "curves.png").stat().st_size > 1000 and (out / "summary.json").exists()
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == list(range(1, 9)) and all("test_acc" in l for l in lines)
    files = {p.suffix for p in out.rglob("*") if p.is_file() and p.relative_to(out).parts[0] != "tensorboard"}
    assert files <= {".json", ".jsonl", ".safetensors", ".png"}  # never pickle
    assert all(p.name.startswith("events.out.tfevents.") for p in (out / "tensorboard").rglob("*") if p.is_file())


def test_sweep_members_differ_and_best_is_chosen_on_validation(vit_store, tmp_path) -> None:
    path, _, _, _ = vit_store
    summary = train(
        str(path),
        "last",
        tmp_path / "sweep",
        {"epochs": 4, "batch_size": 16},
        {"lr": [1e-6, 3e-3], "rank": [4, 8]},
        progress=False,
    )
    accs = {m["name"]: m["best"]["score"] for m in summary["members"]}
    assert len(accs) == 4 and summary["num_banks"] == 2
    assert max(accs, key=accs.get) == summary["best"]["name"]
    assert accs["lr=1e-06-rank=4"] < accs["lr=0.003-rank=4"]
    assert json.loads((tmp_path / "sweep" / "best.json").read_text())["name"] == summary["best"]["name"]


def test_bank_member_equals_member_trained_alone(vit_store, tmp_path) -> None:
    path, _, _, _ = vit_store
    settings = {"epochs": 2, "batch_size": 16}
    train(str(path), "last", tmp_path / "bank", settings, {"lr": [1e-3, 3e-3, 1e-2]}, progress=False)
    train(str(path), "last", tmp_path / "alone", {**settings, "lr": 3e-3}, progress=False)
    a = load_checkpoint(tmp_path / "bank" / "members" / "lr=0.003")
    b = load_checkpoint(tmp_path / "alone")
    for (k, va), (_, vb) in zip(sorted(a.network.state_dict().items()), sorted(b.network.state_dict().items())):
        assert torch.allclose(va, vb, atol=1e-5, rtol=1e-4), k


@pytest.mark.parametrize("method", ["last", "lst"])
def test_bank_member_loop_equals_vmap(vit, method) -> None:
    """CPU runs attention methods member by member; the result equals the vmapped bank, divergence included."""
    from featcache.member_bank import MemberBank
    from featcache.methods.base import MethodInput
    from featcache.sweep import SweepMember

    mi = MethodInput(taps=vit.taps.infos, num_classes=3)
    config = {"dropout": 0.0} if method == "lst" else {}  # the loop and vmap draw dropout masks differently
    members = [
        SweepMember(f"m{k}", method, config, TrainConfig(lr=lr, label_smoothing=ls, seed=k))
        for k, (lr, ls) in enumerate([(1e-3, 0.0), (3e-3, 0.1), (1e30, 0.0)])
    ]
    banks = [MemberBank(members, mi, torch.device("cpu")) for _ in range(2)]
    assert banks[0].member_loop
    banks[1].member_loop = False
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            {t.name: torch.randn(8, t.tokens, t.channels, generator=g) for t in vit.taps.infos},
            torch.randint(0, 3, (8,), generator=g),
        )
        for _ in range(3)
    ]
    results = []
    for bank in banks:
        out = [bank.train_step(taps, labels, 0.5, 2) for taps, labels in batches]
        results.append((out, bank))
    (out_a, a), (out_b, b) = results
    for (la, ca), (lb, cb) in zip(out_a, out_b):
        assert torch.allclose(la[:2], lb[:2], atol=1e-5) and torch.equal(ca, cb)
    assert a.alive.tolist() == b.alive.tolist() == [True, True, False]
    for name in a.params:
        assert torch.allclose(a.params[name][:2], b.params[name][:2], atol=1e-5, rtol=1e-4), name
    logits_a, logits_b = a.forward(batches[0][0]), b.forward(batches[0][0])
    assert torch.allclose(logits_a[:2], logits_b[:2], atol=1e-4)


def test_diverging_member_is_stopped_and_others_go_on(vit_store, tmp_path) -> None:
    path, _, _, _ = vit_store
    summary = train(
        str(path), "linear", tmp_path / "div", {"epochs": 3, "batch_size": 16}, {"lr": [3e-3, 1e30]}, progress=False
    )
    by = {m["name"]: m for m in summary["members"]}
    assert by["lr=1e+30"]["status"] == "diverged" and by["lr=1e+30"]["diverged_at"].startswith("epoch 1")
    assert by["lr=0.003"]["status"] == "ok" and by["lr=0.003"]["metrics"]["test_acc"] > 0.8
    assert summary["best"]["name"] == "lr=0.003"


def test_resume_equals_uninterrupted(vit_store, tmp_path, monkeypatch) -> None:
    path, _, _, _ = vit_store
    settings, grid = {"epochs": 4, "batch_size": 16}, {"lr": [1e-3, 3e-3]}
    full = train(str(path), "last", tmp_path / "full", settings, grid, progress=False)

    with interrupted_run(monkeypatch, epochs=2), pytest.raises(Interrupted, match="state after epoch 2 of 4.*--resume"):
        train(str(path), "last", tmp_path / "part", settings, grid, progress=False)
    resumed = train(str(path), "last", tmp_path / "part", settings, grid, resume=True, progress=False)
    assert [m["metrics"] for m in resumed["members"]] == [m["metrics"] for m in full["members"]]
    for name in ("lr=0.001", "lr=0.003"):
        a = load_checkpoint(tmp_path / "full" / "members" / name).network.state_dict()
        b = load_checkpoint(tmp_path / "part" / "members" / name).network.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8


def test_rundir_guards(vit_store, tmp_path) -> None:
    path, _, _, _ = vit_store
    train(str(path), "linear", tmp_path / "r", {"epochs": 1}, progress=False)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "r").rglob("*"))
    with pytest.raises(CheckpointError, match="already exists"):
        train(str(path), "linear", tmp_path / "r", {"epochs": 1}, progress=False)
    with pytest.raises(CheckpointError, match="different sweep"):
        train(str(path), "linear", tmp_path / "r", {"epochs": 2}, resume=True, progress=False)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "r").rglob("*")) == before
    with pytest.raises(CheckpointError, match="no featcache run"):
        train(str(path), "linear", tmp_path / "new", {"epochs": 1}, resume=True, progress=False)


def test_checkpoint_round_trip_gives_cached_logits(vit_store, tmp_path) -> None:
    path, test_taps, _, labels = vit_store
    train(str(path), "last", tmp_path / "ck", {"epochs": 2}, progress=False)
    ckpt = load_checkpoint(tmp_path / "ck")
    assert ckpt.config["method"] == "last" and ckpt.config["store"]["manifest"]["featcache_format"] == 2
    cached = {k: v.to(torch.float16).float() for k, v in test_taps.items()}
    with torch.no_grad():
        logits = ckpt.network(cached)
    acc = float((logits.argmax(-1).numpy() == labels).mean())
    assert acc == pytest.approx(ckpt.config["best"]["test_acc"])


def test_predict_live_path_equals_cached_path(vit_store, tmp_path, vit, monkeypatch) -> None:
    from PIL import Image

    from featcache.infer import load_predictor, predict

    path, test_taps, imgs, labels = vit_store
    train(str(path), "last", tmp_path / "p", {"epochs": 4, "batch_size": 16}, progress=False)
    predictor = load_predictor(tmp_path / "p", device="cpu")
    x = torch.stack([predictor.transform(Image.fromarray(im)) for im in imgs])
    live = predictor(x)
    with torch.no_grad():
        cached = predictor.network({k: v.to(torch.float16).float() for k, v in test_taps.items()})
    assert torch.allclose(live, cached, atol=1e-5)
    folder = tmp_path / "imgs"
    for i, (im, y) in enumerate(zip(imgs, labels)):
        (folder / f"class_{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(folder / f"class_{y}" / f"{i:03d}.png")
    result = predict(tmp_path / "p", str(folder), device="cpu", progress=False, num_workers=0)
    best = json.loads((tmp_path / "p" / "best.json").read_text())
    assert result["num_images"] == 48 and result["accuracy"] == pytest.approx(best["test_acc"])
    import featcache.loader

    monkeypatch.setattr(featcache.loader, "transform_threads", lambda workers, views: 3)  # the CPU default's pool
    pooled = predict(tmp_path / "p", str(folder), device="cpu", progress=False)
    assert pooled["predictions"] == result["predictions"]


def test_predict_refuses_other_weights(vit_store, tmp_path) -> None:
    from safetensors.torch import save_file

    from featcache.infer import load_predictor

    path, _, _, _ = vit_store
    train(str(path), "linear", tmp_path / "w", {"epochs": 1}, progress=False)
    other = Backbone(BackboneSpec(**{**TINY_VIT, "seed": 3}))
    save_file({k: v.contiguous() for k, v in other.model.state_dict().items()}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not the ones the cache"):
        load_predictor(tmp_path / "w", device="cpu", weights=str(tmp_path / "other.safetensors"))


def test_cnn_end_to_end(tmp_path) -> None:
    cnn = Backbone(BackboneSpec(**TINY_CNN))
    imgs, labels = make_separable_images(96, classes=3, seed=0)
    write_tap_store(tmp_path / "c.zarr", cnn, imgs, labels, "train")
    imgs, labels = make_separable_images(48, classes=3, seed=1)
    write_tap_store(tmp_path / "c.zarr", cnn, imgs, labels, "test")
    summary = train(
        str(tmp_path / "c.zarr"),
        "last",
        tmp_path / "cr",
        {"epochs": 6, "batch_size": 16, "lr": 3e-3},
        {"method": ["last", "linear"]},
        progress=False,
    )
    assert summary["num_banks"] == 2
    assert max(m["best"]["score"] for m in summary["members"]) >= 0.9


def test_cli_train_json_and_errors(vit_store, tmp_path) -> None:
    path, _, _, _ = vit_store
    r = CliRunner().invoke(
        app,
        [
            "train",
            str(path),
            "--method",
            "linear",
            "--out",
            str(tmp_path / "c"),
            "--epochs",
            "2",
            "--grid",
            "lr=1e-3,1e-2",
            "--json",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert {"members", "best", "samples_per_second", "wall_seconds", "peak_rss_mb"} <= set(data)
    assert {"name", "config", "metrics"} <= set(data["members"][0]) and "test_acc" in data["best"]
    for args, code, msg in [
        (["--grid", "lr"], 2, "expects KEY=VALUE"),
        (["--set", "rnak=3"], 1, "unknown setting 'rnak'"),
        (["--epochs", "0"], 1, "epochs must be a positive integer"),
        (["--method", "lora"], 1, "lora"),
        (["--eval-split", "nope"], 1, "no split|not in"),
    ]:
        r = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "bad"), *args])
        assert r.exit_code == code, (args, r.output)
        assert (
            r.stderr.count("\n") == 1 and r.stderr.startswith("Error: ") and __import__("re").search(msg, r.stderr)
        ), r.stderr


def test_cli_train_stream_reader_options_reach_the_reader(vit_store, tmp_path) -> None:
    path, _, _, _ = vit_store
    stored = FeatureStore.open(str(path)).split("train")
    meta = stored.meta
    r = CliRunner().invoke(
        app,
        [
            "train",
            str(path),
            "--method",
            "linear",
            "--out",
            str(tmp_path / "s"),
            "--epochs",
            "1",
            "--reader",
            "stream",
            "--stream-buffer-mb",
            "1",
            "--prefetch",
            "3",
            "--json",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    reader = json.loads(r.stdout)["reader"]
    assert reader["mode"] == "stream" and reader["prefetch"] == 3 and reader["buffer_mb"] == 1
    assert reader["block_images"] % meta.chunk_images == 0
    for args, msg in [(["--prefetch", "0"], "--prefetch"), (["--stream-buffer-mb", "0.5"], "--stream-buffer-mb")]:
        r = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "bad"), *args])
        assert r.exit_code == 2 and msg in r.stderr, r.output


def test_lst_pruned_init_checkpoint_rebuilds(vit_store, tmp_path, vit) -> None:
    path, test_taps, _, _ = vit_store
    state = vit.model.state_dict()
    train(
        str(path),
        "lst",
        tmp_path / "prune",
        {"epochs": 1, "init": "prune"},
        progress=False,
        backbone_state=lambda: state,
    )
    ckpt = load_checkpoint(tmp_path / "prune")
    assert ckpt.config["method_config"]["init"] == "prune" and ckpt.config["method_config"]["mlp_ratio"] is not None
    assert ckpt.config["method_config"]["attn_scale"] == pytest.approx((64 / ckpt.network.heads) ** -0.5)
    assert not ckpt.network.training  # dropout off in a loaded checkpoint
    with torch.no_grad():
        assert ckpt.network(test_taps).shape == (48, 3)


def test_a_second_training_into_the_same_rundir_is_refused(vit_store, tmp_path) -> None:
    """One training per RUNDIR: a live owner is named; a dead owner's lock is taken over; none is left behind."""
    import subprocess
    import sys

    from featcache.errors import StoreLockedError

    path, _, _, _ = vit_store
    out = tmp_path / "runs" / "r"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom featcache.rundir import RunLock\n"
            "RunLock(sys.argv[1]).acquire()\nprint('held', flush=True)\ntime.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreLockedError, match=rf"run directory .*r is being trained into by process {holder.pid}"):
            train(str(path), "linear", out, {"epochs": 1}, progress=False)
        assert not out.exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    lock = out.parent / ".r.lock"
    assert lock.exists()  # a killed owner leaves its record; the next training takes it over
    train(str(path), "linear", out, {"epochs": 1}, progress=False)
    assert (out / "summary.json").exists() and not lock.exists()


def test_rundir_under_a_file_is_one_clear_error(vit_store, tmp_path) -> None:
    path, _, _, _ = vit_store
    (tmp_path / "f").write_text("x")
    r = CliRunner().invoke(app, ["train", str(path), "--method", "linear", "--out", str(tmp_path / "f" / "run")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert "run directory's parent path" in r.stderr and "is a file, not a directory" in r.stderr


def test_lst_fisher_init_reads_training_rows_only(vit_store, tmp_path, vit, monkeypatch) -> None:
    """prune_by=fisher sums over training samples of the embedding tap: never a held-out validation row."""
    from featcache.methods import lst

    path, _, _, _ = vit_store
    state, seen = vit.model.state_dict(), []
    real = lst.fisher_information

    def spy(state: dict, x: torch.Tensor, labels: torch.Tensor, *args: object, **kw: object) -> object:
        seen.append(x)
        return real(state, x, labels, *args, **kw)

    monkeypatch.setattr(lst, "fisher_information", spy)
    out = tmp_path / "fisher"
    train(
        str(path),
        "lst",
        out,
        {"epochs": 1, "init": "prune", "prune_by": "fisher", "fisher_samples": 500},
        progress=False,
        backbone_state=lambda: state,
    )
    split = FeatureStore.open(str(path)).split("train")
    held_ids = set(json.loads((out / "heldout.json").read_text())["ids"])
    held = [i for i, name in enumerate(split.ids()) if name in held_ids]
    rows = split.read_values("embed")  # (96, T, C)
    train_rows = [i for i in range(len(rows)) if i not in held]
    assert len(seen) == 1 and len(seen[0]) == len(train_rows) == 96 - len(held) and len(held) > 0
    match = torch.cdist(seen[0].flatten(1).float(), rows.flatten(1)).argmin(1)  # the stored row each sample is
    assert sorted(match.tolist()) == train_rows
    assert load_checkpoint(out).config["method_config"]["prune_by"] == "fisher"
