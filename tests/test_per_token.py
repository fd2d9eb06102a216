"""``granularity: per_token`` (``calibration: dynamic``): one run-time scale per row of a MatMul input — the codes
bit for bit the numpy oracle's, the ort lowering to MatMulInteger equal to the reference form, SQNR against the
per-tensor DynamicQuantizeLinear, and the plan / target refusals."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from _graphs import Builder, vi

from qcompiler import ir, quant
from qcompiler.api import CompileOptions, compile_model
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_manager import PassManager
from qcompiler.core.registry import build_pipeline
from qcompiler.plan import Plan
from qcompiler.runtime_targets import DEFAULT_PIPELINE, get_target

MODELS = Path(__file__).resolve().parent.parent / "models"
TB = MODELS / "transformer_block.onnx"
NO_LOWER = DEFAULT_PIPELINE.replace(",lower", "")


def dynamic_plan(granularity: str = "per_token", dtype: str = "uint8", symmetric: bool = False,
                 ops: tuple[str, ...] = ("MatMul", "Gemm")) -> dict:
    return {"defaults": {"weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": True},
                         "activation": {"dtype": "float"}},
            "rules": [{"match": {"op_type": list(ops)},
                       "activation": {"dtype": dtype, "granularity": granularity, "symmetric": symmetric,
                                      "calibration": "dynamic"}}]}


def matmul_model(k: int = 48, n: int = 24, opset: int = 17) -> onnx.ModelProto:
    b = Builder(21)
    b.node("MatMul", ["x", b.init("w", b.randn(k, n, scale=0.2))], ["y0"], name="mm")
    b.node("Add", ["y0", b.init("bias", b.randn(n, scale=0.1))], ["y"], name="bias")
    return b.model([vi("x", ["N", 8, k])], [vi("y", ["N", 8, n])], opset=opset)


def outlier_rows(seed: int, k: int = 48) -> np.ndarray:
    """[2, 8, k]: normal rows, rows scaled 100x (outlier tokens), an all-zero row, an all-positive row, an
    all-negative row, a constant row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 8, k)).astype(np.float32)
    x[0, 1] *= 100.0
    x[1, 5] *= 300.0
    x[0, 2] = 0.0
    x[0, 3] = np.abs(x[0, 3]) + 0.5
    x[0, 4] = -np.abs(x[0, 4]) - 2.0
    x[1, 0] = 0.37
    return x


def _ctx(model: onnx.ModelProto, plan: dict, pipeline: str) -> tuple[CompileContext, dict]:
    graph, meta = ir.import_graph(model)
    ctx = CompileContext(graph=graph, meta=meta, plan=Plan.from_dict(plan), target=get_target("ort"))
    return ctx, {r.name: r.stats for r in PassManager(build_pipeline(pipeline)).run(ctx)}


@pytest.mark.parametrize("dtype,symmetric", [("uint8", False), ("int8", True)])
@pytest.mark.parametrize("opset", [17, 18])
def test_codes_equal_the_numpy_oracle_bit_for_bit(dtype, symmetric, opset):
    ctx, stats = _ctx(matmul_model(opset=opset), dynamic_plan(dtype=dtype, symmetric=symmetric),
                      "cleanup,resolve-plan,calibrate,insert-qdq")
    assert stats["insert-qdq"][f"activations_{dtype}_per_token"] == 1
    names = ["x:pt_q", "x:pt_s"] + ([] if symmetric else ["x:pt_zp"])
    sess = ir.graph_session(ctx.graph, names)
    for seed in range(4):
        x = outlier_rows(seed)
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
        q = quant.per_token_codes(x, dtype, symmetric)
        s, z = quant.per_token_qparams(x, dtype, symmetric)
        assert got["x:pt_q"].dtype == q.dtype and np.array_equal(got["x:pt_q"], q)
        assert np.array_equal(got["x:pt_s"].view(np.uint32), s.view(np.uint32))  # the same float32 bits
        if not symmetric:
            assert np.array_equal(got["x:pt_zp"], z)
        # one scale per row: an outlier row does not coarsen the others
        assert got["x:pt_s"].shape == (2, 8, 1) and got["x:pt_s"][0, 0, 0] < got["x:pt_s"][0, 1, 0] / 20
    # the all-zero row dequantizes to exactly 0; every row within half a step
    x = outlier_rows(0)
    dq = quant.per_token_dequantize(x, dtype, symmetric)
    s, _ = quant.per_token_qparams(x, dtype, symmetric)
    assert np.all(dq[0, 2] == 0.0) and np.all(np.abs(dq - x) <= s * 0.5001)


