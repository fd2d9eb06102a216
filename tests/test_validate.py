"""Tests of qcompiler.report.validate: metrics against numpy, streaming, per-layer matching, feeds loading."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.core.errors import UserError
from qcompiler.report import validate
from qcompiler.report.validate.metrics import _Accumulator

F32 = TensorProto.FLOAT
OPSET = [helper.make_opsetid("", 17)]


# ------------------------------------------------------------------------------------------- helpers
def _model(nodes, inputs, outputs, inits=(), name="g") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    m = helper.make_model(graph, opset_imports=OPSET)
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _vi(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def _matmul_model(w: np.ndarray, in_shape=None, out_name="y") -> onnx.ModelProto:
    """y = x @ W (W an initializer)."""
    k, n = w.shape
    in_shape = in_shape or [1, k]
    out_shape = [*in_shape[:-1], n]
    return _model(
        [helper.make_node("MatMul", ["x", "W"], [out_name], name="mm")],
        [_vi("x", in_shape)],
        [_vi(out_name, out_shape)],
        [numpy_helper.from_array(w.astype(np.float32), "W")],
    )


def _mlp(ws: list[np.ndarray]) -> onnx.ModelProto:
    """layer1 = x@W1; act1 = Tanh(layer1); layer2 = act1@W2; act2 = Tanh(layer2); layer3 = act2@W3; y = Softmax."""
    nodes = []
    prev = "x"
    for i, _ in enumerate(ws, start=1):
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"layer{i}"], name=f"mm{i}"))
        if i < len(ws):
            nodes.append(helper.make_node("Tanh", [f"layer{i}"], [f"act{i}"], name=f"tanh{i}"))
            prev = f"act{i}"
    nodes.append(helper.make_node("Softmax", [f"layer{len(ws)}"], ["y"], name="softmax", axis=-1))
    inits = [numpy_helper.from_array(w.astype(np.float32), f"W{i}") for i, w in enumerate(ws, start=1)]
    return _model(nodes, [_vi("x", [1, ws[0].shape[0]])], [_vi("y", [1, ws[-1].shape[1]])], inits)


def _feeds(rng, n, shape, name="x"):
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _run_all(model, feeds, name="y"):
    sess = ir.session(model)
    return np.concatenate([sess.run([name], f)[0] for f in feeds], axis=0)


def _numpy_metrics(ref: np.ndarray, q: np.ndarray) -> dict[str, float]:
    r = ref.astype(np.float64).ravel()
    x = q.astype(np.float64).ravel()
    d = r - x
    return {
        "sqnr_db": 10 * math.log10(float(r @ r) / float(d @ d)),
        "cosine": float(r @ x) / math.sqrt(float(r @ r) * float(x @ x)),
        "max_abs": float(np.abs(d).max()),
        "mean_abs": float(np.abs(d).mean()),
    }


# ----------------------------------------------------------------------------------------- (a) identity
def test_identical_models_are_inf_and_pass():
    rng = np.random.default_rng(0)
    m = _matmul_model(rng.standard_normal((8, 4)))
    rep = validate.validate(m, m, _feeds(rng, 5, (1, 8)), min_sqnr_db=40.0)
    (out,) = rep.outputs
    assert out.name == "y"
    assert out.sqnr_db == math.inf
    assert out.cosine == pytest.approx(1.0, abs=1e-12)
    assert out.max_abs == 0.0 and out.mean_abs == 0.0
    assert out.elements == 5 * 4
    assert rep.samples == 5
    assert rep.passed
    assert rep.worst_output_sqnr() == math.inf
    js = rep.to_json()
    json.dumps(js, allow_nan=False)  # strict JSON: inf is the string "inf"
    assert js["outputs"][0]["sqnr_db"] == "inf"
    assert js["passed"] is True


def test_identical_fusable_model_is_inf_with_layers_exposed():
    """Exposing layers disables onnxruntime fusions (Conv+BN); outputs still compare plain vs plain."""
    rng = np.random.default_rng(17)
    c = 4
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "Wc"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), "var"),
    ]
    m = _model(
        [helper.make_node("Conv", ["x", "Wc"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["bn"]),
         helper.make_node("Relu", ["bn"], ["y"])],
        [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, c, 8, 8])], inits)
    rep = validate.validate(m, m, _feeds(rng, 4, (1, 3, 8, 8)))
    assert rep.outputs[0].sqnr_db == math.inf
    assert {x.name for x in rep.layers} == {"conv", "bn"}
    assert all(x.sqnr_db == math.inf for x in rep.layers)


def test_accepts_paths(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4))
    f = tmp_path / "f.onnx"
    q = tmp_path / "q.onnx"
    onnx.save(_matmul_model(w), f)
    onnx.save(_matmul_model(w + 0.01 * rng.standard_normal(w.shape)), q)
    rep = validate.validate(str(f), q, _feeds(rng, 3, (1, 8)))
    assert math.isfinite(rep.outputs[0].sqnr_db) and rep.outputs[0].sqnr_db > 20


# ------------------------------------------------------------------------------------ (b) known noise
def test_weight_noise_matches_analytic_sqnr():
    rng = np.random.default_rng(2)
    k, n, samples = 16, 12, 64
    w = rng.standard_normal((k, n))
    e = rng.standard_normal((k, n))
    target_db = 30.0
    e *= np.linalg.norm(w) / np.linalg.norm(e) * 10 ** (-target_db / 20)
    # Inputs with X^T X = samples * I make Σ||x W||² = samples·||W||², so SQNR = ||W||² / ||E||² exactly.
    qmat, _ = np.linalg.qr(rng.standard_normal((samples, k)))
    x = qmat * math.sqrt(samples)
    feeds = [{"x": x[i : i + 1].astype(np.float32)} for i in range(samples)]
    analytic = 10 * math.log10(float(np.sum(w**2)) / float(np.sum(e**2)))
    assert analytic == pytest.approx(target_db)

    rep = validate.validate(_matmul_model(w), _matmul_model(w + e), feeds, per_layer=False)
    assert abs(rep.outputs[0].sqnr_db - analytic) < 0.1
    # and against numpy on the very same data
    ref = x @ w.astype(np.float32)
    q = x @ (w + e).astype(np.float32)
    assert rep.outputs[0].sqnr_db == pytest.approx(_numpy_metrics(ref, q)["sqnr_db"], abs=0.01)


# ---------------------------------------------------------------------------------------- (c) streaming
def test_streaming_matches_concatenation_and_keeps_no_samples():
    rng = np.random.default_rng(3)
    k, n, samples = 16, 4096, 200
    w = rng.standard_normal((k, n)) / 4
    wq = w + 0.02 * rng.standard_normal((k, n))
    fm, qm = _matmul_model(w), _matmul_model(wq)

    def gen(count):
        for s in range(count):
            yield {"x": np.random.default_rng(1000 + s).standard_normal((1, k)).astype(np.float32)}

    ref = _run_all(fm, gen(samples))
    q = _run_all(qm, gen(samples))
    expected = _numpy_metrics(ref, q)
    top1 = float(np.mean(np.argmax(ref, -1) == np.argmax(q, -1)))
    total_bytes = ref.nbytes + q.nbytes  # 6.5 MB of float32 outputs over all samples
    del ref, q

    def peak_of(count):
        tracemalloc.start()
        try:
            rep = validate.validate(fm, qm, gen(count), per_layer=False)
            return rep, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    _, peak_small = peak_of(10)
    rep, peak = peak_of(samples)
    # 20x the samples, (almost) the same peak: nothing per sample is kept
    assert peak - peak_small < total_bytes / 20, f"peak {peak_small} -> {peak} bytes"

    out = rep.outputs[0]
    assert rep.samples == samples
    assert out.elements == samples * n
    for key, val in expected.items():
        assert getattr(out, key) == pytest.approx(val, rel=1e-6), key
    assert out.top1_agreement == pytest.approx(top1, rel=1e-12)


def test_accumulator_holds_scalars_only():
    acc = _Accumulator("t")
    rng = np.random.default_rng(4)
    for _ in range(3):
        a = rng.standard_normal((2, 5)).astype(np.float32)
        acc.update(a, a + 0.1)
    for slot in _Accumulator.__slots__:
        v = getattr(acc, slot)
        assert v is None or isinstance(v, (int, float, str)), slot


# ----------------------------------------------------------------------------------------- (d) layers
def test_per_layer_only_perturbed_layer_and_after():
    rng = np.random.default_rng(5)
    ws = [rng.standard_normal((8, 8)) / 3 for _ in range(3)]
    ws_q = [ws[0], ws[1] + 0.05 * rng.standard_normal((8, 8)), ws[2]]
    rep = validate.validate(_mlp(ws), _mlp(ws_q), _feeds(rng, 20, (1, 8)))
    by = {m.name: m for m in rep.layers}
    assert set(by) == {"layer1", "act1", "layer2", "act2", "layer3"}
    assert by["layer1"].sqnr_db == math.inf and by["act1"].sqnr_db == math.inf
    for name in ("layer2", "act2", "layer3"):
        assert math.isfinite(by[name].sqnr_db) and by[name].sqnr_db > 0, name
    sq = [m.sqnr_db for m in rep.layers]
    assert sq == sorted(sq), "layers are sorted worst SQNR first"
    assert {m.name for m in rep.layers[:3]} == {"layer2", "act2", "layer3"}
    assert math.isfinite(rep.outputs[0].sqnr_db)
    text = rep.table(max_layers=2)
    assert "outputs:" in text and "worst layers (2 of 5)" in text
    assert rep.layers[0].name in text and "layer1" not in text


def test_layer_names_and_per_layer_off():
    rng = np.random.default_rng(6)
    ws = [rng.standard_normal((8, 8)) / 3 for _ in range(3)]
    ws_q = [w + 0.01 * rng.standard_normal((8, 8)) for w in ws]
    feeds = _feeds(rng, 4, (1, 8))
    rep = validate.validate(_mlp(ws), _mlp(ws_q), feeds, layer_names=["layer2", "nope"])
    assert [m.name for m in rep.layers] == ["layer2"]
    rep = validate.validate(_mlp(ws), _mlp(ws_q), feeds, per_layer=False)
    assert rep.layers == []


def test_folded_topology_matches_by_name():
    """The quantized graph lost a tensor name (folded op): only the shared names are compared."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    scale = rng.uniform(0.5, 2.0, 8).astype(np.float32)
    fm = _model(
        [helper.make_node("MatMul", ["x", "W"], ["mm_out"]), helper.make_node("Mul", ["mm_out", "s"], ["scaled"]),
         helper.make_node("Relu", ["scaled"], ["y"])],
        [_vi("x", [1, 8])], [_vi("y", [1, 8])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(scale, "s")])
    qm = _model(
        [helper.make_node("MatMul", ["x", "Wf"], ["scaled"]), helper.make_node("Relu", ["scaled"], ["y"])],
        [_vi("x", [1, 8])], [_vi("y", [1, 8])],
        [numpy_helper.from_array(w * scale, "Wf")])
    rep = validate.validate(fm, qm, _feeds(rng, 5, (1, 8)))
    assert [m.name for m in rep.layers] == ["scaled"]
    assert rep.layers[0].sqnr_db > 100  # same math up to float rounding


