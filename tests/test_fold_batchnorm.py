"""fold-batchnorm: pattern, numerics (onnxruntime, 1e-5 relative), idempotence and checker tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from qcompiler import ir
from qcompiler.passes.cleanup import CleanupPass
from qcompiler.passes.fold_batchnorm import FoldBatchNormPass

try:
    from tests import _graphs as G
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import _graphs as G  # type: ignore[no-redef]

TOL = 1e-5
MODELS = Path(__file__).resolve().parent.parent / "models"


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _check_all(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None):
    """Run the pass, export + checker, compare numerics, run it again. Returns (ctx, result, exported)."""
    ctx, res = G.run_pass(model, FoldBatchNormPass())
    out = G.export(ctx)
    assert [i.name for i in out.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in out.graph.output] == [o.name for o in model.graph.output]
    for seed in range(3):
        G.assert_same_outputs(model, out, feeds if feeds is not None else G.random_feeds(model, seed), TOL)
    again = FoldBatchNormPass().run(ctx)
    assert again.modified is False
    assert G.export(ctx).SerializeToString() == out.SerializeToString()
    return ctx, res, out


FOLDS = {
    "conv": (lambda: G.conv_bn(), "Conv", "conv.w", "folded_conv"),
    "conv_nobias_relu": (lambda: G.conv_bn(bias=False, relu=True), "Conv", "conv.w", "folded_conv"),
    "conv_group2": (lambda: G.conv_bn(group=2), "Conv", "conv.w", "folded_conv"),
    "convtranspose_group2": (lambda: G.convtranspose_bn(group=2), "ConvTranspose", "ct.w", "folded_convtranspose"),
    "convtranspose_group3_nobias": (lambda: G.convtranspose_bn(group=3, cin=6, cout=9, bias=False),
                                    "ConvTranspose", "ct.w", "folded_convtranspose"),
    "convtranspose_group1": (lambda: G.convtranspose_bn(group=1), "ConvTranspose", "ct.w", "folded_convtranspose"),
    "gemm_transB1_alpha_beta": (lambda: G.gemm_bn(trans_b=1, alpha=0.7, beta=1.3), "Gemm", "gemm.w", "folded_gemm"),
    "gemm_transB0_alpha_beta": (lambda: G.gemm_bn(trans_b=0, alpha=2.0, beta=0.5), "Gemm", "gemm.w", "folded_gemm"),
    "gemm_transB1_noC": (lambda: G.gemm_bn(trans_b=1, alpha=1.5, c_shape=None), "Gemm", "gemm.w", "folded_gemm"),
    "gemm_transB0_noC": (lambda: G.gemm_bn(trans_b=0, c_shape=None), "Gemm", "gemm.w", "folded_gemm"),
    "gemm_C_1xN": (lambda: G.gemm_bn(trans_b=0, beta=0.25, c_shape=(1, 5)), "Gemm", "gemm.w", "folded_gemm"),
    "gemm_C_scalar": (lambda: G.gemm_bn(trans_b=1, beta=3.0, c_shape=()), "Gemm", "gemm.w", "folded_gemm"),
    "matmul_add": (lambda: G.matmul_bn(with_add=True), "MatMul", "mm.w", "folded_matmul"),
    "matmul": (lambda: G.matmul_bn(with_add=False), "MatMul", "mm.w", "folded_matmul"),
}


@pytest.mark.parametrize("case", sorted(FOLDS))
def test_fold(case):
    build, op, weight, stat = FOLDS[case]
    model = build()
    bn_out = next(n.output[0] for n in model.graph.node if n.op_type == "BatchNormalization")
    ctx, res, out = _check_all(model)
    assert res.modified is True
    assert res.stats[stat] == 1
    assert res.stats["bn_to_muladd"] == 0
    assert "BatchNormalization" not in G.ops(out)
    # the weight was rewritten in place (same name, same shape, new values)
    before, after = _initializers(model)[weight], _initializers(out)[weight]
    assert before.shape == after.shape and before.dtype == after.dtype
    assert not np.allclose(before, after)
    # the BN's output name now comes from the producer (or the bias Add of a MatMul)
    prod = next(n for n in ctx.graph.nodes if bn_out in [t.name for t in n.outputs])
    assert prod.op == (op if op != "MatMul" else "Add")


@pytest.mark.parametrize("op,bias_shape,own_bias", [
    ("Conv", (1, 6, 1, 1), False), ("Conv", (6, 1, 1), True), ("ConvTranspose", (1, 6, 1, 1), True),
])
def test_fold_through_bias_add(op, bias_shape, own_bias):
    """Paddle style: Conv -> Add(per-channel constant) -> BN folds into the weight and the Add's constant."""
    b = G.Builder(16)
    w = b.randn(6, 2, 3, 3) if op == "Conv" else b.randn(4, 3, 3, 3)  # ConvTranspose group 2: Cout = 6
    ins = ["x", b.init("w", w)] + ([b.init("own_b", b.randn(6))] if own_bias else [])
    h = b.node(op, ins, ["h"], name="conv", group=2)
    h = b.node("Add", [h, b.init("add_b", b.randn(*bias_shape))], ["h2"], name="bias_add")
    b.bn(h, "y", 6, name="bn")
    out_hw = 4 if op == "Conv" else 8
    model = b.model([G.vi("x", ["N", 4, 6, 6])], [G.vi("y", ["N", 6, out_hw, out_hw])])
    _, res, out = _check_all(model)
    assert res.stats["folded_" + op.lower()] == 1, dict(res.stats)
    assert G.ops(out) == [op, "Add"]
    assert _initializers(out)["add_b"].shape == bias_shape


