"""``calibration: dynamic``: activations quantized at run time (DynamicQuantizeLinear), no calibration data;
onnxruntime's DynamicQuantizeMatMul on ``ort``, written into the file on ``ort-qop``; refused where a target has
no kernel for it."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan
from qcompiler.runtime_targets import DEFAULT_PIPELINE

MODELS = Path(__file__).resolve().parent.parent / "models"
TB = MODELS / "transformer_block.onnx"
NO_LOWER = DEFAULT_PIPELINE.replace(",lower", "")


def _feeds(name: str, lo: int = 16, hi: int = 32) -> list[dict[str, np.ndarray]]:
    data = dict(np.load(MODELS / f"{name}.npz"))
    return [{k: v[i] for k, v in data.items()} for i in range(lo, hi)]


def _sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    r = ref.astype(np.float64).ravel()
    d = r - x.astype(np.float64).ravel()
    return float(10 * np.log10((r @ r) / (d @ d)))


def _outputs(path: Path | str, feeds: list[dict[str, np.ndarray]], optimize: object = True) -> np.ndarray:
    s = ir.session(str(path), optimize=optimize)
    return np.concatenate([s.run(None, f)[0].ravel() for f in feeds])


def test_preset_needs_no_data_and_runs_as_dynamic_quantize_matmul(tmp_path, caplog):
    out = tmp_path / "tb.onnx"
    with caplog.at_level(logging.WARNING):
        res = compile_model(TB, out, CompileOptions(preset="w8a8-dynamic", validate=False))
    assert "synthetic" not in caplog.text  # nothing was calibrated on random data
    cal = res.report["calibration"]
    assert cal["source"] is None and cal["dynamic"] == 8 and cal["samples"] == 0  # 6 weight + 2 act x act MatMuls
    stats = next(r.stats for r in res.records if r.name == "insert-qdq")
    assert stats["activations_uint8_dynamic"] == 8 and stats["weights_int8_per_channel"] == 6
    model = onnx.load(str(out))
    ir.check_model(model, where="dynamic")
    ops = Counter(n.op_type for n in model.graph.node)
    # the six weight MatMuls are onnxruntime's DynamicQuantizeMatMul (ort-dynamic-matmul); the two activation x
    # activation ones keep DynamicQuantizeLinear -> DequantizeLinear on both inputs (onnxruntime fuses those)
    assert ops["DynamicQuantizeMatMul"] == 6 and ops["DynamicQuantizeLinear"] == 4 and "QuantizeLinear" not in ops
    fused = ir.optimized_op_types(model)
    assert fused.get("DynamicQuantizeMatMul", 0) + fused.get("MatMulIntegerToFloat", 0) == 8
    assert "MatMul" not in fused  # every MatMul runs an integer kernel
    feeds = _feeds("transformer_block")
    ref = _outputs(TB, feeds)
    assert _sqnr(ref, _outputs(out, feeds)) > 30.0  # measured 33.4 dB (static minmax W8A8: 32.8)
    # the same graph without onnxruntime's fusion: the reference semantics, within float rounding
    assert _sqnr(_outputs(out, feeds, optimize=False), _outputs(out, feeds)) > 60.0


def _dyn_matmul_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array((rng.standard_normal((16, 8)) * 0.3).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_run_time_codes_follow_dynamic_quantize_linear(tmp_path):
    """The dequantized input equals numpy's DynamicQuantizeLinear: s = (max(x, 0) − min(x, 0)) / 255,
    z = round(−min(x, 0) / s), q = sat(round(x / s) + z), x̂ = (q − z)·s — per run, so each input its own range."""
    src = tmp_path / "mm.onnx"
    onnx.save(_dyn_matmul_model(), str(src))
    out = tmp_path / "mm.q.onnx"  # the generic QDQ form (no lowering): DynamicQuantizeLinear -> DequantizeLinear
    compile_model(src, out, CompileOptions(preset="w8a8-dynamic", validate=False, pipeline=NO_LOWER))
    model = ir.with_outputs(onnx.load(str(out)), ["x:dq"])
    sess = ir.session(model, optimize=False)
    rng = np.random.default_rng(4)
    for scale in (0.01, 1.0, 50.0):  # ranges 5000x apart: each run quantizes at its own
        x = (rng.standard_normal((4, 16)) * scale).astype(np.float32)
        got = sess.run(["x:dq"], {"x": x})[0]
        lo, hi = np.float32(min(x.min(), 0.0)), np.float32(max(x.max(), 0.0))
        s = np.float32((hi - lo) / np.float32(255))
        z = np.clip(np.rint(-lo / s), 0, 255)
        q = np.clip(np.rint(x / s) + z, 0, 255)
        want = ((q - z) * s).astype(np.float32)
        assert np.abs(got - want).max() <= s * 1e-5
        assert np.abs(got - x).max() <= s / 2 + s * 1e-5  # half a step of its own range


def test_mixed_static_and_dynamic_plan_calibrates_only_the_static_tensors(tmp_path):
    plan = Plan.from_dict({"version": 1, "rules": [
        {"match": {"op_type": "MatMul"}, "activation": {"dtype": "uint8", "symmetric": False,
                                                        "calibration": "dynamic"}}]})
    out = tmp_path / "gh.onnx"
    res = compile_model(MODELS / "gemm_head.onnx", out, CompileOptions(plan=plan, calib=str(MODELS / "gemm_head.npz"),
                                                                      validate=False))
    cal = res.report["calibration"]
    assert cal["dynamic"] == 1 and cal["tensors"] >= 1 and cal["samples"] == 32
    assert cal["methods"] == {"minmax": cal["tensors"], "dynamic": 1}
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["DynamicQuantizeMatMul"] == 1 and ops["QuantizeLinear"] >= 1  # fc3: MatMul + bias Add
    feeds = _feeds("gemm_head")
    assert _sqnr(_outputs(MODELS / "gemm_head.onnx", feeds), _outputs(out, feeds)) > 25.0


def test_ort_qop_writes_dynamic_quantize_matmul(tmp_path):
    qop, qdq = tmp_path / "qop.onnx", tmp_path / "qdq.onnx"
    compile_model(TB, qop, CompileOptions(preset="w8a8-dynamic", validate=False, target="ort-qop"))
    compile_model(TB, qdq, CompileOptions(preset="w8a8-dynamic", validate=False))
    ops = Counter(n.op_type for n in onnx.load(str(qop)).graph.node)
    assert ops["DynamicQuantizeMatMul"] == 6 and ops["MatMulIntegerToFloat"] == 2 and "MatMul" not in ops
    assert "DequantizeLinear" not in ops
    feeds = _feeds("transformer_block")
    got, want = _outputs(qop, feeds), _outputs(qdq, feeds)
    assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())


@pytest.mark.parametrize("target, model, plan, why", [
    ("ort", "conv_bn_relu", "version: 1\ndefaults: {activation: {dtype: uint8, symmetric: false, calibration: dynamic}}\n",
     r"node 'conv1' \(Conv, plan defaults\): activations quantized at run time \(calibration dynamic\) run on "
     r"this target for Gemm, MatMul only"),
    ("tensorrt", "transformer_block", None,
     r"target 'tensorrt': node '.*'.*: this target does not run activations quantized at run time"),
    ("qonnx", "transformer_block", None,
     r"target 'qonnx': node '.*'.*: this target does not run activations quantized at run time"),
    ("ort", "conv_bn_relu", "version: 1\ndefaults: {activation: {dtype: int8, calibration: dynamic}}\n",
     r"calibration dynamic quantizes at run time with DynamicQuantizeLinear, which writes uint8"),
])
def test_refused_where_it_cannot_run(target, model, plan, why, tmp_path):
    opts = CompileOptions(target=target, validate=False, calib="random")
    if plan is None:
        opts.preset = "w8a8-dynamic"
    else:
        (tmp_path / "p.yaml").write_text(plan)
        opts.plan = str(tmp_path / "p.yaml")
    with pytest.raises(UserError, match=why):
        compile_model(MODELS / f"{model}.onnx", tmp_path / "o.onnx", opts)
    assert not (tmp_path / "o.onnx").exists()


def test_data_free_mode_leaves_dynamic_tensors_dynamic(tmp_path):
    """--calib none gives BN-derived ranges to the tensors it can (relu2 follows fc2's folded BatchNorm); a tensor
    the plan quantizes at run time stays so."""
    plan = Plan.from_dict({"version": 1, "rules": [
        {"match": {"op_type": "MatMul"}, "activation": {"dtype": "uint8", "symmetric": False,
                                                        "calibration": "dynamic"}}]})
    out = tmp_path / "gh.onnx"
    res = compile_model(MODELS / "gemm_head.onnx", out, CompileOptions(plan=plan, calib="none", validate=False))
    assert res.report["calibration"]["dynamic"] == 1 and res.report["data_free"]["bn_ranges"] >= 1
    nodes = onnx.load(str(out)).graph.node
    assert [n.input[0] for n in nodes if n.op_type == "DynamicQuantizeMatMul"] == ["relu2"]
    assert "relu2" not in [n.input[0] for n in nodes if n.op_type == "QuantizeLinear"]


def test_targets_command_says_where_dynamic_runs():
    from click.testing import CliRunner

    from qcompiler.cli import cli

    r = CliRunner().invoke(cli, ["targets", "--json"])
    assert r.exit_code == 0
    import json

    data = json.loads(r.output)
    assert {name: d["dynamic_activation_ops"] for name, d in data.items()} == {
        "ort": ["Gemm", "MatMul"], "ort-qop": ["Gemm", "MatMul"], "packed": ["Gemm", "MatMul"], "qonnx": [],
        "tensorrt": []}


@pytest.mark.parametrize("target", ["ort", "ort-qop"])
def test_gemm_and_matmul_with_bias_become_dynamic_quantize_matmul(target, tmp_path):
    """gemm_head: two Gemms (transB, bias) and a 2-D MatMul + bias Add. onnxruntime would turn the MatMul + Add
    into a float Gemm and fuse no Gemm; the lowering writes DynamicQuantizeMatMul for all three, biases
    absorbed, and the outputs equal the QDQ form's (the same products, summed in int32)."""
    plan = Plan.from_dict({"version": 1, "defaults": {"activation": {"dtype": "float"}}, "rules": [
        {"match": {"op_type": ["MatMul", "Gemm"]},
         "activation": {"dtype": "uint8", "symmetric": False, "calibration": "dynamic"}}]})
    src = MODELS / "gemm_head.onnx"
    low, ref = tmp_path / "low.onnx", tmp_path / "qdq.onnx"
    res = compile_model(src, low, CompileOptions(plan=plan, validate=False, target=target))
    compile_model(src, ref, CompileOptions(plan=plan, validate=False, target=target, pipeline=NO_LOWER))
    stats = {k: v for r in res.records if r.name == "lower" for k, v in r.stats.items()}
    assert stats["ort-dynamic-matmul.dynamic_quantize_matmul"] == 3 and stats["ort-dynamic-matmul.bias"] == 3
    model = onnx.load(str(low))
    assert Counter(n.op_type for n in model.graph.node) == {"DynamicQuantizeMatMul": 3, "Relu": 2}
    assert {op: n for op, n in ir.optimized_op_types(model).items()} == {"DynamicQuantizeMatMul": 3, "Relu": 2}
    feeds = _feeds("gemm_head")
    want = _outputs(ref, feeds, optimize=False)
    got = _outputs(low, feeds)
    assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())
    # and against the float model: above the static default plan (measured 31.5 vs 28.8 dB)
    static = tmp_path / "static.onnx"
    compile_model(src, static, CompileOptions(plan="default", calib=str(MODELS / "gemm_head.npz"), validate=False))
    flt = _outputs(src, feeds)
    assert _sqnr(flt, got) > _sqnr(flt, _outputs(static, feeds)) + 1.0


