"""Tests of automatic mixed precision: budget parsing, candidates, sensitivity metrics on a fixture with a layer
built to be fragile, the budget never exceeded (counted as ``inspect --cost`` counts), the CLI round trip."""

from __future__ import annotations

import csv
import itertools
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler import autoplan, ir, quant
from qcompiler.api import CompileOptions, compile_model
from qcompiler.autoplan import Budget, parse_candidates
from qcompiler.autoplan.sensitivity import METRICS, LayerUnderTest, compute, fake_quantize
from qcompiler.calib import spread_indices
from qcompiler.cli import cli
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan, load_plan
from qcompiler.plan.ablations import without
from qcompiler.report import cost
from qcompiler.report import validate as qv

MODELS = Path(__file__).resolve().parents[1] / "models"
CONV = MODELS / "conv_bn_relu.onnx"
CONV_DATA = MODELS / "conv_bn_relu.npz"
FRAGILE = 1  # index of the fragile layer


# ------------------------------------------------------------------------------------------- fixtures
def _fragile_mlp(dim: int = 64, layers: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x[N, dim] -> (MatMul -> Relu) x layers -> logits. Layer FRAGILE's weight columns each hold one large
    entry (1.0) among small ones (σ 0.05): per-channel int4 steps of 1/7 erase the small weights (~10 % relative
    error), while the Gaussian layers (σ = 1/√dim) lose ~1 %. Every metric must rank it first."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    prev = "x"
    for i in range(layers):
        if i == FRAGILE:
            w = (rng.standard_normal((dim, dim)) * 0.05).astype(np.float32)
            w[rng.permutation(dim), np.arange(dim)] = rng.choice([-1.0, 1.0], size=dim)
        else:
            w = (rng.standard_normal((dim, dim)) / math.sqrt(dim)).astype(np.float32) * 1.4
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"], name=f"relu{i}"))
            prev = f"a{i}"
    nodes.append(helper.make_node("Identity", [f"h{layers - 1}"], ["y"], name="out"))
    g = helper.make_graph(nodes, "fragile", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _ternary_friendly_mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N, 64] -> fc0 [64,128] -> fc1 [128,64] (fragile, as above) -> fc2 [64,128] -> fc3 [128,64] -> fc4 [64,64],
    Relu between. fc0, fc2 and fc3 hold ternary-valued weights (±a or 0, as a ternary-trained layer would): 2
    bits store them exactly, so a budget-aware plan gives their bytes to the fragile layer."""
    rng = np.random.default_rng(seed)
    shapes = [(64, 128), (128, 64), (64, 128), (128, 64), (64, 64)]
    nodes, inits = [], []
    prev = "x"
    for i, (k, n) in enumerate(shapes):
        if i == FRAGILE:
            w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
            w[rng.integers(0, k, size=n), np.arange(n)] = rng.choice([-1.0, 1.0], size=n)
        elif i in (0, 2, 3):
            w = (rng.choice([-1.0, 0.0, 1.0], size=(k, n), p=[0.3, 0.4, 0.3]) * 1.6 / math.sqrt(k)).astype(np.float32)
        else:
            w = (rng.standard_normal((k, n)) * 1.4 / math.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        if i < len(shapes) - 1:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"a{i}"], name=f"relu{i}"))
            prev = f"a{i}"
    g = helper.make_graph(nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info(f"h{len(shapes) - 1}", TensorProto.FLOAT, ["N", 64])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def fragile(tmp_path_factory):
    d = tmp_path_factory.mktemp("fragile")
    path = d / "fragile.onnx"
    onnx.save(_fragile_mlp(), str(path))
    x = np.random.default_rng(1).standard_normal((24, 1, 64)).astype(np.float32)
    np.savez(d / "calib.npz", x=x)
    return path, d / "calib.npz"


# --------------------------------------------------------------------------------------------- budget
@pytest.mark.parametrize("text,kind,value", [
    ("4000000", "bytes", 4000000), ("4MB", "bytes", 4 * 1024**2), ("4 mb", "bytes", 4 * 1024**2),
    ("512KB", "bytes", 512 * 1024), ("1.5MiB", "bytes", 1.5 * 1024**2), ("2k", "bytes", 2048),
    ("1000B", "bytes", 1000), ("25%", "fraction", 0.25), ("100%", "fraction", 1.0), ("4.5bits", "bits", 4.5),
    ("4bit", "bits", 4.0), ("3 bits", "bits", 3.0),
])
def test_budget_parsing(text, kind, value):
    b = Budget.parse(text)
    assert b.kind == kind and b.value == pytest.approx(value)


@pytest.mark.parametrize("text,kind,value", [("1.5G", "bitops", 1.5e9), ("2e9", "bitops", 2e9),
                                             ("300M", "bitops", 3e8), ("50%", "bitops-fraction", 0.5)])
def test_bitops_budget_parsing(text, kind, value):
    b = Budget.parse(text, bitops=True)
    assert b.kind == kind and b.value == pytest.approx(value) and b.unit == "bitops"


@pytest.mark.parametrize("text,bitops,match", [
    ("", False, "empty"), ("abc", False, "cannot read"), ("0", False, "positive"), ("4XB", False, "unit"),
    ("120%", False, r"\(0, 100\]"), ("0%", False, r"\(0, 100\]"), ("40bits", False, r"\(0, 32\]"),
    ("4bits", True, "--bitops"), ("3Q", True, "unit"), ("-5", False, "cannot read"),
])
def test_bad_budgets(text, bitops, match):
    with pytest.raises(UserError, match=match):
        Budget.parse(text, bitops=bitops)


def test_candidates():
    c = parse_candidates("fp32,int8,INT4,ternary,binary,shift4,shift2")
    assert [x.name for x in c] == ["fp32", "int8", "int4", "ternary", "binary", "shift4", "shift2"]
    assert c[0].is_float and c[1].keys() == {"dtype": "int8", "scheme": "int"}
    assert c[3].lowbit and c[5].keys() == {"scheme": "shift", "bits": 4}
    for bad, match in (("int5", "unknown integer width"), ("float7", "unknown candidate"), ("int8,int8", "twice"), ("shift7", "bits"), ("", "empty")):
        with pytest.raises(UserError, match=match):
            parse_candidates(bad)


def test_candidate_granularity_suffix():
    c = parse_candidates("int8/tensor,int4/pc,int4/block32,int4,INT4/PT")
    assert [x.name for x in c] == ["int8/tensor", "int4/channel", "int4/block32", "int4", "int4/tensor"]
    assert c[0].keys() == {"dtype": "int8", "scheme": "int", "granularity": "per_tensor"}
    assert c[1].keys() == {"dtype": "int4", "scheme": "int", "granularity": "per_channel"}
    assert c[2].keys() == {"dtype": "int4", "scheme": "int", "granularity": "block", "block_size": 32}
    assert parse_candidates("ternary/tensor")[0].keys() == {"scheme": "ternary", "granularity": "per_tensor"}
    for bad, match in (("fp32/tensor", "no granularity"), ("int4/row", "suffix"), ("ternary/block32", "suffix"),
                       ("int4/block1", "suffix"), ("int4/pt,int4/tensor", "twice")):
        with pytest.raises(UserError, match=match):
            parse_candidates(bad)


def test_candidate_symmetry_suffix():
    """``int4/block64/sym``: the granularity, then the symmetry (no zero points stored; ``/asym``: one per scale)
    whatever the base plan says; the suffix only after a granularity, on int dtypes."""
    c = parse_candidates("int4/block64/sym,int4/channel/asym,int4/block64")
    assert [x.name for x in c] == ["int4/block64/sym", "int4/channel/asym", "int4/block64"]
    assert c[0].keys() == {"dtype": "int4", "scheme": "int", "granularity": "block", "block_size": 64,
                           "symmetric": True}
    assert c[1].keys() == {"dtype": "int4", "scheme": "int", "granularity": "per_channel", "symmetric": False}
    for bad, match in (("int4/sym", "granularity suffix"), ("int4/block64/foo", "symmetry suffix"),
                       ("ternary/tensor/sym", "symmetry suffix"), ("int4/block64/sym,int4/block64/sym", "twice")):
        with pytest.raises(UserError, match=match):
            parse_candidates(bad)


def test_per_tensor_candidate_costs_fewer_bytes(tmp_path):
    """``int8/tensor`` stores one scale and zero point per layer instead of one per output channel: the planner's
    measured byte table and the compiled model agree, and every weight DequantizeLinear has a scalar scale."""
    pt = _plan(CONV, CONV_DATA, "1000000", cands="int8/tensor,int8")
    table = pt.cost_table["bytes"]
    by = {n.name: n for n in ir.import_graph(ir.load_model(CONV))[0].nodes}
    for li, la in enumerate(pt.layers):  # per channel: C fp32 scales + C int8 zero points; per tensor: 1 + 1
        node = by[la.name]
        c = int(node.inputs[1].shape[0 if node.op == "Conv" else -1])
        assert table[li, 1] - table[li, 0] >= 5 * (c - 1) - 16, (la.name, c, table[li])
    uni = _plan(CONV, CONV_DATA, "1000000", cands="int8/tensor")
    uni_pc = _plan(CONV, CONV_DATA, "1000000", cands="int8")
    assert uni.verified["bytes"] < uni_pc.verified["bytes"]
    out = tmp_path / "pt.onnx"
    compile_model(CONV, out, CompileOptions(plan=uni.plan, calib=str(CONV_DATA), validate=False))
    m = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    dq_w = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].ndim >= 2]
    assert dq_w and all(inits[n.input[1]].size == 1 for n in dq_w)
    assert cost.model_cost(out).total_bytes == uni.verified["bytes"]


# ---------------------------------------------------------------------------------------- sensitivity
def _layers(path, cands, target="ort"):
    prep = autoplan.prepare(path, parse_candidates(cands), target=target)
    by = {n.name: n for n in prep.graph.nodes}
    lut = [LayerUnderTest(la.name, by[la.name], prep.nodes[la.name].weight_inputs, prep.specs[i])
           for i, la in enumerate(prep.layers)]
    return prep, lut


@pytest.mark.parametrize("metric", METRICS)
def test_fragile_layer_ranked_most_sensitive(fragile, metric):
    path, calib = fragile
    prep, lut = _layers(path, "fp32,int8,int4")
    feeds = autoplan.load_feeds(prep.graph, calib, 16, 0)
    res = compute(metric, prep.graph, lut, ["fp32", "int8", "int4"], feeds, workers=2)
    assert res.layers == ["fc0", "fc1", "fc2", "fc3"]
    int4 = res.values[:, 2]
    assert int(np.argmax(int4)) == FRAGILE, (metric, int4)
    others = np.delete(int4, FRAGILE)
    assert int4[FRAGILE] > 2.0 * others.max(), (metric, int4)
    assert np.all(res.values[:, 0] == 0.0)  # fp32 costs nothing
    assert np.all(res.values[:, 1] < res.values[:, 2])  # int8 hurts less than int4, layer by layer
    if metric in ("pd", "hessian"):
        assert res.noise is not None and np.all(res.noise[:, 1:] > 0)


def test_pd_matches_a_real_single_layer_compile(fragile, tmp_path):
    """pd's fake quantization equals insert-qdq's codes, and its predicted output noise is the measured one."""
    path, calib = fragile
    prep, lut = _layers(path, "int4")
    feeds = autoplan.load_feeds(prep.graph, calib, 8, 0)
    res = compute("pd", prep.graph, lut, ["int4"], feeds, workers=1)
    layer = lut[FRAGILE]
    text = ("version: 1\ndefaults:\n  weight: {dtype: float}\n  activation: {dtype: float}\nrules:\n"
            f"  - {{match: {{name: {layer.name}}}, weight: {{dtype: int4, granularity: per_channel}}}}\n")
    out = tmp_path / "one.onnx"
    compile_model(path, out, CompileOptions(plan=Plan.from_text(text), calib="none", validate=False))
    fq = fake_quantize(layer.node, layer.weights()[0], layer.specs["int4"])
    qm = ir.load_model(out)
    g, _ = ir.import_graph(qm)
    dq = next(n for n in g.nodes if n.op == "DequantizeLinear")
    vals = [np.asarray(t.values) for t in dq.inputs]  # the zero point is optional (absent: 0)
    codes, scale = vals[:2]
    zp = vals[2] if len(vals) > 2 else np.zeros(scale.shape, dtype=np.int8)
    np.testing.assert_array_equal(quant.dequantize(codes, scale, zp, axis=int(dq.attrs["axis"])), fq)
    fs, qs = ir.session(path), ir.session(out)
    noise = sum(float(((fs.run(None, f)[0].astype(np.float64) - qs.run(None, f)[0]) ** 2).sum()) for f in feeds)
    assert res.noise is not None
    assert res.noise[FRAGILE, 0, 0] == pytest.approx(noise, rel=1e-4)


def test_pd_around_a_plan(fragile):
    """--refine's context mode: scores are changes from the plan (0 for its own choices), the plan's own noise is
    the base of the predicted SQNR, and upgrading the fragile layer is the largest improvement."""
    path, calib = fragile
    prep, lut = _layers(path, "int8,int4")
    feeds = autoplan.load_feeds(prep.graph, calib, 8, 0)
    plain = compute("pd", prep.graph, lut, ["int8", "int4"], feeds, workers=1)
    ctx = compute("pd", prep.graph, lut, ["int8", "int4"], feeds, workers=1, context=[1, 1, 1, 1])
    assert np.all(ctx.values[:, 1] == 0.0)
    assert np.all(ctx.values[:, 0] < 0.0) and int(np.argmin(ctx.values[:, 0])) == FRAGILE
    own = ctx.predicted_sqnr_db([1, 1, 1, 1])
    assert ctx.base_noise is not None and own == pytest.approx(
        10 * math.log10(float(ctx.signal[0]) / float(ctx.base_noise[0])))
    # from the all-int4 plan, switching everything to int8 is predicted far better (first order around the plan)
    assert ctx.predicted_sqnr_db([0, 0, 0, 0]) > own + 5.0
    # at this noise level one-layer-at-a-time noise powers add up to the measured whole-plan noise
    assert plain.predicted_sqnr_db([1, 1, 1, 1]) == pytest.approx(own, abs=1.5)


def _classifier(seed: int = 0) -> onnx.ModelProto:
    """x[N, 16] -> MatMul [16, 32] -> Relu -> MatMul [32, 2] -> Softmax: a 2-class classifier without biases, so
    scaling an input scales its logits (and its margin)."""
    rng = np.random.default_rng(seed)
    w0 = (rng.standard_normal((16, 32)) / 4).astype(np.float32)
    w1 = (rng.standard_normal((32, 2)) / 4).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
             helper.make_node("Relu", ["h"], ["a"], name="relu0"),
             helper.make_node("MatMul", ["a", "w1"], ["z"], name="fc1"),
             helper.make_node("Softmax", ["z"], ["p"], name="softmax", axis=-1)]
    g = helper.make_graph(nodes, "cls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 2])],
                          initializer=[numpy_helper.from_array(w0, "w0"), numpy_helper.from_array(w1, "w1")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_effective_samples():
    from qcompiler.autoplan.sensitivity import effective_samples

    assert effective_samples(np.ones(8)) == pytest.approx(8.0)
    assert effective_samples(np.array([3.0, 0, 0, 0])) == pytest.approx(1.0)
    assert effective_samples(np.array([2.0, 1.0])) == pytest.approx(9.0 / 5.0)
    assert effective_samples(np.zeros(5)) == 5.0


def test_sensitivity_resting_on_one_sample_is_measured_on_more(tmp_path):
    """A confident classifier: every calibration sample has a wide logit margin but one, which alone moves under
    quantization. pd's distortion then rests on ~1 effective sample; the planner measures again on 4x the samples.
    A regression output with alike samples (the fragile MLP) keeps the 8."""
    path = tmp_path / "cls.onnx"
    onnx.save(_classifier(), str(path))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 1, 16)).astype(np.float32)
    m = ir.load_model(path)
    w0 = numpy_helper.to_array(m.graph.initializer[0]).astype(np.float64)
    w1 = numpy_helper.to_array(m.graph.initializer[1]).astype(np.float64)
    margin = np.abs((np.maximum(x[:, 0] @ w0, 0) @ w1) @ np.array([1.0, -1.0]))
    x *= (40.0 / np.maximum(margin, 1e-3))[:, None, None].astype(np.float32)  # logit margin 40: p = 1 - 4e-18
    x[2] *= 0.5 / 40.0  # sample 2: margin 0.5, near the decision boundary
    np.savez(tmp_path / "calib.npz", x=x)
    cands = ["int8", "int4"]
    opts = autoplan.PlanOptions(budget=Budget.parse("100%"), candidates=parse_candidates(cands), samples=8,
                                presets=False, holdout=0)
    prep, lut = _layers(path, "int8,int4")
    ranges = autoplan.calib_source(prep.graph, tmp_path / "calib.npz", 8, 0)
    sens, feeds = autoplan.measure_sensitivity(prep.graph, lut, cands, ranges, opts)
    assert sens.details["first_pass"]["samples"] == 8 and sens.details["first_pass"]["ess"] < 1.1
    assert sens.samples == 32 and len(feeds) == 32
    opts.max_samples = 8  # growth off
    sens8, _ = autoplan.measure_sensitivity(prep.graph, lut, cands, ranges, opts)
    assert sens8.samples == 8 and "first_pass" not in sens8.details
    res = autoplan.auto_plan(path, tmp_path / "calib.npz", autoplan.PlanOptions(
        budget=Budget.parse("100%"), candidates=parse_candidates(cands), samples=8, select=0, presets=False,
        holdout=0))
    assert res.sensitivity.samples == 32
    # alike samples, relative-MSE output: no second pass
    fpath, fcalib = _fragile_files(tmp_path)
    prep, lut = _layers(fpath, "int8,int4")
    sens, _ = autoplan.measure_sensitivity(prep.graph, lut, cands, autoplan.calib_source(prep.graph, fcalib, 8, 0),
                                           autoplan.PlanOptions(budget=Budget.parse("100%"), samples=8))
    assert sens.samples == 8 and sens.details["ess"] > 4.0


def _fragile_files(d: Path) -> tuple[Path, Path]:
    path = d / "fragile.onnx"
    onnx.save(_fragile_mlp(), str(path))
    np.savez(d / "fcalib.npz", x=np.random.default_rng(1).standard_normal((24, 1, 64)).astype(np.float32))
    return path, d / "fcalib.npz"


def test_probability_outputs_use_kl():
    from qcompiler.autoplan.sensitivity import output_kind as _output_kind

    g = ir.import_graph(_fragile_mlp())[0]
    p = np.full((2, 3, 5), 0.2, dtype=np.float32)
    assert _output_kind("y", g, p) == ("prob", 2)
    assert _output_kind("y", g, p.transpose(0, 2, 1)) == ("prob", 1)
    assert _output_kind("y", g, np.array([[0.3, -0.2]], dtype=np.float32)) == ("mse", None)


# -------------------------------------------------------------------------------------------- planning
def _plan(path, calib, budget, cands="int8,int4", **kw):
    """The search alone on the default plan (no preset search, nothing measured), unless ``kw`` says otherwise."""
    kw.setdefault("presets", False)
    kw.setdefault("holdout", 0)
    opts = autoplan.PlanOptions(budget=Budget.parse(budget, bitops=kw.pop("bitops", False)),
                                candidates=parse_candidates(cands), samples=8, **kw)
    return autoplan.auto_plan(path, calib, opts)


def _compiled_cost(path, plan, calib, tmp_path, name="q.onnx", target="ort"):
    out = tmp_path / name
    compile_model(path, out, CompileOptions(plan=plan, calib=str(calib), validate=False, target=target))
    return cost.model_cost(out), os.path.getsize(out)


def test_budget_never_exceeded_bytes(tmp_path):
    """Byte budgets from the all-int4 size to the all-int8 size: every plan, compiled with the real calibration
    data, fits — counted by inspect --cost and on disk — and more budget never predicts more distortion."""
    lo = _plan(CONV, CONV_DATA, "1000000", cands="int4")  # cheapest: everything int4
    hi = _plan(CONV, CONV_DATA, "1000000", cands="int8")
    b_lo, b_hi = lo.verified["bytes"], hi.verified["bytes"]
    assert b_lo < b_hi
    prev = math.inf
    for k, budget in enumerate(np.linspace(b_lo, b_hi, 5).astype(int)):
        res = _plan(CONV, CONV_DATA, str(budget), metric="act-stats")
        rep, size = _compiled_cost(CONV, Plan.from_text(res.text), CONV_DATA, tmp_path, f"q{k}.onnx")
        assert rep.total_bytes <= budget and size <= budget, (budget, rep.total_bytes)
        assert res.predicted["sensitivity"] <= prev + 1e-12
        prev = res.predicted["sensitivity"]
    with pytest.raises(UserError, match="below the smallest plan"):
        _plan(CONV, CONV_DATA, str(b_lo - 200))


def test_fraction_bits_and_bitops_budgets(fragile, tmp_path):
    path, calib = fragile
    res = _plan(path, calib, "5bits", cands="int8,int4")  # 4 equal layers: room for one at int8
    assert res.unit == "bits" and res.predicted["avg_bits"] == 5.0
    rep, _ = _compiled_cost(path, res.plan, calib, tmp_path, "bits.onnx")
    assert rep.average_weight_bits() == pytest.approx(res.predicted["avg_bits"])
    assert res.choice[FRAGILE] == 0  # the fragile layer is the one kept at int8
    res = _plan(path, calib, "20%", cands="int8,int4")
    assert res.verified["bytes"] <= math.floor(0.2 * os.path.getsize(path))
    float_ops = cost.model_cost(path, feed_shapes={"x": [1, 64]}).bitops
    res = _plan(path, calib, "5%", cands="int8,int4", bitops=True)  # int4 everywhere is 3.125 %; 2 int8 fit
    rep, _ = _compiled_cost(path, res.plan, calib, tmp_path, "ops.onnx")
    rep = cost.model_cost(tmp_path / "ops.onnx", feed_shapes={"x": [1, 64]})
    assert rep.bitops <= 0.05 * float_ops and res.verified["bitops"] == rep.bitops
    assert res.counts() == {"int8": 2, "int4": 2} and res.choice[FRAGILE] == 0


def test_mixed_plan_beats_uniform_at_equal_bytes(fragile, tmp_path):
    """At the bytes of uniform int4 the planner stores the ternary-friendly layers in 2 bits (packed target) and
    spends the bytes on int8 for the fragile layer: measured SQNR ≥ uniform int4 + 3 dB."""
    _, calib = fragile
    path = tmp_path / "mixed.onnx"
    onnx.save(_ternary_friendly_mlp(), str(path))
    uni = _plan(path, calib, "1000000", cands="int4", target="packed")
    res = _plan(path, calib, str(uni.verified["bytes"]), cands="int8,int4,ternary,binary", target="packed")
    assert res.verified["bytes"] <= uni.verified["bytes"]
    assert res.choice[FRAGILE] == 0  # int8 for the fragile layer
    sq_mixed = autoplan.measure_sqnr(path, res.plan, calib, target="packed")
    sq_uni = autoplan.measure_sqnr(path, uni.plan, calib, target="packed")
    assert sq_mixed >= sq_uni + 3.0, (sq_mixed, sq_uni)


def test_weight_owners_follow_dequantization_chains():
    """A weight dequantized by ops of the target's own (Cast + Mul) belongs to the layer it feeds; a tensor with
    two readers, another layer, or a node outside the chain belong to no layer."""
    import onnx_graphsurgeon as gs

    x = gs.Variable("x", np.float32, [1, 4])
    q = gs.Constant("w_q", np.ones((4, 4), np.int8))
    f, w = gs.Variable("w_f", np.float32), gs.Variable("w", np.float32)
    y, z, a, b = (gs.Variable(n, np.float32) for n in ("y", "z", "a", "b"))
    nodes = [gs.Node("Cast", "w:Cast", {"to": 1}, [q], [f]),
             gs.Node("Mul", "w:Mul", inputs=[f, gs.Constant("s", np.array(0.5, np.float32))], outputs=[w]),
             gs.Node("MatMul", "fc0", inputs=[x, w], outputs=[y]),
             gs.Node("Relu", "relu", inputs=[y], outputs=[a]),
             gs.Node("MatMul", "fc1", inputs=[a, gs.Constant("w1", np.ones((4, 4), np.float32))], outputs=[z]),
             gs.Node("Add", "both", inputs=[z, gs.Constant("c", np.ones(4, np.float32))], outputs=[b])]
    g = gs.Graph(nodes=nodes, inputs=[x], outputs=[b, z])
    assert autoplan.weight_owners(g, {"fc0", "fc1"}) == {"w:Cast": "fc0", "w:Mul": "fc0", "relu": "fc1"}
    assert autoplan.weight_owners(g, {"fc1"}) == {"relu": "fc1"}  # fc0 is a layer op: chains stop there


def test_unsupported_candidate_is_refused(fragile):
    path, calib = fragile
    with pytest.raises(UserError, match="not supported by target 'tensorrt'"):
        _plan(path, calib, "20%", cands="int8,ternary", target="tensorrt")


def test_default_candidates_the_target_cannot_run_are_left_out(fragile, tmp_path, caplog):
    """ort-qop runs int4 only weight-only, and the plan quantizes the activations: the default int8,int4 plans
    with int8 alone (a warning says why), while int4 asked for explicitly is still refused."""
    path, calib = fragile
    with pytest.raises(UserError, match="'int4' is not supported by target 'ort-qop'"):
        _plan(path, calib, "30%", cands="int8,int4", target="ort-qop")
    with caplog.at_level(logging.WARNING, logger="qcompiler.autoplan"):
        res = _plan(path, calib, "30%", target="ort-qop", default_candidates=True)
    assert "candidate int4 left out: target 'ort-qop'" in caplog.text
    assert res.candidates == ["int8"]
    (tmp_path / "p.yaml").write_text(res.text, encoding="utf-8")
    _, size = _compiled_cost(path, tmp_path / "p.yaml", calib, tmp_path, target="ort-qop")
    assert size <= 0.30 * os.path.getsize(path)  # int8 everywhere fits 30 %
    # the same through the CLI: no --candidates given
    r = CliRunner().invoke(cli, ["plan", str(path), "--budget", "30%", "--calib", str(calib), "--target", "ort-qop",
                                 "-o", str(tmp_path / "cli.yaml"), "-q", "--no-presets"])
    assert r.exit_code == 0, r.output
    assert "int4" not in (tmp_path / "cli.yaml").read_text(encoding="utf-8").split("rules:")[-1]


def test_plan_is_deterministic_and_front_is_pareto(fragile):
    path, calib = fragile
    a = _plan(path, calib, "30%", cands="fp32,int8,int4")
    b = _plan(path, calib, "30%", cands="fp32,int8,int4")
    assert a.text == b.text
    bytes_ = [p.bytes for p in a.front]
    sens = [p.sensitivity for p in a.front]
    assert bytes_ == sorted(bytes_) and all(s1 > s2 for s1, s2 in itertools.pairwise(sens))
    assert sum(p.chosen for p in a.front) == 1
    assert "# fc1 (MatMul, 4096 params):" in a.text  # the comment with sensitivity and bytes per candidate
    assert "s=" in a.text and "B," in a.text


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_round_trip(tmp_path):
    runner = CliRunner()
    plan, front = tmp_path / "plan.yaml", tmp_path / "front.csv"
    r = runner.invoke(cli, ["plan", str(CONV), "--budget", "11KB", "--calib", str(CONV_DATA), "-o", str(plan),
                            "--pareto", str(front), "--measure", "2", "--samples", "8", "--no-presets"])
    assert r.exit_code == 0, r.output
    assert plan.exists() and front.exists() and front.with_suffix(".svg").exists()
    text = plan.read_text()
    assert "version: 1" in text and text.count("- {match: {name: ") == 6
    rows = list(csv.DictReader(front.open()))
    assert len(rows) >= 3 and sum(int(x["chosen"]) for x in rows) == 1
    measured = [x for x in rows if x["measured_sqnr_db"]]
    assert len(measured) >= 2
    svg = front.with_suffix(".svg").read_text()
    assert svg.startswith("<svg") and "measured SQNR" in svg and svg.count("<rect") >= 3
    out = tmp_path / "q.onnx"
    r = runner.invoke(cli, ["compile", str(CONV), "-o", str(out), "--plan", str(plan), "--calib", str(CONV_DATA)])
    assert r.exit_code == 0, r.output
    assert os.path.getsize(out) <= 11 * 1024 and "cost:" in r.output
    # explicit sub-command, plan to stdout; the other sub-commands still work
    r = runner.invoke(cli, ["plan", "auto", str(CONV), "--budget", "11KB", "--calib", str(CONV_DATA), "-q",
                            "--metric", "act-stats", "--no-presets"])
    assert r.exit_code == 0 and r.output.startswith("# Mixed-precision plan")
    r = runner.invoke(cli, ["plan", "show"])
    assert r.exit_code == 0 and "w8a8" in r.output
    r = runner.invoke(cli, ["plan", "resolve", str(CONV)])
    assert r.exit_code == 0 and "conv1" in r.output
    r = runner.invoke(cli, ["plan", str(CONV), "--budget", "1KB", "--calib", str(CONV_DATA)])
    assert r.exit_code == 2 and "below the smallest plan" in r.output and "Traceback" not in r.output


def test_compile_with_budget(tmp_path):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(cli, ["compile", str(CONV), "-o", str(out), "--budget", "40%", "--calib", str(CONV_DATA),
                                 "--report", str(report)])
    assert r.exit_code == 0, r.output
    import json

    rep = json.loads(report.read_text())
    assert rep["autoplan"]["budget"] == "40%"
    assert rep["cost"]["total_bytes"] == os.path.getsize(out) <= math.floor(0.4 * os.path.getsize(CONV))
    assert (tmp_path / "q.autoplan.yaml").exists()
    r = CliRunner().invoke(cli, ["compile", str(CONV), "-o", str(tmp_path / "x.onnx"), "--candidates", "int4"])
    assert r.exit_code == 2 and "--budget" in r.output


def test_real_model_plan_fits_and_compiles(tmp_path):
    """PP-OCR angle classifier (54 layers; pd on 8 samples, then on all 16 as they rest on ~1): a 30 % byte
    budget is met by the compiled model, counted as inspect --cost counts it and on disk; the plan mixes
    precisions and works (output SQNR)."""
    from realdata import fetch_model, ppocr_cls_inputs

    path = fetch_model("ppocr_cls")
    feeds, _ = ppocr_cls_inputs(16, "calib")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in feeds]))
    res = _plan(path, calib, "30%")
    budget = math.floor(0.3 * os.path.getsize(path))
    assert len(res.layers) == 54 and res.budget_value == budget
    rep, size = _compiled_cost(path, res.plan, calib, tmp_path)
    assert rep.total_bytes <= budget and size <= budget
    assert res.verified["bytes"] == rep.total_bytes
    assert len([c for c, n in res.counts().items() if n]) == 2  # int8 and int4 both used
    assert autoplan.measure_sqnr(path, res.plan, calib) > 25.0
    assert res.sensitivity.samples == 16 and res.sensitivity.details["ess"] < 2.0


def test_exchange_repairs_a_poor_plan_and_keeps_the_budget(fragile, tmp_path, monkeypatch):
    """--exchange: handed a plan that stores the fragile layer in int4 and a robust one in int8 (same bytes: the
    solver is rigged to swap them), one measured exchange round moves int8 back to the fragile layer; the plan
    still fits the budget, and its measured SQNR is higher than the rigged plan's."""
    path, calib = fragile
    fair = _plan(path, calib, "21%", select=0)
    assert fair.choice[FRAGILE] == 0 and fair.choice.count(0) == 1
    robust = (FRAGILE + 2) % 4
    real_solve = autoplan._solve

    def rigged(values, costs, cap, opts):
        ch = real_solve(values, costs, cap, opts)
        if ch is not None:
            ch[FRAGILE], ch[robust] = ch[robust], ch[FRAGILE]
        return ch

    monkeypatch.setattr(autoplan.search, "_solve", rigged)  # where auto_plan looks it up
    poor = _plan(path, calib, "21%", select=0)
    fixed = _plan(path, calib, "21%", select=0, exchange=1)
    assert poor.choice[FRAGILE] == 1 and poor.choice[robust] == 0
    assert fixed.choice[FRAGILE] == 0
    assert fixed.verified["bytes"] <= fixed.budget_value
    assert fixed.predicted["joint_sqnr_db"] > poor.predicted["sqnr_db"]
    monkeypatch.undo()
    sq_fixed = autoplan.measure_sqnr(path, fixed.plan, calib)
    sq_poor = autoplan.measure_sqnr(path, poor.plan, calib)
    assert sq_fixed >= sq_poor + 3.0, (sq_fixed, sq_poor)
    with pytest.raises(UserError, match="--exchange"):
        _plan(path, calib, "21%", metric="hessian", exchange=1)


# ------------------------------------------------------------- issue 14: never lose to a uniform preset
DEPTHWISE = MODELS / "depthwise.onnx"  # Conv only: w4a8's MatMul / Gemm rule matches nothing
DEPTHWISE_DATA = MODELS / "depthwise.npz"


def _held_back(data: Path, tmp_path: Path, n_hold: int) -> tuple[Path, list[dict[str, np.ndarray]]]:
    """The calibration part (first samples, as a stacked .npz) and the held-back feeds (last n_hold) of ``data``."""
    with np.load(data) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(next(iter(arrays.values())))
    fit = tmp_path / "fit.npz"
    np.savez(fit, **{k: v[: n - n_hold] for k, v in arrays.items()})
    return fit, [{k: v[i] for k, v in arrays.items()} for i in range(n - n_hold, n)]


def test_planner_returns_the_uniform_preset_when_the_search_cannot_beat_it(fragile, tmp_path, monkeypatch):
    """Rigged: the knapsack answers every layer at its cheapest candidate (int4, fragile layer included) and no
    whole-plan selection repairs it. At a budget every preset fits, the best preset measures far better than that
    mix on the held-back samples, so the planner returns the preset itself: it compiles to the same model as
    `--preset NAME`, and the measured SQNR is the preset's."""
    path, calib = fragile

    def cheapest(values, costs, cap, opts):
        return [int(np.nanargmin(row)) for row in costs]

    monkeypatch.setattr(autoplan.search, "_solve", cheapest)
    res = autoplan.auto_plan(path, calib, autoplan.PlanOptions(budget=Budget.parse("100%"), select=0))
    assert res.uniform and res.choice == [1, 1, 1, 1]  # the mix found is all int4 ...
    name = res.baseline["name"]
    assert name in autoplan.baseline.presets.names()
    fitting = [r for r in res.baseline["presets"] if r.get("fits")]
    assert fitting and res.baseline["sqnr_db"] == max(r["sqnr_db"] for r in fitting)
    assert res.measured["sqnr_db"] == res.baseline["sqnr_db"] > res.measured["mixed"]["sqnr_db"] + 3.0
    assert res.text.startswith(f"# Plan written by `qcompiler plan` (qcompiler {autoplan.baseline.__version__}): "
                               f"the uniform {name}")
    # ... and the plan returned is the preset as written (what the planner measured; its algorithm guard, which
    # may change a preset measured on data — w8a8-dynamic's per-token / SmoothQuant candidates —, off): the same
    # compiled model
    a, b = tmp_path / "planned.onnx", tmp_path / "preset.onnx"
    compile_model(path, a, CompileOptions(plan=res.plan, calib=str(calib), validate=False))
    as_written = load_plan(name)
    as_written.guard = "off"
    compile_model(path, b, CompileOptions(plan=as_written, calib=str(calib), validate=False))
    qa, qb = onnx.load(str(a)), onnx.load(str(b))
    assert [n.op_type for n in qa.graph.node] == [n.op_type for n in qb.graph.node]
    assert all(np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y))
               for x, y in zip(qa.graph.initializer, qb.graph.initializer, strict=True))


