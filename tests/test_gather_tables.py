"""Quantized Gather tables (embeddings): the plan, insert-qdq, the ort lowering, and the text_encoder fixture."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.plan import TABLE_MIN_BYTES, Plan

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
FLOAT_FIXTURES = ["conv_bn_relu", "depthwise", "convtranspose_bn", "gemm_head", "transformer_block", "shared_weight",
                  "fp16_conv", "opset11_constants"]


def _run(path: Path | bytes, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(path if isinstance(path, bytes) else str(path), so, providers=["CPUExecutionProvider"])
    return [s.run(None, f)[0] for f in feeds]


def _sqnr(ref: list[np.ndarray], q: list[np.ndarray]) -> float:
    r = np.concatenate([np.ravel(x) for x in ref]).astype(np.float64)
    d = r - np.concatenate([np.ravel(x) for x in q]).astype(np.float64)
    return float(10 * np.log10(np.sum(r * r) / np.sum(d * d)))


def _encoder_feeds() -> tuple[Path, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """text_encoder: calibration = samples 0..23 (an .npz written to tmp by the caller), evaluation = 24..31."""
    with np.load(MODELS / "text_encoder.npz") as z:
        ids = z["input_ids"]
    return MODELS / "text_encoder.onnx", [{"input_ids": ids[i]} for i in range(24)], \
        [{"input_ids": ids[i]} for i in range(24, 32)]


def _write_calib(tmp: Path, feeds: list[dict[str, np.ndarray]]) -> str:
    p = tmp / "calib.npz"
    np.savez(p, **{k: np.stack([f[k] for f in feeds]) for k in feeds[0]})
    return str(p)


def _nodes(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path)).graph.node)


# ------------------------------------------------------------------------------------------------ the plan
def test_default_plan_quantizes_large_tables_per_row_and_leaves_small_ones_float() -> None:
    model = onnx.load(str(MODELS / "text_encoder.onnx"))
    graph, _ = ir.import_graph(model)
    np_ = Plan.default().resolve(graph, warn=False).nodes["embeddings.word"]
    assert np_.weight_inputs == (0,) and np_.activation is None
    assert np_.weight is not None and (np_.weight.dtype, np_.weight.granularity) == ("int8", "per_channel")

    small = _gather_model(np.ones((100, 32), np.float32))  # 12.5 KiB < 64 KiB
    g, _ = ir.import_graph(small)
    sp = Plan.default().resolve(g, warn=False).nodes["lookup"]
    assert sp.weight is None and "table under 64 KiB" in sp.reason
    ruled = Plan.from_dict({"version": 1, "rules": [{"match": {"op_type": "Gather"}, "weight": {"dtype": "int8"}}]})
    assert ruled.resolve(g, warn=False).nodes["lookup"].weight is not None  # a rule that sets weight: any size


@pytest.mark.parametrize("name", FLOAT_FIXTURES)
def test_existing_fixtures_have_no_quantized_gather(name: str) -> None:
    """The default plan's outputs of the other fixtures stay byte-identical: none has a constant table >= 64 KiB
    (checked on the resolved plan; the compiled bytes were compared before and after this change)."""
    graph, _ = ir.import_graph(onnx.load(str(MODELS / f"{name}.onnx")))
    resolved = Plan.default().resolve(graph, warn=False)
    assert not [n for n in resolved.nodes.values() if n.op_type == "Gather" and n.weight is not None]


# ------------------------------------------------------------------------------------------------ fixture
def test_text_encoder_int8_table_shared_with_tied_projection(tmp_path: Path) -> None:
    src, calib, ev = _encoder_feeds()
    out = tmp_path / "enc.int8.onnx"
    res = compile_model(src, out, CompileOptions(calib=_write_calib(tmp_path, calib), validate=False))
    ratio = out.stat().st_size / src.stat().st_size
    assert ratio <= 0.30, ratio  # measured 0.271
    nodes = _nodes(out)
    table_dq = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0].startswith("embeddings.word.weight")]
    assert len(table_dq) == 1  # quantized once
    readers = sorted(n.op_type for n in nodes if table_dq[0].output[0] in n.input)
    assert readers == ["Gather", "Gemm"]
    init = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    assert init[table_dq[0].input[0]].data_type == TensorProto.INT8
    assert numpy_helper.to_array(init[table_dq[0].input[1]]).shape == (4000,)  # one scale per row
    stats = {r.name: r.stats for r in res.records}
    assert stats["insert-qdq"]["weights_table_shared"] == 1
    sqnr = _sqnr(_run(src, ev), _run(out, ev))
    assert sqnr >= 30.0, sqnr  # measured 33.6 dB on the 8 held-back samples


@pytest.mark.parametrize("preset", ["w4a16", "w4a16-gptq"])  # -gptq: "as w4a16", its table too (session 16)
def test_text_encoder_int4_w4a16(tmp_path: Path, preset: str) -> None:
    src, calib, ev = _encoder_feeds()
    out = tmp_path / "enc.int4.onnx"
    compile_model(src, out, CompileOptions(plan=preset, calib=_write_calib(tmp_path, calib), validate=False))
    ratio = out.stat().st_size / src.stat().st_size
    assert ratio <= 0.17, ratio  # measured 0.160
    init = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    dq = [n for n in _nodes(out) if n.op_type == "DequantizeLinear" and n.input[0].startswith("embeddings.word")]
    assert len(dq) == 1 and init[dq[0].input[0]].data_type == TensorProto.INT4
    assert {a.name: a.i for a in dq[0].attribute} == {"axis": 1, "block_size": 64}
    sqnr = _sqnr(_run(src, ev), _run(out, ev))
    assert sqnr >= 12.0, sqnr  # measured 14.3 dB (int4 weight-only, the logits through the tied int4 table)


# ------------------------------------------------------------------------------- lowering (untied tables)
def _gather_model(table: np.ndarray, extra_matmul: bool = False) -> onnx.ModelProto:
    """y = Gather(E, ids) + 0 (and, with ``extra_matmul``, z = MatMul(x, E): the table shared)."""
    nodes = [helper.make_node("Gather", ["E", "ids"], ["g"], name="lookup", axis=0),
             helper.make_node("Relu", ["g"], ["y"], name="act")]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 16])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, table.shape[1]])]
    if extra_matmul:
        nodes.append(helper.make_node("MatMul", ["x", "E"], ["z"], name="soft_lookup"))
        inputs.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", table.shape[0]]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", table.shape[1]]))
    g = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(table, "E")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _table(v: int = 1000, d: int = 96) -> np.ndarray:
    rng = np.random.default_rng(7)
    return (rng.standard_normal((v, d)) * np.exp(rng.normal(0, 0.5, (v, 1))) * 0.05).astype(np.float32)


def _ids(n: int, v: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    return [{"ids": rng.integers(0, v, size=(1, 16)).astype(np.int64)} for _ in range(n)]


def _plan_file(tmp: Path, gbq: bool, int4: bool) -> str:
    rules = ("rules:\n  - match: {op_type: [Gather]}\n    weight: {dtype: int4, granularity: block, "
             "block_size: 32}\n") if int4 else ""
    p = tmp / "plan.yaml"
    p.write_text(f"version: 1\n{rules}targets:\n  ort: {{gather_block_quantized: {'true' if gbq else 'false'}}}\n")
    return str(p)


@pytest.mark.parametrize("int4", [False, True], ids=["int8_per_row", "int4_block32"])
def test_gather_block_quantized_bit_identical_to_numpy_reference(tmp_path: Path, int4: bool) -> None:
    table = _table()
    assert table.nbytes >= TABLE_MIN_BYTES
    src = tmp_path / "m.onnx"
    onnx.save(_gather_model(table), str(src))
    feeds = _ids(4, table.shape[0])
    outs = {}
    for gbq in (False, True):
        out = tmp_path / f"m.{gbq}.onnx"
        compile_model(src, out, CompileOptions(plan=_plan_file(tmp_path, gbq, int4), calib="random", validate=False))
        outs[gbq] = out
    nodes = _nodes(outs[True])
    gbq_nodes = [n for n in nodes if n.op_type == "GatherBlockQuantized"]
    assert len(gbq_nodes) == 1 and gbq_nodes[0].domain == "com.microsoft"
    assert not [n for n in nodes if n.op_type in ("DequantizeLinear", "Gather")]
    attrs = {a.name: a.i for a in gbq_nodes[0].attribute}
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(outs[True])).graph.initializer}
    data, scales = init[gbq_nodes[0].input[0]], init[gbq_nodes[0].input[2]]
    assert data.dtype == np.uint8 and len(gbq_nodes[0].input) == 3  # symmetric: default zero point
    if int4:
        assert attrs == {"gather_axis": 0, "quantize_axis": 1, "block_size": 32, "bits": 4}
        codes = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(table.shape[0], -1).astype(np.float32) - 8
        deq = (codes.reshape(table.shape[0], -1, 32) * scales[..., None]).reshape(table.shape)
    else:
        assert attrs == {"gather_axis": 0, "quantize_axis": 1, "block_size": 128, "bits": 8}
        deq = (data.astype(np.float32) - 128) * scales  # scales [V, 1]
    ref = [np.maximum(deq[f["ids"]], 0) for f in feeds]  # the numpy dequantized lookup (then the model's Relu)
    got_gbq, got_default = _run(outs[True], feeds), _run(outs[False], feeds)
    for r, a, b in zip(ref, got_gbq, got_default, strict=True):
        assert np.array_equal(a.view(np.uint32), r.astype(np.float32).view(np.uint32))
        assert np.array_equal(b.view(np.uint32), a.view(np.uint32))  # dequantized at load: the same bits
    # the default lowering leaves no DequantizeLinear to run per inference (Cast/Mul, folded at session load)
    assert not [n for n in _nodes(outs[False]) if n.op_type == "DequantizeLinear"]
    # the codes are the plan's: within half a step of the float table
    step = (scales if not int4 else np.repeat(scales, 32, axis=1))
    assert float(np.max(np.abs(deq - table) / step)) <= 0.5 + 1e-4


def test_table_shared_by_gather_and_matmul_quantized_once(tmp_path: Path) -> None:
    table = _table(400, 64)  # 100 KiB
    src = tmp_path / "m.onnx"
    onnx.save(_gather_model(table, extra_matmul=True), str(src))
    rng = np.random.default_rng(3)
    feeds = [{**f, "x": rng.random((1, 400)).astype(np.float32)} for f in _ids(6, 400)]
    calib = tmp_path / "c.npz"
    np.savez(calib, ids=np.stack([f["ids"] for f in feeds]), x=np.stack([f["x"] for f in feeds]))
    out = tmp_path / "q.onnx"
    res = compile_model(src, out, CompileOptions(calib=str(calib), validate=False))
    nodes = _nodes(out)
    dqs = [n for n in nodes if n.op_type == "DequantizeLinear" and n.input[0].startswith("E")]
    assert len(dqs) == 1
    assert sorted(n.op_type for n in nodes if dqs[0].output[0] in n.input) == ["Gather", "MatMul"]
    assert {a.name: a.i for a in dqs[0].attribute} == {"axis": 0}  # per row: the Gather's quantization
    stats = {r.name: r.stats for r in res.records}
    assert stats["lower"]["ort-gather-block-quantized.skipped_shared"] == 1
    so = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    sq = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ref = [so.run(None, f) for f in feeds]
    got = [sq.run(None, f) for f in feeds]
    assert _sqnr([r[0] for r in ref], [g[0] for g in got]) >= 40.0  # int8 per row, weight-only lookup: ~45 dB
    assert _sqnr([r[1] for r in ref], [g[1] for g in got]) >= 30.0  # + uint8 activations


def test_gbq_int4_codes_pack_like_onnxruntime() -> None:
    from qcompiler.runtime_targets.ort.gather_block_quantized import gbq_int4
    q = np.array([[-8, -1, 0, 7] * 8], dtype=ml_dtypes.int4)
    data, _, zp = gbq_int4(q, np.ones((1, 1), np.float32), None)
    assert zp is None and data.shape == (1, 16) and data[0, 0] == (0 | (7 << 4)) and data[0, 1] == (8 | (15 << 4))
