"""``scale: float16``: weight scales stored as float16 and cast to float in the graph.

Exact codes against a numpy oracle on the float16-rounded (up) grid; onnxruntime's ``Cast → DequantizeLinear``
equal to numpy's float32 product bit for bit; the file smaller by two bytes per scale; the ort lowerings
(MatMulNBits, load-time dequantization, QLinearConv / QGemm with an int32 bias scale computed in the graph, Gather
tables); GPTQ on the rounded grid; refusals (activations, low-bit schemes, other targets, a scale beyond 65504);
the plan round trip and the planner's ``/f16`` candidates and its one-layer scale step.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from _graphs import Builder, gptq_chain_model, vi
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir, quant
from qcompiler.api import CompileOptions, compile_model
from qcompiler.autoplan import parse_candidates
from qcompiler.autoplan.scales import Move, ScaleStep, moves
from qcompiler.cli import cli
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan

MODELS = Path(__file__).resolve().parent.parent / "models"
NO_LOWER = "cleanup,fold-batchnorm,cleanup,resolve-plan,calibrate,insert-qdq"
F16_BLOCK = {"dtype": "int4", "granularity": "block", "block_size": 32, "symmetric": True, "scale": "float16"}


def _plan(weight: dict[str, Any], activation: dict[str, Any] | None = None, **extra: Any) -> Plan:
    return Plan.from_dict({"version": 1, "defaults": {"weight": weight, "activation": activation or {"dtype": "float"}},
                           **extra}, source="test-plan")


def _inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _producer(m: onnx.ModelProto, name: str) -> onnx.NodeProto | None:
    return next((n for n in m.graph.node if name in n.output), None)


def _matmul(tmp_path: Path, w: np.ndarray, seed: int = 0) -> tuple[Path, Path]:
    k, n = w.shape
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "t",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    src = tmp_path / "mm.onnx"
    onnx.save(m, src)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(seed).standard_normal((4, 2, k)).astype(np.float32))
    return src, tmp_path / "c.npz"


def _compile(src: Path, calib: Path, out: Path, plan: Plan, pipeline: str | None = None, target: str = "ort") -> Any:
    return compile_model(src, out, CompileOptions(plan=plan, calib=str(calib), validate=False, target=target,
                                                  **({"pipeline": pipeline} if pipeline else {})))


# --------------------------------------------------------------------------------------------- arithmetic
def test_float16_scale_is_the_smallest_float16_not_below():
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.uniform(1e-4, 10, 500), [1e-7, 3e-8, 6.1e-5, 65504.0, 0.1, 1.0]]).astype(np.float32)
    r = quant.float16_scale(s)
    assert r.dtype == np.float32
    np.testing.assert_array_equal(r.astype(np.float16).astype(np.float32), r)  # float16 values
    assert np.all(r >= s) and np.all(r > 0)
    below = np.nextafter(r.astype(np.float16), np.float16(0)).astype(np.float32)
    assert np.all(below < s)  # the smallest such float16
    normal = s >= 6.104e-5
    assert np.all(r[normal] <= s[normal] * (1 + 2.0**-10))
    with pytest.raises(quant.Float16ScaleError, match="65504"):
        quant.float16_scale(np.float32(70000.0))


def test_quantize_weight_f16_codes_are_on_the_rounded_grid():
    w = (np.random.default_rng(1).standard_normal((64, 16)) * 0.3).astype(np.float32)
    qt = quant.quantize_weight(w, "int4", True, 0, 32, f16=True)
    s16 = quant.float16_scale(np.abs(w).reshape(2, 32, 16).max(axis=1) / 7)
    np.testing.assert_array_equal(qt.scale, s16)
    exp = np.clip(np.rint(w / np.repeat(s16, 32, axis=0)), -8, 7)
    np.testing.assert_array_equal(qt.q.astype(np.int64), exp)


# ------------------------------------------------------------------------------------------- insert-qdq
def test_block_int4_float16_scale_codes_cast_and_exact_dequantization(tmp_path):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 16)) * 0.2).astype(np.float32)
    w[:32, 5] *= 1e-4  # a block whose scale is a float16 subnormal (~5e-6)
    src, calib = _matmul(tmp_path, w)
    out = tmp_path / "q.onnx"
    res = _compile(src, calib, out, _plan(F16_BLOCK), NO_LOWER)
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    inits = {t.name: t for t in q.graph.initializer}
    dq = _producer(q, next(n for n in q.graph.node if n.name == "mm").input[1])
    assert dq is not None and dq.op_type == "DequantizeLinear"
    cast = _producer(q, dq.input[1])
    assert cast is not None and cast.op_type == "Cast" and helper.get_attribute_value(cast.attribute[0]) == 1
    assert (dq.input[1], cast.input[0]) == ("w:s", "w:s16")
    assert inits["w:s16"].data_type == TensorProto.FLOAT16
    s16 = numpy_helper.to_array(inits["w:s16"]).astype(np.float32)
    codes = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int64)
    oracle_s = quant.float16_scale(np.abs(w).reshape(2, 32, 16).max(axis=1).astype(np.float64) / 7)
    np.testing.assert_array_equal(s16, oracle_s)
    assert 0 < s16[0, 5] < 6.104e-5  # subnormal, stored exactly
    np.testing.assert_array_equal(codes, np.clip(np.rint(w / np.repeat(s16, 32, axis=0)), -8, 7))
    # onnxruntime (unoptimized: the QDQ form itself) gives x @ (codes * float32(s16)) — with x = I, bit for bit
    y = ir.session(q, threads=1, optimize=False).run(None, {"x": np.eye(64, dtype=np.float32)})[0]
    ref = (codes.astype(np.float32) * np.repeat(s16, 32, axis=0)).astype(np.float32)
    np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))
    stats = next(r for r in res.records if r.name == "insert-qdq").stats
    assert stats["weight_scales_float16"] == 32


def test_file_smaller_by_two_bytes_per_scale(tmp_path):
    w = (np.random.default_rng(4).standard_normal((128, 64)) * 0.2).astype(np.float32)
    src, calib = _matmul(tmp_path, w)
    sizes = {}
    for tag, scale in (("f32", "float"), ("f16", "float16")):
        out = tmp_path / f"{tag}.onnx"
        _compile(src, calib, out, _plan({**F16_BLOCK, "scale": scale}), NO_LOWER)
        sizes[tag] = sum(v.nbytes for v in _inits(onnx.load(str(out))).values() if v.dtype != ml_dtypes.int4)
        sizes[tag + "_scales"] = sum(v.size for v in _inits(onnx.load(str(out))).values()
                                     if v.dtype in (np.float16, np.float32))
    n_scales = (128 // 32) * 64
    assert sizes["f32_scales"] == sizes["f16_scales"] == n_scales
    assert sizes["f32"] - sizes["f16"] == 2 * n_scales


def test_ort_target_lowers_float16_block_matmul_to_matmulnbits_exactly(tmp_path):
    """MatMulNBits takes scales of its input's type: the float16 values are written float32 (exact); the result is
    the DequantizeLinear's product."""
    w = (np.random.default_rng(5).standard_normal((64, 32)) * 0.2).astype(np.float32)
    src, calib = _matmul(tmp_path, w)
    out, ref_out = tmp_path / "f16.onnx", tmp_path / "qdq.onnx"
    res = _compile(src, calib, out, _plan(F16_BLOCK))
    _compile(src, calib, ref_out, _plan(F16_BLOCK), NO_LOWER)
    q = onnx.load(str(out))
    assert [n.op_type for n in q.graph.node] == ["MatMulNBits"]
    nb = next(r for r in res.records if r.name == "lower").stats
    assert nb.get("lower-matmulnbits.float16_scales_written_float32", nb.get("float16_scales_written_float32")) == 1
    x = np.random.default_rng(6).standard_normal((5, 64)).astype(np.float32)
    y = ir.session(q, threads=1).run(None, {"x": x})[0]
    y_ref = ir.session(onnx.load(str(ref_out)), threads=1, optimize=False).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * float(np.abs(y_ref).max()))


