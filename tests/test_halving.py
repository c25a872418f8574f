"""Successive halving (``train --halving ETA``): the rung plan, the ranking, survivors equal to the full sweep's
members, the bank shrinking, stopped members' artifacts, resume mid-halving, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from featcache.checkpoint import load_checkpoint
from featcache.cli import app
from featcache.errors import CheckpointError, Interrupted, UsageError
from featcache.halving import HalvingPlan, rank
from featcache.options import TrainOptions
from featcache.training import train

from .conftest import make_separable_images, write_tap_store
from .helpers.processes import interrupted_run

SETTINGS = {"epochs": 4, "batch_size": 16}
GRID = {"lr": [3e-4, 1e-3, 3e-3], "rank": [4, 8]}  # 6 members in 2 banks (rank changes shapes)
HALVING = {"halving": 3, "halving_min_epochs": 1}  # rungs at epochs 1 (6 -> 2) and 3 (2 -> 1)


@pytest.fixture(scope="module")
def store(tmp_path_factory, vit):
    path = tmp_path_factory.mktemp("halving") / "cache.zarr"
    imgs, labels = make_separable_images(96, classes=3, seed=0)
    write_tap_store(path, vit, imgs, labels, "train")
    imgs, labels = make_separable_images(48, classes=3, seed=1)
    write_tap_store(path, vit, imgs, labels, "test")
    return str(path)


@pytest.fixture(scope="module")
def full_and_halved(store, tmp_path_factory):
    """The same 6-member LAST sweep trained in full and with --halving 3 (rungs at epochs 1 and 3)."""
    root = tmp_path_factory.mktemp("runs")
    full = train(store, "last", root / "full", SETTINGS, GRID, progress=False, tensorboard=False)
    halved = train(store, "last", root / "halved", SETTINGS, GRID, progress=False, tensorboard=False, **HALVING)
    return root, full, halved


def _rows(out) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.pop("member"), []).append(row)
    return rows


# -- the plan and the ranking -----------------------------------------------------------------


def test_plan_places_rungs_and_predicts_the_member_epochs() -> None:
    plan = HalvingPlan.make(3, None, 9, 27)
    assert plan.rungs == (1, 3) and plan.alive_per_epoch() == [27, 9, 9, 3, 3, 3, 3, 3, 3]
    assert plan.predicted_fraction() == pytest.approx(7 / 27)  # the issue's E/9, E/3, E schedule
    assert HalvingPlan.make(3, None, 18, 27).rungs == (2, 6)
    assert HalvingPlan.make(2, None, 8, 8).rungs == (2, 4)  # 8 -> 4 -> 2 members reach the last epoch
    assert HalvingPlan.make(3, 1, 30, 27).rungs == (1, 3, 9)  # given a first rung: geometric until one is left
    assert HalvingPlan.make(3, 2, 5, 27).rungs == (2,)  # the next rung (6) is past the last epoch
    assert HalvingPlan.make(3, None, 4, 6).survivors(6) == 2 and HalvingPlan.make(3, None, 4, 6).survivors(2) == 1


@pytest.mark.parametrize(
    "eta,first,epochs,members,msg",
    [
        (3, None, 4, 1, "needs a sweep of more than one member"),
        (3, None, 1, 27, "no rung falls before the last epoch"),
        (3, 4, 4, 27, r"no rung falls before the last epoch \(--epochs 4, --halving-min-epochs 4\)"),
    ],
)
def test_plan_refusals(eta, first, epochs, members, msg) -> None:
    with pytest.raises(UsageError, match=msg):
        HalvingPlan.make(eta, first, epochs, members)


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"halving": 1}, "--halving must be >= 2, got 1"),
        ({"halving": "three"}, "--halving must be an integer"),
        ({"halving_min_epochs": 2}, "--halving-min-epochs needs --halving ETA"),
        ({"halving": 3, "halving_min_epochs": 0}, "--halving-min-epochs must be a positive integer, got 0"),
    ],
)
def test_bad_options(kw, msg) -> None:
    with pytest.raises(UsageError, match=msg):
        TrainOptions(**kw)


def test_rank_uses_validation_only_with_loss_then_order_as_tie_breaks() -> None:
    rows = [
        ("a", {"val_acc": 0.5, "val_loss": 0.9, "test_acc": 1.0}, False),
        ("b", {"val_acc": 0.8, "val_loss": 0.7, "test_acc": 0.0}, False),
        ("c", {"val_acc": 0.8, "val_loss": 0.5, "test_acc": 0.0}, False),  # tie on accuracy: lower loss first
        ("d", {"val_acc": 0.9, "val_loss": 0.1}, True),  # diverged: last, whatever it scored
        ("e", {"val_acc": 0.5, "val_loss": 0.9}, False),  # a full tie with a: member order
        ("f", {"val_acc": float("nan"), "val_loss": float("nan")}, False),
    ]
    assert rank(rows) == ["c", "b", "a", "e", "d", "f"]


# -- training ---------------------------------------------------------------------------------


def test_survivors_equal_the_full_sweeps_members_up_to_their_rung(full_and_halved) -> None:
    """Same batches, same schedule (warm-up and cosine over all 4 epochs): every member of the halving sweep is the
    full sweep's member up to the epoch it stopped at: metrics equal bit for bit (CPU, LAST runs member by member),
    and the final survivor's weights equal the full run's."""
    root, full, halved = full_and_halved
    a, b = _rows(root / "full"), _rows(root / "halved")
    stops = {m["name"]: m["stopped_at"] for m in halved["members"]}
    assert sorted(v for v in stops.values() if v) == [1, 1, 1, 1, 3] and list(stops.values()).count(None) == 1
    for name, rows in b.items():
        assert len(rows) == (stops[name] or 4)
        for ra, rb in zip(a[name], rows):
            assert {k: rb[k] for k in ra if k != "status"} == {k: v for k, v in ra.items() if k != "status"}, name
    survivor = next(n for n, s in stops.items() if s is None)
    wa = load_checkpoint(root / "full" / "members" / survivor).network.state_dict()
    wb = load_checkpoint(root / "halved" / "members" / survivor).network.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the survivor is the member of the full sweep that the rungs' validation ranking keeps
    ranked = sorted(a, key=lambda n: (-a[n][0]["val_acc"], a[n][0]["val_loss"], list(a).index(n)))
    assert survivor in ranked[:2]


def test_rungs_are_recorded_and_stopped_members_keep_their_artifacts(full_and_halved) -> None:
    root, _, halved = full_and_halved
    out = root / "halved"
    h = halved["halving"]
    assert h["rungs"] == [1, 3] and h["members_per_rung"] == [6, 2] and h["eta"] == 3
    assert [(r["epoch"], r["in_play"], len(r["kept"]), len(r["stopped"])) for r in h["rung_results"]] == [
        (1, 6, 2, 4),
        (3, 2, 1, 1),
    ]
    assert h["member_epochs"] == 6 + 2 * 2 + 1 == round(h["predicted_fraction"] * 24)
    rows = _rows(out)
    for m in halved["members"]:
        mdir = out / "members" / m["name"]
        config = json.loads((mdir / "config.json").read_text())
        assert (mdir / "last.safetensors").is_file() and (mdir / "best.safetensors").is_file()
        assert config["stopped_at"] == m["stopped_at"]
        if m["stopped_at"] is not None:
            assert m["status"] == config["status"] == rows[m["name"]][-1]["status"] == "stopped"
            assert rows[m["name"]][-1]["rung"] == h["rung_results"][[1, 3].index(m["stopped_at"])]["rung"]
            assert m["best"]["epoch"] <= m["stopped_at"]
            net = load_checkpoint(mdir).network  # a stopped member is a usable checkpoint
            assert sum(p.numel() for p in net.parameters()) == m["params"]
        else:
            assert m["status"] == "ok" and len(rows[m["name"]]) == 4
    best = json.loads((out / "best.json").read_text())
    assert best["halving"]["rungs"] == [1, 3] and best["name"] == halved["best"]["name"]
    assert (out / "curves.png").stat().st_size > 1000


def test_the_bank_shrinks_to_the_members_in_play(full_and_halved, vit) -> None:
    from featcache.member_bank import MemberBank
    from featcache.methods.base import MethodInput
    from featcache.sweep import expand

    _, _, halved = full_and_halved
    by = {m["name"]: m for m in halved["members"]}
    survivor = next(m for m in halved["members"] if m["stopped_at"] is None)
    assert survivor["bank_size"] == 1  # the survivor's bank holds it alone; the other bank is empty
    assert sum(1 for m in by.values() if m["bank_size"] == 0) == 3
    members = expand("last", SETTINGS, {"lr": [1e-3, 3e-3, 1e-2]})
    bank = MemberBank(members, MethodInput(taps=vit.taps.infos, num_classes=3), torch.device("cpu"))
    one = bank.param_count()
    assert bank.stacked_param_count() == 3 * one
    before = {k: v[2].clone() for k, v in bank.params.items()}
    bank.keep([2])
    assert len(bank) == 1 and bank.stacked_param_count() == one and bank.lr.tolist() == pytest.approx([1e-2])
    assert all(v.shape[0] == 1 for group in (bank.params, bank.exp_avg, bank.exp_avg_sq) for v in group.values())
    assert all(torch.equal(bank.params[k][0], before[k]) for k in before)


def test_ranking_never_reads_test_metrics(store, tmp_path, monkeypatch) -> None:
    import featcache.training as training

    read: list[str] = []

    class Row(dict):
        def get(self, key, default=None):
            read.append(key)
            return super().get(key, default)

        def __getitem__(self, key):
            read.append(key)
            return super().__getitem__(key)

    real = training.rank
    monkeypatch.setattr(training, "rank", lambda rows: real([(n, Row(r), d) for n, r, d in rows]))
    summary = train(
        store, "linear", tmp_path / "r", SETTINGS, {"lr": [1e-3, 1e-2]}, progress=False, tensorboard=False, halving=2
    )
    assert summary["halving"]["rungs"] == [2] and read and all(k.startswith("val_") for k in read)
    assert "test_acc" in _rows(tmp_path / "r")[summary["members"][0]["name"]][1]  # test was there to read


@pytest.mark.parametrize("stop_after", [1, 2])  # right after the first rung, and between the rungs
def test_resume_mid_halving_equals_uninterrupted(store, full_and_halved, tmp_path, monkeypatch, stop_after) -> None:
    root, _, halved = full_and_halved
    out = tmp_path / "part"
    kw = {"progress": False, "tensorboard": False, **HALVING}
    with interrupted_run(monkeypatch, epochs=stop_after), pytest.raises(Interrupted):
        train(store, "last", out, SETTINGS, GRID, **kw)
    state = json.loads((out / "state" / "state.json").read_text())
    assert sum(1 for r in state["records"] if r["stopped_at"] is None) == 2  # the rung at epoch 1 is in the state
    assert sum(len(b["members"]) for b in state["banks"]) == 2  # the banks were saved shrunk
    resumed = train(store, "last", out, SETTINGS, GRID, resume=True, **kw)
    assert _rows(out) == _rows(root / "halved")
    assert [(m["name"], m["stopped_at"], m["best"]) for m in resumed["members"]] == [
        (m["name"], m["stopped_at"], m["best"]) for m in halved["members"]
    ]
    assert resumed["halving"]["rung_results"] == halved["halving"]["rung_results"]
    for m in halved["members"]:
        a = load_checkpoint(root / "halved" / "members" / m["name"]).network.state_dict()
        b = load_checkpoint(out / "members" / m["name"]).network.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), m["name"]


def test_resume_with_other_rungs_is_refused(store, tmp_path, monkeypatch) -> None:
    out = tmp_path / "r"
    kw = {"progress": False, "tensorboard": False}
    with interrupted_run(monkeypatch, epochs=1), pytest.raises(Interrupted):
        train(store, "linear", out, SETTINGS, {"lr": [1e-3, 1e-2]}, halving=2, **kw)
    with pytest.raises(UsageError, match=r"with --halving 2 \(rungs at epochs \[2\]\), this command asks for no"):
        train(store, "linear", out, SETTINGS, {"lr": [1e-3, 1e-2]}, resume=True, **kw)


def test_cli_halving_and_its_refusals(store, tmp_path) -> None:
    runner = CliRunner()
    base = ["train", store, "--method", "linear", "--epochs", "4", "--batch-size", "16", "--no-tensorboard", "-q"]
    ok = runner.invoke(
        app, [*base, "--out", str(tmp_path / "ok"), "--grid", "lr=1e-3,1e-2", "--halving", "2", "--json"]
    )
    assert ok.exit_code == 0, ok.output
    summary = json.loads(ok.stdout)
    assert summary["halving"]["rungs"] == [2] and [m["stopped_at"] for m in summary["members"]].count(2) == 1
    for args, msg in [
        (["--halving", "1"], "--halving must be >= 2, got 1"),
        (["--halving", "2"], "--halving 2 needs a sweep of more than one member"),
        (["--halving-min-epochs", "2", "--grid", "lr=1e-3,1e-2"], "--halving-min-epochs needs --halving"),
        (["--halving", "2", "--grid", "lr=1e-3,1e-2", "--workers", "2"], "--halving with --workers/--scheduler is not"),
    ]:
        res = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), *args])
        assert res.exit_code != 0 and msg in res.output, (args, res.output)
        assert res.output.count("Error:") == 1
        assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_predicted_fraction_of_the_issue_grid() -> None:
    """27 members, ETA 3, default rungs: the member-epochs are 7/27 of the full grid's whatever E divides by 9."""
    for epochs in (9, 18, 27):
        plan = HalvingPlan.make(3, None, epochs, 27)
        assert plan.rungs == (epochs // 9, epochs // 3)
        assert math.isclose(plan.predicted_fraction(), 7 / 27)


def test_resume_refuses_a_damaged_bank_record(store, tmp_path, monkeypatch) -> None:
    out = tmp_path / "r"
    kw = {"progress": False, "tensorboard": False, "halving": 2}
    with interrupted_run(monkeypatch, epochs=2), pytest.raises(Interrupted):
        train(store, "linear", out, SETTINGS, {"lr": [1e-3, 1e-2]}, **kw)
    pointer = out / "state" / "state.json"
    state = json.loads(pointer.read_text())
    state["banks"][0]["members"] = ["no-such-member"]
    pointer.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="does not fit this sweep"):
        train(store, "linear", out, SETTINGS, {"lr": [1e-3, 1e-2]}, resume=True, **kw)


