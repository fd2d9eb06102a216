"""ir.import_graph keeps graphsurgeon's own logger quiet: it prints to the terminal, past the CLI's -q."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from qcompiler import ir


def _fp8_model() -> onnx.ModelProto:
    codes = np.array([0.5, -1.0, 2.0, 0.0], dtype=ml_dtypes.float8_e4m3fn)
    w = helper.make_tensor("w", TensorProto.FLOAT8E4M3FN, [4], codes.view(np.uint8).tobytes(), raw=True)
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.25])
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="dq"),
             helper.make_node("Add", ["x", "wd"], ["y"], name="add")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w, s])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    return m


def test_fp8_constant_imports_silently_and_round_trips(capfd: pytest.CaptureFixture[str]) -> None:
    before = gs.logger.G_LOGGER.severity
    graph, meta = ir.import_graph(_fp8_model())
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)  # graphsurgeon would print "[W] Could not convert: FLOAT8E4M3FN"
    assert gs.logger.G_LOGGER.severity == before
    back = ir.export_model(graph, meta)
    w = next(t for t in back.graph.initializer if t.name == "w")
    assert w.data_type == TensorProto.FLOAT8E4M3FN
    x = np.array([1.0, 1.0, 1.0, 1.0], np.float32)
    got = ir.session(back.SerializeToString()).run(None, {"x": x})[0]
    assert np.array_equal(got, x + np.array([0.5, -1.0, 2.0, 0.0], np.float32) * 0.25)