@pytest.mark.parametrize("fixture", ["conv_bn_relu", "gemm_head", "depthwise"])
def test_int8_per_channel_float16_scales_keep_onnxruntime_kernels(fixture, tmp_path):
    """int8 per-channel weights with float16 scales: onnxruntime folds the Cast at load and fuses the same integer
    kernels as with float32 scales; an int32 bias's scale is ``Mul(Cast(s16), s_x)`` (not stored); a weight-only
    layer's load-time dequantization keeps its scale float16 (``Cast``)."""
    w8 = {"dtype": "int8", "granularity": "per_channel", "symmetric": True}
    outs = {}
    for tag, scale in (("f32", "float"), ("f16", "float16")):
        out = tmp_path / f"{tag}.onnx"
        compile_model(MODELS / f"{fixture}.onnx", out, CompileOptions(
            plan=Plan.from_dict({"defaults": {"weight": {**w8, "scale": scale}}}), calib=str(MODELS / f"{fixture}.npz"),
            validate=False))
        outs[tag] = onnx.load(str(out))
    q = outs["f16"]
    assert ir.optimized_op_types(q) == ir.optimized_op_types(outs["f32"])
    inits = _inits(q)
    assert not any(v.dtype == np.float32 and name.endswith(":s") and name.startswith(tuple(
        n.input[2] for n in q.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 2)) for name, v in
        inits.items())
    for n in q.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None \
                and inits[n.input[0]].dtype == np.int32:  # an int32 bias: its scale is computed
            mul = _producer(q, n.input[1])
            assert mul is not None and mul.op_type == "Mul"
            assert _producer(q, mul.input[0]).op_type == "Cast"
    assert any(v.dtype == np.float16 for v in inits.values())
    if fixture == "conv_bn_relu":  # its weight-only (depthwise) conv: Mul(Cast(q), Cast(s16')) folded at load
        assert any(n.op_type == "Cast" and n.input[0].endswith(":sb") for n in q.graph.node)
    data = np.load(MODELS / f"{fixture}.npz")
    feed = {k: v[0] for k, v in data.items()}
    f32 = ir.session(outs["f32"], threads=1).run(None, feed)[0]
    f16 = ir.session(q, threads=1).run(None, feed)[0]
    ref = ir.session(str(MODELS / f"{fixture}.onnx"), threads=1).run(None, feed)[0]
    assert quant.sqnr_db(ref, f16) > quant.sqnr_db(ref, f32) - 3.0  # the same grid, within float16's rounding


