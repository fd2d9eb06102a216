"""Partial evaluation in the sensitivity runner (qcompiler.autoplan.sensitivity): an evaluation that changes nothing before a
cut starts there from the float activations crossing it, and whole plans that agree on the layers before a cut
share the activations there. Both must give the numbers a whole-graph run gives."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from qcompiler import autoplan
from qcompiler.autoplan.sensitivity import (
    LayerUnderTest,
    SensitivityRunner,
    activation_qparams,
    measure_plans,
)

MODELS = Path(__file__).resolve().parents[1] / "models"


def _setup(model: Path, calib: Path, cands: str, samples: int = 6):
    cl = autoplan.parse_candidates(cands)
    prep = autoplan.prepare(model, cl, target="ort")
    oq = autoplan.output_quant(prep, cl, autoplan.layer_rules(prep, cl))
    by = {n.name: n for n in prep.graph.nodes}
    lut = [LayerUnderTest(la.name, by[la.name], prep.nodes[la.name].weight_inputs, prep.specs[i],
                          prep.nodes[la.name].activation if 0 in prep.nodes[la.name].activation_inputs else None,
                          oq[i]) for i, la in enumerate(prep.layers)]
    feeds = autoplan.load_feeds(prep.graph, calib, samples, 0)
    qp = activation_qparams(prep.graph, lut, feeds, 21)
    return prep, lut, feeds, qp, [c.name for c in cl]


def _setting(runner: SensitivityRunner, layer: LayerUnderTest, cand: str) -> dict[str, np.ndarray]:
    from qcompiler.autoplan.sensitivity import fake_quantize

    spec = layer.specs[cand]
    if spec is None:
        return {}
    over = dict(zip(runner.inputs_of[layer.name], [fake_quantize(layer.node, w, spec) for w in layer.weights()]))
    over.update(runner.gates(layer, cand))
    return over


@pytest.mark.parametrize("model", ["conv_bn_relu", "depthwise"])
def test_cut_evaluations_equal_whole_graph_runs(model):
    prep, lut, feeds, qp, names = _setup(MODELS / f"{model}.onnx", MODELS / f"{model}.npz", "int8,int4")
    cut = SensitivityRunner(prep.graph, lut, feeds, workers=1, activation_qparams=qp, cuts=8)
    whole = SensitivityRunner(prep.graph, lut, feeds, workers=1, activation_qparams=qp, cuts=0)
    assert whole.segments == [] and len(cut.segments) >= 1
    for o in range(len(whole.output_names)):
        np.testing.assert_allclose(cut.reference[0][o], whole.reference[0][o], rtol=1e-6, atol=1e-6)
    started_late = 0
    for layer in lut:
        for cand in names:
            over = _setting(cut, layer, cand)
            started_late += cut._segment_for(over) is not None
            a, b = cut.distortion(over), whole.distortion(over)
            assert cut.score(a) == pytest.approx(whole.score(b), rel=1e-4, abs=1e-12)
            np.testing.assert_allclose(a.noise, b.noise, rtol=1e-4, atol=1e-12)
            assert np.all(b.noise > 0)  # quantizing a layer is measured as a real change
    assert started_late >= len(cut.segments)  # the later layers did start at a cut
    assert cut.partial == started_late and whole.partial == 0


def test_plans_sharing_a_prefix_equal_whole_graph_runs():
    prep, lut, feeds, qp, names = _setup(MODELS / "conv_bn_relu.onnx", MODELS / "conv_bn_relu.npz", "fp32,int8,int4")
    plans = [list(p) for p in itertools.product(range(3), repeat=len(lut))][::7]  # 35 plans of 5 layers
    base = SensitivityRunner(prep.graph, lut, feeds, workers=2, activation_qparams=qp, cuts=8)
    shared, runner = measure_plans(prep.graph, lut, names, feeds, plans, base=base)
    assert runner.segments and runner.evaluations == len(plans)
    assert 0 < runner.partial < len(plans)  # most plans started from another plan's activations at a cut
    alone = SensitivityRunner(prep.graph, lut, feeds, workers=2, activation_qparams=qp, cuts=0)
    whole, _ = measure_plans(prep.graph, lut, names, feeds, plans, runner=alone)
    for (s1, n1), (s2, n2) in zip(shared, whole):
        assert s1 == pytest.approx(s2, rel=1e-4, abs=1e-12)
        np.testing.assert_allclose(n1, n2, rtol=1e-4, atol=1e-12)
    all_float = plans.index([0] * len(lut)) if [0] * len(lut) in plans else None
    if all_float is not None:
        assert shared[all_float][0] == pytest.approx(0.0, abs=1e-9)
    assert len({round(s, 9) for s, _ in shared}) > len(plans) // 2  # the plans really differ


def test_context_sensitivities_with_cuts_equal_whole_graph_runs(monkeypatch):
    """pd around a plan (refine / exchange): with cuts, each change starts from the plan's own activations at the
    cut before the layer; the values are those of whole-graph runs."""
    from qcompiler.autoplan import sensitivity
    from qcompiler.autoplan.sensitivity import metrics  # compute reads PARTIAL_CUTS there

    prep, lut, feeds, _, names = _setup(MODELS / "conv_bn_relu.onnx", MODELS / "conv_bn_relu.npz", "fp32,int8,int4")
    plan = [(2, 1, 0)[i % 3] for i in range(len(lut))]
    got = {}
    for cuts in (8, 0):
        monkeypatch.setattr(metrics, "PARTIAL_CUTS", cuts)
        got[cuts] = sensitivity.compute("pd", prep.graph, lut, names, feeds, workers=1, context=plan)
    assert got[8].details.get("partial_evaluations", 0) > 0 and "cuts" not in got[0].details
    np.testing.assert_allclose(got[8].values, got[0].values, rtol=1e-3, atol=1e-9)
    assert np.all(got[8].values[np.arange(len(lut)), plan] == 0.0)
    assert np.count_nonzero(np.abs(got[0].values) > 1e-6) >= len(lut)  # real changes were measured


def _two_outputs(tmp_path: Path) -> tuple[Path, Path]:
    """x -> fc0 -> Relu (also a graph output, as a recurrent state would be) -> fc1 -> Relu -> fc2 -> y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.35).astype(np.float32), f"w{i}")
             for i in range(3)]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"], name="fc0"),
             helper.make_node("Relu", ["h0"], ["state"], name="relu0"),
             helper.make_node("MatMul", ["state", "w1"], ["h1"], name="fc1"),
             helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
             helper.make_node("MatMul", ["a1", "w2"], ["y"], name="fc2")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16]),
                           helper.make_tensor_value_info("state", TensorProto.FLOAT, ["N", 16])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "two.onnx"
    onnx.save(m, str(path))
    np.savez(tmp_path / "two.npz", x=rng.standard_normal((8, 1, 16)).astype(np.float32))
    return path, tmp_path / "two.npz"


