"""Calibration: data loading and validation, the range observers, and the collector / calibrate pass."""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.calib import (
    WORKERS_ENV,
    CalibrationSource,
    InputSig,
    TensorStats,
    calibration_workers,
    collect,
    held_back_indices,
    input_signatures,
    random_source,
)
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.passes.calibrate import CalibratePass
from qcompiler.plan import QuantSpec

F32 = TensorProto.FLOAT


# ------------------------------------------------------------------------------------------------ graphs
def conv_relu_model(dynamic_batch: bool = True) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.5).astype(np.float32)
    b = (rng.standard_normal(4) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    batch = "N" if dynamic_batch else 1
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", F32, [batch, 3, 8, 8])],
                          [helper.make_tensor_value_info("r", F32, [batch, 4, 8, 8])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def graph_of(model: onnx.ModelProto):
    return ir.import_graph(model)[0]


def reference(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], name: str) -> list[np.ndarray]:
    sess = ir.session(ir.with_outputs(model, [name]))
    return [sess.run([name], f)[0] for f in feeds]


SIG = [InputSig("x", np.dtype(np.float32), ["N", 3, 8, 8])]


def feeds(n: int, seed: int = 0, batch: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def write_folder(tmp: Path, fs: list[dict[str, np.ndarray]]) -> Path:
    d = tmp / "calib"
    d.mkdir()
    for i, f in enumerate(fs):
        np.savez(d / f"{i:03d}.npz", **f)
    return d


def collect_all(src: CalibrationSource) -> list[dict[str, np.ndarray]]:
    return [{k: v.copy() for k, v in f.items()} for f in src]


# ------------------------------------------------------------------------------------------ data loading
def test_folder_source(tmp_path):
    fs = feeds(5)
    fs[2] = {"x": fs[2]["x"].astype(np.float64)}  # cast to float32
    fs[3] = {"x": np.concatenate([fs[3]["x"]] * 2)}  # dynamic batch may differ
    d = write_folder(tmp_path, fs)
    (d / "notes.txt").write_text("ignored")
    src = CalibrationSource.from_arg(d, SIG)
    assert len(src) == 5 and not src.synthetic and "5 .npz files" in src.description
    got = collect_all(src)
    assert all(g["x"].dtype == np.float32 for g in got)
    for g, f in zip(got, fs):
        np.testing.assert_array_equal(g["x"], f["x"].astype(np.float32))
    assert len(collect_all(src)) == 5  # re-iterable
    assert len(CalibrationSource.from_arg(d, SIG, limit=2)) == 2
    assert len(collect_all(src.take(3))) == 3


@pytest.mark.parametrize("compressed", [False, True])
def test_stacked_npz_source(tmp_path, compressed):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((7, 1, 3, 8, 8)).astype(np.float32)
    p = tmp_path / "calib.npz"
    (np.savez_compressed if compressed else np.savez)(p, x=data)
    src = CalibrationSource.from_arg(p, SIG)
    assert len(src) == 7
    got = collect_all(src)
    assert len(got) == 7
    for i, g in enumerate(got):
        assert g["x"].shape == (1, 3, 8, 8)
        np.testing.assert_array_equal(g["x"], data[i])
    assert len(collect_all(src)) == 7
    assert len(collect_all(CalibrationSource.from_arg(p, SIG, limit=3))) == 3


def test_stacked_npz_two_inputs_and_fp16(tmp_path):
    sigs = [InputSig("a", np.dtype(np.float16), [1, 4]), InputSig("ids", np.dtype(np.int64), ["N", 2])]
    p = tmp_path / "s.npz"
    np.savez(p, a=np.ones((3, 1, 4), np.float32), ids=np.arange(12, dtype=np.int32).reshape(3, 2, 2))
    got = collect_all(CalibrationSource.from_arg(p, sigs))
    assert got[0]["a"].dtype == np.float16 and got[0]["ids"].dtype == np.int64
    np.testing.assert_array_equal(got[2]["ids"], [[8, 9], [10, 11]])


def test_random_source():
    sigs = [InputSig("img", np.dtype(np.float32), ["N", 3, "H", "W"]),
            InputSig("ids", np.dtype(np.int64), [None, 5]),
            InputSig("seq", np.dtype(np.float16), ["B", "S", 16])]
    src = CalibrationSource.from_arg("random", sigs, seed=3, num_random=4)
    assert src.synthetic and len(src) == 4 and "seed 3" in src.description
    a, b = collect_all(src), collect_all(src)
    assert a[0]["img"].shape == (1, 3, 32, 32) and a[0]["ids"].shape == (1, 5) and a[0]["seq"].shape == (1, 32, 16)
    assert a[0]["seq"].dtype == np.float16 and a[0]["ids"].dtype == np.int64
    for fa, fb in zip(a, b):  # deterministic
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k])
    assert not np.array_equal(a[0]["img"], a[1]["img"])
    assert len(random_source(sigs, 2, 0)) == 2
    assert len(CalibrationSource.from_arg("random", sigs, limit=3)) == 3