# ----------------------------------------------------------------------------------------- QDQ model
def test_qdq_quantized_copy_is_measured():
    rng = np.random.default_rng(8)
    k, n = 16, 10
    w = rng.standard_normal((k, n)).astype(np.float32)
    fm = _model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
        [_vi("x", [1, k])], [_vi("y", [1, n])], [numpy_helper.from_array(w, "W")])
    # per-tensor symmetric int8 weight, activations of the MatMul output through Q/DQ named like the float 'h'
    s_w = float(np.abs(w).max()) / 127
    w_q = np.clip(np.round(w / s_w), -127, 127).astype(np.int8)
    s_h = 8.0 / 127
    qm = _model(
        [
            helper.make_node("DequantizeLinear", ["W_q", "W_s", "W_zp"], ["W_dq"], name="dq_w"),
            helper.make_node("MatMul", ["x", "W_dq"], ["h_raw"], name="mm"),
            helper.make_node("QuantizeLinear", ["h_raw", "h_s", "h_zp"], ["h_q"], name="q_h"),
            helper.make_node("DequantizeLinear", ["h_q", "h_s", "h_zp"], ["h"], name="dq_h"),
            helper.make_node("Relu", ["h"], ["y"], name="relu"),
        ],
        [_vi("x", [1, k])], [_vi("y", [1, n])],
        [
            numpy_helper.from_array(w_q, "W_q"),
            numpy_helper.from_array(np.float32(s_w), "W_s"),
            numpy_helper.from_array(np.int8(0), "W_zp"),
            numpy_helper.from_array(np.float32(s_h), "h_s"),
            numpy_helper.from_array(np.int8(0), "h_zp"),
        ])
    feeds = _feeds(rng, 50, (1, k))
    rep = validate.validate(fm, qm, feeds)
    out = rep.outputs[0]
    assert math.isfinite(out.sqnr_db) and out.sqnr_db > 10
    ref, q = _run_all(fm, feeds), _run_all(qm, feeds)
    assert out.sqnr_db == pytest.approx(_numpy_metrics(ref, q)["sqnr_db"], abs=1e-6)
    # 'h' comes out of a DequantizeLinear in the quantized graph: the layer's dequantized value (how target ort-qop
    # names a layer whose integer op writes codes), so it is compared; h_raw / W_dq are not in the float graph
    assert [m.name for m in rep.layers] == ["h"]
    n_layer = len(feeds) if rep.layer_samples is None else rep.layer_samples
    h_f, h_q = (_run_all(ir.with_outputs(m, ["h"]), feeds[:n_layer], "h") for m in (fm, qm))
    want = _numpy_metrics(h_f, h_q)["sqnr_db"]
    assert rep.layers[0].sqnr_db == pytest.approx(want, abs=1e-3) and 10 < want < 60


