"""ONNX's own operator test cases (``onnx.backend.test.case.node``: each op's models, generated in memory with
their inputs and the outputs the ONNX authors computed with numpy) as models nobody wrote for us: each compiled
with its own input as calibration data (``--plan default``, validated) and the compiled model run in onnxruntime
against the recorded outputs.

Sweeping all 1,884 cases (docs/robustness.md) crashed 11 (exit 1) before the fixes they test here: outputs of
size 0 along the validation's slice axis (a zero-size ``Split``, an empty ``Slice`` / ``ReduceSum``), optional
types graphsurgeon could not export (``Optional`` / ``If`` returning an optional), and the
``Optional(type=...)`` attribute graphsurgeon drops (now refused by name); and 20 bfloat16 models refused their
own bfloat16 data (``np.savez`` stores it as raw ``|V2`` bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.backend.test.case import node as onnx_node_cases
from onnx_graphsurgeon import Constant, Graph, Node, Variable

from qcompiler.api import CompileOptions, compile_model
from qcompiler.core.errors import UserError
from qcompiler.ir.convert import copy_graph, export_model, import_graph, interface_changed
from qcompiler.ir.graph import infer_dtype
from qcompiler.report import validate as qv

#: compiled, then compared with the recorded outputs (exactly for non-float outputs, to float tolerance else:
#: these cases hold nothing the default plan quantizes)
COMPILES = ["test_split_zero_size_splits_opset18", "test_split_zero_size_splits_opset13",
            "test_reduce_sum_empty_set_non_reduced_axis_zero", "test_slice_start_out_of_bounds",
            "test_reshape_allowzero_reordered", "test_causal_conv_with_state_kernel_size_one"]
#: refused with one line naming the fault
REFUSED = {"test_if_opt": "has the type-valued attribute 'type', which the graph editor (onnx-graphsurgeon) cannot "
                          "carry",
           # opset 8: onnx's converter to 13 (per-channel scales) drops Scan-8's batch axis from the graph's inputs;
           # the load-time upgrade to 11 is not made for it either (the model stays at opset 8, a warning)
           "test_scan_sum": "upgrading opset 8 -> 13 (needed for per-channel scales) would change the graph's inputs "
                            "/ outputs"}


@pytest.fixture(scope="module")
def cases() -> dict[str, Any]:
    with np.errstate(all="ignore"):
        return {c.name: c for c in onnx_node_cases.collect_testcases(None)}


def _write(case: Any, folder: Path) -> tuple[Path, Path, dict[str, np.ndarray], list[Any]]:
    m = case.model
    inputs, outputs = case.data_sets[0]
    inits = {t.name for t in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    model, calib = folder / "m.onnx", folder / "calib.npz"
    onnx.save(m, model)
    np.savez(calib, **{n: np.asarray(a)[None] for n, a in zip(names, inputs)})
    return model, calib, dict(zip(names, inputs)), list(outputs)


#: (case, plan) pairs that crashed under another plan than the default: a double-precision attention whose
#: activation MatMuls ``w4a8``'s rules name got QuantizeLinear on double tensors (an invalid model); double
#: tensors are never quantized now, their type found through the producers (``ir.graph.infer_dtype``)
COMPILES_WITH = [("test_flexattention_double_expanded_ver26", "w4a8")]


@pytest.mark.parametrize("name,plan", [(n, "default") for n in COMPILES] + COMPILES_WITH)
def test_node_cases_compile_validate_and_match_recorded_outputs(cases: dict[str, Any], tmp_path: Path,
                                                                 name: str, plan: str) -> None:
    model, calib, feeds, expected = _write(cases[name], tmp_path)
    out = tmp_path / "out" / "q.onnx"
    res = compile_model(model, out, CompileOptions(plan=plan, calib=str(calib)))
    assert res.report["validation"]["samples"] == 1
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        e = np.asarray(e)
        assert g.shape == e.shape, (g.shape, e.shape)
        if e.dtype.kind == "f":
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)  # nothing quantized in these cases
        else:
            np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_node_cases_refused_by_name(cases: dict[str, Any], tmp_path: Path, name: str) -> None:
    model, calib, _, _ = _write(cases[name], tmp_path)
    with pytest.raises(UserError) as e:
        compile_model(model, tmp_path / "out" / "q.onnx", CompileOptions(plan="default", calib=str(calib)))
    assert REFUSED[name] in str(e.value) and len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bfloat16_data_saved_by_numpy_is_read_as_bfloat16(tmp_path: Path) -> None:
    """``np.savez`` of an ml_dtypes bfloat16 array stores raw 2-byte voids; the model input's type says what
    they are. The values arrive in calibration bit for bit."""

    g = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT, name="up")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    x = np.array([[[1.5, -2.0, 3.25], [0.0, 7.0, -0.125]]] * 4, dtype=ml_dtypes.bfloat16)
    np.savez(tmp_path / "c.npz", x=x)
    assert np.load(tmp_path / "c.npz")["x"].dtype.kind == "V"  # what numpy gives back
    source = qv.load_feeds(tmp_path / "c.npz", tmp_path / "m.onnx")
    got = [f["x"] for f in source]
    assert len(got) == 4 and all(a.dtype == ml_dtypes.bfloat16 for a in got)
    assert all(np.array_equal(a.view(np.uint16), x[0].view(np.uint16)) for a in got)
    # float32 data for a bfloat16 input is a float to float cast, as for float16 inputs
    np.savez(tmp_path / "f.npz", x=x.astype(np.float32))
    assert all(f["x"].dtype == ml_dtypes.bfloat16 for f in qv.load_feeds(tmp_path / "f.npz", tmp_path / "m.onnx"))


def test_infer_dtype_walks_back_to_a_known_type() -> None:
    x = Variable("x", dtype=np.float64, shape=[2, 3])
    t, c, w = Variable("t"), Variable("c"), Variable("w")
    y = Variable("y")
    Graph(nodes=[Node("Transpose", inputs=[x], outputs=[t]), Node("Cast", inputs=[t], outputs=[c],
                                                                      attrs={"to": TensorProto.FLOAT16}),
                 Node("Where", inputs=[Variable("m", dtype=np.bool_), c, c], outputs=[w]),
                 Node("TopK", inputs=[w, Constant("k", np.array([1]))], outputs=[y, Variable("i")])],
          inputs=[x], outputs=[y])
    assert infer_dtype(t) == np.float64 and infer_dtype(c) == np.float16 and infer_dtype(w) == np.float16
    assert infer_dtype(y) is None  # TopK: not walked (unknown stays unknown, assumed float by the plan)


def test_tensorrt_target_refuses_a_model_quantized_for_another_runtime(cases: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    """A model that already holds uint8 / per-axis QuantizeLinear (ONNX's own QuantizeLinear test) cannot meet
    TensorRT's explicit-quantization rules: its nodes, not the compiler's, broke them — one line, not exit 1."""
    model, calib, _, _ = _write(cases["test_quantizelinear_axis"], tmp_path)
    with pytest.raises(UserError) as e:
        compile_model(model, tmp_path / "out" / "q.onnx", CompileOptions(plan="default", calib=str(calib),
                                                                         target="tensorrt"))
    assert "already holds 1 QuantizeLinear / DequantizeLinear node(s)" in str(e.value)
    assert "produces uint8" in str(e.value) and not (tmp_path / "out").exists()
    # the default target compiles it (onnxruntime has no QuantizeLinear-28 kernel to validate it against)
    out = tmp_path / "ok" / "q.onnx"
    compile_model(model, out, CompileOptions(plan="default", calib=str(calib), validate=False))
    assert out.is_file()


def test_interface_changed_allows_refined_dims_only() -> None:
    """onnx's converter infers shapes: a symbolic dim made fixed is the same interface; a rank, a type, a name or a
    fixed dim changed is not (Scan-8's batch axis dropped; the dynamic-shape sweep of the operator cases refused 22
    models before refinement was allowed)."""
    def model(dims: list[Any], elem: int = TensorProto.FLOAT, name: str = "x") -> onnx.ModelProto:
        g = helper.make_graph([helper.make_node("Identity", [name], ["y"])], "g",
                              [helper.make_tensor_value_info(name, elem, dims)],
                              [helper.make_tensor_value_info("y", elem, dims)])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    base = model(["N", 3])
    assert not interface_changed(base, model([5, 3]))  # N inferred
    assert not interface_changed(base, model(["M", 3]))  # another symbol
    assert interface_changed(base, model(["N", 4]))  # a fixed dim changed
    assert interface_changed(base, model([3]))  # rank: Scan-8's batch axis dropped
    assert interface_changed(base, model(["N", 3], TensorProto.DOUBLE))
    assert interface_changed(base, model(["N", 3], name="z"))


def test_measured_default_on_scalar_outputs(cases: dict[str, Any], tmp_path: Path) -> None:
    """The measured default (16 samples: the case's input, scaled and jittered) on a model with a 0-d output (a
    softmax cross-entropy loss): its probability-output test indexed ``shape[1]`` of a 0-d array (IndexError on
    91 operator cases: losses, ``Det``, 1-D ``MatMul``, ``Einsum "->"``)."""
    case = cases["test_sce_mean"]
    m = case.model
    inputs, _ = case.data_sets[0]
    names = [i.name for i in m.graph.input]
    rng = np.random.default_rng(0)
    stacked = {n: np.stack([a] * 16) if a.dtype.kind != "f" else
               np.stack([a] + [(a * rng.uniform(0.8, 1.2)).astype(a.dtype) for _ in range(15)])
               for n, a in zip(names, inputs)}
    onnx.save(m, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **stacked)
    res = compile_model(tmp_path / "m.onnx", tmp_path / "out" / "q.onnx",
                        CompileOptions(plan="auto", calib=str(tmp_path / "c.npz")))
    assert res.report["recipe"]["candidates"]
    assert res.report["validation"]["outputs"][0]["elements"] == 16  # one value on each of the 16 samples


def test_optional_typed_graph_inputs_survive_the_graph_copy(cases: dict[str, Any]) -> None:
    """graphsurgeon imports an optional(tensor) input as a tensor whose dtype is a TypeProto and could not export
    it again (the measured default copies prepared graphs: TypeError in its exporter); it goes out untyped and
    the model's own type comes back on export."""
    m = cases["test_optional_has_element_tensor_input"].model
    graph, meta = import_graph(m, "optional")
    again = export_model(copy_graph(graph), meta)
    assert [v.type for v in again.graph.input] == [v.type for v in m.graph.input]
    assert [v.type for v in again.graph.output] == [v.type for v in m.graph.output]


#: every STRIDE-th operator case is compiled by the sweep test below (the whole corpus: docs/robustness.md)
STRIDE = 20


def test_a_slice_of_the_operator_corpus_compiles_or_says_why(cases: dict[str, Any], tmp_path: Path) -> None:
    """Every 20th of ONNX's operator cases (in their collection order), compiled with the default plan on its own
    input: each either compiles — and its compiled model runs in onnxruntime, with outputs of the recorded shapes —
    or stops with a one-line UserError; any other exception is a crash (exit 1) and fails."""
    compiled = refused = 0
    crashes = []
    for i, (name, case) in enumerate(cases.items()):
        if i % STRIDE or not case.data_sets:
            continue
        inputs, _ = case.data_sets[0]
        m = case.model
        names = [x.name for x in m.graph.input if x.name not in {t.name for t in m.graph.initializer}]
        if len(inputs) != len(names) or any(not isinstance(a, np.ndarray) or a.dtype == object for a in inputs):
            continue
        folder = tmp_path / name
        folder.mkdir()
        model, calib, feeds, expected = _write(case, folder)
        try:
            compile_model(model, folder / "o" / "q.onnx", CompileOptions(plan="default", calib=str(calib)))
        except UserError as e:
            assert len(str(e).splitlines()) == 1, (name, str(e))
            refused += 1
            continue
        except Exception as e:
            crashes.append(f"{name}: {type(e).__name__}: {e}")
            continue
        got = ort.InferenceSession(str(folder / "o" / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
        assert len(got) == len(expected), name
        for g, e in zip(got, expected):
            if isinstance(e, np.ndarray):  # (a sequence output comes back as a list)
                assert np.shape(g) == e.shape, name
        compiled += 1
    assert not crashes, crashes
    assert compiled >= 60 and refused <= 10, (compiled, refused)  # measured: 75 compile, 3 refused