def test_input_signatures():
    sigs = input_signatures(graph_of(conv_relu_model()))
    assert [(s.name, s.dtype, s.shape) for s in sigs] == [("x", np.dtype(np.float32), ["N", 3, 8, 8])]


def _err(fn, *names: str) -> str:
    with pytest.raises(UserError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg
    for n in names:
        assert n in msg, msg
    return msg


def test_missing_path_and_unknown_word(tmp_path):
    _err(lambda: CalibrationSource.from_arg(tmp_path / "nope", SIG), "nope")
    _err(lambda: CalibrationSource.from_arg(tmp_path / "nope.npz", SIG), "nope.npz")
    _err(lambda: CalibrationSource.from_arg("randm", SIG), "randm", "random")
    txt = tmp_path / "data.txt"
    txt.write_text("x")
    _err(lambda: CalibrationSource.from_arg(txt, SIG), "data.txt")


def test_folder_without_npz(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    _err(lambda: CalibrationSource.from_arg(tmp_path, SIG), str(tmp_path), "no .npz")


def test_not_a_zip(tmp_path):
    d = write_folder(tmp_path, feeds(2))
    (d / "001.npz").write_bytes(b"garbage, not a zip")
    _err(lambda: CalibrationSource.from_arg(d, SIG), "001.npz", "not a valid .npz")
    p = tmp_path / "bad.npz"
    p.write_bytes(b"PK nope")
    _err(lambda: CalibrationSource.from_arg(p, SIG), "bad.npz")


def test_object_arrays_refused(tmp_path):
    d = write_folder(tmp_path, feeds(1))
    np.savez(d / "001.npz", x=np.array([{"a": 1}], dtype=object))
    _err(lambda: CalibrationSource.from_arg(d, SIG), "001.npz", "'x'", "objects")
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([[1, "a"]], dtype=object))
    _err(lambda: CalibrationSource.from_arg(p, SIG), "obj.npz", "'x'")


def test_unknown_and_missing_arrays(tmp_path):
    fs = feeds(4)
    fs[3] = {"x": fs[3]["x"], "foo": np.zeros(3, np.float32)}
    d = write_folder(tmp_path, fs)
    msg = _err(lambda: CalibrationSource.from_arg(d, SIG), "003.npz", "'foo'")
    assert "is not an input of the model (inputs: x)" in msg

    d2 = tmp_path / "d2"
    d2.mkdir()
    np.savez(d2 / "a.npz", y=np.zeros((1, 3, 8, 8), np.float32))
    _err(lambda: CalibrationSource.from_arg(d2, SIG), "a.npz", "'y'")
    two = [*SIG, InputSig("m", np.dtype(np.float32), [2])]
    np.savez(d2 / "a.npz", x=np.zeros((1, 3, 8, 8), np.float32))
    _err(lambda: CalibrationSource.from_arg(d2, two), "a.npz", "'m'")


def test_rank_dim_dtype_errors(tmp_path):
    cases = {
        "rank": (np.zeros((3, 8, 8), np.float32), ["rank"]),
        "dim": (np.zeros((1, 4, 8, 8), np.float32), ["dim 1", "needs 3"]),
        "int": (np.zeros((1, 3, 8, 8), np.int64), ["int64", "float32"]),
        "nan": (np.full((1, 3, 8, 8), np.nan, np.float32), ["NaN"]),
        # ±inf is data (attention masks; tests/robustness/test_bad_inputs.py); a finite float64 that overflows
        # float32 is not
        "overflow": (np.full((1, 3, 8, 8), 1e300, np.float64), ["beyond the range of float32"]),
    }
    for label, (arr, words) in cases.items():
        d = tmp_path / label
        d.mkdir()
        np.savez(d / "000.npz", x=np.zeros((1, 3, 8, 8), np.float32))
        np.savez(d / "001.npz", x=arr)
        _err(lambda d=d: collect_all(CalibrationSource.from_arg(d, SIG)), "001.npz", "'x'", *words)


def test_fp16_overflow_and_int_range():
    sig16 = [InputSig("x", np.dtype(np.float16), [2])]
    _err(lambda: CalibrationSource.from_feeds([{"x": np.array([1.0, 1e6], np.float32)}], sig16), "'x'", "float16")
    sig8 = [InputSig("ids", np.dtype(np.int8), [2])]
    _err(lambda: CalibrationSource.from_feeds([{"ids": np.array([1, 300])}], sig8), "'ids'", "int8")
    ok = collect_all(CalibrationSource.from_feeds([{"ids": np.array([1, 100])}], sig8))
    assert ok[0]["ids"].dtype == np.int8
    _err(lambda: CalibrationSource.from_feeds([{"ids": np.array([1.0, 2.0])}], sig8), "'ids'", "float64")


def test_stacked_errors(tmp_path):
    p = tmp_path / "s.npz"
    np.savez(p, x=np.zeros((4, 3, 8, 8), np.float32))  # missing the leading sample axis
    _err(lambda: CalibrationSource.from_arg(p, SIG), "s.npz", "'x'", "leading sample axis")
    np.savez(p, x=np.zeros((4, 1, 3, 8, 9), np.float32))
    _err(lambda: CalibrationSource.from_arg(p, SIG), "s.npz", "'x'", "dim 3")
    two = [*SIG, InputSig("m", np.dtype(np.float32), [2])]
    np.savez(p, x=np.zeros((4, 1, 3, 8, 8), np.float32), m=np.zeros((5, 2), np.float32))
    _err(lambda: CalibrationSource.from_arg(p, two), "s.npz", "'x'", "'m'", "disagree")
    data = np.zeros((4, 1, 3, 8, 8), np.float32)
    data[2, 0, 1, 2, 3] = np.nan
    np.savez(p, x=data)
    src = CalibrationSource.from_arg(p, SIG)
    msg = _err(lambda: collect_all(src), "s.npz", "sample 2", "'x'", "NaN")
    assert "(0, 1, 2, 3)" in msg
    p2 = tmp_path / "f.npz"
    np.savez(p2, x=np.zeros((2, 1, 3, 8, 8), np.int32))
    _err(lambda: CalibrationSource.from_arg(p2, SIG), "f.npz", "'x'", "int32")
    p3 = tmp_path / "t.npz"
    with zipfile.ZipFile(p3, "w") as zf:
        zf.writestr("x.npy", b"\x93NUMPY garbage")
    _err(lambda: CalibrationSource.from_arg(p3, SIG), "t.npz", "'x'")


def test_symbolic_dims_must_agree():
    sigs = [InputSig("a", np.dtype(np.float32), ["N", 2]), InputSig("b", np.dtype(np.float32), ["N", 3])]
    _err(lambda: CalibrationSource.from_feeds([{"a": np.zeros((2, 2)), "b": np.zeros((3, 3))}], sigs),
         "'a'", "'b'", "N=")


# ---------------------------------------------------------------------------------------------- observers
def spec(method: str, **kw) -> QuantSpec:
    return QuantSpec(calibration=method, **kw)


def test_minmax_exact():
    rng = np.random.default_rng(0)
    st = TensorStats()
    chunks = [rng.standard_normal(1000).astype(np.float32) * (i + 1) + i for i in range(10)]
    for c in chunks:
        st.update(c)
    allv = np.concatenate(chunks)
    assert st.min == float(allv.min()) and st.max == float(allv.max())
    assert st.range(spec("minmax")) == (float(allv.min()), float(allv.max()))
    assert st.count == 10_000 and st.samples == 10 and st.hist is None and st.nbytes == 0


def test_percentile_within_one_bin():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(1_000_000) * 2.0 + 0.5).astype(np.float32)
    st = TensorStats(histogram=True)
    for c in np.array_split(x, 7):
        st.update(c)
    w = st.bin_width
    for p in (99.0, 99.9, 99.99):
        lo, hi = st.range(spec("percentile", percentile=p))
        assert hi == -lo
        assert abs(hi - np.percentile(np.abs(x), p)) <= w
        lo, hi = st.range(spec("percentile", percentile=p, symmetric=False, dtype="uint8"))
        assert abs(lo - np.percentile(x, 100 - p)) <= w
        assert abs(hi - np.percentile(x, p)) <= w
    assert st.range(spec("percentile", percentile=100.0)) == (-st.amax, st.amax)