# ------------------------------------------------------------------------------------------- (e) top-1
def test_top1_agreement_exact_including_sequences():
    rng = np.random.default_rng(9)
    t, k, c, samples = 6, 8, 5, 30
    w = rng.standard_normal((k, c))
    wq = w + 0.6 * rng.standard_normal((k, c))
    fm, qm = _matmul_model(w, [1, t, k]), _matmul_model(wq, [1, t, k])
    feeds = _feeds(rng, samples, (1, t, k))
    rep = validate.validate(fm, qm, feeds)
    ref, q = _run_all(fm, feeds), _run_all(qm, feeds)
    agree = np.argmax(ref, -1) == np.argmax(q, -1)
    assert agree.size == samples * t
    assert 0 < agree.mean() < 1
    assert rep.outputs[0].top1_agreement == agree.sum() / agree.size


def test_no_top1_for_rank1_or_single_class():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((8, 1))
    rep = validate.validate(_matmul_model(w), _matmul_model(w * 1.01), _feeds(rng, 3, (1, 8)))
    assert rep.outputs[0].top1_agreement is None


def test_top1_only_where_the_last_axis_can_hold_classes():
    """A hidden MatMul output (a feature vector) and a rank-4 map get no top-1 agreement; a Softmax layer and a
    rank-2 graph output do, equal to numpy's argmax agreement of the same tensors."""
    rng = np.random.default_rng(14)
    t, k, c, samples = 4, 8, 6, 20

    def model(w1, w2):
        return _model(
            [helper.make_node("MatMul", ["x", "W1"], ["hid"], name="mm1"),
             helper.make_node("Softmax", ["hid"], ["p"], axis=-1, name="sm"),
             helper.make_node("MatMul", ["p", "W2"], ["y"], name="mm2"),
             helper.make_node("Reshape", ["y", "shape"], ["map"], name="rs")],
            [_vi("x", [t, k])], [_vi("y", [t, c]), _vi("map", [1, 1, t, c])],
            [numpy_helper.from_array(w1.astype(np.float32), "W1"), numpy_helper.from_array(w2.astype(np.float32), "W2"),
             numpy_helper.from_array(np.array([1, 1, t, c], np.int64), "shape")])

    w1, w2 = rng.standard_normal((k, c)), rng.standard_normal((c, c))
    fm, qm = model(w1, w2), model(w1 + 0.5 * rng.standard_normal((k, c)), w2 + 0.5 * rng.standard_normal((c, c)))
    feeds = _feeds(rng, samples, (t, k))
    rep = validate.validate(fm, qm, feeds)
    layers = {m.name: m for m in rep.layers}
    outs = {m.name: m for m in rep.outputs}
    assert layers["hid"].top1_agreement is None and outs["map"].top1_agreement is None
    for name, got in (("p", layers["p"].top1_agreement), ("y", outs["y"].top1_agreement)):
        f = _run_all(ir.with_outputs(fm, ["p"]), feeds, name)
        q = _run_all(ir.with_outputs(qm, ["p"]), feeds, name)
        agree = np.argmax(f, -1) == np.argmax(q, -1)
        assert 0 < agree.mean() < 1 and got == agree.sum() / agree.size, name


