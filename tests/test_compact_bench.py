"""The compact-cache benchmark (issue 21) runs on tiny models, so that it cannot rot: every variant gets every
column, the sizes say what each variant stores, and the markdown has the targets table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_compact, report

VARIANTS = list(bench_compact.DEFAULT_VARIANTS)
pytestmark = pytest.mark.slow  # ~1 min of CPU, most of it the six memory subprocesses' imports


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compact-bench")
    result = bench_compact.main(["--smoke", "--models", "tiny_vit", "--out", str(out / "compact")])
    return out, result


def test_every_variant_has_every_column(smoke: tuple[Path, dict]) -> None:
    out, result = smoke
    saved = json.loads((out / "compact.json").read_text())
    assert saved == json.loads(json.dumps(result)) and saved["complete"]
    speed, mem, acc = saved["speed"]["tiny_vit"], saved["memory"]["tiny_vit"], saved["accuracy"]
    assert speed["complete"] and mem["complete"] and acc["complete"]
    for stage in ("extraction", "size", "stream"):
        assert list(speed[stage]) == VARIANTS, stage
    assert list(speed["steps"]["variants"]) == VARIANTS and speed["steps"]["lora"]["samples_per_s"] > 0
    assert list(mem["rows"]) == ["lora", *VARIANTS] and list(acc["variants"]) == VARIANTS
    for v in VARIANTS:
        ex, st, step, m = speed["extraction"][v], speed["stream"][v], speed["steps"]["variants"][v], mem["rows"][v]
        assert ex["median_images_per_s"] > 0 and ex["median_steady_images_per_s"] > 0 and ex["vs_base"] > 0
        assert st["samples_per_s"] > 0 and st["samples"] == 40 and st["vs_base"] > 0
        assert step["samples_per_s"] > 0 and step["vs_lora"] > 0 and step["config"]["gap"] == bench_compact.LAST_GAP
        assert "error" not in m and m["reader"] == "ram" and m["vs_lora"] > 0  # auto picks ram for a small split
        a = acc["variants"][v]
        assert [x["seed"] for x in a["members"]] == [0, 1]
        assert all(0 <= x["test_acc"] <= 1 and 0 <= x["val_acc"] <= 1 for x in a["members"])
        assert a["mean_test_acc"] == pytest.approx(sum(x["test_acc"] for x in a["members"]) / 2)
        assert a["size"]["stored_bytes_per_sample"] > 0 and "test_delta_points" in a
    assert speed["extraction"]["fp16-all"]["vs_base"] == 1.0 and acc["variants"]["fp16-all"]["test_delta_points"] == 0


def test_sizes_say_what_each_variant_stores(smoke: tuple[Path, dict]) -> None:
    _, result = smoke
    speed = result["speed"]["tiny_vit"]
    size = speed["size"]
    base, int8, pool2, every2 = (size[k] for k in ("fp16-all", "int8", "pool2", "every2"))
    assert base["stored_ratio_vs_base"] == 1.0 and "max_quantization_rel_rms" not in base
    # int8: the same taps and tokens, one byte per channel and a float16 scale per token row
    assert int8["taps"].keys() == base["taps"].keys()
    assert int8["bytes_per_sample"] == sum(t["tokens"] * (t["channels"] + 2) for t in base["taps"].values())
    assert 0 < int8["max_quantization_rel_rms"] < 0.01 and 0 < size["compact"]["max_quantization_rel_rms"] < 0.01
    assert all(pool2["taps"][n]["tokens"] < t["tokens"] for n, t in base["taps"].items())
    # every:2 keeps exactly the taps LAST (gap 2) reads; the stream reader read those from every store
    assert list(every2["taps"]) == speed["stream"]["fp16-all"]["taps"] == speed["stream"]["every2"]["taps"]
    assert list(size["compact"]["taps"]) == list(every2["taps"])
    assert all(
        size["compact"]["raw_ratio_vs_base"] > size[k]["raw_ratio_vs_base"] > 1 for k in ("int8", "pool2", "every2")
    )


def test_markdown_has_tables_targets_and_command(smoke: tuple[Path, dict]) -> None:
    out, _ = smoke
    md = (out / "compact.md").read_text()
    assert "## test_vit 32px (tiny, random)" in md and "## Accuracy (honest protocol)" in md
    targets = md.split("## Targets", 1)[1].split("## Commands", 1)[0]
    rows = [ln for ln in targets.splitlines() if ln.startswith("| ") and not ln.startswith("| target")]
    assert len(rows) == 7  # bytes x2, accuracy x2, memory, stream (one backbone), LAST step vs LoRA
    assert all(ln.rstrip(" |").endswith(("met", "**not met**")) for ln in rows)  # all measured, even in the smoke run
    for v in VARIANTS:
        assert f"| {v} |" in md
    assert "python -m benchmarks.bench_compact --smoke" in md
    assert report.load_results(out) == {}  # benchmarks.report does not mistake it for a benchmarks.run result


def test_resume_keeps_what_an_earlier_run_of_the_same_sizes_finished(smoke: tuple[Path, dict], tmp_path: Path) -> None:
    out, result = smoke
    (tmp_path / "compact.json").write_text((out / "compact.json").read_text())
    again = bench_compact.main(["--smoke", "--models", "tiny_vit", "--out", str(tmp_path / "compact"), "--resume"])
    for stage in ("speed", "memory"):
        assert again[stage]["tiny_vit"] == json.loads(json.dumps(result[stage]["tiny_vit"])), (
            stage
        )  # nothing re-measured
    assert again["accuracy"] == json.loads(json.dumps(result["accuracy"])) and again["complete"]
    # a command that does other stages keeps these entries as they are (a long run split into several commands) ...
    other = bench_compact.main(
        [
            "--smoke",
            "--models",
            "tiny_vit",
            "--out",
            str(tmp_path / "compact"),
            "--resume",
            "--stages",
            "",
            "--epochs",
            "2",
        ]
    )
    assert other["accuracy"] == again["accuracy"] and other["speed"]["tiny_vit"] == again["speed"]["tiny_vit"]
    # ... but a stage it does is measured again unless the earlier entry has the same sizes
    _, two_epochs = bench_compact.parse_args(["--smoke", "--epochs", "2"])
    _, same = bench_compact.parse_args(["--smoke", "--models", "tiny_vit"])
    assert bench_compact.kept(again, two_epochs, "accuracy") is None
    assert bench_compact.kept(again, same, "accuracy") == again["accuracy"]


def test_first_seed_moves_the_accuracy_seeds() -> None:
    _, s = bench_compact.parse_args(["--first-seed", "2", "--seeds", "3"])
    assert bench_compact.seed_list(s) == [2, 3, 4]
    assert s.sizes("accuracy")["first_seed"] == 2  # a --resume of seeds 0, 1 does not keep them as seeds 2, 3
    assert bench_compact.seed_list({"seeds": 2}) == [0, 1]  # settings recorded before first_seed existed
    assert "first_seed" not in bench_compact.parse_args([])[1].sizes("accuracy")  # so their --resume still matches
