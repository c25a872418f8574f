"""The I/O benchmark runs end to end on tiny stores and reports every row its tables and targets need."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_io


@pytest.mark.slow
def test_io_benchmark_smoke(tmp_path: Path) -> None:
    r = bench_io.main(
        [
            "--smoke",
            "--stores",
            "vit_s-compact,effnet-compact",
            "--stages",
            "ingest,delivery,remote,stall",
            "--workdir",
            str(tmp_path),
            "--stall-images",
            "64",
        ]
    )
    assert (
        set(r["ingest"])
        == set(r["delivery"])
        == set(r["remote"])
        == set(r["stall"])
        == {"vit_s-compact", "effnet-compact"}
    )
    for row in r["ingest"].values():
        assert row["encoded"]["gb_s"] > 0 and row["cpu_encode"]["gb_s"] > 0 and row["stored_bytes"] > 0
    assert r["ingest"]["effnet-compact"]["compressors"]["head"] == "lz4"  # the sparse tap is compressed by auto
    assert r["ingest"]["vit_s-compact"]["compressors"]["block2"] == "none"
    for row in r["delivery"].values():
        for case in ("stream", "ram", "numpy_copy", "decode_loop", "file_reads", "file_reads_cold", "zarr_shards"):
            assert row[case]["gb_s"] > 0, case
        assert row["first_batch_s"] > 0
    assert all(0 < v["remote_vs_local"] for v in r["remote"].values())
    assert r["extraction_cores"]["cores"] > 0 and len(r["targets"]) >= 10
    assert not any(tmp_path.glob("*.zarr"))  # each store deleted after its stages
