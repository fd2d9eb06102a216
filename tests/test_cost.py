"""Tests of qcompiler.report.cost: stored bytes (packed int4, DQ-chain attribution), MACs, BitOps, peak activations,
the total against file sizes, and ``qcompiler inspect --cost``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli import cli
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan, QuantSpec
from qcompiler.report import cost
from qcompiler.report.cost import measure as cost_measure
from qcompiler.report.cost import shapes as cost_shapes

MODELS = Path(__file__).resolve().parents[1] / "models"
F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), opset=21, ir_version=10):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    onnx.checker.check_model(m)
    return m


def _vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def _save(m, path: Path) -> Path:
    onnx.save(m, str(path))
    return path


# ------------------------------------------------------------------------------------------------- bits
def test_spec_bits_from_quant_spec():
    assert cost.spec_bits(None) == 32
    assert cost.spec_bits(QuantSpec(dtype="float")) == 32
    assert cost.spec_bits(QuantSpec(dtype="int8")) == 8
    assert cost.spec_bits(QuantSpec(dtype="uint4")) == 4
    assert cost.spec_bits(QuantSpec(dtype="int16")) == 16
    assert cost.spec_bits(QuantSpec(dtype="fp8e4m3")) == 8
    assert cost.spec_bits(QuantSpec(scheme="binary")) == 1
    assert cost.spec_bits(QuantSpec(scheme="ternary")) == 2
    assert cost.spec_bits(QuantSpec(scheme="shift", bits=3)) == 3


def test_code_bits_recognizes_low_bit_codes():
    assert cost.code_bits(np.array([-1, 1, 1, -1]), None, 8) == (1, "binary")
    assert cost.code_bits(np.array([-1, 0, 1, 0]), None, 4) == (2, "ternary")
    # shift: sign + exponent window of 4 (1, 2, 4, 8) -> 1 + 2 bits
    assert cost.code_bits(np.array([-8, 1, 2, -4, 8]), None, 8) == (3, "shift")
    # an ordinary int8 weight (per-channel max code 127 is no power of two)
    assert cost.code_bits(np.array([-127, 3, 64, 127]), None, 8) == (8, "int")
    assert cost.code_bits(np.array([-1, 0, 1]), np.array([3]), 8) == (8, "int")  # nonzero zero point: affine


def test_stored_bytes_packs_four_bit_types():
    assert cost.stored_bytes([7], ml_dtypes.int4) == 4
    assert cost.stored_bytes([3, 5], np.float16) == 30
    assert cost.stored_bytes([], np.float32) == 4


# ------------------------------------------------------------------------------------------------ bytes
def _int4_conv_model(rng) -> onnx.ModelProto:
    """x -> Q/DQ (uint8) -> Conv(DQ(int4 codes [8,3,3,3], per-channel scale), bias) -> y, opset 21."""
    codes = rng.integers(-8, 8, size=(8, 3, 3, 3)).astype(ml_dtypes.int4)
    inits = [
        numpy_helper.from_array(codes, "w_q"),
        numpy_helper.from_array(rng.uniform(0.01, 0.1, 8).astype(np.float32), "w_s"),
        numpy_helper.from_array(np.zeros(8, dtype=ml_dtypes.int4), "w_z"),
        numpy_helper.from_array(np.float32(0.02), "x_s"),
        numpy_helper.from_array(np.uint8(128), "x_z"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_s", "x_z"], ["xq"], name="xQ"),
        helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"], name="xDQ"),
        helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["w"], name="wDQ", axis=0),
        helper.make_node("Conv", ["xd", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, [_vi("x", ["N", 3, 10, 10])], [_vi("y", ["N", 8, 10, 10])], inits)


def test_int4_bytes_attributed_through_dq_chains(tmp_path):
    rng = np.random.default_rng(0)
    path = _save(_int4_conv_model(rng), tmp_path / "m.onnx")
    rep = cost.model_cost(path)
    conv = rep.layer("conv")
    assert conv is not None
    # int4 codes 216 elements -> 108 bytes, scale 8 x 4, zero point 8 int4 -> 4, bias 32, x scale 4 + zp 1
    assert conv.bytes == 108 + 32 + 4 + 32 + 4 + 1
    assert rep.tensor_bytes == conv.bytes
    assert rep.total_bytes == os.path.getsize(path)
    assert rep.overhead_bytes == rep.total_bytes - rep.tensor_bytes
    assert conv.weight_bits == 4 and conv.act_bits == 8 and conv.params == 216
    assert conv.macs == 1 * 8 * 10 * 10 * 3 * 3 * 3
    assert conv.bitops == conv.macs * 4 * 8
    # the quantized activation is 1 byte per element and its DequantizeLinear output an alias of it: the peak is
    # at the conv, codes (300) + float output (3200); the float input (1200) died at the QuantizeLinear
    assert rep.peak_activation_bytes == 3 * 10 * 10 + 8 * 10 * 10 * 4
    assert rep.peak_at == "conv"


def test_shared_and_constant_node_tensors(tmp_path):
    """A weight read by two ops goes to the first; Constant-node values count like initializers."""
    w = np.ones((4, 4), dtype=np.float32)
    nodes = [
        helper.make_node("Constant", [], ["c"], name="cst", value=numpy_helper.from_array(np.ones((4,), np.float32))),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "c"], ["h2"], name="add"),
        helper.make_node("MatMul", ["h2", "w"], ["y"], name="mm2"),
    ]
    m = _model(nodes, [_vi("x", [2, 4])], [_vi("y", [2, 4])], [numpy_helper.from_array(w, "w")], opset=17,
               ir_version=8)
    rep = cost.model_cost(_save(m, tmp_path / "m.onnx"))
    assert rep.layer("mm1").bytes == 64 and rep.layer("mm2").bytes == 0
    assert rep.layer("add").bytes == 16
    assert rep.layer("mm1").macs == 2 * 4 * 4 and rep.layer("mm2").macs == 2 * 4 * 4
    assert rep.layer("mm2").weight_bits == 32 and rep.layer("mm2").bitops == 32 * 32 * 32


def test_macs_of_gemm_convtranspose_and_lstm(tmp_path):
    rng = np.random.default_rng(1)
    T, B, IN, H = 5, 1, 6, 4
    inits = [
        numpy_helper.from_array(rng.standard_normal((10, 6)).astype(np.float32), "gw"),
        numpy_helper.from_array(rng.standard_normal((2, 3, 3, 3)).astype(np.float32), "tw"),
        numpy_helper.from_array(rng.standard_normal((1, 4 * H, IN)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((1, 4 * H, H)).astype(np.float32), "R"),
    ]
    nodes = [
        helper.make_node("Gemm", ["a", "gw"], ["g"], name="gemm", transB=1),
        helper.make_node("ConvTranspose", ["t", "tw"], ["ty"], name="deconv", strides=[2, 2]),
        helper.make_node("LSTM", ["s", "W", "R"], ["Y"], name="lstm", hidden_size=H),
    ]
    m = _model(nodes, [_vi("a", [3, 6]), _vi("t", [1, 2, 4, 4]), _vi("s", [T, B, IN])],
               [_vi("g", [3, 10]), _vi("ty", [1, 3, 9, 9]), _vi("Y", [T, 1, B, H])], inits, opset=17, ir_version=8)
    rep = cost.model_cost(_save(m, tmp_path / "m.onnx"))
    assert rep.layer("gemm").macs == 3 * 10 * 6
    assert rep.layer("deconv").macs == (1 * 2 * 4 * 4) * (3 * 3 * 3)
    assert rep.layer("lstm").macs == T * B * 4 * H * (IN + H)
    assert rep.layer("lstm").params == 4 * H * IN + 4 * H * H


def test_peak_activation_liveness(tmp_path):
    """x -> A (Relu) -> B (Relu) -> C = Add(A, B): A stays alive across B (a skip connection)."""
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="A"), helper.make_node("Relu", ["a"], ["b"], name="B"),
             helper.make_node("Add", ["a", "b"], ["c"], name="C"), helper.make_node("Relu", ["c"], ["y"], name="D")]
    m = _model(nodes, [_vi("x", ["N", 100])], [_vi("y", ["N", 100])], opset=17, ir_version=8)
    rep = cost.model_cost(_save(m, tmp_path / "m.onnx"))
    # at C: a, b and c live (x died after A) -> 3 x 400 bytes
    assert rep.peak_activation_bytes == 3 * 400
    assert rep.feed_shapes == {"x": [1, 100]}
    rep2 = cost.model_cost(tmp_path / "m.onnx", feed_shapes={"x": [5, 100]})
    assert rep2.peak_activation_bytes == 5 * 3 * 400


def test_bad_shapes_are_user_errors(tmp_path):
    path = _save(_int4_conv_model(np.random.default_rng(0)), tmp_path / "m.onnx")
    with pytest.raises(UserError, match="not an input"):
        cost.model_cost(path, feed_shapes={"nope": [1]})
    with pytest.raises(UserError, match="fixed at 3"):
        cost.model_cost(path, feed_shapes={"x": [1, 4, 10, 10]})
    with pytest.raises(UserError, match="NAME=D0"):
        cost.parse_shapes(["x:1,2"])
    assert cost.parse_shapes(["x=1,3,48,320", "h=1x1x128"]) == {"x": [1, 3, 48, 320], "h": [1, 1, 128]}


# --------------------------------------------------------------------------------- compiled models, files
@pytest.mark.parametrize("weight", ["{dtype: int8}", "{dtype: int4}", "{scheme: ternary}", "{scheme: binary}",
                                    "{scheme: shift, bits: 3}"])
def test_compiled_model_totals_match_file_and_bitops(tmp_path, weight):
    plan = Plan.from_text(f"version: 1\ndefaults:\n  weight: {weight}\n")
    out = tmp_path / "q.onnx"
    res = compile_model(MODELS / "conv_bn_relu.onnx", out, CompileOptions(plan=plan, calib=str(MODELS / "conv_bn_relu.npz"),
                                                                          validate=False))
    rep = cost.model_cost(out, feed_shapes={"input": [1, 3, 32, 32]})
    size = os.path.getsize(out)
    assert abs(rep.total_bytes - size) <= 0.02 * size
    assert rep.total_bytes == size  # measured
    bits = {"{dtype: int8}": 8, "{dtype: int4}": 4, "{scheme: ternary}": 2, "{scheme: binary}": 1,
            "{scheme: shift, bits: 3}": 3}[weight]
    convs = [lc for lc in rep.layers if lc.op_type in ("Conv", "Gemm")]
    assert len(convs) == 6
    # bias scales computed as Mul(s_w, s_x) and load-time dequantized weights (Cast -> Mul) are attributed, like
    # DequantizeLinear, to the op they feed: no bytes land on the helper nodes
    assert not [lc.name for lc in rep.layers if lc.op_type in ("Mul", "Cast", "Sub") and lc.bytes]
    for lc in convs:
        # the depthwise conv computes in float on ort (weights dequantized at load): 32-bit activations
        a_bits = 32 if lc.name == "dw.conv" else 8
        assert lc.weight_bits == bits and lc.act_bits == a_bits, lc
        assert lc.bitops == lc.macs * bits * a_bits
    # the compile summary carries the same cost section
    assert res.report["cost"]["total_bytes"] == size
    assert res.report["cost"]["bitops"] == rep.bitops


def test_weight_only_matmulnbits_bitops(tmp_path):
    out = tmp_path / "q.onnx"
    compile_model(MODELS / "transformer_block.onnx", out, CompileOptions(plan="w4a16", calib="none", validate=False))
    rep = cost.model_cost(out)
    nbits = [lc for lc in rep.layers if lc.op_type.endswith("MatMulNBits")]
    assert nbits, [lc.op_type for lc in rep.layers]
    for lc in nbits:
        assert lc.weight_bits == 4 and lc.act_bits == 32 and lc.bitops == lc.macs * 4 * 32 and lc.macs > 0
    assert rep.total_bytes == os.path.getsize(out)


def test_real_model_bytes_match_file(tmp_path):
    from realdata import fetch_model

    path = fetch_model("ppocr_cls")
    rep = cost.model_cost(path, feed_shapes={"x": [1, 3, 48, 192]})
    size = os.path.getsize(path)
    assert abs(rep.total_bytes - size) <= 0.02 * size
    # weights live in Constant nodes in this export; they are tensor bytes, not graph overhead
    assert rep.tensor_bytes > 0.9 * size
    assert rep.macs > 0 and rep.peak_activation_bytes is not None and rep.peak_activation_bytes > 0
    avg = rep.average_weight_bits()
    assert avg == 32.0
    out = tmp_path / "q.onnx"
    compile_model(path, out, CompileOptions(plan=Plan.from_text("version: 1\ndefaults:\n  weight: {dtype: int4}\n"),
                                            calib="none", validate=False))
    q = cost.model_cost(out, feed_shapes={"x": [1, 3, 48, 192]})
    assert q.total_bytes == os.path.getsize(out)
    assert q.macs == rep.macs  # same layers, same shapes
    assert q.bitops < rep.bitops / 16


def test_inspect_cost_cli(tmp_path):
    path = MODELS / "conv_bn_relu.onnx"
    r = CliRunner().invoke(cli, ["inspect", "--cost", "--json", str(path), "--shape", "input=2,3,32,32"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["total_bytes"] == os.path.getsize(path)
    assert data["feed_shapes"] == {"input": [2, 3, 32, 32]}
    assert sum(la["bytes"] for la in data["layers"]) + data["unattributed_bytes"] == data["tensor_bytes"]
    r = CliRunner().invoke(cli, ["inspect", "--cost", str(path)])
    assert r.exit_code == 0 and "peak activations" in r.output and "BitOps" in r.output
    r = CliRunner().invoke(cli, ["inspect", "--cost", str(path), "--shape", "input=1,3"])
    assert r.exit_code == 2 and "rank" in r.output
    r = CliRunner().invoke(cli, ["inspect", str(path), "--shape", "input=1,3,32,32"])
    assert r.exit_code == 2 and "--cost" in r.output


def test_format_helpers():
    assert cost.format_count(1.5e9) == "1.5G"
    assert cost.format_bytes(2048) == "2.00 KiB"
    assert math.isclose(cost.LayerCost("x", "Conv", macs=10, weight_bits=4, act_bits=8).bitops, 320)


# ------------------------------------------------------------------------------------- where shapes come from
def _shape_chain_model(rng) -> onnx.ModelProto:
    """Conv -> Flatten-by-Reshape whose target shape is computed as Paddle exports it (Shape -> Cast int32 ->
    Slice with Constant-node bounds -> Cast int64 -> Concat), then MatMul. ONNX data propagation stops there, so static inference
    alone cannot size the Reshape and everything after it."""
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((4 * 6 * 6, 5)).astype(np.float32), "mw"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1")]
    nodes = [helper.make_node("Constant", [], ["s0"], name="k0", value=numpy_helper.from_array(np.array([0], np.int64))),
             helper.make_node("Constant", [], ["s1"], name="k1", value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Constant", [], ["ax"], name="k2", value=numpy_helper.from_array(np.array([0], np.int64))),
             helper.make_node("Constant", [], ["st"], name="k3", value=numpy_helper.from_array(np.array([1], np.int64))),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Shape", ["r"], ["sh"], name="shape"),
             helper.make_node("Cast", ["sh"], ["sh32"], name="cast32", to=TensorProto.INT32),
             helper.make_node("Slice", ["sh32", "s0", "s1", "ax", "st"], ["n32"], name="slice"),
             helper.make_node("Cast", ["n32"], ["n"], name="cast64", to=TensorProto.INT64),
             helper.make_node("Concat", ["n", "m1"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["r", "target"], ["flat"], name="reshape"),
             helper.make_node("MatMul", ["flat", "mw"], ["y"], name="matmul")]
    return _model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 5])], inits, opset=13, ir_version=8)


def _same_costs(a: cost.CostReport, b: cost.CostReport) -> None:
    ja, jb = a.to_json(), b.to_json()
    for k in ("shapes_from", "notes"):
        ja.pop(k, None), jb.pop(k, None)
    assert ja == jb


def test_static_shapes_equal_a_run_and_measured_shapes_help(tmp_path, monkeypatch):
    """The cost report sizes tensors by static shape inference when that sizes every one, with the shapes
    calibration measured as seeds, and runs the model only otherwise; each way gives the same numbers."""
    from qcompiler import ir
    from qcompiler.calib import CalibrationSource, collect, input_signatures
    from qcompiler.plan import QuantSpec

    rng = np.random.default_rng(4)
    path = _save(_shape_chain_model(rng), tmp_path / "m.onnx")
    runs = []
    real_run = cost_measure._runtime_shapes
    monkeypatch.setattr(cost_measure, "_runtime_shapes", lambda *a: runs.append(1) or real_run(*a))
    monkeypatch.setattr(cost_shapes, "EVALUATION_ROUNDS", 0)  # no partial evaluation (its own test below)
    ran = cost.model_cost(path, feed_shapes={"x": [2, 3, 8, 8]})  # Cast blocks inference: the model is run
    assert ran.shapes_from == "onnxruntime" and len(runs) == 1
    assert ran.layer("matmul").macs == 2 * 144 * 5 and ran.layer("conv").macs == 2 * 4 * 6 * 6 * 27
    # calibration measured 'flat' (the MatMul input it quantizes) at x [2, 3, 8, 8]: inference completes
    model = ir.load_model(path)
    graph = ir.import_graph(model)[0]
    feeds = [{"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}]
    known: dict = {}
    collect(graph, {"flat": QuantSpec()}, CalibrationSource.from_feeds(feeds, input_signatures(graph)), shapes=known)
    assert known["flat"][0] == (2, 144) and known["y"][0] == (2, 5)
    seeded = cost.model_cost(path, feed_shapes={"x": [2, 3, 8, 8]}, known_shapes=known)
    assert seeded.shapes_from == "shape inference" and len(runs) == 1
    _same_costs(ran, seeded)
    # measured at other input shapes: not used (the model is run again)
    other = cost.model_cost(path, feed_shapes={"x": [3, 3, 8, 8]}, known_shapes=known)
    assert other.shapes_from == "onnxruntime" and len(runs) == 2
    assert other.layer("matmul").macs == 3 * 144 * 5
    # a model inference sizes alone (the Conv fixture): no run, same numbers as a run
    fixture = MODELS / "conv_bn_relu.onnx"
    static = cost.model_cost(fixture, feed_shapes={"input": [1, 3, 32, 32]})
    assert static.shapes_from == "shape inference" and len(runs) == 2
    monkeypatch.setattr(cost_measure, "_static_shapes", lambda *a: {})
    _same_costs(static, cost.model_cost(fixture, feed_shapes={"input": [1, 3, 32, 32]}))
    assert len(runs) == 3


def test_partial_evaluation_sizes_what_inference_cannot_without_running_the_model(tmp_path, monkeypatch):
    """Where inference stops (a Reshape to a shape computed through Cast), only the nodes computing that shape
    run — the Shape of the sized Relu output taken as a constant, the Reshape's data replaced by zeros, no Conv
    and no MatMul — and the report is the one a run of the whole model gives."""
    from qcompiler import ir

    rng = np.random.default_rng(4)
    path = _save(_shape_chain_model(rng), tmp_path / "m.onnx")
    runs, subgraphs = [], []
    real_run = cost_measure._runtime_shapes
    monkeypatch.setattr(cost_measure, "_runtime_shapes", lambda *a: runs.append(1) or real_run(*a))
    real_session = ir.graph_session

    def spy(graph, *a, **kw):
        subgraphs.append(sorted(n.op for n in graph.nodes if n.op != "Constant"))
        return real_session(graph, *a, **kw)

    monkeypatch.setattr(ir, "graph_session", spy)
    evaluated = cost.model_cost(path, feed_shapes={"x": [2, 3, 8, 8]})
    assert runs == [] and evaluated.shapes_from == "shape inference"
    assert subgraphs == [["Cast", "Cast", "Concat", "Reshape", "Slice"]]
    assert evaluated.layer("matmul").macs == 2 * 144 * 5 and evaluated.peak_activation_bytes
    monkeypatch.setattr(cost_shapes, "EVALUATION_ROUNDS", 0)
    ran = cost.model_cost(path, feed_shapes={"x": [2, 3, 8, 8]})
    assert runs == [1] and ran.shapes_from == "onnxruntime"
    _same_costs(evaluated, ran)
    assert evaluated.to_json()["notes"] == ran.to_json()["notes"]


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.onnx")), ids=lambda p: p.stem)
def test_shape_inference_on_the_structure_copy_equals_it_on_the_whole_model(path):
    """Output types for exposed tensors, static shapes and the load-time size check infer on the graph without its
    large weights' values (ir.shapes.structure_copy): every value info comes out the same as on the whole model."""
    from qcompiler import ir
    from qcompiler.ir.shapes import STRUCTURE_KEEP_ELEMENTS, structure_copy

    model = ir.load_model(path)
    light = structure_copy(model)

    def infos(m, **kw):
        g = onnx.shape_inference.infer_shapes(m, strict_mode=False, **kw).graph
        return {vi.name: vi.type.SerializeToString() for vi in [*g.value_info, *g.input, *g.output]}

    assert infos(light) == infos(model)
    assert infos(light, data_prop=True) == infos(model, data_prop=True)
    big = [t.name for t in model.graph.initializer if math.prod(t.dims) > STRUCTURE_KEEP_ELEMENTS]
    stubs = {t.name: t for t in light.graph.initializer}
    assert all(not stubs[n].raw_data and list(stubs[n].dims) == list(
        next(t for t in model.graph.initializer if t.name == n).dims) for n in big)
    assert model.ByteSize() == ir.load_model(path).ByteSize()  # the model itself is untouched
