"""Target ``ort``: QDQ placed so that onnxruntime's CPU provider fuses integer kernels (checked on the graph
onnxruntime actually runs), MatMulNBits lowering of int4 weight-only MatMul (exact against the
DequantizeLinear form), the fp8 ReLU guard, refusal of plans the target cannot run (before any rewrite), and the
capabilities ``qcompiler targets`` lists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir, quant
from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli import cli
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_manager import PassManager
from qcompiler.plan import Plan
from qcompiler.runtime_targets import DEFAULT_PIPELINE, get_target
from qcompiler.runtime_targets.ort import OrtTarget
from qcompiler.runtime_targets.ort.load_time_dequant import OrtLoadTimeDequantPass
from qcompiler.runtime_targets.ort.matmulnbits import pack_nibbles, to_matmulnbits, unpack_nibbles

MODELS = Path(__file__).resolve().parent.parent / "models"
NO_LOWER = DEFAULT_PIPELINE.replace(",lower", "")


def _plan(weight: dict[str, Any] | None = None, activation: dict[str, Any] | None = None,
          rules: list[dict[str, Any]] | None = None) -> Plan:
    return Plan.from_dict({"version": 1, "defaults": {"weight": weight or {}, "activation": activation or {}},
                           "rules": rules or []})


@pytest.fixture(scope="module")
def tmp_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ort_target")


_CACHE: dict[tuple[str, str, str], onnx.ModelProto] = {}


def compiled(name: str, tmp: Path, plan: str | Plan = "default", pipeline: str | None = None,
             key: str = "") -> onnx.ModelProto:
    """Compile fixture ``name`` with its first 16 samples as calibration (cached)."""
    k = (name, key or str(plan), pipeline or "")
    if k not in _CACHE:
        data = dict(np.load(MODELS / f"{name}.npz"))
        calib = tmp / f"{name}.calib.npz"
        if not calib.exists():
            np.savez(calib, **{kk: v[:16] for kk, v in data.items()})
        out = tmp / f"{name}.{len(_CACHE)}.onnx"
        compile_model(MODELS / f"{name}.onnx", out, CompileOptions(plan=plan, calib=str(calib), pipeline=pipeline,
                                                                   validate=False))
        _CACHE[k] = onnx.load(str(out))
    return _CACHE[k]


def _held(name: str) -> list[dict[str, np.ndarray]]:
    data = dict(np.load(MODELS / f"{name}.npz"))
    return [{k: v[i] for k, v in data.items()} for i in range(16, 32)]


def _outputs(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], optimize: bool = True) -> np.ndarray:
    s = ir.session(model, threads=1, optimize=optimize)
    return np.concatenate([s.run(None, f)[0].astype(np.float32).ravel() for f in feeds])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


# ------------------------------------------------------------------------------------ integer kernels
@pytest.mark.parametrize("name, expected, absent", [
    # Conv -> (Relu) -> Q: every Conv whose output is not a graph output becomes QLinearConv; Gemm -> QGemm;
    # a depthwise Conv computes in float (OrtTarget.refine) on a constant weight: its int8 codes are dequantized
    # when the session loads (no Cast / DequantizeLinear left for it in the optimized graph)
    ("conv_bn_relu", {"QLinearConv": 4, "Conv": 1, "QGemm": 1}, ("FusedConv", "Gemm", "Cast")),
    ("depthwise", {"QLinearConv": 2, "Conv": 1}, ("FusedConv", "Cast")),
    ("opset11_constants", {"QLinearConv": 2, "QGemm": 1}, ("Conv", "FusedConv", "Gemm")),
    ("gemm_head", {"QGemm": 2}, ()),
    # the six weight MatMuls of the block (attention q/k/v/out, MLP fc1/fc2) run as MatMulIntegerToFloat
    ("transformer_block", {"MatMulIntegerToFloat": 6}, ("QLinearMatMul",)),
])
def test_onnxruntime_fuses_integer_kernels(name, expected, absent, tmp_module):
    q = compiled(name, tmp_module)
    ops = ir.optimized_op_types(q)
    for op, n in expected.items():
        assert ops.get(op, 0) == n, (name, op, ops)
    for op in absent:
        assert op not in ops, (name, op, ops)


def test_float_model_has_no_integer_kernels():
    """The check above is meaningful: onnxruntime does not produce these ops from the float model."""
    ops = ir.optimized_op_types(onnx.load(str(MODELS / "conv_bn_relu.onnx")))
    assert not {"QLinearConv", "QGemm", "MatMulIntegerToFloat"} & set(ops)


# ------------------------------------------------------------------------------------------ MatMulNBits
def test_w4a16_transformer_lowered_to_matmulnbits(tmp_module):
    lowered = compiled("transformer_block", tmp_module, plan="w4a16")
    dq_form = compiled("transformer_block", tmp_module, plan="w4a16", pipeline=NO_LOWER)
    nbits = [n for n in lowered.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 6
    for n in nbits:
        assert n.domain == "com.microsoft"
        assert {p.key: p.value for p in n.metadata_props}[ir.TAG_KEY] == "lower-matmulnbits"
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == 32
    assert not any(n.op_type == "DequantizeLinear" for n in lowered.graph.node)
    assert sum(n.op_type == "DequantizeLinear" for n in dq_form.graph.node) == 6
    feeds = _held("transformer_block")
    # the DequantizeLinear form evaluated as written (unoptimized: onnxruntime would otherwise fuse it into its
    # own MatMulNBits with int8 activations, which is not the DQ semantics)
    ref = _outputs(dq_form, feeds, optimize=False)
    got = _outputs(lowered, feeds)
    assert _rel(got, ref) <= 1e-5
    floats = _outputs(onnx.load(str(MODELS / "transformer_block.onnx")), feeds)
    assert quant.sqnr_db(floats, got) >= 15.0  # measured 17.67 dB (int4 block-32 weights, float activations)
    assert ir.model_summary(lowered)["parameter_bytes"] < 0.2 * ir.model_summary(
        onnx.load(str(MODELS / "transformer_block.onnx")))["parameter_bytes"]


@pytest.mark.parametrize("dtype, symmetric, k", [("int4", True, 64), ("uint4", False, 80), ("int4", False, 48)])
def test_matmulnbits_equals_dequantize_form(dtype, symmetric, k, tmp_path):
    """K not a multiple of the block (80, 48: padded), odd block count (3), asymmetric zero points packed."""
    rng = np.random.default_rng(k)
    n = 24
    w = (rng.standard_normal((k, n)) * 0.2 + (0.05 if not symmetric else 0.0)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "t",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, n])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    src = tmp_path / "mm.onnx"
    onnx.save(m, src)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((2, 1, 5, k)).astype(np.float32))
    plan = _plan(activation={"dtype": "float"},
                 rules=[{"match": {"op_type": "MatMul"},
                         "weight": {"dtype": dtype, "symmetric": symmetric, "granularity": "block",
                                    "block_size": 32}}])
    outs = {}
    for label, pipe in (("lowered", None), ("dq", NO_LOWER)):
        out = tmp_path / f"{label}.onnx"
        res = compile_model(src, out, CompileOptions(plan=plan, calib=str(tmp_path / "c.npz"), pipeline=pipe,
                                                     validate=False))
        outs[label] = onnx.load(str(out))
        if label == "lowered":
            assert next(r for r in res.records if r.name == "lower").stats["lower-matmulnbits.matmulnbits"] == 1
    ops = [nd.op_type for nd in outs["lowered"].graph.node]
    assert ops == ["MatMulNBits"]
    has_zp = len(outs["lowered"].graph.node[0].input) == 4
    assert has_zp == (not symmetric)
    x = rng.standard_normal((3, 5, k)).astype(np.float32)
    ref = ir.session(outs["dq"], optimize=False).run(None, {"x": x})[0]
    got = ir.session(outs["lowered"]).run(None, {"x": x})[0]
    assert _rel(got, ref) <= 1e-5
    assert quant.sqnr_db(x @ w, got) >= 17.0  # 4-bit weights, block 32: measured 19-21 dB


def test_nibble_packing_round_trip():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 16, (5, 3, 8)).astype(np.uint8)
    p = pack_nibbles(u)
    assert p.shape == (5, 3, 4) and p.dtype == np.uint8
    np.testing.assert_array_equal(unpack_nibbles(p), u)
    assert pack_nibbles(np.array([1, 2], np.uint8))[0] == 0x21  # low nibble first
    # signed codes q with zero point 0 become u = q + 8 with the default zero point 8 (no zp input)
    q = np.array([[-8], [7], [0], [3]], dtype=ml_dtypes.int4)  # K=4, N=1
    b, scales, zp = to_matmulnbits(q, np.array([[0.5]], np.float32), np.zeros((1, 1), ml_dtypes.int4), 16)
    assert zp is None and scales.tolist() == [0.5]
    np.testing.assert_array_equal(unpack_nibbles(b).reshape(-1)[:4], [0, 15, 8, 11])
    np.testing.assert_array_equal(unpack_nibbles(b).reshape(-1)[4:], 8)  # K padded with the zero point


# ------------------------------------------------------------------------------------------- fp8 guard
def test_fp8_relu_guard_keeps_numerics(tmp_module):
    q = compiled("conv_bn_relu", tmp_module, plan="fp8")
    unguarded = compiled("conv_bn_relu", tmp_module, plan="fp8", pipeline=NO_LOWER)
    guards = [n for n in q.graph.node if {p.key: p.value for p in n.metadata_props}.get(ir.TAG_KEY)
              == "ort-fp8-relu-guard"]
    # relu1, relu2, block.relu1 (dw.relu's depthwise conv computes in float on ort: its output is not fp8)
    assert len(guards) == 3 and {n.op_type for n in guards} == {"Relu"}
    feeds = _held("conv_bn_relu")
    ref = _outputs(onnx.load(str(MODELS / "conv_bn_relu.onnx")), feeds)
    guarded = quant.sqnr_db(ref, _outputs(q, feeds))
    assert guarded >= 17.0  # measured 19.81 dB
    # the guard is exact for the graph as written: same result as the unguarded graph evaluated unoptimized
    assert abs(quant.sqnr_db(ref, _outputs(unguarded, feeds, optimize=False)) - guarded) < 0.05
    # ... and it is needed: onnxruntime's Relu -> Q fusion drops the ReLU for fp8 (measured -6.5 dB)
    assert quant.sqnr_db(ref, _outputs(unguarded, feeds)) < guarded - 10.0


# ------------------------------------------------------------------------------------------------ refusal
def _lstm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    h, i = 4, 3
    g = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm", hidden_size=h)], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, i])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, h])],
        [numpy_helper.from_array(rng.standard_normal((1, 4 * h, i)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal((1, 4 * h, h)).astype(np.float32), "R")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("model, plan, node, reason", [
    ("conv_bn_relu", {"defaults": {"activation": {"granularity": "block"}}}, "conv1",
     "activation granularity block is not supported"),
    ("conv_bn_relu", {"rules": [{"match": {"name": "conv2"}, "activation": {"dtype": "int4"}}]}, "conv2",
     "activation dtype int4 is not supported"),
    ("lstm", {"rules": [{"match": {"op_type": "LSTM"}, "weight": {"scheme": "shift"}}]}, "lstm",
     "weight scheme 'shift' is not supported (supported: int)"),
    ("lstm", {"rules": [{"match": {"op_type": "LSTM"}, "activation": {"dtype": "uint8"}}]}, "lstm",
     "activation dtype uint8 is not supported (supported: none)"),
])
def test_unsupported_plan_refused_before_any_rewrite(model, plan, node, reason, tmp_path, monkeypatch):
    if model == "lstm":
        src = tmp_path / "lstm.onnx"
        onnx.save(_lstm_model(), src)
    else:
        src = MODELS / f"{model}.onnx"
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(json.dumps({"version": 1, **plan}))
    ran: list[str] = []
    monkeypatch.setattr(PassManager, "run", lambda self, ctx: ran.append("run") or [])
    out = tmp_path / "q.onnx"
    with pytest.raises(UserError) as e:
        compile_model(src, out, CompileOptions(plan=str(plan_file), calib="random"))
    msg = str(e.value)
    assert msg.startswith("target 'ort': ") and f"node '{node}'" in msg and reason in msg, msg
    assert "\n" not in msg
    assert ran == []  # refused before the pass manager ran anything
    assert sorted(tmp_path.iterdir()) == sorted([plan_file] + ([src] if model == "lstm" else []))


def test_op_without_capability_refused():
    target = OrtTarget()
    del target.ops["Gemm"]
    graph, _ = ir.import_graph(onnx.load(str(MODELS / "gemm_head.onnx")))
    with pytest.raises(UserError, match=r"node 'fc1' \(Gemm, plan defaults\): weights of Gemm cannot be quantized"):
        target.check(Plan.default().resolve(graph))
    OrtTarget().check(Plan.default().resolve(graph))  # the full target accepts the same plan


def test_unknown_target_is_a_user_error():
    with pytest.raises(UserError, match=r"^--target: unknown target 'tpu9000' \(known: .*\bort\b"):
        get_target("tpu9000")


# ----------------------------------------------------------------------------------------- capabilities
def test_targets_command_lists_capabilities():
    runner = CliRunner()
    res = runner.invoke(cli, ["targets", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    caps = OrtTarget().capabilities()
    assert data["ort"]["ops"] == caps["ops"]
    assert data["ort"]["default_pipeline"] == DEFAULT_PIPELINE
    assert set(data["ort"]["ops"]) >= {"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"}
    assert "int4" in data["ort"]["ops"]["MatMul"]["weight_dtypes"]
    assert "int4" not in data["ort"]["ops"]["MatMul"]["activation_dtypes"]
    assert data["ort"]["ops"]["LSTM"]["activation_dtypes"] == []
    text = runner.invoke(cli, ["targets"])
    assert text.exit_code == 0
    assert "ort: onnxruntime CPU" in text.stdout
    assert f"default pipeline: {DEFAULT_PIPELINE}" in text.stdout
    mm = caps["ops"]["MatMul"]
    assert (f"  MatMul: weights {','.join(mm['weight_dtypes'])}; activations {','.join(mm['activation_dtypes'])}; "
            f"{','.join(mm['granularities'])}; schemes {','.join(mm['schemes'])}") in text.stdout
    assert {"int8", "uint8", "int16", "int4", "uint4", "fp8e4m3", "fp8e5m2"} <= set(mm["weight_dtypes"])
    assert data["ort"]["plan_options"]["requantize_conv_outputs"]["default"] is True
    assert data["qonnx"]["plan_options"] == {}
    assert "  plan option targets.ort.requantize_conv_outputs (default true): quantize a Conv's" in text.stdout


# ------------------------------------------------------------------- depthwise in float, load-time dequant
def _tagged(model: onnx.ModelProto, name: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if {p.key: p.value for p in n.metadata_props}.get(ir.TAG_KEY) == name]


def test_depthwise_conv_computes_in_float_unless_a_rule_asks(tmp_module):
    q = compiled("conv_bn_relu", tmp_module)
    dw = next(n for n in q.graph.node if n.name == "dw.conv")
    producers = {o: n for n in q.graph.node for o in n.output}
    assert producers[dw.input[0]].op_type == "Relu"  # float activation in (block.relu2)
    w = producers[dw.input[1]]  # int8 codes, dequantized by Cast/Mul that onnxruntime folds at load
    assert w.op_type == "Mul" and producers[w.input[0]].op_type == "Cast"
    codes = {t.name: t for t in q.graph.initializer}[producers[w.input[0]].input[0]]
    assert codes.data_type == TensorProto.INT8
    assert {n.op_type for n in _tagged(q, "ort-load-time-dequant")} == {"Cast", "Mul"}
    # a rule that sets the depthwise conv's activation wins over the target's default: QLinearConv again
    forced = compiled("conv_bn_relu", tmp_module, key="dw-int8",
                      plan=_plan(rules=[{"match": {"name": "dw.conv"}, "activation": {"dtype": "uint8"}}]))
    assert ir.optimized_op_types(forced).get("QLinearConv") == 5 and not _tagged(forced, "ort-load-time-dequant")
    feeds = _held("conv_bn_relu")
    ref = _outputs(onnx.load(str(MODELS / "conv_bn_relu.onnx")), feeds)
    s_float, s_int8 = quant.sqnr_db(ref, _outputs(q, feeds)), quant.sqnr_db(ref, _outputs(forced, feeds))
    assert s_float >= s_int8 - 0.1, (s_float, s_int8)  # no worse: measured 29.96 vs 29.96 dB


def test_resolved_plan_notes_the_target_default(tmp_path):
    data = dict(np.load(MODELS / "depthwise.npz"))
    np.savez(tmp_path / "c.npz", **{k: v[:8] for k, v in data.items()})
    res = compile_model(MODELS / "depthwise.onnx", tmp_path / "q.onnx", CompileOptions(calib=str(tmp_path / "c.npz"),
                                                                                      plan="default", validate=False))
    side = (tmp_path / "q.plan.yaml").read_text()
    assert "note: 'activation float: target ort computes depthwise Conv in float" in side
    rp = next(r for r in res.records if r.name == "resolve-plan")
    assert rp.stats["target_refined"] == 1


@pytest.mark.parametrize("weight", [{"dtype": "int8"}, {"dtype": "int8", "symmetric": False},
                                    {"dtype": "int16"}, {"dtype": "fp8e4m3"}])
def test_load_time_dequant_is_exact(weight, tmp_module):
    """Weight-only convs and Gemm: Cast/Mul(/Sub) gives the DequantizeLinear's float weights bit for bit."""
    plan = _plan(weight=weight, activation={"dtype": "float"})
    key = "wo-" + json.dumps(weight)
    lowered = compiled("conv_bn_relu", tmp_module, plan=plan, key=key)
    plain = compiled("conv_bn_relu", tmp_module, plan=plan, key=key, pipeline=NO_LOWER)
    made = _tagged(lowered, "ort-load-time-dequant")
    n_weights = sum(n.op_type == "Cast" for n in made)
    assert n_weights == 6  # 5 Conv + the Gemm head
    assert any(n.op_type == "Sub" for n in made) == (weight.get("symmetric") is False)
    assert not any(n.op_type == "DequantizeLinear" for n in lowered.graph.node)
    feeds = _held("conv_bn_relu")
    np.testing.assert_array_equal(_outputs(lowered, feeds, optimize=False), _outputs(plain, feeds, optimize=False))
    ops = ir.optimized_op_types(lowered)  # folded at session start: float kernels on constant weights
    assert not {"Cast", "DequantizeLinear", "Sub"} & set(ops), ops
    assert _rel(_outputs(lowered, feeds), _outputs(plain, feeds, optimize=False)) < 1e-5


