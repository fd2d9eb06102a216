"""exact-weights (passes/exact_weights.py) and the measured default's ceiling of a GPTQ candidate.

Oracles: numpy (the activation's Q/DQ computed from the scale and zero point the file holds, times the float
weight), the original float weights (bit for bit), and onnxruntime on the compiled files.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from _graphs import Builder, ort_run, run_pass, vi
from click.testing import CliRunner
from onnx import numpy_helper

from qcompiler import recipe
from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli import cli
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.registry import registry

MODELS = Path(__file__).resolve().parent.parent / "models"


def _matmul(seed: int = 3, k: int = 16, n: int = 8) -> tuple[onnx.ModelProto, np.ndarray]:
    b = Builder(seed)
    w = b.randn(k, n)
    b.node("MatMul", ["x", b.init("w", w)], ["y"], name="mm")
    return b.model([vi("x", [4, k])], [vi("y", [4, n])]), w


def _feeds(folder: Path, n: int, shape: tuple[int, ...], seed: int, outlier: float = 0.0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        x = rng.standard_normal(shape).astype(np.float32)
        if outlier:
            x.reshape(-1)[rng.integers(x.size)] = outlier  # one rare outlier per sample
        np.savez(folder / f"{i:03d}.npz", x=x)
    return folder


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ------------------------------------------------------------------------------------------------ the pass
def test_matmul_reads_its_float_weight_behind_the_quantized_activation(tmp_path: Path) -> None:
    model, w = _matmul()
    src, calib = tmp_path / "m.onnx", _feeds(tmp_path / "calib", 8, (4, 16), seed=1)
    onnx.save(model, src)
    q, x = tmp_path / "q.onnx", tmp_path / "x.onnx"
    compile_model(src, q, CompileOptions(plan="default", calib=str(calib), validate=False))
    res = compile_model(src, x, CompileOptions(plan="default", calib=str(calib), validate=False, exact_weights=True))
    stats = {r.name: r.stats for r in res.records}
    assert stats["exact-weights"]["weights_restored"] == 1
    qm, xm = onnx.load(q), onnx.load(x)
    onnx.checker.check_model(xm, full_check=True)
    # the same activation quantization (one Q/DQ pair on x), no weight DequantizeLinear left
    assert [n.op_type for n in qm.graph.node].count("QuantizeLinear") == 1
    assert sorted(n.op_type for n in xm.graph.node) == ["DequantizeLinear", "MatMul", "QuantizeLinear"]
    mm = next(n for n in xm.graph.node if n.op_type == "MatMul")
    inits = _inits(xm)
    assert np.array_equal(inits[mm.input[1]], w)  # the original float weight, bit for bit
    assert [o.name for o in xm.graph.output] == ["y"] and [i.name for i in xm.graph.input] == ["x"]
    # numpy oracle: the activation rounded with the file's own scale / zero point, times the float weight
    qn = next(n for n in xm.graph.node if n.op_type == "QuantizeLinear")
    s, z = float(inits[qn.input[1]]), int(inits[qn.input[2]])
    feed = np.random.default_rng(9).standard_normal((4, 16)).astype(np.float32)
    xq = (np.clip(np.round(feed / s) + z, 0, 255) - z).astype(np.float32) * np.float32(s)
    got = ort_run(xm, {"x": feed})["y"]
    np.testing.assert_allclose(got, xq @ w, rtol=1e-5, atol=1e-5)
    # the quantized model differs from it by the weight rounding only: not the same outputs
    assert not np.allclose(ort_run(qm, {"x": feed})["y"], got, rtol=0, atol=1e-6)


def test_conv_fixture_every_weight_restored_and_activations_as_compiled(tmp_path: Path) -> None:
    model, npz = MODELS / "conv_bn_relu.onnx", MODELS / "conv_bn_relu.npz"
    q, x = tmp_path / "q.onnx", tmp_path / "x.onnx"
    compile_model(model, q, CompileOptions(plan="default", calib=str(npz), validate=False))
    compile_model(model, x, CompileOptions(plan="default", calib=str(npz), validate=False, exact_weights=True))
    qm, xm = onnx.load(q), onnx.load(x)
    # a plan with GPTQ: no codes are chosen with exact weights (GPTQ and bias correction left out)
    g = compile_model(model, tmp_path / "g.onnx", CompileOptions(plan="w8a8", calib=str(npz), validate=False,
                                                                  exact_weights=True))
    assert "gptq" not in g.pipeline and g.pipeline.endswith("exact-weights")
    qops, xops = [n.op_type for n in qm.graph.node], [n.op_type for n in xm.graph.node]
    assert qops.count("QuantizeLinear") == xops.count("QuantizeLinear") > 0
    readers = {i for n in xm.graph.node if n.op_type in ("Conv", "Gemm") for i in n.input[1:2]}
    inits = _inits(xm)
    assert readers and all(r in inits and inits[r].dtype == np.float32 for r in readers)
    # each restored weight rounds to the codes the quantized file holds (round to nearest: what W' stood for)
    qinits = _inits(qm)
    for name in readers:
        base = name.removesuffix(":dq:exact")
        codes, scale = qinits[f"{base}:q"], qinits.get(f"{base}:s", qinits.get(f"{base}:sb"))
        assert scale is not None, base
        shape = [-1] + [1] * (codes.ndim - 1) if scale.size > 1 else []
        ratio = inits[name] / scale.reshape(shape) if shape else inits[name] / scale
        assert np.max(np.abs(ratio - codes)) <= 0.5 + 1e-3, base


def test_pass_without_records_changes_nothing_and_runs_twice_alike() -> None:
    model, _ = _matmul()
    ctx, res = run_pass(model, registry().get("exact-weights")())
    assert not res.modified and not res.stats
    # a second run after a real one finds nothing: the records are consumed
    ctx2 = CompileContext(graph=ctx.graph, meta=ctx.meta, plan=None, target=None)  # type: ignore[arg-type]
    t = ctx2.graph.tensors()["w"]
    ctx2.exact_weights = {}
    assert not registry().get("exact-weights")().run(ctx2).modified
    assert ctx2.graph.tensors()["w"] is t


def test_refused_where_a_lowering_reads_the_codes(tmp_path: Path) -> None:
    model, _ = _matmul(k=64, n=32)
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    plan = tmp_path / "p.yaml"
    plan.write_text("version: 1\nrules:\n  - match: {op_type: MatMul}\n    weight: {dtype: int4, granularity: block}\n"
                    "    activation: {dtype: float}\n")
    with pytest.raises(UserError, match="lowered into ops reading their codes"):
        compile_model(src, tmp_path / "x.onnx", CompileOptions(plan=str(plan), calib="random", validate=False,
                                                               exact_weights=True))
    assert not (tmp_path / "x.onnx").exists()


def test_pipeline_text_gives_the_same_file(tmp_path: Path) -> None:
    model, npz = MODELS / "conv_bn_relu.onnx", MODELS / "conv_bn_relu.npz"
    api, cli_out = tmp_path / "api.onnx", tmp_path / "cli.onnx"
    compile_model(model, api, CompileOptions(plan="default", calib=str(npz), validate=False, exact_weights=True))
    pipe = ("cleanup,fold-batchnorm,fold-scale,fold-bias,fuse-activations,cleanup,resolve-plan,calibrate,"
            "insert-qdq{exact-weights=true},lower,exact-weights")
    r = CliRunner().invoke(cli, ["compile", str(model), "-o", str(cli_out), "--plan", "default", "--calib", str(npz),
                                 "--pipeline", pipe, "--no-validate", "-q"])
    assert r.exit_code == 0, r.output
    assert cli_out.read_bytes() == api.read_bytes()


# ------------------------------------------------------------------------------ the measured default's ceiling
def _outlier_model(tmp_path: Path) -> tuple[Path, Path]:
    """x [256, 64] with one outlier of 1000 per sample (0.006 % of the values) -> MatMul [64, 32]: the w8a8
    candidate's 99.99th-percentile range clips the outlier, whose row carries most of the output."""
    b = Builder(11)
    w = (0.5 + 0.1 * b.rng.standard_normal((64, 32))).astype(np.float32)
    b.node("MatMul", ["x", b.init("w", w)], ["y"], name="mm")
    src = tmp_path / "outlier.onnx"
    onnx.save(b.model([vi("x", [256, 64])], [vi("y", [256, 32])]), src)
    return src, _feeds(tmp_path / "calib", 64, (256, 64), seed=2, outlier=1000.0)


