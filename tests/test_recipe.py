"""The measured default (``compile --plan auto``) and the presets' algorithm guard (``algorithms: {guard: measure}``),
measured on the fixtures: onnxruntime on the compiled files is the oracle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _graphs import Builder, vi
from click.testing import CliRunner, Result

from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli import cli

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
PRESETS = ROOT / "qcompiler" / "plan" / "presets"


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def fixture(name: str) -> tuple[Path, Path]:
    return MODELS / f"{name}.onnx", MODELS / f"{name}.npz"


def digest(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def held_sqnr(model: Path, quant: Path, npz: Path) -> float:
    """Worst graph output SQNR (dB) of ``quant`` against ``model`` over the held-back samples (min(16, N / 4) of
    ``npz``, every (N // h)-th), computed here with onnxruntime."""
    data = dict(np.load(npz))
    n = len(next(iter(data.values())))
    h = min(16, n // 4)
    step = n // h
    fs, qs = ort.InferenceSession(str(model)), ort.InferenceSession(str(quant))
    names = [o.name for o in fs.get_outputs()]
    sig = np.zeros(len(names))
    err = np.zeros(len(names))
    for i in range(step - 1, h * step, step):
        feed = {k: v[i] for k, v in data.items()}
        for j, (f, q) in enumerate(zip(fs.run(names, feed), qs.run(names, feed), strict=True)):
            sig[j] += float(np.sum(np.square(f.astype(np.float64))))
            err[j] += float(np.sum(np.square(f.astype(np.float64) - q.astype(np.float64))))
    return float(min(10 * np.log10(s / e) if e > 0 else np.inf for s, e in zip(sig, err, strict=True)))


@pytest.mark.parametrize("name", ["gemm_head", "conv_bn_relu", "transformer_block"])
def test_measured_default_never_below_default_plan(tmp_path: Path, name: str) -> None:
    model, npz = fixture(name)
    before = digest(model, npz)
    auto, plain = tmp_path / "auto.onnx", tmp_path / "plain.onnx"
    r = run("compile", model, "-o", auto, "--plan", "auto", "--calib", npz, "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert run("compile", model, "-o", plain, "--plan", "default", "--calib", npz, "-q").exit_code == 0
    assert held_sqnr(model, auto, npz) >= held_sqnr(model, plain, npz) - 1e-6
    assert digest(model, npz) == before
    rep = json.loads((tmp_path / "r.json").read_text())["recipe"]
    assert rep["mode"] == "auto" and rep["held_samples"] == 8
    assert rep["candidates"][0]["name"] == "default"
    assert len(rep["candidates"]) <= 5  # --effort low, the default
    assert rep["winner"] in {c["name"] for c in rep["candidates"]}
    assert "measured default:" in r.output and rep["winner"] in r.output


def test_recipe_out_reproduces_byte_for_byte_and_is_deterministic(tmp_path: Path) -> None:
    model, npz = fixture("conv_bn_relu")
    _twice_then_pinned(tmp_path, model, npz, "--plan", "auto")


def _twice_then_pinned(tmp_path: Path, model: Path, npz: Path, *args: str) -> Path:
    """Compile twice with ``args`` and ``--recipe-out``: the same bytes and the same recipe both times, and the
    recipe given back as ``--plan`` reproduces the model byte for byte. Returns the first model."""
    outs = []
    for k in range(2):
        out, recipe = tmp_path / f"a{k}.onnx", tmp_path / f"recipe{k}.yaml"
        r = run("compile", model, "-o", out, *args, "--calib", npz, "--recipe-out", recipe, "-q")
        assert r.exit_code == 0, r.output
        outs.append((out, recipe))
    assert digest(outs[0][0]) == digest(outs[1][0])  # same inputs, same bytes
    assert outs[0][1].read_text() == outs[1][1].read_text()
    again = tmp_path / "again.onnx"
    assert run("compile", model, "-o", again, "--plan", outs[0][1], "--calib", npz, "-q").exit_code == 0
    assert digest(again) == digest(outs[0][0])  # --recipe-out pins the choice
    return outs[0][0]


def test_max_latency_ratio_is_honoured(tmp_path: Path) -> None:
    model, npz = fixture("gemm_head")
    out = tmp_path / "q.onnx"
    r = run("compile", model, "-o", out, "--plan", "auto", "--effort", "low", "--calib", npz,
            "--max-latency-ratio", "0.0001")
    assert r.exit_code == 2
    assert "error: the measured default: no candidate meets latency <= 0.0001x float" in r.output
    assert "Traceback" not in r.output and not out.exists()
    res = compile_model(model, out, CompileOptions(plan="auto", calib=str(npz), effort="low",
                                                   max_latency_ratio=1000.0))
    rec = res.report["recipe"]
    winner = next(c for c in rec["candidates"] if c["name"] == rec["winner"])
    assert winner["latency_ratio"] <= 1000.0
    assert "latency <= 1000.0x float" in rec["constraints"]


@pytest.mark.parametrize("ratio", ["0", "-1", "nan", "inf"])
def test_max_latency_ratio_not_positive_is_refused_before_any_work(tmp_path: Path, ratio: str) -> None:
    # the same one-line check as `plan --max-latency-ratio`, before a candidate is compiled
    model, npz = fixture("gemm_head")
    out = tmp_path / "q.onnx"
    before = digest(model, npz)
    r = run("compile", model, "-o", out, "--calib", npz, "--max-latency-ratio", ratio)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1].startswith(f"error: --max-latency-ratio: {float(ratio):g} is not a "
                                                        "positive number")
    assert "Traceback" not in r.output and not out.exists() and list(tmp_path.iterdir()) == []
    assert digest(model, npz) == before


def test_budget_and_optimize_size(tmp_path: Path) -> None:
    model, npz = fixture("conv_bn_relu")
    res = compile_model(model, tmp_path / "s.onnx", CompileOptions(plan="auto", calib=str(npz), optimize="size"))
    rec = res.report["recipe"]
    cands = rec["candidates"]
    floor = cands[0]["sqnr_db"]
    fit = [c for c in cands if "error" not in c and c["sqnr_db"] >= floor]
    winner = next(c for c in cands if c["name"] == rec["winner"])
    assert winner["bytes"] == min(c["bytes"] for c in fit)  # the smallest within the accuracy floor
    assert res.report["cost"]["total_bytes"] <= max(c["bytes"] for c in cands)
    # a byte budget below the default plan's bytes: only smaller candidates (at or above the default's SQNR) fit
    limit = winner["bytes"]
    res2 = compile_model(model, tmp_path / "b.onnx", CompileOptions(plan="auto", calib=str(npz), budget=str(limit)))
    rec2 = res2.report["recipe"]
    won = next(c for c in rec2["candidates"] if c["name"] == rec2["winner"])
    assert won["bytes"] <= limit and res2.report["cost"]["total_bytes"] <= limit
    r = run("compile", model, "-o", tmp_path / "x.onnx", "--plan", "auto", "--calib", npz, "--budget", "100")
    assert r.exit_code == 2 and "bytes > 100" in r.output and not (tmp_path / "x.onnx").exists()


METRIC = '''
import json, pathlib
import numpy as np

CALLS = pathlib.Path(__file__).with_suffix(".calls")


def neg_mae(quantized, reference, feeds):
    with CALLS.open("a") as f:
        f.write(json.dumps([len(quantized), len(reference), len(feeds)]) + "\\n")
    return -float(np.mean([np.mean(np.abs(q[k] - r[k])) for q, r in zip(quantized, reference) for k in r]))
'''


def test_task_metric_is_called_and_max_drop_enforced(tmp_path: Path) -> None:
    model, npz = fixture("gemm_head")
    mod = tmp_path / "mymetric.py"
    mod.write_text(METRIC)
    report = tmp_path / "r.json"
    r = run("compile", model, "-o", tmp_path / "q.onnx", "--plan", "auto", "--effort", "low", "--calib", npz,
            "--metric", f"{mod}:neg_mae", "--max-drop", "10", "--report", report)
    assert r.exit_code == 0, r.output
    calls = [json.loads(line) for line in mod.with_suffix(".calls").read_text().splitlines()]
    rec = json.loads(report.read_text())["recipe"]
    assert len(calls) >= len(rec["candidates"]) + 1  # the float reference, then every candidate
    assert all(c == [8, 8, 8] for c in calls)  # the 8 held-back samples
    assert all(isinstance(c["metric"], float) and c["metric"] <= 0 for c in rec["candidates"])
    winner = next(c for c in rec["candidates"] if c["name"] == rec["winner"])
    # the winner has the best task metric among the candidates no constraint ruled out (no latency constraint:
    # latency is not measured, nothing timed decides)
    assert rec["latency_measured"] is False and all(c["latency_ratio"] == "inf" for c in rec["candidates"])
    eligible = [c for c in rec["candidates"]
                if not c.get("error") and not any("below the default" in n for n in c.get("notes", []))]
    assert winner in eligible
    assert winner["metric"] == max(c["metric"] for c in eligible)
    r = run("compile", model, "-o", tmp_path / "z.onnx", "--plan", "auto", "--effort", "low", "--calib", npz,
            "--metric", f"{mod}:neg_mae", "--max-drop", "0")
    assert r.exit_code == 2 and "metric drop" in r.output and not (tmp_path / "z.onnx").exists()
    r = run("compile", model, "-o", tmp_path / "z.onnx", "--plan", "auto", "--calib", npz,
            "--metric", f"{mod}:nope")
    assert r.exit_code == 2 and "has no function 'nope'" in r.output
    mod.write_text(METRIC + "\n\ndef broken(quantized, reference, feeds):\n    return quantized - reference\n")
    r = run("compile", model, "-o", tmp_path / "z.onnx", "--plan", "auto", "--calib", npz,
            "--metric", f"{mod}:broken")
    assert r.exit_code == 2 and "--metric: broken raised TypeError" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "z.onnx").exists()


#: the w4a8 preset's recipe: on the gemm_head fixture, measured on the held-back samples (every 4th), its bias
#: correction (after GPTQ with act_order on percentile ranges) measures worse than without it (11.04 vs 11.17 dB)
RIGGED = """version: 1
defaults:
  weight: {dtype: int4, granularity: per_channel, symmetric: false, range: mse}
  activation: {dtype: uint8, granularity: per_tensor, symmetric: false, calibration: percentile, percentile: 99.99}
rules:
  - match: {op_type: [MatMul, Gemm]}
    weight: {dtype: int4, granularity: block, block_size: 32, range: minmax}
algorithms:
  %s
  fold_bias: true
  gptq: {block_size: 128, damp: 0.01, act_order: true}
  bias_correct: true
"""


def test_guard_drops_an_algorithm_that_hurts(tmp_path: Path) -> None:
    model, npz = fixture("gemm_head")
    rigged = tmp_path / "rigged.yaml"
    rigged.write_text(RIGGED % "guard: measure")
    out, report = tmp_path / "g.onnx", tmp_path / "g.json"
    r = run("compile", model, "-o", out, "--plan", rigged, "--calib", npz, "--report", report)
    assert r.exit_code == 0, r.output
    assert "algorithm guard: dropped bias_correct (measured worse than without)" in r.output
    rec = json.loads(report.read_text())["recipe"]
    assert rec["mode"] == "guard" and rec["dropped"] == ["bias_correct"]
    names = {c["name"]: c for c in rec["candidates"]}
    assert names["without-bias_correct"]["sqnr_db"] > names["as-written"]["sqnr_db"] + 0.05
    # the others measured no better than as written (GPTQ helps here: without it, lower): kept
    assert all(names[f"without-{n}"]["sqnr_db"] <= names["as-written"]["sqnr_db"] + 0.05
               for n in ("gptq", "fold_bias", "percentile"))
    assert names["without-gptq"]["sqnr_db"] < names["as-written"]["sqnr_db"]
    # what was compiled is the plan without bias correction
    plain = tmp_path / "nobc.yaml"
    plain.write_text((RIGGED % "").replace("  bias_correct: true\n", ""))
    ref = tmp_path / "ref.onnx"
    assert run("compile", model, "-o", ref, "--plan", plain, "--calib", npz, "-q").exit_code == 0
    assert digest(out) == digest(ref)
    # without the guard the user's plan keeps its exact behaviour
    unguarded = tmp_path / "unguarded.yaml"
    unguarded.write_text(RIGGED % "")
    r = run("compile", model, "-o", tmp_path / "u.onnx", "--plan", unguarded, "--calib", npz, "--report",
            tmp_path / "u.json")
    assert r.exit_code == 0 and "recipe" not in json.loads((tmp_path / "u.json").read_text())
    assert "gptq" in json.loads((tmp_path / "u.json").read_text())["pipeline"]


def test_guarded_preset_keeps_its_bytes_when_nothing_is_dropped(tmp_path: Path) -> None:
    model, npz = fixture("gemm_head")
    out, report = tmp_path / "p.onnx", tmp_path / "p.json"
    assert run("compile", model, "-o", out, "--preset", "w8a8", "--calib", npz, "--report", report).exit_code == 0
    rec = json.loads(report.read_text())["recipe"]
    assert rec["dropped"] == []
    names = {c["name"]: c for c in rec["candidates"]}
    assert names["as-written"]["sqnr_db"] >= names["default-plan"]["sqnr_db"] - 0.5  # the preset floor
    text = (PRESETS / "w8a8.yaml").read_text()
    copy = tmp_path / "w8a8-unguarded.yaml"
    copy.write_text("\n".join(line for line in text.splitlines() if "guard: measure" not in line) + "\n")
    ref = tmp_path / "ref.onnx"
    assert run("compile", model, "-o", ref, "--plan", copy, "--calib", npz, "-q").exit_code == 0
    assert digest(out) == digest(ref)


def test_guard_skips_percentile_when_nothing_is_calibrated(tmp_path: Path) -> None:
    """One Conv whose output only float ops read: w8a8 (float-read Conv outputs not requantized) keeps every
    activation float, so percentile clipping changes nothing and is not measured. Oracle: the preset as written
    and the same plan with minmax ranges write the same model, byte for byte."""
    b = Builder(21)
    b.node("Conv", ["x", b.init("w", b.randn(8, 3, 3, 3)), b.init("b", b.randn(8))], ["c"], name="conv", pads=[1] * 4)
    b.node("Relu", ["c"], ["y"], name="relu")
    src = tmp_path / "conv.onnx"
    onnx.save(b.model([vi("x", [1, 3, 16, 16])], [vi("y", [1, 8, 16, 16])]), src)
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 1, 3, 16, 16)).astype(np.float32))
    out, report = tmp_path / "g.onnx", tmp_path / "g.json"
    r = run("compile", src, "-o", out, "--preset", "w8a8", "--calib", tmp_path / "calib.npz", "--report", report)
    assert r.exit_code == 0, r.output
    names = {c["name"]: c for c in json.loads(report.read_text())["recipe"]["candidates"]}
    assert "not measured: the plan as written calibrates no activation statically" in \
        names["without-percentile"]["error"]
    assert "error" not in names["without-gptq"] and "error" not in names["as-written"]
    text = (PRESETS / "w8a8.yaml").read_text()
    minmax = tmp_path / "minmax.yaml"
    minmax.write_text("\n".join(line for line in text.splitlines() if "guard: measure" not in line)
                      .replace("calibration: percentile, percentile: 99.99", "calibration: minmax") + "\n")
    assert "calibration: minmax" in minmax.read_text()
    written = tmp_path / "written.yaml"
    written.write_text("\n".join(line for line in text.splitlines() if "guard: measure" not in line) + "\n")
    for plan, dest in ((minmax, tmp_path / "m.onnx"), (written, tmp_path / "w.onnx")):
        assert run("compile", src, "-o", dest, "--plan", plan, "--calib", tmp_path / "calib.npz", "-q").exit_code == 0
    assert digest(tmp_path / "m.onnx") == digest(tmp_path / "w.onnx") == digest(out)


