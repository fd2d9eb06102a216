"""Presets (``--preset NAME`` / ``--plan NAME`` / ``plan show``), the plan's ``algorithms:`` key and where its
passes land in the pipeline, data-free compilation (``--calib none``), and each preset measured on fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from qcompiler.api import PIPELINE_INSERTIONS, CompileOptions, assemble_pipeline, compile_model
from qcompiler.cli import cli
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan, load_plan
from qcompiler.plan.presets import names, preset_path
from qcompiler.report import validate as qv
from qcompiler.runtime_targets import DEFAULT_PIPELINE

MODELS = Path(__file__).resolve().parents[1] / "models"
ISSUE_PRESETS = {"w8a8", "w4a8", "w4a16", "fp8", "w4a8-fp8"}


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


# ------------------------------------------------------------------------------------------------ presets
def test_every_preset_loads_and_is_shown():
    assert ISSUE_PRESETS <= set(names())
    for name in names():
        plan = load_plan(name)
        assert plan.source.endswith(f"{name}.yaml")
        res = run("plan", "show", name)
        assert res.exit_code == 0 and res.output == preset_path(name).read_text(encoding="utf-8")  # type: ignore[union-attr]
        assert res.output.startswith("# ")  # every preset explains itself
    listing = run("plan", "show")
    assert listing.exit_code == 0 and set(listing.output.split()) == set(names())


def test_preset_contents_match_the_issue():
    w8a8 = load_plan("w8a8")
    assert w8a8.weight_defaults["granularity"] == "per_channel" and w8a8.activation_defaults["calibration"] in (
        "entropy", "percentile")
    w4a8 = load_plan("w4a8")
    assert w4a8.weight_defaults["dtype"] == "int4" and w4a8.activation_defaults["dtype"] == "uint8"
    assert "gptq" in w4a8.algorithms
    w4a16 = load_plan("w4a16")
    assert w4a16.activation_defaults["dtype"] == "float" and w4a16.rules[0].weight["dtype"] == "int4"
    fp8 = load_plan("fp8")
    assert fp8.weight_defaults["dtype"] == fp8.activation_defaults["dtype"] == "fp8e4m3"
    assert fp8.rules[0].weight == {"dtype": "fp8e4m3", "granularity": "block", "block_size": 128}
    dpq = load_plan("w4a8-fp8")
    assert dpq.weight_defaults["dtype"] == "int4" and dpq.activation_defaults["dtype"] == "fp8e4m3"


def test_preset_option_is_an_alias_of_plan_name(tmp_path):
    src = MODELS / "conv_bn_relu.onnx"
    calib = MODELS / "conv_bn_relu.npz"
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert run("compile", src, "-o", a, "--preset", "w8a8", "--calib", calib, "-q").exit_code == 0
    assert run("compile", src, "-o", b, "--plan", "w8a8", "--calib", calib, "-q").exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    both = run("compile", src, "-o", tmp_path / "c.onnx", "--preset", "w8a8", "--plan", "fp8")
    assert both.exit_code == 2 and "--preset and --plan" in both.output
    bad = run("compile", src, "-o", tmp_path / "c.onnx", "--preset", "w3a3")
    assert bad.exit_code == 2 and "unknown preset 'w3a3'" in bad.output and "w8a8" in bad.output
    assert not (tmp_path / "c.onnx").exists()


# ------------------------------------------------------------------------------------- algorithms: key
@pytest.mark.parametrize("algorithms,message", [
    ({"cle": True}, "algorithms: unknown algorithm 'cle' (known: bias_correct, equalize, fold_bias, gptq, smooth)"),
    ({"smooth": {"beta": 1}}, "algorithms.smooth: unknown option 'beta' (known: affine, alpha, apply_threshold, rows, "
                              "samples)"),
    ({"smooth": {"alpha": "high"}}, "algorithms.smooth: pass 'smooth' option 'alpha': must be a number in [0, 1] or "
                                    "'auto', got 'high'"),
    ({"smooth": {"alpha": [0.5]}}, "algorithms.smooth: option 'alpha' must be float, got '[0.5]'"),
    ({"smooth": {"alpha": 2.0}}, "algorithms.smooth: pass 'smooth' option 'alpha': must be in [0, 1], got 2.0"),
    ({"gptq": {"block_size": 1.5}}, "algorithms.gptq: option 'block_size' must be int, got '1.5'"),
    ({"gptq": "yes"}, "algorithms.gptq: expected true, false or a mapping of options, got 'yes'"),
    ([1, 2], "algorithms: expected a mapping"),
])
def test_algorithms_are_validated_with_one_line_errors(algorithms, message):
    with pytest.raises(UserError) as e:
        Plan.from_dict({"algorithms": algorithms}, source="my-plan.yaml")
    assert str(e.value).startswith(f"my-plan.yaml: {message}") and "\n" not in str(e.value)


def test_algorithms_parse_round_trip_and_cli_error(tmp_path):
    p = Plan.from_dict({"algorithms": {"equalize": True, "bias-correct": True, "smooth": {"alpha": 0.6},
                                       "gptq": False, "fold_bias": {}}})
    assert p.algorithms == {"equalize": {}, "bias_correct": {}, "smooth": {"alpha": 0.6}, "fold_bias": {}}
    assert Plan.from_dict(p.to_dict()).algorithms == p.algorithms
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nalgorithms: {gptq: {damp: 5}}\n")
    res = run("compile", MODELS / "conv_bn_relu.onnx", "-o", tmp_path / "q.onnx", "--plan", bad)
    assert res.exit_code == 2
    assert res.output.strip() == (f"error: {bad}: algorithms.gptq: pass 'gptq' option 'damp': must be in (0, 1), "
                                  "got 5.0")


def test_algorithm_passes_land_at_their_places():
    every = Plan.from_dict({"algorithms": {"gptq": {"damp": 0.05}, "bias_correct": True, "smooth": True,
                                           "equalize": True, "fold_bias": True}})
    text = ",".join(p.canonical() for p in assemble_pipeline(DEFAULT_PIPELINE, every, calib_select=8))
    assert text == ("cleanup,fold-batchnorm,fold-scale,fold-bias,fuse-activations,cleanup,resolve-plan,calib-select{n=8},"
                    "equalize,smooth,calibrate,gptq{damp=0.05},bias-correct,insert-qdq,lower")
    assert [name for name, _, _ in PIPELINE_INSERTIONS] == ["fold-bias", "calib-select", "equalize", "smooth",
                                                             "gptq", "bias-correct"]
    # a pass the pipeline text names already keeps its place and options
    text = ",".join(p.canonical() for p in assemble_pipeline(
        "cleanup,fold-batchnorm,resolve-plan,equalize{iterations=3},calibrate,insert-qdq", every))
    assert text == ("cleanup,fold-batchnorm,fold-bias,resolve-plan,equalize{iterations=3},smooth,calibrate,"
                    "gptq{damp=0.05},bias-correct,insert-qdq")
    # fold-bias goes after fold-scale when the text has it: the Add a folded Mul leaves is a bias too
    text = ",".join(p.canonical() for p in assemble_pipeline("cleanup,fold-batchnorm,fold-scale,resolve-plan", every))
    assert text.startswith("cleanup,fold-batchnorm,fold-scale,fold-bias,resolve-plan,")
    # no insert-qdq in the pipeline: gptq / bias-correct have no place and are left out
    text = ",".join(p.canonical() for p in assemble_pipeline("cleanup,resolve-plan,calibrate", every))
    assert text == "cleanup,resolve-plan,equalize,smooth,calibrate"
    assert [p.name for p in assemble_pipeline(DEFAULT_PIPELINE, Plan.default())] == DEFAULT_PIPELINE.split(",")


# ----------------------------------------------------------------------------------------------- numbers
@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory):
    """fixture -> (calibration .npz with its first 24 samples, the last 8 samples as held-out feeds)."""
    d = tmp_path_factory.mktemp("presets")
    out = {}
    for fx in ("conv_bn_relu", "transformer_block"):
        z = np.load(MODELS / f"{fx}.npz")
        np.savez(d / f"{fx}.npz", **{k: z[k][:24] for k in z.files})
        out[fx] = (d / f"{fx}.npz", [{k: z[k][i] for k in z.files} for i in range(24, 32)])
    return out


def _measure(tmp_path, split, fx: str, preset, calib: str | None = None):
    """``preset``: a preset's name, ``"default"`` (the plain default plan) or a :class:`Plan`."""
    cal, held = split[fx]
    name = preset if isinstance(preset, str) else "plan"
    out = tmp_path / f"{fx}.{name}.onnx"
    which = {"plan": preset} if not isinstance(preset, str) or preset == "default" else {"preset": preset}
    res = compile_model(MODELS / f"{fx}.onnx", out, CompileOptions(calib=calib or str(cal), validate=False,
                                                                  **which))
    rep = qv.validate(MODELS / f"{fx}.onnx", out, held, per_layer=False)
    return min(o.sqnr_db for o in rep.outputs), res, onnx.load(out)