def test_histogram_merge_equals_concatenation():
    rng = np.random.default_rng(2)
    a = rng.standard_normal(50_000).astype(np.float32)
    b = (rng.standard_normal(50_000) * 10).astype(np.float32)  # larger range: the merge re-bins
    sa, sb, sab, sc = (TensorStats(histogram=True) for _ in range(4))
    sa.update(a)
    sb.update(b)
    sab.update(a)
    sab.update(b)
    sc.update(np.concatenate([a, b]))
    sa.merge(sb)
    for s in (sa, sab):
        assert (s.min, s.max, s.count) == (sc.min, sc.max, sc.count)
        assert s.range_exp == sc.range_exp
        np.testing.assert_array_equal(s.hist, sc.hist)
    assert sa.samples == 2
    # merging a wide histogram into a narrow one and the reverse agree
    sb2 = TensorStats(histogram=True)
    sb2.update(b)
    sa2 = TensorStats(histogram=True)
    sa2.update(a)
    sb2.merge(sa2)
    np.testing.assert_array_equal(sb2.hist, sc.hist)
    w = sc.bin_width
    p = spec("percentile", percentile=99.9)
    assert abs(sa.range(p)[1] - np.percentile(np.abs(np.concatenate([a, b])), 99.9)) <= w
    with pytest.raises(ValueError):
        TensorStats().merge(TensorStats(histogram=True))