def test_rearranged_layers_are_left_out_and_lose_nothing():
    """A Transpose then a Reshape of a compared tensor hold its elements: not compared (listed apart, both mapped
    to the tensor they rearrange), and compared anyway (named) they measure exactly what that tensor measures. A
    Reshape whose input differs in the quantized graph (a QuantizeLinear / DequantizeLinear pair before it) stays."""
    rng = np.random.default_rng(15)
    k, c = 8, 6

    def model(w1, w2, qdq):
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["hid"], name="mm1"),
                 helper.make_node("Transpose", ["hid"], ["ht"], perm=[1, 0], name="tr"),
                 helper.make_node("Reshape", ["ht", "s1"], ["hr"], name="rs1"),
                 helper.make_node("Relu", ["hr"], ["act"], name="relu")]
        src = "act"
        if qdq:
            nodes += [helper.make_node("QuantizeLinear", ["act", "sc", "zp"], ["act_q"], name="q"),
                      helper.make_node("DequantizeLinear", ["act_q", "sc", "zp"], ["act_dq"], name="dq")]
            src = "act_dq"
        nodes += [helper.make_node("Reshape", [src, "s2"], ["flat"], name="rs2"),
                  helper.make_node("MatMul", ["flat", "W2"], ["y"], name="mm2")]
        inits = [numpy_helper.from_array(w1.astype(np.float32), "W1"), numpy_helper.from_array(w2.astype(np.float32), "W2"),
                 numpy_helper.from_array(np.array([1, c * 4], np.int64), "s1"),
                 numpy_helper.from_array(np.array([4, c], np.int64), "s2"),
                 numpy_helper.from_array(np.array(0.25, np.float32), "sc"), numpy_helper.from_array(np.array(0, np.uint8), "zp")]
        return _model(nodes, [_vi("x", [4, k])], [_vi("y", [4, c])], inits)

    w1, w2 = rng.standard_normal((k, c)), rng.standard_normal((c, c))
    fm = model(w1, w2, False)
    qm = model(w1 + 0.02 * rng.standard_normal((k, c)), w2, True)
    feeds = _feeds(rng, 12, (4, k))
    rep = validate.validate(fm, qm, feeds)
    assert rep.rearranged_layers == {"ht": "hid", "hr": "hid"}
    assert [m.name for m in sorted(rep.layers, key=lambda m: m.name)] == ["act", "flat", "hid"]
    named = {m.name: m for m in validate.validate(fm, qm, feeds, layer_names=["hid", "ht", "hr"]).layers}
    for n in ("ht", "hr"):
        for key in ("sqnr_db", "cosine", "max_abs", "mean_abs"):
            assert getattr(named[n], key) == pytest.approx(getattr(named["hid"], key), rel=1e-9), (n, key)
    assert "2 tensor(s) only rearranging a compared one" in rep.table()
    flat = next(m for m in rep.layers if m.name == "flat")
    act = next(m for m in rep.layers if m.name == "act")
    assert flat.sqnr_db < act.sqnr_db - 1.0  # after the activation's quantization: another quantity, kept


