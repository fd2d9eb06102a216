"""The ``qcompiler`` command line through click's test runner: compile (plans, calibration sources, report,
pipeline, validation gate), validate, inspect, passes, targets, plan resolve / show, and the user errors of the
issue's item 9 (exit 2, one line naming the culprit, no traceback, nothing written, inputs untouched), plus a
crashing plugin pass (exit 1, the pass name and a ``--debug`` hint).
"""

from __future__ import annotations

import gc
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner, Result

import qcompiler.cli as cli_mod
from qcompiler import ir, quant
from qcompiler.cli import cli
from qcompiler.core import registry as registry_mod
from qcompiler.runtime_targets import DEFAULT_PIPELINE

MODELS = Path(__file__).resolve().parent.parent / "models"
CONV = MODELS / "conv_bn_relu.onnx"
CONV_NPZ = MODELS / "conv_bn_relu.npz"


def run(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _fingerprint(*paths: Path) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths if p.is_file()}


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(calibration .npz: first 16 samples, held-back .npz: last 16) of the conv_bn_relu fixture."""
    d = tmp_path_factory.mktemp("cli_data")
    x = np.load(CONV_NPZ)["input"]
    np.savez(d / "calib.npz", input=x[:16])
    np.savez(d / "held.npz", input=x[16:])
    return d / "calib.npz", d / "held.npz"


@pytest.fixture(scope="module")
def compiled_default(tmp_path_factory: pytest.TempPathFactory, held_out: tuple[Path, Path]) -> tuple[Path, Result]:
    out = tmp_path_factory.mktemp("cli_compile") / "model.int8.onnx"
    res = run("compile", CONV, "-o", out, "--plan", "default", "--calib", held_out[0], "--report",
              out.with_suffix(".json"))
    return out, res


# -------------------------------------------------------------------------------------------------- compile
def test_compile_default_target_and_plan(compiled_default, held_out):
    out, res = compiled_default
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert f"compiled {CONV} -> {out}  (target ort, opset 17," in text
    assert f"pipeline: {DEFAULT_PIPELINE}" in text
    assert re.search(r"^insert-qdq\s+yes\s+[\d.]+\s+activations_uint8=6, bias_kept_float=1, biases_int32=5", text, re.M)
    assert re.search(r"^fold-batchnorm\s+yes\s+[\d.]+\s+folded_conv=5", text, re.M)
    assert "validation over 16 sample(s)" in text
    m = re.search(r"^\s*logits\s+([\d.]+)\s", text, re.M)
    assert m and float(m.group(1)) >= 27.0  # in-sample output SQNR, measured 30.1 dB
    for f in (out, out.with_name("model.int8.plan.yaml"), out.with_suffix(".json")):
        assert f"wrote {f}" in text and f.is_file()
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    # held-back data through `validate`
    # the gate holds the worst slice (here the worst class logit: measured 21.9 dB, the whole output 30.0 dB)
    res2 = run("validate", CONV, out, "--data", held_out[1], "--min-sqnr", 20)
    assert res2.exit_code == 0, res2.output
    assert re.search(r"^PASS: worst output SQNR (\d+\.\d+) dB, worst slice (\d+\.\d+) dB, threshold 20 dB$",
                     res2.stdout, re.M)
    res3 = run("validate", CONV, out, "--data", held_out[1], "--min-sqnr", 25, "--no-layers")
    assert res3.exit_code == 2 and re.fullmatch(r"error: output 'logits' \(slice \d of axis 1\) SQNR \d+\.\d\d dB is "
                                                r"below --min-sqnr 25\.0 dB\n", res3.stderr)


def test_compile_report_json(compiled_default):
    out, _ = compiled_default
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["input"] == str(CONV) and rep["output"] == str(out) and rep["target"] == "ort"
    assert rep["pipeline"] == DEFAULT_PIPELINE and rep["opset"] == 17
    assert [p["pass"] for p in rep["passes"]] == DEFAULT_PIPELINE.split(",")
    qdq = next(p for p in rep["passes"] if p["pass"] == "insert-qdq")
    assert qdq["modified"] is True and qdq["stats"]["weights_int8_per_channel"] == 6 and qdq["seconds"] > 0
    assert rep["calibration"]["synthetic"] is False and rep["calibration"]["samples"] == 16
    assert rep["calibration"]["tensors"] == 6 and rep["calibration"]["methods"] == {"minmax": 6}
    assert rep["plan"] == {"source": "<default plan>", "quantized_nodes": 6, "float_nodes": 8, "unmatched_rules": []}
    sizes = rep["sizes"]
    assert sizes["ratio"] <= 0.30 and sizes["quantized_parameter_bytes"] < 0.3 * sizes["float_parameter_bytes"]
    assert sizes["float_parameter_bytes"] == ir.model_summary(onnx.load(str(CONV)))["parameter_bytes"]
    v = rep["validation"]
    assert v["samples"] == 16 and v["passed"] is None and v["min_sqnr_db"] is None
    assert v["verdict"] == "no threshold set"
    assert [o["name"] for o in v["outputs"]] == ["logits"] and v["outputs"][0]["sqnr_db"] >= 27.0
    assert v["outputs"][0]["top1_agreement"] >= 0.9
    assert v["layers"] and v["layers"][0]["sqnr_db"] <= v["layers"][-1]["sqnr_db"]  # worst first
    assert 0 < rep["seconds"] < 60


def test_compile_gives_back_what_it_froze_out_of_the_collector(tmp_path, monkeypatch):
    frozen: list[int] = []
    real_compile = cli_mod.compile_model

    def spy(*args: Any, **kwargs: Any) -> Any:
        frozen.append(gc.get_freeze_count())
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(cli_mod, "compile_model", spy)
    before = gc.get_freeze_count()
    res = run("compile", CONV, "-o", tmp_path / "q.onnx", "--calib", CONV_NPZ, "--plan", "default", "--no-validate")
    assert res.exit_code == 0, res.output
    assert frozen and frozen[0] > before  # the compile ran with the imports frozen ...
    assert gc.get_freeze_count() == before  # ... and they are collectable again after it


def test_compile_calib_folder(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    x = np.load(CONV_NPZ)["input"]
    for i in range(5):
        np.savez(folder / f"{i:03d}.npz", input=x[i])
    (folder / "README.txt").write_text("ignored")
    out = tmp_path / "q.onnx"
    res = run("compile", CONV, "-o", out, "--calib", folder, "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["calibration"]["samples"] == 5 and rep["calibration"]["synthetic"] is False
    assert str(folder) in rep["calibration"]["source"]
    assert rep["validation"]["samples"] == 5


def test_compile_no_validate_says_why_validation_was_skipped(tmp_path):
    # with real data, --no-validate is the reason, not a lack of calibration data
    out = tmp_path / "q.onnx"
    res = run("compile", CONV, "-o", out, "--calib", CONV_NPZ, "--plan", "default", "--no-validate",
              "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "validation: skipped (--no-validate)" in res.stdout
    assert "no calibration data" not in res.stdout
    assert "validation" not in json.loads((tmp_path / "r.json").read_text())


def test_compile_calib_random_says_synthetic(tmp_path):
    out = tmp_path / "q.onnx"
    res = run("compile", CONV, "-o", out, "--calib", "random", "--calib-samples", 4, "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "[SYNTHETIC ranges: give --calib DATA for real ones]" in res.stdout
    assert "validation: skipped (no calibration data" in res.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["calibration"]["synthetic"] is True and rep["calibration"]["samples"] == 4
    assert "validation" not in rep
    # the file is a valid quantized model all the same
    q = onnx.load(str(out))
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) == 6  # the depthwise conv computes in float on ort


def test_compile_pipeline_and_plan_preset(tmp_path, held_out):
    out = tmp_path / "q.onnx"
    res = run("compile", CONV, "-o", out, "--calib", held_out[0], "--plan", "w8a8-percentile", "--pipeline",
              "cleanup,resolve-plan,calibrate{method=percentile,percentile=99.9},insert-qdq", "--verify-each",
              "--dump-after", "insert-qdq", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["pipeline"] == "cleanup,resolve-plan,calibrate{method=percentile,percentile=99.9},insert-qdq"
    # unfolded BN sits between each Conv and its ReLU: the 4 non-depthwise Conv outputs are quantized
    # themselves (5 + 4; the depthwise conv computes in float on ort)
    assert rep["calibration"]["methods"] == {"percentile": 9}
    q = onnx.load(str(out))
    assert sum(n.op_type == "BatchNormalization" for n in q.graph.node) == 5  # no fold-batchnorm in the pipeline
    assert (tmp_path / "q.dump" / "04-insert-qdq.onnx").is_file()
    assert rep["validation"]["outputs"][0]["sqnr_db"] >= 20.0


def test_compile_min_sqnr_pass_and_fail(tmp_path, held_out):
    ok = tmp_path / "ok" / "q.onnx"
    res = run("compile", CONV, "-o", ok, "--calib", held_out[0], "--min-sqnr", 20, "-q")
    assert res.exit_code == 0 and res.stdout == ""
    assert ok.is_file()
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    res = run("compile", CONV, "-o", bad_dir / "q.onnx", "--calib", held_out[0], "--min-sqnr", 60)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    rejected = bad_dir / "q.rejected.report.json"
    assert re.fullmatch(r"error: validation: output 'logits' \(slice \d of axis 1\) SQNR \d+\.\d\d dB is below "
                        r"--min-sqnr 60\.0 dB; no model written, "
                        r"the validation report is in " + re.escape(str(rejected)), lines[0])
    assert list(bad_dir.iterdir()) == [rejected]


def test_compile_help_has_examples():
    res = run("compile", "--help")
    assert res.exit_code == 0
    assert "Examples:" in res.stdout and "qcompiler compile models/conv_bn_relu.onnx" in res.stdout
    for opt in ("--plan", "--target", "--calib", "--pipeline", "--report", "--min-sqnr", "--plugin",
                "--verify-each", "--dump-after"):
        assert opt in res.stdout


# ------------------------------------------------------------------------------------------------- validate
def test_validate_json_and_gate(compiled_default, held_out, tmp_path):
    out, _ = compiled_default
    rj = tmp_path / "v.json"
    res = run("validate", CONV, out, "--data", held_out[1], "--json", rj)
    assert res.exit_code == 0, res.output
    assert "validation over 16 sample(s)" in res.stdout and "worst layers" in res.stdout
    v = json.loads(rj.read_text())
    # recompute the output SQNR independently
    f, q = ir.session(onnx.load(str(CONV))), ir.session(onnx.load(str(out)))
    x = np.load(held_out[1])["input"]
    ref = np.concatenate([f.run(None, {"input": s})[0] for s in x])
    got = np.concatenate([q.run(None, {"input": s})[0] for s in x])
    assert v["outputs"][0]["sqnr_db"] == pytest.approx(quant.sqnr_db(ref, got), abs=0.01)
    assert v["outputs"][0]["sqnr_db"] >= 27.0  # measured 29.96 dB on the held-back half
    floor = v["worst_slice_sqnr_db"]  # what --min-sqnr holds: whole outputs and their worst slices
    assert floor <= v["worst_output_sqnr_db"]
    res = run("validate", CONV, out, "--data", held_out[1], "--min-sqnr", floor - 0.5)
    assert res.exit_code == 0 and "PASS" in res.stdout
    res = run("validate", CONV, out, "--data", held_out[1], "--min-sqnr", floor + 0.5, "--no-layers")
    assert res.exit_code == 2 and "FAIL" in res.stdout and "worst layers" not in res.stdout
    assert re.fullmatch(rf"error: output 'logits' \(slice \d of axis 1\) SQNR {floor:.2f} dB is below --min-sqnr "
                        rf"{re.escape(str(floor + 0.5))} dB", res.stderr.strip())


# ----------------------------------------------------------------------------------- inspect/passes/plan
def test_inspect():
    res = run("inspect", CONV)
    assert res.exit_code == 0, res.output
    t = res.stdout
    assert "ir_version 8, opset ai.onnx 17" in t
    assert re.search(r"^input\s+float32\s+\['N', 3, 32, 32\]$", t, re.M)
    assert re.search(r"^BatchNormalization\s+5$", t, re.M) and re.search(r"^Conv\s+5$", t, re.M)
    assert "quantizable nodes (with the default plan and target ort, on the graph the compile quantizes): 6 of 6 " \
        "weight ops" in t
    for name in ("conv1", "conv2", "block.conv1", "block.conv2", "dw.conv"):
        assert f"\n  {name}\n" in t
    js = json.loads(run("inspect", CONV, "--json").stdout)
    assert js["parameter_bytes"] == 26344 and js["opset"] == {"ai.onnx": 17}
    assert len(js["quantizable_nodes"]) == 6
    # weights held in Constant nodes count as the compile counts them (cleanup makes them initializers)
    js = json.loads(run("inspect", MODELS / "opset11_constants.onnx", "--json").stdout)
    assert js["quantizable_nodes"] == ["conv2d_0", "conv2d_1", "output"] and js["weight_ops"] == 3


def test_passes_lists_builtins_with_docs():
    res = run("passes")
    assert res.exit_code == 0
    rows = {ln.split()[0]: ln for ln in res.stdout.splitlines()[2:] if ln.strip()}
    for name in ("cleanup", "fold-batchnorm", "resolve-plan", "calibrate", "insert-qdq", "lower"):
        assert "built-in" in rows[name]
    assert "Quantize planned weights" in rows["insert-qdq"]


def test_plan_resolve_matches_compile_side_file(compiled_default, tmp_path):
    out, _ = compiled_default
    res = run("plan", "resolve", CONV)
    assert res.exit_code == 0, res.output
    assert res.stdout == out.with_name("model.int8.plan.yaml").read_text()
    assert res.stderr.strip() == "# 6 of 14 nodes quantized; 6 activation tensors to calibrate"
    plan = tmp_path / "p.yaml"
    plan.write_text("version: 1\nrules:\n  - match: {op_type: Gemm}\n    skip: true\n")
    res = run("plan", "resolve", CONV, plan, "-o", tmp_path / "resolved.yaml")
    assert res.exit_code == 0 and f"wrote {tmp_path / 'resolved.yaml'}" in res.stdout
    doc = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    gemm = next(n for n in doc["nodes"] if n["op_type"] == "Gemm")
    assert gemm["float"] == "skip: true" and doc["summary"]["quantized"] == 5


def test_plan_show():
    res = run("plan", "show")
    assert res.exit_code == 0
    names = res.stdout.split()
    assert {"w8a8", "w4a16", "fp8"} <= set(names)
    res = run("plan", "show", "w4a16")
    assert res.exit_code == 0
    doc = yaml.safe_load(res.stdout)
    assert doc["version"] == 1 and doc["rules"][0]["weight"]["dtype"] == "int4"
    res = run("plan", "show", "w3a3")
    assert res.exit_code == 2 and res.stderr.startswith("error: plan show: unknown preset 'w3a3'")


# --------------------------------------------------------------------------------------------- bad input
def _bad_inputs(d: Path) -> dict[str, tuple[list[Any], str]]:
    """case -> (compile arguments before -o, the error line expected on stderr)."""
    (d / "empty.onnx").write_bytes(b"")
    (d / "text.onnx").write_text("this is not a model\n")
    (d / "folder.onnx").mkdir()
    (d / "key.yaml").write_text("version: 1\nrules:\n  - match: {op_type: Conv}\n    wieght: {dtype: int8}\n")
    (d / "dtype.yaml").write_text("version: 1\ndefaults:\n  weight: {dtype: int7}\n")
    (d / "regex.yaml").write_text("version: 1\nrules:\n  - match: {name_regex: '(['}\n    skip: true\n")
    x = np.load(CONV_NPZ)["input"][:4]
    np.savez(d / "shape.npz", input=x[:, :, :2])
    np.savez(d / "name.npz", image=x)
    nan = x.copy()
    nan[2, 0, 1, 5, 7] = np.nan
    np.savez(d / "nan.npz", input=nan)
    return {
        "missing file": ([d / "nope.onnx"], f"error: {d / 'nope.onnx'}: no such file"),
        "directory": ([d / "folder.onnx"], f"error: {d / 'folder.onnx'}: is a directory, expected an .onnx file"),
        "empty file": ([d / "empty.onnx"], f"error: {d / 'empty.onnx'}: empty file, expected an ONNX model"),
        "not onnx": ([d / "text.onnx"], f"error: {d / 'text.onnx'}: not an ONNX model (protobuf parse failed: "
                                        "DecodeError)"),
        "plan unknown key": ([CONV, "--plan", d / "key.yaml"],
                             f"error: {d / 'key.yaml'}: rules[0]: unknown key 'wieght' (known: activation, "),
        "plan bad dtype": ([CONV, "--plan", d / "dtype.yaml"],
                           f"error: {d / 'dtype.yaml'}: defaults.weight: bad dtype 'int7' (one of: int8, "),
        "plan bad regex": ([CONV, "--plan", d / "regex.yaml"],
                           f"error: {d / 'regex.yaml'}: rules[0]: bad name_regex '([': unterminated character set "
                           "at position 1"),
        "plan missing": ([CONV, "--plan", d / "nope.yaml"], f"error: {d / 'nope.yaml'}: no such plan file"),
        "calib shape": ([CONV, "--calib", d / "shape.npz"],
                        f"error: {d / 'shape.npz'}: array 'input' has shape [1, 2, 32, 32]; dim 1 is 2 but model "
                        "input input: float32 [N, 3, 32, 32] needs 3"),
        "calib name": ([CONV, "--calib", d / "name.npz"],
                       f"error: {d / 'name.npz'}: array 'image' is not an input of the model (inputs: input)"),
        "calib nan": ([CONV, "--calib", d / "nan.npz"],
                      f"error: {d / 'nan.npz'}: sample 2: array 'input' contains NaN (first at index "
                      "(0, 1, 5, 7))"),
        "calib missing": ([CONV, "--calib", d / "nope.npz"],
                          f"error: {d / 'nope.npz'}: no such calibration file or folder"),
        "unknown target": ([CONV, "--target", "tpu9000"], "error: --target: unknown target 'tpu9000'"),
        "bad pipeline": ([CONV, "--pipeline", "cleanup,insert-qdq"],
                         "error: pipeline: pass #2 'insert-qdq' requires 'calibrated', which no earlier pass "
                         "produces (run calibrate before it)"),
    }


BAD_CASES = ["missing file", "directory", "empty file", "not onnx", "plan unknown key", "plan bad dtype",
             "plan bad regex", "plan missing", "calib shape", "calib name", "calib nan", "calib missing",
             "unknown target", "bad pipeline"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_user_errors_exit_2_one_line_nothing_written(case, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    cases = _bad_inputs(inputs)
    args, expected = cases[case]
    watched = [CONV, *(Path(a) for a in args if isinstance(a, Path))]
    before = _fingerprint(*watched, *inputs.iterdir())
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    res = run("compile", *args, "-o", out_dir / "q.onnx", "--calib-samples", 4, *(
        ["--calib", "random"] if "--calib" not in args else []))
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(expected), (lines[0], expected)
    assert "Traceback" not in res.output
    assert list(out_dir.iterdir()) == []
    assert _fingerprint(*watched, *inputs.iterdir()) == before
    assert _fingerprint(CONV)[CONV][0] == before[CONV][0]


def test_user_errors_in_other_commands(tmp_path, compiled_default):
    out, _ = compiled_default
    (tmp_path / "text.onnx").write_text("nope")
    cases = [
        (["validate", CONV, tmp_path / "text.onnx", "--data", CONV_NPZ],
         f"error: {tmp_path / 'text.onnx'}: not an ONNX model"),
        (["validate", CONV, out, "--data", tmp_path / "missing.npz"], f"error: {tmp_path / 'missing.npz'}"),
        (["inspect", tmp_path / "nothing.onnx"], f"error: {tmp_path / 'nothing.onnx'}: no such file"),
        (["plan", "resolve", CONV, tmp_path / "nothing.yaml"], f"error: {tmp_path / 'nothing.yaml'}"),
        (["compile", CONV, "-o", CONV], f"error: {CONV}: output would overwrite the input model"),
        (["compile", CONV, "-o", tmp_path / "q.txt"], f"error: {tmp_path / 'q.txt'}: output file must end in .onnx"),
    ]
    before = _fingerprint(CONV, out)
    for args, expected in cases:
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith(expected), (args, res.stderr)
        assert "Traceback" not in res.output
    assert _fingerprint(CONV, out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.onnx"]


# ------------------------------------------------------------------------------------------ crashing plugin
CRASH_PLUGIN = textwrap.dedent('''
    from qcompiler.core.pass_base import Pass


    class CrashPass(Pass):
        """Divides by zero."""

        name = "crash-pass"

        def run(self, ctx):
            return len(ctx.graph.nodes) // 0
''')


def test_crashing_plugin_pass_exit_1(tmp_path, monkeypatch):
    monkeypatch.setattr(registry_mod, "_REGISTRY", None)  # keep the plugin out of the process-wide registry
    plugin = tmp_path / "crash_plugin.py"
    plugin.write_text(CRASH_PLUGIN)
    out_dir = tmp_path / "out"
    args = ["compile", CONV, "-o", out_dir / "q.onnx", "--plugin", plugin, "--pipeline", "cleanup,crash-pass"]
    res = run(*args)
    assert res.exit_code == 1
    assert res.stderr.strip() == ("internal error: pass 'crash-pass' failed: ZeroDivisionError: integer division or "
                                  "modulo by zero — this is a bug in pass 'crash-pass'; rerun with `qcompiler "
                                  "--debug ...` for the traceback")
    assert not out_dir.exists() or list(out_dir.iterdir()) == []
    res = run("--debug", *args)
    assert res.exit_code == 1
    assert "Traceback (most recent call last)" in res.stderr and "ZeroDivisionError" in res.stderr
    assert f'File "{plugin}"' in res.stderr  # the traceback points into the plugin
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_version():
    res = run("--version")
    assert res.exit_code == 0 and res.stdout.startswith("qcompiler, version ")


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="console_scripts") if ep.name == "qcompiler"]
    assert len(eps) == 1 and eps[0].value == "qcompiler.cli:main"