def test_user_errors(tmp_path: Path) -> None:
    model, npz = fixture("gemm_head")
    out = tmp_path / "q.onnx"
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nalgorithms: {guard: sometimes}\n")
    cases = [
        (["--plan", bad, "--calib", npz], f"error: {bad}: algorithms.guard: expected one of off, measure"),
        (["--plan", "auto"], "error: --plan auto measures its candidates on real data"),
        (["--plan", "auto", "--calib", "random"], "error: --plan auto measures its candidates on real data"),
        (["--plan", "default", "--calib", npz, "--recipe-out", tmp_path / "r.yaml"],
         "error: --recipe-out: an option of the measured default (no --plan, or --plan auto), not of --plan default"),
        (["--preset", "w8a8", "--calib", npz, "--effort", "high", "--optimize", "size"],
         "error: --optimize, --effort: options of the measured default (no --plan, or --plan auto), not of --plan "
         "w8a8"),
        (["--calib", npz, "--budget", "50%", "--metric", "m:f"],
         "error: --metric module:function: an option of the measured default, not of --budget"),
        (["--calib", "random", "--effort", "high"],
         "error: --effort: an option of the measured default, which needs real calibration data of at least 4"),
        (["--effort", "normal"],
         "error: --effort: an option of the measured default, which needs real calibration data of at least 4"),
        (["--plan", "auto", "--calib", npz, "--max-drop", "1"], "error: --max-drop needs a task metric"),
    ]
    before = digest(model, npz)
    for args, msg in cases:
        r = run("compile", model, "-o", out, *args)
        assert r.exit_code == 2, (args, r.output)
        assert msg in r.output, (args, r.output)
        assert "Traceback" not in r.output and not out.exists()
    assert digest(model, npz) == before