def test_bias_add_with_full_shape_not_folded():
    """An Add whose constant is not per-channel ([1, C, H, W]) is not a bias: Mul + Add instead."""
    b = G.Builder(17)
    h = b.node("Conv", ["x", b.init("w", b.randn(4, 3, 3, 3))], ["h"], name="conv")
    h = b.node("Add", [h, b.init("add_b", b.randn(1, 4, 4, 4))], ["h2"], name="bias_add")
    b.bn(h, "y", 4, name="bn")
    model = b.model([G.vi("x", ["N", 3, 6, 6])], [G.vi("y", ["N", 4, 4, 4])])
    _, res, _ = _check_all(model)
    assert res.stats["bn_to_muladd"] == 1 and res.stats["folded_conv"] == 0


def test_convtranspose_group_channel_mapping():
    """A per-channel check: BN that scales only output channel o must touch only the weight slice of o."""
    model = G.convtranspose_bn(group=2, cin=4, cout=6, bias=False)
    inits = {t.name: t for t in model.graph.initializer}
    c = 6
    for name, val in (("bn.gamma", np.ones(c)), ("bn.beta", np.zeros(c)), ("bn.mean", np.zeros(c)),
                      ("bn.var", np.ones(c))):
        inits[name].CopyFrom(numpy_helper.from_array(val.astype(np.float32), name))
    gamma = np.ones(c, np.float32)
    gamma[4] = 3.0  # output channel 4 = group 1, j = 1
    inits["bn.gamma"].CopyFrom(numpy_helper.from_array(gamma, "bn.gamma"))
    for t in model.graph.node[1].attribute:
        if t.name == "epsilon":
            t.f = 0.0
    _, _, out = _check_all(model)
    w0, w1 = _initializers(model)["ct.w"], _initializers(out)["ct.w"]
    ratio = np.ones_like(w0)
    ratio[2:4, 1] = 3.0
    np.testing.assert_allclose(w1, w0 * ratio, rtol=1e-6)


def test_bn_output_is_graph_output_keeps_name():
    model = G.conv_bn()
    _ctx, _, out = _check_all(model)
    assert [n.op_type for n in out.graph.node] == ["Conv"]
    assert out.graph.node[0].output[0] == "y" and out.graph.output[0].name == "y"


def test_created_nodes_are_tagged():
    ctx, _res, out = _check_all(G.matmul_bn(with_add=False))
    created = [n for n in ctx.graph.nodes if ir.tag_of(n) == "fold-batchnorm"]
    assert [n.op for n in created] == ["Add"]
    add = next(n for n in out.graph.node if n.op_type == "Add")
    assert {p.key: p.value for p in add.metadata_props}.get(ir.TAG_KEY) == "fold-batchnorm"
    # node order stays topological: MatMul before its new bias Add
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Add"]