def test_gather_table_float16_scales_dequantized_at_load(tmp_path):
    b = Builder(7)
    table = b.init("E", b.randn(300, 64, scale=0.5))
    b.node("Gather", [table, "ids"], ["y"], name="emb")
    model = b.model([helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])], [vi("y", ["N", 64])])
    src = tmp_path / "g.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "c.npz", ids=np.arange(8, dtype=np.int64).reshape(2, 4))
    plan = Plan.from_dict({"rules": [{"match": {"op_type": "Gather"}, "weight": {
        "dtype": "int4", "granularity": "block", "block_size": 32, "symmetric": True, "scale": "float16"}}]})
    out = tmp_path / "q.onnx"
    compile_model(src, out, CompileOptions(plan=plan, calib=str(tmp_path / "c.npz"), validate=False))
    q = onnx.load(str(out))
    inits = _inits(q)
    assert "DequantizeLinear" not in [n.op_type for n in q.graph.node]
    s16 = [v for v in inits.values() if v.dtype == np.float16]
    assert len(s16) == 1 and s16[0].size == 300 * 2
    ids = np.array([0, 17, 299], dtype=np.int64)
    y = ir.session(q, threads=1).run(None, {"ids": ids})[0]
    e = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "E"))
    qt = quant.quantize_weight(e, "int4", True, 1, 32, f16=True)
    np.testing.assert_array_equal(y, qt.dequantize()[ids])