def test_load_time_dequant_leaves_integer_kernels_and_lstm_is_rewritten(tmp_path):
    src = tmp_path / "lstm.onnx"
    onnx.save(_lstm_model(), src)
    out = tmp_path / "q.onnx"
    compile_model(src, out, CompileOptions(calib="random", validate=False))
    q = onnx.load(str(out))
    made = _tagged(q, "ort-load-time-dequant")
    assert sorted(n.op_type for n in made) == ["Cast", "Cast", "Mul", "Mul"]  # W and R
    # integer kernels keep their weight DequantizeLinear (QLinearConv / QGemm fuse it)
    d = compiled("conv_bn_relu", tmp_path)
    assert sum(n.op_type == "DequantizeLinear" and n.input[0].endswith(":q") and "weight" in n.input[0]
               for n in d.graph.node) >= 5


def _lowered_ctx(model: onnx.ModelProto, plan: Plan, tmp: Path) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(compiled through ``lower``, compiled without it) for a model built in the test."""
    src = tmp / "m.onnx"
    onnx.save(model, src)
    outs = []
    for name, pipe in (("low", None), ("plain", NO_LOWER)):
        out = tmp / f"{name}.onnx"
        compile_model(src, out, CompileOptions(plan=plan, calib="random", validate=False, pipeline=pipe))
        outs.append(onnx.load(str(out)))
    return outs[0], outs[1]


def test_load_time_dequant_must_not_match_a_weight_an_integer_kernel_also_reads(tmp_path):
    """One weight read by a weight-only Conv and by an activation-quantized Conv: the DQ stays (QLinearConv
    fuses it); a second run of the pass changes nothing; outputs equal the un-lowered graph's."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["a"], name="wo"),
         helper.make_node("Relu", ["a"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w"], ["b"], name="q8"),
         helper.make_node("Relu", ["b"], ["y"], name="relu2")], "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    plan = _plan(rules=[{"match": {"name": "wo"}, "activation": {"dtype": "float"}}])
    low, plain = _lowered_ctx(m, plan, tmp_path)
    assert not _tagged(low, "ort-load-time-dequant")
    assert sum(n.op_type == "DequantizeLinear" and n.input[0] == "w:q" for n in low.graph.node) == 1
    feed = {"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)}
    np.testing.assert_array_equal(ir.session(low, threads=1, optimize=False).run(None, feed)[0],
                                  ir.session(plain, threads=1, optimize=False).run(None, feed)[0])
    # the same weight read by the weight-only Conv alone (a copy for the other): rewritten, idempotent
    g2 = onnx.helper.make_graph(list(g.node), "t", list(g.input), list(g.output),
                                [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w * 0.5, "w2")])
    g2.node[2].input[1] = "w2"
    m2 = helper.make_model(g2, opset_imports=[helper.make_opsetid("", 17)])
    m2.ir_version = 8
    low2, _ = _lowered_ctx(m2, plan, tmp_path)
    assert sorted(n.op_type for n in _tagged(low2, "ort-load-time-dequant")) == ["Cast", "Mul"]
    graph, meta = ir.import_graph(low2)
    ctx = CompileContext(graph=graph, meta=meta, plan=plan, target=get_target("ort"))
    assert not OrtLoadTimeDequantPass().run(ctx).modified


def _hardswish_convs() -> onnx.ModelProto:
    """x -> Conv a -> HardSwish -> Conv b -> Relu -> Conv c -> y (opset 17)."""
    from _graphs import Builder, vi

    b = Builder(seed=21)
    b.node("Conv", ["x", b.init("wa", b.randn(16, 8, 3, 3, scale=0.3)), b.init("ba", b.randn(16, scale=0.5))],
           ["a"], name="conv_a", pads=[1, 1, 1, 1])
    b.node("HardSwish", ["a"], ["hs"], name="hswish")
    b.node("Conv", ["hs", b.init("wb", b.randn(16, 16, 1, 1, scale=0.3))], ["b"], name="conv_b")
    b.node("Relu", ["b"], ["r"], name="relu")
    b.node("Conv", ["r", b.init("wc", b.randn(4, 16, 3, 3, scale=0.3))], ["y"], name="conv_c", pads=[1, 1, 1, 1])
    return b.model([vi("x", [1, 8, 12, 12])], [vi("y", [1, 4, 12, 12])])


def test_conv_outputs_read_only_by_float_ops_stay_float_when_asked(tmp_path):
    """``targets: {ort: {requantize_conv_outputs: false}}``: conv_a's output goes to a HardSwish (a float op),
    so conv_a keeps float activations instead of rounding its output for QLinearConv; conv_b is read quantized
    by conv_c and stays QLinearConv; conv_c's output is the graph output (never requantized) and keeps float
    activations too. By default all three take quantized inputs and conv_a, conv_b run as QLinearConv."""
    src = tmp_path / "hs.onnx"
    onnx.save(_hardswish_convs(), src)
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 8, 12, 12)).astype(np.float32)} for _ in range(24)]
    np.savez(tmp_path / "calib.npz", x=np.stack([f["x"] for f in feeds[:16]]))
    ref = _outputs(onnx.load(str(src)), feeds[16:])
    plans = {"default": "default", "no-requant": Plan.from_dict(
        {"version": 1, "targets": {"ort": {"requantize_conv_outputs": False}}}, source="p.yaml")}
    got = {}
    for key, plan in plans.items():
        out = tmp_path / f"{key}.onnx"
        res = compile_model(src, out, CompileOptions(plan=plan, calib=str(tmp_path / "calib.npz"), validate=False))
        q = onnx.load(str(out))
        got[key] = (q, res, quant.sqnr_db(ref, _outputs(q, feeds[16:])))
    q, res, s_not = got["no-requant"]
    assert ir.optimized_op_types(q).get("QLinearConv") == 1  # conv_b
    assert ir.optimized_op_types(got["default"][0]).get("QLinearConv") == 2  # conv_a, conv_b
    conv_a = next(n for n in q.graph.node if n.name == "conv_a")
    assert conv_a.input[0] == "x"  # float input; its int8 weight codes are dequantized at load
    assert {n.op_type for n in _tagged(q, "ort-load-time-dequant")} == {"Cast", "Mul"}
    assert next(r for r in res.records if r.name == "resolve-plan").stats["target_refined"] == 2
    side = (tmp_path / "no-requant.plan.yaml").read_text()
    assert "only float ops read this Conv''s output (targets.ort.requantize_conv_outputs: false)" in side
    s_req = got["default"][2]
    assert s_not >= s_req + 2.5, (s_req, s_not)  # two roundings fewer around the HardSwish: 34.73 -> 37.81 dB