def test_rebinning_when_range_grows():
    small = np.linspace(-1, 1, 10_001, dtype=np.float32)
    big = np.linspace(-100, 100, 10_001, dtype=np.float32)
    st = TensorStats(histogram=True)
    st.update(small)
    exp0 = st.range_exp
    st.update(big)
    assert st.range_exp > exp0
    ref = TensorStats(histogram=True)
    ref.update(np.concatenate([small, big]))
    np.testing.assert_array_equal(st.hist, ref.hist)
    assert st.hist.sum() == 20_002
    # every value lies in the bin its edges say
    edges = -2.0 ** st.range_exp + np.arange(2 * st.bins + 1) * st.bin_width
    counts, _ = np.histogram(np.concatenate([small, big]).astype(np.float64), bins=edges)
    assert np.abs(counts - st.hist).sum() <= 2  # only the inclusive last edge may differ


def test_entropy_laplacian_with_outliers():
    rng = np.random.default_rng(3)
    x = rng.laplace(size=500_000).astype(np.float32)
    x[:50] *= 40.0
    st = TensorStats(histogram=True)
    for c in np.array_split(x, 5):
        st.update(c)
    lo, hi = st.range(spec("entropy"))
    amax = float(np.abs(x).max())
    assert hi == -lo
    assert hi < 0.25 * amax
    assert hi >= np.percentile(np.abs(x), 99.0)
    # fewer levels (int4) clip harder
    assert st.range(spec("entropy", dtype="int4"))[1] < hi


def _brute_mse(x: np.ndarray, t: float, qmax: int) -> float:
    s = t / qmax
    q = np.clip(np.round(x / s), -qmax, qmax) * s
    return float(np.mean((q - x) ** 2))


@pytest.mark.parametrize("dtype,qmax", [("int8", 127), ("int4", 7)])
def test_mse_threshold_near_brute_force(dtype, qmax):
    rng = np.random.default_rng(4)
    x = rng.laplace(size=200_000).astype(np.float64)
    x[:20] *= 30
    st = TensorStats(histogram=True)
    st.update(x)
    t = st.range(spec("mse", dtype=dtype))[1]
    grid = np.linspace(0.05, np.abs(x).max(), 600)
    best = min(_brute_mse(x, g, qmax) for g in grid)
    assert _brute_mse(x, t, qmax) <= best * 1.03
    assert _brute_mse(x, t, qmax) < _brute_mse(x, float(np.abs(x).max()), qmax)