# ------------------------------------------------------------------------- the measured default is the default
def test_no_plan_with_real_calibration_runs_the_measured_default(tmp_path: Path) -> None:
    model, npz = fixture("conv_bn_relu")
    before = digest(model, npz)
    out, plain, report = tmp_path / "q.onnx", tmp_path / "plain.onnx", tmp_path / "r.json"
    r = run("compile", model, "-o", out, "--calib", npz, "--report", report)
    assert r.exit_code == 0, r.output
    rec = json.loads(report.read_text())["recipe"]
    assert rec["mode"] == "auto" and rec["held_samples"] == 8
    names = [c["name"] for c in rec["candidates"]]
    # --effort low: the default plan, w8a8, range-auto, dynamic-matmul (the fixture has a Gemm); no weights-only
    assert names[:4] == ["default", "w8a8", "range-auto", "dynamic-matmul"] and len(names) <= 5
    assert "weights-only" not in names and "w8a8-dynamic" not in names
    assert rec["latency_measured"] is False and all(c["latency_ratio"] == "inf" for c in rec["candidates"])
    won = next(c for c in rec["candidates"] if c["name"] == rec["winner"])
    assert won["sqnr_db"] >= rec["candidates"][0]["sqnr_db"]
    # the summary line: winner, held-back SQNR against the plain default plan, candidates, how to skip it
    line = next(ln for ln in r.output.splitlines() if ln.startswith("measured default: '"))
    assert f"'{rec['winner']}' chosen, held-back SQNR {won['sqnr_db']:.2f} dB vs " \
           f"{rec['candidates'][0]['sqnr_db']:.2f} dB for the plain default plan" in line
    assert f"({len(names)} candidate(s) on 8 held-back sample(s); --plan default skips it)" in line
    assert "validation over 32 sample(s)" in r.output  # the validation summary stays
    # oracle: onnxruntime on both compiled files, on the held-back samples
    assert run("compile", model, "-o", plain, "--plan", "default", "--calib", npz, "-q").exit_code == 0
    assert held_sqnr(model, out, npz) >= held_sqnr(model, plain, npz) - 1e-6
    assert digest(model, npz) == before
    # the API has the same default
    api = tmp_path / "api.onnx"
    res = compile_model(model, api, CompileOptions(calib=str(npz)))
    assert res.report["recipe"]["winner"] == rec["winner"] and digest(api) == digest(out)


