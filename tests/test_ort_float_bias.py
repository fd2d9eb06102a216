"""ort-float-bias: the constant Add after a float-kernel Conv / ConvTranspose (data input not dequantized) folded
into its float bias — outputs against the unmodified graph in onnxruntime, names kept, idempotent, checker-clean;
the integer kernels and Adds it must leave alone; and the ``w8a8`` preset (fold-bias off) compiling through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _graphs import Builder, assert_same_outputs, export, ops, random_feeds, run_pass, vi
from onnx import numpy_helper

from qcompiler.api import CompileOptions, compile_model
from qcompiler.runtime_targets.ort.float_bias import OrtFloatBiasPass

TOL = 1e-5


def weight_only(c_shape: tuple[int, ...], *, bias: bool = True, op: str = "Conv", dq_input: bool = False,
                shared_c: bool = False, seed: int = 81) -> onnx.ModelProto:
    """x → [Q/DQ] → Conv(DequantizeLinear(int8 codes), b) → Add(c) → Relu → y (a weight-only layer as insert-qdq
    writes it; ``dq_input``: an integer kernel's quantized data input instead)."""
    b = Builder(seed)
    if op == "Conv":
        codes = b.rng.integers(-127, 128, (6, 4, 3, 3)).astype(np.int8)
        scale = b.rng.uniform(0.001, 0.01, 6).astype(np.float32)
        axis, attrs, n = 0, {"pads": [1, 1, 1, 1]}, 6
    else:  # ConvTranspose, 2 groups: weight [Cin, Cout / g, k, k]
        codes = b.rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
        scale = b.rng.uniform(0.001, 0.01, 3).astype(np.float32)
        axis, attrs, n = 1, {"group": 2, "strides": [2, 2]}, 6
    w = b.node("DequantizeLinear", [b.init("w:q", codes), b.init("w:s", scale)], ["w:dq"], name="w:DQ", axis=axis)
    x = "x"
    if dq_input:
        q = b.node("QuantizeLinear", ["x", b.init("x:s", np.array(0.02, np.float32)),
                                      b.init("x:zp", np.array(128, np.uint8))], ["x:q"], name="x:Q")
        x = b.node("DequantizeLinear", [q, "x:s", "x:zp"], ["x:dq"], name="x:DQ")
    ins = [x, w] + ([b.init("b", b.randn(n))] if bias else [])
    h = b.node(op, ins, ["h"], name="conv", **attrs)
    c = b.init("c", b.randn(*c_shape))
    h = b.node("Add", [h, c], ["h_add"], name="add")
    b.node("Relu", [h], ["y"], name="relu")
    hw = [5, 5] if op == "Conv" else [11, 11]
    outs = [vi("y", ["N", n, *hw])]
    if shared_c:
        b.node("Add", ["y", c], ["z"], name="add2")
        outs.append(vi("z", ["N", n, *hw]))
    return b.model([vi("x", ["N", 4, 5, 5])], outs, opset=13)


@pytest.mark.parametrize("c_shape,bias,op", [((1, 6, 1, 1), True, "Conv"), ((6, 1, 1), False, "Conv"),
                                             ((1,), True, "Conv"), ((1, 6, 1, 1), True, "ConvTranspose")])
def test_add_after_a_weight_only_conv_goes_into_its_float_bias(c_shape, bias, op):
    model = weight_only(c_shape, bias=bias, op=op)
    ctx, res = run_pass(model, OrtFloatBiasPass())
    assert res.stats == {"folded": 1} and ops(ctx) == ["DequantizeLinear", op, "Relu"]
    conv = ctx.graph.nodes[1]
    assert conv.outputs[0].name == "h_add"  # the Add's output: names downstream unchanged
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    expect = (inits["b"] if bias else 0.0) + np.broadcast_to(inits["c"].reshape(-1), (6,))
    np.testing.assert_allclose(np.asarray(conv.inputs[2].values, np.float64), expect, rtol=1e-6)
    out = export(ctx)
    for seed in range(3):
        assert_same_outputs(model, out, random_feeds(model, seed), TOL)
    assert not OrtFloatBiasPass().run_graph(ctx.graph).modified
    assert export(ctx).SerializeToString() == out.SerializeToString()


@pytest.mark.parametrize("case", ["integer_kernel", "spatial_constant", "shared_constant"])
def test_integer_kernels_and_other_adds_stay(case):
    model = weight_only((1, 1, 5, 5) if case == "spatial_constant" else (1, 6, 1, 1),
                        dq_input=case == "integer_kernel", shared_c=case == "shared_constant")
    ctx, res = run_pass(model, OrtFloatBiasPass())
    assert not res.modified and ops(ctx) == [n.op_type for n in model.graph.node]


def test_conv_output_read_twice_or_a_graph_output_stays():
    b = Builder(82)
    w = b.node("DequantizeLinear", [b.init("w:q", b.rng.integers(-127, 128, (6, 4, 1, 1)).astype(np.int8)),
                                    b.init("w:s", np.full(6, 0.01, np.float32))], ["w:dq"], axis=0)
    h = b.node("Conv", ["x", w], ["h"], name="conv")
    b.node("Add", [h, b.init("c", b.randn(1, 6, 1, 1))], ["y"], name="add")
    model = b.model([vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 6, 5, 5]), vi("h", ["N", 6, 5, 5])], opset=13)
    ctx, res = run_pass(model, OrtFloatBiasPass())
    assert not res.modified and "Add" in ops(ctx)


@pytest.mark.parametrize("target", ["ort", "ort-qop"])
def test_w8a8_preset_folds_the_adds_of_its_float_convs(tmp_path: Path, target: str):
    """``w8a8`` turns fold-bias off and keeps float activations for a Conv whose output only float ops read (here
    both: a Sigmoid, a graph output through an Add); their per-channel Adds go into their float biases at
    lowering: no Add left, and the file's outputs stay those of the float model up to its int8 weights."""
    b = Builder(83)
    h = b.node("Conv", ["x", b.init("w1", b.randn(6, 4, 3, 3)), b.init("b1", b.randn(6))], ["h"], name="conv1",
               pads=[1, 1, 1, 1])
    h = b.node("Add", [h, b.init("c1", b.randn(1, 6, 1, 1))], ["h1"], name="add1")
    h = b.node("Sigmoid", [h], ["s"], name="sig")
    h = b.node("Conv", [h, b.init("w2", b.randn(6, 6, 1, 1)), b.init("b2", b.randn(6))], ["g"], name="conv2")
    b.node("Add", [h, b.init("c2", b.randn(1, 6, 1, 1))], ["y"], name="add2")
    model = b.model([vi("x", [1, 4, 8, 8])], [vi("y", [1, 6, 8, 8])], opset=13)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    rng = np.random.default_rng(0)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((8, 1, 4, 8, 8)).astype(np.float32))
    res = compile_model(src, tmp_path / "q.onnx", CompileOptions(plan="w8a8", calib=str(calib), validate=False,
                                                                 target=target))
    lower = next(r for r in res.records if r.name == "lower")
    assert lower.stats["ort-float-bias.folded"] == 2 and lower.stats["ort-load-time-dequant.weights"] == 2
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert not any(n.op_type == "Add" for n in q.graph.node) and q.graph.output[0].name == "y"
    feeds = {"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    assert_same_outputs(model, q, feeds, 0.02)  # int8 weights only: within 2 % of the float model's range