def test_chained_bns_fold_twice():
    b = G.Builder(11)
    h = b.node("Conv", ["x", b.init("w", b.randn(4, 3, 3, 3))], ["h"], name="conv")
    h = b.bn(h, "h1", 4, name="bn1")
    b.bn(h, "y", 4, name="bn2")
    model = b.model([G.vi("x", ["N", 3, 6, 6])], [G.vi("y", ["N", 4, 4, 4])])
    _, res, out = _check_all(model)
    assert res.stats["folded_conv"] == 2
    assert G.ops(out) == ["Conv"]


# ------------------------------------------------------------------------------------------- refusals
def _muladd_case(model, stats):
    ctx, res, out = _check_all(model)
    assert res.modified is True
    for k, v in stats.items():
        assert res.stats[k] == v, (k, dict(res.stats))
    assert "BatchNormalization" not in G.ops(out)
    for n in ctx.graph.nodes:
        if n.op in ("Mul", "Add") and ir.tag_of(n) == "fold-batchnorm":
            const = next(t for t in n.inputs if isinstance(t, gs.Constant))
            # [C, 1, ..., 1]: broadcasts over axis 1 of the rank-(ndim + 1) input
            assert all(d == 1 for d in const.values.shape[1:]), const.values.shape
    return ctx, res, out


def test_shared_weight_not_folded():
    model = G.shared_weight_conv_bn()
    ctx, _res, out = _muladd_case(model, {"refused_shared_weight": 2, "bn_to_muladd": 2, "folded_conv": 0})
    np.testing.assert_array_equal(_initializers(out)["shared.w"], _initializers(model)["shared.w"])
    convs = [n for n in out.graph.node if n.op_type == "Conv"]
    assert [c.input[1] for c in convs] == ["shared.w", "shared.w"]
    # Mul + Add constants broadcast over axis 1 of a rank-4 tensor
    mul = next(n for n in ctx.graph.nodes if n.op == "Mul")
    assert mul.inputs[1].values.shape == (4, 1, 1)


def test_shared_bias_not_folded():
    b = G.Builder(12)
    bias = b.init("bias", b.randn(5))
    h = b.node("Gemm", ["x", b.init("w", b.randn(5, 6)), bias], ["h"], name="gemm", transB=1)
    b.bn(h, "y", 5, name="bn")
    b.node("Add", ["x2", bias], ["z"], name="other")
    model = b.model([G.vi("x", [3, 6]), G.vi("x2", [3, 5])], [G.vi("y", [3, 5]), G.vi("z", [3, 5])])
    _muladd_case(model, {"refused_shared_weight": 1, "bn_to_muladd": 1, "folded_gemm": 0})


def test_dynamic_weight_not_folded():
    model = G.dynamic_weight_conv_bn()
    _ctx, _res, out = _muladd_case(model, {"refused_dynamic_weight": 1, "bn_to_muladd": 1})
    assert "Conv" in G.ops(out)


def test_producer_with_two_consumers_not_folded():
    model = G.two_consumer_conv_bn()
    _, _, out = _muladd_case(model, {"refused_multi_consumer": 1, "bn_to_muladd": 1})
    np.testing.assert_array_equal(_initializers(out)["conv.w"], _initializers(model)["conv.w"])


def test_bn_without_producer_becomes_muladd():
    _, _res, out = _muladd_case(G.bn_on_input(), {"bn_to_muladd": 1})
    assert G.ops(out) == ["Mul", "Add"]


def test_rank3_matmul_not_folded():
    """[B, T, K] @ [K, N] -> BN over axis 1 (T) is not per-column of W: Mul + Add, W untouched."""
    model = G.matmul_bn(rank3=True)
    ctx, _res, out = _muladd_case(model, {"skipped_matmul_rank": 1, "bn_to_muladd": 1, "folded_matmul": 0})
    np.testing.assert_array_equal(_initializers(out)["mm.w"], _initializers(model)["mm.w"])
    mul = next(n for n in ctx.graph.nodes if n.op == "Mul")
    assert mul.inputs[1].values.shape == (5, 1)