def test_integer_outputs_exact_match():
    rng = np.random.default_rng(11)

    def argmax_model(w):
        return _model(
            [helper.make_node("MatMul", ["x", "W"], ["s"]),
             helper.make_node("ArgMax", ["s"], ["cls"], axis=-1, keepdims=0)],
            [_vi("x", [1, 8])], [_vi("cls", [1], TensorProto.INT64)],
            [numpy_helper.from_array(w.astype(np.float32), "W")])

    w = rng.standard_normal((8, 6))
    wq = w + 0.7 * rng.standard_normal((8, 6))
    feeds = _feeds(rng, 40, (1, 8))
    fm, qm = argmax_model(w), argmax_model(wq)
    rep = validate.validate(fm, qm, feeds)
    ref, q = _run_all(fm, feeds, "cls"), _run_all(qm, feeds, "cls")
    assert rep.outputs[0].exact_match == float(np.mean(ref == q))
    assert rep.outputs[0].top1_agreement is None
    assert [m.name for m in rep.layers] == ["s"]


def test_fp16_float_model_against_fp32_copy():
    rng = np.random.default_rng(12)
    w = rng.standard_normal((8, 4))
    f16 = _model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [_vi("x", [1, 8], TensorProto.FLOAT16)], [_vi("y", [1, 4], TensorProto.FLOAT16)],
        [numpy_helper.from_array(w.astype(np.float16), "W")])
    f32 = _matmul_model(w.astype(np.float16).astype(np.float32))
    feeds = [{"x": f["x"].astype(np.float16)} for f in _feeds(rng, 10, (1, 8))]
    rep = validate.validate(f16, f32, feeds)
    out = rep.outputs[0]
    assert math.isfinite(out.sqnr_db) and out.sqnr_db > 50  # fp16 rounding only
    assert validate.validate(f16, f16, feeds).outputs[0].sqnr_db == math.inf