# measured worst-output SQNR on the held-out samples (dB) — floors a little below
@pytest.mark.parametrize("fx,preset,floor", [
    ("conv_bn_relu", "w8a8", 28.0),  # 29.6
    ("conv_bn_relu", "w8a8-cle", 32.0),  # 33.4: equalize + bias correction help this one
    ("transformer_block", "w8a8", 31.0),  # 33.0
    ("transformer_block", "fp8", 23.0),  # 24.6
    ("conv_bn_relu", "fp8", 19.0),  # 20.3
    ("transformer_block", "w4a8-fp8", 18.5),  # 19.9
])
def test_presets_on_fixtures(tmp_path, split, fx, preset, floor):
    if preset == "w8a8-cle":
        # the algorithms as written (the guard off): equalize + bias correction help here. With its guard (the
        # shipped preset) the 6 samples it holds back of these 24 (every 4th) cannot tell them apart — every
        # ablation within 0.3 dB of the plan as written — and it drops both (measured 29.6 dB, the plain default
        # plan's 29.8): never below the plain default plan by more than 0.5 dB, the guard's promise
        guarded, _, _ = _measure(tmp_path, split, fx, preset)
        plain, _, _ = _measure(tmp_path, split, fx, "default")
        assert guarded >= plain - 0.5, (guarded, plain)
    what: str | Plan = preset
    if preset == "w8a8-cle":
        what = load_plan(preset)
        what.guard = "off"
    sqnr, res, model = _measure(tmp_path, split, fx, what)
    assert sqnr >= floor, sqnr
    dtypes = {numpy_helper.to_array(t).dtype.name for t in model.graph.initializer}
    if preset.startswith("w8a8"):
        assert {"int8", "uint8"} <= dtypes and ("int32" in dtypes) == (fx == "conv_bn_relu")  # Conv biases
    if "fp8" in preset:
        assert "float8_e4m3fn" in dtypes
    if preset == "w4a8-fp8":
        assert "int4" in dtypes and res.report["gptq"]["layers"] > 0