def test_outputs_computed_before_a_cut_come_from_the_plan_not_the_float_model(tmp_path, monkeypatch):
    """A graph output computed before the cut (here fc0's Relu) carries the starting plan's quantization: plans
    that share fc0's setting and differ later must still see fc0's noise on that output."""
    from qcompiler.autoplan import sensitivity
    from qcompiler.autoplan.sensitivity import metrics  # compute reads PARTIAL_CUTS there

    path, calib = _two_outputs(tmp_path)
    prep, lut, feeds, qp, names = _setup(path, calib, "fp32,int4")
    plans = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 1]]
    base = SensitivityRunner(prep.graph, lut, feeds, workers=1, activation_qparams=qp, cuts=8)
    shared, runner = measure_plans(prep.graph, lut, names, feeds, plans, base=base)
    assert runner.partial > 0
    alone = SensitivityRunner(prep.graph, lut, feeds, workers=1, activation_qparams=qp, cuts=0)
    whole, _ = measure_plans(prep.graph, lut, names, feeds, plans, runner=alone)
    state = runner.output_names.index("state")
    for (s1, n1), (s2, n2) in zip(shared, whole):
        assert s1 == pytest.approx(s2, rel=1e-4, abs=1e-12)
        np.testing.assert_allclose(n1, n2, rtol=1e-4, atol=1e-12)
    assert shared[1][1][state] > 0 and shared[3][1][state] == 0.0  # fc0 int4 -> noise on the early output
    monkeypatch.setattr(metrics, "PARTIAL_CUTS", 8)
    ctx = sensitivity.compute("pd", prep.graph, lut, names, feeds, workers=1, context=[1, 1, 1])
    monkeypatch.setattr(metrics, "PARTIAL_CUTS", 0)
    ref = sensitivity.compute("pd", prep.graph, lut, names, feeds, workers=1, context=[1, 1, 1])
    assert ctx.details.get("partial_evaluations", 0) > 0
    np.testing.assert_allclose(ctx.values, ref.values, rtol=1e-3, atol=1e-9)
    np.testing.assert_allclose(ctx.noise, ref.noise, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("kind", ["if", "loop", "scan"])
def test_graphs_with_subgraph_bodies(kind, tmp_path):
    """A tail graph holding an If / Loop / Scan keeps the bodies whole (a Loop body's unused iteration-count input
    is part of its signature): cut evaluations equal whole-graph runs, and the planner plans such a model."""
    import sys

    import onnx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import test_subgraphs as ts

    make, shape = {"if": (ts._if_model, (1, 16)), "loop": (ts._loop_model, (1, 16)),
                   "scan": (ts._scan_model, (6, 1, 16))}[kind]
    onnx.save(make(), str(tmp_path / "m.onnx"))
    x = np.random.default_rng(0).standard_normal((12, *shape)).astype(np.float32)
    x[::2], x[1::2] = np.abs(x[::2]), -np.abs(x[1::2])  # the If model takes both branches
    np.savez(tmp_path / "c.npz", x=x)
    prep, lut, feeds, qp, names = _setup(tmp_path / "m.onnx", tmp_path / "c.npz", "int8,int4")
    cut = SensitivityRunner(prep.graph, lut, feeds, workers=1, activation_qparams=qp, cuts=8)
    whole = SensitivityRunner(prep.graph, lut, feeds, workers=1, activation_qparams=qp, cuts=0)
    for layer in lut:
        for cand in names:
            over = _setting(cut, layer, cand)
            a, b = cut.distortion(over), whole.distortion(over)
            np.testing.assert_allclose(a.noise, b.noise, rtol=1e-4, atol=1e-12)
    res = autoplan.auto_plan(tmp_path / "m.onnx", tmp_path / "c.npz", autoplan.PlanOptions(
        budget=autoplan.Budget.parse("100%"), candidates=autoplan.parse_candidates("fp32,int8,int4")))
    assert res.verified["bytes"] <= res.budget_value and sum(res.counts().values()) == len(lut)