def test_gptq_uses_the_float16_grid(tmp_path):
    model = gptq_chain_model(3)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    x = model.graph.input[0]
    shape = [d.dim_value or 2 for d in x.type.tensor_type.shape.dim]
    np.savez(tmp_path / "c.npz", **{x.name: np.random.default_rng(0).standard_normal((16, *shape)).astype(np.float32)})
    plan = _plan({"dtype": "int4", "granularity": "per_channel", "symmetric": True, "scale": "float16"},
                 algorithms={"gptq": True})
    out = tmp_path / "q.onnx"
    res = compile_model(src, out, CompileOptions(plan=plan, calib=str(tmp_path / "c.npz"), validate=False))
    assert res.report["gptq"]["layers"] >= 1
    q = onnx.load(str(out))
    s16 = [v for v in _inits(q).values() if v.dtype == np.float16]
    assert s16 and len(s16) == res.report["gptq"]["layers"]
    for n in q.graph.node:  # every weight scale a float16 read through Cast
        if n.op_type == "DequantizeLinear" and _producer(q, n.input[1]) is None:
            assert numpy_helper.to_array(next(t for t in q.graph.initializer if t.name == n.input[1])).size == 1 \
                or n.input[0] not in _inits(q)


# --------------------------------------------------------------------------------------------- refusals
def test_activation_float16_scale_refused():
    with pytest.raises(UserError, match=r"rules\[0\]\.activation: scale float16 is for weights"):
        Plan.from_dict({"rules": [{"match": {"op_type": "Conv"}, "activation": {"scale": "float16"}}]}, source="p")
    with pytest.raises(UserError, match=r"defaults\.activation: scale float16 is for weights"):
        Plan.from_dict({"defaults": {"activation": {"scale": "float16"}}}, source="p")


def test_low_bit_scheme_float16_scale_refused():
    with pytest.raises(UserError, match="scale float16 stores an int scheme's scales as float16; scheme 'ternary'"):
        Plan.from_dict({"defaults": {"weight": {"scheme": "ternary", "scale": "float16"}}}, source="p")


@pytest.mark.parametrize("target", ["qonnx", "tensorrt", "ort-qop", "packed"])
def test_other_targets_refuse_float16_scales_cleanly(target, tmp_path):
    w = (np.random.default_rng(8).standard_normal((32, 16)) * 0.2).astype(np.float32)
    src, calib = _matmul(tmp_path, w)
    before = src.read_bytes()
    out = tmp_path / "q.onnx"
    w8 = {"dtype": "int8", "granularity": "per_channel", "symmetric": True, "scale": "float16"}
    with pytest.raises(UserError, match=rf"target '{target}': node 'mm' .*weight scale float16 is not supported on "
                                        r"this target \(targets running it: ort\)$"):
        _compile(src, calib, out, _plan(w8, {"dtype": "int8", "symmetric": True}), target=target)
    assert not out.exists() and src.read_bytes() == before


def test_scale_beyond_float16_refused_naming_the_node(tmp_path):
    w = np.full((32, 4), 1e6, dtype=np.float32)  # scale 1e6 / 7 > 65504
    src, calib = _matmul(tmp_path, w)
    with pytest.raises(UserError, match=r"node 'mm' \(MatMul, plan defaults\): weight 'w': scale float16: scale "
                                        r"142857 is beyond float16's largest value 65504; use scale float"):
        _compile(src, calib, tmp_path / "q.onnx", _plan(F16_BLOCK), NO_LOWER)


def test_cli_refusal_exit_2_nothing_written(tmp_path):
    from click.testing import CliRunner

    w = (np.random.default_rng(9).standard_normal((32, 16)) * 0.2).astype(np.float32)
    src, calib = _matmul(tmp_path, w)
    plan_file = tmp_path / "p.yaml"
    plan_file.write_text("version: 1\ndefaults:\n  activation: {dtype: uint8, scale: float16}\n")
    before = src.read_bytes()
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["compile", str(src), "-o", str(out), "--plan", str(plan_file), "--calib",
                                   str(calib)])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == (f"error: {plan_file}: defaults.activation: scale float16 is for "
                                                   "weights (stored scales); an activation's scale is one float32 per "
                                                   "tensor: remove scale from the activation")
    assert "Traceback" not in res.output and not out.exists() and src.read_bytes() == before


