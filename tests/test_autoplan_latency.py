"""`qcompiler plan --max-latency-ratio R` (PlanOptions.max_latency_ratio): every plan the planner could return is
timed against the float model on the held-back samples (onnxruntime, one thread, best of 3: the measured default's
timing, :mod:`qcompiler.report.latency`), one over R is never the base nor returned, and without the option nothing
is timed and the plan is what it was."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qcompiler import autoplan
from qcompiler.autoplan import Budget
from qcompiler.autoplan import latency as plan_latency
from qcompiler.cli import cli
from qcompiler.core.errors import UserError
from qcompiler.recipe import measure as recipe_measure
from qcompiler.report import latency as report_latency

MODELS = Path(__file__).resolve().parents[1] / "models"
CONV = MODELS / "conv_bn_relu.onnx"
CONV_DATA = MODELS / "conv_bn_relu.npz"
#: conv_bn_relu at 9000 bytes: only w4a8 (8299 B) and w4a8-fp8 (8530 B) fit; at 13000 the int8 presets fit too
TIGHT, WIDE = "9000", "13000"


def _plan(budget: str, ratio: float | None = None) -> autoplan.AutoPlanResult:
    return autoplan.auto_plan(CONV, CONV_DATA, autoplan.PlanOptions(
        budget=Budget.parse(budget), default_candidates=True, max_latency_ratio=ratio))


def _without_latency(text: str) -> str:
    """A plan's text less what timing adds: the ``, latency 1.23x float`` parts and the limit's header line."""
    lines = [re.sub(r", latency [0-9.]+x float", "", line) for line in text.splitlines()]
    return "\n".join(line for line in lines if not line.startswith("# max latency ratio:"))


def test_the_planner_and_the_measured_default_share_one_timing():
    assert recipe_measure.run_timed is report_latency.run_timed
    assert plan_latency.run_timed is report_latency.run_timed


def test_without_the_option_nothing_is_timed_and_a_huge_ratio_changes_no_rule(monkeypatch):
    """No --max-latency-ratio: the timer is never called (it raises here) and nothing about latency is written.
    R = 1e9: every plan is timed, none refused, and the plan is the same one — the same rules, the same text but
    for the latency figures and the limit's line."""
    def never(*a, **k):
        raise AssertionError("timed without --max-latency-ratio")

    monkeypatch.setattr(plan_latency, "run_timed", never)
    plain = _plan(TIGHT)
    assert "latency" not in plain.text
    assert "latency" not in plain.baseline and "latency_ratio" not in plain.measured
    assert not any("latency_ratio" in r for r in [*plain.baseline["presets"], *plain.baseline["searches"]])
    monkeypatch.undo()

    timed = _plan(TIGHT, 1e9)
    lat = timed.baseline["latency"]
    assert lat["max_ratio"] == 1e9 and lat["not_eligible"] == [] and lat["float_seconds"] > 0
    # every preset measured for real, every variant and every distinct mix was timed
    measured_rows = [r for r in timed.baseline["presets"] if "sqnr_db" in r]
    assert measured_rows and all(r["latency_ratio"] > 0 for r in measured_rows)
    assert all("latency_ratio" in r for r in timed.baseline["searches"] if "bytes" in r)
    assert len(lat["timed"]) >= len(measured_rows) + 1
    assert timed.measured["latency_ratio"] > 0
    assert f"latency {timed.measured['latency_ratio']:.2f}x float" in timed.text
    assert "# max latency ratio: 1e+09x float" in timed.text
    assert timed.plan.to_dict() == plain.plan.to_dict()
    assert _without_latency(timed.text) == _without_latency(plain.text) == plain.text.rstrip("\n")


def test_a_preset_over_the_ratio_is_not_the_base(monkeypatch):
    """The rule, with the timer replaced by fixed seconds (the float model 1 s, `--preset w4a8`'s compile 2.44 s,
    every other plan 1 s): at R = 1.5, w4a8 — the base without the limit — is not eligible, reported as
    "w4a8: 2.44x float > 1.5", and the base is another preset within the limit."""
    def fake(model, feeds, repeats=report_latency.LATENCY_REPEATS):
        return [], 2.44 if Path(model).name == "preset-w4a8.onnx" else 1.0

    free = _plan(TIGHT)
    assert free.baseline["preset"] == "w4a8"
    monkeypatch.setattr(plan_latency, "run_timed", fake)
    res = _plan(TIGHT, 1.5)
    row = next(r for r in res.baseline["presets"] if r["name"] == "w4a8")
    assert row["latency_ratio"] == pytest.approx(2.44) and row["over_latency"] is True
    assert res.baseline["latency"]["not_eligible"] == ["w4a8: 2.44x float > 1.5"]
    assert res.baseline["name"] != "w4a8" and res.baseline["latency_ratio"] == pytest.approx(1.0)
    assert "not eligible: w4a8: 2.44x float > 1.5" in res.text
    assert res.measured["latency_ratio"] <= 1.5


