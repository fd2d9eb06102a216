"""equalize: cross-layer equalization (+ bias absorption) — effect on a fixture that needs it, exactness,
idempotency and the cases it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _graphs import Builder, assert_same_outputs, ort_run, vi

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.core.context import CompileContext
from qcompiler.core.pass_manager import PassManager
from qcompiler.core.registry import build_pipeline
from qcompiler.plan import Plan
from qcompiler.quant import sqnr_db
from qcompiler.report import validate as qv
from qcompiler.runtime_targets import get_target


def badly_scaled_depthwise(spread: float = 1.0, seed: int = 0) -> onnx.ModelProto:
    """expand 1x1 -> ReLU -> depthwise 3x3 -> ReLU -> project 1x1, where the depthwise channels are scaled by
    10^U(-spread, spread) and the project weights compensate (the product is well scaled, each factor is not —
    what BatchNorm folding leaves behind)."""
    b = Builder(seed)
    sc = (10 ** b.rng.uniform(-spread, spread, 32)).astype(np.float32)
    h = b.node("Conv", ["x", b.init("expand.w", b.randn(32, 8, 1, 1, scale=0.4)),
                        b.init("expand.b", b.randn(32, scale=0.1))], ["e"], name="expand")
    h = b.node("Relu", [h], ["er"], name="expand_relu")
    wd = b.randn(32, 1, 3, 3, scale=0.4) * sc[:, None, None, None]
    h = b.node("Conv", [h, b.init("dw.w", wd), b.init("dw.b", b.randn(32, scale=0.1) * sc)], ["d"], name="dw",
               group=32, pads=[1, 1, 1, 1])
    h = b.node("Relu", [h], ["dr"], name="dw_relu")
    wp = b.randn(16, 32, 1, 1, scale=0.3) / sc[None, :, None, None]
    b.node("Conv", [h, b.init("project.w", wp), b.init("project.b", b.randn(16, scale=0.1))], ["y"],
           name="project")
    return b.model([vi("x", ["N", 8, 16, 16])], [vi("y", ["N", 16, 16, 16])])


def _ctx(model: onnx.ModelProto, pipeline: str) -> tuple[CompileContext, dict[str, dict[str, int]]]:
    """Run ``pipeline`` on a copy of ``model``; returns the context and each pass's stats."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph, meta = ir.import_graph(m)
    ctx = CompileContext(graph=graph, meta=meta, plan=Plan.default(), target=get_target("ort"))
    records = PassManager(build_pipeline(pipeline)).run(ctx)
    return ctx, {r.name: r.stats for r in records}


def _weights(ctx: CompileContext) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.values) for n in ctx.graph.nodes for t in n.inputs if hasattr(t, "values")}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((32, 1, 8, 16, 16)).astype(np.float32)
    ev = [{"x": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    return calib, ev


def test_equalize_gains_10db_on_badly_scaled_depthwise(tmp_path, data):
    calib, ev = data
    src = tmp_path / "dw.onnx"
    onnx.save(badly_scaled_depthwise(), src)
    np.savez(tmp_path / "calib.npz", x=calib)
    sqnr = {}
    for tag, plan in (("plain", Plan.default()), ("cle", Plan.from_dict({"algorithms": {"equalize": True}}))):
        out = tmp_path / f"{tag}.onnx"
        res = compile_model(src, out, CompileOptions(plan=plan, calib=str(tmp_path / "calib.npz"), validate=False))
        sqnr[tag] = qv.validate(src, out, ev, per_layer=False).outputs[0].sqnr_db
        if tag == "cle":  # the plan's algorithm became a pass right after resolve-plan
            assert "resolve-plan,equalize,calibrate" in res.pipeline
            rec = next(r for r in res.records if r.name == "equalize")
            assert rec.stats["pairs"] == 2 and rec.stats["pairs_scaled"] == 2
    # measured: 21.8 dB -> 38.6 dB
    assert sqnr["cle"] >= sqnr["plain"] + 10.0, sqnr


def test_equalize_keeps_the_float_function_and_equalizes_ranges(data):
    _, ev = data
    model = badly_scaled_depthwise()
    ctx, _ = _ctx(model, "cleanup,fold-batchnorm,equalize")
    out = ir.export_model(ctx.graph, ctx.meta)
    for feed in ev[:4]:
        assert_same_outputs(model, out, feed, tol=2e-5)
    w = {n.name: np.asarray(n.inputs[1].values, np.float64) for n in ctx.graph.nodes if n.op == "Conv"}
    # pair (expand, dw): range of expand's output channel i == range of dw's input channel i (converged)
    r1 = np.abs(w["expand"]).reshape(32, -1).max(1)
    r2 = np.abs(w["dw"]).reshape(32, -1).max(1)
    assert np.max(np.abs(np.log(r1 / r2))) < 1e-3
    r1 = np.abs(w["dw"]).reshape(32, -1).max(1)
    r2 = np.abs(w["project"]).transpose(1, 0, 2, 3).reshape(32, -1).max(1)
    assert np.max(np.abs(np.log(r1 / r2))) < 1e-3
    # before: the depthwise channel ranges spanned two decades; after equalization far less
    spread = np.log10(r1.max() / r1.min())
    orig = next(onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "dw.w")
    orig_r = np.abs(orig).reshape(32, -1).max(1)
    assert spread < 0.6 * np.log10(orig_r.max() / orig_r.min())


def test_second_run_changes_nothing():
    ctx, _ = _ctx(badly_scaled_depthwise(), "cleanup,fold-batchnorm,equalize")
    before = _weights(ctx)
    res = build_pipeline("equalize")[0].run(ctx)
    assert not res.modified
    after = _weights(ctx)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def _not_applicable(kind: str) -> onnx.ModelProto:
    b = Builder(3)
    w1 = b.init("c1.w", b.randn(8, 4, 1, 1))
    h = b.node("Conv", ["x", w1, b.init("c1.b", b.randn(8))], ["h"], name="c1")
    if kind == "sigmoid":  # not positively homogeneous
        h = b.node("Sigmoid", [h], ["s"], name="sig")
        b.node("Conv", [h, b.init("c2.w", b.randn(4, 8, 1, 1))], ["y"], name="c2")
        return b.model([vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 4, 6, 6])])
    if kind == "two_readers":  # the joining tensor is also read elsewhere
        r = b.node("Relu", [h], ["r"], name="relu")
        b.node("Conv", [r, b.init("c2.w", b.randn(4, 8, 1, 1))], ["y"], name="c2")
        b.node("Sigmoid", [r], ["z"], name="sig")
        return b.model([vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 4, 6, 6]), vi("z", ["N", 8, 6, 6])])
    # shared: the second conv's weight is also used by a third conv
    r = b.node("Relu", [h], ["r"], name="relu")
    w2 = b.init("c2.w", b.randn(8, 8, 1, 1))
    y = b.node("Conv", [r, w2], ["y0"], name="c2")
    b.node("Conv", [y, w2], ["y"], name="c3")
    return b.model([vi("x", ["N", 4, 6, 6])], [vi("y", ["N", 8, 6, 6])])


