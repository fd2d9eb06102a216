"""resolve-plan: which tensors get activation specs (inputs of quantized nodes, plus the outputs the ort target
quantizes for its integer kernels: Conv -> Relu -> Q), the ``.plan.yaml`` side output, the unmatched-rule warning,
and the target check inside the pass. The pass is an analysis: the graph is unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_manager import PassManager
from qcompiler.core.registry import build_pipeline
from qcompiler.passes.resolve_plan import ResolvePlanPass
from qcompiler.plan import Plan, QuantSpec
from qcompiler.runtime_targets import get_target

MODELS = Path(__file__).resolve().parent.parent / "models"
PREFIX = "cleanup,fold-batchnorm,cleanup"


def _plan(rules: list[dict[str, Any]] | None = None, **defaults: dict[str, Any]) -> Plan:
    return Plan.from_dict({"version": 1, "defaults": defaults, "rules": rules or []}, source="test-plan")


def resolved_ctx(name: str, plan: Plan | None = None) -> tuple[CompileContext, Any]:
    """Fixture ``name`` after cleanup + BN folding, then resolve-plan; returns (ctx, resolve-plan result)."""
    graph, meta = ir.import_graph(onnx.load(str(MODELS / f"{name}.onnx")))
    ctx = CompileContext(graph=graph, meta=meta, plan=plan or Plan.default(), target=get_target("ort"))
    PassManager(build_pipeline(PREFIX)).run(ctx)
    before = ir.export_model(ctx.graph, ctx.meta).SerializeToString()
    result = ResolvePlanPass().run(ctx)
    assert ir.export_model(ctx.graph, ctx.meta).SerializeToString() == before  # analysis only
    assert result.modified is False
    return ctx, result


def _producer(model: onnx.ModelProto, tensor: str) -> onnx.NodeProto | None:
    return next((n for n in model.graph.node if tensor in n.output), None)


# ----------------------------------------------------------------------------------------- activation specs
def test_activation_specs_conv_bn_relu():
    ctx, res = resolved_ctx("conv_bn_relu")
    gemm = next(n.name for n in ctx.graph.nodes if n.op == "Gemm")
    quantized = {n.node for n in ctx.resolved.quantized()}
    assert quantized == {"conv1", "conv2", "block.conv1", "block.conv2", "dw.conv", gemm}
    # inputs of the quantized nodes ...
    # (dw.conv is weight-only on ort: OrtTarget.refine keeps a depthwise conv's activations float)
    assert ctx.resolved.nodes["dw.conv"].activation is None and ctx.resolved.nodes["dw.conv"].weight is not None
    assert res.stats["target_refined"] == 1
    inputs = {"input", "relu1", "relu2", "block.relu1", "flatten"}
    # ... plus each activation-quantized Conv's output, taken after a ReLU that follows it alone (QLinearConv
    # fuses the ReLU); block.conv2 feeds the residual Add, so its own output is quantized
    outputs = {"relu1", "relu2", "block.relu1", "block.bn2"}
    assert set(ctx.activation_specs) == inputs | outputs
    assert ctx.activation_all_consumers == outputs
    assert res.stats["target_output_tensors"] == 4 and res.stats["activation_tensors"] == 6
    assert res.stats["quantized_nodes"] == 6 and res.stats["weight_int8"] == 6
    assert res.stats["float_nodes"] == len(ctx.graph.nodes) - 6
    default_act = QuantSpec(dtype="uint8", granularity="per_tensor", symmetric=False, calibration="minmax")
    assert set(ctx.activation_specs.values()) == {default_act}


def test_conv_relu_q_placement_in_compiled_model(tmp_path):
    out = tmp_path / "q.onnx"
    compile_model(MODELS / "conv_bn_relu.onnx", out, CompileOptions(calib=str(MODELS / "conv_bn_relu.npz"),
                                                                     calib_samples=4, validate=False))
    q = onnx.load(str(out))
    qin = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    assert qin == {"input", "relu1", "relu2", "block.relu1", "block.bn2", "flatten"}  # dw.conv: float on ort
    # the Q sits after the ReLU, never between Conv and ReLU
    for relu in ("relu1", "relu2", "block.relu1"):
        node = next(n for n in q.graph.node if n.name == relu)
        assert _producer(q, node.input[0]).op_type == "Conv"
    # a target output is read dequantized by every consumer: relu2 feeds block.conv1 *and* the residual Add
    add = next(n for n in q.graph.node if n.name == "block.add")
    assert all(_producer(q, i).op_type == "DequantizeLinear" for i in add.input)
    # its output feeds only the depthwise conv, which computes in float on ort: no Q after the Add, so it runs
    # in float too (with a quantized dw.conv input it became QLinearAdd)
    assert "QLinearAdd" not in ir.optimized_op_types(q)


def test_rule_on_non_weight_op_quantizes_its_activation_inputs():
    ctx, _ = resolved_ctx("transformer_block", _plan([{"match": {"name": "attn.qk"},
                                                       "activation": {"dtype": "int8", "symmetric": True}}]))
    np_ = ctx.resolved.nodes["attn.qk"]
    assert np_.weight is None and np_.activation_inputs == (0, 1)
    qk = next(n for n in ctx.graph.nodes if n.name == "attn.qk")
    for t in qk.inputs:
        assert ctx.activation_specs[t.name] == QuantSpec(dtype="int8", symmetric=True)
    assert ctx.resolved.nodes["attn.pv"].activation is None  # the other activation x activation MatMul


def test_activation_spec_conflict_counted_first_wins():
    # 'input' feeds both branch convs; the second asks for int8 symmetric: the first (in graph order) wins
    ctx, res = resolved_ctx("shared_weight", _plan([{"match": {"name": "branch_b.conv"},
                                                     "activation": {"dtype": "int8", "symmetric": True}}]))
    assert res.stats["activation_spec_conflicts"] == 1
    assert ctx.activation_specs["input"].dtype == "uint8"
    assert ctx.resolved.nodes["branch_b.conv"].activation.dtype == "int8"


def test_resolve_plan_refuses_unsupported_plan_naming_the_rule():
    plan = _plan([{"match": {"name_regex": "^block\\."}, "activation": {"granularity": "block"}}])
    with pytest.raises(UserError) as e:
        resolved_ctx("conv_bn_relu", plan)
    assert str(e.value) == ("target 'ort': node 'block.conv1' (Conv, rules[0] (name_regex=^block\\.)): "
                            "activation granularity block is not supported (activations are quantized per tensor)")


# ------------------------------------------------------------------------------------------- side output
def test_plan_yaml_side_output(tmp_path):
    plan_file = tmp_path / "p.yaml"
    plan_file.write_text(
        "version: 1\n"
        "rules:\n"
        "  - match: {op_type: Conv}\n"
        "    weight: {dtype: int8, granularity: per_tensor}\n"
        "  - match: {name: conv2}\n"
        "    skip: true\n"
        "  - match: {name_regex: '^block\\.conv2$'}\n"
        "    weight: {dtype: int16}\n"
        "  - match: {name_regex: '^/head/'}\n"
        "    skip: true\n")
    out = tmp_path / "model.int8.onnx"
    res = compile_model(MODELS / "conv_bn_relu.onnx", out, CompileOptions(plan=str(plan_file), calib="random",
                                                                           calib_samples=2))
    side = tmp_path / "model.int8.plan.yaml"
    assert side in res.files and side.is_file()
    doc = yaml.safe_load(side.read_text())
    assert doc["version"] == 1 and doc["plan"] == str(plan_file)
    nodes = {n["node"]: n for n in doc["nodes"]}
    assert doc["summary"] == {"nodes": len(nodes), "quantized": 5,
                              "unmatched_rules": ["rules[3] (name_regex=^/head/)"]}
    assert nodes["conv1"]["rule"] == "rules[0] (op_type=Conv)"
    assert nodes["conv1"]["weight"] == {"dtype": "int8", "granularity": "per_tensor", "symmetric": True}
    assert nodes["conv1"]["activation"] == {"dtype": "uint8", "granularity": "per_tensor", "symmetric": False}
    assert nodes["conv2"] == {"node": "conv2", "op_type": "Conv", "rule": "rules[1] (name=conv2)",
                              "matched": ["rules[0] (op_type=Conv)", "rules[1] (name=conv2)"],
                              "float": "skip: true"}
    # op_type < name_regex: the regex rule overrides the dtype and keeps the op_type rule's granularity
    assert nodes["block.conv2"]["weight"] == {"dtype": "int16", "granularity": "per_tensor", "symmetric": True}
    assert nodes["block.conv2"]["matched"] == ["rules[0] (op_type=Conv)", "rules[2] (name_regex=^block\\.conv2$)"]
    gemm = next(n for n in doc["nodes"] if n["op_type"] == "Gemm")
    assert gemm["rule"] == "defaults" and gemm["weight"]["granularity"] == "per_channel"
    assert nodes["relu1"]["float"] == "not a weight op (float unless a rule names it)"
    assert res.report["plan"]["unmatched_rules"] == ["rules[3] (name_regex=^/head/)"]
    # the compiled model follows the side file: conv2 float, conv1 per-tensor int8, block.conv2 int16
    q = onnx.load(str(out))
    conv2 = next(n for n in q.graph.node if n.name == "conv2")
    assert conv2.input[1] in {t.name for t in onnx.load(str(MODELS / "conv_bn_relu.onnx")).graph.initializer}
    inits = {t.name: t for t in q.graph.initializer}
    assert list(inits["conv1.weight:s"].dims) == []
    assert inits["block.conv2.weight:q"].data_type == onnx.TensorProto.INT16


def test_unmatched_rule_warns(caplog):
    plan = _plan([{"match": {"name_regex": "^/head/"}, "skip": True},
                  {"match": {"op_type": ["LSTM"]}, "weight": {"dtype": "int4"}},
                  {"match": {"op_type": "Conv"}, "weight": {"dtype": "int8"}}])
    with caplog.at_level(logging.WARNING, logger="qcompiler"):
        ctx, res = resolved_ctx("conv_bn_relu", plan)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "test-plan: rules[0] (name_regex=^/head/) matches no node" in warnings
    assert "test-plan: rules[1] (op_type=LSTM) matches no node" in warnings
    assert not any("rules[2]" in w for w in warnings)
    assert res.stats["unmatched_rules"] == 2
    assert ctx.report["plan"]["unmatched_rules"] == ["rules[0] (name_regex=^/head/)", "rules[1] (op_type=LSTM)"]
    assert yaml.safe_load(ctx.side_outputs[".plan.yaml"])["summary"]["unmatched_rules"] == \
        ["rules[0] (name_regex=^/head/)", "rules[1] (op_type=LSTM)"]


def test_skip_everything_leaves_nothing_to_calibrate():
    ctx, res = resolved_ctx("gemm_head", _plan([{"match": {"name_regex": "."}, "skip": True}]))
    assert ctx.activation_specs == {} and res.stats["quantized_nodes"] == 0
    assert all(n.reason == "skip: true" for n in ctx.resolved.nodes.values())


def _chain_ctx(n: int) -> CompileContext:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32).reshape(4, 4, 1, 1), "w")
    nodes = [helper.make_node("Conv", [f"t{i}", "w"], [f"t{i + 1}"], name=f"c{i}") for i in range(n)]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [1, 4, 2, 2])],
                          [helper.make_tensor_value_info(f"t{n}", TensorProto.FLOAT, [1, 4, 2, 2])], [w])
    graph, meta = ir.import_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    return CompileContext(graph=graph, meta=meta, plan=Plan.default(), target=get_target("ort"))
