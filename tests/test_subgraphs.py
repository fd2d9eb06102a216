"""Models with subgraphs (If / Loop / Scan, issue 6): nodes inside subgraphs are left float — never broken.

The compiler quantizes the top-level graph; a subgraph body keeps its float nodes (the plan's rules see only
top-level nodes), and the passes must not break the references a body makes to outer-scope tensors. Checked
on silero-vad's ``silero_vad.onnx`` (every Conv and the LSTM sit in nested ``If`` branches) and on crafted
If / Loop / Scan models that mix a quantized top-level MatMul with float MatMuls inside bodies.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler.cli import cli

sys.path.insert(0, str(Path(__file__).resolve().parent))
import realdata

SILERO_MEMBER = "silero_vad/data/silero_vad.onnx"


def silero_if_model() -> Path:
    """``silero_vad.onnx`` (the If-based model) from the pinned silero-vad wheel that realdata caches."""
    package, version, _ = realdata.MODELS["silero_vad"]
    dest = realdata.CACHE / f"{package.replace('-', '_')}-{version}" / "silero_vad.onnx"
    if dest.is_file():
        return dest
    realdata.fetch_model("silero_vad")  # makes sure the wheel is in the cache
    wheel = sorted(realdata.CACHE.glob(f"{package.replace('-', '_')}-{version}-*.whl"))[0]
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(SILERO_MEMBER)
    fd, tmp = tempfile.mkstemp(prefix=".silero_vad.", dir=dest.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, dest)
    return dest


def walk(graph: onnx.GraphProto, depth: int = 0):  # type: ignore[no-untyped-def]
    for n in graph.node:
        yield depth, n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from walk(a.g, depth + 1)
            for g in a.graphs:
                yield from walk(g, depth + 1)


def sub_ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for d, n in walk(model.graph) if d > 0)


def sqnr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    noise = ((a - b) ** 2).sum()
    return float("inf") if noise == 0 else float(10 * np.log10((a * a).sum() / noise))


# ------------------------------------------------------------------------------------------- silero-vad
def _silero_stream(path: Path, chunks: list[np.ndarray]) -> tuple[list[dict[str, np.ndarray]], list[np.ndarray]]:
    """Run the float model chunk by chunk (state carried over); return the feeds it saw and its outputs."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    feeds, outs = [], []
    for c in chunks:
        feed = {"input": c[None, :].astype(np.float32), "state": state, "sr": np.array(16000, np.int64)}
        prob, state = sess.run(None, feed)
        feeds.append(feed)
        outs.append(prob)
    return feeds, outs


@pytest.fixture(scope="module")
def silero(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    path = silero_if_model()
    calib_clip = realdata.silero_vad_inputs(1, "calib", frames=24)[0]["input"]  # [24, 576]: context + 512
    eval_clip = realdata.silero_vad_inputs(1, "eval", frames=32)[0]["input"]
    calib, _ = _silero_stream(path, list(calib_clip))
    evals, ref = _silero_stream(path, list(eval_clip))
    tmp = tmp_path_factory.mktemp("silero")
    np.savez(tmp / "calib.npz", **{k: np.stack([f[k] for f in calib]) for k in calib[0]})
    return {"path": path, "tmp": tmp, "evals": evals, "ref": ref}


@pytest.mark.parametrize("plan", ["w8a8", "w4a16"])
def test_silero_if_model_compiles_and_runs_unchanged(silero: dict, plan: str) -> None:  # type: ignore[type-arg]
    path, tmp = silero["path"], silero["tmp"]
    src = onnx.load(str(path))
    assert sub_ops(src)["Conv"] >= 4 and sub_ops(src)["LSTM"] >= 2 and "Conv" not in {n.op_type for n in src.graph.node}
    out = tmp / f"q_{plan}.onnx"
    res = CliRunner().invoke(cli, ["compile", str(path), "-o", str(out), "--plan", plan, "--calib",
                                   str(tmp / "calib.npz")])
    assert res.exit_code == 0, res.stderr
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    # nothing inside the If branches was quantized, and no weight op was lost
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulNBits") for _, n in walk(q.graph))
    for op in ("Conv", "LSTM", "If"):
        assert sub_ops(q)[op] == sub_ops(src)[op], op
    # streamed through the quantized model, with its own state: the same speech probabilities
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    got = []
    for feed in silero["evals"]:
        prob, state = sess.run(None, {**feed, "state": state})
        got.append(prob)
    ref = np.concatenate(silero["ref"])
    assert sqnr(ref, np.concatenate(got)) >= 100.0  # float kept float (only cleanup folding may reorder math)
    assert ((ref > 0.5) == (np.concatenate(got) > 0.5)).all()


# ----------------------------------------------------------------------------------------- crafted models
D = 16


def _weights(seed: int, *names: str) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)
    return [numpy_helper.from_array((rng.standard_normal((D, D)) / 4).astype(np.float32), n) for n in names]


