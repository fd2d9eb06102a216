"""smooth{alpha=auto}: SmoothQuant's migration strength chosen per tensor by measuring the quantized products'
error (passes/_alpha_search.py) — against every fixed alpha of the grid on held-back data, "off" kept where
nothing gains, idempotence, determinism, numeric alpha byte-identical to before, the decomposed LayerNorm."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from _graphs import Builder, assert_same_outputs, vi
from click.testing import CliRunner

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import CalibrationSource, input_signatures
from qcompiler.cli import cli
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_manager import PassManager
from qcompiler.core.registry import build_pipeline
from qcompiler.core.tags import RESCALED_KEY
from qcompiler.passes import _alpha_search as search
from qcompiler.passes import smooth as smooth_mod
from qcompiler.plan import Plan
from qcompiler.runtime_targets import get_target

MODELS = Path(__file__).resolve().parent.parent / "models"
TB = MODELS / "transformer_block.onnx"
W8A8 = {"defaults": {"weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": True},
                     "activation": {"dtype": "uint8", "granularity": "per_tensor", "symmetric": False}}}
GRID = [round(0.1 * i, 1) for i in range(11)]


def tb_tokens(n: int, seed: int | None) -> np.ndarray:
    """More inputs like models/transformer_block.npz: its generator (models/make_fixtures.py, token_embeddings
    with rng 2005) replayed for the vocabulary and the outlier channels, new token ids from ``seed`` (None: the
    fixture's own ids, n = 32)."""
    rng = np.random.default_rng(2005)
    vocab = rng.standard_normal((100, 64)) * 0.8
    fixture_ids = rng.integers(0, 100, size=(32, 16))
    outlier = np.ones(64)
    outlier[rng.choice(64, size=3, replace=False)] = rng.uniform(3.0, 6.0, size=3)
    ids = fixture_ids if seed is None else np.random.default_rng(seed).integers(0, 100, size=(n, 16))
    pos = np.arange(16)[:, None]
    freq = np.exp(-np.log(10000.0) * (np.arange(0, 64, 2) / 64))[None, :]
    pe = np.zeros((16, 64))
    pe[:, 0::2] = np.sin(pos * freq)
    pe[:, 1::2] = np.cos(pos * freq)
    return ((vocab[ids] + 0.5 * pe[None]) * outlier).astype(np.float16).astype(np.float32)[:, None]


def outlier_matmul(gain: float, tokens: int = 64) -> onnx.ModelProto:
    """x[N, T, 64] -> Mul by a per-channel constant (channel 5 x ``gain``: the outlier) -> MatMul [64, 32]."""
    b = Builder(7)
    c = np.ones(64, np.float32)
    c[5] = gain
    h = b.node("Mul", ["x", b.init("c", c)], ["h"], name="scale")
    b.node("MatMul", [h, b.init("w", b.randn(64, 32, scale=0.2))], ["y"], name="mm")
    return b.model([vi("x", ["N", tokens, 64])], [vi("y", ["N", tokens, 32])])


def _sqnr(src: Path, q: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    a, b = ir.session(str(src)), ir.session(str(q))
    ref = np.concatenate([a.run(None, f)[0].ravel() for f in feeds]).astype(np.float64)
    got = np.concatenate([b.run(None, f)[0].ravel() for f in feeds]).astype(np.float64)
    return float(10 * np.log10((ref @ ref) / ((ref - got) @ (ref - got))))


def _compile(src: Path, out: Path, calib: Path, algos: dict, base: dict = W8A8):  # type: ignore[no-untyped-def]
    return compile_model(src, out, CompileOptions(plan=Plan.from_dict({**base, "algorithms": algos}),
                                                  calib=str(calib), validate=False))


def _sweep(tmp_path: Path, src: Path, calib: np.ndarray, feeds: list[dict[str, np.ndarray]]):  # type: ignore[no-untyped-def]
    """Output SQNR (held-back feeds) with smooth off, every fixed alpha of the grid, and auto; auto's result."""
    np.savez(tmp_path / "calib.npz", x=calib)
    sq = {}
    for tag, algos in [("off", {}), *((a, {"smooth": {"alpha": a}}) for a in GRID),
                       ("auto", {"smooth": {"alpha": "auto"}})]:
        out = tmp_path / f"{tag}.onnx"
        res = _compile(src, out, tmp_path / "calib.npz", algos)
        sq[tag] = _sqnr(src, out, feeds)
        if tag == "auto":
            auto = res
    return sq, auto


def test_fixture_replay_is_the_fixture_data():
    # the generator replayed with the fixture's own ids gives the committed samples bit for bit
    assert np.array_equal(tb_tokens(32, None), np.load(MODELS / "transformer_block.npz")["x"])


def test_auto_on_transformer_block_matches_the_best_fixed_alpha(tmp_path):
    calib = np.load(MODELS / "transformer_block.npz")["x"]
    feeds = [{"x": v} for v in tb_tokens(128, 77)]
    sq, res = _sweep(tmp_path, TB, calib, feeds)
    best = max(sq[a] for a in GRID)
    # measured: off 32.94, best fixed alpha 0.7 37.42, auto 37.32 dB (alpha 0.8 for both LayerNorm outputs)
    assert sq["auto"] >= best - 0.3, sq
    assert sq["auto"] >= sq["off"] + 3.0, sq
    rec = next(r for r in res.records if r.name == "smooth")
    assert rec.stats["smoothed"] == 2 and sum(v for k, v in rec.stats.items() if k.startswith("alpha_")) == 2
    alphas = res.report["smooth"]["alphas"]
    assert set(alphas) == {"ln1", "ln2"} and all(a["error"] < a["error_off"] for a in alphas.values())
    assert "resolve-plan,smooth{alpha=auto},calibrate" in res.pipeline


def test_auto_on_one_outlier_channel(tmp_path):
    onnx.save(outlier_matmul(30.0), tmp_path / "om.onnx")
    rng = np.random.default_rng(64)
    calib = rng.standard_normal((32, 1, 64, 64)).astype(np.float32)
    feeds = [{"x": rng.standard_normal((1, 64, 64)).astype(np.float32)} for _ in range(64)]
    sq, res = _sweep(tmp_path, tmp_path / "om.onnx", calib, feeds)
    # measured: off 22.63, 0.5 36.51, 0.7 (the best) 38.08, 1.0 34.30; auto chose 0.7
    assert sq["auto"] >= max(sq[a] for a in GRID) - 0.3 and sq["auto"] >= sq["off"] + 10.0, sq
    assert res.report["smooth"]["alphas"]["h"]["alpha"] == "0.7"


def test_no_outliers_keep_s_one(tmp_path):
    src = tmp_path / "flat.onnx"
    onnx.save(outlier_matmul(1.0), src)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(64).standard_normal((32, 1, 64, 64)).astype(np.float32))
    res = _compile(src, tmp_path / "auto.onnx", tmp_path / "calib.npz", {"smooth": {"alpha": "auto"}})
    rec = next(r for r in res.records if r.name == "smooth")
    assert not rec.modified and rec.stats["alpha_off"] == 1 and rec.stats.get("smoothed", 0) == 0
    _compile(src, tmp_path / "off.onnx", tmp_path / "calib.npz", {})
    assert (tmp_path / "auto.onnx").read_bytes() == (tmp_path / "off.onnx").read_bytes()


def _ctx(model: onnx.ModelProto, calib: np.ndarray, pipeline: str, seed: int = 0) -> tuple[CompileContext, dict]:
    graph, meta = ir.import_graph(model)
    src = CalibrationSource.from_feeds([{"x": c} for c in calib], input_signatures(graph))
    ctx = CompileContext(graph=graph, meta=meta, plan=Plan.from_dict(W8A8), target=get_target("ort"), calib=src,
                         seed=seed)
    return ctx, {r.name: r.stats for r in PassManager(build_pipeline(pipeline)).run(ctx)}


def test_auto_twice_changes_nothing_is_exact_in_float_and_deterministic():
    model = onnx.load(str(TB))
    calib = np.load(MODELS / "transformer_block.npz")["x"]
    ctx, stats = _ctx(model, calib, "cleanup,resolve-plan,smooth{alpha=auto}")
    assert stats["smooth"]["smoothed"] == 2
    first = ir.export_model(ctx.graph, ctx.meta).SerializeToString()
    again = build_pipeline("smooth{alpha=auto}")[0].run(ctx)
    assert not again.modified and again.stats["alpha_off"] == 2, again.stats
    assert ir.export_model(ctx.graph, ctx.meta).SerializeToString() == first
    # the same data and seed: the same alphas and bytes; the rewrite is exact in float
    ctx2, _ = _ctx(onnx.load(str(TB)), calib, "cleanup,resolve-plan,smooth{alpha=auto}")
    out = ir.export_model(ctx2.graph, ctx2.meta)
    assert out.SerializeToString() == first
    onnx.checker.check_model(out, full_check=True)
    for v in tb_tokens(4, 5):
        assert_same_outputs(model, out, {"x": v}, tol=2e-5)


def test_rows_are_bounded_and_seeded():
    site = search.SiteRows((0, 0), search.quota(100, 8))
    data = np.random.default_rng(1).standard_normal((8, 64, 16)).astype(np.float32)
    for x in data:
        site.add(x)
    assert search.quota(100, 8) == 13 and sum(len(k) for k in site.kept) == 8 * 13
    again = search.SiteRows((0, 0), 13)
    for x in data:
        again.add(x)
    assert all(np.array_equal(a, b) for a, b in zip(site.kept, again.kept))
    # leave one out: the range of every sample but i, from the per-channel top two
    for i in range(8):
        lo, hi = site.ranges(i)
        rest = np.delete(data, i, axis=0)
        assert np.array_equal(hi, rest.max(axis=(0, 1))) and np.array_equal(lo, rest.min(axis=(0, 1)))
    lo, hi = site.ranges()
    assert np.array_equal(hi, data.max(axis=(0, 1))) and np.array_equal(lo, data.min(axis=(0, 1)))


def _base_sha(path: Path) -> str:
    """sha256 of the model at ``path`` as the base commit wrote it: without the ``qcompiler.rescaled`` node marks
    (added later, tests/test_rescaled_layers.py), the rest of the file byte for byte."""
    model = onnx.load(path)
    for node in model.graph.node:
        kept = [(p.key, p.value) for p in node.metadata_props if p.key != RESCALED_KEY]
        del node.metadata_props[:]
        for k, v in kept:
            node.metadata_props.add(key=k, value=v)
    return hashlib.sha256(model.SerializeToString()).hexdigest()


#: sha256 of the compiles below made by the base commit 38bac7d (before alpha=auto existed): PYTHONPATH to a
#: package assembled from ``git archive 38bac7d`` as benchmarks/identity_check.py does, the same calls
BASE_SHA = {
    "0.5": "123253c926f71355c7cf7b6dc3e28b0e04f937cea4137039e68a480cd9da200c",
    "0.8": "99263fe0828fdae0e9710054347387b7119535110f38580281d682b506aa93ab",
}


@pytest.mark.parametrize("alpha", ["0.5", "0.8"])
def test_numeric_alpha_is_byte_identical_to_before(tmp_path, alpha):
    out = tmp_path / "tb.onnx"
    compile_model(TB, out, CompileOptions(plan=Plan.from_dict({"algorithms": {"smooth": {"alpha": float(alpha)}}}),
                                          calib=str(MODELS / "transformer_block.npz"), validate=False))
    assert _base_sha(out) == BASE_SHA[alpha]


def decomposed_ln(tokens: int = 32) -> onnx.ModelProto:
    """LayerNorm as primitive ops (ReduceMean / Sub / Mul / Div ... Mul(g) / Add(b), as the ViT and PP-OCR rec
    export it), 3 outlier channels in g, read by two MatMuls."""
    b = Builder(11)
    g = b.rng.uniform(0.8, 1.2, 64).astype(np.float32)
    g[[2, 30, 50]] *= 20.0
    mean = b.node("ReduceMean", ["x"], ["mean"], name="mean", axes=[-1], keepdims=1)
    d = b.node("Sub", ["x", mean], ["d"], name="sub")
    var = b.node("ReduceMean", [b.node("Mul", [d, d], ["d2"], name="sq")], ["var"], name="var", axes=[-1],
                 keepdims=1)
    std = b.node("Sqrt", [b.node("Add", [var, b.init("eps", np.array(1e-5, np.float32))], ["ve"], name="eps")],
                 ["std"], name="sqrt")
    z = b.node("Div", [d, std], ["z"], name="norm")
    h = b.node("Add", [b.node("Mul", [z, b.init("g", g)], ["zg"], name="gamma"), b.init("beta", b.randn(64, scale=0.1))],
               ["h"], name="beta")
    b.node("MatMul", [h, b.init("wq", b.randn(64, 32, scale=0.2))], ["q"], name="q")
    b.node("MatMul", [h, b.init("wk", b.randn(64, 32, scale=0.2))], ["k"], name="k")
    return b.model([vi("x", ["N", tokens, 64])], [vi("q", ["N", tokens, 32]), vi("k", ["N", tokens, 32])],
                   opset=13)


def test_decomposed_layernorm(tmp_path):
    model = decomposed_ln()
    calib = np.random.default_rng(3).standard_normal((16, 1, 32, 64)).astype(np.float32)
    # a numeric alpha leaves it alone unless affine: true (its compiles stay as before)
    _, stats = _ctx(model, calib, "cleanup,resolve-plan,smooth")
    assert stats["smooth"].get("smoothed", 0) == 0 and stats["smooth"]["skipped_producer"] == 1
    for pipeline in ("cleanup,resolve-plan,smooth{affine=true}", "cleanup,resolve-plan,smooth{alpha=auto}"):
        ctx, stats = _ctx(decomposed_ln(), calib, pipeline)
        assert stats["smooth"]["smoothed"] == 1 and stats["smooth"]["weights_scaled"] == 2, stats
        out = ir.export_model(ctx.graph, ctx.meta)
        for v in np.random.default_rng(4).standard_normal((3, 1, 32, 64)).astype(np.float32):
            assert_same_outputs(model, out, {"x": v}, tol=2e-5)
    src = tmp_path / "dln.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "calib.npz", x=calib)
    feeds = [{"x": v} for v in np.random.default_rng(5).standard_normal((32, 1, 32, 64)).astype(np.float32)]
    sq = {}
    for tag, algos in (("off", {}), ("auto", {"smooth": {"alpha": "auto"}})):
        _compile(src, tmp_path / f"{tag}.onnx", tmp_path / "calib.npz", algos)
        sq[tag] = _sqnr(src, tmp_path / f"{tag}.onnx", feeds)
    assert sq["auto"] >= sq["off"] + 3.0, sq


def test_bad_alpha_is_one_line():
    with pytest.raises(UserError, match=r"^<plan>: algorithms.smooth: pass 'smooth' option 'alpha': must be a number in \[0, 1\] or "
                                        r"'auto', got 'banana'$"):
        Plan.from_dict({"algorithms": {"smooth": {"alpha": "banana"}}})
    with pytest.raises(UserError, match="alpha"):
        build_pipeline("smooth{alpha=automatic}")
    with pytest.raises(UserError, match="rows"):
        build_pipeline("smooth{alpha=auto,rows=0}")
    assert build_pipeline("smooth{alpha=auto}")[0].options.alpha == "auto"
    assert build_pipeline("smooth{alpha=0.25}")[0].options.alpha == 0.25


def test_cli_pipeline_text_and_bad_value(tmp_path):
    np.savez(tmp_path / "calib.npz", x=np.load(MODELS / "transformer_block.npz")["x"][:8])
    out = tmp_path / "tb.onnx"
    pipe = "cleanup,fold-batchnorm,cleanup,resolve-plan,smooth{alpha=auto},calibrate,insert-qdq,lower"
    res = CliRunner().invoke(cli, ["compile", str(TB), "-o", str(out), "--calib", str(tmp_path / "calib.npz"),
                                   "--pipeline", pipe, "--no-validate"])
    assert res.exit_code == 0, res.output
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    bad = tmp_path / "bad.onnx"
    res = CliRunner().invoke(cli, ["compile", str(TB), "-o", str(bad), "--calib", str(tmp_path / "calib.npz"),
                                   "--pipeline", pipe.replace("alpha=auto", "alpha=most")])
    assert res.exit_code == 2 and not bad.exists()
    assert res.output.strip().splitlines()[-1] == ("error: pass 'smooth' option 'alpha': must be a number in [0, 1] "
                                                   "or 'auto', got 'most'")


def test_measuring_in_groups_changes_nothing(monkeypatch):
    """Tensors whose kept rows exceed the budget are measured in further passes: the same rows, the same bytes."""
    calib = np.load(MODELS / "transformer_block.npz")["x"]
    ctx, stats = _ctx(onnx.load(str(TB)), calib, "cleanup,resolve-plan,smooth{alpha=auto}")
    one_pass = ir.export_model(ctx.graph, ctx.meta).SerializeToString()
    monkeypatch.setattr(smooth_mod, "AUTO_ROWS_BYTES", 1)  # every tensor its own pass over the data
    ctx2, stats2 = _ctx(onnx.load(str(TB)), calib, "cleanup,resolve-plan,smooth{alpha=auto}")
    assert ir.export_model(ctx2.graph, ctx2.meta).SerializeToString() == one_pass and stats2 == stats
    assert ctx2.report["smooth"]["alphas"] == ctx.report["smooth"]["alphas"]
