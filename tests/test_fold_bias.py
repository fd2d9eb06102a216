"""fold-bias: a per-channel constant Add after Conv / Gemm becomes the op's bias — exact, names kept, and the
Adds it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _graphs import Builder, assert_same_outputs, export, ops, random_feeds, run_pass, vi

from qcompiler.passes.fold_bias import FoldBiasPass
from qcompiler.passes.fuse_activations import FuseActivationsPass


def conv_add(shape: tuple[int, ...], bias: bool = True, shared: bool = False) -> onnx.ModelProto:
    b = Builder(51)
    ins = ["x", b.init("w", b.randn(6, 4, 3, 3))]
    if bias:
        ins.append(b.init("b", b.randn(6)))
    h = b.node("Conv", ins, ["h"], name="conv", pads=[1, 1, 1, 1])
    c = b.init("c", b.randn(*shape))
    b.node("Add", [h, c], ["y"], name="add")
    outs = [vi("y", ["N", 6, 5, 5])]
    if shared:  # the constant is also added elsewhere
        b.node("Add", ["y", c], ["z"], name="add2")
        outs.append(vi("z", ["N", 6, 5, 5]))
    return b.model([vi("x", ["N", 4, 5, 5])], outs)


@pytest.mark.parametrize("shape,bias", [((1, 6, 1, 1), True), ((6, 1, 1), False), ((1,), True), ((), False),
                                        ((1, 1, 1, 1), True)])
def test_conv_add_is_folded_exactly(shape, bias):
    model = conv_add(shape, bias)
    ctx, res = run_pass(model, FoldBiasPass())
    assert res.modified and res.stats["folded_conv"] == 1
    assert ops(ctx) == ["Conv"] and ctx.graph.nodes[0].outputs[0].name == "y"
    out = export(ctx)
    assert_same_outputs(model, out, random_feeds(model), tol=1e-6)
    again = FoldBiasPass().run(ctx)
    assert not again.modified


@pytest.mark.parametrize("kind", ["last_axis", "shared", "spatial", "shared_scalar"])
def test_adds_that_are_not_a_per_channel_bias_stay(kind):
    shape = {"last_axis": (5,), "shared": (1, 6, 1, 1), "spatial": (1, 1, 5, 5), "shared_scalar": (1,)}[kind]
    model = conv_add(shape, shared=kind.startswith("shared"))
    ctx, res = run_pass(model, FoldBiasPass())
    assert not res.modified and "Add" in ops(ctx)


def test_gemm_add_folds_into_c_with_beta():
    b = Builder(52)
    h = b.node("Gemm", ["x", b.init("w", b.randn(5, 3)), b.init("c0", b.randn(3))], ["h"], name="gemm", beta=0.5)
    b.node("Add", [h, b.init("c", b.randn(1, 3))], ["y"], name="add")
    model = b.model([vi("x", [2, 5])], [vi("y", [2, 3])])
    ctx, res = run_pass(model, FoldBiasPass())
    assert res.stats["folded_gemm"] == 1 and ops(ctx) == ["Gemm"]
    assert ctx.graph.nodes[0].attrs["beta"] == 1.0
    out = export(ctx)
    assert_same_outputs(model, out, {"x": np.random.default_rng(0).standard_normal((2, 5)).astype(np.float32)},
                        tol=1e-6)


def test_a_scalar_add_starting_a_hard_sigmoid_stays_for_fuse_activations():
    """``Conv → Add(3) → Clip(0, 6) → Div(6)`` (a squeeze-excitation gate as timm spells it): the Add is the
    activation's, not a bias — folding it would leave Clip / Div that fuse-activations no longer sees as one
    HardSigmoid. The default prefix keeps the fusion; a scalar Add before anything else still folds."""
    b = Builder(53)
    h = b.node("Conv", ["x", b.init("w", b.randn(6, 4, 1, 1)), b.init("b", b.randn(6))], ["h"], name="conv")
    a = b.node("Add", [h, b.init("three", np.array([3.0], np.float32))], ["a"], name="add")
    c = b.node("Clip", [a, b.init("zero", np.array(0.0, np.float32)), b.init("six", np.array(6.0, np.float32))],
               ["c"], name="clip")
    b.node("Div", [c, b.init("six2", np.array(6.0, np.float32))], ["y"], name="div")
    model = b.model([vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 6, 5, 5])])
    ctx, res = run_pass(model, FoldBiasPass())
    assert not res.modified and res.stats["kept_activation_add"] == 1 and ops(ctx) == ["Conv", "Add", "Clip", "Div"]
    FuseActivationsPass().run(ctx)  # next in the default pipeline
    assert ops(ctx) == ["Conv", "HardSigmoid"]
    assert_same_outputs(model, export(ctx), random_feeds(model), tol=1e-5)


def test_a_conv_with_a_run_time_weight_stays():
    """A Conv whose weight is a graph input (not a constant) has no bias to fold into: left alone, not a crash."""
    b = Builder(54)
    h = b.node("Conv", ["x", "w"], ["h"], name="conv")
    b.node("Add", [h, b.init("c", b.randn(1, 6, 1, 1))], ["y"], name="add")
    model = b.model([vi("x", ["N", 4, 5, 5]), vi("w", [6, 4, 1, 1])], [vi("y", ["N", 6, 5, 5])])
    ctx, res = run_pass(model, FoldBiasPass())
    assert not res.modified and ops(ctx) == ["Conv", "Add"]
