"""External data (issue 6): lazy, checked loading (memory-mapped tensor by tensor), streamed writing, sessions for
models whose weights live in files, and the path checks against hostile locations (CVE-2024-27318 / 27319).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.cli import cli
from qcompiler.core.errors import UserError

K, N = 256, 128


def _model(seed: int = 0) -> onnx.ModelProto:
    """x[1, 4, K] -> MatMul W1[K, K] -> Relu -> MatMul W2[K, N] (+ bias fp16 cast) -> y; a few small tensors."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((K, K)) / 16).astype(np.float32)
    w2 = (rng.standard_normal((K, N)) / 16).astype(np.float32)
    b16 = rng.standard_normal(N).astype(np.float16)
    shape = np.array([1, 4, N], np.int64)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["m"], name="mm2"),
             helper.make_node("Cast", ["B16"], ["b"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["m", "b"], ["a"], name="add"),
             helper.make_node("Reshape", ["a", "shape"], ["y"], name="reshape")]
    g = helper.make_graph(nodes, "ext", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, N])],
                          [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
                           numpy_helper.from_array(b16, "B16"), numpy_helper.from_array(shape, "shape")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def _save_external(model: onnx.ModelProto, folder: Path, location: str = "weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    onnx.save_model(m, str(folder / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return folder / "model.onnx"


def _feeds(n: int = 6) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(7)
    return [{"x": rng.standard_normal((1, 4, K)).astype(np.float32)} for _ in range(n)]


def _sqnr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(10 * np.log10((a * a).sum() / ((a - b) ** 2).sum()))


# ------------------------------------------------------------------------------------------------ loading
def test_load_is_lazy_and_import_maps_tensor_by_tensor(tmp_path: Path) -> None:
    ref = _model()
    path = _save_external(ref, tmp_path / "m")
    m = ir.load_model(path)
    ext = {t.name: {e.key: e.value for e in t.external_data} for t in m.graph.initializer}
    big = {"W1", "W2"}  # >= MMAP_MIN_BYTES: left in the file; the small ones are read at load
    assert all((t.data_location == TensorProto.EXTERNAL) == (t.name in big) for t in m.graph.initializer)
    ext = {k: v for k, v in ext.items() if k in big}
    data = (tmp_path / "m" / "weights.bin").resolve()
    assert {v["location"] for v in ext.values()} == {str(data)}  # resolved, checked, still not read
    graph, _ = ir.import_graph(m)
    consts = {c.name: c for c in ir.all_constants(graph)}
    w1 = consts["W1"].values
    assert isinstance(w1, np.memmap) and not w1.flags.writeable and Path(w1.filename) == data
    assert not isinstance(consts["shape"].values, np.memmap)  # small: read
    for t in ref.graph.initializer:
        got = consts[t.name].values
        want = numpy_helper.to_array(t)
        assert got.dtype == want.dtype and np.array_equal(got, want), t.name
    # release: the constant no longer maps the file
    ir.release_values(consts["W1"])
    assert consts["W1"].values.shape == (0,)


def test_check_model_with_external_tensors_leaves_the_proto_unchanged(tmp_path: Path) -> None:
    m = ir.load_model(_save_external(_model(), tmp_path / "m"))
    before = m.SerializeToString()
    ir.check_model(m, full=True)
    assert m.SerializeToString() == before
    bad = onnx.ModelProto()
    bad.CopyFrom(m)
    bad.graph.node[0].input[1] = "nowhere"
    with pytest.raises(UserError, match="fails the ONNX checker"):
        ir.check_model(bad)


def test_session_reads_external_tensors_from_their_folder(tmp_path: Path) -> None:
    ref = _model()
    m = ir.load_model(_save_external(ref, tmp_path / "m"))
    feed = _feeds(1)[0]
    want = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    got = ir.session(m).run(None, feed)[0]
    assert np.array_equal(got, want)
    assert all(os.path.isabs(e.value) for t in m.graph.initializer for e in t.external_data if e.key == "location")


def test_unresolved_external_tensor_is_refused(tmp_path: Path) -> None:
    path = _save_external(_model(), tmp_path / "m")
    raw = onnx.load(str(path), load_external_data=False)
    with pytest.raises(UserError, match="was not checked"):
        ir.import_graph(raw)


def test_packed_int4_external_tensor(tmp_path: Path) -> None:
    q = np.arange(-8, 8, dtype=np.int8).reshape(4, 4).astype(ml_dtypes.int4)
    t = numpy_helper.from_array(q, "q")
    g = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq")], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
                          [t, numpy_helper.from_array(np.array(0.5, np.float32), "s")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    path = _save_external(m, tmp_path / "m")
    graph, _ = ir.import_graph(ir.load_model(path))
    got = next(c for c in ir.all_constants(graph) if c.name == "q").values
    assert got.dtype == np.dtype(ml_dtypes.int4) and np.array_equal(got.astype(np.int8), q.astype(np.int8))


# ------------------------------------------------------------------------------------------------ writing
def test_writer_streams_aligned_tensors_and_the_result_runs(tmp_path: Path) -> None:
    ref = _model()
    graph, meta = ir.import_graph(ref)
    files = ir.write_model(graph, meta, tmp_path / "out.onnx", external_data_threshold=1024)
    assert [f.name for f in files] == ["out.onnx", "out.onnx.data"]
    raw = onnx.load(str(tmp_path / "out.onnx"), load_external_data=False)
    ext = {t.name: {e.key: e.value for e in t.external_data} for t in raw.graph.initializer
           if t.data_location == TensorProto.EXTERNAL}
    assert set(ext) == {"W1", "W2"}  # B16 (256 B) and shape (24 B) stay inline
    assert all(v["location"] == "out.onnx.data" and int(v["offset"]) % 64 == 0 for v in ext.values())
    full = onnx.load(str(tmp_path / "out.onnx"))
    for t in ref.graph.initializer:
        got = next(x for x in full.graph.initializer if x.name == t.name)
        assert np.array_equal(numpy_helper.to_array(got), numpy_helper.to_array(t))
    feed = _feeds(1)[0]
    a = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    b = ir.session(tmp_path / "out.onnx").run(None, feed)[0]
    assert np.array_equal(a, b)


def test_large_tensors_start_on_64k_boundaries(tmp_path: Path) -> None:
    big = np.ones((600, 1000), np.float32)  # 2.4 MB >= EXTERNAL_ALIGN_MIN_BYTES
    small = np.ones((100,), np.float32) * 2
    g = gs.Graph(inputs=[], outputs=[], opset=17)
    x = gs.Variable("x", dtype=np.float32, shape=[1, 600])
    y = gs.Variable("y", dtype=np.float32, shape=[1, 1000])
    z = gs.Variable("z", dtype=np.float32, shape=[1, 1000])
    g.inputs, g.outputs = [x], [z]
    g.nodes = [gs.Node("MatMul", "mm", inputs=[x, gs.Constant("W", big)], outputs=[y]),
               gs.Node("Mul", "mul", inputs=[y, gs.Constant("s", small)], outputs=[z])]
    with ir.ExternalDataWriter(tmp_path / "d.bin", threshold=0) as w:
        ir.export_model(g, None, external=w)
    refs = w._done.values()
    offsets = sorted(off for off, length, _, _ in refs if length >= ir.EXTERNAL_ALIGN_MIN_BYTES)
    assert offsets and all(o % ir.EXTERNAL_ALIGN == 0 for o in offsets)


def test_save_model_copies_external_tensors(tmp_path: Path) -> None:
    ref = _model()
    m = ir.load_model(_save_external(ref, tmp_path / "m"))
    before = m.SerializeToString()
    files = ir.save_model(m, tmp_path / "copy" / "c.onnx")
    assert m.SerializeToString() == before  # not modified
    assert [f.name for f in files] == ["c.onnx", "c.onnx.data"]
    full = onnx.load(str(tmp_path / "copy" / "c.onnx"))
    for t in ref.graph.initializer:
        got = next(x for x in full.graph.initializer if x.name == t.name)
        assert np.array_equal(numpy_helper.to_array(got), numpy_helper.to_array(t))


def test_graph_session_through_a_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Graphs above NO_PREPACK_BYTES go to onnxruntime via a temporary folder (lowered here to exercise it)."""
    ref = _model()
    graph, _ = ir.import_graph(ir.load_model(_save_external(ref, tmp_path / "m")))
    feed = _feeds(1)[0]
    a = ir.graph_session(graph, extra_outputs=["h"]).run(["y", "h"], feed)
    monkeypatch.setattr("qcompiler.ir.sessions.NO_PREPACK_BYTES", 1024)  # where graph_session reads it
    b = ir.graph_session(graph, extra_outputs=["h"]).run(["y", "h"], feed)
    # same graph and weights; only MLAS's kernel path differs (no weight pre-packing for large models)
    assert all(np.allclose(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(a, b))


# --------------------------------------------------------------------------------------------- compiling
@pytest.mark.parametrize("plan,floor", [("w8a8", 30.0), ("w4a16", 18.0)])
def test_compile_external_in_external_out_same_numbers_as_inline(tmp_path: Path, plan: str, floor: float) -> None:
    ref = _model()
    inline = tmp_path / "inline.onnx"
    inline.write_bytes(ref.SerializeToString())
    ext = _save_external(ref, tmp_path / "ext")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.stack([f["x"] for f in _feeds(8)]))
    outs = {}
    for name, src in (("inline", inline), ("external", ext)):
        out = tmp_path / f"q_{name}" / "q.onnx"
        res = CliRunner().invoke(cli, ["compile", str(src), "-o", str(out), "--plan", plan, "--calib", str(calib)])
        assert res.exit_code == 0, res.stderr
        outs[name] = out
    assert not (tmp_path / "q_inline" / "q.onnx.data").exists()
    assert (tmp_path / "q_external" / "q.onnx.data").is_file()  # external data in, external data out
    a, b = onnx.load(str(outs["inline"])), onnx.load(str(outs["external"]))
    assert {t.name: numpy_helper.to_array(t).tobytes() for t in a.graph.initializer} == \
           {t.name: numpy_helper.to_array(t).tobytes() for t in b.graph.initializer}
    if plan == "w4a16":
        assert {n.op_type for n in b.graph.node} >= {"MatMulNBits"}
    sess_f = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"])
    sess_q = ir.session(outs["external"])
    for feed in _feeds(4):
        assert _sqnr(sess_f.run(None, feed)[0], sess_q.run(None, feed)[0]) >= floor


def test_output_data_file_may_not_overwrite_the_inputs_data(tmp_path: Path) -> None:
    src = _save_external(_model(), tmp_path / "m", location="q.onnx.data")
    before = (tmp_path / "m" / "q.onnx.data").read_bytes()
    res = CliRunner().invoke(cli, ["compile", str(src), "-o", str(tmp_path / "m" / "q.onnx"), "--calib", "none"])
    assert res.exit_code == 2 and "q.onnx.data" in res.stderr
    assert (tmp_path / "m" / "q.onnx.data").read_bytes() == before


# -------------------------------------------------------------------------------------------- path checks
@pytest.mark.parametrize("location,message", [
    ("/etc/passwd", "is absolute; refused"),
    ("../outside.bin", "contains '..'; refused"),
    ("a/../../outside.bin", "contains '..'; refused"),
    ("..\\outside.bin", "contains '..'; refused"),
    ("C:\\weights.bin", "is absolute; refused"),
    ("link.bin", "resolves outside the model folder; refused"),
    ("linkdir/weights.bin", "resolves outside the model folder; refused"),
    ("inside_link.bin", None),  # a symlink that stays inside the folder is fine
])
def test_external_location_checks(tmp_path: Path, location: str, message: str | None) -> None:
    folder = tmp_path / "m"
    path = _save_external(_model(), folder)
    outside = tmp_path / "outside.bin"
    outside.write_bytes((folder / "weights.bin").read_bytes())
    (folder / "link.bin").symlink_to(outside)
    (tmp_path / "odir").mkdir()
    (tmp_path / "odir" / "weights.bin").write_bytes(outside.read_bytes())
    (folder / "linkdir").symlink_to(tmp_path / "odir")
    (folder / "inside_link.bin").symlink_to(folder / "weights.bin")
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(m.SerializeToString())
    if message is None:
        graph, _ = ir.import_graph(ir.load_model(path))
        assert np.array_equal(next(c for c in ir.all_constants(graph) if c.name == "W1").values,
                              numpy_helper.to_array(_model().graph.initializer[0]))
        return
    with pytest.raises(UserError, match=re.escape(message)) as e:
        ir.load_model(path)
    assert "model.onnx: tensor '" in str(e.value)
