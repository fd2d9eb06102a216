"""fix-shapes (``--input-shape NAME=D0,D1,...``): a graph input's dynamic dimensions fixed, the Shape / Size nodes
that then have a known value folded, and the Ifs on them inlined — so layers inside shape-conditioned branches
(silero-vad's LSTM) become top-level nodes a plan quantizes. Oracle: onnxruntime on the unmodified model at the
fixed shape (exact before quantization), numpy SQNR after."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.cli import cli
from qcompiler.compile import CompileOptions, compile_plan
from qcompiler.core.errors import UserError
from qcompiler.passes.fix_shapes import FixShapesPass
from qcompiler.plan.checks import parse_shapes

sys.path.insert(0, str(Path(__file__).parent))
import realdata
from test_freeze_inputs import _run, assert_branches_stay_float, assert_compile_refused
from test_subgraphs import _silero_stream, silero_if_model, sqnr

D = 16


def shape_model(use_size: bool = False) -> onnx.ModelProto:
    """x [N, D] -> If(Shape(x)[0:1] == 1 (or Size(x) == D)): relu(x @ W1) else x @ W2; y [N, D]."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "W1")
    w2 = numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "W2")
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W1"], ["t0"], name="mm1"),
                                helper.make_node("Relu", ["t0"], ["t1"], name="relu")], "then", [],
                               [helper.make_tensor_value_info("t1", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("MatMul", ["x", "W2"], ["e0"], name="mm2")], "else", [],
                               [helper.make_tensor_value_info("e0", TensorProto.FLOAT, None)])
    if use_size:
        nodes = [helper.make_node("Size", ["x"], ["n"], name="size"),
                 helper.make_node("Equal", ["n", "d"], ["cond"], name="eq")]
        inits = [numpy_helper.from_array(np.array(D, np.int64), "d")]
    else:
        nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape", start=0, end=1),
                 helper.make_node("Squeeze", ["s"], ["n"], name="sq"),
                 helper.make_node("Equal", ["n", "one"], ["cond"], name="eq")]
        inits = [numpy_helper.from_array(np.array(1, np.int64), "one")]
    nodes.append(helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g))
    g = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])], [w1, w2, *inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.mark.parametrize("use_size", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_fixed_shape_folds_and_inlines_exactly(use_size, batch):
    model = shape_model(use_size)
    graph, meta = ir.import_graph(model)
    res = FixShapesPass(shapes=(f"x={batch},{D}",)).run_graph(graph)
    assert res.modified and res.stats["fixed"] == 1 and res.stats["shapes_folded"] == 1
    assert res.stats["inlined_ifs"] == 1
    out = ir.export_model(graph, meta)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert "If" not in ops and "Shape" not in ops and "Size" not in ops
    taken = "Relu" in ops  # then-branch: batch 1 (Shape) / D elements (Size)
    assert taken == (batch == 1)
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [batch, D]
    assert [i.name for i in out.graph.input] == ["x"] and [o.name for o in out.graph.output] == ["y"]
    for seed in range(3):
        feed = {"x": np.random.default_rng(seed).standard_normal((batch, D)).astype(np.float32)}
        np.testing.assert_array_equal(_run(model, feed)[0], _run(out, feed)[0])
    again = FixShapesPass(shapes=(f"x={batch},{D}",)).run_graph(graph)  # idempotent
    assert again.modified is False


def test_without_a_fixed_shape_nothing_folds():
    graph, _ = ir.import_graph(shape_model())
    assert FixShapesPass().run_graph(graph).modified is False
    assert [n.op for n in graph.nodes].count("If") == 1 and [n.op for n in graph.nodes].count("Shape") == 1


def test_a_shape_that_does_not_follow_from_the_inputs_stays():
    """Shape of a NonZero result (data-dependent) is not known from the fixed input shape: left alone."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [1])
    g = helper.make_graph([helper.make_node("NonZero", ["x"], ["nz"]), helper.make_node("Shape", ["nz"], ["s"]),
                           helper.make_node("Slice", ["s", "b", "e"], ["y"])], "nz", [x], [y],
                          [numpy_helper.from_array(np.array([1], np.int64), "b"),
                           numpy_helper.from_array(np.array([2], np.int64), "e")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    graph, meta = ir.import_graph(m)
    res = FixShapesPass(shapes=("x=5",)).run_graph(graph)
    assert res.stats["fixed"] == 1 and "shapes_folded" not in res.stats
    assert "Shape" in [n.op for n in graph.nodes]
    feed = {"x": np.array([0, 1, 0, 2, 3], np.float32)}
    np.testing.assert_array_equal(_run(ir.export_model(graph, meta), feed)[0], _run(m, feed)[0])  # [3]


def test_compile_quantizes_the_branch_a_shape_selects(tmp_path):
    src = tmp_path / "shapes.onnx"
    onnx.save(shape_model(), src)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 1, D)).astype(np.float32))
    run = CliRunner().invoke
    assert_branches_stay_float(src, tmp_path)
    res = run(cli, ["compile", str(src), "-o", str(tmp_path / "q.onnx"), "--calib", str(tmp_path / "calib.npz"),
                    "--plan", "default", "--input-shape", f"x=1,{D}"])
    assert res.exit_code == 0, res.output
    q = onnx.load(tmp_path / "q.onnx")
    ops = [n.op_type for n in q.graph.node]
    assert "If" not in ops and "MatMul" in ops and ops.count("DequantizeLinear") >= 2
    assert f"fix-shapes{{shapes=x=1x{D}}}" in res.output  # the pipeline text it prints parses back:
    again = run(cli, ["compile", str(src), "-o", str(tmp_path / "p.onnx"), "--calib", str(tmp_path / "calib.npz"),
                      "--plan", "default", "--pipeline", f"fix-shapes{{shapes=x=1x{D}}},cleanup,resolve-plan,calibrate,"
                      "insert-qdq,lower", "-q"])
    assert again.exit_code == 0, again.output
    assert "If" not in [n.op_type for n in onnx.load(tmp_path / "p.onnx").graph.node]
    feeds = [{"x": np.random.default_rng(100 + s).standard_normal((1, D)).astype(np.float32)} for s in range(8)]
    ref = np.concatenate([_run(src, f)[0] for f in feeds])
    got = np.concatenate([_run(tmp_path / "q.onnx", f)[0] for f in feeds])
    assert sqnr(ref, got) >= 30.0


@pytest.mark.parametrize("args,msg", [
    (["--input-shape", "nope=1,16"], "--input-shape nope=...: the model has no graph input 'nope' (inputs: x)"),
    (["--input-shape", "x=16"], "--input-shape x=16: input 'x' has rank 2"),
    (["--input-shape", "x=1,8"], "--input-shape x=1,8: dimension 1 of input 'x' is 16 in the model"),
    (["--input-shape", "x=0,16"], "--input-shape x=0,16: every dimension must be at least 1"),
    (["--input-shape", "x=a,16"], "--input-shape x=a,16: dimensions are integers separated by commas"),
    (["--input-shape", "x"], "--input-shape 'x': expected NAME=D0,D1,..."),
])
def test_bad_input_shape_is_one_line_exit_2(tmp_path, args, msg):
    src = tmp_path / "shapes.onnx"
    onnx.save(shape_model(), src)
    assert_compile_refused(src, tmp_path, args, msg)


@pytest.mark.parametrize("which", ["--calib", "--validate-data"])
def test_data_of_another_shape_is_refused_naming_the_file(tmp_path, which):
    src = tmp_path / "shapes.onnx"
    onnx.save(shape_model(), src)
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "one.npz", x=rng.standard_normal((8, 1, D)).astype(np.float32))
    np.savez(tmp_path / "two.npz", x=rng.standard_normal((8, 2, D)).astype(np.float32))
    calib, val = ("two.npz", "one.npz") if which == "--calib" else ("one.npz", "two.npz")
    res = CliRunner().invoke(cli, ["compile", str(src), "-o", str(tmp_path / "q.onnx"), "--plan", "default",
                                   "--calib", str(tmp_path / calib), "--validate-data", str(tmp_path / val),
                                   "--input-shape", f"x=1,{D}"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and f"two.npz: array 'x' has shape [2, {D}]; dim 0 is 2" in err[0] and "[1, 16]" in err[0]
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("shape,msg", [("x=16", "--input-shape x=16: input 'x' has rank 2"),
                                       ("x=1,8", "--input-shape x=1,8: dimension 1 of input 'x' is 16 in the model")])
def test_a_wrong_flag_is_named_before_the_data_is_checked_against_it(tmp_path, shape, msg):
    """With real calibration data the flag's own mistake is the error, not the data's mismatch with the wrong
    shape."""
    src = tmp_path / "shapes.onnx"
    onnx.save(shape_model(), src)
    np.savez(tmp_path / "one.npz", x=np.random.default_rng(3).standard_normal((8, 1, D)).astype(np.float32))
    res = CliRunner().invoke(cli, ["compile", str(src), "-o", str(tmp_path / "q.onnx"), "--plan", "default",
                                   "--calib", str(tmp_path / "one.npz"), "--input-shape", shape])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "q.onnx").exists()


def test_parse_shapes():
    assert parse_shapes(["input=1,576", "state = 2x1x128"]) == [("input", (1, 576)), ("state", (2, 1, 128))]
    with pytest.raises(UserError, match="given twice"):
        parse_shapes(["x=1", "x=2"])


def test_silero_if_model_gets_its_lstm_quantized(tmp_path):
    """silero_vad.onnx at 16 kHz with its chunk and state shapes fixed: the LSTM in the shape-conditioned Ifs
    becomes a top-level node with int8 weights (frozen sample rate alone leaves it float in its If)."""
    path = silero_if_model()
    calib_clip = realdata.silero_vad_inputs(1, "calib", frames=32)[0]["input"]
    eval_clip = realdata.silero_vad_inputs(1, "eval", frames=32)[0]["input"]
    calib, _ = _silero_stream(path, list(calib_clip))
    evals, ref = _silero_stream(path, list(eval_clip))
    np.savez(tmp_path / "calib.npz", **{k: np.stack([f[k] for f in calib]) for k in calib[0]})
    outs = {}
    for name, extra in (("frozen", []), ("fixed", ["--input-shape", "input=1,576", "--input-shape", "state=2,1,128"])):
        out = outs[name] = tmp_path / f"{name}.onnx"
        res = CliRunner().invoke(cli, ["compile", str(path), "-o", str(out), "--plan", "default", "--calib",
                                       str(tmp_path / "calib.npz"), "--freeze-input", "sr=16000", *extra, "-q"])
        assert res.exit_code == 0, res.output
    top = {k: [n for n in onnx.load(v).graph.node] for k, v in outs.items()}
    lstm = [n for n in top["fixed"] if n.op_type == "LSTM"]
    assert len(lstm) == 1 and not [n for n in top["frozen"] if n.op_type == "LSTM"]
    producers = {o: n.op_type for n in top["fixed"] for o in n.output}
    assert producers[lstm[0].input[1]] in ("DequantizeLinear", "Mul")  # W and R read int8 codes
    assert producers[lstm[0].input[2]] in ("DequantizeLinear", "Mul")
    sizes = {k: v.stat().st_size for k, v in outs.items()}
    assert sizes["fixed"] < 0.7 * sizes["frozen"]  # measured 351,015 vs 1,289,871 bytes
    sess = ort.InferenceSession(str(outs["fixed"]), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    got = []
    for feed in evals:
        prob, state = sess.run(None, {**feed, "state": state})
        got.append(prob)
    r, g = np.concatenate(ref), np.concatenate(got)
    assert sqnr(r, g) >= 12.0  # measured 15.1 dB, 31 of 32 decisions alike (frozen only: 15.0, the LSTM float)
    assert np.mean((r > 0.5) == (g > 0.5)) >= 0.93


def test_budget_with_input_shape_specializes_first(tmp_path):
    """--budget measures the model file it is given: compile_model first writes the float model specialized at
    the shape (freeze-inputs / fix-shapes and cleanup only: the same function, no If left) and plans that file.
    Oracle: the two steps done by hand (compile --pipeline cleanup, then compile --budget) write the same bytes;
    the user's model is still guarded as an input (an output over it is refused)."""
    src, special, planned = tmp_path / "shapes.onnx", tmp_path / "special.onnx", tmp_path / "planned.onnx"
    onnx.save(shape_model(), src)
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 1, D)).astype(np.float32))
    calib = str(tmp_path / "calib.npz")
    run = CliRunner().invoke
    one = run(cli, ["compile", str(src), "-o", str(tmp_path / "one.onnx"), "--calib", calib,
                    "--input-shape", f"x=1,{D}", "--budget", "60%", "--report", str(tmp_path / "r.json")])
    assert one.exit_code == 0, one.output
    assert f"specialized first (a float model, then planned under --budget): fix-shapes{{shapes=x=1x{D}}},cleanup" \
        in one.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["input"] == str(src) and report["specialized"]["input_shapes"] == [f"x=1,{D}"]
    step1 = run(cli, ["compile", str(src), "-o", str(special), "--input-shape", f"x=1,{D}", "--pipeline", "cleanup"])
    assert step1.exit_code == 0, step1.output
    m = onnx.load(special)
    ops = [n.op_type for n in m.graph.node]
    assert "If" not in ops and "MatMul" in ops and "DequantizeLinear" not in ops  # float, the then-branch inlined
    feeds = [{"x": np.random.default_rng(200 + s).standard_normal((1, D)).astype(np.float32)} for s in range(8)]
    ref = np.concatenate([_run(src, f)[0] for f in feeds])
    np.testing.assert_array_equal(np.concatenate([_run(special, f)[0] for f in feeds]), ref)
    step2 = run(cli, ["compile", str(special), "-o", str(planned), "--calib", calib, "--budget", "60%", "-q"])
    assert step2.exit_code == 0, step2.output
    assert (tmp_path / "one.onnx").read_bytes() == planned.read_bytes()
    weights = [numpy_helper.to_array(t) for t in onnx.load(planned).graph.initializer if len(t.dims) == 2]
    assert weights and all(w.dtype != np.float32 for w in weights)  # the branch's weight quantized (int8 / int4)
    assert planned.stat().st_size <= 0.6 * special.stat().st_size
    assert sqnr(ref, np.concatenate([_run(planned, f)[0] for f in feeds])) >= 20.0
    before = src.read_bytes()
    over = run(cli, ["compile", str(src), "-o", str(src), "--calib", calib, "--input-shape", f"x=1,{D}",
                     "--budget", "60%"])
    assert over.exit_code == 2 and "Traceback" not in over.output and src.read_bytes() == before


