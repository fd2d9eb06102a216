"""Precision plan parsing, validation and resolution."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import pytest

from qcompiler import ir
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan, load_plan, required_opset
from qcompiler.plan.presets import names, preset_path

MODELS = Path(__file__).resolve().parent.parent / "models"


def _graph(name: str):
    graph, _ = ir.import_graph(onnx.load(MODELS / name))
    return graph


def test_default_plan_quantizes_weight_ops_only_and_keeps_norm_softmax_float():
    g = _graph("transformer_block.onnx")
    r = Plan.default().resolve(g)
    by_op: dict[str, list[bool]] = {}
    for n in r.nodes.values():
        by_op.setdefault(n.op_type, []).append(n.quantized)
    # constant-weight MatMuls quantized; activation x activation MatMuls (QK^T, AV) kept float
    assert sum(by_op["MatMul"]) == 6 and len(by_op["MatMul"]) == 8
    for op in ("LayerNormalization", "Softmax", "Add", "Erf", "Mul"):
        assert not any(by_op.get(op, [])), op
    reasons = {n.reason for n in r.nodes.values() if n.op_type == "MatMul" and not n.quantized}
    assert reasons == {"activation x activation (float unless a rule names it)"}


def test_rule_precedence_op_type_then_regex_then_name_later_wins_tie():
    g = _graph("conv_bn_relu.onnx")
    convs = [n.name for n in g.nodes if n.op == "Conv"]
    first = convs[0]
    plan = Plan.from_dict({
        "version": 1,
        "rules": [
            {"match": {"name": first}, "weight": {"dtype": "int4"}},            # exact name: highest
            {"match": {"name_regex": "."}, "weight": {"dtype": "int16"}},       # regex beats op_type
            {"match": {"op_type": "Conv"}, "weight": {"dtype": "uint8"}},
            {"match": {"op_type": ["Conv"]}, "weight": {"granularity": "per_tensor"}},  # merges, later
        ],
    })
    r = plan.resolve(g)
    assert r.nodes[first].weight.dtype == "int4"
    assert r.nodes[first].weight.granularity == "per_tensor"  # keys merge across rules
    assert r.nodes[convs[1]].weight.dtype == "int16"
    assert r.nodes[first].rules[-1].startswith("rules[0]")


def test_skip_rule_keeps_float_and_resolved_yaml_names_rule():
    g = _graph("conv_bn_relu.onnx")
    gemm = next(n.name for n in g.nodes if n.op == "Gemm")
    plan = Plan.from_text(f"version: 1\nrules:\n  - match: {{name: '{gemm}'}}\n    skip: true\n")
    r = plan.resolve(g)
    assert not r.nodes[gemm].quantized
    text = r.to_yaml()
    assert f"node: {gemm}" in text and "rules[0] (name=" in text and "skip: true" in text


def test_rule_for_softmax_quantizes_its_activation():
    g = _graph("transformer_block.onnx")
    plan = Plan.from_dict({"version": 1, "rules": [{"match": {"op_type": "Softmax"},
                                                    "activation": {"dtype": "uint8"}}]})
    r = plan.resolve(g)
    sm = [n for n in r.nodes.values() if n.op_type == "Softmax"]
    assert sm and all(n.activation is not None and n.activation.dtype == "uint8" for n in sm)


def test_unmatched_rule_is_a_warning(caplog):
    g = _graph("conv_bn_relu.onnx")
    plan = Plan.from_dict({"version": 1, "rules": [{"match": {"name_regex": "^nothing_here$"}, "skip": True}]})
    with caplog.at_level(logging.WARNING):
        r = plan.resolve(g)
    assert r.unmatched_rules == ["rules[0] (name_regex=^nothing_here$)"]
    assert "matches no node" in caplog.text


def test_preset_rule_matching_no_node_is_listed_not_warned(caplog):
    """A shipped preset is written for many models: w4a16's embedding-table rule finds no Gather in a convnet.
    The resolved plan lists it, the log says it at INFO, and no warning is printed; a user's own plan still warns."""
    g = _graph("conv_bn_relu.onnx")
    plan = load_plan(str(preset_path("w4a16")))
    with caplog.at_level(logging.INFO, logger="qcompiler.plan.resolve"):
        r = plan.resolve(g)
    gather = [u for u in r.unmatched_rules if "Gather" in u]
    assert gather, r.unmatched_rules
    msgs = [(rec.levelno, rec.getMessage()) for rec in caplog.records if "matches no node" in rec.getMessage()]
    assert msgs and all(level == logging.INFO for level, _ in msgs)
    own = Plan.from_dict({"version": 1, "rules": [{"match": {"op_type": "Gather"}, "weight": {"dtype": "int8"}}]})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qcompiler.plan.resolve"):
        own.resolve(g)
    assert [rec.levelno for rec in caplog.records if "matches no node" in rec.getMessage()] == [logging.WARNING]


@pytest.mark.parametrize("text, fragment", [
    ("version: 1\nfoo: 1\n", "unknown top-level key 'foo'"),
    ("version: 2\n", "unsupported plan version '2'"),
    ("version: 1\ndefaults: {weight: {dtype: int3}}\n", "defaults.weight: bad dtype 'int3'"),
    ("version: 1\ndefaults: {weight: {colour: red}}\n", "defaults.weight: unknown key 'colour'"),
    ("version: 1\nrules:\n  - match: {name_regex: '(['}\n    skip: true\n", "rules[0]: bad name_regex '(['"),
    ("version: 1\nrules:\n  - match: {op: Conv}\n    skip: true\n", "rules[0]: match: unknown key 'op'"),
    ("version: 1\nrules:\n  - match: {op_type: Conv}\n    wieght: {dtype: int8}\n", "rules[0]: unknown key 'wieght'"),
    ("version: 1\nrules:\n  - match: {op_type: Conv}\n", "rules[0]: rule sets nothing"),
    ("version: 1\nrules:\n  - match: {op_type: Conv}\n    weight: {granularity: block, block_size: 3}\n",
     "block_size must be a power of two"),
    ("version: 1\nrules:\n  - match: {op_type: Conv}\n    skip: maybe\n", "skip must be true or false"),
    ("version: 1\ndefaults: {activation: {calibration: magic}}\n", "bad calibration 'magic'"),
    ("[1, 2", "not valid YAML/JSON"),
    ("- 1\n- 2\n", "a plan must be a mapping"),
])
def test_bad_plans_name_the_rule(text, fragment):
    with pytest.raises(UserError) as e:
        Plan.from_text(text, source="plan.yaml")
    assert fragment in str(e.value)
    assert str(e.value).startswith("plan.yaml")
    assert "\n" not in str(e.value)


def test_json_plan_and_round_trip():
    plan = Plan.from_text('{"version": 1, "rules": [{"match": {"op_type": "Gemm"}, "skip": true}]}')
    again = Plan.from_dict(plan.to_dict())
    assert again.to_dict() == plan.to_dict()


def test_presets_load_and_required_opset():
    assert {"w8a8", "w4a16", "fp8"} <= set(names())
    for n in names():
        p = load_plan(n)
        assert p.source == str(preset_path(n))
    from qcompiler.session import plan_specs

    assert required_opset(plan_specs(load_plan("w8a8")))[0] == 13
    assert required_opset(plan_specs(load_plan("fp8")))[0] == 21  # block scales
    assert required_opset(plan_specs(load_plan("w4a16")))[0] == 21


def test_missing_plan_file():
    with pytest.raises(UserError, match="no such plan file"):
        load_plan("/nonexistent/plan.yaml")
