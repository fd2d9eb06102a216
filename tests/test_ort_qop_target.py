"""Target ``ort-qop``: onnxruntime's integer operators written into the file (lower-qoperator).

The lowering must be the fusion onnxruntime itself performs on the ``ort`` target's QDQ graph: same kernels, so
the outputs equal those of the ``ort`` file run with onnxruntime's optimizations, code for code; groups the
kernels cannot take stay QDQ (must-not-match cases); and the integer codes a QLinearConv writes follow the
quantized-convolution formula (numpy reference).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli import cli
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan
from qcompiler.runtime_targets import get_target
from qcompiler.runtime_targets.ort_qop.lower_qoperator import LowerQOperatorPass

MODELS = Path(__file__).resolve().parent.parent / "models"
QDQ = ("QuantizeLinear", "DequantizeLinear")


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ort_qop")


def _compile(name: str, tmp: Path, target: str, plan: Any = "default") -> onnx.ModelProto:
    data = dict(np.load(MODELS / f"{name}.npz"))
    calib = tmp / f"{name}.calib.npz"
    if not calib.exists():
        np.savez(calib, **{k: v[:16] for k, v in data.items()})
    out = tmp / f"{name}.{target}.{abs(hash(str(plan))) % 10**6}.onnx"
    compile_model(MODELS / f"{name}.onnx", out, CompileOptions(target=target, calib=str(calib), plan=plan,
                                                               validate=False))
    return onnx.load(str(out))


def _held(name: str) -> list[dict[str, np.ndarray]]:
    data = dict(np.load(MODELS / f"{name}.npz"))
    return [{k: v[i] for k, v in data.items()} for i in range(16, 32)]


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], optimize: Any = True) -> list[np.ndarray]:
    s = ir.session(model, threads=1, optimize=optimize)
    return [np.concatenate([s.run(None, f)[k].ravel() for f in feeds]) for k in range(len(s.get_outputs()))]


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


def _sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    r, d = ref.astype(np.float64), ref.astype(np.float64) - x
    return float("inf") if not (d @ d) else float(10 * np.log10((r @ r) / (d @ d)))


# ------------------------------------------------------------------------------- the fixtures, end to end
@pytest.mark.parametrize("name, expected, min_db, exact", [
    # every Conv whose output a Q reads alone -> QLinearConv; the Gemm head -> QGemm (float logits out);
    # the depthwise Conv keeps float activations (target default), its weight dequantized at load
    ("conv_bn_relu", {"QLinearConv": 4, "QGemm": 1}, 28.0, True),
    # Gemm -> ReLU (zero point 0: redundant) -> Q -> QGemm with int8 output, twice; the last MatMul (float
    # output) -> MatMulIntegerToFloat, where onnxruntime turns MatMul + Add into a float Gemm on dequantized
    # operands: the same products, summed in int32 instead of float32 (within float rounding)
    ("gemm_head", {"QGemm": 2, "MatMulIntegerToFloat": 1}, 26.0, False),
    # the six weight MatMuls of the attention / MLP block, float outputs
    ("transformer_block", {"MatMulIntegerToFloat": 6}, 30.0, True),
    # Paddle-style Constant weights, opset 11 upgraded to 13
    ("opset11_constants", {"QLinearConv": 2, "QGemm": 1}, 36.0, True),
    # one weight read by two Convs: both integer ops read the same int8 constant
    ("shared_weight", {"QLinearConv": 2}, 32.0, True),
    # the depthwise Conv keeps float activations in the plan, but its neighbours quantize its input and its
    # output: onnxruntime fuses it all the same, quantizing its float bias at sx·sw; so does the lowering
    ("depthwise", {"QLinearConv": 2}, 30.0, True),
])
def test_fixture_lowered_to_integer_ops_equals_onnxruntime_fusion(name, expected, min_db, exact, tmp_module):
    qop = _compile(name, tmp_module, "ort-qop")
    qdq = _compile(name, tmp_module, "ort")
    ir.check_model(qop, where=name)
    ops = _ops(qop)
    for op, n in expected.items():
        assert ops[op] == n, (name, op, ops)
    # the weights no longer pass through a DequantizeLinear (none left for an integer op to read)
    int_ops = [n for n in qop.graph.node if n.op_type in expected]
    produced = {o: n.op_type for n in qop.graph.node for o in n.output}
    assert all(produced.get(n.input[3 if n.op_type in ("QLinearConv", "QGemm", "QLinearMatMul") else 1])
               is None for n in int_ops)
    # tagged by the lowering, under the replaced node's name
    for n in int_ops:
        assert {p.key: p.value for p in n.metadata_props}.get("qcompiler.pass") == "lower-qoperator"
    assert {n.name for n in int_ops} <= {n.name for n in onnx.load(str(MODELS / f"{name}.onnx")).graph.node} | \
        {n.name for n in qdq.graph.node}
    # fewer nodes than the QDQ file, and the same numbers as onnxruntime's own fusion of it, code for code
    assert len(qop.graph.node) < len(qdq.graph.node)
    assert qop.ByteSize() < qdq.ByteSize()
    feeds = _held(name)
    got, want = _run(qop, feeds), _run(qdq, feeds)
    for g, w in zip(got, want):
        if exact:
            assert np.array_equal(g, w), (name, float(np.abs(g - w).max()))
        else:
            assert float(np.abs(g - w).max()) <= 1e-6 * float(np.abs(w).max()), (name, float(np.abs(g - w).max()))
    ref = _run(onnx.load(str(MODELS / f"{name}.onnx")), feeds)
    assert _sqnr(ref[0], got[0]) > min_db
    # the file itself runs its integer kernels (nothing left for onnxruntime to fuse at session start): the same
    # outputs with every graph optimization off
    assert {op: n for op, n in ir.optimized_op_types(qop).items() if op in expected} == expected
    for g, u in zip(got, _run(qop, feeds, optimize=False)):
        assert np.array_equal(g, u) if exact else float(np.abs(g - u).max()) <= 1e-6 * float(np.abs(g).max())


def test_second_run_changes_nothing(tmp_module):
    qop = _compile("conv_bn_relu", tmp_module, "ort-qop")
    graph, meta = ir.import_graph(qop)
    ctx = CompileContext(graph=graph, meta=meta, plan=Plan.default(), target=get_target("ort-qop"))
    res = LowerQOperatorPass().run(ctx)
    assert not res.modified
    assert res.stats["qlinear_conv"] == 0 and res.stats["qgemm"] == 0


# ------------------------------------------------------------------------ codes: the QLinearConv formula
def _qconv_model(relu: bool, y_zp: int, w_zps: list[int] | None = None, bias_scale_factor: float = 1.0,
                 y_is_output_too: bool = False) -> onnx.ModelProto:
    """x (float) -> Q -> DQ -> Conv(DQ(w int8 per channel), DQ(b int32)) [-> Relu] -> Q -> DQ -> y."""
    rng = np.random.default_rng(4)
    c_in, c_out = 3, 4
    w = rng.integers(-127, 128, size=(c_out, c_in, 3, 3)).astype(np.int8)
    ws = (rng.uniform(0.5, 2.0, c_out) * 1e-2).astype(np.float32)
    xs, ys = np.float32(0.02), np.float32(0.05)
    b = rng.integers(-3000, 3000, size=c_out).astype(np.int32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(np.array(xs), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
             numpy_helper.from_array(np.array(ys), "ys"), numpy_helper.from_array(np.uint8(y_zp), "yz"),
             numpy_helper.from_array(b, "b"),
             numpy_helper.from_array((xs * ws * np.float32(bias_scale_factor)).astype(np.float32), "bs")]
    w_dq = ["w", "ws"]
    if w_zps is not None:
        inits.append(numpy_helper.from_array(np.array(w_zps, dtype=np.int8), "wz"))
        w_dq.append("wz")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", w_dq, ["wd"], name="dqw", axis=0),
        helper.make_node("DequantizeLinear", ["b", "bs"], ["bd"], name="dqb", axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["conv"], name="conv", pads=[1, 1, 1, 1]),
    ]
    t = "conv"
    if relu:
        nodes.append(helper.make_node("Relu", ["conv"], ["act"], name="relu"))
        t = "act"
    nodes += [helper.make_node("QuantizeLinear", [t, "ys", "yz"], ["yq"], name="qy"),
              helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dqy")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if y_is_output_too:
        outputs.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    g = helper.make_graph(nodes, "qconv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, 8, 8])],
                          outputs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _lower(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Counter[str]]:
    graph, meta = ir.import_graph(model)
    ctx = CompileContext(graph=graph, meta=meta, plan=Plan.default(), target=get_target("ort-qop"))
    res = LowerQOperatorPass().run(ctx)
    return ir.export_model(ctx.graph, meta), res.stats


def _reference_codes(model: onnx.ModelProto, x: np.ndarray, relu: bool) -> np.ndarray:
    """numpy: int32 accumulation of (xq - zx)·w + b, scaled by sx·sw/sy, rounded half to even, + zy, saturated."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    xs, xz = float(init["xs"]), int(init["xz"])
    xq = np.clip(np.rint(x / xs) + xz, 0, 255).astype(np.int32) - xz
    w = init["w"].astype(np.int32)
    xp = np.pad(xq, ((0, 0), (0, 0), (1, 1), (1, 1)))
    acc = np.zeros((1, w.shape[0], 8, 8), dtype=np.int64)
    for i in range(3):
        for j in range(3):
            acc += np.einsum("nchw,oc->nohw", xp[:, :, i:i + 8, j:j + 8], w[:, :, i, j])
    acc += init["b"].reshape(1, -1, 1, 1)
    scale = (np.float32(xs) * init["ws"] / np.float32(init["ys"])).astype(np.float32).reshape(1, -1, 1, 1)
    y = np.rint(acc.astype(np.float64) * scale) + int(init["yz"])
    return np.clip(y, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("relu, y_zp", [(False, 100), (True, 0)])
def test_qlinearconv_codes_follow_the_integer_formula(relu, y_zp):
    m = _qconv_model(relu, y_zp)
    low, stats = _lower(m)
    assert stats["qlinear_conv"] == 1 and not [n for n in low.graph.node if n.op_type in ("Conv", "Relu")]
    x = np.random.default_rng(5).standard_normal((1, 3, 8, 8)).astype(np.float32) * 2
    yq = ir.session(ir.with_outputs(low, ["yq"]), threads=1).run(["yq"], {"x": x})[0]
    ref = _reference_codes(m, x, relu)
    diff = np.abs(yq.astype(np.int32) - ref.astype(np.int32))
    assert diff.max() <= 1 and (diff == 0).mean() >= 0.995, (diff.max(), (diff == 0).mean())
    # and the QDQ original, run the way onnxruntime runs it (fused), gives the very same codes
    yq_qdq = ir.session(ir.with_outputs(m, ["yq"]), threads=1).run(["yq"], {"x": x})[0]
    assert np.array_equal(yq, yq_qdq)


# --------------------------------------------------------------------------------------- must not match
@pytest.mark.parametrize("kw, why", [
    ({"relu": True, "y_zp": 20}, "activation_not_exact"),     # the ReLU still clips: q(relu(y)) != q(y)
    ({"relu": False, "y_zp": 100, "w_zps": [0, 1, 0, 0]}, "weight_zero_points"),  # one zero point per kernel
    ({"relu": False, "y_zp": 100, "bias_scale_factor": 2.0}, "bias_scale"),     # bias not in sx·sw units
    ({"relu": False, "y_zp": 100, "y_is_output_too": True}, "float_output"),    # the float output is read too
])
def test_group_the_kernels_cannot_take_stays_qdq(kw, why):
    m = _qconv_model(**kw)
    low, stats = _lower(m)
    assert stats[f"kept_qdq.{why}"] == 1 and stats["qlinear_conv"] == 0
    assert _ops(low) == _ops(m)
    x = np.random.default_rng(6).standard_normal((1, 3, 8, 8)).astype(np.float32)
    a = ir.session(m, optimize="basic").run(None, {"x": x})
    b = ir.session(low, optimize="basic").run(None, {"x": x})
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_dynamic_weight_is_not_lowered():
    """A Conv whose weight is a graph input (not a constant) has no integer kernel form."""
    m = _qconv_model(False, 100)
    g = m.graph
    w = next(t for t in g.initializer if t.name == "w")
    g.input.append(helper.make_tensor_value_info("w", TensorProto.INT8, list(w.dims)))
    g.initializer.remove(w)
    low, stats = _lower(m)
    assert stats["kept_qdq.float_weight"] == 1 and stats["qlinear_conv"] == 0
    assert _ops(low) == _ops(m)


# ------------------------------------------------------------------------------------------- target rules
@pytest.mark.parametrize("defaults, reason", [
    ({"weight": {"dtype": "int4", "granularity": "per_channel"}}, "weight-only"),
    ({"activation": {"dtype": "int16"}}, "activation dtype int16"),
    ({"weight": {"dtype": "fp8e4m3"}}, "weight dtype fp8e4m3"),
    ({"weight": {"dtype": "int8", "granularity": "block", "block_size": 32}}, "block-wise"),
])
def test_plan_the_integer_kernels_cannot_run_is_refused_before_any_rewrite(defaults, reason, tmp_path):
    out = tmp_path / "o.onnx"
    plan = Plan.from_dict({"version": 1, "defaults": defaults, "rules": []})
    with pytest.raises(UserError, match=reason) as e:
        compile_model(MODELS / "transformer_block.onnx", out, CompileOptions(target="ort-qop", plan=plan,
                                                                             calib="random", validate=False))
    assert "target 'ort-qop': node '" in str(e.value)
    assert not out.exists()


def test_int4_weight_only_matmul_becomes_matmulnbits(tmp_path):
    out = tmp_path / "w4.onnx"
    compile_model(MODELS / "transformer_block.onnx", out, CompileOptions(target="ort-qop", preset="w4a16",
                                                                         calib="random", validate=False))
    ops = _ops(onnx.load(str(out)))
    assert ops["MatMulNBits"] == 6 and not ops["MatMulIntegerToFloat"]


def test_cli_compiles_for_the_target_and_lists_it(tmp_path):
    out = tmp_path / "cbr.onnx"
    r = CliRunner().invoke(cli, ["compile", str(MODELS / "conv_bn_relu.onnx"), "-o", str(out), "--target", "ort-qop",
                                 "--plan", "default", "--calib", str(MODELS / "conv_bn_relu.npz")])
    assert r.exit_code == 0, r.output
    assert "lower-qoperator.qlinear_conv=4" in r.output and "worst output SQNR" in r.output
    listed = CliRunner().invoke(cli, ["targets"])
    assert listed.exit_code == 0 and "ort-qop:" in listed.output and "QLinearConv" in listed.output


# ---------------------------------------------------------------------------- dtype pairs the kernels take
@pytest.mark.parametrize("name", ["conv_bn_relu", "gemm_head", "transformer_block"])
@pytest.mark.parametrize("weight, activation", [
    ({"dtype": "uint8"}, {"dtype": "int8"}),  # no onnxruntime kernel for int8 x uint8: stays QDQ
    ({"dtype": "uint8", "symmetric": False, "granularity": "per_tensor"}, {"dtype": "uint8"}),
    ({"dtype": "int8"}, {"dtype": "int8", "symmetric": True}),
])
def test_every_dtype_pair_runs_and_keeps_the_ort_accuracy(name, weight, activation, tmp_module):
    plan = Plan.from_dict({"version": 1, "defaults": {"weight": weight, "activation": activation}, "rules": []})
    qop = _compile(name, tmp_module, "ort-qop", plan)
    qdq = _compile(name, tmp_module, "ort", plan)
    feeds = _held(name)
    ref = _run(onnx.load(str(MODELS / f"{name}.onnx")), feeds)[0]
    got, want = _run(qop, feeds)[0], _run(qdq, feeds)[0]
    int_ops = {"QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm"} & set(_ops(qop))
    if weight["dtype"] == "uint8" and activation["dtype"] == "int8":
        assert not int_ops  # every group kept as QDQ (kept_qdq.kernel_types): the very same graph runs
        assert np.array_equal(got, want)
    else:
        assert int_ops
        assert _sqnr(ref, got) >= _sqnr(ref, want) - 0.1


def test_output_of_another_integer_type_is_not_fused(tmp_module):
    """conv2 reads int8 between uint8 layers: conv1 (uint8 in, int8 out) and conv2 (int8 in, uint8 out) would write
    another type than they read, which no integer kernel does, so both stay QDQ (kept_qdq.output_type) and the
    file still runs, as accurate as the ort file; the block's convs, uint8 throughout, become QLinearConv."""
    plan = Plan.from_dict({"version": 1, "defaults": {"activation": {"dtype": "uint8"}},
                           "rules": [{"match": {"name": "conv2"}, "activation": {"dtype": "int8"}}]})
    qop = _compile("conv_bn_relu", tmp_module, "ort-qop", plan)
    qdq = _compile("conv_bn_relu", tmp_module, "ort", plan)
    convs = {n.name: n.op_type for n in qop.graph.node if n.name in ("conv1", "conv2", "block.conv1")}
    assert convs == {"conv1": "Conv", "conv2": "Conv", "block.conv1": "QLinearConv"}
    feeds = _held("conv_bn_relu")
    ref = _run(onnx.load(str(MODELS / "conv_bn_relu.onnx")), feeds)[0]
    assert _sqnr(ref, _run(qop, feeds)[0]) >= _sqnr(ref, _run(qdq, feeds)[0]) - 0.1


def test_w8a8_preset_places_as_for_ort(tmp_module):
    """The w8a8 preset's targets section sets requantize_conv_outputs: false for ort and ort-qop alike: the
    integer ops in the ort-qop file are the ones onnxruntime fuses from the ort file, same outputs."""
    qop = _compile("conv_bn_relu", tmp_module, "ort-qop", "w8a8")
    qdq = _compile("conv_bn_relu", tmp_module, "ort", "w8a8")
    fused = {op: n for op, n in ir.optimized_op_types(qdq).items() if op in ("QLinearConv", "QGemm")}
    assert {op: n for op, n in _ops(qop).items() if op in ("QLinearConv", "QGemm")} == fused
    assert fused.get("QLinearConv", 0) < 4  # fewer than with the default placement (4 QLinearConv)
    feeds = _held("conv_bn_relu")
    for g, w in zip(_run(qop, feeds), _run(qdq, feeds)):
        assert float(np.abs(g - w).max()) <= 1e-6 * float(np.abs(w).max())


def test_activation_by_activation_matmul_is_lowered_like_onnxruntime_fuses_it(tmp_module):
    """A plan that quantizes every MatMul's inputs (attention's Q·Kᵀ and P·V included): the two activation ×
    activation MatMuls become integer ops too — as many as onnxruntime fuses from the ort file (it writes one
    QLinearMatMul where it has moved the next layer's QuantizeLinear up through a Transpose / Reshape; the
    lowering keeps that MatMul's float output: MatMulIntegerToFloat, then the Q where the plan put it)."""
    plan = Plan.from_dict({"version": 1, "rules": [{"match": {"op_type": "MatMul"}, "activation": {"dtype": "uint8"}}]})
    qop = _compile("transformer_block", tmp_module, "ort-qop", plan)
    qdq = _compile("transformer_block", tmp_module, "ort", plan)
    kinds = ("QLinearMatMul", "MatMulIntegerToFloat")
    fused = {op: n for op, n in ir.optimized_op_types(qdq).items() if op in kinds}
    assert sum(fused.values()) == 8  # six weight MatMuls + two activation x activation
    assert _ops(qop)["MatMulIntegerToFloat"] == 8 and "MatMul" not in _ops(qop)
    feeds = _held("transformer_block")
    ref = _run(onnx.load(str(MODELS / "transformer_block.onnx")), feeds)[0]
    got, want = _run(qop, feeds)[0], _run(qdq, feeds)[0]
    assert _sqnr(ref, got) >= _sqnr(ref, want) - 0.1 and _sqnr(want, got) > 45.0