def test_mse_asymmetric_relu_like():
    rng = np.random.default_rng(5)
    y = np.maximum(rng.laplace(size=200_000), 0.0)
    y[:10] *= 40
    st = TensorStats(histogram=True)
    st.update(y)
    lo, hi = st.range(spec("mse", dtype="uint8", symmetric=False))
    assert lo == st.min == 0.0 and 0 < hi < st.max

    def err(t: float) -> float:
        s = t / 255
        return float(np.mean((np.clip(np.round(y / s), 0, 255) * s - y) ** 2))

    best = min(err(g) for g in np.linspace(0.05, y.max(), 600))
    assert err(hi) <= best * 1.03


def test_streaming_memory_constant():
    rng = np.random.default_rng(6)
    st = TensorStats(histogram=True)
    for _ in range(10):
        st.update(rng.standard_normal(1000).astype(np.float32))
    size10 = st.nbytes
    for i in range(990):
        st.update(rng.standard_normal(1000).astype(np.float32) * (1 + i % 7))
    assert st.nbytes == size10 and st.hist.shape == (2 * st.bins,) and st.samples == 1000
    assert st.bins * 2 >= 2048


def test_zero_constant_and_nonfinite():
    st = TensorStats(histogram=True)
    assert st.range(spec("percentile")) == (0.0, 0.0)
    st.update(np.zeros(100, np.float32))
    for m in ("minmax", "percentile", "entropy", "mse"):
        assert st.range(spec(m)) == (0.0, 0.0)
    c = TensorStats(histogram=True)
    c.update(np.full(100, 3.0, np.float32))
    assert c.range(spec("minmax")) == (3.0, 3.0)
    assert c.range(spec("percentile", symmetric=False, dtype="uint8")) == (3.0, 3.0)
    for m in ("entropy", "mse"):
        lo, hi = c.range(spec(m))
        assert np.isfinite([lo, hi]).all() and hi == pytest.approx(3.0, rel=0.02)
    n = TensorStats(histogram=True)
    n.update(np.array([1.0, np.nan, -2.0, np.inf], np.float32))
    assert (n.min, n.max, n.count, n.nonfinite) == (-2.0, 1.0, 2, 2)
    for m in ("minmax", "percentile", "entropy", "mse"):
        assert np.isfinite(n.range(spec(m))).all()


def test_histogram_method_without_histogram_falls_back():
    st = TensorStats()
    st.update(np.array([-1.0, 2.0]))
    assert st.range(spec("percentile")) == (-1.0, 2.0)


