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
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
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
