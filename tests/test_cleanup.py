"""cleanup: Constant nodes to initializers, folding, Identity / dead-node removal, order, names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from qcompiler import ir
from qcompiler.core.context import CompileContext
from qcompiler.passes.cleanup import CleanupPass
from qcompiler.passes.fold_batchnorm import FoldBatchNormPass

try:
    from tests import _graphs as G
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import _graphs as G  # type: ignore[no-redef]

TOL = 1e-5
MODELS = Path(__file__).resolve().parent.parent / "models"


def _io(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def _clean(model: onnx.ModelProto, **opts):
    ctx, res = G.run_pass(model, CleanupPass(**opts))
    out = G.export(ctx)
    assert _io(out) == _io(model)
    G.assert_same_outputs(model, out, G.random_feeds(model), TOL)
    again = CleanupPass(**opts).run(ctx)
    assert again.modified is False, dict(again.stats)
    assert G.export(ctx).SerializeToString() == out.SerializeToString()
    return ctx, res, out


def _ctx(model: onnx.ModelProto) -> CompileContext:
    graph, meta = ir.import_graph(model)
    return CompileContext(graph=graph, meta=meta, plan=None, target=None)  # type: ignore[arg-type]


def test_constant_nodes_become_initializers():
    model = G.constant_nodes()
    ctx, res, out = _clean(model)
    assert res.modified is True
    assert res.stats["constants_to_initializers"] == 9
    assert "Constant" not in G.ops(out)
    conv = next(n for n in ctx.graph.nodes if n.op == "Conv")
    assert all(isinstance(t, gs.Constant) for t in conv.inputs[1:])
    assert [t.name for t in conv.inputs[1:]] == ["conv.w", "conv.b"]  # names kept
    inits = {t.name for t in out.graph.initializer}
    assert {"conv.w", "conv.b", "bn.gamma", "bn.var"} <= inits


def test_constant_subgraph_folded():
    model = G.constant_nodes()
    _, res, out = _clean(model)
    assert res.stats["folded_constants"] == 1
    assert "k.mul" not in [n.name for n in out.graph.node]
    k = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}["k"]
    assert float(k) == pytest.approx(0.5)


def test_identities():
    model = G.constant_nodes()
    _, res, out = _clean(model)
    # the unnamed Identity in the middle goes; Constant -> Identity -> output and output -> Identity -> output stay
    assert res.stats["identities_removed"] == 1
    idents = sorted(n.name for n in out.graph.node if n.op_type == "Identity")
    assert idents == ["c_ident", "y_ident"]
    scale = next(n for n in out.graph.node if n.name == "scale")
    assert scale.input[0] == "bn_out"
    # c_out is still produced by a node, not turned into an initializer
    assert "c_out" not in {t.name for t in out.graph.initializer}


def test_identity_to_graph_output_keeps_name():
    model = G.identity_to_output()
    _, res, out = _clean(model)
    assert res.stats["identities_removed"] == 1
    assert G.ops(out) == ["Relu", "Sigmoid"]
    relu = out.graph.node[0]
    assert relu.output[0] == "y"
    assert out.graph.node[1].input[0] == "y"


def test_identity_input_to_output_kept():
    b = G.Builder()
    b.node("Identity", ["x"], ["y"], name="ident")
    model = b.model([G.vi("x", [2])], [G.vi("y", [2])])
    _, res, out = _clean(model)
    assert res.modified is False and G.ops(out) == ["Identity"]


def test_dead_nodes_removed_io_kept():
    b = G.Builder()
    b.node("Relu", ["x"], ["y"], name="relu")
    b.node("Sigmoid", ["x"], ["unused"], name="dead1")
    b.node("Tanh", ["unused"], ["unused2"], name="dead2")
    model = b.model([G.vi("x", [2, 3]), G.vi("spare", [1])], [G.vi("y", [2, 3])])
    _, res, out = _clean(model)
    assert res.stats["dead_nodes_removed"] == 2
    assert G.ops(out) == ["Relu"]
    assert _io(out) == (["x", "spare"], ["y"])  # an unused graph input stays


def test_unnamed_and_duplicate_nodes_get_names():
    model = G.conv_chain(2)  # conv0, bn0, relu0, conv1, bn1, relu1
    ctx = _ctx(model)
    ctx.graph.nodes[1].name = ""
    ctx.graph.nodes[4].name = "conv0"  # duplicate of node 0
    res = CleanupPass().run(ctx)
    names = [n.name for n in ctx.graph.nodes]
    assert res.stats["named_nodes"] == 1
    assert res.stats["renamed_duplicates"] == 1
    assert names == ["conv0", "BatchNormalization_1", "relu0", "conv1", "conv0_4", "relu1"]
    assert len(set(names)) == len(names)
    assert CleanupPass().run(ctx).modified is False


def test_unsorted_graph_is_sorted():
    model = G.conv_chain(4)
    ctx = _ctx(model)
    ctx.graph.nodes.reverse()
    res = CleanupPass().run(ctx)
    assert res.stats["reordered_nodes"] == 1
    out = G.export(ctx)
    G.assert_same_outputs(model, out, G.random_feeds(model), TOL)
    assert CleanupPass().run(ctx).modified is False


def test_clean_model_untouched():
    model = G.conv_bn(relu=True)
    _, res = G.run_pass(model, CleanupPass())
    assert res.modified is False and not res.stats


def test_fold_options():
    model = G.constant_nodes()
    _, res, out = _clean(model, fold_constants=False)
    assert res.stats["folded_constants"] == 0
    assert "k.mul" in [n.name for n in out.graph.node]
    _, res, out = _clean(model, fold_limit_mib=0)  # every folded result is "too large"
    assert "k.mul" in [n.name for n in out.graph.node]


def test_text_options():
    p = CleanupPass.from_text_options({"fold-constants": "false", "fold-limit-mib": "8"})
    assert p.options.fold_constants is False and p.options.fold_limit_mib == 8
    assert p.canonical() == "cleanup{fold-constants=false,fold-limit-mib=8}"


def test_dequantize_not_folded():
    b = G.Builder()
    q = b.init("w_q", np.arange(-8, 8, dtype=np.int8).reshape(4, 4))
    w = b.node("DequantizeLinear", [q, b.init("w_s", np.array(0.1, np.float32)),
                                    b.init("w_zp", np.array(0, np.int8))], ["w"], name="dq")
    b.node("MatMul", ["x", w], ["y"], name="mm")
    model = b.model([G.vi("x", [2, 4])], [G.vi("y", [2, 4])])
    _, _res, out = _clean(model)
    assert G.ops(out) == ["DequantizeLinear", "MatMul"]


def test_cleanup_then_fold_on_constant_nodes():
    model = G.constant_nodes()
    ctx, _ = G.run_pass(model, CleanupPass())
    res = FoldBatchNormPass().run(ctx)
    assert res.stats["folded_conv"] == 1
    out = G.export(ctx)
    assert "BatchNormalization" not in G.ops(out)
    G.assert_same_outputs(model, out, G.random_feeds(model), TOL)


def test_opset11_constants_fixture():
    path = MODELS / "opset11_constants.onnx"
    if not path.exists():
        pytest.skip("fixture opset11_constants.onnx not generated")
    model = onnx.load(str(path))
    n_const = sum(n.op_type == "Constant" for n in model.graph.node)
    ctx, res = G.run_pass(model, CleanupPass())
    assert res.stats["constants_to_initializers"] == n_const
    out = G.export(ctx)
    assert "Constant" not in G.ops(out)
    assert _io(out) == _io(model)
    data = np.load(MODELS / "opset11_constants.npz")
    for i in range(4):
        G.assert_same_outputs(model, out, {k: data[k][i] for k in data.files}, TOL)
    assert CleanupPass().run(ctx).modified is False


def test_large_graph_unchanged():
    # speed on 10k nodes is measured in benchmarks/many_nodes.py, not here
    model = G.conv_chain(3334)  # 10 002 nodes
    ctx = _ctx(model)
    res = CleanupPass().run(ctx)
    assert res.modified is False
    assert len(ctx.graph.nodes) == len(model.graph.node)


def test_pass_identity():
    assert CleanupPass.name == "cleanup"
    assert CleanupPass.produces == frozenset({"clean"})


def test_codes_cast_to_float_stay_codes():
    """``Cast`` of stored int8 codes (the ort target's load-time dequantization) is not folded into a float
    weight — the file keeps its int8 codes — while shape arithmetic in int64 still folds."""
    b = G.Builder(71)
    codes = b.init("w:q", (b.rng.integers(-127, 128, (4, 4, 1, 1))).astype(np.int8))
    b.node("Cast", [codes], ["w:f"], to=onnx.TensorProto.FLOAT)
    b.node("Mul", ["w:f", b.init("w:s", np.full((4, 1, 1, 1), 0.01, np.float32))], ["w:dq"])
    b.node("Conv", ["x", "w:dq"], ["h"], name="conv")
    b.node("Cast", [b.init("dims", np.array([1, 64], np.int64))], ["dims_f"], to=onnx.TensorProto.FLOAT)
    b.node("Cast", ["dims_f"], ["dims_i"], to=onnx.TensorProto.INT64)
    b.node("Reshape", ["h", "dims_i"], ["y"], name="flat")
    model = b.model([G.vi("x", [1, 4, 4, 4])], [G.vi("y", [1, 64])])
    ctx, res = G.run_pass(model, CleanupPass())
    assert res.modified
    out = G.export(ctx)
    assert [n.op_type for n in out.graph.node] == ["Cast", "Mul", "Conv", "Reshape"]  # the int64 Casts folded
    assert {t.name: t.data_type for t in out.graph.initializer}["w:q"] == onnx.TensorProto.INT8
    G.assert_same_outputs(model, out, G.random_feeds(model), tol=1e-6)


def _unsqueeze_shared_constant() -> onnx.ModelProto:
    """A constant read by an Unsqueeze and by an Add: folding it makes onnxruntime's optimizer warn
    "UnsqueezeElimination cannot remove node" from graphsurgeon's session (which sets no log level)."""
    b = G.Builder(0)
    b.init("c", np.arange(4, dtype=np.float32))
    b.init("ax", np.array([0], dtype=np.int64))
    b.node("Unsqueeze", ["c", "ax"], ["cu"], name="u")
    b.node("Add", ["c", "c"], ["c2"], name="a0")
    b.node("Add", ["x", "cu"], ["y0"], name="a1")
    b.node("Add", ["y0", "c2"], ["y"], name="a2")
    return b.model([G.vi("x", [1, 4])], [G.vi("y", [1, 4])], opset=13)


def test_constant_folding_keeps_onnxruntime_warnings_off_the_terminal(capfd):
    model = _unsqueeze_shared_constant()
    capfd.readouterr()
    gs.import_onnx(model).fold_constants()  # graphsurgeon alone: the warning reaches stderr
    assert "UnsqueezeElimination" in capfd.readouterr().err
    ctx, res = G.run_pass(model, CleanupPass())
    assert res.stats["folded_constants"] >= 2
    assert "UnsqueezeElimination" not in capfd.readouterr().err
    G.assert_same_outputs(model, G.export(ctx), G.random_feeds(model, 0, batch=1), 1e-6)
    gs.import_onnx(model).fold_constants()  # onnxruntime's default logger is back at its default (warning)
    assert "UnsqueezeElimination" in capfd.readouterr().err