def test_ort_lowering_is_matmulinteger_and_equals_the_reference(tmp_path):
    model = matmul_model()
    src = tmp_path / "mm.onnx"
    onnx.save(model, src)
    ref, low = tmp_path / "ref.onnx", tmp_path / "low.onnx"
    compile_model(src, ref, CompileOptions(plan=Plan.from_dict(dynamic_plan()), validate=False, pipeline=NO_LOWER))
    res = compile_model(src, low, CompileOptions(plan=Plan.from_dict(dynamic_plan()), validate=False))
    lowered = onnx.load(str(low))
    onnx.checker.check_model(lowered, full_check=True)
    ops = Counter(n.op_type for n in lowered.graph.node)
    assert ops["MatMulInteger"] == 1 and ops["MatMul"] == 0 and ops["DequantizeLinear"] == 0
    assert next(r for r in res.records if r.name == "lower").stats["ort-per-token-matmul.per_token_matmul"] == 1
    assert ir.optimized_op_types(lowered).get("MatMulInteger") == 1  # onnxruntime runs the integer kernel
    r_sess, l_sess = ir.session(str(ref), optimize=False), ir.session(str(low))
    f_sess = ir.session(str(src))
    for seed in range(3):
        x = outlier_rows(seed)
        a, b, f = r_sess.run(None, {"x": x})[0], l_sess.run(None, {"x": x})[0], f_sess.run(None, {"x": x})[0]
        # exact int32 products, scaled once: the reference's float products up to rounding
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), np.abs(a - b).max()
        assert quant.sqnr_db(f, b) > 30.0  # 8-bit per row on the 100x / 300x outlier rows too


def test_lowering_twice_and_insert_qdq_twice_change_nothing():
    ctx, _ = _ctx(matmul_model(), dynamic_plan(), "cleanup,resolve-plan,calibrate,insert-qdq")
    again = build_pipeline("insert-qdq")[0].run(ctx)
    assert not again.modified and again.stats["activation_already_quantized"] == 1
    lower = build_pipeline("ort-per-token-matmul")[0]
    first = lower.run(ctx)
    assert first.modified and first.stats["per_token_matmul"] == 1
    once = ir.export_model(ctx.graph, ctx.meta).SerializeToString()
    second = lower.run(ctx)
    assert not second.modified and ir.export_model(ctx.graph, ctx.meta).SerializeToString() == once


def test_int8_codes_keep_the_reference_form(tmp_path):
    src = tmp_path / "mm.onnx"
    onnx.save(matmul_model(), src)
    res = compile_model(src, tmp_path / "s8.onnx", CompileOptions(plan=Plan.from_dict(
        dynamic_plan(dtype="int8", symmetric=True)), validate=False))
    assert next(r for r in res.records if r.name == "lower").stats["ort-per-token-matmul.skipped.int8_codes"] == 1
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "s8.onnx")).graph.node)
    assert ops["MatMulInteger"] == 0 and ops["MatMul"] == 1


def _tb_sqnr(out: Path) -> float:
    feeds = [{"x": v} for v in np.load(MODELS / "transformer_block.npz")["x"]]
    a, b = ir.session(str(TB)), ir.session(str(out))
    ref = np.concatenate([a.run(None, f)[0].ravel() for f in feeds])
    got = np.concatenate([b.run(None, f)[0].ravel() for f in feeds])
    return quant.sqnr_db(ref, got)


def test_transformer_block_per_token_beats_per_tensor(tmp_path):
    sq = {}
    for g in ("per_tensor", "per_token"):
        out = tmp_path / f"{g}.onnx"
        res = compile_model(TB, out, CompileOptions(plan=Plan.from_dict(dynamic_plan(g)), validate=False))
        sq[g] = _tb_sqnr(out)
        stats = next(r for r in res.records if r.name == "insert-qdq").stats
        if g == "per_token":
            # the 4 weight MatMul inputs and attention's Q and P rows per token; K and V (read along the
            # reduction axis) one run-time scale per tensor
            assert stats["activations_uint8_per_token"] == 6 and stats["activations_uint8_per_token_as_per_tensor"] == 2
            lowered = next(r for r in res.records if r.name == "lower").stats
            assert lowered["ort-per-token-matmul.per_token_matmul"] == 6
    # measured: per tensor 33.4 dB, per token 36.8 dB (32 samples)
    assert sq["per_token"] >= sq["per_tensor"] + 2.0, sq


def test_plan_and_target_refusals():
    with pytest.raises(UserError, match=r"granularity per_token is measured at run time, for activations: set "
                                        r"calibration dynamic"):
        Plan.from_dict({"defaults": {"activation": {"dtype": "uint8", "granularity": "per_token"}}})
    with pytest.raises(UserError, match=r"per_token quantizes each row at run time as uint8 asymmetric"):
        Plan.from_dict({"defaults": {"activation": {"dtype": "uint8", "granularity": "per_token", "symmetric": True,
                                                    "calibration": "dynamic"}}})
    with pytest.raises(UserError, match=r"granularity per_token is measured at run time"):
        Plan.from_dict({"defaults": {"weight": {"dtype": "int8", "granularity": "per_token"}}})
    # a Conv's activation: no rows to multiply — the target names the node
    b = Builder(3)
    b.node("Conv", ["x", b.init("w", b.randn(4, 3, 3, 3))], ["y"], name="conv")
    conv = b.model([vi("x", [1, 3, 8, 8])], [vi("y", [1, 4, 6, 6])])
    with pytest.raises(UserError, match=r"^target 'ort': node 'conv' \(Conv, rules\[0\] \(op_type=Conv\)\): activation granularity "
                                        r"per_token \(run-time scales per row\) is not supported \(only for Gemm, "
                                        r"MatMul\)$"):
        _ctx(conv, dynamic_plan(ops=("Conv",)), "cleanup,resolve-plan")
    with pytest.raises(UserError, match="target 'tensorrt'"):
        graph, meta = ir.import_graph(matmul_model())
        ctx = CompileContext(graph=graph, meta=meta, plan=Plan.from_dict(dynamic_plan()), target=get_target("tensorrt"))
        PassManager(build_pipeline("cleanup,resolve-plan")).run(ctx)