# ----------------------------------------------------------------------------------------------- plans
def test_plan_round_trip_keeps_float16_scale():
    p = Plan.from_dict({"defaults": {"weight": F16_BLOCK},
                        "rules": [{"match": {"name": "mm"}, "weight": {"dtype": "int8", "scale": "float16"}}]})
    d = p.to_dict()
    assert d["defaults"]["weight"]["scale"] == "float16" and d["rules"][0]["weight"]["scale"] == "float16"
    again = Plan.from_dict(d)
    assert again.to_dict() == d


def test_candidate_f16_suffix():
    c = parse_candidates("int4/block32/sym/f16,int4/f16,int8/channel/f16,int4/block64/f16")
    assert [x.name for x in c] == ["int4/block32/sym/f16", "int4/f16", "int8/channel/f16", "int4/block64/f16"]
    assert c[0].keys() == {"dtype": "int4", "scheme": "int", "granularity": "block", "block_size": 32,
                           "symmetric": True, "scale": "float16"}
    assert c[1].keys() == {"dtype": "int4", "scheme": "int", "scale": "float16"}
    for bad, match in (("fp32/f16", "/f16 suffix"), ("ternary/f16", "/f16 suffix"), ("int4/f16/sym", "granularity"),
                       ("int4/block32/sym/f16/x", "too many suffixes"), ("int4/f16,int4/f16", "twice")):
        with pytest.raises(UserError, match=match):
            parse_candidates(bad)


def test_scale_step_moves_largest_layers_first_and_not_predicted_worse():
    names = ["int8", "int4", "int4/block32/sym/f16", "int4/block64/sym/f16"]
    nan = np.nan
    values = np.array([[0.07, 0.02, 0.008, 0.008],   # big (66k): b32 / b64 predicted better
                       [0.0003, 0.0718, 0.0694, 0.098],  # biggest (131k): b32 better, b64 worse
                       [0.001, 0.03, 0.05, nan]])   # small: both worse or not allowed
    layer = SimpleNamespace
    res = SimpleNamespace(
        sensitivity=SimpleNamespace(candidates=names, layers=["stft", "lstm", "enc"], values=values),
        layers=[layer(name="stft", params=66048, base_weight={"dtype": "int4"}),
                layer(name="lstm", params=131072, base_weight={"dtype": "int4"}),
                layer(name="enc", params=24576, base_weight={"dtype": "int4"})],
        candidates=names, choice=[1, 1, 1], union_sensitivity=None)
    got = [(m.layer, m.candidate) for m in moves(res, uniform=True)]  # type: ignore[arg-type]
    assert got == [("lstm", "int4/block32/sym/f16"), ("stft", "int4/block32/sym/f16"),
                   ("stft", "int4/block64/sym/f16")]
    mv = moves(res, uniform=True)[0]  # type: ignore[arg-type]
    assert mv.rule == {"match": {"name": "lstm"}, "weight": {"dtype": "int4", "scheme": "int", "granularity": "block",
                                                             "block_size": 32, "symmetric": True, "scale": "float16"}}
    res.choice = [2, 1, 1]  # a mixed plan: stft already at b32/f16
    assert [(m.layer, m.candidate) for m in moves(res, uniform=False)][:2] == [  # type: ignore[arg-type]
        ("lstm", "int4/block32/sym/f16"), ("stft", "int4/block64/sym/f16")]


