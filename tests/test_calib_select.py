"""calib-select (``--calib-select N``): density + diversity selection of calibration samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner

from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli import cli
from qcompiler.passes.calib_select import select
from qcompiler.report import validate as qv

MODELS = Path(__file__).resolve().parents[1] / "models"


def clusters() -> tuple[np.ndarray, np.ndarray]:
    """A dense cluster (120 points), a medium one (40), a small one (12) and two far outliers, in 6-D."""
    rng = np.random.default_rng(0)
    centers = np.zeros((3, 6))
    centers[1, 0] = 8.0
    centers[2, 1] = 8.0
    sizes = [120, 40, 12]
    pts = [centers[i] + rng.standard_normal((n, 6)) for i, n in enumerate(sizes)]
    pts.append(np.array([[40.0, 40, 0, 0, 0, 0], [-30.0, 25, 0, 0, 0, 0]]))
    labels = np.concatenate([np.full(n, i) for i, n in enumerate([*sizes, 2])])
    order = rng.permutation(len(labels))
    return np.concatenate(pts)[order], labels[order]


def test_selection_covers_every_cluster_and_favours_density():
    feats, labels = clusters()
    chosen = select(feats, 12, density_weight=0.5)
    assert chosen == sorted(chosen) and len(set(chosen)) == 12
    picked = np.bincount(labels[chosen], minlength=4)
    assert all(picked[:3] >= 1), picked  # diversity: every mode of the distribution is represented
    assert picked[0] == picked.max(), picked  # density: the dense mode gets the most samples
    assert select(feats, 12, density_weight=0.5) == chosen  # deterministic
    # density only: everything from the dense cluster; diversity only: the outliers come first
    assert set(labels[select(feats, 12, density_weight=1.0)]) == {0}
    assert np.bincount(labels[select(feats, 4, density_weight=0.0)], minlength=4)[3] == 2
    assert select(feats, 500) == list(range(len(labels)))


def test_penultimate_feature_and_bad_feature_name(tmp_path):
    pool, _ = _pool(tmp_path)
    src = MODELS / "conv_bn_relu.onnx"
    res = compile_model(src, tmp_path / "q.onnx", CompileOptions(
        calib=str(pool), validate=False, pipeline="cleanup,fold-batchnorm,cleanup,resolve-plan,"
        "calib-select{n=6,feature=penultimate},calibrate,insert-qdq,lower"))
    rep = res.report["calib_select"]
    assert rep["selected"] == 6 and rep["feature"] != "ranges" and sum(i < 8 for i in rep["indices"]) <= 2
    r = CliRunner().invoke(cli, ["compile", str(src), "-o", str(tmp_path / "q2.onnx"), "--calib", str(pool),
                                 "--pipeline", "cleanup,resolve-plan,calib-select{n=4,feature=nope},calibrate,"
                                 "insert-qdq"])
    assert r.exit_code == 2 and "no activation tensor named 'nope'" in r.output


def _pool(tmp_path: Path) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """conv_bn_relu's samples: a pool whose first 8 samples are nearly black images (unrepresentative), then
    24 real ones; the fixture's last 8 samples are held out."""
    x = np.load(MODELS / "conv_bn_relu.npz")["input"]
    dark = x[:8] * 0.05
    pool = np.concatenate([dark, x[:24]])
    np.savez(tmp_path / "pool.npz", input=pool)
    return tmp_path / "pool.npz", [{"input": s} for s in x[24:]]


def test_selection_beats_the_first_n_samples(tmp_path):
    pool, held_out = _pool(tmp_path)
    src = MODELS / "conv_bn_relu.onnx"
    sq = {}
    for tag, kw in (("first8", {"calib_samples": 8}), ("select8", {"calib_select": 8}), ("all", {})):
        out = tmp_path / f"{tag}.onnx"
        res = compile_model(src, out, CompileOptions(calib=str(pool), validate=False, **kw))
        sq[tag] = qv.validate(src, out, held_out, per_layer=False).outputs[0].sqnr_db
        if tag == "select8":
            rep = res.report["calib_select"]
            assert rep["pool"] == 32 and rep["selected"] == 8 and len(rep["indices"]) == 8
            assert sum(i < 8 for i in rep["indices"]) <= 2  # at most a couple of the dark images
            assert res.report["calibration"]["samples"] == 8
            assert "resolve-plan,calib-select{n=8},calibrate" in res.pipeline
    # measured: first 8 (the dark ones) -0.4 dB, 8 selected 20.5 dB, all 32: 29.5 dB (8 random ones: median
    # 19.7 dB over 8 draws; minmax ranges hinge on whether a subset holds each tensor's extreme sample)
    assert sq["select8"] >= sq["first8"] + 15.0, sq


def test_calib_select_needs_real_data(tmp_path):
    r = CliRunner().invoke(cli, ["compile", str(MODELS / "conv_bn_relu.onnx"), "-o", str(tmp_path / "q.onnx"),
                                 "--calib", "random", "--calib-select", "4"])
    assert r.exit_code == 2 and "--calib-select needs" in r.output
    assert not (tmp_path / "q.onnx").exists()