def _plain_plan_file(tmp_path: Path) -> Path:
    """``qcompiler plan show default`` written to a file: the plain default plan (``Plan.default()``) as YAML."""
    import yaml

    from qcompiler.plan import Plan

    shown = run("plan", "show", "default")
    assert shown.exit_code == 0 and yaml.safe_load(shown.stdout) == Plan.default().to_dict()
    path = tmp_path / "plain.yaml"
    path.write_text(shown.stdout)
    return path


@pytest.mark.parametrize("name", ["conv_bn_relu", "transformer_block"])
def test_plan_default_is_the_plain_default_plan_byte_for_byte(tmp_path: Path, name: str) -> None:
    model, npz = fixture(name)
    a, b, c = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "c.onnx"
    r = run("compile", model, "-o", a, "--plan", "default", "--calib", npz, "--report", tmp_path / "a.json")
    assert r.exit_code == 0, r.output
    assert "recipe" not in json.loads((tmp_path / "a.json").read_text())
    assert "measured default" not in r.output
    assert run("compile", model, "-o", b, "--plan", _plain_plan_file(tmp_path), "--calib", npz, "-q").exit_code == 0
    compile_model(model, c, CompileOptions(plan="default", calib=str(npz)))
    assert digest(a) == digest(b) == digest(c)
    # the resolved-plan side file names the plan's source: the same as a compile with no plan and no data said
    assert (tmp_path / "a.plan.yaml").read_bytes() == (tmp_path / "c.plan.yaml").read_bytes()
    assert "plan: <default plan>" in (tmp_path / "a.plan.yaml").read_text()