@pytest.mark.parametrize("targets, message", [
    ({"nosuch": {}}, "p.yaml: targets.nosuch: unknown target (known:"),
    ({"ort": {"requantize": False}}, "p.yaml: targets.ort: unknown option 'requantize' (known: gather_block_quantized, requantize_conv_outputs)"),
    ({"ort": {"requantize_conv_outputs": "no"}}, "p.yaml: targets.ort.requantize_conv_outputs: expected bool, got 'no'"),
    ({"qonnx": {"x": 1}}, "p.yaml: targets.qonnx: unknown option 'x' (known: none)"),
])
def test_bad_target_options_are_refused_before_any_work(targets, message, tmp_path):
    plan = Plan.from_dict({"version": 1, "targets": targets}, source="p.yaml")
    target = "qonnx" if "qonnx" in targets else "ort"
    out = tmp_path / "q.onnx"
    with pytest.raises(UserError) as e:
        compile_model(MODELS / "conv_bn_relu.onnx", out, CompileOptions(plan=plan, target=target, calib="random"))
    assert str(e.value).startswith(message), str(e.value)
    assert not list(tmp_path.iterdir())


def test_target_options_round_trip_through_the_plan_file():
    plan = Plan.from_text("version: 1\ntargets:\n  ort: {requantize-conv-outputs: false}\n", source="p.yaml")
    assert plan.target_options == {"ort": {"requantize_conv_outputs": False}}
    assert Plan.from_dict(plan.to_dict()).target_options == plan.target_options
    assert get_target("ort").check_options(plan.target_options, "p.yaml") == {"requantize_conv_outputs": False,
                                                                             "gather_block_quantized": False}
    assert get_target("packed").check_options(plan.target_options, "p.yaml") == {"requantize_conv_outputs": True,
                                                                                "gather_block_quantized": False}
    with pytest.raises(UserError, match=r"p\.yaml: 'targets' must be a mapping"):
        Plan.from_text("version: 1\ntargets: [ort]\n", source="p.yaml")
