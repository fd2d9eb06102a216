"""ort-load-time-dequant on MatMul weights no onnxruntime integer kernel takes (4-bit codes or block-wise scales
next to a dequantized 8-bit activation: ``w4a8``'s MatMul rule) and on 4-bit per-row Gather tables
(ort-gather-block-quantized): the weight dequantized once at session load instead of at every inference.

Oracles: numpy's ``(q - z) * s`` over the file's own codes, scales and zero points (bit for bit), the same compile
without ``lower`` (onnxruntime's DequantizeLinear; outputs bit for bit without graph optimizations), and the
optimized session's op list (the dequantization folded away)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.core.context import CompileContext
from qcompiler.plan import Plan
from qcompiler.runtime_targets import DEFAULT_PIPELINE, get_target
from qcompiler.runtime_targets.ort.load_time_dequant import OrtLoadTimeDequantPass

NO_LOWER = DEFAULT_PIPELINE.replace(",lower", "")
K, N = 96, 40
INT4 = (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4))


def _matmul_model() -> onnx.ModelProto:
    """y = MatMul(x, W) with x [1, 8, K] and W [K, N] (opset 21: int4 block-wise DequantizeLinear)."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((K, N)) * np.exp(rng.normal(0, 0.4, (1, N)))).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="proj")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, N])],
                          [numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def _compile(tmp: Path, weight: dict[str, Any], activation: dict[str, Any], pipeline: str | None = None,
             name: str = "q") -> tuple[onnx.ModelProto, dict[str, Any]]:
    src = tmp / "m.onnx"
    onnx.save(_matmul_model(), src)
    out = tmp / f"{name}.onnx"
    plan = Plan.from_dict({"version": 1, "defaults": {"weight": weight, "activation": activation}})
    res = compile_model(src, out, CompileOptions(plan=plan, calib="random", validate=False, pipeline=pipeline))
    stats = {k: v for r in res.records for k, v in r.stats.items()}
    return onnx.load(str(out)), stats


def _tagged(model: onnx.ModelProto, pass_name: str = "ort-load-time-dequant") -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if {p.key: p.value for p in n.metadata_props}.get(ir.TAG_KEY) == pass_name]


