"""lower-matmulnbits (ort target): int4 block-wise weight-only MatMul -> ``com.microsoft.MatMulNBits``.

Matches ``A (float) , DequantizeLinear(Wq int4|uint4 [K, N], s [K/B, N], z, axis=0, block_size=B) -> MatMul``
where A is not itself dequantized (weight-only) and B is a power of two >= 16. MatMulNBits stores unsigned
4-bit codes ``u`` with zero point ``z_u`` (default 8): ``W[k, n] = (u[n, k] − z_u[n, k // B]) · s[n, k // B]``.
For signed int4 codes ``q`` with zero point ``z``: ``u = q + 8``, ``z_u = z + 8`` (same value). Codes are laid
out per output column ``n``, in blocks of B along K, two per byte, low nibble first; K is padded to a whole
block with the zero point (value 0).

A ``scale: float16`` weight (``DequantizeLinear(Wq, Cast(s16))``) is lowered the same way with its scales written
as float32 (the same values: the float16 → float32 conversion is exact; stat ``float16_scales_written_float32``):
MatMulNBits takes scales of its input's type (float32 here; onnxruntime 1.32 refuses float16 scales with a
float32 input), so such a layer stores no fewer bytes than with ``scale: float``, and computes the same. Left in
QDQ form instead, onnxruntime folds the Cast and fuses DequantizeLinear → MatMul into its own MatMulNBits, but with
``accuracy_level`` 4 (int8 activations: not the DequantizeLinear's product; measured in docs/mixed-precision.md).
"""

from __future__ import annotations

from collections import Counter

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from qcompiler.core.pass_base import GraphPass, PassResult
from qcompiler.ir.graph import float16_scale_source

DOMAIN = "com.microsoft"


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """Pack uint values 0..15 along the last axis, two per byte, low nibble first (last axis even)."""
    u = u.astype(np.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(p: np.ndarray) -> np.ndarray:
    lo = p & 0x0F
    hi = p >> 4
    return np.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def to_matmulnbits(q: np.ndarray, scale: np.ndarray, zp: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray,
                                                                                           np.ndarray | None]:
    """(B packed [N, nb, B/2], scales [N*nb] float32, zero_points packed or None) from DQ block-wise data."""
    k, n = q.shape
    nb = -(-k // block)
    signed = q.dtype == np.dtype(ml_dtypes.int4)
    qi = q.astype(np.int16)
    zi = np.asarray(zp).astype(np.int16).reshape(nb, n)
    u = qi + 8 if signed else qi
    zu = zi + 8 if signed else zi
    pad = nb * block - k
    if pad:
        u = np.concatenate([u, np.repeat(zu[-1:, :], pad, axis=0)], axis=0)
    b = pack_nibbles(u.T.reshape(n, nb, block))
    scales = np.asarray(scale, dtype=np.float32).reshape(nb, n).T.reshape(-1).copy()
    if np.all(zu == 8):
        return b, scales, None
    zt = zu.T  # [N, nb]
    if nb % 2:
        zt = np.concatenate([zt, np.full((n, 1), 8, dtype=zt.dtype)], axis=1)
    return b, scales, pack_nibbles(zt).reshape(-1)


class LowerMatMulNBitsPass(GraphPass):
    """Lower int4 block-wise weight-only MatMul to com.microsoft.MatMulNBits."""

    name = "lower-matmulnbits"
    requires = frozenset({"qdq"})

    def run_graph(self, graph: gs.Graph) -> PassResult:
        stats: Counter[str] = Counter()
        for node in list(graph.nodes):
            if node.op != "MatMul" or len(node.inputs) != 2:
                continue
            a, w = node.inputs
            if a.inputs and a.inputs[0].op == "DequantizeLinear":
                continue  # activation quantized: not weight-only
            if len(w.inputs) != 1 or w.inputs[0].op != "DequantizeLinear":
                continue
            dq = w.inputs[0]
            qc, sc = dq.inputs[0], dq.inputs[1]
            zc = dq.inputs[2] if len(dq.inputs) > 2 else None
            block = int(dq.attrs.get("block_size", 0))
            s16 = float16_scale_source(sc)
            if s16 is not None:
                sc = s16  # scale: float16 — written float32 below (module doc)
            if not (isinstance(qc, gs.Constant) and isinstance(sc, gs.Constant)) or qc.values.ndim != 2:
                continue
            if qc.values.dtype not in (np.dtype(ml_dtypes.int4), np.dtype(ml_dtypes.uint4)):
                continue
            if int(dq.attrs.get("axis", 1)) != 0 or block < 16 or block & (block - 1):
                stats["skipped_layout"] += 1
                continue
            if len(w.outputs) != 1:
                stats["skipped_shared"] += 1
                continue
            k, n = qc.values.shape
            zp = zc.values if isinstance(zc, gs.Constant) else np.zeros(sc.values.shape, dtype=qc.values.dtype)
            b, scales, zpk = to_matmulnbits(qc.values, np.asarray(sc.values).astype(np.float32), zp, block)
            inputs = [a, gs.Constant(qc.name + "_nbits", b), gs.Constant(sc.name + "_nbits", scales)]
            if s16 is not None:
                stats["float16_scales_written_float32"] += 1
            if zpk is not None:
                inputs.append(gs.Constant((zc.name if zc is not None else qc.name + "_zp") + "_nbits", zpk))
            new = gs.Node("MatMulNBits", node.name, domain=DOMAIN,
                          attrs={"K": int(k), "N": int(n), "bits": 4, "block_size": block},
                          inputs=inputs, outputs=list(node.outputs))
            node.outputs.clear()
            node.inputs.clear()
            graph.nodes.append(self.tag(new))
            stats["matmulnbits"] += 1
        if stats["matmulnbits"]:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(modified=stats["matmulnbits"] > 0, stats=stats)