def test_a_mixed_plan_that_measures_better_is_kept(tmp_path):
    """Below every int8 preset's bytes the mix of int8 and int4 on top of the best int4 preset measures better
    than that preset alone on the held-back samples (conv_bn_relu, 9000 bytes): the mix is returned, built on
    the preset (its algorithms and weight ranges in the plan), within the budget."""
    res = autoplan.auto_plan(CONV, CONV_DATA, autoplan.PlanOptions(budget=Budget.parse("9000")))
    assert not res.uniform and res.baseline["fits"]
    base = without(Plan.from_file(str(autoplan.baseline.presets.preset_path(
        res.baseline["preset"]))), res.baseline["off"], "base")
    assert res.plan.algorithms == base.algorithms and res.plan.weight_defaults == base.weight_defaults
    assert res.measured["sqnr_db"] > res.baseline["sqnr_db"]
    assert res.verified["bytes"] <= 9000 and res.measured["bytes"] == res.verified["bytes"]
    # kept by the guard's bootstrap too: the share of draws it won is recorded and written in the header
    rate = res.measured["win_rate"]
    assert rate >= autoplan.baseline.MIX_CONFIDENCE
    assert f"above the uniform plan on {100 * rate:.0f} % of the held-back samples' bootstrap draws" in res.text


