"""Plots: inspect --plot draws per-tap token norms and labels; the norms it reports are right."""

from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner

from featcache.backbone import Backbone
from featcache.cli import app
from featcache.manifest import BackboneSpec
from featcache.store.describe import describe_store

from .conftest import TINY_VIT, make_separable_images, write_tap_store


def test_inspect_plot_and_token_norms(tmp_path) -> None:
    imgs, labels = make_separable_images(20, classes=3)
    _, taps = write_tap_store(tmp_path / "s.zarr", Backbone(BackboneSpec(**TINY_VIT)), imgs, labels, dtype="float32")
    d = describe_store(str(tmp_path / "s.zarr"), stats=True)
    got = d["splits"]["train"]["taps"]["block3"]["stats"]["token_norm_mean"]
    want = float(torch.linalg.vector_norm(taps["block3"], dim=-1).mean())
    assert np.isclose(got, want, rtol=1e-5)
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "s.zarr"), "--plot", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "p.png").stat().st_size > 10_000
