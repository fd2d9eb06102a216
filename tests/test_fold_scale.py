"""fold-scale: a constant per-channel Mul after Conv / ConvTranspose / Gemm / MatMul folded into the weights —
exact up to float rounding (onnxruntime against the unmodified model), names kept, idempotent, checker-clean; the
Muls it must leave alone; and the real topologies that carry the pattern (BVLC DenseNet-121 / Inception-v2 from
onnx's own test data: Caffe's Scale layers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from _graphs import Builder, assert_same_outputs, export, ops, random_feeds, run_pass, vi

from qcompiler import ir
from qcompiler.core import tags
from qcompiler.core.context import CompileContext
from qcompiler.passes.cleanup import CleanupPass
from qcompiler.passes.fold_batchnorm import FoldBatchNormPass
from qcompiler.passes.fold_scale import FoldScalePass

TOL = 1e-5


def _check(model: onnx.ModelProto, expect_ops: list[str], stats: dict[str, int]) -> onnx.ModelProto:
    """Run the pass; the ops left, the stats, the outputs against the input model's on three random feeds, the
    graph IO names, a second run changing nothing."""
    ctx, res = run_pass(model, FoldScalePass())
    assert ops(ctx) == expect_ops
    assert {k: v for k, v in res.stats.items() if v} == stats
    out = export(ctx)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    for seed in range(3):
        assert_same_outputs(model, out, random_feeds(model, seed), TOL)
    again = FoldScalePass().run(ctx)
    assert not again.modified
    assert export(ctx).SerializeToString() == out.SerializeToString()
    return out


def conv_chain(scale_shape: tuple[int, ...], *, add: str = "after", bias: bool = True, group: int = 1,
               muls: int = 1, seed: int = 61) -> onnx.ModelProto:
    """x → Conv → [Add(t)] → Mul(s) ×muls → [Add(t)] → Relu → y (Add before or after the Muls, or none)."""
    b = Builder(seed)
    ins = ["x", b.init("w", b.randn(6, 4 // group, 3, 3))]
    if bias:
        ins.append(b.init("b", b.randn(6)))
    h = b.node("Conv", ins, ["h"], name="conv", pads=[1, 1, 1, 1], group=group)
    if add == "before":
        h = b.node("Add", [h, b.init("t", b.randn(1, 6, 1, 1))], ["h_add"], name="add")
    for i in range(muls):
        s = b.rng.uniform(-2.0, 2.0, scale_shape).astype(np.float32)
        h = b.node("Mul", [h, b.init(f"s{i}", s)] if i % 2 == 0 else [b.init(f"s{i}", s), h], [f"h_mul{i}"],
                   name=f"mul{i}")
    if add == "after":
        h = b.node("Add", [h, b.init("t", b.randn(6, 1, 1))], ["h_add"], name="add")
    b.node("Relu", [h], ["y"], name="relu")
    return b.model([vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 6, 5, 5])])


@pytest.mark.parametrize("shape", [(1, 6, 1, 1), (6, 1, 1), (1,), ()])
def test_conv_mul_is_folded(shape):
    model = conv_chain(shape)
    out = _check(model, ["Conv", "Add", "Relu"], {"folded_conv": 1})
    w = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}["w"]
    s = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}["s0"]
    w0 = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}["w"]
    np.testing.assert_allclose(w, w0 * np.broadcast_to(s.reshape(-1), (6,)).reshape(6, 1, 1, 1), rtol=1e-6)
    conv = next(n for n in out.graph.node if n.op_type == "Conv")
    assert conv.output[0] == "h_mul0"  # the Conv took over the Mul's output: names downstream unchanged


def test_several_muls_fold_in_one_run_and_without_bias():
    _check(conv_chain((1, 6, 1, 1), muls=3, bias=False), ["Conv", "Add", "Relu"], {"folded_conv": 3})


def test_grouped_conv():
    _check(conv_chain((1, 6, 1, 1), group=2), ["Conv", "Add", "Relu"], {"folded_conv": 1})


def test_through_an_add_the_add_stays_and_conv_output_is_marked_rescaled():
    model = conv_chain((1, 6, 1, 1), add="before")
    ctx, res = run_pass(model, FoldScalePass())
    assert ops(ctx) == ["Conv", "Add", "Relu"] and res.stats["through_add"] == 1
    conv = ctx.graph.nodes[0]
    assert conv.outputs[0].name == "h" and tags.rescaled_by(conv.outputs[0]) == "fold-scale"
    assert ctx.graph.nodes[1].outputs[0].name == "h_mul0"
    _check(model, ["Conv", "Add", "Relu"], {"folded_conv": 1, "through_add": 1})


def test_convtranspose_grouped():
    b = Builder(62)
    h = b.node("ConvTranspose", ["x", b.init("w", b.randn(4, 3, 3, 3)), b.init("b", b.randn(6))], ["h"],
               name="deconv", group=2, strides=[2, 2])
    b.node("Mul", [h, b.init("s", b.rng.uniform(0.5, 2, (1, 6, 1, 1)).astype(np.float32))], ["y"], name="mul")
    model = b.model([vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 6, 11, 11])])
    _check(model, ["ConvTranspose"], {"folded_convtranspose": 1})


@pytest.mark.parametrize("trans_b,c_shape", [(0, (3,)), (1, (1, 3)), (1, None), (0, (2, 3))])
def test_gemm(trans_b, c_shape):
    b = Builder(63)
    ins = ["x", b.init("w", b.randn(*((3, 5) if trans_b else (5, 3))))]
    if c_shape is not None:
        ins.append(b.init("c", b.randn(*c_shape)))
    h = b.node("Gemm", ins, ["h"], name="gemm", transB=trans_b, alpha=0.7, beta=0.5)
    b.node("Mul", [h, b.init("s", b.rng.uniform(0.5, 2, (3,)).astype(np.float32))], ["y"], name="mul")
    model = b.model([vi("x", [2, 5])], [vi("y", [2, 3])])
    _check(model, ["Gemm"], {"folded_gemm": 1})


@pytest.mark.parametrize("x_dims,s_shape", [(["N", 7, 5], (1, 1, 3)), (["N", 5], (3,)), (["N", 7, 5], ())])
def test_matmul(x_dims, s_shape):
    b = Builder(64)
    h = b.node("MatMul", ["x", b.init("w", b.randn(5, 3))], ["h"], name="mm")
    h = b.node("Add", [h, b.init("t", b.randn(3))], ["h2"], name="add")
    b.node("Mul", [h, b.init("s", b.rng.uniform(0.5, 2, s_shape).astype(np.float32))], ["y"], name="mul")
    model = b.model([vi("x", x_dims)], [vi("y", [*x_dims[:-1], 3])])
    _check(model, ["MatMul", "Add"], {"folded_matmul": 1, "through_add": 1})


# ---------------------------------------------------------------------------------------- must not match
def _unchanged(model: onnx.ModelProto, stats: dict[str, int] | None = None) -> None:
    ctx, res = run_pass(model, FoldScalePass())
    assert not res.modified and ops(ctx) == [n.op_type for n in model.graph.node]
    assert {k: v for k, v in res.stats.items() if v} == (stats or {})
    assert_same_outputs(model, export(ctx), random_feeds(model), 0.0)


@pytest.mark.parametrize("shape", [(1, 1, 5, 5), (1, 6, 5, 1), (2, 6, 1, 1), (5,)])
def test_mul_not_along_channels_stays(shape):
    _unchanged(conv_chain(shape, add="none"))


@pytest.mark.parametrize("shape", [(1, 1, 6, 1, 1), (1, 1, 1, 1, 1)])
def test_a_scale_adding_a_dimension_stays(shape):
    b = Builder(71)
    h = b.node("Conv", ["x", b.init("w", b.randn(6, 4, 1, 1))], ["h"], name="conv")
    b.node("Mul", [h, b.init("s", b.randn(*shape))], ["y"], name="mul")
    _unchanged(b.model([vi("x", ["N", 4, 5, 5])], [vi("y", [1, "N", 6, 5, 5])]))


def test_shared_weight_scale_and_reader_stay():
    # the weight read by a second Conv: rewriting it would change that Conv too
    b = Builder(65)
    w = b.init("w", b.randn(6, 4, 1, 1))
    h = b.node("Conv", ["x", w], ["h"], name="conv")
    b.node("Mul", [h, b.init("s", b.randn(1, 6, 1, 1))], ["y"], name="mul")
    b.node("Conv", ["x", w], ["z"], name="conv2")
    _unchanged(b.model([vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 6, 5, 5]), vi("z", ["N", 6, 5, 5])]))
    # the scale read by a second Mul
    b = Builder(66)
    s = b.init("s", b.randn(1, 6, 1, 1))
    h = b.node("Conv", ["x", b.init("w", b.randn(6, 4, 1, 1))], ["h"], name="conv")
    b.node("Mul", [h, s], ["y"], name="mul")
    b.node("Mul", ["y", s], ["z"], name="mul2")
    _ctx, res = run_pass(b.model([vi("x", ["N", 4, 5, 5])], [vi("z", ["N", 6, 5, 5])]), FoldScalePass())
    assert not res.modified
    # the Conv's output also read elsewhere, or a graph output
    b = Builder(67)
    h = b.node("Conv", ["x", b.init("w", b.randn(6, 4, 1, 1))], ["h"], name="conv")
    b.node("Mul", [h, b.init("s", b.randn(1, 6, 1, 1))], ["y"], name="mul")
    _unchanged(b.model([vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 6, 5, 5]), vi("h", ["N", 6, 5, 5])]))


def test_dynamic_scale_nonfinite_scale_and_unknown_rank_stay():
    b = Builder(68)
    h = b.node("Conv", ["x", b.init("w", b.randn(6, 4, 1, 1))], ["h"], name="conv")
    b.node("Mul", [h, "g"], ["y"], name="mul")
    _unchanged(b.model([vi("x", ["N", 4, 5, 5]), vi("g", [1, 6, 1, 1])], [vi("y", ["N", 6, 5, 5])]))
    b = Builder(69)
    h = b.node("Conv", ["x", b.init("w", b.randn(6, 4, 1, 1))], ["h"], name="conv")
    b.node("Mul", [h, b.init("s", np.full((1, 6, 1, 1), np.inf, np.float32))], ["y"], name="mul")
    ctx, res = run_pass(b.model([vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 6, 5, 5])]), FoldScalePass())
    assert not res.modified and res.stats["skipped_nonfinite"] == 1
    # a MatMul whose input has no known rank: a 2-D scale could add a dimension to a 1-D output
    b = Builder(70)
    r = b.node("Reshape", ["x", "shape"], ["r"], name="reshape")  # rank: the length of a run-time shape
    h = b.node("MatMul", [r, b.init("w", b.randn(5, 3))], ["h"], name="mm")
    b.node("Mul", [h, b.init("s", b.randn(1, 3))], ["y"], name="mul")
    graph = onnx.helper.make_graph(b.nodes, "unknown_rank", [vi("x", [5]), vi("shape", ["K"], onnx.TensorProto.INT64)],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], b.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    ctx, res = run_pass(model, FoldScalePass())
    assert ctx.graph.nodes[1].inputs[0].shape is None and not res.modified


# ----------------------------------------------------------------------------------------- real graphs
LIGHT = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"


@pytest.mark.parametrize("name,folds", [("light_densenet121", 59), ("light_inception_v2", 69),
                                        ("light_resnet50", 0)])
def test_caffe_scale_layers_of_real_topologies(name, folds):
    """The BVLC models in onnx's test data (weights constant-filled: structure, not accuracy) after the default
    pipeline's cleanup and fold-batchnorm: every Conv → BN → Scale is left as Conv → Mul → Add, each Mul folds,
    and the outputs stay the input model's."""
    model = onnx.load(str(LIGHT / f"{name}.onnx"))
    graph, meta = ir.import_graph(ir.load_model(str(LIGHT / f"{name}.onnx")))
    ctx = CompileContext(graph=graph, meta=meta, plan=None, target=None)  # type: ignore[arg-type]
    for p in (CleanupPass(), FoldBatchNormPass()):
        p.run(ctx)
    before = ops(ctx).count("Mul")
    res = FoldScalePass().run(ctx)
    assert res.stats.get("folded_conv", 0) == folds and ops(ctx).count("Mul") == before - folds
    out = export(ctx)
    rng = np.random.default_rng(0)
    feeds = {"gpu_0/data_0" if name == "light_resnet50" else "data_0":
             rng.uniform(0, 1, (1, 3, 224, 224)).astype(np.float32)}
    assert_same_outputs(model, out, feeds, 1e-4)


