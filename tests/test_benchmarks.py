"""Smoke test of the benchmarks: every stage runs on tiny models and a few images, so that they cannot rot.

Nothing here checks speed: only that each benchmark produces its numbers, the JSON, the markdown and the
plots (``python -m benchmarks.run --preset tiny``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report, run
from benchmarks.peers import PeerContext, build_peer


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench-results")
    result = run.main(["--preset", "tiny", "--out", str(out)])
    return out, result


def test_tiny_run_writes_json_markdown_and_plots(tiny_result: tuple[Path, dict]) -> None:
    out, result = tiny_result
    saved = json.loads((out / "tiny-cpu.json").read_text())
    assert saved["preset"]["name"] == "tiny"
    assert set(saved["models"]) == {"tiny_vit"}
    readme = (out / "README.md").read_text()
    assert "## tiny-cpu" in readme and "### Targets (tiny_vit)" in readme and "Accuracy on real data" in readme
    assert (out / "tiny-cpu.png").stat().st_size > 1000
    assert (out / "tiny-cpu-accuracy.png").stat().st_size > 1000


def test_every_peer_measured(tiny_result: tuple[Path, dict]) -> None:
    _, result = tiny_result
    for model in ("tiny_vit",):
        steps = result["models"][model]["steps"]
        assert set(run.STEP_PEERS) <= set(steps)
        for name, row in steps.items():
            assert row["samples_per_s"] > 0 and row["trainable_params"] > 0, name
        e2e = result["models"][model]["end_to_end"]["rows"]
        assert e2e["featcache-last"]["how"].startswith("real") and e2e["lora"]["total_s"] > 0
    vit = result["models"]["tiny_vit"]
    mem = vit["memory"]["featcache-last@stream"]
    assert "error" not in mem and mem["peak_rss_mb"] >= mem["baseline_rss_mb"] > 0
    assert vit["limits"]["compute"]["last"]["achieved_gflops"] > 0
    assert vit["limits"]["reader"]["ram"]["reader_mb_s"] > 0
    assert vit["sweep"]["ratio"] > 0


def test_accuracy_rows(tiny_result: tuple[Path, dict]) -> None:
    _, result = tiny_result
    acc = result["accuracy"][0]
    assert set(acc["rows"]) == {"featcache-linear", "featcache-last", "featcache-lst", "full-ft", "lora"}
    for row in acc["rows"].values():
        assert 0.0 <= row["test_acc"] <= 1.0
    assert acc["rows"]["full-ft"]["budget_s"] == pytest.approx(acc["budget_s"])


def test_report_renders_again_from_json(tiny_result: tuple[Path, dict]) -> None:
    out, _ = tiny_result
    (out / "README.md").unlink()
    (out / "unrelated.json").write_text('{"benchmark": "extract"}')  # others' result files are skipped
    path = report.write_reports(out)
    assert "## tiny-cpu" in path.read_text()


def test_peer_names() -> None:
    ctx = PeerContext(model="tiny_vit", batch_size=4, device="cpu")
    with pytest.raises(ValueError, match="unknown peer"):
        build_peer("adapter", ctx)


def test_run_cut_short_keeps_finished_stages_and_sweep_loop_shares_one_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import sweeps

    readers: list[set[int]] = []

    def sweep_then_die(ctx: PeerContext, k: int, *args: object, **kwargs: object) -> dict:
        loop = sweeps.LoopBank(ctx, "last", 3)  # a resident reader each would hold the split 3 times
        readers.append({id(p.reader) for p in loop.peers})
        loop.step()
        raise MemoryError("simulated: killed during the sweep")

    monkeypatch.setattr(sweeps, "measure_sweep", sweep_then_die)
    with pytest.raises(MemoryError, match="simulated"):
        run.main(["--preset", "tiny", "--skip", "accuracy", "--out", str(tmp_path)])
    assert len(readers) == 1 and len(readers[0]) == 1
    saved = json.loads((tmp_path / "tiny-cpu.json").read_text())
    vit = saved["models"]["tiny_vit"]
    assert saved["complete"] is False and "sweep" not in vit
    assert set(run.STEP_PEERS) <= set(vit["steps"]) and vit["end_to_end"]["rows"]["featcache-last"]["total_s"] > 0
    assert vit["limits"]["compute"]["last"]["achieved_gflops"] > 0 and "featcache-last@stream" in vit["memory"]
    readme = report.write_reports(tmp_path).read_text()
    assert "**Incomplete**" in readme and "| featcache-last |" in readme
    del vit["end_to_end"]  # cut short before the end-to-end stage: the tables still render
    (tmp_path / "tiny-cpu.json").write_text(json.dumps(saved))
    readme = report.write_reports(tmp_path).read_text()
    assert "| featcache-last |" in readme and "epochs on" not in readme.split("### Targets")[-1]


def test_accuracy_stage_cut_short_is_continued_by_a_second_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 60k/10k size takes longer than a session: a run stopped in its peers is continued with --merge, which
    keeps the rows and store of the first run and runs only what is missing, on the first run's budget."""
    from benchmarks import accuracy
    from benchmarks.peers import LoraPeer

    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--preset", "tiny", "--skip", "models", "--out", str(out), "--workdir", str(work), "--merge"]
    real_finetune, real_build, real_side = accuracy.finetune, accuracy.build_store, accuracy.side_methods

    def session_ends_in_lora(peer: object, *a: object, **k: object) -> dict:
        if isinstance(peer, LoraPeer):
            raise RuntimeError("simulated: the session ended")
        return real_finetune(peer, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(accuracy, "finetune", session_ends_in_lora)
    with pytest.raises(RuntimeError, match="simulated"):
        run.main(args)
    first = json.loads((out / "tiny-cpu.json").read_text())
    acc = first["accuracy"][0]
    assert first["complete"] is False and acc["complete"] is False
    assert set(acc["rows"]) == {"featcache-linear", "featcache-last", "featcache-lst", "full-ft"}
    side = {k: r for k, r in acc["rows"].items() if k.startswith("featcache-")}
    chosen = max(side, key=lambda k: side[k]["val_acc"])  # the peers' budget: featcache's entry chosen on validation
    assert acc["budget_s"] == pytest.approx(acc["store"]["seconds"]["train"] + side[chosen]["train_s"])
    assert acc["budget_from"].startswith(chosen)
    assert Path(acc["store"]["path"]).is_dir()
    assert "**Incomplete**: the rows below" in report.write_reports(out).read_text()

    built: list[object] = []
    trained: list[object] = []
    monkeypatch.setattr(accuracy, "finetune", real_finetune)
    monkeypatch.setattr(accuracy, "build_store", lambda *a, **k: built.append(a) or real_build(*a, **k))
    monkeypatch.setattr(accuracy, "side_methods", lambda *a, **k: trained.append(a) or real_side(*a, **k))
    second = run.main(args)
    acc2 = second["accuracy"][0]
    assert built == [] and trained == []  # the first run's store and side networks are reused as they were
    assert second["complete"] is True and acc2["complete"] is True and len(second["accuracy"]) == 1
    assert acc2["sessions"] == 2 and acc2["started"] == acc["started"]
    assert {k: acc2["rows"][k] for k in acc["rows"]} == acc["rows"]
    assert (
        acc2["rows"]["lora"]["budget_s"] == pytest.approx(acc["budget_s"])
        and 0 <= acc2["rows"]["lora"]["test_acc"] <= 1
    )
    assert not Path(acc["store"]["path"]).exists()  # removed once the size is complete
    readme = report.write_reports(out).read_text()
    assert "measured in 2 runs" in readme and "| lora |" in readme and "**Incomplete**" not in readme
    starts = ", ".join(second["merged_from"])  # the header names both runs, not only the latest start
    assert f"measured in 2 runs merged with --merge (started {starts})" in readme and starts.count(":") == 4

    third = run.main(args)  # a complete size is measured afresh, not continued
    assert third["accuracy"][0]["sessions"] == 1 and len(third["accuracy"]) == 1
