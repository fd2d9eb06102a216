"""The measured default's per-token follow-up: when MatMul / Gemm inputs quantized at run time (one scale per
tensor) measure above the default plan, their per-token form (one scale per row) is measured too, and wins only
by more than the guard's margin. onnxruntime runs of the written files against the float model are the oracle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _graphs import Builder, vi

from qcompiler import recipe
from qcompiler.api import CompileOptions, compile_model
from qcompiler.recipe import GUARD_MARGIN_DB

ROOT = Path(__file__).resolve().parents[1]
K, N, T = 48, 24, 8


def _token_scaled(seed: int, n: int) -> np.ndarray:
    """[n, 1, T, K]: every token row of every sample at its own scale, 10^U(-1.5, 1.5) (a transformer's
    outlier tokens: rows of ranges 1000x apart)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, T, K)).astype(np.float32)
    return (x * (10.0 ** rng.uniform(-1.5, 1.5, (n, 1, T, 1)))).astype(np.float32)


def _model(path: Path) -> Path:
    b = Builder(31)
    b.node("MatMul", ["x", b.init("w", b.randn(K, N, scale=0.2))], ["h0"], name="mm")
    b.node("Relu", ["h0"], ["h"], name="relu")
    b.node("MatMul", ["h", b.init("w2", b.randn(N, N, scale=0.2))], ["y"], name="mm2")
    onnx.save(b.model([vi("x", [1, T, K])], [vi("y", [1, T, N])], opset=17), str(path))
    return path


def _sqnr_per_row(model: Path, quant: Path, xs: np.ndarray) -> float:
    """The worst token row's SQNR (dB, rows pooled over samples by position) -- numpy on onnxruntime outputs."""
    f, q = ort.InferenceSession(str(model)), ort.InferenceSession(str(quant))
    ref = np.concatenate([f.run(None, {"x": x})[0] for x in xs]).astype(np.float64)
    got = np.concatenate([q.run(None, {"x": x})[0] for x in xs]).astype(np.float64)
    num = np.sum(ref * ref, axis=(0, 2))
    den = np.sum((ref - got) ** 2, axis=(0, 2))
    return float(np.min(10.0 * np.log10(num / den)))


def test_per_token_follow_up_wins_on_token_scaled_rows(tmp_path: Path) -> None:
    model = _model(tmp_path / "mm.onnx")
    np.savez(tmp_path / "calib.npz", x=_token_scaled(1, 64))
    out = tmp_path / "q.onnx"
    res = compile_model(model, out, CompileOptions(calib=str(tmp_path / "calib.npz"), validate=False,
                                                   recipe_out=str(tmp_path / "recipe.yaml")))
    rows = {m["name"]: m for m in res.report["recipe"]["candidates"]}
    assert res.report["recipe"]["winner"] == "per-token-matmul"
    assert rows["dynamic-matmul"]["sqnr_db"] > rows["default"]["sqnr_db"]  # what triggers the follow-up
    assert rows["per-token-matmul"]["sqnr_db"] > rows["dynamic-matmul"]["sqnr_db"] + GUARD_MARGIN_DB
    assert "gptq" not in rows  # effort low: the follow-up is not the normal effort's candidate list
    onnx.checker.check_model(str(out), full_check=True)
    # the oracle, on samples no compile saw: per-token rows far above the per-tensor and static forms
    ev = _token_scaled(2, 16)
    plain = tmp_path / "plain.onnx"
    compile_model(model, plain, CompileOptions(calib=str(tmp_path / "calib.npz"), plan="default", validate=False))
    won, base = _sqnr_per_row(model, out, ev), _sqnr_per_row(model, plain, ev)
    assert won >= base + 10.0, (won, base)
    # the recipe file reproduces it byte for byte
    again = tmp_path / "again.onnx"
    compile_model(model, again, CompileOptions(calib=str(tmp_path / "calib.npz"), plan=str(tmp_path / "recipe.yaml"),
                                               validate=False))
    assert again.read_bytes() == out.read_bytes()


