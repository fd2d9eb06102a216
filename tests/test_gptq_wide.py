"""gptq on layers wider than ``MAX_WIDTH`` columns: swept in equal column chunks, each with its own diagonal block
of the Hessian. Oracle: the same weight split by hand into narrower layers whose outputs are summed — GPTQ on
each narrow layer sees exactly one chunk's inputs, so its codes must be the wide layer's codes for that chunk,
bit for bit (block grids: a block's scale depends on its own weights only, so the grids agree too). Also: a
layer with no equal split is rounded to nearest, the chunked sweep still beats round-to-nearest, and a layer
within the width is not chunked."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _graphs import Builder, vi
from onnx import numpy_helper
from test_gptq import INT4_BLOCK, INT4_PC, _compile, _sqnr, correlated, plan, smooth_maps

from qcompiler.passes import _gptq_rows, gptq

#: without `lower`: the codes and scales gptq chose stay in DequantizeLinear initializers
PIPELINE = "cleanup,fold-batchnorm,fuse-activations,cleanup,resolve-plan,calibrate,gptq,insert-qdq"


@pytest.fixture(autouse=True)
def no_gptq_caches():
    from qcompiler.passes import _gptq_cache

    _gptq_cache.reset_caches(0, 0)
    yield
    _gptq_cache.reset_caches()


def gptq_stats(res) -> dict[str, int]:
    return dict(next(r for r in res.records if r.name == "gptq").stats)


def weight_codes(path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{reading node: (codes, scale)} of every DequantizeLinear of a stored weight."""
    m = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    readers = {x: n.name for n in m.graph.node for x in n.input}
    out = {}
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            out[readers[n.output[0]]] = (inits[n.input[0]].astype(np.int8), inits[n.input[1]])
    return out


def wide_matmul(w: np.ndarray) -> onnx.ModelProto:
    b = Builder(31)
    b.node("MatMul", ["x", b.init("w", w)], ["y"], name="mm")
    return b.model([vi("x", ["N", w.shape[0]])], [vi("y", ["N", w.shape[1]])])


def split_matmul(w: np.ndarray, parts: int) -> onnx.ModelProto:
    """``x @ w`` as ``sum_i x[:, chunk i] @ w[chunk i]``."""
    b = Builder(32)
    kc = w.shape[0] // parts
    ys = []
    for i in range(parts):
        st, en, ax = (b.init(f"{t}{i}", np.array([v], np.int64)) for t, v in
                      (("s", i * kc), ("e", (i + 1) * kc), ("a", -1)))
        b.node("Slice", ["x", st, en, ax], [f"x{i}"], name=f"slice{i}")
        b.node("MatMul", [f"x{i}", b.init(f"w{i}", w[i * kc:(i + 1) * kc])], [f"y{i}"], name=f"mm{i}")
        ys.append(f"y{i}")
    b.node("Sum", ys, ["y"], name="sum")
    return b.model([vi("x", ["N", w.shape[0]])], [vi("y", ["N", w.shape[1]])])


def test_wide_matmul_codes_are_the_hand_split_layers_codes(tmp_path, monkeypatch):
    monkeypatch.setattr(gptq, "MAX_WIDTH", 32)
    w = Builder(5).randn(64, 48, scale=0.2)
    calib = correlated(48, (16, 64), 1, seed=7)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, wide, res = _compile(tmp_path / "a", wide_matmul(w), calib, plan(INT4_BLOCK), "wide", PIPELINE)
    assert gptq_stats(res)["chunked_layers"] == 1
    _, narrow, res_b = _compile(tmp_path / "b", split_matmul(w, 2), calib, plan(INT4_BLOCK), "narrow", PIPELINE)
    assert "chunked_layers" not in gptq_stats(res_b) and res_b.report["gptq"]["layers"] == 2
    a, b = weight_codes(wide), weight_codes(narrow)
    q, s = a["mm"]
    assert q.shape == (64, 48) and s.shape == (4, 48)
    np.testing.assert_array_equal(q, np.concatenate([b["mm0"][0], b["mm1"][0]]))
    np.testing.assert_array_equal(s, np.concatenate([b["mm0"][1], b["mm1"][1]]))
    # the proxy losses are the chunks' sums: those of the two narrow layers
    for key in ("proxy_loss_gptq", "proxy_loss_round_to_nearest"):
        assert res.report["gptq"][key] == pytest.approx(res_b.report["gptq"][key], rel=1e-9)