def test_measured_a_ratio_between_presets_leaves_the_slower_ones_out(monkeypatch):
    """Real timings, no number written in the test: conv_bn_relu at 13000 bytes, timed once with no real limit;
    R is then put halfway (geometrically) between the base preset's ratio and the fastest fitting preset's. Run
    again under R with each file's first timing replayed (by the file's bytes: the same plan compiles to the same
    file; a plan the first run did not time is timed for real), the plan returned and its base run within R,
    every plan measured over R is marked and listed, and a plan measuring better than the base was left out for
    its latency. (Timed afresh, noise between the two runs moved every plan over R once in CI, session 18.)"""
    seen: dict[str, float] = {}
    real = plan_latency.run_timed

    def recorded(model, feeds, repeats=report_latency.LATENCY_REPEATS):
        outs, secs = real(model, feeds, repeats)
        seen.setdefault(hashlib.sha256(Path(model).read_bytes()).hexdigest(), secs)
        return outs, secs

    monkeypatch.setattr(plan_latency, "run_timed", recorded)
    free = _plan(WIDE, 1e9)
    fitting = [r for r in free.baseline["presets"] if r.get("fits") and "latency_ratio" in r]
    fastest = min(r["latency_ratio"] for r in fitting)
    slow = free.baseline["latency_ratio"]
    assert slow > 1.2 * fastest, f"the base ({free.baseline['name']}) is not slower than the fastest preset"
    limit = math.sqrt(slow * fastest)

    def replayed(model, feeds, repeats=report_latency.LATENCY_REPEATS):
        secs = seen.get(hashlib.sha256(Path(model).read_bytes()).hexdigest())
        return ([], secs) if secs is not None else real(model, feeds, repeats)

    monkeypatch.setattr(plan_latency, "run_timed", replayed)
    res = _plan(WIDE, limit)
    lat = res.baseline["latency"]
    assert res.baseline["latency_ratio"] <= limit
    assert res.measured["latency_ratio"] <= limit
    for r in [*res.baseline["presets"], *res.baseline["searches"]]:
        if "latency_ratio" in r:
            assert bool(r.get("over_latency")) == (r["latency_ratio"] > limit), r
    assert all(re.fullmatch(r".+: [0-9.]+x float > [0-9.e+-]+", w) for w in lat["not_eligible"])
    assert sum(ratio > limit for ratio in lat["timed"].values()) == len(lat["not_eligible"])
    # the free run's base, timed over R, is left out although it measures better than the base returned
    better = [r for r in res.baseline["presets"] if r.get("fits") and r["sqnr_db"] > res.baseline["sqnr_db"]]
    assert lat["not_eligible"] and any(r.get("over_latency") for r in better)
    assert res.baseline["name"] != free.baseline["name"]


def test_cli_nothing_within_the_ratio_is_exit_2_naming_the_fastest(tmp_path):
    """R below every plan (a thousandth of the float model's latency): exit 2, one line naming the fastest plan
    measured and its ratio (above R), no traceback, nothing written, the model and data unchanged."""
    out = tmp_path / "plan.yaml"
    before = CONV.read_bytes(), CONV_DATA.read_bytes()
    r = CliRunner().invoke(cli, ["plan", str(CONV), "--budget", WIDE, "--calib", str(CONV_DATA), "-o", str(out),
                                 "--max-latency-ratio", "0.001", "-q"])
    assert r.exit_code == 2, r.output
    line = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in r.output
    m = re.fullmatch(r"error: --max-latency-ratio 0\.001: no plan within it; the fastest measured, (.+), runs at "
                     r"([0-9.]+)x float \(onnxruntime, 1 thread, 8 held-back sample\(s\)\); (\d+) plan\(s\) timed",
                     line[0])
    assert m is not None, line[0]
    assert float(m.group(2)) > 0.001 and int(m.group(3)) > 1
    assert not out.exists()
    assert (CONV.read_bytes(), CONV_DATA.read_bytes()) == before