def test_compile_plan_alone_refuses_budget_with_input_shape(tmp_path):
    src = tmp_path / "shapes.onnx"
    onnx.save(shape_model(), src)
    with pytest.raises(UserError, match=r"use qcompiler\.api\.compile_model, which specializes the model first"):
        compile_plan(src, tmp_path / "q.onnx", CompileOptions(calib="random", budget="60%",
                                                               input_shapes=(f"x=1,{D}",)), planner=lambda p: p)


def test_plan_command_with_input_shape_plans_the_specialized_model(tmp_path):
    """`plan --input-shape` plans what `compile --input-shape` compiles: its rules name the inlined branch's layers,
    and compiling the model with the same flag and that plan matches every rule (no warning) and quantizes them."""
    src, plan = tmp_path / "shapes.onnx", tmp_path / "p.yaml"
    onnx.save(shape_model(), src)
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 1, D)).astype(np.float32))
    calib = str(tmp_path / "calib.npz")
    run = CliRunner().invoke
    res = run(cli, ["plan", str(src), "--input-shape", f"x=1,{D}", "--budget", "60%", "--calib", calib, "-o", str(plan),
                    "--no-presets", "-q"])  # per-layer rules (a uniform preset names no layer)
    assert res.exit_code == 0, res.output
    text = plan.read_text()
    assert "mm1" in text and "mm2" not in text  # the branch a 1-row x takes, and only it
    out = tmp_path / "q.onnx"
    comp = run(cli, ["compile", str(src), "-o", str(out), "--input-shape", f"x=1,{D}", "--plan", str(plan),
                     "--calib", calib])
    assert comp.exit_code == 0, comp.output
    assert "match no node" not in comp.output and "WARNING" not in comp.output
    q = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    matmuls = [n for n in q.graph.node if n.op_type in ("MatMul", "MatMulNBits")]
    assert matmuls and not any(n.input[1] in inits and inits[n.input[1]].dtype == np.float32 for n in matmuls)
    assert any((a.ndim == 2 and a.dtype.kind in "iu") or a.dtype.name.endswith("int4") for a in inits.values())
    without = run(cli, ["plan", str(src), "--budget", "60%", "--calib", calib, "--no-presets", "-q"])  # the If hides them
    assert without.exit_code != 0 or "mm1" not in without.output