def _feeds(n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(9)
    return [{"x": rng.standard_normal((1, 8, K)).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], optimize: bool,
         outputs: list[str] | None = None) -> list[list[np.ndarray]]:
    s = ir.session(model, threads=1, optimize=optimize)
    return [s.run(outputs, f) for f in feeds]


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return m


@pytest.mark.parametrize("weight", [
    {"dtype": "int4", "granularity": "block", "block_size": 32, "symmetric": False},  # w4a8's MatMul rule
    {"dtype": "int4", "granularity": "block", "block_size": 32},
    {"dtype": "uint4", "granularity": "block", "block_size": 16, "symmetric": False},
    {"dtype": "int4", "granularity": "per_channel", "symmetric": False},  # one scale per column
    {"dtype": "int4", "granularity": "block", "block_size": 32, "symmetric": False, "scale": "float16"},
], ids=["int4-block32-asym", "int4-block32-sym", "uint4-block16", "int4-per-column", "int4-block32-f16-scale"])
def test_matmul_weight_dequantized_at_load_bit_for_bit(tmp_path: Path, weight: dict[str, Any]) -> None:
    act = {"dtype": "uint8"}
    low, stats = _compile(tmp_path, weight, act)
    plain, _ = _compile(tmp_path, weight, act, pipeline=NO_LOWER, name="plain")
    assert stats["ort-load-time-dequant.matmul_weights"] == 1
    inits = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    dq = next(n for n in plain.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    q = inits[dq.input[0]]
    if dq.input[1] in inits:
        s = inits[dq.input[1]]
    else:  # scale: float16 — the DQ reads Cast(s16)
        cast = next(n for n in plain.graph.node if dq.input[1] in n.output)
        assert cast.op_type == "Cast" and inits[cast.input[0]].dtype == np.float16
        s = inits[cast.input[0]].astype(np.float32)
    z = inits[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else np.zeros_like(s)
    assert q.dtype in INT4 and q.shape == (K, N)
    # the file keeps the 4-bit codes: read by a Cast, no DequantizeLinear on them any more
    low_inits = {t.name: t for t in low.graph.initializer}
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] in low_inits and
                   low_inits[n.input[0]].data_type in (TensorProto.INT4, TensorProto.UINT4) for n in low.graph.node)
    made = _tagged(low)
    assert any(n.op_type == "Cast" and n.input[0] == dq.input[0] for n in made)
    assert any(n.op_type == "Sub" for n in made) == bool(np.any(z.astype(np.int8)))
    assert made[-1].output[0] == dq.output[0]  # the DQ's output, as exact-weights expects
    # numpy oracle: (q - z) * s per block (or per column), bit for bit
    qf, zf = q.astype(np.float32), z.astype(np.float32)
    if weight["granularity"] == "block":
        b = weight["block_size"]
        want = ((qf.reshape(K // b, b, N) - zf[:, None, :]) * s[:, None, :]).reshape(K, N)
    else:
        want = (qf - zf) * s
    feeds = _feeds()
    got = _run(_with_output(low, dq.output[0]), feeds[:1], optimize=False)[0][1]
    assert np.array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
    # the model: bit for bit the DequantizeLinear graph's without optimizations; folded with them
    for a, c in zip(_run(low, feeds, False), _run(plain, feeds, False), strict=True):
        assert np.array_equal(a[0], c[0])
    ops = ir.optimized_op_types(low)
    assert "Cast" not in ops and ops.get("DequantizeLinear", 0) == 1, ops  # only the activation's DQ runs
    for a, c in zip(_run(low, feeds, True), _run(plain, feeds, False), strict=True):
        assert float(np.abs(a[0] - c[0]).max()) <= 1e-5 * float(np.abs(c[0]).max())


def test_matmul_must_not_match_integer_kernels_or_weight_only(tmp_path: Path) -> None:
    """int8 per-column weights next to a uint8 activation: onnxruntime's integer MatMul kernel reads the DQ pair
    (kept); an int4 weight-only MatMul goes to MatMulNBits (lower-matmulnbits), not here; a second run of the
    pass on a rewritten graph changes nothing."""
    int8, stats8 = _compile(tmp_path, {"dtype": "int8", "granularity": "per_channel"}, {"dtype": "uint8"})
    assert not _tagged(int8) and not stats8.get("ort-load-time-dequant.matmul_weights")
    assert "MatMulIntegerToFloat" in ir.optimized_op_types(int8) or "QLinearMatMul" in ir.optimized_op_types(int8)
    wo, _ = _compile(tmp_path, {"dtype": "int4", "granularity": "block", "block_size": 32}, {"dtype": "float"},
                     name="wo")
    assert not _tagged(wo) and any(n.op_type == "MatMulNBits" for n in wo.graph.node)
    low, _ = _compile(tmp_path, {"dtype": "int4", "granularity": "block", "block_size": 32, "symmetric": False},
                      {"dtype": "uint8"}, name="again")
    graph, meta = ir.import_graph(low)
    plan = Plan.from_dict({"version": 1})
    ctx = CompileContext(graph=graph, meta=meta, plan=plan, target=get_target("ort"))
    assert not OrtLoadTimeDequantPass().run(ctx).modified


# ------------------------------------------------------------------------------------------ Gather tables
def _gather_model(v: int = 1000, d: int = 96) -> tuple[onnx.ModelProto, np.ndarray]:
    rng = np.random.default_rng(7)
    table = (rng.standard_normal((v, d)) * np.exp(rng.normal(0, 0.5, (v, 1))) * 0.05).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gather", ["E", "ids"], ["y"], name="lookup", axis=0)], "g",
                          [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, d])],
                          [numpy_helper.from_array(table, "E")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m, table


@pytest.mark.parametrize("dtype", ["int4", "uint4"])
def test_four_bit_per_row_table_dequantized_at_load(tmp_path: Path, dtype: str) -> None:
    """A table at one 4-bit scale (and zero point) per row — w4a8's per-channel default on a Gather — is
    dequantized at session load: the lookup bit for bit numpy's ``(q - z) * s`` rows, the zero points kept as
    4-bit codes in the file; with ``gather_block_quantized: true`` the DequantizeLinear stays (no such layout)."""
    model, table = _gather_model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    rule = {"match": {"op_type": "Gather"}, "weight": {"dtype": dtype, "granularity": "per_channel",
                                                        "symmetric": False}}
    outs = {}
    for name, pipeline, gbq in (("low", None, False), ("plain", NO_LOWER, False), ("gbq", None, True)):
        plan = Plan.from_dict({"version": 1, "rules": [rule], "targets": {"ort": {"gather_block_quantized": gbq}}})
        outs[name] = tmp_path / f"{name}.onnx"
        res = compile_model(src, outs[name], CompileOptions(plan=plan, calib="random", validate=False,
                                                            pipeline=pipeline))
        if name == "low":
            stats = {k: v for r in res.records for k, v in r.stats.items()}
            assert stats["ort-gather-block-quantized.dequantized_at_load"] == 1
        if name == "gbq":
            stats = {k: v for r in res.records for k, v in r.stats.items()}
            assert stats["ort-gather-block-quantized.skipped_layout"] == 1
    plain = onnx.load(str(outs["plain"]))
    inits = {t.name: numpy_helper.to_array(t) for t in plain.graph.initializer}
    dq = next(n for n in plain.graph.node if n.op_type == "DequantizeLinear")
    q, s, z = inits[dq.input[0]], inits[dq.input[1]], inits[dq.input[2]]
    assert q.dtype in INT4 and s.shape == (table.shape[0],) and {a.name: a.i for a in dq.attribute} == {"axis": 0}
    low = onnx.load(str(outs["low"]))
    low_inits = {t.name: t for t in low.graph.initializer}
    assert not [n for n in low.graph.node if n.op_type == "DequantizeLinear"]
    zp = [n for n in _tagged(low, "ort-gather-block-quantized") if n.op_type == "Cast" and n.input[0] != dq.input[0]]
    assert len(zp) == 1 and low_inits[zp[0].input[0]].data_type in (TensorProto.INT4, TensorProto.UINT4)
    deq = (q.astype(np.float32) - z.astype(np.float32)[:, None]) * s[:, None]
    rng = np.random.default_rng(11)
    feeds = [{"ids": rng.integers(0, table.shape[0], size=(1, 16)).astype(np.int64)} for _ in range(4)]
    for f, got in zip(feeds, _run(low, feeds, True), strict=True):
        assert np.array_equal(got[0].view(np.uint32), deq[f["ids"]].astype(np.float32).view(np.uint32))
    assert "Cast" not in ir.optimized_op_types(low)  # folded at session start
    assert any(n.op_type == "DequantizeLinear" for n in onnx.load(str(outs["gbq"])).graph.node)
    # the codes are the plan's: within half a step of the float table
    assert float(np.max(np.abs(deq - table) / s[:, None])) <= 0.5 + 1e-4



def test_matmul_weights_beyond_the_memory_bound_keep_their_dequantize(tmp_path: Path, monkeypatch) -> None:
    """The session would hold a load-time weight as float: beyond ``MATMUL_LOAD_BYTES`` of them the DQ stays (one
    weight of K x N float32 = 15,360 bytes here), counted as ``skipped_memory``."""
    from qcompiler.runtime_targets.ort import load_time_dequant

    weight = {"dtype": "int4", "granularity": "block", "block_size": 32, "symmetric": False}
    monkeypatch.setattr(load_time_dequant, "MATMUL_LOAD_BYTES", 4 * K * N - 1)
    low, stats = _compile(tmp_path, weight, {"dtype": "uint8"})
    assert stats["ort-load-time-dequant.skipped_memory"] == 1 and not _tagged(low)
    assert sum(n.op_type == "DequantizeLinear" for n in low.graph.node) == 2  # the activation's and the weight's
    monkeypatch.setattr(load_time_dequant, "MATMUL_LOAD_BYTES", 4 * K * N)
    low, stats = _compile(tmp_path, weight, {"dtype": "uint8"}, name="fits")
    assert stats["ort-load-time-dequant.matmul_weights"] == 1 and _tagged(low)