def test_gptq_candidate_far_below_the_default_plan_is_not_compiled(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    src, calib = _outlier_model(tmp_path)
    skipped, full = tmp_path / "skipped.onnx", tmp_path / "full.onnx"
    res = compile_model(src, skipped, CompileOptions(calib=str(calib), validate=False))
    rec = res.report["recipe"]
    by_name = {c["name"]: c for c in rec["candidates"]}
    default_db = by_name["default"]["sqnr_db"]
    assert "not compiled: with its weights exact it measures" in by_name["w8a8"]["error"]
    ceiling = float(by_name["w8a8"]["error"].split("measures ")[1].split(" dB")[0])
    assert ceiling + recipe.CEILING_MARGIN_DB < default_db
    # oracle: the same compile with the ceiling never skipping compiles and measures w8a8 for real: below the
    # default plan (and below its ceiling), the same winner, the same bytes written
    monkeypatch.setattr(recipe, "CEILING_MARGIN_DB", math.inf)
    res2 = compile_model(src, full, CompileOptions(calib=str(calib), validate=False))
    rec2 = res2.report["recipe"]
    w8a8 = next(c for c in rec2["candidates"] if c["name"] == "w8a8")
    assert "error" not in w8a8 and w8a8["sqnr_db"] < default_db and w8a8["sqnr_db"] <= ceiling + 1e-6
    assert rec2["winner"] == rec["winner"] and full.read_bytes() == skipped.read_bytes()


def test_skipped_candidate_row_in_the_compile_summary(tmp_path: Path) -> None:
    src, calib = _outlier_model(tmp_path)
    r = CliRunner().invoke(cli, ["compile", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(calib),
                                 "--no-validate"])
    assert r.exit_code == 0, r.output
    row = next(ln for ln in r.output.splitlines() if ln.startswith("w8a8 "))
    assert row.split()[1:3] == ["-", "-"] and "not compiled: with its weights exact it measures" in row


def test_a_gptq_candidate_s_seconds_count_its_ceiling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compile summary's seconds column: a GPTQ candidate compiled after its ceiling shows both compiles'
    seconds (the report's ``seconds``), a candidate without GPTQ its own."""
    from qcompiler.recipe.measure import Bench

    seconds: dict[str, float] = {}
    real = Bench.measure

    def spy(self, plan, name, change, **kw):  # type: ignore[no-untyped-def]
        m = real(self, plan, name, change, **kw)
        seconds[name] = m.seconds
        return m

    monkeypatch.setattr(Bench, "measure", spy)
    model, npz = MODELS / "conv_bn_relu.onnx", MODELS / "conv_bn_relu.npz"
    res = compile_model(model, tmp_path / "q.onnx", CompileOptions(calib=str(npz), validate=False))
    rows = {c["name"]: c for c in res.report["recipe"]["candidates"]}
    assert "error" not in rows["w8a8"] and "w8a8-exact-weights" in seconds
    assert rows["w8a8"]["seconds"] == pytest.approx(seconds["w8a8"] + seconds["w8a8-exact-weights"], abs=2e-3)
    assert rows["default"]["seconds"] == pytest.approx(seconds["default"], abs=2e-3)
    r = CliRunner().invoke(cli, ["compile", str(model), "-o", str(tmp_path / "c.onnx"), "--calib", str(npz),
                                 "--no-validate"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    head = next(ln for ln in lines if ln.startswith("candidate "))
    assert head.split() == ["candidate", "SQNR", "dB", "latency", "bytes", "metric", "s", "note"]
    w8a8 = next(ln for ln in lines if ln.startswith("w8a8 "))
    assert float(w8a8.split()[3]) >= 0.0  # name, SQNR, bytes, seconds (latency and metric empty)


def test_ceiling_not_used_with_a_task_metric_or_when_close(tmp_path: Path) -> None:
    # a task metric decides by the user's function: every candidate is compiled and measured
    src, calib = _outlier_model(tmp_path)

    def neg_mae(quantized: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]],
                feeds: list[dict[str, np.ndarray]]) -> float:
        return -float(np.mean([np.abs(q["y"] - r["y"]).mean() for q, r in zip(quantized, reference, strict=True)]))

    res = compile_model(src, tmp_path / "m.onnx", CompileOptions(calib=str(calib), validate=False,
                                                                task_metric=neg_mae))
    w8a8 = next(c for c in res.report["recipe"]["candidates"] if c["name"] == "w8a8")
    assert "error" not in w8a8 and w8a8["metric"] is not None
    # the conv fixture: w8a8's ceiling is not 6 dB below the default plan; compiled and measured
    model, npz = MODELS / "conv_bn_relu.onnx", MODELS / "conv_bn_relu.npz"
    res = compile_model(model, tmp_path / "q.onnx", CompileOptions(calib=str(npz), validate=False))
    w8a8 = next(c for c in res.report["recipe"]["candidates"] if c["name"] == "w8a8")
    assert "error" not in w8a8 and w8a8["sqnr_db"] > res.report["recipe"]["candidates"][0]["sqnr_db"]


def test_exact_weights_with_compact_names_restores_before_renaming(tmp_path: Path) -> None:
    model, npz = MODELS / "conv_bn_relu.onnx", MODELS / "conv_bn_relu.npz"
    plain, short = tmp_path / "plain.onnx", tmp_path / "short.onnx"
    compile_model(model, plain, CompileOptions(plan="default", calib=str(npz), validate=False, exact_weights=True))
    res = compile_model(model, short, CompileOptions(plan="default", calib=str(npz), validate=False,
                                                     exact_weights=True, compact_names=True))
    names = [r.name for r in res.records]
    assert names.index("exact-weights") < names.index("compact-names")
    feed = {k: v[0] for k, v in np.load(npz).items()}  # the stacked .npz: [samples, *feed shape]
    a, b = ort_run(onnx.load(plain), feed), ort_run(onnx.load(short), feed)
    assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)  # renaming changes no value