def test_w4_presets_use_gptq(tmp_path, split):
    plain, _, _ = _measure(tmp_path, split, "transformer_block", "w4a16")
    gptq, res, model = _measure(tmp_path, split, "transformer_block", "w4a16-gptq")
    assert "MatMulNBits" in {n.op_type for n in model.graph.node}
    assert res.report["gptq"]["layers"] == 6
    assert gptq >= plain + 2.0, (plain, gptq)  # measured: 17.3 -> 20.2 dB
    w4a8, res, _ = _measure(tmp_path, split, "conv_bn_relu", "w4a8")
    assert res.report["gptq"]["layers"] == 6 and w4a8 >= 14.0, w4a8


def test_data_free_mode_uses_bn_statistics(tmp_path, split):
    """``--calib none``: the activations after a folded BatchNorm get their ranges from its statistics; the
    graph input (no BN before it) falls back to random data; no validation (there is no data)."""
    # w8a8-percentile: every Conv in int8 (the w8a8 preset keeps a Conv whose output only float ops read in float)
    sqnr, res, _ = _measure(tmp_path, split, "conv_bn_relu", "w8a8-percentile", calib="none")
    # 4 BN outputs quantized (the depthwise conv's BN output stays float on ort)
    assert res.report["data_free"]["bn_ranges"] >= 4 and res.report["data_free"]["synthetic_ranges"] >= 1
    assert res.validation is None
    assert sqnr >= 28.0, sqnr  # measured 29.3 (calibrated on data: 29.6)
    # weight-only presets need no data at all
    _, res, _ = _measure(tmp_path, split, "transformer_block", "w4a16", calib="none")
    assert res.report["calibration"]["samples"] == 0 and "data_free" not in res.report


