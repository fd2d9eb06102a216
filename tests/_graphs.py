"""Tiny ONNX graphs (built with onnx.helper) and helpers for pass pattern tests.

Every builder returns a ``ModelProto`` (opset 17 unless stated) with deterministic weights. BN statistics are
random but sane (var > 0), so folding changes the weights substantially.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.core.context import CompileContext
from qcompiler.core.pass_base import Pass, PassResult

F32 = TensorProto.FLOAT
OPSET = 17


# --------------------------------------------------------------------------------------------- building
class Builder:
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def randn(self, *shape: int, scale: float = 0.5) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str = "", **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0]

    def bn(self, x: str, out: str, c: int, name: str = "", eps: float = 1e-5) -> str:
        prefix = name or out
        r = self.rng
        params = [
            self.init(f"{prefix}.gamma", r.uniform(0.5, 1.5, c).astype(np.float32)),
            self.init(f"{prefix}.beta", (r.standard_normal(c) * 0.3).astype(np.float32)),
            self.init(f"{prefix}.mean", (r.standard_normal(c) * 0.3).astype(np.float32)),
            self.init(f"{prefix}.var", r.uniform(0.5, 2.0, c).astype(np.float32)),
        ]
        return self.node("BatchNormalization", [x, *params], [out], name=name or f"{out}.bn", epsilon=eps)

    def model(self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto],
              opset: int = OPSET) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "test", list(inputs), list(outputs), initializer=self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def vi(name: str, dims: Sequence[Any], dtype: int = F32) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(dims))


def matmul_relu_graph() -> Any:
    """x [N, 6] -> MatMul (constant 6x4 weight, seed 5) -> Relu -> y, imported (a graphsurgeon graph)."""
    b = Builder(5)
    b.node("MatMul", ["x", b.init("w", b.randn(6, 4))], ["h"], name="mm")
    b.node("Relu", ["h"], ["y"], name="relu")
    graph, _ = ir.import_graph(b.model([vi("x", ["N", 6])], [vi("y", ["N", 4])]))
    return graph


def conv_bn(*, bias: bool = True, group: int = 1, cin: int = 4, cout: int = 8, relu: bool = False,
            seed: int = 0) -> onnx.ModelProto:
    """x[N,cin,8,8] -> Conv(3x3, group) -> BN -> [Relu] -> y (the BN output is the graph output unless relu)."""
    b = Builder(seed)
    ins = ["x", b.init("conv.w", b.randn(cout, cin // group, 3, 3))]
    if bias:
        ins.append(b.init("conv.b", b.randn(cout)))
    h = b.node("Conv", ins, ["conv_out"], name="conv", pads=[1, 1, 1, 1], group=group)
    out = "bn_out" if relu else "y"
    b.bn(h, out, cout, name="bn")
    if relu:
        b.node("Relu", [out], ["y"], name="relu")
    return b.model([vi("x", ["N", cin, 8, 8])], [vi("y", ["N", cout, 8, 8])])


def convtranspose_bn(*, group: int = 2, cin: int = 4, cout: int = 6, bias: bool = True,
                     seed: int = 1) -> onnx.ModelProto:
    """x[N,cin,5,5] -> ConvTranspose(k3, s2, group) -> BN -> y [N, cout, 11, 11]."""
    b = Builder(seed)
    ins = ["x", b.init("ct.w", b.randn(cin, cout // group, 3, 3))]
    if bias:
        ins.append(b.init("ct.b", b.randn(cout)))
    h = b.node("ConvTranspose", ins, ["ct_out"], name="ct", strides=[2, 2], group=group)
    b.bn(h, "y", cout, name="bn")
    return b.model([vi("x", ["N", cin, 5, 5])], [vi("y", ["N", cout, 11, 11])])


def gemm_bn(*, trans_b: int = 1, alpha: float = 1.0, beta: float = 1.0, c_shape: Sequence[int] | None = (5,),
            k: int = 6, n: int = 5, seed: int = 2) -> onnx.ModelProto:
    """x[3,k] -> Gemm(alpha, beta, transB, C of c_shape or none) -> BN -> y [3, n]."""
    b = Builder(seed)
    w = b.randn(n, k) if trans_b else b.randn(k, n)
    ins = ["x", b.init("gemm.w", w)]
    if c_shape is not None:
        ins.append(b.init("gemm.c", b.randn(*c_shape)))
    h = b.node("Gemm", ins, ["gemm_out"], name="gemm", transB=trans_b, alpha=alpha, beta=beta)
    b.bn(h, "y", n, name="bn")
    return b.model([vi("x", [3, k])], [vi("y", [3, n])])


def matmul_bn(*, with_add: bool = True, rank3: bool = False, k: int = 6, n: int = 5,
              seed: int = 3) -> onnx.ModelProto:
    """x[M,k] -> MatMul(W[k,n]) -> [Add(b)] -> BN -> y. With ``rank3`` x is [2,n,k] (BN over axis 1 = n)."""
    b = Builder(seed)
    h = b.node("MatMul", ["x", b.init("mm.w", b.randn(k, n))], ["mm_out"], name="mm")
    if with_add:
        h = b.node("Add", [h, b.init("mm.b", b.randn(n))], ["add_out"], name="mm.add")
    if rank3:
        b.bn(h, "y", n, name="bn")
        return b.model([vi("x", [2, n, k])], [vi("y", [2, n, n])])
    b.bn(h, "y", n, name="bn")
    return b.model([vi("x", ["M", k])], [vi("y", ["M", n])])


def shared_weight_conv_bn(seed: int = 4) -> onnx.ModelProto:
    """Two Convs share one weight; each is followed by its own BN; the results are added."""
    b = Builder(seed)
    w = b.init("shared.w", b.randn(4, 4, 3, 3))
    a = b.node("Conv", ["x", w], ["a"], name="conv_a", pads=[1, 1, 1, 1])
    c = b.node("Conv", ["x", w], ["c"], name="conv_b", pads=[1, 1, 1, 1])
    a = b.bn(a, "a_bn", 4, name="bn_a")
    c = b.bn(c, "c_bn", 4, name="bn_b")
    b.node("Add", [a, c], ["y"], name="merge")
    return b.model([vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 4, 8, 8])])


def dynamic_weight_conv_bn(seed: int = 5) -> onnx.ModelProto:
    """The Conv weight is a graph input."""
    b = Builder(seed)
    h = b.node("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1])
    b.bn(h, "y", 4, name="bn")
    return b.model([vi("x", ["N", 4, 8, 8]), vi("w", [4, 4, 3, 3])], [vi("y", ["N", 4, 8, 8])])


def two_consumer_conv_bn(seed: int = 6) -> onnx.ModelProto:
    """The Conv output feeds the BN and a Relu (a second graph output)."""
    b = Builder(seed)
    h = b.node("Conv", ["x", b.init("conv.w", b.randn(4, 4, 3, 3))], ["h"], name="conv", pads=[1, 1, 1, 1])
    b.bn(h, "y", 4, name="bn")
    b.node("Relu", [h], ["r"], name="relu")
    return b.model([vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 4, 8, 8]), vi("r", ["N", 4, 8, 8])])


def bn_on_input(seed: int = 7) -> onnx.ModelProto:
    """BN right on the graph input (no producer): becomes Mul + Add."""
    b = Builder(seed)
    b.bn("x", "y", 3, name="bn")
    return b.model([vi("x", ["N", 3, 4, 4])], [vi("y", ["N", 3, 4, 4])])


def gptq_chain_model(seed: int) -> onnx.ModelProto:
    """Three Convs (dilated, grouped and strided, 1×1) and a MatMul: four GPTQ layers for the threaded and cached
    paths (weights from ``seed``)."""
    b = Builder(seed)
    b.node("Conv", ["x", b.init("w1", b.randn(16, 8, 3, 3, scale=0.2))], ["c1"], name="c1", pads=[2, 2, 2, 2],
           dilations=[2, 2])
    b.node("Conv", ["c1", b.init("w2", b.randn(16, 4, 3, 3, scale=0.2))], ["c2"], name="c2", group=4,
           pads=[1, 1, 1, 1], strides=[2, 2])
    b.node("Conv", ["c2", b.init("w3", b.randn(12, 16, 1, 1, scale=0.2))], ["c3"], name="c3")
    b.node("MatMul", ["c3", b.init("w4", b.randn(5, 7, scale=0.2))], ["y"], name="mm")
    return b.model([vi("x", ["N", 8, 10, 10])], [vi("y", ["N", 12, 5, 7])])


def conv_chain(blocks: int, c: int = 4, seed: int = 8) -> onnx.ModelProto:
    """``blocks`` x (Conv 1x1 -> BN -> Relu): 3 nodes per block."""
    b = Builder(seed)
    h = "x"
    eye = np.eye(c, dtype=np.float32)[:, :, None, None]
    for i in range(blocks):
        w = b.init(f"c{i}.w", eye + b.randn(c, c, 1, 1, scale=0.05))
        h = b.node("Conv", [h, w], [f"c{i}"], name=f"conv{i}")
        h = b.bn(h, f"b{i}", c, name=f"bn{i}")
        h = b.node("Relu", [h], ["y" if i == blocks - 1 else f"r{i}"], name=f"relu{i}")
    return b.model([vi("x", [1, c, 2, 2])], [vi("y", [1, c, 2, 2])])


def constant_nodes(seed: int = 9) -> onnx.ModelProto:
    """Paddle style: weights in Constant nodes (unnamed ones too), an Identity in the middle, a
    Constant -> Identity -> graph output, and a foldable constant subgraph (Mul of two constants)."""
    b = Builder(seed)

    def const(out: str, value: np.ndarray, name: str = "") -> str:
        return b.node("Constant", [], [out], name=name, value=numpy_helper.from_array(value, out))

    w = const("conv.w", b.randn(4, 3, 3, 3), name="conv.w.const")
    cb = const("conv.b", b.randn(4))  # unnamed Constant node
    h = b.node("Conv", ["x", w, cb], ["h"], name="conv", pads=[1, 1, 1, 1])
    gamma = const("bn.gamma", b.rng.uniform(0.5, 1.5, 4).astype(np.float32))
    beta = const("bn.beta", b.randn(4))
    mean = const("bn.mean", b.randn(4))
    var = const("bn.var", b.rng.uniform(0.5, 2.0, 4).astype(np.float32))
    h = b.node("BatchNormalization", [h, gamma, beta, mean, var], ["bn_out"], name="bn")
    h = b.node("Identity", [h], ["ident_out"])  # unnamed Identity
    two = const("two", np.array(2.0, np.float32))
    half = const("half", np.array(0.25, np.float32))
    k = b.node("Mul", [two, half], ["k"], name="k.mul")  # foldable: 0.5
    h = b.node("Mul", [h, k], ["scaled"], name="scale")
    b.node("Relu", [h], ["y"])  # unnamed
    c = const("c_val", np.arange(3, dtype=np.float32))
    b.node("Identity", [c], ["c_out"], name="c_ident")
    b.node("Identity", ["y"], ["y_copy"], name="y_ident")  # Identity of a graph output to another output
    return b.model([vi("x", ["N", 3, 8, 8])],
                   [vi("y", ["N", 4, 8, 8]), vi("c_out", [3]), vi("y_copy", ["N", 4, 8, 8])], opset=11)


def identity_to_output(seed: int = 10) -> onnx.ModelProto:
    """x -> Relu -> Identity -> y (graph output named y), Relu output also read by a Sigmoid -> z."""
    b = Builder(seed)
    r = b.node("Relu", ["x"], ["r"], name="relu")
    b.node("Identity", [r], ["y"], name="ident")
    b.node("Sigmoid", [r], ["z"], name="sig")
    return b.model([vi("x", [2, 3])], [vi("y", [2, 3]), vi("z", [2, 3])])


# ---------------------------------------------------------------------------------------------- running
def run_pass(model: onnx.ModelProto, pass_obj: Pass) -> tuple[CompileContext, PassResult]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph, meta = ir.import_graph(m)
    ctx = CompileContext(graph=graph, meta=meta, plan=None, target=None)  # type: ignore[arg-type]
    return ctx, pass_obj.run(ctx)


def export(ctx: CompileContext) -> onnx.ModelProto:
    model = ir.export_model(ctx.graph, ctx.meta)
    onnx.checker.check_model(model, full_check=True)
    return model


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ir.session(model, threads=1)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b|."""
    denom = float(np.max(np.abs(b)))
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) / (denom if denom > 0 else 1.0)


def random_feeds(model: onnx.ModelProto, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else batch for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def assert_same_outputs(original: onnx.ModelProto, rewritten: onnx.ModelProto,
                        feeds: dict[str, np.ndarray], tol: float = 1e-5) -> float:
    """Same output names, and every output equal within ``tol`` relative; returns the worst error."""
    a = ort_run(original, feeds)
    b = ort_run(rewritten, feeds)
    assert list(a) == list(b), (list(a), list(b))
    worst = 0.0
    for k in a:
        assert a[k].shape == b[k].shape, k
        err = rel_err(b[k], a[k])
        assert err <= tol, f"{k}: relative error {err:.3g} > {tol}"
        worst = max(worst, err)
    return worst


def ops(model_or_ctx: Any) -> list[str]:
    if isinstance(model_or_ctx, CompileContext):
        return [n.op for n in model_or_ctx.graph.nodes]
    return [n.op_type for n in model_or_ctx.graph.node]