@pytest.mark.parametrize("kind", ["sigmoid", "two_readers", "shared"])
def test_equalize_leaves_unmatched_graphs_alone(kind):
    model = _not_applicable(kind)
    ctx, _ = _ctx(model, "cleanup,fold-batchnorm")
    before = _weights(ctx)
    res = build_pipeline("equalize")[0].run(ctx)
    assert not res.modified and res.stats["pairs"] == 0
    after = _weights(ctx)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def _bn_relu_model(beta: float = 4.0, gamma: float = 0.5) -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """conv 1x1 -> BN (running stats = the conv output's real statistics, large positive beta) -> ReLU ->
    conv 1x1 (no padding: absorption applies)."""
    b = Builder(5)
    rng = np.random.default_rng(7)
    feeds = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(24)]
    w1 = b.randn(6, 4, 1, 1)
    b1 = b.randn(6, scale=0.2)
    y1 = np.concatenate([np.einsum("oi,nihw->nohw", w1[:, :, 0, 0], f["x"]) + b1[None, :, None, None]
                         for f in feeds])
    mean, var = y1.mean(axis=(0, 2, 3)), y1.var(axis=(0, 2, 3))
    h = b.node("Conv", ["x", b.init("c1.w", w1), b.init("c1.b", b1)], ["h"], name="c1")
    params = [b.init("bn.gamma", np.full(6, gamma, np.float32)), b.init("bn.beta", np.full(6, beta, np.float32)),
              b.init("bn.mean", mean.astype(np.float32)), b.init("bn.var", var.astype(np.float32))]
    h = b.node("BatchNormalization", [h, *params], ["bn"], name="bn")
    h = b.node("Relu", [h], ["r"], name="relu")
    b.node("Conv", [h, b.init("c2.w", b.randn(3, 6, 1, 1)), b.init("c2.b", b.randn(3, scale=0.1))], ["y"],
           name="c2")
    return b.model([vi("x", ["N", 4, 8, 8])], [vi("y", ["N", 3, 8, 8])]), feeds


def test_bias_absorption_from_recorded_bn_statistics():
    model, feeds = _bn_relu_model(beta=4.0, gamma=0.5)
    ctx, stats = _ctx(model, "cleanup,fold-batchnorm,equalize")
    assert stats["equalize"]["absorbed_channels"] == 6
    out = ir.export_model(ctx.graph, ctx.meta)
    # exact wherever the pre-activation stays above c = beta - 3 gamma = 2.5, i.e. but for ~0.1 % of the values
    ref_y = np.concatenate([ort_run(model, f)["y"] for f in feeds])
    new_y = np.concatenate([ort_run(out, f)["y"] for f in feeds])
    assert sqnr_db(ref_y, new_y) > 45.0
    assert np.mean(np.abs(new_y - ref_y) > 1e-4 * np.abs(ref_y).max()) < 0.01
    # the ReLU output (the quantized activation) lost its always-present offset of c ~ 2.5 (equalization may
    # rescale channels, so compare in the units of each channel: the minimum drops from ~2.5+ to ~0)
    probe = ir.with_outputs(out, ["r"])
    r = np.concatenate([ort_run(probe, f)["r"] for f in feeds])
    ref = np.concatenate([ort_run(ir.with_outputs(model, ["r"]), f)["r"] for f in feeds])
    lo_after = r.min(axis=(0, 2, 3)) / r.max(axis=(0, 2, 3))
    lo_before = ref.min(axis=(0, 2, 3)) / ref.max(axis=(0, 2, 3))
    assert np.all(lo_before > 0.3) and np.all(lo_after < 0.1)
    # recorded statistics follow the rewrite, so a second run has nothing left to absorb
    res = build_pipeline("equalize")[0].run(ctx)
    assert not res.modified


def test_bias_absorption_needs_statistics_and_no_padding():
    model, _ = _bn_relu_model(beta=0.2, gamma=1.0)  # beta - 3 gamma < 0: nothing to absorb
    _, stats = _ctx(model, "cleanup,fold-batchnorm,equalize")
    assert stats["equalize"].get("absorbed_channels", 0) == 0 and stats["equalize"]["pairs"] == 1