def test_no_plan_without_real_data_is_the_plain_default_plan(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    model, npz = fixture("gemm_head")
    data = dict(np.load(npz))
    three = tmp_path / "three.npz"
    np.savez(three, **{k: v[:3] for k, v in data.items()})
    cases = [("random", {}, "--calib random: no real samples to measure candidates on"),
             (str(three), {}, "three.npz: 3 calibration sample(s); the measured default needs at least 4"),
             (str(npz), {"calib_samples": 3}, "gemm_head.npz: 3 calibration sample(s)"),
             (str(npz), {"pipeline": "cleanup,fold-batchnorm,resolve-plan,calibrate,insert-qdq,lower"},
              "--pipeline given")]
    for i, (calib, extra, why) in enumerate(cases):
        out, ref = tmp_path / f"n{i}.onnx", tmp_path / f"d{i}.onnx"
        caplog.clear()
        with caplog.at_level("INFO", logger="qcompiler"):
            res = compile_model(model, out, CompileOptions(calib=calib, **extra))  # type: ignore[arg-type]
        infos = [rec.getMessage() for rec in caplog.records if "no plan given" in rec.getMessage()]
        assert len(infos) == 1 and why in infos[0], infos
        assert "recipe" not in res.report
        compile_model(model, ref, CompileOptions(plan="default", calib=calib, **extra))  # type: ignore[arg-type]
        assert digest(out) == digest(ref)
    # no data at all: the plain default plan, which needs data for its static activation ranges (as before)
    r = run("compile", model, "-o", tmp_path / "x.onnx")
    assert r.exit_code == 2 and "no calibration data was given" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_measured_default_is_deterministic_and_never_times(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qcompiler.recipe as recipe_pkg

    def no_timing(*_a: object, **_k: object) -> object:
        raise AssertionError("latency measured without a latency constraint")

    monkeypatch.setattr(recipe_pkg, "run_timed", no_timing)
    model, npz = fixture("transformer_block")
    first = _twice_then_pinned(tmp_path, model, npz)
    # --plan auto is the same default by name
    alias = tmp_path / "alias.onnx"
    assert run("compile", model, "-o", alias, "--plan", "auto", "--calib", npz, "-q").exit_code == 0
    assert digest(alias) == digest(first)


def test_weights_only_needs_a_speed_or_size_question() -> None:
    from qcompiler.plan import Plan
    from qcompiler.recipe.candidates import effort_cap, recipe_candidates

    plain = [c.name for c in recipe_candidates(Plan.default(), {"Conv", "Gemm"})]
    assert "weights-only" not in plain and "w8a8-dynamic" not in plain
    offered = [c.name for c in recipe_candidates(Plan.default(), {"Conv", "Gemm"}, float_activations=True)]
    assert offered[:5] == ["default", "w8a8", "range-auto", "dynamic-matmul", "weights-only"]
    assert offered[-1] == "w8a8-dynamic"
    assert effort_cap("low", False) == 4 and effort_cap("low", True) == 5 and effort_cap("low", True, True) == 6
    assert effort_cap("normal", True, True) == 8 and effort_cap("high", True) is None


def test_effort_high_and_size_offer_weights_only(tmp_path: Path) -> None:
    model, npz = fixture("gemm_head")
    res = compile_model(model, tmp_path / "s.onnx", CompileOptions(calib=str(npz), optimize="size"))
    names = [c["name"] for c in res.report["recipe"]["candidates"]]
    assert "weights-only" in names and res.report["recipe"]["latency_measured"] is False