def test_preset_base_with_rules_matching_no_node_warns_and_works(tmp_path):
    """`plan --plan w4a8` on a Conv-only model: the preset's MatMul / Gemm rule matches no node — a warning, not an
    exit 1; the plan keeps the preset's algorithms, compiles within the budget, and is never worse than w4a8
    alone (measured)."""
    uni = tmp_path / "w4a8.onnx"
    r = CliRunner().invoke(cli, ["compile", str(DEPTHWISE), "-o", str(uni), "--preset", "w4a8",
                                 "--calib", str(DEPTHWISE_DATA)])
    assert r.exit_code == 0, r.output
    budget = cost.model_cost(uni).total_bytes
    out = tmp_path / "p.yaml"
    r = CliRunner().invoke(cli, ["plan", str(DEPTHWISE), "--plan", "w4a8", "--budget", str(budget),
                                 "--calib", str(DEPTHWISE_DATA), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "rules[0] (op_type=MatMul,Gemm) match(es) no node of depthwise.onnx" in r.output
    text = out.read_text(encoding="utf-8")
    assert "gptq: {block_size: 128, damp: 0.01, act_order: true}" in text and "bias_correct: true" in text
    # a mixed plan leaves the rule out; the uniform preset returned as it is keeps it
    assert ("MatMul" in text) == text.startswith("# Plan written by `qcompiler plan` (qcompiler "), text[:300]
    m = re.search(r"measured: output SQNR ([-0-9.]+) dB", r.output)
    base = re.search(r"uniform base plan alone ([-0-9.]+) dB", r.output)
    assert m is not None and (base is None or float(m.group(1)) >= float(base.group(1)))
    q = tmp_path / "q.onnx"
    r = CliRunner().invoke(cli, ["compile", str(DEPTHWISE), "-o", str(q), "--plan", str(out),
                                 "--calib", str(DEPTHWISE_DATA)])
    assert r.exit_code == 0, r.output
    assert cost.model_cost(q).total_bytes <= budget


def test_printed_sqnr_is_the_measured_one(tmp_path):
    """The SQNR `plan` prints and writes is measured: compiling the written plan with the calibration samples it
    names (the 24 of 32 not held back) and running onnxruntime on the 8 held back — every 4th, spread over the
    data — gives it again (the worst output slice, as `validate` reports it), to the printed digit; the additive
    model's figure is shown apart, labelled as predicted."""
    out = tmp_path / "p.yaml"
    r = CliRunner().invoke(cli, ["plan", str(CONV), "--budget", "9000", "--calib", str(CONV_DATA), "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = re.search(r"measured: output SQNR ([-0-9.]+) dB \(compiled, onnxruntime on 8 of the 32 calibration "
                  r"samples spread over them \(every 4th\), held back \(compiled with the other 24\)\)", r.output)
    assert m is not None, r.output
    assert re.search(r"predicted output SQNR [-0-9.]+ dB \(additive model\)", r.output)
    text = out.read_text(encoding="utf-8")
    assert f"# measured: output SQNR {m.group(1)} dB" in text and "# predicted (additive model, not measured)" in text
    held_idx = spread_indices(32, 8)
    assert held_idx == [3, 7, 11, 15, 19, 23, 27, 31]
    with np.load(CONV_DATA) as z:
        arrays = {k: z[k] for k in z.files}
    fit = tmp_path / "fit.npz"
    np.savez(fit, **{k: np.delete(v, held_idx, axis=0) for k, v in arrays.items()})
    held = [{k: v[i] for k, v in arrays.items()} for i in held_idx]
    q = tmp_path / "q.onnx"
    r = CliRunner().invoke(cli, ["compile", str(CONV), "-o", str(q), "--plan", str(out), "--calib", str(fit)])
    assert r.exit_code == 0, r.output
    again = qv.validate(CONV, q, held, per_layer=False).worst_slice_sqnr()
    assert f"{again:.2f}" == m.group(1)
