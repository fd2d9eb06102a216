"""8-bit block-wise MatMul weights next to a quantized activation: refused by every target (onnxruntime fuses the
pair into MatMulIntegerToFloat and fails at run time), and the planner's int8 candidate is per channel on a
block-wise base (the w4a8 preset's MatMul rule), so ``plan --budget`` at w4a8's bytes runs on transformer models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler.cli import cli

ROOT = Path(__file__).resolve().parents[1]
TB, TB_NPZ = ROOT / "models" / "transformer_block.onnx", ROOT / "models" / "transformer_block.npz"


def _plan(tmp: Path, activation: dict, weight: dict) -> Path:
    p = tmp / "plan.yaml"
    p.write_text(yaml.safe_dump({"version": 1, "defaults": {
        "weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": True},
        "activation": {"dtype": "uint8", "granularity": "per_tensor", "symmetric": False}},
        "rules": [{"match": {"op_type": ["MatMul"]}, "weight": weight, "activation": activation}]}))
    return p


def test_onnxruntime_cannot_run_the_pair_it_fuses() -> None:
    """The oracle for the refusal: DQ(x uint8), DQ(W int8, block_size 16) -> MatMul, standard ONNX (opset 21,
    valid by the checker), fails in onnxruntime's CPU provider. If an onnxruntime release runs it, this test
    fails and the refusal in ``Target.check_node`` can go."""
    k, n = 32, 8
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (k, n)).astype(np.int8)
    scales = (rng.random((k // 16, n)) * 0.01 + 0.001).astype(np.float32)
    inits = [numpy_helper.from_array(codes, "wq"), numpy_helper.from_array(scales, "ws"),
             numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["wd"], axis=0, block_size=16),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, n])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="MatMulIntegerToFloat"):
        sess.run(None, {"x": rng.standard_normal((2, 3, k)).astype(np.float32)})


def test_int8_block_matmul_with_quantized_activation_is_refused_in_one_line(tmp_path: Path) -> None:
    plan = _plan(tmp_path, {"dtype": "uint8"}, {"dtype": "int8", "granularity": "block", "block_size": 16})
    out = tmp_path / "q.onnx"
    r = CliRunner().invoke(cli, ["compile", str(TB), "-o", str(out), "--calib", str(TB_NPZ), "--plan", str(plan)])
    assert r.exit_code == 2, r.output
    line = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "MatMulIntegerToFloat" in line[0] and "(MatMul, rules[0]" in line[0], r.output
    assert "Traceback" not in r.output and not out.exists()


@pytest.mark.parametrize("activation,weight", [
    ({"dtype": "float"}, {"dtype": "int8", "granularity": "block", "block_size": 16}),  # weight-only
    ({"dtype": "uint8", "granularity": "per_token", "calibration": "dynamic"},
     {"dtype": "int8", "granularity": "block", "block_size": 16}),  # per-token: its own lowering
    ({"dtype": "uint8"}, {"dtype": "int8", "granularity": "per_channel"}),
    ({"dtype": "uint8"}, {"dtype": "int16", "granularity": "block", "block_size": 16}),  # not fused
])
def test_the_combinations_onnxruntime_runs_still_compile(tmp_path: Path, activation: dict, weight: dict) -> None:
    plan = _plan(tmp_path, activation, weight)
    out, rep = tmp_path / "q.onnx", tmp_path / "r.json"
    r = CliRunner().invoke(cli, ["compile", str(TB), "-o", str(out), "--calib", str(TB_NPZ), "--plan", str(plan),
                                 "--report", str(rep)])
    assert r.exit_code == 0, r.output
    assert json.loads(rep.read_text())["validation"]["outputs"][0]["sqnr_db"] > 25.0  # measured 32-38 dB


def test_planner_at_w4a8_bytes_runs_on_a_transformer_block(tmp_path: Path) -> None:
    """Was an internal error (the int8 candidate inherited w4a8's MatMul blocks: a MatMulIntegerToFloat that
    fails); now its int8 layers are per channel, the plan fits the budget and compiles."""
    rep = tmp_path / "w4a8.json"
    r = CliRunner().invoke(cli, ["compile", str(TB), "-o", str(tmp_path / "w4a8.onnx"), "--calib", str(TB_NPZ),
                                 "--preset", "w4a8", "--no-validate", "--report", str(rep)])
    assert r.exit_code == 0, r.output
    budget = json.loads(rep.read_text())["cost"]["total_bytes"]
    plan = tmp_path / "plan.yaml"
    r = CliRunner().invoke(cli, ["plan", str(TB), "--calib", str(TB_NPZ), "--budget", str(budget), "-o", str(plan)])
    assert r.exit_code == 0, r.output
    rules = yaml.safe_load(plan.read_text())["rules"]
    int8 = [x for x in rules if x.get("weight", {}).get("dtype") == "int8" and "name" in x["match"]]
    assert all(x["weight"].get("granularity") == "per_channel" for x in int8), int8
    rep2 = tmp_path / "planned.json"
    r = CliRunner().invoke(cli, ["compile", str(TB), "-o", str(tmp_path / "planned.onnx"), "--calib", str(TB_NPZ),
                                 "--plan", str(plan), "--report", str(rep2)])
    assert r.exit_code == 0, r.output
    assert json.loads(rep2.read_text())["cost"]["total_bytes"] <= budget