def _if_model() -> onnx.ModelProto:
    """x -> MatMul(W0) -> t (top level); If(sum(x) > 0): then MatMul(t, W1) (outer-scope t and W1), else Relu(t)."""
    then_g = helper.make_graph([helper.make_node("MatMul", ["t", "W1"], ["p"], name="then_mm")], "then", [],
                               [helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, D])])
    else_g = helper.make_graph([helper.make_node("Relu", ["t"], ["r"], name="else_relu")], "else", [],
                               [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, D])])
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["t"], name="top_mm"),
             helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
    g = helper.make_graph(nodes, "if_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])],
                          [*_weights(0, "W0", "W1"), numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _loop_model() -> onnx.ModelProto:
    """x -> MatMul(W0) -> Loop 3 times: h = Tanh(MatMul(h, W1)) (W1 from the outer scope) -> y."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W1"], ["m"], name="body_mm"),
         helper.make_node("Tanh", ["m"], ["h_out"], name="body_tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, D])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, D])])
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["t"], name="top_mm"),
             helper.make_node("Loop", ["trip", "true", "t"], ["y"], name="loop", body=body)]
    g = helper.make_graph(nodes, "loop_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])],
                          [*_weights(1, "W0", "W1"), numpy_helper.from_array(np.array(3, np.int64), "trip"),
                           numpy_helper.from_array(np.array(True), "true")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _scan_model() -> onnx.ModelProto:
    """x[T, 1, D] -> Scan over T: s = Tanh(MatMul(s, W1) + x_t) (W1 in the body) -> MatMul(W0) on the final state."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "W1"], ["m"], name="scan_mm"),
         helper.make_node("Add", ["m", "x_t"], ["a"], name="scan_add"),
         helper.make_node("Tanh", ["a"], ["s_out"], name="scan_tanh"),
         helper.make_node("Identity", ["s_out"], ["o_t"], name="scan_out")],
        "scan_body", [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, D]),
                      helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, D])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, D]),
         helper.make_tensor_value_info("o_t", TensorProto.FLOAT, [1, D])], initializer=_weights(2, "W1"))
    nodes = [helper.make_node("Scan", ["s0", "x"], ["s", "o"], name="scan", body=body, num_scan_inputs=1),
             helper.make_node("MatMul", ["s", "W0"], ["y"], name="top_mm")]
    g = helper.make_graph(nodes, "scan_model", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 1, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])],
                          [*_weights(3, "W0"), numpy_helper.from_array(np.zeros((1, D), np.float32), "s0")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("make,shape", [(_if_model, (1, D)), (_loop_model, (1, D)), (_scan_model, (6, 1, D))],
                         ids=["if", "loop", "scan"])
@pytest.mark.parametrize("plan", ["w8a8", "w4a16"])
def test_top_level_quantized_bodies_float(tmp_path: Path, make, shape, plan: str) -> None:  # type: ignore[no-untyped-def]
    model = make()
    onnx.checker.check_model(model, full_check=True)
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    rng = np.random.default_rng(5)
    data = rng.standard_normal((24, *shape)).astype(np.float32)
    data[::2] = np.abs(data[::2])  # the If model takes both branches
    data[1::2] = -np.abs(data[1::2])
    np.savez(tmp_path / "calib.npz", x=data[:16])
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["compile", str(src), "-o", str(out), "--plan", plan, "--calib",
                                   str(tmp_path / "calib.npz")])
    assert res.exit_code == 0, res.stderr
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    top = Counter(n.op_type for n in q.graph.node)
    assert top["MatMulNBits"] == 1 if plan == "w4a16" else top["DequantizeLinear"] >= 2  # top_mm quantized
    assert sub_ops(q) == sub_ops(model)  # bodies untouched: same ops, still float
    fs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    qs = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref = np.concatenate([fs.run(None, {"x": x})[0] for x in data[16:]])
    got = np.concatenate([qs.run(None, {"x": x})[0] for x in data[16:]])
    assert sqnr(ref, got) >= (25.0 if plan == "w8a8" else 14.0)


def test_rule_naming_a_body_node_matches_nothing(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes(_loop_model().SerializeToString())
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nrules:\n  - match: {name: body_mm}\n    weight: {dtype: int4}\n")
    res = CliRunner().invoke(cli, ["compile", str(src), "-o", str(tmp_path / "q.onnx"), "--plan", str(plan),
                                   "--calib", "random"])
    assert res.exit_code == 0, res.stderr
    assert "rules[0] (name=body_mm) matches no node" in res.stderr
    assert sub_ops(onnx.load(str(tmp_path / "q.onnx"))) == sub_ops(_loop_model())
