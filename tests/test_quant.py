"""Quantization arithmetic: codes bit-exact with onnxruntime's QuantizeLinear, scales, bias guard."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir, quant

_ONNX_T = {"int8": TensorProto.INT8, "uint8": TensorProto.UINT8, "int4": TensorProto.INT4,
           "uint4": TensorProto.UINT4, "int16": TensorProto.INT16, "fp8e4m3": TensorProto.FLOAT8E4M3FN,
           "fp8e5m2": TensorProto.FLOAT8E5M2}


def _ort_roundtrip(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int | None,
                   block: int | None) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear in onnxruntime (int4/fp8 codes cannot leave a session as numpy)."""
    attrs = {}
    if axis is not None:
        attrs["axis"] = axis
    if block:
        attrs["block_size"] = block
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    g = helper.make_graph(
        nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        initializer=[numpy_helper.from_array(np.asarray(scale, np.float32), "s"), numpy_helper.from_array(zp, "z")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    return ir.session(m).run(None, {"x": x})[0]


@pytest.mark.parametrize("dtype, symmetric", [("int8", True), ("uint8", False), ("int4", True), ("uint4", False),
                                              ("int16", True), ("fp8e4m3", True), ("fp8e5m2", True)])
def test_codes_match_onnxruntime_per_tensor(dtype, symmetric):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 33)) * 3).astype(np.float32)
    x[0, :4] = [0.5, 1.5, 2.5, -2.5]  # ties at scale 1
    scale, zp = quant.qparams(x.min(), x.max(), dtype, symmetric)
    ours = quant.dequantize(quant.quantize(x, scale, zp, dtype), scale, zp)
    ref = _ort_roundtrip(x, scale.reshape(()), np.asarray(zp).reshape(()), None, None)
    np.testing.assert_array_equal(ours, ref)


def test_codes_match_onnxruntime_per_channel_and_block():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((64, 16)) * np.linspace(0.01, 4, 16)).astype(np.float32)
    qt = quant.quantize_weight(w, "int8", True, axis=1)
    np.testing.assert_array_equal(qt.dequantize(), _ort_roundtrip(w, qt.scale, qt.zero_point, 1, None))
    qb = quant.quantize_weight(w, "int4", True, axis=0, block_size=16)
    assert qb.scale.shape == (4, 16)
    np.testing.assert_array_equal(qb.dequantize(), _ort_roundtrip(w, qb.scale, qb.zero_point, 0, 16))


def test_symmetric_int8_range_and_zero_exact():
    scale, zp = quant.qparams(-2.0, 1.0, "int8", True)
    assert float(scale) == pytest.approx(2.0 / 127) and int(zp) == 0
    scale, zp = quant.qparams(0.5, 3.0, "uint8", False)  # widened to include 0
    assert int(zp) == 0 and float(scale) == pytest.approx(3.0 / 255)
    x = np.array([0.0], np.float32)
    assert quant.dequantize(quant.quantize(x, scale, zp, "uint8"), scale, zp)[0] == 0.0


def test_zero_range_never_gives_zero_scale():
    for dtype, sym in [("uint8", False), ("int8", True), ("fp8e4m3", True)]:
        scale, _ = quant.qparams(0.0, 0.0, dtype, sym)
        assert float(scale) > 0
    scale, _zp = quant.qparams(np.zeros(4), np.array([0.0, 1.0, 0.0, 2.0]), "int8", True)
    assert np.all(scale > 0)


def test_per_channel_error_far_below_per_tensor_on_badly_scaled_channels():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((32, 8, 3, 3)) * np.logspace(-3, 0, 32)[:, None, None, None]).astype(np.float32)
    pc = quant.quantize_weight(w, "int8", True, axis=0)
    pt = quant.quantize_weight(w, "int8", True, axis=None)
    small = slice(0, 8)  # the smallest channels are the ones per-tensor scales crush
    assert quant.sqnr_db(w[small], pc.dequantize()[small]) > quant.sqnr_db(w[small], pt.dequantize()[small]) + 20


def test_mse_range_beats_minmax_on_heavy_tails_int4():
    rng = np.random.default_rng(4)
    w = rng.laplace(size=(256, 64)).astype(np.float32)
    mm = quant.quantize_weight(w, "int4", True, axis=1)
    mse = quant.quantize_weight(w, "int4", True, axis=1, range_method="mse")
    assert quant.sqnr_db(w, mse.dequantize()) > quant.sqnr_db(w, mm.dequantize()) + 0.5


def test_pow2_scales_are_powers_of_two_and_pick_lower_mse():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    qt = quant.quantize_weight(w, "int8", True, axis=0, pow2=True)
    e = np.log2(qt.scale)
    np.testing.assert_array_equal(e, np.round(e))
    base = quant.quantize_weight(w, "int8", True, axis=0)
    for c in range(16):
        lo = np.exp2(np.floor(np.log2(base.scale[c])))
        errs = []
        for s in (lo, 2 * lo):
            q = quant.quantize(w[c], np.float32(s), np.int8(0), "int8")
            errs.append(float(((quant.dequantize(q, np.float32(s), np.int8(0)) - w[c]) ** 2).mean()))
        assert qt.scale[c] == np.float32((lo, 2 * lo)[int(np.argmin(errs))])


def test_bias_overflow_guard_raises_weight_scale():
    b = np.array([1000.0, 1e-5], np.float32)
    codes, bscale, ws = quant.quantize_bias(b, 1e-6, np.array([1e-6, 1e-6], np.float32))
    assert np.all(np.abs(codes.astype(np.int64)) < 2**31 - 1)
    assert ws[0] > 1e-6 and ws[1] == np.float32(1e-6)
    np.testing.assert_allclose(codes * bscale, b, rtol=1e-3, atol=1e-9)


def test_fp8_saturates_and_rounds_like_ml_dtypes():
    x = np.array([1000.0, -1000.0, 1.06, 0.0], np.float32)
    q = quant.quantize(x, np.float32(1.0), np.zeros((), ml_dtypes.float8_e4m3fn), "fp8e4m3")
    assert float(q[0]) == 448.0 and float(q[1]) == -448.0
    assert float(q[2]) == float(np.float32(1.06).astype(ml_dtypes.float8_e4m3fn))


def test_checker_accepts_int4_initializer_roundtrip():
    q = np.array([[-8, 7], [0, 3]], dtype=ml_dtypes.int4)
    t = numpy_helper.from_array(q, "w")
    back = numpy_helper.to_array(t)
    np.testing.assert_array_equal(back.astype(np.int8), q.astype(np.int8))
    assert onnx.helper.tensor_dtype_to_np_dtype(t.data_type) == np.dtype(ml_dtypes.int4)