def test_per_token_follow_up_not_kept_without_a_gain(tmp_path: Path) -> None:
    """gemm_head: one row per input, so per-token scales are the per-tensor ones: measured, not kept (a note
    says why), and the file is dynamic-matmul's."""
    model, npz = ROOT / "models" / "gemm_head.onnx", ROOT / "models" / "gemm_head.npz"
    res = compile_model(model, tmp_path / "q.onnx", CompileOptions(calib=str(npz), validate=False))
    rows = {m["name"]: m for m in res.report["recipe"]["candidates"]}
    assert res.report["recipe"]["winner"] == "dynamic-matmul"
    assert abs(rows["per-token-matmul"]["sqnr_db"] - rows["dynamic-matmul"]["sqnr_db"]) <= GUARD_MARGIN_DB
    assert rows["per-token-matmul"]["error"].startswith("not above dynamic-matmul")


def test_no_follow_up_where_run_time_scales_lose(tmp_path: Path) -> None:
    """conv_bn_relu has no MatMul; transformer_block's dynamic-matmul measures below its default plan: no
    per-token candidate on either."""
    for name in ("conv_bn_relu", "transformer_block"):
        model, npz = ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}.npz"
        res = compile_model(model, tmp_path / f"{name}.onnx", CompileOptions(calib=str(npz), validate=False))
        rows = {m["name"]: m for m in res.report["recipe"]["candidates"]}
        assert "per-token-matmul" not in rows
        if "dynamic-matmul" in rows:
            assert rows["dynamic-matmul"]["sqnr_db"] <= rows["default"]["sqnr_db"]


def test_gptq_candidate_held_to_the_best_so_far(tmp_path: Path, monkeypatch) -> None:
    """The candidates without GPTQ (and the per-token follow-up) are measured first; a GPTQ candidate whose
    exact-weights ceiling is more than CEILING_MARGIN_DB below the best of them cannot win and is not compiled.
    The oracle: the same compile holding it to the default plan instead (as before) compiles and measures it,
    below the winner, and writes the same bytes."""
    model = _model(tmp_path / "mm.onnx")
    np.savez(tmp_path / "calib.npz", x=_token_scaled(1, 64))
    opts = CompileOptions(calib=str(tmp_path / "calib.npz"), validate=False)
    out = tmp_path / "q.onnx"
    rows = {m["name"]: m for m in compile_model(model, out, opts).report["recipe"]["candidates"]}
    assert "below per-token-matmul, the best so far" in rows["w8a8"]["error"]
    assert rows["w8a8"]["sqnr_db"] == "-inf"
    monkeypatch.setattr(recipe, "_ceiling_ref", lambda measured, cons: (measured[0], "the default plan"))
    old = tmp_path / "old.onnx"
    rows_old = {m["name"]: m for m in compile_model(model, old, opts).report["recipe"]["candidates"]}
    assert not rows_old["w8a8"].get("error")
    assert rows_old["w8a8"]["sqnr_db"] < rows_old["per-token-matmul"]["sqnr_db"] - recipe.CEILING_MARGIN_DB
    assert old.read_bytes() == out.read_bytes()


def test_under_a_constraint_the_ceiling_is_held_to_the_default_plan(tmp_path: Path) -> None:
    """--optimize size: a less accurate candidate may win, so a GPTQ candidate is skipped only below the default
    plan (here it is not: w8a8 is compiled and measured)."""
    model = _model(tmp_path / "mm.onnx")
    np.savez(tmp_path / "calib.npz", x=_token_scaled(1, 64))
    res = compile_model(model, tmp_path / "q.onnx", CompileOptions(calib=str(tmp_path / "calib.npz"),
                                                                   validate=False, optimize="size"))
    rows = {m["name"]: m for m in res.report["recipe"]["candidates"]}
    assert "best so far" not in rows["w8a8"].get("error", "")
    assert isinstance(rows["w8a8"]["sqnr_db"], float)