# --------------------------------------------------------------------------------------- (f) threshold
def test_min_sqnr_threshold_pass_fail():
    rng = np.random.default_rng(13)
    w = rng.standard_normal((8, 4))
    fm, qm = _matmul_model(w), _matmul_model(w + 0.03 * rng.standard_normal(w.shape))
    feeds = _feeds(rng, 10, (1, 8))
    # the gate holds each output's whole-tensor SQNR and that of its worst slice (of the 4 features here)
    sq = validate.validate(fm, qm, feeds, per_layer=False).outputs[0].worst_sqnr()
    assert 10 < sq < 60
    lo = validate.validate(fm, qm, feeds, min_sqnr_db=sq - 1)
    hi = validate.validate(fm, qm, feeds, min_sqnr_db=sq + 1)
    assert lo.passed and not hi.passed
    assert validate.validate(fm, qm, feeds).passed  # no threshold
    assert "FAIL" in hi.table() and "PASS" in lo.table()
    js = hi.to_json()
    json.dumps(js, allow_nan=False)
    assert js["passed"] is False and js["min_sqnr_db"] == pytest.approx(sq + 1)


def test_output_mismatch_is_user_error():
    rng = np.random.default_rng(14)
    w = rng.standard_normal((8, 4))
    with pytest.raises(UserError, match="'y'"):
        validate.validate(_matmul_model(w), _matmul_model(w, out_name="z"), _feeds(rng, 2, (1, 8)))
    with pytest.raises(UserError, match="input 'x'"):
        validate.validate(_matmul_model(w), _matmul_model(w), [{"other": np.zeros((1, 8), np.float32)}])
    with pytest.raises(UserError, match="no samples"):
        validate.validate(_matmul_model(w), _matmul_model(w), [])


# ---------------------------------------------------------------------------------------- (g) feeds
@pytest.fixture
def model_path(tmp_path) -> Path:
    p = tmp_path / "m.onnx"
    onnx.save(_matmul_model(np.ones((8, 4)), [1, 8]), p)
    return p


