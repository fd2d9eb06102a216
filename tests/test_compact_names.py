"""compact-names: short tensor / node names, graph I/O kept, numbers unchanged, the map back in OUT.names.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.cli import cli
from qcompiler.core.context import CompileContext
from qcompiler.passes.compact_names import CompactNamesPass, short_names
from qcompiler.report.validate import load_names

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _graphs import ort_run
from test_subgraphs import _if_model, _loop_model, _scan_model

MODELS = Path(__file__).resolve().parents[1] / "models"


def _tensor_names(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    return ({t.name for t in g.initializer} | {n for node in g.node for n in [*node.input, *node.output] if n}
            | {v.name for v in g.input} | {v.name for v in g.output})


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)  # import_graph takes the tensors' data out of the proto it is given
    return out


def _tags(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _init_arrays(model: onnx.ModelProto) -> list[np.ndarray]:
    return [numpy_helper.to_array(t) for t in model.graph.initializer]


def _compile(tmp_path: Path, name: str, src: Path, **kw) -> tuple[Path, object]:  # type: ignore[no-untyped-def]
    out = tmp_path / f"{name}.onnx"
    res = compile_model(src, out, CompileOptions(calib=str(src.with_suffix(".npz")), **kw))
    return out, res


@pytest.mark.parametrize("fixture", ["conv_bn_relu", "transformer_block", "depthwise"])
def test_same_graph_same_numbers_shorter_names(tmp_path: Path, fixture: str) -> None:
    """Against the same compile without the pass: the same op sequence and the same stored arrays, outputs
    bit-identical in onnxruntime, graph I/O names kept, every other name short, the file smaller, and the names
    file leading each new name back to a name of the plain compile."""
    src = MODELS / f"{fixture}.onnx"
    plain, _ = _compile(tmp_path, "plain", src)
    short, res = _compile(tmp_path, "short", src, compact_names=True)
    a, b = onnx.load(str(plain)), onnx.load(str(short))
    onnx.checker.check_model(b, full_check=True)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    assert all(np.array_equal(x, y) for x, y in zip(_init_arrays(a), _init_arrays(b), strict=True))
    assert [v.name for v in a.graph.input] == [v.name for v in b.graph.input]
    assert [v.name for v in a.graph.output] == [v.name for v in b.graph.output]
    io = {v.name for v in b.graph.input} | {v.name for v in b.graph.output}
    assert all(len(n) <= 2 for n in _tensor_names(b) - io)
    assert all(len(n.name) <= 2 for n in b.graph.node)
    assert [_tags(n) for n in a.graph.node] == [_tags(n) for n in b.graph.node]  # tags kept
    assert short.stat().st_size < plain.stat().st_size
    data = np.load(src.with_suffix(".npz"))
    feeds = {k: data[k][0] for k in data.files}
    fa, fb = ort_run(a, feeds), ort_run(b, feeds)
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)
    names = json.loads((tmp_path / "short.names.json").read_text())
    assert names["version"] == 1
    assert set(names["tensors"]) == _tensor_names(b) - io
    assert set(names["tensors"].values()) == _tensor_names(a) - io  # each leads back to a plain-compile name
    assert set(names["nodes"].values()) == {n.name for n in a.graph.node}
    rec = {r.name: r for r in res.records}["compact-names"]  # type: ignore[attr-defined]
    assert rec.modified and rec.stats["name_bytes_saved"] > 0
    # the compile's per-layer validation compares by the original names: same layers, same numbers
    _, res_plain = _compile(tmp_path, "plain2", src)
    la = {m.name: m.sqnr_db for m in res_plain.validation.layers}  # type: ignore[attr-defined]
    lb = {m.name: m.sqnr_db for m in res.validation.layers}  # type: ignore[attr-defined]
    assert la and la == lb


def test_idempotent_and_io_names_never_taken(tmp_path: Path) -> None:
    """Graph inputs / outputs named like generated names ('0', '2') keep their names and no other tensor takes
    them; a second run changes nothing; the model still runs to the same result."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "weight.long.name")
    nodes = [helper.make_node("MatMul", ["0", "weight.long.name"], ["hidden.long"], name="matmul.long"),
             helper.make_node("Relu", ["hidden.long"], ["2"], name="relu.long")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("0", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("2", TensorProto.FLOAT, [1, 4])], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    graph, meta = ir.import_graph(_copy(m))
    ctx = CompileContext(graph=graph, meta=meta, plan=None, target=None)  # type: ignore[arg-type]
    first = CompactNamesPass().run(ctx)
    assert first.modified and first.stats["tensors_renamed"] == 2 and first.stats["nodes_renamed"] == 2
    out = ir.export_model(ctx.graph, ctx.meta)
    onnx.checker.check_model(out, full_check=True)
    assert [v.name for v in out.graph.input] == ["0"] and [v.name for v in out.graph.output] == ["2"]
    assert _tensor_names(out) == {"0", "1", "2", "3"}  # '0' and '2' skipped by the generator
    assert ctx.renamed["tensors"] == {"1": "weight.long.name", "3": "hidden.long"}
    second = CompactNamesPass().run(ctx)
    assert not second.modified and sum(second.stats.values()) == 0
    assert ctx.renamed["tensors"] == {"1": "weight.long.name", "3": "hidden.long"}  # composed: still the originals
    x = rng.standard_normal((1, 4)).astype(np.float32)
    np.testing.assert_array_equal(ort_run(m, {"0": x})["2"], ort_run(out, {"0": x})["2"])


@pytest.mark.parametrize("make,shape", [(_if_model, (1, 16)), (_loop_model, (1, 16)), (_scan_model, (6, 1, 16))],
                         ids=["if", "loop", "scan"])
def test_subgraph_bodies_and_outer_scope_references(make, shape) -> None:  # type: ignore[no-untyped-def]
    """Names inside If / Loop / Scan bodies, and the bodies' references to outer-scope tensors, are renamed
    consistently: the model passes the full checker and computes the same numbers."""
    m = make()
    graph, meta = ir.import_graph(_copy(m))
    ctx = CompileContext(graph=graph, meta=meta, plan=None, target=None)  # type: ignore[arg-type]
    assert CompactNamesPass().run(ctx).modified
    out = ir.export_model(ctx.graph, ctx.meta)
    onnx.checker.check_model(out, full_check=True)
    body_names = {n for node in out.graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
                  for b in a.g.node for n in [*b.input, *b.output]}
    assert body_names and all(len(n) <= 2 for n in body_names)
    rng = np.random.default_rng(1)
    for sign in (1.0, -1.0):
        x = (sign * np.abs(rng.standard_normal(shape))).astype(np.float32)
        np.testing.assert_array_equal(ort_run(m, {"x": x})["y"], ort_run(out, {"x": x})["y"])


def test_generator_is_shortest_first_and_skips() -> None:
    gen = short_names({"1", "a"})
    first = [next(gen) for _ in range(62)]
    assert first[:3] == ["0", "2", "3"] and "a" not in first and len(set(first)) == 62
    assert first[-3:] == ["Z", "10", "11"] and all(len(n) <= 2 for n in first)


def test_cli_validate_reads_the_names_file(tmp_path: Path) -> None:
    """`qcompiler validate` finds OUT.names.json beside the model and reports layers by their original names;
    a bad names file is one line and exit 2."""
    src = MODELS / "conv_bn_relu.onnx"
    data = src.with_suffix(".npz")
    out = tmp_path / "q.onnx"
    runner = CliRunner()
    res = runner.invoke(cli, ["compile", str(src), "-o", str(out), "--calib", str(data), "--compact-names", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "q.names.json").is_file()
    rep = tmp_path / "rep.json"
    res = runner.invoke(cli, ["validate", str(src), str(out), "--data", str(data), "--json", str(rep)])
    assert res.exit_code == 0, res.output
    layers = [la["name"] for la in json.loads(rep.read_text())["layers"]]
    originals = set(load_names(tmp_path / "q.names.json").values())
    assert layers and all(n in originals for n in layers)
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 2}')
    res = runner.invoke(cli, ["validate", str(src), str(out), "--data", str(data), "--names", str(bad)])
    assert res.exit_code == 2 and "bad.json: not a names file" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_stale_names_file_is_ignored_or_refused(tmp_path: Path) -> None:
    """A names file that does not belong to the model: beside it (a leftover), it is ignored with a warning;
    given with --names, it is refused in one line (exit 2)."""
    src = MODELS / "conv_bn_relu.onnx"
    data = src.with_suffix(".npz")
    out = tmp_path / "q.onnx"
    runner = CliRunner()
    assert runner.invoke(cli, ["compile", str(src), "-o", str(out), "--calib", str(data), "-q"]).exit_code == 0
    stale = {"version": 1, "tensors": {"zz9": "block.conv1", "zz8": "x1"}, "nodes": {}}
    (tmp_path / "q.names.json").write_text(json.dumps(stale))
    rep = tmp_path / "rep.json"
    res = runner.invoke(cli, ["validate", str(src), str(out), "--data", str(data), "--json", str(rep)])
    assert res.exit_code == 0, res.output
    assert json.loads(rep.read_text())["layers"]  # compared by the model's own names
    assert "q.names.json: not the names of" in res.stderr
    res = runner.invoke(cli, ["validate", str(src), str(out), "--data", str(data), "--names",
                              str(tmp_path / "q.names.json")])
    assert res.exit_code == 2 and "are not tensors of" in res.stderr and len(res.stderr.strip().splitlines()) == 1