def test_compile_budget_plans_under_the_ratio_too(tmp_path):
    """`compile --budget B --max-latency-ratio R` hands R to the planner (as `plan` takes it): nothing within a
    thousandth of float is exit 2 with the planner's line, nothing written; a ratio no plan can exceed compiles
    the plan `plan --budget` returns without it (same bytes as the compile without the option)."""
    out = tmp_path / "q.onnx"
    before = CONV.read_bytes(), CONV_DATA.read_bytes()
    r = CliRunner().invoke(cli, ["compile", str(CONV), "-o", str(out), "--budget", WIDE, "--calib", str(CONV_DATA),
                                 "--max-latency-ratio", "0.001", "-q"])
    assert r.exit_code == 2, r.output
    assert re.search(r"^error: --max-latency-ratio 0\.001: no plan within it; the fastest measured, ", r.output, re.M)
    assert "Traceback" not in r.output and list(tmp_path.iterdir()) == []
    assert (CONV.read_bytes(), CONV_DATA.read_bytes()) == before
    outs = []
    for extra in ([], ["--max-latency-ratio", "1000"]):
        o = tmp_path / f"q{len(outs)}.onnx"
        r = CliRunner().invoke(cli, ["compile", str(CONV), "-o", str(o), "--budget", WIDE, "--calib", str(CONV_DATA),
                                     "--no-validate", "-q", *extra])
        assert r.exit_code == 0, r.output
        outs.append(o.read_bytes())
    assert outs[0] == outs[1]


def test_cli_prints_the_ratios_and_writes_them_in_the_header(tmp_path):
    out = tmp_path / "plan.yaml"
    r = CliRunner().invoke(cli, ["plan", str(CONV), "--budget", TIGHT, "--calib", str(CONV_DATA), "-o", str(out),
                                 "--max-latency-ratio", "1000"])
    assert r.exit_code == 0, r.output
    assert re.search(r"presets: .*w4a8 8299 B [0-9.]+ dB [0-9.]+x float", r.output)
    assert re.search(r"^measured: output SQNR .*, latency [0-9.]+x float", r.output, re.M)
    assert re.search(r"^latency: at most 1000x float .*; \d+ plan\(s\) timed$", r.output, re.M)
    text = out.read_text()
    assert re.search(r"^# max latency ratio: 1000x float", text, re.M)
    assert re.search(r"latency [0-9.]+x float", text)


@pytest.mark.parametrize("args, message", [
    (["--calib", "random"], "--max-latency-ratio: the plans are timed on held-back calibration samples"),
    (["--calib", str(CONV_DATA), "--holdout", "0"], "--max-latency-ratio: the plans are timed on held-back"),
])
def test_cli_the_ratio_needs_held_back_samples(args, message, tmp_path):
    r = CliRunner().invoke(cli, ["plan", str(CONV), "--budget", TIGHT, *args, "--max-latency-ratio", "1.5",
                                 "-o", str(tmp_path / "p.yaml")])
    assert r.exit_code == 2 and f"error: {message}" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "p.yaml").exists()


def test_a_ratio_that_is_no_positive_number_is_refused():
    r = CliRunner().invoke(cli, ["plan", str(CONV), "--budget", TIGHT, "--calib", str(CONV_DATA),
                                 "--max-latency-ratio", "0"])
    assert r.exit_code == 2 and "--max-latency-ratio" in r.output
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(UserError, match=r"--max-latency-ratio: .* is not a positive number"):
            _plan(TIGHT, bad)


def test_float_timing_is_the_best_of_three_passes(monkeypatch):
    """LatencyLimit times the float model once, with the shared timer's default repeats, on the held-back feeds."""
    calls: list[tuple[str, int, int]] = []

    def spy(model, feeds, repeats=report_latency.LATENCY_REPEATS):
        calls.append((Path(model).name, len(feeds), repeats))
        return [], 0.5

    monkeypatch.setattr(plan_latency, "run_timed", spy)
    feeds = [{"x": np.zeros(1, np.float32)}] * 3
    lim = plan_latency.LatencyLimit.start(CONV, feeds, 2.0)
    assert calls == [("conv_bn_relu.onnx", 3, 3)] and lim.float_seconds == 0.5
    assert lim.time(Path("a.onnx"), "a") == 1.0 and lim.eligible(1.0) and lim.refused == []
    # over the limit: timed once more, the lower of the two kept (load only adds time)
    seconds = iter([1.5, 0.75, 2.0, 1.6])
    monkeypatch.setattr(plan_latency, "run_timed", lambda m, f, repeats=3: ([], next(seconds)))
    assert lim.time(Path("b.onnx"), "b") == 1.5 and lim.eligible(1.5)
    assert lim.time(Path("c.onnx"), "c") == pytest.approx(3.2) and not lim.eligible(3.2)
    assert lim.refused == ["c: 3.20x float > 2"]
    assert "the fastest measured, a, runs at 1.00x float" in str(lim.nothing_eligible())
