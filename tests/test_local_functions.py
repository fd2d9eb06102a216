"""Model-local functions a model author wrapped around layers (``DenseRelu(x, W, B)`` of a custom domain, as an
exporter's modules-as-functions option writes them) are inlined when the graph is imported, so the layers inside
are quantized like any other; the compiler's own custom ops (their reference bodies are functions) are kept as
calls. Before, the MatMul inside stayed float with no word said."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qcompiler.api import CompileOptions, compile_model
from qcompiler.core.numbers import sqnr_db
from qcompiler.ir.convert import KEPT_FUNCTION_DOMAINS, inline_functions
from qcompiler.runtime_targets.packed.functions import DOMAIN as PACKED
from qcompiler.runtime_targets.qonnx import DOMAIN as QONNX


def _model(domain: str = "custom.fn") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    body = helper.make_function(domain, "DenseRelu", ["x", "w", "b"], ["y"], [
        helper.make_node("MatMul", ["x", "w"], ["t"]),
        helper.make_node("Add", ["t", "b"], ["u"]),
        helper.make_node("Relu", ["u"], ["y"])], [helper.make_opsetid("", 17)])
    g = helper.make_graph(
        [helper.make_node("DenseRelu", ["x", "W", "B"], ["h"], domain=domain, name="dense"),
         helper.make_node("MatMul", ["h", "W2"], ["y"], name="head")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array((0.3 * rng.standard_normal((16, 32))).astype(np.float32), "W"),
         numpy_helper.from_array(np.full(32, 0.1, np.float32), "B"),
         numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "W2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)],
                          functions=[body])
    onnx.checker.check_model(m)
    return m


def test_layers_inside_a_model_local_function_are_quantized(tmp_path: Path) -> None:
    src = tmp_path / "fn.onnx"
    onnx.save(_model(), src)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, 1, 16)).astype(np.float32))
    out = tmp_path / "q.onnx"
    compile_model(src, out, CompileOptions(plan="default", calib=str(tmp_path / "calib.npz"), validate=False))
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    assert not q.functions and all(n.domain in ("", "ai.onnx") for n in q.graph.node)
    # both weights read through DequantizeLinear: the one inside the function too
    dq_weights = {n.input[0] for n in q.graph.node if n.op_type == "DequantizeLinear"} & \
        {t.name for t in q.graph.initializer}
    assert len(dq_weights) == 2, dq_weights
    assert [n.op_type for n in q.graph.node].count("MatMul") == 2
    # numerics: the float model run by onnxruntime with its function (independent of the inliner)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    want = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert sqnr_db(want, got) >= 24.0, sqnr_db(want, got)  # int8 weights and activations: measured 27.6 dB
    assert onnx.load(str(src)).functions  # the input file is untouched


def test_the_compilers_own_function_bodies_stay_calls() -> None:
    m = _model(domain="ai.qcompiler")
    assert inline_functions(m) is m
    plain = _model()
    inlined = inline_functions(plain)
    assert not inlined.functions and [n.op_type for n in inlined.graph.node] == ["MatMul", "Add", "Relu", "MatMul"]
    assert inline_functions(inlined) is inlined  # nothing left: a second import changes nothing


def test_kept_domains_are_the_targets_own() -> None:
    """ir cannot import the targets (layering): its list of the compiler's own function domains must name theirs."""
    assert {PACKED, QONNX} == set(KEPT_FUNCTION_DOMAINS)
