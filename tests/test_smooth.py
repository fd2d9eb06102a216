"""smooth: SmoothQuant — activation outliers moved into the weights, folded into the producer; exactness,
alpha, idempotency and the cases it must leave alone."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from _graphs import Builder, assert_same_outputs, ort_run, vi

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import CalibrationSource, input_signatures
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_manager import PassManager
from qcompiler.core.registry import build_pipeline
from qcompiler.plan import Plan
from qcompiler.report import validate as qv
from qcompiler.runtime_targets import get_target

W8A8 = {"defaults": {"weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": True},
                     "activation": {"dtype": "uint8", "granularity": "per_tensor", "symmetric": False}}}
OUTLIERS = [3, 17, 40, 58]


def ln_model(kind: str = "ln") -> onnx.ModelProto:
    """x[N,16,64] -> LayerNorm (4 channels with a 25x gain: the outliers) -> q, k MatMuls (+bias) -> outputs.
    ``kind``: ``ln`` (the fixture), ``residual`` (the LN output is also added to x: not smoothable),
    ``shared`` (q and k share one weight: not smoothable), ``input`` (the MatMul reads the graph input)."""
    b = Builder(41)
    gamma = b.rng.uniform(0.8, 1.2, 64).astype(np.float32)
    gamma[OUTLIERS] *= 25.0
    if kind == "input":
        b.node("MatMul", ["x", b.init("q.w", b.randn(64, 32, scale=0.2))], ["q"], name="q")
        return b.model([vi("x", ["N", 16, 64])], [vi("q", ["N", 16, 32])])
    h = b.node("LayerNormalization", ["x", b.init("ln.g", gamma), b.init("ln.b", b.randn(64, scale=0.1))], ["h"],
               name="ln", axis=-1)
    wq = b.init("q.w", b.randn(64, 32, scale=0.2))
    wk = wq if kind == "shared" else b.init("k.w", b.randn(64, 32, scale=0.2))
    q = b.node("MatMul", [h, wq], ["q0"], name="q")
    b.node("Add", [q, b.init("q.b", b.randn(32, scale=0.05))], ["q"], name="q.add")
    b.node("MatMul", [h, wk], ["k"], name="k")
    outs = [vi("q", ["N", 16, 32]), vi("k", ["N", 16, 32])]
    if kind == "residual":
        b.node("Add", ["x", h], ["r"], name="residual")
        outs.append(vi("r", ["N", 16, 64]))
    return b.model([vi("x", ["N", 16, 64])], outs)


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 16, 64)).astype(np.float32)


def _ctx(model: onnx.ModelProto, plan: Plan, calib: np.ndarray | None, pipeline: str,
         data_free: bool = False) -> tuple[CompileContext, dict[str, dict[str, int]]]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    graph, meta = ir.import_graph(m)
    src = None if calib is None else CalibrationSource.from_feeds([{"x": c} for c in calib], input_signatures(graph))
    ctx = CompileContext(graph=graph, meta=meta, plan=plan, target=get_target("ort"), calib=src, data_free=data_free)
    return ctx, {r.name: r.stats for r in PassManager(build_pipeline(pipeline)).run(ctx)}


def test_smooth_gains_on_activation_outliers(tmp_path):
    src = tmp_path / "ln.onnx"
    onnx.save(ln_model(), src)
    np.savez(tmp_path / "calib.npz", x=tokens(32, 1))
    feeds = [{"x": f} for f in tokens(16, 2)]
    sq = {}
    for tag, algos in (("plain", {}), ("smooth", {"smooth": {"alpha": 0.5}})):
        out = tmp_path / f"{tag}.onnx"
        res = compile_model(src, out, CompileOptions(plan=Plan.from_dict({**W8A8, "algorithms": algos}),
                                                     calib=str(tmp_path / "calib.npz"), validate=False))
        rep = qv.validate(src, out, feeds, per_layer=False)
        sq[tag] = min(o.sqnr_db for o in rep.outputs)
        if algos:
            assert "resolve-plan,smooth,calibrate" in res.pipeline
            rec = next(r for r in res.records if r.name == "smooth")
            assert rec.stats["smoothed"] == 1 and rec.stats["weights_scaled"] == 2
    assert sq["smooth"] >= sq["plain"] + 6.0, sq  # measured: 29.6 -> 38.9 dB (worst output)


def _ln_channel_ranges(model: onnx.ModelProto, feeds) -> np.ndarray:
    probe = ir.with_outputs(model, ["h"])
    return np.max([np.abs(ort_run(probe, f)["h"]).max(axis=(0, 1)) for f in feeds], axis=0)


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_smooth_is_exact_in_float_and_follows_alpha(alpha):
    model = ln_model()
    calib = tokens(16, 3)
    ctx, stats = _ctx(model, Plan.from_dict(W8A8), calib, f"cleanup,resolve-plan,smooth{{alpha={alpha}}}")
    assert stats["smooth"]["smoothed"] == 1
    out = ir.export_model(ctx.graph, ctx.meta)
    feeds = [{"x": f} for f in tokens(4, 4)]
    for f in feeds:
        assert_same_outputs(model, out, f, tol=2e-5)
    before = _ln_channel_ranges(model, feeds)
    after = _ln_channel_ranges(out, feeds)
    # the outlier channels' share of the range shrinks as |x|^(1 - alpha): 25x gain -> ~25^(1-alpha)
    ratio_before = before[OUTLIERS].mean() / np.median(before)
    ratio_after = after[OUTLIERS].mean() / np.median(after)
    assert ratio_before > 15.0
    assert ratio_after < 2.0 * ratio_before ** (1.0 - alpha), (ratio_before, ratio_after)


@pytest.mark.parametrize("kind,reason", [("residual", "skipped_readers"), ("shared", "skipped_readers"),
                                         ("input", "skipped_no_producer")])
def test_smooth_leaves_unmatched_graphs_alone(kind, reason):
    model = ln_model(kind)
    ctx, _ = _ctx(model, Plan.from_dict(W8A8), tokens(8, 5), "cleanup,resolve-plan")
    before = {k: np.array(t.values) for k, t in ctx.graph.tensors().items() if hasattr(t, "values")}
    res = build_pipeline("smooth")[0].run(ctx)
    assert not res.modified and res.stats[reason] == 1 and res.stats.get("smoothed", 0) == 0
    after = {k: np.array(t.values) for k, t in ctx.graph.tensors().items() if hasattr(t, "values")}
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)


def test_smooth_twice_changes_nothing_and_float_activations_are_skipped():
    ctx, _ = _ctx(ln_model(), Plan.from_dict(W8A8), tokens(8, 6), "cleanup,resolve-plan,smooth")
    again = build_pipeline("smooth")[0].run(ctx)
    assert not again.modified and again.stats["unchanged_balanced"] == 1
    # weight-only plan: the activations stay float, so there is nothing to smooth
    weight_only = {"defaults": {"weight": W8A8["defaults"]["weight"], "activation": {"dtype": "float"}}}
    _, stats = _ctx(ln_model(), Plan.from_dict(weight_only), tokens(8, 6), "cleanup,resolve-plan,smooth")
    assert stats["smooth"] == {"skipped_readers": 1}


def test_smooth_order_and_data_free():
    ctx, _ = _ctx(ln_model(), Plan.from_dict(W8A8), tokens(4, 7), "cleanup,resolve-plan,calibrate")
    # the pass manager refuses the order (smooth invalidates "calibrated") before the pass runs
    with pytest.raises(UserError, match=r"^pipeline: 'smooth' must run before 'calibrate' \(it changes the activation ranges\)$"):
        PassManager(build_pipeline("smooth")).run(ctx)
    _, stats = _ctx(ln_model(), Plan.from_dict(W8A8), None, "cleanup,resolve-plan,smooth", data_free=True)
    assert stats["smooth"] == {"skipped_data_free": 1}
    with pytest.raises(UserError, match="alpha"):
        build_pipeline("smooth{alpha=1.5}")