def test_load_feeds_single_npz(tmp_path, model_path):
    x = np.random.default_rng(15).standard_normal((7, 1, 8)).astype(np.float64)
    np.savez(tmp_path / "d.npz", x=x)
    feeds = validate.load_feeds(tmp_path / "d.npz", model_path)
    assert len(feeds) == 7
    got = list(feeds)
    assert got[3]["x"].shape == (1, 8) and got[3]["x"].dtype == np.float32
    np.testing.assert_array_equal(got[3]["x"], x[3].astype(np.float32))
    rep = validate.validate(model_path, model_path, feeds)
    assert rep.samples == 7


def test_load_feeds_folder(tmp_path, model_path):
    d = tmp_path / "data"
    d.mkdir()
    for i in range(3):
        np.savez(d / f"s{i}.npz", x=np.full((1, 8), i, np.float32))
    (d / "README.txt").write_text("ignored")
    feeds = validate.load_feeds(d, _matmul_model(np.ones((8, 4)), [1, 8]))
    assert len(feeds) == 3
    got = [f["x"][0, 0] for f in feeds]
    assert got == [0, 1, 2]


def _load_all(path, model):
    """Errors may surface at load time (headers) or while streaming (values): read everything."""
    return list(validate.load_feeds(path, model))


def test_load_feeds_errors(tmp_path, model_path):
    with pytest.raises(UserError, match=r"missing\.npz"):
        _load_all(tmp_path / "missing.npz", model_path)

    np.savez(tmp_path / "extra.npz", x=np.zeros((2, 1, 8), np.float32), bogus=np.zeros(3))
    with pytest.raises(UserError, match=r"extra\.npz.*'bogus'"):
        _load_all(tmp_path / "extra.npz", model_path)

    np.savez(tmp_path / "rank.npz", x=np.zeros((1, 8), np.float32))
    with pytest.raises(UserError, match=r"rank\.npz.*'x'.*rank"):
        _load_all(tmp_path / "rank.npz", model_path)

    bad = np.zeros((2, 1, 8), np.float32)
    bad[1, 0, 3] = np.nan
    np.savez(tmp_path / "nan.npz", x=bad)
    with pytest.raises(UserError, match=r"nan\.npz.*'x'.*NaN"):
        _load_all(tmp_path / "nan.npz", model_path)

    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 1, 9), np.float32))
    with pytest.raises(UserError, match=r"shape\.npz.*'x'"):
        _load_all(tmp_path / "shape.npz", model_path)

    np.savez(tmp_path / "none.npz", y=np.zeros((2, 1, 8), np.float32))
    with pytest.raises(UserError, match=r"none\.npz.*'y'"):
        _load_all(tmp_path / "none.npz", model_path)

    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match=r"obj\.npz"):
        _load_all(tmp_path / "obj.npz", model_path)

    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"junk\.npz"):
        _load_all(tmp_path / "junk.npz", model_path)

    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(UserError, match="empty_dir"):
        _load_all(empty, model_path)

    folder = tmp_path / "folder"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.zeros((1, 8), np.float32))
    np.savez(folder / "b.npz", x=np.zeros((2, 1, 8), np.float32))  # wrong rank in the 2nd file
    with pytest.raises(UserError, match=r"b\.npz.*'x'.*rank"):
        _load_all(folder, model_path)

    with pytest.raises(UserError, match="random"):  # a calibration keyword is not data
        _load_all("random", model_path)


def test_tensor_onnxruntime_refuses_is_dropped(monkeypatch):
    rng = np.random.default_rng(16)
    ws = [rng.standard_normal((8, 8)) / 3 for _ in range(3)]
    ws_q = [w + 0.01 * rng.standard_normal((8, 8)) for w in ws]
    real_session = ir.session

    def picky_session(model, **kw):
        if isinstance(model, onnx.ModelProto) and "act1" in [o.name for o in model.graph.output]:
            raise RuntimeError("cannot expose act1")
        return real_session(model, **kw)

    monkeypatch.setattr(ir, "session", picky_session)
    rep = validate.validate(_mlp(ws), _mlp(ws_q), _feeds(rng, 4, (1, 8)))
    assert {m.name for m in rep.layers} == {"layer1", "layer2", "act2", "layer3"}
    assert rep.skipped_layers == ["act1"]
    assert math.isfinite(rep.outputs[0].sqnr_db)
