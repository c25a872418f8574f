"""The extraction benchmark runs on tiny models, so that it cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_extract


def test_extract_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "extract.json"
    payload = bench_extract.main(
        [
            "extract",
            "--tiny",
            "--models",
            "test_vit",
            "--images",
            "8",
            "--batch-size",
            "4",
            "--rounds",
            "1",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    result = saved["results"]["test_vit"]
    assert saved == json.loads(json.dumps(payload))
    assert result["bare_forward_median"] > 0 and result["extract_median"] > 0
    assert result["ratio"] == result["extract_median"] / result["bare_forward_median"]
    assert len(result["bare_forward_img_s"]) == len(result["extract_img_s"]) == 1


def test_codecs_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "codecs.json"
    bench_extract.main(["codecs", "--tiny", "--images", "8", "--rounds", "1", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert set(rows) == {"auto", "none", "lz4", "zstd"}
    assert all(r["write_mb_s"] > 0 and r["read_mb_s"] > 0 and r["ratio"] > 0 for r in rows.values())