def wide_conv(w: np.ndarray) -> onnx.ModelProto:
    b = Builder(33)
    b.node("Conv", ["x", b.init("w", w)], ["y"], name="conv", pads=[1, 1, 1, 1])
    return b.model([vi("x", ["N", 16, 12, 10])], [vi("y", ["N", 8, 12, 10])])


def tap_rows_conv(w: np.ndarray) -> onnx.ModelProto:
    """The 3x3 Conv as three 1x3 Convs, one per kernel row r, on the padded input's rows r .. r + H, summed: the
    chunks of whole taps the wide layer is swept in (columns ordered (tap, in): kernel row r is chunk r)."""
    b = Builder(34)
    b.node("Pad", ["x", b.init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], ["xp"], name="pad")
    ys = []
    for r in range(3):
        st, en, ax = (b.init(f"{t}{r}", np.array([v], np.int64)) for t, v in (("s", r), ("e", r + 12), ("a", 2)))
        b.node("Slice", ["xp", st, en, ax], [f"x{r}"], name=f"slice{r}")
        b.node("Conv", [f"x{r}", b.init(f"w{r}", np.ascontiguousarray(w[:, :, r:r + 1, :]))], [f"y{r}"],
               name=f"conv{r}")
        ys.append(f"y{r}")
    b.node("Sum", ys, ["y"], name="sum")
    return b.model([vi("x", ["N", 16, 12, 10])], [vi("y", ["N", 8, 12, 10])])


def test_wide_conv_is_swept_in_chunks_of_whole_taps(tmp_path, monkeypatch):
    monkeypatch.setattr(gptq, "MAX_WIDTH", 60)  # K = 9 taps x 16 = 144 -> 3 chunks of 3 taps (48 columns)
    monkeypatch.setattr(gptq, "SHIFTED_GRAM", False)  # the 1x3 Convs from unfolded rows, as the chunks are
    w = Builder(6).randn(8, 16, 3, 3, scale=0.2)
    calib = smooth_maps(24, seed=8)
    block16 = {**INT4_BLOCK, "block_size": 8}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _, wide, res = _compile(tmp_path / "a", wide_conv(w), calib, plan(block16), "wide", PIPELINE)
    assert gptq_stats(res)["chunked_layers"] == 1
    _, narrow, _ = _compile(tmp_path / "b", tap_rows_conv(w), calib, plan(block16), "narrow", PIPELINE)
    a, b = weight_codes(wide), weight_codes(narrow)
    q, s = a["conv"]
    assert q.shape == (8, 16, 3, 3) and s.shape == (8, 2, 3, 3)
    np.testing.assert_array_equal(q, np.concatenate([b[f"conv{r}"][0] for r in range(3)], axis=2))
    np.testing.assert_array_equal(s, np.concatenate([b[f"conv{r}"][1] for r in range(3)], axis=2))


@pytest.mark.parametrize("options", [True, {"max_rows": 512}], ids=["every_row", "max_rows"])
def test_chunked_sweep_still_beats_round_to_nearest(tmp_path, monkeypatch, options):
    """Per-channel grids (fixed from the whole weight) on a MatMul of 96 columns in 3 chunks: the chunked GPTQ
    keeps most of the full sweep's gain over round-to-nearest on held-out inputs (also with rows drawn per
    sample, whose unfolded rows are chunked the same way)."""
    w = Builder(7).randn(96, 40, scale=0.2)
    calib = correlated(64, (16, 96), 1, seed=9)
    feeds = [{"x": f} for f in correlated(24, (16, 96), 1, seed=10)]
    src, rtn, _ = _compile(tmp_path, wide_matmul(w), calib, plan(INT4_PC, gptq=False), "rtn")
    _, full, _ = _compile(tmp_path, wide_matmul(w), calib, plan(INT4_PC, gptq=options), "full")
    monkeypatch.setattr(gptq, "MAX_WIDTH", 32)
    _, chunked, res = _compile(tmp_path, wide_matmul(w), calib, plan(INT4_PC, gptq=options), "chunked")
    assert gptq_stats(res)["chunked_layers"] == 1
    s_rtn, s_full, s_chunked = (_sqnr(src, p, feeds) for p in (rtn, full, chunked))
    assert s_chunked >= s_rtn + 3.0, (s_rtn, s_chunked, s_full)
    assert s_chunked <= s_full + 0.5, (s_chunked, s_full)  # the full H sees every correlation
    rep = res.report["gptq"]
    assert rep["proxy_loss_gptq"] < 0.5 * rep["proxy_loss_round_to_nearest"]


