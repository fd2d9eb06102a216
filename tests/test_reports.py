"""Issue 16, "first-hour frictions": no silent random calibration, readable validation reports, inspect counting
Constant-node weights.

* compile without ``--calib``: a static activation plan is refused (exit 2, one ``error:`` line saying what to
  give, nothing written); weight-only and dynamic plans still compile; ``--calib random`` prints the shapes used;
  the Python API keeps the same rule.
* validation reports (text table, JSON, bundle HTML): no PASS without a threshold, a legend, each layer's op
  type / node / plan rule, a plan rule to paste for the worst layers, graph order; a failed ``--min-sqnr`` gate
  writes ``OUT.rejected.report.json`` and no model.
* ``inspect`` counts weights held in Constant nodes (Paddle models) as the compile does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import onnx
import pytest
import yaml
from _graphs import constant_nodes
from click.testing import CliRunner, Result
from realdata import fetch_model

from qcompiler.api import CompileOptions, build_bundle, compile_model
from qcompiler.cli import cli
from qcompiler.core.errors import UserError
from qcompiler.plan import load_plan

MODELS = Path(__file__).resolve().parent.parent / "models"
CONV = MODELS / "conv_bn_relu.onnx"
CONV_NPZ = MODELS / "conv_bn_relu.npz"


def run(*args: Any) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _fingerprint(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


# ------------------------------------------------------------------------------------- calibration default
def test_compile_without_calib_refuses_static_activations(tmp_path):
    before = _fingerprint(CONV)
    out = tmp_path / "q.onnx"
    res = run("compile", CONV, "-o", out)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: calibration: plan <default plan> quantizes 6 activation")
    for hint in ("--calib DATA", "--calib random", "weight-only / dynamic plan", "'input' (input of Conv 'conv1')"):
        assert hint in lines[0]
    assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert _fingerprint(CONV) == before


@pytest.mark.parametrize("preset", ["w4a16", "w8a8-dynamic"])
def test_weight_only_and_dynamic_plans_need_no_calib(tmp_path, preset):
    out = tmp_path / "q.onnx"
    res = run("compile", CONV, "-o", out, "--preset", preset, "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert out.is_file()
    rep = json.loads((tmp_path / "r.json").read_text())
    stats = {k: v for p in rep["passes"] for k, v in p["stats"].items()}
    assert stats["quantized_nodes"] == 6
    if preset == "w4a16":  # weight-only: no activation tensor to calibrate
        assert stats["activation_tensors"] == 0 and rep["calibration"]["tensors"] == 0
    else:  # dynamic: ranges measured at run time
        assert rep["calibration"]["dynamic"] > 0 and rep["calibration"]["tensors"] == 0
    assert rep["calibration"]["source"] is None and not rep["calibration"]["synthetic"]


def test_calib_random_is_explicit_and_prints_shapes(tmp_path):
    out = tmp_path / "q.onnx"
    res = run("compile", CONV, "-o", out, "--calib", "random", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    assert "SYNTHETIC ranges" in res.stdout
    m = onnx.load(str(CONV))
    dims = [d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert f"calibration: random inputs of shape input [{', '.join(map(str, dims))}]" in res.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["calibration"]["random_shapes"] == {"input": dims}


def test_api_keeps_the_rule(tmp_path):
    with pytest.raises(UserError, match=r"--calib random to accept synthetic ranges"):
        compile_model(CONV, tmp_path / "a.onnx", CompileOptions())
    assert not (tmp_path / "a.onnx").exists()
    res = compile_model(CONV, tmp_path / "b.onnx", CompileOptions(calib="random"))
    assert res.report["calibration"]["synthetic"] is True
    # explicit random: deterministic (seeded), 16 samples as the old silent default
    again = compile_model(CONV, tmp_path / "c.onnx", CompileOptions(calib="random"))
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()
    assert again.report["calibration"]["samples"] == 16


# ------------------------------------------------------------------------------------------- reports
@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Result, dict[str, Any]]:
    d = tmp_path_factory.mktemp("reports")
    out = d / "model.int8.onnx"
    res = run("compile", CONV, "-o", out, "--calib", CONV_NPZ, "--report", d / "report.json")
    assert res.exit_code == 0, res.output
    return out, res, json.loads((d / "report.json").read_text())


def test_table_has_no_pass_without_threshold_and_a_legend(compiled):
    _, res, rep = compiled
    text = res.stdout
    assert "PASS" not in text and "FAIL" not in text
    assert "no threshold set" in text
    legend = next(line for line in text.splitlines() if line.startswith("legend: "))
    for part in ("SQNR: higher is better", "cosine: closer to 1 is better", "max|d|: lower is better",
                 "top1/exact: higher is better"):
        assert part in legend
    v = rep["validation"]
    assert v["passed"] is None and v["verdict"] == "no threshold set"
    assert set(v["legend"]) == {"sqnr_db", "cosine", "max_abs", "mean_abs", "worst_slice", "topk", "mask", "top1"}


def test_layers_name_node_op_and_plan_rule(compiled):
    out, res, rep = compiled
    layers = {la["name"]: la for la in rep["validation"]["layers"]}
    # bn1 is the output of BatchNormalization 'bn1' in the float model, folded into Conv 'conv1'
    assert layers["bn1"]["node"] == "conv1" and layers["bn1"]["op_type"] == "Conv"
    assert layers["bn1"]["rule"] == "defaults" and layers["bn1"]["quantized"] is True
    assert layers["relu1"]["op_type"] == "Relu" and layers["relu1"]["rule"] == "defaults (float)"
    assert layers["relu1"]["quantized"] is False
    plan = yaml.safe_load(out.with_name(out.stem + ".plan.yaml").read_text())
    by_node = {n["node"]: n for n in plan["nodes"]}
    for la in layers.values():  # every layer's node is a node of the resolved plan
        assert la["node"] in by_node and by_node[la["node"]]["op_type"] == la["op_type"]
    row = next(line for line in res.stdout.splitlines() if line.strip().startswith("bn1 "))
    assert re.search(r"\bConv\s+conv1\s+defaults$", row), row


def test_graph_order_and_worst_first(compiled):
    _, res, rep = compiled
    v = rep["validation"]
    sqnrs = [la["sqnr_db"] for la in v["layers"]]
    assert sqnrs == sorted(sqnrs)  # worst first
    order = v["graph_order"]
    assert sorted(order) == sorted(la["name"] for la in v["layers"])
    assert order.index("bn1") < order.index("relu1") < order.index("bn2") < order.index("gap")
    assert [la["index"] for la in sorted(v["layers"], key=lambda la: la["index"])] == list(range(len(order)))
    assert all(order[la["index"]] == la["name"] for la in v["layers"])
    assert "worst layers (12 of 12" in res.stdout
    # Flatten(gap) holds gap's values: not a row of its own, listed apart
    assert v["rearranged_layers"] == {"flatten": "gap"} and "flatten" not in order
    assert "not compared per layer: 1 tensor(s) only rearranging a compared one" in res.stdout


def test_suggested_rule_pastes_into_a_plan(compiled, tmp_path):
    _, res, rep = compiled
    rules = rep["validation"]["suggested_rules"]
    assert rules.startswith("- match: {name: '")
    worst_quantized = next(la for la in rep["validation"]["layers"] if la["quantized"])
    assert f"- match: {{name: '{worst_quantized['node']}'}}" in rules.splitlines()[0]
    assert "  - match: {name: '" in res.stdout and "paste under `rules:`" in res.stdout
    # the snippet is a valid plan: the named nodes are kept float by the compile
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("version: 1\nrules:\n" + "\n".join("  " + r for r in rules.splitlines()) + "\n")
    load_plan(plan_file)
    out = tmp_path / "q.onnx"
    res2 = run("compile", CONV, "-o", out, "--plan", plan_file, "--calib", CONV_NPZ)
    assert res2.exit_code == 0, res2.output
    resolved = {n["node"]: n for n in yaml.safe_load(out.with_name("q.plan.yaml").read_text())["nodes"]}
    assert "float" in resolved[worst_quantized["node"]]


def test_validate_command_reads_plan_beside_model(compiled, tmp_path):
    out, _, _ = compiled
    res = run("validate", CONV, out, "--data", CONV_NPZ, "--json", tmp_path / "v.json")
    assert res.exit_code == 0, res.output
    v = json.loads((tmp_path / "v.json").read_text())
    assert {la["name"]: la["rule"] for la in v["layers"]}["bn1"] == "defaults"
    assert "no threshold set" in res.stdout and "PASS" not in res.stdout
    # without the side file: nodes and op types still, no rule
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(out.read_bytes())
    res = run("validate", CONV, bare, "--data", CONV_NPZ, "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    b = {la["name"]: la for la in json.loads((tmp_path / "b.json").read_text())["layers"]}
    assert b["bn1"]["node"] == "conv1" and b["bn1"]["rule"] is None
    res = run("validate", CONV, bare, "--data", CONV_NPZ, "--min-sqnr", "1")
    assert res.exit_code == 0 and "PASS: worst output SQNR" in res.stdout


def test_failed_gate_writes_rejected_report_and_no_model(tmp_path):
    before = _fingerprint(CONV, CONV_NPZ)
    out = tmp_path / "m.onnx"
    res = run("compile", CONV, "-o", out, "--calib", CONV_NPZ, "--min-sqnr", "200")
    assert res.exit_code == 2
    rejected = tmp_path / "m.rejected.report.json"
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "below --min-sqnr 200" in line and str(rejected) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.rejected.report.json"]
    rep = json.loads(rejected.read_text())
    assert rep["validation"]["verdict"] == "FAIL" and rep["validation"]["passed"] is False
    assert rep["rejected"].startswith("output SQNR below --min-sqnr")
    assert _fingerprint(CONV, CONV_NPZ) == before


def test_bundle_html_verdict_legend_and_layer_table(tmp_path):
    res = build_bundle(CONV, tmp_path / "b", calib=CONV_NPZ)
    page = (tmp_path / "b" / "validation.html").read_text()
    assert ">PASS<" not in page and "no threshold set" in page
    assert "<h2>Legend</h2>" in page and "higher is better" in page
    assert "<h2>Layers in graph order</h2>" in page
    table = page.split("<h2>Layers in graph order</h2>", 1)[1].split("</table>", 1)[0]
    names = re.findall(r"<tr(?: class=\"worst\")?><td>\d+</td><td>([^<]+)</td>", table)
    assert names == json.loads((tmp_path / "b" / "validation.json").read_text())["graph_order"]
    assert table.count('class="worst"') == 5
    assert "<td>conv1</td><td>defaults</td>" in table
    assert "paste under <code>rules:</code>" in page
    assert res.manifest["validation"]["passed"] is None
    # with a gate: PASS
    res2 = build_bundle(CONV, tmp_path / "g", calib=CONV_NPZ, min_sqnr_db=5)
    assert '<span class="pass">PASS</span>' in (tmp_path / "g" / "validation.html").read_text()
    assert res2.manifest["validation"]["passed"] is True


def test_bundle_failed_gate_report_beside_bundle(tmp_path):
    with pytest.raises(UserError, match=r"b\.rejected\.report\.json"):
        build_bundle(CONV, tmp_path / "b", calib=CONV_NPZ, min_sqnr_db=200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.rejected.report.json"]


# --------------------------------------------------------------------------------------------------- inspect
def test_inspect_counts_constant_node_weights(tmp_path):
    path = tmp_path / "paddle_style.onnx"
    onnx.save(constant_nodes(), str(path))
    res = run("inspect", path)
    assert res.exit_code == 0, res.output
    assert "1 of 1 weight ops" in res.stdout
    res = run("inspect", path, "--json")
    info = json.loads(res.stdout)
    assert info["quantizable_nodes"] == ["conv"] and info["weight_ops"] == 1


def test_inspect_ppocr_cls_all_54_weight_ops():
    res = run("inspect", fetch_model("ppocr_cls"))
    assert res.exit_code == 0, res.output
    assert "54 of 54 weight ops" in res.stdout