def test_w8a8_on_ppocr_cls_keeps_the_decisions():
    """The w8a8 preset on the real PP-OCR angle classifier: top-1 agreement with the float model."""
    import realdata

    src = realdata.fetch_model("ppocr_cls")
    calib, _ = realdata.ppocr_cls_inputs(32, "calib")
    held, _ = realdata.ppocr_cls_inputs(64, "eval")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for i, f in enumerate(calib):
            np.savez(Path(d) / f"{i:03d}.npz", **f)
        out = Path(d) / "q.onnx"
        res = compile_model(src, out, CompileOptions(preset="w8a8", calib=d, validate=False))
        rep = qv.validate(src, out, held, per_layer=False)
    assert res.report["sizes"]["ratio"] < 0.32
    assert rep.outputs[0].top1_agreement >= 63 / 64, rep.outputs[0]


def test_plan_turns_off_a_default_pipeline_pass(tmp_path):
    """``algorithms: {fold_bias: false}`` removes fold-bias, which the default pipeline runs, and round-trips."""
    on = assemble_pipeline(DEFAULT_PIPELINE, Plan.default())
    assert "fold-bias" in [p.name for p in on]
    off_plan = Plan.from_dict({"version": 1, "algorithms": {"fold_bias": False, "equalize": True}})
    off = [p.name for p in assemble_pipeline(DEFAULT_PIPELINE, off_plan)]
    assert "fold-bias" not in off and "equalize" in off
    assert Plan.from_dict(off_plan.to_dict()).disabled_algorithms == {"fold_bias"}
    assert off_plan.to_dict()["algorithms"] == {"equalize": True, "fold_bias": False}


def test_w8a8_preset_pipeline():
    """The shipped w8a8 preset runs GPTQ (int8 grids) and leaves fold-bias out (measured better without it on
    PP-OCR cls, identical on rec / silero-vad: benchmarks/RESULTS.md)."""
    names = [p.name for p in assemble_pipeline(DEFAULT_PIPELINE, load_plan("w8a8"))]
    assert "fold-bias" not in names and "gptq" in names
    assert names.index("calibrate") < names.index("gptq") < names.index("insert-qdq")


def test_guard_with_fewer_samples_than_it_holds_back_runs_the_algorithms_as_written(tmp_path, split, caplog):
    """The guard holds a quarter of the samples back: with fewer than 4 it cannot measure, and the preset compiles
    as written (a warning), as the measured default falls back to the plain default plan. It used to be refused
    (exit 2) — found by compiling the ONNX backend corpus's one-sample tests with ``--preset w8a8``."""
    cal, _ = split["conv_bn_relu"]
    z = np.load(cal)
    three = tmp_path / "three.npz"
    np.savez(three, **{k: z[k][:3] for k in z.files})
    out = tmp_path / "guarded.onnx"
    with caplog.at_level("WARNING", logger="qcompiler.compile"):
        res = compile_model(MODELS / "conv_bn_relu.onnx", out, CompileOptions(calib=str(three), preset="w8a8",
                                                                             validate=False))
    assert any("the guard needs at least 4" in r.getMessage() and "3 calibration sample(s)" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert "recipe" not in res.report or not res.report["recipe"].get("dropped")
    as_written = load_plan("w8a8")
    as_written.guard = "off"
    ref = tmp_path / "as_written.onnx"
    compile_model(MODELS / "conv_bn_relu.onnx", ref, CompileOptions(calib=str(three), plan=as_written,
                                                                     validate=False))
    assert out.read_bytes() == ref.read_bytes()
    assert res.report["gptq"]["layers"] > 0  # the preset's GPTQ ran, as written
    # --calib-samples counts too: 3 of the 24 samples
    out3 = tmp_path / "guarded3.onnx"
    compile_model(MODELS / "conv_bn_relu.onnx", out3, CompileOptions(calib=str(cal), calib_samples=3,
                                                                     preset="w8a8", validate=False))
    ref3 = tmp_path / "as_written3.onnx"
    compile_model(MODELS / "conv_bn_relu.onnx", ref3, CompileOptions(calib=str(cal), calib_samples=3,
                                                                     plan=as_written, validate=False))
    assert out3.read_bytes() == ref3.read_bytes()