def test_dynamic_bn_params_left_alone():
    b = G.Builder(13)
    h = b.node("Conv", ["x", b.init("w", b.randn(4, 3, 3, 3))], ["h"], name="conv")
    inits = [b.init(n, v) for n, v in (("beta", np.zeros(4, np.float32)), ("mean", np.zeros(4, np.float32)),
                                        ("var", np.ones(4, np.float32)))]
    b.node("BatchNormalization", [h, "gamma", *inits], ["y"], name="bn")
    model = b.model([G.vi("x", ["N", 3, 6, 6]), G.vi("gamma", [4])], [G.vi("y", ["N", 4, 4, 4])])
    ctx, res = G.run_pass(model, FoldBatchNormPass())
    assert res.modified is False and res.stats["refused_dynamic_bn_params"] == 1
    assert "BatchNormalization" in G.ops(ctx)


def test_unknown_rank_left_alone():
    b = G.Builder(14)
    shape = b.init("shape", np.array([0, 4, -1], np.int64))
    h = b.node("Reshape", ["x", shape], ["h"], name="reshape")
    h = b.bn(h, "bn_out", 4, name="bn")  # no shape known for h nor bn_out
    b.node("Relu", [h], ["y"], name="relu")
    model = b.model([G.vi("x", ["N", 4, 2, 3])], [G.vi("y", ["N", 4, 6])])
    ctx, res = G.run_pass(model, FoldBatchNormPass())
    assert res.modified is False and res.stats["skipped_unknown_rank"] == 1
    assert FoldBatchNormPass().run(ctx).modified is False


def test_rank_inferred_through_relu():
    """No shapes on intermediates: the rank of the BN input is found by walking back through Relu/Gemm."""
    b = G.Builder(15)
    h = b.node("Gemm", ["x", b.init("w", b.randn(5, 6))], ["h"], name="gemm", transB=1)
    h = b.node("Relu", [h], ["r"], name="relu")
    h = b.bn(h, "bn_out", 5, name="bn")
    b.node("Sigmoid", [h], ["y"], name="sigmoid")
    model = b.model([G.vi("x", [3, 6])], [G.vi("y", [3, 5])])
    _, _res, _out = _muladd_case(model, {"bn_to_muladd": 1})


# --------------------------------------------------------------------------------------------- fixtures
def _fixture(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    path = MODELS / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"fixture {path.name} not generated")
    model = onnx.load(str(path))
    data = np.load(MODELS / f"{name}.npz")
    return model, {k: data[k] for k in data.files}


@pytest.mark.parametrize("name,folded", [
    ("conv_bn_relu", {"folded_conv": 5}),
    ("depthwise", {"folded_conv": 3}),
    ("convtranspose_bn", {"folded_convtranspose": 1}),
    ("gemm_head", {"folded_gemm": 2, "folded_matmul": 1}),
    ("shared_weight", {"refused_shared_weight": 2, "refused_dynamic_weight": 1, "bn_to_muladd": 3}),
    ("opset11_constants", {"folded_conv": 2}),
])
def test_fixture_models(name, folded):
    model, samples = _fixture(name)
    ctx, _ = G.run_pass(model, CleanupPass())
    res = FoldBatchNormPass().run(ctx)
    for k, v in folded.items():
        assert res.stats[k] == v, (k, dict(res.stats))
    out = G.export(ctx)
    assert "BatchNormalization" not in G.ops(out)
    for i in range(4):
        G.assert_same_outputs(model, out, {k: v[i] for k, v in samples.items()}, TOL)
    assert FoldBatchNormPass().run(ctx).modified is False


def test_large_graph_folds_every_bn():
    # speed on 10k nodes is measured in benchmarks/many_nodes.py, not here
    model = G.conv_chain(3334)  # 10 002 nodes
    graph, meta = ir.import_graph(model)
    from qcompiler.core.context import CompileContext

    ctx = CompileContext(graph=graph, meta=meta, plan=None, target=None)  # type: ignore[arg-type]
    res = FoldBatchNormPass().run(ctx)
    assert res.stats["folded_conv"] == 3334
    assert not any(n.op == "BatchNormalization" for n in ctx.graph.nodes)
    assert FoldBatchNormPass().run(ctx).modified is False


def test_pass_identity():
    assert FoldBatchNormPass.name == "fold-batchnorm"
    assert FoldBatchNormPass.produces == frozenset({"bn-folded"})