def _dyn_gemm_model(alpha: float = 1.0, shared: bool = False) -> onnx.ModelProto:
    """x -> Gemm(transB, bias) -> y, and (shared) a second Gemm reading the same weight."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 16)) * 0.3).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")]
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="fc", transB=1, alpha=alpha)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])]
    if shared:
        nodes.append(helper.make_node("Gemm", ["x", "W", "b"], ["y2"], name="fc2", transB=1))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, [4, 8]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])], outputs,
                          inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _lower_dynamic(model: onnx.ModelProto):
    from qcompiler.core.context import CompileContext
    from qcompiler.runtime_targets import get_target
    from qcompiler.runtime_targets.ort.dynamic_matmul import OrtDynamicMatMulPass

    graph, meta = ir.import_graph(model)
    ctx = CompileContext(graph=graph, meta=meta, plan=Plan.default(), target=get_target("ort"))
    first = OrtDynamicMatMulPass().run(ctx)
    second = OrtDynamicMatMulPass().run(ctx)
    return ir.export_model(ctx.graph, meta), first, second


@pytest.mark.parametrize("alpha, shared, lowered, why", [
    (1.0, False, 1, None),
    (0.5, False, 0, "skipped.gemm_attributes"),  # alpha scales the product: no such kernel input
    (1.0, True, 2, None),  # a shared weight: both Gemms read one transposed copy of the codes
])
def test_dynamic_matmul_pass_pattern_and_idempotence(alpha, shared, lowered, why, tmp_path):
    src = tmp_path / "g.onnx"
    onnx.save(_dyn_gemm_model(alpha, shared), str(src))
    qdq = tmp_path / "g.qdq.onnx"
    compile_model(src, qdq, CompileOptions(preset="w8a8-dynamic", validate=False, pipeline=NO_LOWER))
    low, first, second = _lower_dynamic(onnx.load(str(qdq)))
    assert first.stats["dynamic_quantize_matmul"] == lowered and not second.modified  # a second run: nothing
    if why:
        assert first.stats[why] == 1
    ir.check_model(low, where="lowered")
    if lowered:
        int8 = [t for t in low.graph.initializer if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
        assert len(int8) == 1 and list(int8[0].dims) == [16, 8]  # one copy of the codes, transposed
    x = np.random.default_rng(8).standard_normal((4, 16)).astype(np.float32)
    want = ir.session(onnx.load(str(qdq)), optimize=False).run(None, {"x": x})
    got = ir.session(low).run(None, {"x": x})
    for g, w in zip(got, want):
        assert float(np.abs(g - w).max()) <= 1e-5 * float(np.abs(w).max())