# ------------------------------------------------------------------------------- BatchNorm statistics
@pytest.mark.parametrize("add", [False, True])
def test_bn_statistics_follow_the_scale(add):
    """Conv → BN → [Add(t)] → Mul(s): fold-batchnorm records the BN output's statistics (data-free calibration
    reads them); after fold-scale they sit under the name of the tensor that now holds those values, scaled —
    checked against the per-channel mean β·s and std |γ|σ/√(σ²+ε)·|s| computed here."""
    b = Builder(72)
    h = b.node("Conv", ["x", b.init("w", b.randn(6, 4, 1, 1))], ["h"], name="conv")
    h = b.bn(h, "h_bn", 6, name="bn")
    if add:
        h = b.node("Add", [h, b.init("t", b.randn(1, 6, 1, 1))], ["h_add"], name="add")
    s = b.rng.uniform(-2, 2, (1, 6, 1, 1)).astype(np.float32)
    b.node("Mul", [h, b.init("s", s)], ["y"], name="mul")
    model = b.model([vi("x", ["N", 4, 5, 5])], [vi("y", ["N", 6, 5, 5])])
    graph, meta = ir.import_graph(model)
    ctx = CompileContext(graph=graph, meta=meta, plan=None, target=None)  # type: ignore[arg-type]
    FoldBatchNormPass().run(ctx)
    assert set(ctx.bn_stats) == {"h_bn"}
    FoldScalePass().run(ctx)
    inits = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    gamma, beta, var = inits["bn.gamma"], inits["bn.beta"], inits["bn.var"]
    sv = s.reshape(6).astype(np.float64)
    std = np.abs(gamma) * np.sqrt(var / (var + 1e-5))
    if add:  # the Conv's output h_bn kept its name (now s · BN output), the Add took over y
        assert set(ctx.bn_stats) == {"h_bn"} and tags.rescaled_by(ctx.graph.nodes[0].outputs[0]) == "fold-scale"
        key = "h_bn"
    else:  # the Conv now writes y
        assert set(ctx.bn_stats) == {"y"} and ctx.graph.nodes[0].outputs[0].name == "y"
        key = "y"
    np.testing.assert_allclose(ctx.bn_stats[key].mean, beta * sv, rtol=1e-12)
    np.testing.assert_allclose(ctx.bn_stats[key].std, std * np.abs(sv), rtol=1e-6)
