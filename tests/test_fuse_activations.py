"""fuse-activations: hard-sigmoid / hard-swish chains become HardSigmoid / HardSwish — equal outputs within
float32 rounding, names kept, idempotent — and the chains it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _graphs import Builder, assert_same_outputs, export, ops, run_pass, vi

from qcompiler.passes.fuse_activations import FuseActivationsPass

SHAPE = ["N", 4, 6, 6]


def feeds(seed: int = 0) -> dict[str, np.ndarray]:
    # +-6 covers both clip bounds and the curved part of hard-swish
    return {"x": (np.random.default_rng(seed).standard_normal((2, 4, 6, 6)) * 3).astype(np.float32)}


def hard_swish_model(*, opset: int = 13, style: str = "div", add_first: bool = False, clip_attrs: bool = False,
                     three: float = 3.0, hi: float = 6.0, extra_reader: str = "", other_x: bool = False,
                     scalar_shape: tuple[int, ...] = ()) -> onnx.ModelProto:
    """x -> Conv -> h; y = hard_swish(h) written out as Add / Clip / Mul / Div (variants by keyword)."""
    b = Builder(61)
    h = b.node("Conv", ["x", b.init("w", b.randn(4, 4, 1, 1))], ["h"], name="conv")
    g = b.node("Conv", ["x", b.init("w2", b.randn(4, 4, 1, 1))], ["g"], name="conv2") if other_x else h
    c3 = b.init("three", np.full(scalar_shape, three, np.float32))
    a = b.node("Add", [c3, h] if add_first else [h, c3], ["a"], name="add")
    if clip_attrs:
        c = b.node("Clip", [a], ["c"], name="clip", min=0.0, max=hi)
    else:
        c = b.node("Clip", [a, b.init("lo", np.float32(0)), b.init("hi", np.float32(hi))], ["c"], name="clip")
    if style == "div":  # (x * clip) / 6
        m = b.node("Mul", [g, c], ["m"], name="mul")
        b.node("Div", [m, b.init("six", np.float32(6))], ["y"], name="div")
    elif style == "mul_sixth":  # (clip * x) * (1/6)
        m = b.node("Mul", [c, g], ["m"], name="mul")
        b.node("Mul", [m, b.init("sixth", np.float32(1) / np.float32(6))], ["y"], name="scale")
    else:  # x * (clip / 6)
        d = b.node("Div", [c, b.init("six", np.float32(6))], ["d"], name="div")
        b.node("Mul", [g, d], ["y"], name="mul")
    outs = [vi("y", SHAPE)]
    if extra_reader:  # an intermediate also read elsewhere (kept alive)
        b.node("Relu", [extra_reader], ["z"], name="other_reader")
        outs.append(vi("z", SHAPE))
    return b.model([vi("x", SHAPE)], outs, opset=opset)


def hard_sigmoid_model(opset: int = 13) -> onnx.ModelProto:
    b = Builder(62)
    h = b.node("Conv", ["x", b.init("w", b.randn(4, 4, 1, 1))], ["h"], name="conv")
    a = b.node("Add", [h, b.init("three", np.float32(3))], ["a"], name="add")
    c = b.node("Clip", [a, b.init("lo", np.float32(0)), b.init("hi", np.float32(6))], ["c"], name="clip")
    d = b.node("Div", [c, b.init("six", np.float32(6))], ["d"], name="div")
    b.node("Mul", [d, "x"], ["y"], name="gate")  # gates another tensor: a hard-sigmoid, not a hard-swish
    return b.model([vi("x", SHAPE)], [vi("y", SHAPE)], opset=opset)


def fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    ctx, res = run_pass(model, FuseActivationsPass())
    out = export(ctx)  # onnx checker (full) inside
    assert not FuseActivationsPass().run(ctx).modified  # idempotent
    assert ops(export(ctx)) == ops(out)
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    for n in out.graph.node:
        if n.op_type in ("HardSigmoid", "HardSwish") or n.name.startswith("HardSwish@"):
            assert {p.key: p.value for p in n.metadata_props}.get("qcompiler.pass") == "fuse-activations"
    return out, dict(res.stats)


@pytest.mark.parametrize("style", ["div", "mul_sixth", "gate_div"])
@pytest.mark.parametrize("opset", [13, 14])
def test_hard_swish_chain_becomes_one_op(style, opset):
    model = hard_swish_model(opset=opset, style=style)
    out, stats = fused(model)
    if style == "gate_div":  # the hard-sigmoid is fused first; x * HardSigmoid(x) becomes HardSwish from 14
        assert stats == ({"hard_sigmoid": 1, "hard_swish": 1} if opset >= 14 else {"hard_sigmoid": 1})
    else:
        assert stats == {"hard_swish": 1}
    if opset >= 14:
        assert ops(out) == ["Conv", "HardSwish"]
    else:  # no HardSwish before opset 14: x * HardSigmoid(x; 1/6, 1/2), and the opset is not raised
        assert ops(out) == ["Conv", "HardSigmoid", "Mul"]
        hs = out.graph.node[1]
        alpha = next(a.f for a in hs.attribute if a.name == "alpha")
        assert np.float32(alpha) == np.float32(1) / np.float32(6)
    assert out.opset_import[0].version == opset
    # float32 rounding only: the chain rounds after each op, the fused op after alpha*x + beta
    assert assert_same_outputs(model, out, feeds(), tol=1e-6) <= 1e-6


@pytest.mark.parametrize("variant", [{"add_first": True}, {"clip_attrs": True, "opset": 10},
                                     {"scalar_shape": (1,)}, {"scalar_shape": (1, 1, 1, 1)}])
def test_spellings_of_the_same_chain(variant):
    model = hard_swish_model(**variant)
    out, stats = fused(model)
    assert stats == {"hard_swish": 1} and "Clip" not in ops(out) and "Add" not in ops(out)
    assert_same_outputs(model, out, feeds(1), tol=1e-6)


def test_hard_sigmoid_chain():
    model = hard_sigmoid_model()
    out, stats = fused(model)
    assert stats == {"hard_sigmoid": 1} and ops(out) == ["Conv", "HardSigmoid", "Mul"]
    gate = out.graph.node[2]
    assert list(gate.input)[1] == "x" and list(gate.output) == ["y"]
    assert_same_outputs(model, out, feeds(2), tol=1e-6)


@pytest.mark.parametrize("bad", [{"three": 2.0}, {"hi": 5.0}, {"extra_reader": "a"}, {"extra_reader": "c"},
                                 {"extra_reader": "m"}, {"other_x": True}, {"scalar_shape": (4, 1, 1)}])
def test_chains_that_are_not_hard_swish_stay(bad):
    model = hard_swish_model(**bad)
    ctx, res = run_pass(model, FuseActivationsPass())
    assert not res.modified and not res.stats
    assert ops(ctx) == [n.op_type for n in model.graph.node]