def test_vmapped_survivors_equal_the_full_sweeps_members(store, tmp_path) -> None:
    """The linear probe runs its bank under vmap (not member by member): a survivor's rows and weights still equal
    the full sweep's member's (to float32 rounding: a smaller stack may change how the batched kernels sum)."""
    grid, kw = {"lr": [1e-3, 3e-3, 1e-2, 3e-2]}, {"progress": False, "tensorboard": False}
    train(store, "linear", tmp_path / "full", SETTINGS, grid, **kw)
    halved = train(store, "linear", tmp_path / "halved", SETTINGS, grid, halving=2, **kw)
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "halved")
    assert sorted(len(rows) for rows in b.values()) == [2, 2, 4, 4]  # rung at epoch 2: 4 -> 2
    for name, rows in b.items():
        for ra, rb in zip(a[name], rows):
            assert all(rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6) for k in ra if k != "status"), name
    for m in (m for m in halved["members"] if m["stopped_at"] is None):
        wa = load_checkpoint(tmp_path / "full" / "members" / m["name"]).network.state_dict()
        wb = load_checkpoint(tmp_path / "halved" / "members" / m["name"]).network.state_dict()
        assert all(torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6) for k in wa)


def test_the_benchmarks_replay_chooses_what_the_run_chose(full_and_halved) -> None:
    """benchmarks/halving.py replays ranking rules on a full grid's curves; the implemented rule must reproduce the
    halving run's choice (a survivor is the full grid's member)."""
    from benchmarks.halving import replay

    root, _, halved = full_and_halved
    chosen = replay(_rows(root / "full"), 3, [1, 3], "val_acc", "test_acc")
    assert (chosen["name"], chosen["epoch"]) == (halved["best"]["name"], halved["best"]["epoch"])
    assert chosen["test_acc"] == halved["best"]["test_acc"]