def test_layer_with_no_equal_split_is_rounded_to_nearest(tmp_path, monkeypatch):
    """K = 60 with blocks of 16 (the last block partial): no equal chunks of whole blocks under 32 columns. The
    layer keeps round-to-nearest codes, the same as a compile without gptq."""
    monkeypatch.setattr(gptq, "MAX_WIDTH", 32)
    w = Builder(8).randn(60, 24, scale=0.2)
    calib = correlated(32, (16, 60), 1, seed=11)
    _, rtn, _ = _compile(tmp_path, wide_matmul(w), calib, plan(INT4_BLOCK, gptq=False), "rtn", PIPELINE)
    _, gq, res = _compile(tmp_path, wide_matmul(w), calib, plan(INT4_BLOCK), "gq", PIPELINE)
    assert gptq_stats(res)["skipped_too_wide"] == 1
    np.testing.assert_array_equal(weight_codes(rtn)["mm"][0], weight_codes(gq)["mm"][0])


@pytest.mark.parametrize(("k", "in_g", "taps", "block", "width", "want"), [
    (64, 64, 1, None, 64, 1),  # within the width: one H
    (25088, 25088, 1, None, 8192, 4),  # VGG's fc6: 4 chunks of 6272
    (25088, 25088, 1, 128, 8192, 4),  # and on blocks of 128
    (4608, 512, 9, None, 4096, 3),  # 3x3 Conv, 512 channels: 3 chunks of 3 taps
    (9 * 8192, 8192, 9, None, 4096, None),  # one tap is wider than the limit
    (60, 60, 1, 16, 32, None),  # partial last block
    (7 * 11, 77, 1, None, 10, 11),  # the fewest equal chunks that fit: 11 of 7
])
def test_chunk_count(k, in_g, taps, block, width, want):
    assert _gptq_rows._chunk_count(k, in_g, taps, block, width) == want


def test_hessian_waves_give_the_same_file(tmp_path, monkeypatch):
    """Layers whose Hessians exceed ``MAX_WAVE_BYTES`` together are accumulated in waves (one pass over the data
    each, released once swept): every layer's H is the same sum over the same samples, so the file is the same."""
    from _graphs import gptq_chain_model

    calib = correlated(24, (1, 8, 10, 10), 1, seed=12)
    model = gptq_chain_model(3)
    _, one, res_one = _compile(tmp_path, model, calib, plan(INT4_PC), "one")
    assert "hessian_waves" not in gptq_stats(res_one) and res_one.report["gptq"]["layers"] >= 2
    monkeypatch.setattr(gptq, "MAX_WAVE_BYTES", 1)  # every layer a wave of its own
    _, waves, res = _compile(tmp_path, model, calib, plan(INT4_PC), "waves")
    assert gptq_stats(res)["hessian_waves"] == res.report["gptq"]["layers"]
    assert one.read_bytes() == waves.read_bytes()
    assert res.report["gptq"] == res_one.report["gptq"]


@pytest.mark.parametrize(("sizes", "budget", "want"), [
    ([4, 4, 4], 12, [[0, 1, 2]]),  # all fit: one wave
    ([4, 4, 4], 8, [[0, 1], [2]]),
    ([20, 1, 1], 8, [[0], [1, 2]]),  # a layer over the budget alone
    ([5, 0, 0, 5], 5, [[0, 1, 2], [3]]),  # cached sweeps cost nothing
])
def test_waves(sizes, budget, want):
    assert gptq._waves(sizes, budget) == want
