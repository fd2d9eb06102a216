"""Low-bit weight schemes (qcompiler.quant.schemes): each quantizer against its closed form, plan rules, and the
``ort`` lowering (codes + DequantizeLinear) checked bit-exactly in onnxruntime."""

from __future__ import annotations

import math
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir, quant
from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import TensorStats
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan, QuantSpec, required_opset
from qcompiler.quant import schemes

MODELS = Path(__file__).resolve().parents[1] / "models"
_ONNX_T = {"int4": TensorProto.INT4, "int8": TensorProto.INT8, "int16": TensorProto.INT16,
           "int32": TensorProto.INT32}


def _weights(seed: int, shape=(16, 8, 3, 3)) -> np.ndarray:
    """Conv-like weights: Gaussian with a per-channel spread and a few outliers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * np.exp(rng.uniform(-2, 0.5, shape[0])).reshape(-1, *([1] * (len(shape) - 1)))
    w.reshape(-1)[rng.integers(0, w.size, 5)] *= 4
    return w.astype(np.float32)


def _ort_dequantize(q: np.ndarray, scale: np.ndarray, dtype: str, axis: int | None, opset: int) -> np.ndarray:
    """DequantizeLinear in onnxruntime (zero point 0 given explicitly in the code type)."""
    attrs = {} if axis is None else {"axis": axis}
    zp = np.zeros(np.shape(scale), dtype=q.dtype)
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.asarray(scale, np.float32), "s"),
             numpy_helper.from_array(zp, "z")]
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)], "dq", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(q.shape))], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    return ir.session(m).run(None, {})[0]


# ------------------------------------------------------------------------------------------------ binary
@pytest.mark.parametrize("shape, axis", [((16, 8, 3, 3), 0), ((64, 10), 1), ((32, 48), None)])
def test_binary_closed_form(shape, axis):
    w = _weights(1, shape)
    w.reshape(-1)[:3] = 0.0  # sign(0) = +1
    sw = schemes.binary(w, axis)
    np.testing.assert_array_equal(sw.codes, np.where(w >= 0, 1, -1))
    assert sw.codes.reshape(-1)[:3].tolist() == [1, 1, 1]
    other = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    expected = np.abs(w.astype(np.float64)).mean(axis=other).astype(np.float32)
    np.testing.assert_array_equal(sw.scale, expected)
    # alpha = mean|W| is the least-squares optimum: nudging it either way increases the error
    err = lambda a: float(((w - sw.codes * schemes._bcast(a, w.ndim, axis)) ** 2).sum())  # noqa: E731
    assert err(sw.scale) < err(sw.scale * 1.01) and err(sw.scale) < err(sw.scale * 0.99)


# ----------------------------------------------------------------------------------------------- ternary
@pytest.mark.parametrize("threshold", [0.7, 0.5, 1.1])
def test_ternary_closed_form(threshold):
    w = _weights(2)
    sw = schemes.ternary(w, 0, threshold)
    a = np.abs(w.astype(np.float64)).reshape(w.shape[0], -1)
    delta = threshold * a.mean(axis=1)
    keep = a > delta[:, None]
    np.testing.assert_array_equal(sw.codes.reshape(w.shape[0], -1), np.sign(w).reshape(w.shape[0], -1) * keep)
    alpha = np.array([a[c][keep[c]].mean() for c in range(w.shape[0])], dtype=np.float32)
    np.testing.assert_allclose(sw.scale, alpha, rtol=1e-6)
    assert sw.sparsity == pytest.approx(1.0 - keep.mean(), abs=1e-12)
    # a larger threshold zeroes more weights
    assert schemes.ternary(w, 0, threshold + 0.2).sparsity > sw.sparsity


def test_ternary_gaussian_sparsity_and_error_ordering():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    tw = schemes.ternary(w, 0)
    # Gaussian: zeros where |z| < 0.7·E|z| = 0.7·sqrt(2/pi) -> P = erf(0.5585/sqrt(2)) = 0.4235
    assert tw.sparsity == pytest.approx(0.4235, abs=0.01)
    bw, sh = schemes.binary(w, 0), schemes.shift(w, 0, bits=4)
    s_b, s_t, s_s = (quant.sqnr_db(w, x.dequantize()) for x in (bw, tw, sh))
    assert s_b == pytest.approx(4.40, abs=0.1)  # 10·log10(1 / (1 − 2/pi)) for Gaussian weights
    # TWN on a Gaussian: with d = 0.7·sqrt(2/pi), P = P(|z| > d), E = E[|z|; |z| > d], alpha = E / P,
    # MSE = 1 − E² / P -> 7.18 dB
    d = 0.7 * np.sqrt(2 / np.pi)
    p = 1 - math.erf(d / np.sqrt(2))
    e = 2 * np.exp(-d * d / 2) / np.sqrt(2 * np.pi)
    assert s_t == pytest.approx(10 * np.log10(1 / (1 - e * e / p)), abs=0.15)
    assert s_s > s_t + 5.0  # 4-bit shift: ~14 dB, bounded by the octave steps of log-domain rounding


# ------------------------------------------------------------------------------------------------- shift
def _window_check(sw: schemes.SchemeWeight, w: np.ndarray) -> np.ndarray:
    """Every value is exactly s·σ·2^(−k), k in [0, M); σ = sign(w); returns k."""
    levels = sw.extra["levels"]
    top = sw.extra["window_top"].astype(np.float64).reshape(-1, *([1] * (w.ndim - 1)))
    deq = sw.dequantize().astype(np.float64)
    ratio = deq / top
    k = -np.log2(np.abs(ratio))
    np.testing.assert_array_equal(k, np.round(k))
    assert k.min() >= 0 and k.max() <= levels - 1
    np.testing.assert_array_equal(np.sign(ratio), np.where(w >= 0, 1, -1))  # no zero, sign(0) = +1
    return k.astype(np.int64)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_shift_log_rounding_and_window(bits):
    w = _weights(4)
    w.reshape(-1)[7] = 0.0
    sw = schemes.shift(w, 0, bits=bits)
    k = _window_check(sw, w)
    # log-domain rounding against the chosen window top s
    top = sw.extra["window_top"].astype(np.float64).reshape(-1, 1, 1, 1)
    np.testing.assert_array_equal(k, schemes.shift_exponents(np.abs(w).astype(np.float64), top, 2 ** (bits - 1)))
    assert k.reshape(-1)[7] == 2 ** (bits - 1) - 1  # zero -> smallest magnitude, positive sign
    # the chosen s is (nearly) MSE-optimal: a dense brute-force search (160 points per octave, 4.5 octaves)
    # finds at most 3 % less per channel (the MSE jumps where a weight changes exponent) and 0.5 % in total
    a = np.abs(w.astype(np.float64)).reshape(w.shape[0], -1)
    amax = a.max(axis=1)
    grid = amax[None, :] * np.exp2(np.linspace(1.5, -3.0, 720))[:, None]
    levels = 2 ** (bits - 1)
    brute = np.min([schemes._shift_mse(a, g[:, None], levels, (1,))[0] for g in grid], axis=0)
    ours = ((sw.dequantize().astype(np.float64) - w) ** 2).reshape(w.shape[0], -1).mean(axis=1)
    assert np.all(ours <= brute * 1.03) and ours.sum() <= brute.sum() * 1.005
    naive = schemes._shift_mse(a, amax[:, None], levels, (1,))[0]  # window topped at max|W|
    assert np.all(ours <= naive * (1 + 1e-9)) and ours.mean() < naive.mean()


def test_shift_pow2_scale_is_best_window():
    w = _weights(5)
    sw = schemes.shift(w, 0, bits=4, pow2_scale=True)
    _window_check(sw, w)
    top = sw.extra["window_top"].astype(np.float64)
    assert schemes.is_pow2(top)
    a = np.abs(w.astype(np.float64)).reshape(w.shape[0], -1)
    ours = ((sw.dequantize().astype(np.float64) - w) ** 2).reshape(w.shape[0], -1).mean(axis=1)
    for e in range(-20, 6):  # every power-of-two window: none is better
        err = schemes._shift_mse(a, np.full((w.shape[0], 1), 2.0**e), 8, (1,))[0]
        assert np.all(ours <= err * (1 + 1e-12))


@pytest.mark.parametrize("bits, opset, dtype", [(4, 21, "int16"), (4, 17, "int32"), (3, 17, "int8"), (2, 21, "int4")])
def test_shift_codes_dequantize_exactly_in_onnxruntime(bits, opset, dtype):
    w = _weights(6)
    sw = schemes.shift(w, 0, bits=bits)
    qt = schemes.to_quantized_tensor(sw, opset)
    assert qt.dtype == dtype
    deq = _ort_dequantize(qt.q, qt.scale, dtype, 0, max(opset, 13))
    sign, k = schemes.shift_window(sw)
    top = sw.extra["window_top"].reshape(-1, 1, 1, 1).astype(np.float64)
    exact = (sign * top * np.exp2(-k.astype(np.float64))).astype(np.float32)  # ±2^p·s, exact in float32
    np.testing.assert_array_equal(deq, exact)
    np.testing.assert_array_equal(deq, sw.dequantize())


def test_binary_ternary_codes_int4_at_opset21_int8_before():
    w = _weights(7)
    for sw in (schemes.binary(w, 0), schemes.ternary(w, 0)):
        q21, q17 = schemes.to_quantized_tensor(sw, 21), schemes.to_quantized_tensor(sw, 17)
        assert (q21.dtype, q21.q.dtype, q17.dtype) == ("int4", np.dtype(ml_dtypes.int4), "int8")
        for qt, opset in ((q21, 21), (q17, 17)):
            np.testing.assert_array_equal(_ort_dequantize(qt.q, qt.scale, qt.dtype, 0, opset), sw.dequantize())


# ---------------------------------------------------------------------------------------------- int pow2
@pytest.mark.parametrize("dtype, symmetric, axis, block", [("int8", True, 0, None), ("uint8", False, 0, None),
                                                           ("int8", True, None, None), ("int4", True, 1, 16)])
def test_int_pow2_picks_floor_or_ceil_by_mse(dtype, symmetric, axis, block):
    w = _weights(8, (16, 32))
    qt = schemes.int_pow2(w, dtype, symmetric, axis, block)
    assert schemes.is_pow2(qt.scale)
    base = quant.quantize_weight(w, dtype, symmetric, axis, block)
    e = np.log2(base.scale.astype(np.float64))
    assert np.all((np.log2(qt.scale) == np.floor(e)) | (np.log2(qt.scale) == np.ceil(e)))
    ours = schemes._err_per((qt.dequantize() - w).astype(np.float64) ** 2, axis, block)
    for cand in (np.floor(e), np.ceil(e)):  # never worse than either candidate (zero points recomputed)
        s = np.exp2(cand).astype(np.float32)
        zp = base.zero_point
        if not symmetric:
            lo = (quant.qdtype(dtype).qmin - base.zero_point.astype(np.float64)) * base.scale
            zp = np.clip(np.rint(-lo / s), 0, 255).astype(np.uint8)
        other = quant.dequantize(quant.quantize(w, s, zp, dtype, axis, block), s, zp, axis, block)
        assert np.all(ours <= schemes._err_per((other - w).astype(np.float64) ** 2, axis, block) + 1e-18)
    if not symmetric:  # the zero point keeps the range covered with the new scale
        assert np.all(qt.dequantize().min(axis=1) <= w.min(axis=1) * 0.5)


def test_int_pow2_is_not_log_rounding():
    # one channel whose scale is 2^(e + 0.3): rounding log2 picks 2^e, which clips the outlier hard;
    # the MSE choice is 2^(e+1)
    rng = np.random.default_rng(9)
    w = (rng.standard_normal((1, 256)) * 0.02).astype(np.float32)
    w[0, 0] = 127 * 2.0 ** (-3 + 0.3)  # max|w| -> scale 2^(-2.7)
    qt = schemes.int_pow2(w, "int8", True, 0)
    assert float(qt.scale[0]) == 2.0**-2  # ceil; round(log2) would give 2^-3
    assert np.log2(quant.quantize_weight(w, "int8", True, 0).scale[0]) == pytest.approx(-2.7, abs=1e-6)


def test_pow2_alpha_for_binary():
    w = _weights(10)
    sw = schemes.binary(w, 0)
    p2 = schemes.pow2_alpha(w, sw)
    assert schemes.is_pow2(p2)
    e = np.log2(sw.scale.astype(np.float64))
    assert np.all((np.log2(p2) == np.floor(e)) | (np.log2(p2) == np.ceil(e)))


# ----------------------------------------------------------------------------------------- activations
def test_binary_activation_scale_is_mean_abs():
    rng = np.random.default_rng(11)
    st = TensorStats(histogram=True)
    xs = [np.maximum(rng.standard_normal((4, 1000)) * 2 + 0.5, -1.0).astype(np.float32) for _ in range(5)]
    xs.append(np.maximum(rng.standard_normal((4, 1000)) * 0.01, 0.0).astype(np.float32))  # ReLU: many exact zeros
    for x in xs:
        st.update(x)
    exact = float(np.mean(np.abs(np.concatenate(xs))))
    assert schemes.binary_activation_scale(st) == pytest.approx(exact, rel=1e-3)  # bins of max|x| / 2048
    st2 = TensorStats(histogram=False)
    st2.update(xs[0])
    assert schemes.binary_activation_scale(st2) == pytest.approx(st2.amax / 2)


# ------------------------------------------------------------------------------------------- plan rules
@pytest.mark.parametrize("rule, message", [
    ({"activation": {"scheme": "ternary"}}, "activation scheme 'ternary' is not supported"),
    ({"weight": {"scheme": "shift", "bits": 5}}, "shift bits must be one of 2, 3, 4"),
    ({"weight": {"scheme": "binary", "granularity": "block"}}, "not block-wise"),
    ({"weight": {"scheme": "quaternary"}}, "bad scheme 'quaternary'"),
])
def test_bad_scheme_plans_are_refused(tmp_path, rule, message):
    plan = {"version": 1, "rules": [{"match": {"name": "block.conv1"}, **rule}]}
    out = tmp_path / "q.onnx"
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(plan))
    with pytest.raises(UserError, match=message) as e:
        compile_model(MODELS / "conv_bn_relu.onnx", out, CompileOptions(plan=str(plan_file)))
    assert "\n" not in str(e.value) and ("rules[0]" in str(e.value) or "block.conv1" in str(e.value))
    assert not out.exists()


def test_binary_activation_spec_gets_a_histogram_and_shift4_needs_opset21():
    plan = Plan.from_dict({"version": 1, "rules": [
        {"match": {"name_regex": "block"}, "weight": {"scheme": "shift"}, "activation": {"scheme": "binary"}}]})
    g, _ = ir.import_graph(ir.load_model(MODELS / "conv_bn_relu.onnx"))
    res = plan.resolve(g)
    np_ = res.nodes["block.conv1"]
    assert np_.activation is not None and np_.activation.calibration == "mse"
    assert np_.weight is not None and np_.weight.scheme == "shift"
    assert required_opset([np_.weight])[0] == 21
    assert required_opset([QuantSpec(scheme="shift", bits=3, granularity="per_channel")])[0] == 13


# ---------------------------------------------------------------------------------- ort lowering (end to end)
def _dq_weights(model: onnx.ModelProto, node_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes, scale, onnxruntime-dequantized weight) of the weight DequantizeLinear feeding ``node_name``."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == node_name)
    dq = next(n for n in model.graph.node if n.output[0] == node.input[1])
    q, s = inits[dq.input[0]], inits[dq.input[1]]
    deq = ir.session(ir.with_outputs(model, [node.input[1]])).run([node.input[1]],
                                                                    {"input": np.zeros((1, 3, 32, 32), np.float32)})[0]
    return q, s, deq


@pytest.mark.parametrize("scheme", ["binary", "ternary", "shift"])
def test_ort_target_stores_codes_with_dequantizelinear(tmp_path, scheme):
    plan = Plan.from_dict({"version": 1, "rules": [
        {"match": {"name_regex": r"^(conv2|block\.conv[12])$"}, "weight": {"scheme": scheme}}]})
    out = tmp_path / "q.onnx"
    res = compile_model(MODELS / "conv_bn_relu.onnx", out, CompileOptions(plan=plan, calib=MODELS / "conv_bn_relu.npz",
                                                                          report=tmp_path / "r.json"))
    model = onnx.load(out)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # standard ops only
    q, s, deq = _dq_weights(model, "block.conv1")
    want = {"binary": (np.int8, {-1, 1}), "ternary": (np.int8, {-1, 0, 1}), "shift": (np.int16, None)}[scheme]
    assert q.dtype == want[0]
    if want[1] is not None:
        assert set(np.unique(q).tolist()) == want[1]
    else:  # ±2^j, j < 8, and DequantizeLinear gives exactly ±2^p·s
        mag = np.abs(q.astype(np.int64))
        assert np.all(np.left_shift(1, np.round(np.log2(mag)).astype(np.int64)) == mag) and mag.max() <= 128
        assert ir.opset_of(model) == 21
    np.testing.assert_array_equal(deq, q.astype(np.float32) * s.reshape(-1, 1, 1, 1))
    layers = res.report["lowbit"]["layers"]
    assert set(layers) == {"conv2", "block.conv1", "block.conv2"}
    if scheme == "ternary":
        assert 0.2 < layers["block.conv1"]["sparsity"] < 0.6
        assert layers["block.conv1"]["sparsity"] == pytest.approx(float(np.mean(q == 0)), abs=1e-6)
    val = res.validation
    assert val is not None and {m.name for m in val.layers} >= {"block.bn1", "block.bn2"}  # per-layer SQNR
    assert all(np.isfinite(m.sqnr_db) for m in val.outputs)


def test_ort_binary_activation_is_sign_times_beta(tmp_path):
    plan = Plan.from_dict({"version": 1, "rules": [
        {"match": {"name": "block.conv1"}, "weight": {"scheme": "binary"}, "activation": {"scheme": "binary"}}]})
    out = tmp_path / "q.onnx"
    compile_model(MODELS / "conv_bn_relu.onnx", out, CompileOptions(plan=plan, calib=MODELS / "conv_bn_relu.npz"))
    model = onnx.load(out)
    conv = next(n for n in model.graph.node if n.name == "block.conv1")
    where = next(n for n in model.graph.node if n.output[0] == conv.input[0])
    assert where.op_type == "Where"
    add = next(n for n in model.graph.node if n.name == "block.add")
    assert "relu2" in add.input  # the residual keeps the float tensor
    with np.load(MODELS / "conv_bn_relu.npz") as z:
        x = z["input"][0]
    sess = ir.session(ir.with_outputs(model, ["relu2", conv.input[0]]))
    relu2, xb = sess.run(["relu2", conv.input[0]], {"input": x})
    beta = float(np.abs(xb).max())
    np.testing.assert_array_equal(xb, np.where(relu2 >= 0, beta, -beta).astype(np.float32))
