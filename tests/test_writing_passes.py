"""docs/writing-passes.md and docs/examples: the custom pass in the guide is extracted from the markdown and run
through ``qcompiler compile --plugin`` (its numerical effect measured), the guide's other snippets are checked,
and every numbered example script runs and produces the numbers it claims.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from qcompiler import ir, quant
from qcompiler.cli import cli
from qcompiler.core import registry as registry_mod
from qcompiler.core.registry import Registry, build_pipeline
from qcompiler.plan import Plan
from qcompiler.runtime_targets import DEFAULT_PIPELINE

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "writing-passes.md"
EXAMPLES = ROOT / "docs" / "examples"
MODELS = ROOT / "models"
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
NORMALIZE = "normalize-input{mean=0.485;0.456;0.406,std=0.229;0.224;0.225}"


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """Plugins loaded here stay out of the process-wide registry."""
    monkeypatch.setattr(registry_mod, "_REGISTRY", None)


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def _example_block() -> str:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"<!-- example: normalize_input\.py -->\s*```python\n(.*?)```", text, flags=re.S)
    assert m, "the guide's example block is missing"
    return m.group(1)


@pytest.fixture(scope="module")
def raw_pixels(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The conv_bn_relu fixture's samples undone to raw [0, 1] pixels: (calib .npz, raw held-back, normalized
    held-back)."""
    d = tmp_path_factory.mktemp("raw")
    x = np.load(MODELS / "conv_bn_relu.npz")["input"]  # [32, 1, 3, 32, 32], ImageNet-normalized
    raw = (x * STD.reshape(1, 1, 3, 1, 1) + MEAN.reshape(1, 1, 3, 1, 1)).astype(np.float32)
    assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    np.savez(d / "raw_images.npz", input=raw[:16])
    return d / "raw_images.npz", raw[16:], x[16:]


def _outputs(model: onnx.ModelProto, feeds: np.ndarray) -> np.ndarray:
    s = ir.session(model, threads=1)
    return np.concatenate([s.run(None, {"input": f})[0] for f in feeds])


# ------------------------------------------------------------------------------------- the guide's example
def test_guide_example_is_about_30_lines():
    code = _example_block()
    body = code[code.index("class NormalizeInputPass"):]
    assert len(body.strip().splitlines()) <= 32
    assert len(code.strip().splitlines()) <= 50


