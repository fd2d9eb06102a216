"""Micro benchmark: an embedding lookup (Gather on a constant table) float vs quantized in onnxruntime CPU.

Decides how the ``ort`` target lowers a quantized table (``runtime_targets/ort/gather_block_quantized.py``):

* ``float``         ``Gather(E, ids)``, the float model;
* ``gbq_int8``      ``com.microsoft.GatherBlockQuantized`` on uint8 codes (bits 8, zero point 128: int8 + 128),
                    one scale per row (block = the row length);
* ``gbq_int4``      ``GatherBlockQuantized`` on int4 codes, one scale per block of 32 along the row;
* ``gbq_uint4``     the same codes + 8 packed two per byte in uint8 (bits 4, default zero point 8);
* ``dq_gather``     ``DequantizeLinear(int8 codes, per-row scales) -> Gather`` (standard ONNX: onnxruntime runs
                    the DequantizeLinear of the whole table at every inference);
* ``dq4_gather``    the same with int4 block-wise codes.

Each model is one node (or two) reading ``ids`` int64 ``[batch, seq]``; latency is the median of interleaved
rounds (``benchmarks/_common.latency_ms``), 1 intra-op thread::

    python benchmarks/gather_quantized.py [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import latency_ms, write_json

SHAPES = [((4000, 128), (1, 128)), ((30522, 384), (1, 128)), ((30522, 384), (8, 512))]


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None, None])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def _pack(q4: np.ndarray) -> np.ndarray:
    """int4 codes [V, D] -> uint8 [V, D/2]: code + 8, two per byte, low nibble first (MatMulNBits layout)."""
    u = (q4.astype(np.int16) + 8).astype(np.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def models(table: np.ndarray) -> dict[str, onnx.ModelProto]:
    v, d = table.shape
    s8 = (np.abs(table).max(axis=1, keepdims=True) / 127).astype(np.float32)
    q8 = np.clip(np.round(table / s8), -127, 127).astype(np.int8)
    b = 32
    s4 = (np.abs(table.reshape(v, d // b, b)).max(axis=2) / 7).astype(np.float32)
    q4 = np.clip(np.round(table.reshape(v, d // b, b) / s4[..., None]), -8, 7).reshape(v, d).astype(ml_dtypes.int4)
    gbq = "GatherBlockQuantized"
    out = {
        "float": _model([helper.make_node("Gather", ["E", "ids"], ["y"])], [numpy_helper.from_array(table, "E")]),
        "gbq_int8": _model(
            [helper.make_node(gbq, ["q", "ids", "s"], ["y"], domain="com.microsoft", gather_axis=0, quantize_axis=1,
                              block_size=1 << (d - 1).bit_length(), bits=8)],
            [numpy_helper.from_array((q8.astype(np.int16) + 128).astype(np.uint8), "q"),
             numpy_helper.from_array(s8, "s")]),
        "gbq_int4": _model(
            [helper.make_node(gbq, ["q", "ids", "s"], ["y"], domain="com.microsoft", gather_axis=0, quantize_axis=1,
                              block_size=b, bits=4)],
            [numpy_helper.from_array(q4, "q"), numpy_helper.from_array(s4, "s")]),
        "gbq_uint4": _model(
            [helper.make_node(gbq, ["q", "ids", "s"], ["y"], domain="com.microsoft", gather_axis=0, quantize_axis=1,
                              block_size=b, bits=4)],
            [numpy_helper.from_array(_pack(q4), "q"), numpy_helper.from_array(s4, "s")]),
        "dq_gather": _model(
            [helper.make_node("DequantizeLinear", ["q", "s"], ["E"], axis=0), helper.make_node("Gather", ["E", "ids"], ["y"])],
            [numpy_helper.from_array(q8, "q"), numpy_helper.from_array(s8.reshape(-1), "s")]),
        "dq4_gather": _model(
            [helper.make_node("DequantizeLinear", ["q", "s"], ["E"], axis=1, block_size=b),
             helper.make_node("Gather", ["E", "ids"], ["y"])],
            [numpy_helper.from_array(q4, "q"), numpy_helper.from_array(s4, "s")]),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for (v, d), (batch, seq) in SHAPES:
            table = (rng.standard_normal((v, d)) * 0.05).astype(np.float32)
            paths = {}
            for name, m in models(table).items():
                p = Path(tmp) / f"{name}_{v}x{d}.onnx"
                onnx.save(m, p)
                paths[name] = str(p)
            feed = {"ids": rng.integers(0, v, size=(batch, seq)).astype(np.int64)}
            lat = latency_ms(paths, feed, threads=args.threads, warmup=10, rounds=7, per_round=20)
            row = {"table": [v, d], "ids": [batch, seq],
                   **{k: round(x["median"], 4) for k, x in lat.items()},
                   "bytes": {k: Path(p).stat().st_size for k, p in paths.items()}}
            results.append(row)
            print(f"table {v}x{d} ids {batch}x{seq}: " + ", ".join(f"{k} {x['median']:.4f} ms" for k, x in lat.items()))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