def test_scale_step_tries_the_float16_twin_of_a_float32_block_candidate():
    """The searches' ``int4/block32/sym`` predicts its ``/f16`` twin (the same grid up to float16 rounding); a layer
    already at ``int4/block32/sym`` is not moved to its twin (no gain to measure)."""
    names = ["int8", "int4", "int4/block32/sym", "int4/block64/sym"]
    values = np.array([[0.0003, 0.0718, 0.0706, 0.098], [0.001, 0.05, 0.01, 0.005]])
    res = SimpleNamespace(
        sensitivity=SimpleNamespace(candidates=names, layers=["lstm", "conv"], values=values),
        layers=[SimpleNamespace(name="lstm", params=131072, base_weight={"dtype": "int4"}),
                SimpleNamespace(name="conv", params=1000, base_weight={"dtype": "int4"})],
        candidates=names, choice=[1, 2], union_sensitivity=None)
    got = [(m.layer, m.candidate) for m in moves(res, uniform=False)]  # type: ignore[arg-type]
    assert got == [("lstm", "int4/block32/sym/f16"), ("conv", "int4/block64/sym/f16")]
    assert moves(res, uniform=False)[0].rule["weight"]["scale"] == "float16"  # type: ignore[arg-type]


def test_cost_report_attributes_the_float16_scale_to_its_layer(tmp_path):
    """The float16 scale reaches the layer through its Cast: the layer owns codes + 2 bytes per scale, and
    nothing is left unattributed (the planner's byte table reads these per-layer bytes)."""
    from qcompiler.report import cost

    w = (np.random.default_rng(10).standard_normal((64, 16)) * 0.2).astype(np.float32)
    src, calib = _matmul(tmp_path, w)
    out = tmp_path / "q.onnx"
    _compile(src, calib, out, _plan(F16_BLOCK), NO_LOWER)
    rep = cost.model_cost(out, feed_shapes={"x": [1, 64]})
    mm = next(la for la in rep.layers if la.name == "mm")
    assert mm.bytes == 64 * 16 // 2 + 2 * 16 * 2
    assert rep.unattributed_bytes == 0


def test_plan_cli_reports_the_float16_scale_step(tmp_path):
    """``qcompiler plan`` with calibration data runs the step and says what it measured (conv_bn_relu at 9000
    bytes: three moves measured, none kept; the plan written is the one measured before)."""
    from click.testing import CliRunner

    out = tmp_path / "p.yaml"
    res = CliRunner().invoke(cli, ["plan", str(MODELS / "conv_bn_relu.onnx"), "--budget", "9000", "--calib",
                                   str(MODELS / "conv_bn_relu.npz"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("float16 scales:"))
    assert line == ("float16 scales: 3 move(s) of one layer to finer blocks with float16 scales measured: none "
                    "better by the guard's rule within the budget")
    assert "scale: float16" not in out.read_text()


def test_a_scale_move_on_the_uniform_base_keeps_it_the_uniform_plan():
    """The planner returned the uniform base (no mix beat it) and the float16-scale step kept a move on it: the
    plan is still that base with one layer changed, so `uniform` stays set (the CLI then reports the base's bytes,
    not the mixed plan's counts and verified bytes, which `choice` / `verified` keep describing); the move's rule
    and measurement are written. PP-OCR cls, session 18: the CLI printed the mix's counts for such a plan."""
    rule = {"match": {"name": "Conv@49"}, "weight": {"dtype": "int4", "granularity": "block", "block_size": 32,
                                                     "symmetric": True, "scale": "float16"}}
    text = "# the uniform w4a8\nversion: 1\nrules:\n  - match: {op_type: Conv}\n    weight: {dtype: int4}\n"
    res = SimpleNamespace(text=text, uniform=True, baseline={}, measured={"sqnr_db": 48.8, "bytes": 142465})
    m = SimpleNamespace(sqnr_db=53.6, halves=(51.9, 56.3), cost=SimpleNamespace(total_bytes=142500))
    ScaleStep(info={"tried": 3, "kept": 1}, kept=True, measured=m, move=Move("Conv@49", "int4/block32/sym/f16",
                                                                              rule)).apply(res, "16 samples")
    assert res.uniform is True
    assert res.measured["sqnr_db"] == 53.6 and res.measured["bytes"] == 142500
    assert res.measured["without_scales"] == {"sqnr_db": 48.8, "bytes": 142465}
    assert "Conv@49" in res.text and "scale: float16" in res.text and res.baseline["scales"]["kept"] == 1