def test_guide_example_through_cli(tmp_path, raw_pixels):
    calib, raw_held, norm_held = raw_pixels
    plugin = tmp_path / "normalize_input.py"
    plugin.write_text(_example_block(), encoding="utf-8")
    runner = CliRunner()
    # 1. float: the normalization alone is exact
    f_out = tmp_path / "raw_pixels.float.onnx"
    res = runner.invoke(cli, ["compile", str(MODELS / "conv_bn_relu.onnx"), "-o", str(f_out), "--plugin",
                              str(plugin), "--pipeline", f"{NORMALIZE},cleanup"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert re.search(r"^normalize-input\s+yes\s+[\d.]+\s+inputs_normalized=1$", res.stdout, re.M)
    original = onnx.load(str(MODELS / "conv_bn_relu.onnx"))
    ref = _outputs(original, norm_held)
    got = _outputs(onnx.load(str(f_out)), raw_held)
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert rel <= 1e-5, rel  # measured 2.2e-7
    # 2. quantized, calibrated on raw pixels: the same quality as the original model on normalized inputs
    q_out = tmp_path / "raw_pixels.int8.onnx"
    pipeline = f"{NORMALIZE},{DEFAULT_PIPELINE}"
    res = runner.invoke(cli, ["compile", str(MODELS / "conv_bn_relu.onnx"), "-o", str(q_out), "--calib", str(calib),
                              "--plugin", str(plugin), "--pipeline", pipeline], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    q = onnx.load(str(q_out))
    sqnr = quant.sqnr_db(ref, _outputs(q, raw_held))
    assert sqnr >= 27.0, sqnr  # measured 29.96 dB on the held-back samples
    assert [i.name for i in q.graph.input] == ["input"] and [o.name for o in q.graph.output] == ["logits"]
    made = {n.name: {p.key: p.value for p in n.metadata_props} for n in q.graph.node if n.op_type in ("Sub", "Mul")}
    bias_scales = {k for k, v in made.items() if v == {ir.TAG_KEY: "insert-qdq"}}  # int32 bias scale s_w·s_x
    # dw.conv computes in float on ort (float bias; its int8 weight dequantized at load by Cast/Mul)
    assert bias_scales == {f"{c}.bias:Mul" for c in ("conv1", "conv2", "block.conv1", "block.conv2", "fc")}
    made = {k: v for k, v in made.items() if v != {ir.TAG_KEY: "ort-load-time-dequant"}}
    assert {k: v for k, v in made.items() if k not in bias_scales} == {
        "input/sub_mean": {ir.TAG_KEY: "normalize-input"}, "input/mul_inv_std": {ir.TAG_KEY: "normalize-input"}}
    # the Conv's integer kernel is still fused after the new nodes (4: the depthwise conv is float on ort)
    assert ir.optimized_op_types(q).get("QLinearConv") == 4


def test_guide_example_idempotent_and_harness(tmp_path):
    plugin = tmp_path / "normalize_input.py"
    plugin.write_text(_example_block(), encoding="utf-8")
    reg = Registry()
    assert reg.load_plugin(str(plugin)) == ["normalize-input"]
    p = build_pipeline(NORMALIZE, reg)[0]
    assert p.canonical() == NORMALIZE
    # the guide's test harness, executed as written
    (harness,) = [b for b in _blocks("python") if "def run_pass" in b]
    scope: dict[str, object] = {}
    exec(compile(harness, "writing-passes.md", "exec"), scope)
    ctx, result, first = scope["run_pass"](onnx.load(str(MODELS / "conv_bn_relu.onnx")), p)  # type: ignore[operator]
    assert result.modified is True and result.stats["inputs_normalized"] == 1
    onnx.checker.check_model(first, full_check=True)
    again = p.run(ctx)
    assert again.modified is False and not again.stats
    assert ir.export_model(ctx.graph, ctx.meta).SerializeToString() == first.SerializeToString()


def test_guide_snippets_are_valid(tmp_path):
    for block in _blocks("python"):
        compile(block, "writing-passes.md", "exec")  # every Python block at least parses
    (toml,) = _blocks("toml")
    assert '[project.entry-points."qcompiler.passes"]' in toml
    assert re.search(r'^\s*normalize-input = "[\w.]+:NormalizeInputPass"$', toml, re.M)
    # every pipeline quoted in the guide parses with the example pass registered
    text = DOC.read_text(encoding="utf-8")
    reg = Registry()
    registry_mod._load_builtins(reg)
    plugin = tmp_path / "normalize_input.py"
    plugin.write_text(_example_block(), encoding="utf-8")
    reg.load_plugin(str(plugin))
    pipelines = re.findall(r'--pipeline "([^"]+)"', text)
    assert len(pipelines) >= 2
    for pl in pipelines:
        assert build_pipeline(pl, reg)[0].name == "normalize-input"
    assert f"`{DEFAULT_PIPELINE}`" in text
    # the properties the guide lists are the ones the built-ins declare
    for prop, pass_name in (("clean", "cleanup"), ("bn-folded", "fold-batchnorm"), ("plan-resolved", "resolve-plan"),
                            ("calibrated", "calibrate"), ("qdq", "insert-qdq"), ("lowered", "lower")):
        assert prop in reg.passes[pass_name].produces and f"`{prop}` ({pass_name})" in text


# ------------------------------------------------------------------------------------------------ examples
def _run_example(name: str, out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    path = EXAMPLES / name
    monkeypatch.setattr(sys, "argv", [str(path), str(out_dir)])
    return runpy.run_path(str(path), run_name="__main__")["summary"]


def test_example_01_compile_a_fixture(tmp_path, monkeypatch, capsys):
    s = _run_example("01_compile_a_fixture.py", tmp_path, monkeypatch)
    assert s["sqnr_db"] >= 28.0  # measured 30.58 dB (in-sample, 32 samples)
    assert s["ratio"] <= 0.30
    assert s["ops"]["QLinearConv"] == 4 and s["ops"]["QGemm"] == 1  # the depthwise conv: float on ort
    assert sorted(Path(f).name for f in s["files"]) == ["conv_bn_relu.int8.onnx", "conv_bn_relu.int8.plan.yaml"]
    out = capsys.readouterr().out
    assert "onnxruntime runs:" in out and "QLinearConv x4" in out and "worst layers (3 of 12" in out


def test_example_02_custom_pass(tmp_path, monkeypatch, capsys):
    s = _run_example("02_custom_pass.py", tmp_path, monkeypatch)
    rows = s["weight_sqnr"]
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)
    assert {r["node"] for r in rows} == {"attn.q.matmul", "attn.k.matmul", "attn.v.matmul", "attn.out.matmul",
                                         "mlp.fc1.matmul", "mlp.fc2.matmul"}
    # the prediction equals the weights insert-qdq actually wrote
    src = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(MODELS / "transformer_block.onnx")).graph.initializer}
    q = {t.name: numpy_helper.to_array(t) for t in onnx.load(s["output"]).graph.initializer}
    for r in rows:
        w = r["node"].replace(".matmul", ".weight")
        deq = q[f"{w}:q"].astype(np.float32) * q[f"{w}:s"].reshape(1, -1)
        assert abs(quant.sqnr_db(src[w], deq) - r["sqnr_db"]) < 0.002
        assert r["sqnr_db"] >= 40.0  # int8 per-channel: measured 44.0-44.9 dB
    assert s["sqnr_db"] >= 29.0  # the compile itself is unchanged by an analysis pass (measured 32.75)
    assert capsys.readouterr().out.count("weight SQNR") == 3  # weight-sqnr{top=3}


def test_example_03_plan_rules(tmp_path, monkeypatch):
    s = _run_example("03_plan_rules.py", tmp_path, monkeypatch)
    assert s["rules"]["attn.q.matmul"] == "rules[0] (op_type=MatMul)"
    assert s["rules"]["attn.out.matmul"] == "rules[1] (name_regex=^attn\\.out\\.matmul$)"
    assert s["rules"]["mlp.fc2.matmul"] == "rules[2] (name=mlp.fc2.matmul)"
    assert s["default"]["MatMulIntegerToFloat"] == 6 and s["default"]["MatMulNBits"] == 0
    assert s["mixed"]["MatMulNBits"] == 4 and s["mixed"]["MatMulIntegerToFloat"] == 1
    assert s["default"]["sqnr_db"] >= 30.0  # measured 32.75 dB
    assert s["mixed"]["sqnr_db"] >= 16.0  # measured 18.87 dB (int4 weights)
    assert s["mixed"]["ratio"] < 0.42  # measured 0.395 (one projection kept float)
    assert (tmp_path / "transformer_block.mixed.plan.yaml").is_file()


def test_example_plan_previews_like_the_cli(tmp_path, monkeypatch):
    """03's preview uses the same passes as ``qcompiler plan resolve``."""
    path = EXAMPLES / "03_plan_rules.py"
    mod = runpy.run_path(str(path))
    plan_file = tmp_path / "p.yaml"
    plan_file.write_text(mod["PLAN"])
    res = CliRunner().invoke(cli, ["plan", "resolve", str(MODELS / "transformer_block.onnx"), str(plan_file)])
    assert res.exit_code == 0, res.output
    import yaml

    doc = yaml.safe_load(res.stdout)
    cli_rules = {n["node"]: n["rule"] for n in doc["nodes"] if n["op_type"] == "MatMul"}
    assert cli_rules == mod["preview"](MODELS / "transformer_block.onnx", Plan.from_file(plan_file))