# ------------------------------------------------------------------------------------------------ collect
def test_collect_relu_minmax_matches_numpy():
    model = conv_relu_model()
    graph = graph_of(model)
    fs = feeds(6, batch=2)
    src = CalibrationSource.from_feeds(fs, input_signatures(graph))
    calls = []
    specs = {"r": spec("minmax", dtype="uint8", symmetric=False), "x": spec("percentile"), "c": spec("entropy")}
    stats = collect(graph, specs, src, progress=lambda d, t: calls.append((d, t)))
    outs = reference(model, fs, "r")
    allr = np.concatenate([o.ravel() for o in outs])
    assert stats["r"].range(specs["r"]) == (float(allr.min()), float(allr.max()))
    assert stats["r"].samples == 6 and stats["r"].count == allr.size and stats["r"].hist is None
    allx = np.concatenate([f["x"].ravel() for f in fs])
    assert (stats["x"].min, stats["x"].max) == (float(allx.min()), float(allx.max()))
    assert stats["c"].hist is not None
    assert calls == [(i, 6) for i in range(1, 7)]
    # batch_tensors: one pass per group, same numbers
    calls.clear()
    stats2 = collect(graph, specs, src, batch_tensors=1, progress=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (12, 12)
    for k in specs:
        assert (stats2[k].min, stats2[k].max, stats2[k].count) == (stats[k].min, stats[k].max, stats[k].count)
    with pytest.raises(ValueError):
        collect(graph, {"nope": spec("minmax")}, src)


def test_collect_names_failing_sample():
    model = conv_relu_model()
    graph = graph_of(model)
    # an unconstrained signature lets a wrong channel count through to onnxruntime
    loose = [InputSig("x", np.dtype(np.float32), [], known_rank=False)]
    src = CalibrationSource.from_feeds([{"x": np.zeros((1, 3, 8, 8), np.float32)},
                                        {"x": np.zeros((1, 5, 8, 8), np.float32)}], loose, "mem")
    _err(lambda: collect(graph, {"r": spec("minmax")}, src), "mem: sample 1", "onnxruntime")


def test_collect_from_folder_and_fp16_feed(tmp_path):
    model = conv_relu_model()
    graph = graph_of(model)
    fs = feeds(3)
    d = write_folder(tmp_path, fs)
    stats = collect(graph, {"r": spec("minmax")}, CalibrationSource.from_arg(d, input_signatures(graph)))
    allr = np.concatenate([o.ravel() for o in reference(model, fs, "r")])
    assert (stats["r"].min, stats["r"].max) == (float(allr.min()), float(allr.max()))
    # feeds typed for an fp16 interface are cast to the graph's fp32 inputs
    sig16 = [InputSig("x", np.dtype(np.float16), ["N", 3, 8, 8])]
    src16 = CalibrationSource.from_feeds([{"x": f["x"].astype(np.float16)} for f in fs], sig16)
    st16 = collect(graph, {"r": spec("minmax")}, src16)["r"]
    assert st16.max == pytest.approx(stats["r"].max, rel=1e-2)


# ------------------------------------------------------------------------------------------------- pass
def make_ctx(model: onnx.ModelProto, specs: dict[str, QuantSpec], calib=None) -> CompileContext:
    graph, meta = ir.import_graph(model)
    ctx = CompileContext(graph=graph, meta=meta, plan=None, target=None, calib=calib)  # type: ignore[arg-type]
    ctx.activation_specs = dict(specs)
    ctx.properties |= {"plan-resolved"}
    return ctx


def test_calibrate_pass_random_is_synthetic_and_idempotent(caplog):
    ctx = make_ctx(conv_relu_model(), {"r": spec("minmax"), "c": spec("percentile")})
    res = CalibratePass().run(ctx)
    assert not res.modified and res.stats["tensors"] == 2 and res.stats["samples"] == 16
    rep = ctx.report["calibration"]
    assert rep["synthetic"] is True and rep["samples"] == 16 and rep["tensors"] == 2
    assert rep["methods"] == {"minmax": 1, "percentile": 1} and "random" in rep["source"]
    assert any("synthetic" in r.getMessage() for r in caplog.records)
    first = {k: (v.min, v.max) for k, v in ctx.stats.items()}
    CalibratePass().run(ctx)
    assert {k: (v.min, v.max) for k, v in ctx.stats.items()} == first


def test_calibrate_pass_options_and_data(tmp_path):
    model = conv_relu_model()
    fs = feeds(8)
    d = write_folder(tmp_path, fs)
    graph = graph_of(model)
    src = CalibrationSource.from_arg(d, input_signatures(graph))
    ctx = make_ctx(model, {"r": spec("minmax")}, calib=src)
    factory_calls = []

    p = CalibratePass(method="percentile", percentile=99.0, samples=3)

    def factory(total):
        factory_calls.append(total)
        return lambda done, n: None

    p.progress_factory = factory
    res = p.run(ctx)
    assert factory_calls == [3]
    assert res.stats["samples"] == 3
    assert ctx.activation_specs["r"] == dataclasses.replace(spec("minmax"), calibration="percentile",
                                                            percentile=99.0)
    assert ctx.stats["r"].hist is not None and ctx.stats["r"].samples == 3
    assert ctx.report["calibration"]["synthetic"] is False
    assert ctx.report["calibration"]["methods"] == {"percentile": 1}
    with pytest.raises(UserError):
        CalibratePass.from_text_options({"method": "bogus"})
    with pytest.raises(UserError):
        CalibratePass.from_text_options({"samples": "0"})
    assert CalibratePass.from_text_options({"method": "mse"}).canonical() == "calibrate{method=mse}"


def test_calibrate_pass_no_specs():
    ctx = make_ctx(conv_relu_model(), {})
    res = CalibratePass().run(ctx)
    assert ctx.stats == {} and res.stats["tensors"] == 0 and ctx.report["calibration"]["tensors"] == 0


def test_entropy_ignores_exact_zeros_of_relu():
    rng = np.random.default_rng(7)
    y = np.maximum(rng.standard_normal(300_000), 0.0).astype(np.float32)  # half exact zeros
    st = TensorStats(histogram=True)
    st.update(y)
    assert st.zeros > 100_000
    lo, hi = st.range(spec("entropy", dtype="uint8", symmetric=False))
    assert lo == 0.0
    assert np.percentile(y, 99.0) <= hi <= st.max


# ---------------------------------------------------------------------------------- concurrent sample runs
@pytest.mark.parametrize("batch_tensors", [None, 1])
def test_collect_concurrent_runs_give_identical_statistics(batch_tensors):
    """Runs in flight on worker threads, statistics applied in sample order: every number (min, max, counts,
    zeros, histogram bins) is the same as strictly sequential collection, and progress comes in order."""
    model = conv_relu_model()
    graph = graph_of(model)
    fs = feeds(9, seed=3, batch=2)
    src = CalibrationSource.from_feeds(fs, input_signatures(graph))
    specs = {"r": spec("minmax", dtype="uint8", symmetric=False), "c": spec("entropy"), "x": spec("percentile")}
    runs = {}
    for workers in (1, 2, 3):
        calls: list[tuple[int, int]] = []
        runs[workers] = (collect(graph, specs, src, workers=workers, batch_tensors=batch_tensors,
                                 progress=lambda d, t, calls=calls: calls.append((d, t))), calls)
    groups = 1 if batch_tensors is None else 2
    for workers, (stats, calls) in runs.items():
        assert calls == [(i, 9 * groups) for i in range(1, 9 * groups + 1)], workers
        for k in specs:
            a, b = runs[1][0][k], stats[k]
            assert (a.min, a.max, a.count, a.samples, a.zeros, a.range_exp) == (b.min, b.max, b.count, b.samples,
                                                                                b.zeros, b.range_exp), (workers, k)
            assert (a.hist is None and b.hist is None) or np.array_equal(a.hist, b.hist)
    assert runs[1][0]["c"].hist is not None and runs[1][0]["c"].hist.sum() > 0


@pytest.mark.parametrize("workers", [1, 2])
def test_collect_concurrent_names_first_failing_sample(tmp_path, workers):
    """With runs in flight, the error is still the first failing sample in order — also when a later file is
    unreadable (read ahead while the failing run was in flight)."""
    model = conv_relu_model()
    graph = graph_of(model)
    loose = [InputSig("x", np.dtype(np.float32), [], known_rank=False)]
    good, bad = np.zeros((1, 3, 8, 8), np.float32), np.zeros((1, 5, 8, 8), np.float32)
    src = CalibrationSource.from_feeds([{"x": good}, {"x": good}, {"x": bad}, {"x": good}, {"x": bad}], loose, "mem")
    _err(lambda: collect(graph, {"r": spec("minmax")}, src, workers=workers), "mem: sample 2", "onnxruntime")
    d = tmp_path / "calib"
    d.mkdir()
    for i, x in enumerate([good, bad]):
        np.savez(d / f"{i:03d}.npz", x=x)
    folder = CalibrationSource.from_arg(d, loose)
    (d / "002.npz").write_bytes(b"not a zip")  # appears after the up-front check: read while sample 1 runs
    folder.files.append(d / "002.npz")
    _err(lambda: collect(graph, {"r": spec("minmax")}, folder, workers=workers), "001.npz", "onnxruntime")


def test_calibration_workers_env(monkeypatch):
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert calibration_workers() == 1
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert calibration_workers() == 3
    monkeypatch.setenv(WORKERS_ENV, "x")
    monkeypatch.delenv(WORKERS_ENV)
    assert 1 <= calibration_workers() <= 2


def test_collect_records_first_sample_shapes():
    model = conv_relu_model()
    graph = graph_of(model)
    fs = feeds(3, batch=2)
    shapes: dict = {}
    collect(graph, {"c": spec("minmax")}, CalibrationSource.from_feeds(fs, input_signatures(graph)), shapes=shapes)
    f32 = np.dtype(np.float32)
    assert shapes == {"x": ((2, 3, 8, 8), f32), "c": ((2, 4, 8, 8), f32), "r": ((2, 4, 8, 8), f32)}


def test_minmax_update_skips_zero_count_histogram_counts_it():
    x = np.array([0.0, 0.0, -1.5, 2.0, 0.0], np.float32)
    plain, hist = TensorStats(), TensorStats(histogram=True)
    for st in (plain, hist):
        st.update(x)
        st.update(np.array([[np.nan, 3.0]], np.float32))
        assert (st.min, st.max, st.count, st.samples, st.nonfinite) == (-1.5, 3.0, 6, 2, 1)
    assert plain.zeros == 0 and hist.zeros == 3
    assert hist.range(spec("minmax")) == plain.range(spec("minmax")) == (-1.5, 3.0)


def test_folder_source_direct_reads_equal_np_load(tmp_path):
    """Folder feeds are read straight from the zip members at the layout the up-front check recorded: the same
    arrays np.load gives, for every dtype / byte order / shape, stored or compressed; Fortran-order and changed
    files take the np.load path (with its checks)."""
    sigs = [InputSig("a", np.dtype(np.float32), ["N", 3]), InputSig("b", np.dtype(np.float16), [2, 2]),
            InputSig("i", np.dtype(np.int64), []), InputSig("m", np.dtype(np.bool_), [None])]
    rng = np.random.default_rng(5)
    files = {
        "000.npz": dict(a=rng.standard_normal((4, 3)).astype(np.float32), b=np.ones((2, 2), np.float16),
                        i=np.array(7, np.int32), m=rng.random(5) < 0.5),
        "001.npz": dict(a=np.zeros((0, 3), np.float32), b=rng.standard_normal((2, 2)).astype(">f2"),
                        i=np.array(-3, ">i8"), m=np.ones(1, bool)),
        "002.npz": dict(a=np.asfortranarray(rng.standard_normal((3, 3)).astype(np.float32)),
                        b=np.zeros((2, 2), np.float16), i=np.array(1, np.int64), m=np.zeros(2, bool)),
    }
    d = tmp_path / "calib"
    d.mkdir()
    for name, arrays in files.items():
        np.savez(d / name, **arrays)
    np.savez_compressed(d / "003.npz", **files["000.npz"])
    src = CalibrationSource.from_arg(d, sigs)
    assert sorted(p.name for p in src._layout) == ["000.npz", "001.npz", "003.npz"]  # Fortran order: np.load
    got = collect_all(src)
    for g, arrays in zip(got, [*files.values(), files["000.npz"]]):
        for k, v in arrays.items():
            want = np.asarray(v).astype(next(s.dtype for s in sigs if s.name == k))
            assert g[k].dtype == want.dtype and g[k].shape == want.shape and g[k].flags.writeable
            np.testing.assert_array_equal(g[k], want)
    # same header, new values: read directly; a changed header (another shape): np.load and its check
    np.savez(d / "000.npz", **{**files["000.npz"], "a": np.full((4, 3), 2.5, np.float32)})
    assert np.all(collect_all(src)[0]["a"] == 2.5)
    np.savez(d / "000.npz", **{**files["000.npz"], "a": np.zeros((4, 5), np.float32)})
    _err(lambda: collect_all(src), "000.npz", "'a'", "dim 1 is 5")


def test_held_back_last_reads_the_held_back_samples_after_the_others(tmp_path):
    """GPTQ's summation order: of 16 samples, the 4 the measured default holds back (every 4th) come last, each
    part in file order; a subset of the other 12 (the candidates' ``calib_indices``) is read as it is, so its
    order is the first 12 of the whole one's; labels, ids and positions follow the samples."""
    sig = [InputSig("x", np.dtype(np.float32), (1, 2))]
    for i in range(16):
        np.savez(tmp_path / f"{i:03d}.npz", x=np.full((1, 2), i, np.float32))
    src = CalibrationSource.from_arg(str(tmp_path), sig)
    held = held_back_indices(16)
    assert held == [3, 7, 11, 15]
    order = src.held_back_last()
    want = [i for i in range(16) if i not in held] + held
    assert [int(f["x"][0, 0]) for f in order] == want
    assert order.sample_ids() == [src.sample_ids()[i] for i in want]
    assert [order.label(k) for k in range(16)] == [src.label(i) for i in want]
    assert order.parent_positions() == (16, want)
    fit = src.subset([i for i in range(16) if i not in held])
    assert fit.held_back_last() is fit and fit.parent_positions() == (16, want[:12])
    assert order.sample_ids()[:12] == fit.sample_ids()  # the whole order continues the candidates' one
    few = src.take(3)  # fewer than 4 samples: nothing held back, nothing moved
    assert few.held_back_last() is few
