"""Cost model of an ONNX model: bytes per layer and in total, BitOps per layer, peak activation memory.

What ``qcompiler inspect --cost MODEL`` prints, the compile summary and the JSON report carry, and the
mixed-precision planner (:mod:`qcompiler.autoplan`) budgets with.

**Bytes.** Every tensor stored in the model (initializers and ``Constant`` node values) counts with its bytes
*as stored*: ``ceil(elements × bits / 8)`` with the element type's storage width — 4 bits for int4 / uint4
(packed two per byte, as ONNX stores them), the item size otherwise. Each stored tensor is attributed to the
op that consumes it, following ``DequantizeLinear`` / ``QuantizeLinear`` chains and the ``ort`` target's load-time
dequantization ``Mul(Cast(codes) [− z], s)`` (the int8 codes, scale and zero point of a quantized weight belong
to the Conv reading the dequantized weight; an activation's scale and zero
point to the op reading the dequantized activation); a tensor read by several ops goes to the first one in
topological order. The model total is the **measured** size of what is stored: the ``.onnx`` file plus its
external data files (for a model in memory: its serialized size), i.e. tensor bytes plus the protobuf graph
structure (``overhead_bytes`` = total − tensor bytes).

**MACs and BitOps.** Shapes are those of the model at batch 1 (dynamic dimensions resolved from
``feed_shapes``, else 1): from ONNX shape inference when it sizes every tensor (helped by ``known_shapes``,
tensors measured at the same input shapes — a compile passes those of its first calibration sample), else
from one onnxruntime run of the model with every intermediate tensor exposed (when that run fails the graph
is re-run with dynamic spatial / sequence dims of 32, and as a last resort partial ONNX shape inference is used).
MACs per op: Conv ``|Y| · C_in/g · Πk``; ConvTranspose ``|X| · C_out/g · Πk``; Gemm / MatMul ``|Y| · K``;
MatMulNBits ``|Y| · K``; LSTM / GRU / RNN ``dirs · T · B · G·H · (I + H)`` (G = 4 / 3 / 1 gates).
``BitOps = MACs × weight bits × activation bits``. A weight's bits are read from the graph: a float constant
is 32 (fp16: 16); a DequantizeLinear's codes give their integer width (QDTYPES), except codes that only take
the values {−1, +1} (binary: 1 bit), {−1, 0, +1} (ternary: 2 bits) or nonzero powers of two ±2^j (shift:
1 + ceil(log2 #exponents) bits); an activation's bits are the QuantizeLinear output width feeding its
DequantizeLinear, else its float width. Plans give the same numbers up front: :func:`spec_bits`.

**Peak activation memory** (batch 1): liveness over the topological order — a tensor is live from the step
that produces it (graph inputs: from the start) to its last reader (graph outputs: to the end); the peak is
the largest sum of live tensors at any step (inputs and outputs of the running op both count). Weights are
not activations. Quantized graphs are counted as an integer runtime executes them: a tensor read only by
QuantizeLinear is stored at the quantized width, and a DequantizeLinear of an activation is an alias of its
quantized input (no float copy).
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from qcompiler import ir
from qcompiler.core.errors import UserError
from qcompiler.quant import QDTYPES, is_code_dtype

if TYPE_CHECKING:
    import onnx

    from qcompiler.plan import QuantSpec

log = logging.getLogger(__name__)

FLOAT_BITS = 32
#: ops whose output is the same value in another representation: initializers are attributed through them
PASS_THROUGH = frozenset({"DequantizeLinear", "QuantizeLinear", "Identity"})
#: ops that do multiply-accumulate work (the rows of the cost table, with every op that owns stored bytes)
MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "MatMulNBits", "MatMulInteger",
                     "MatMulIntegerToFloat", "QLinearMatMul", "QLinearConv", "ConvInteger", "QGemm",
                     "LSTM", "GRU", "RNN"})
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_SUBBYTE = {np.dtype(ml_dtypes.int4): 4, np.dtype(ml_dtypes.uint4): 4}
for _name in ("float4_e2m1fn",):
    if hasattr(ml_dtypes, _name):
        _SUBBYTE[np.dtype(getattr(ml_dtypes, _name))] = 4
#: the packed target's custom ops (domain ai.qcompiler): weight bits by op-name prefix
_PACKED_PREFIX_BITS = {"Binary": 1, "Ternary": 2, "Int3": 3, "Int2": 2}


# ----------------------------------------------------------------------------------------------- bits
def dtype_bits(dtype: Any) -> int:
    """Storage bits of one element of a numpy / ml_dtypes dtype (int4 / uint4: 4)."""
    dt = np.dtype(dtype)
    return _SUBBYTE.get(dt, dt.itemsize * 8)


def stored_bytes(shape: Sequence[Any], dtype: Any) -> int:
    """Bytes a tensor of ``shape`` and ``dtype`` takes as stored in an ONNX file (4-bit types packed)."""
    n = 1
    for d in shape:
        n *= int(d)
    return (n * dtype_bits(dtype) + 7) // 8


def spec_bits(spec: QuantSpec | None) -> int:
    """Bits per element a (weight or activation) spec stands for: float 32; int dtypes from QDTYPES;
    schemes binary 1, ternary 2, shift and uniform ``bits``."""
    if spec is None or spec.is_float:
        return FLOAT_BITS
    if spec.scheme == "binary":
        return 1
    if spec.scheme == "ternary":
        return 2
    if spec.scheme in ("shift", "uniform"):
        return int(spec.bits)
    return QDTYPES[spec.dtype].bits


def code_bits(codes: np.ndarray, zero_point: np.ndarray | None, dtype_width: int) -> tuple[int, str]:
    """Effective bits of integer weight codes (and the scheme they reveal): binary, ternary, shift or int."""
    q = np.asarray(codes).astype(np.int64)
    if zero_point is not None and np.size(zero_point) and np.any(np.asarray(zero_point).astype(np.int64)):
        return dtype_width, "int"
    if q.size == 0:
        return dtype_width, "int"
    lo, hi = int(q.min()), int(q.max())
    if lo >= -1 and hi <= 1:
        if not np.any(q == 0) and lo == -1 and hi == 1:
            return 1, "binary"
        if lo == -1 and hi == 1:
            return 2, "ternary"
        return dtype_width, "int"
    mag = np.abs(q)
    if np.all(mag > 0):
        # nonzero powers of two only: sign + exponent window
        is_pow2 = np.all((mag & (mag - 1)) == 0)
        if is_pow2:
            exps = np.unique(np.round(np.log2(mag)).astype(np.int64))
            window = int(exps.max() - exps.min() + 1)
            bits = 1 + max(1, math.ceil(math.log2(window))) if window > 1 else 2
            return min(bits, dtype_width), "shift"
    return dtype_width, "int"


# ---------------------------------------------------------------------------------------------- report
@dataclass
class LayerCost:
    """Cost of one op: the stored bytes attributed to it, its MACs and BitOps."""

    name: str
    op_type: str
    bytes: int = 0  # stored tensor bytes attributed to this op
    params: int = 0  # elements of its weight (input 1 of a MAC op; W and R of LSTM / GRU / RNN)
    macs: int = 0
    weight_bits: int | None = None
    act_bits: int | None = None
    weight_format: str = ""  # float32 / int8 / int4 / binary / ternary / shift / packed ...
    shapes_known: bool = True

    @property
    def bitops(self) -> int:
        if not self.macs:
            return 0
        return int(self.macs) * int(self.weight_bits or FLOAT_BITS) * int(self.act_bits or FLOAT_BITS)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "bytes": int(self.bytes), "params": int(self.params),
                "macs": int(self.macs), "weight_bits": self.weight_bits, "act_bits": self.act_bits,
                "bitops": self.bitops, "weight_format": self.weight_format}


@dataclass
class CostReport:
    """Costs of a whole model (see the module docstring for what each number means)."""

    layers: list[LayerCost]
    total_bytes: int  # measured: files on disk, or the serialized model
    tensor_bytes: int  # Σ stored tensor bytes
    unattributed_bytes: int  # stored tensors no op reads (e.g. constants feeding graph outputs only)
    peak_activation_bytes: int | None
    peak_at: str | None
    feed_shapes: dict[str, list[int]]
    shapes_from: str  # "onnxruntime" | "shape inference" | "none"
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def overhead_bytes(self) -> int:
        return self.total_bytes - self.tensor_bytes

    @property
    def macs(self) -> int:
        return sum(lc.macs for lc in self.layers)

    @property
    def bitops(self) -> int:
        return sum(lc.bitops for lc in self.layers)

    def layer(self, name: str) -> LayerCost | None:
        for lc in self.layers:
            if lc.name == name:
                return lc
        return None

    def by_name(self) -> dict[str, LayerCost]:
        return {lc.name: lc for lc in self.layers}

    def average_weight_bits(self) -> float | None:
        """Parameter-weighted mean weight bits over the MAC ops with a weight."""
        n = sum(lc.params for lc in self.layers if lc.params and lc.weight_bits)
        if not n:
            return None
        return sum(lc.params * (lc.weight_bits or FLOAT_BITS) for lc in self.layers if lc.params) / n

    def to_json(self) -> dict[str, Any]:
        avg = self.average_weight_bits()
        return {
            "total_bytes": int(self.total_bytes),
            "tensor_bytes": int(self.tensor_bytes),
            "overhead_bytes": int(self.overhead_bytes),
            "unattributed_bytes": int(self.unattributed_bytes),
            "macs": int(self.macs),
            "bitops": int(self.bitops),
            "average_weight_bits": None if avg is None else round(avg, 4),
            "peak_activation_bytes": self.peak_activation_bytes,
            "peak_at": self.peak_at,
            "feed_shapes": {k: list(v) for k, v in self.feed_shapes.items()},
            "shapes_from": self.shapes_from,
            "files": list(self.files),
            "notes": list(self.notes),
            "layers": [lc.to_json() for lc in self.layers],
        }

    def summary_line(self) -> str:
        peak = "unknown" if self.peak_activation_bytes is None else format_bytes(self.peak_activation_bytes)
        return (f"cost: {format_bytes(self.total_bytes)} stored ({self.total_bytes} bytes; tensors "
                f"{format_bytes(self.tensor_bytes)}, graph {format_bytes(self.overhead_bytes)}), "
                f"{format_count(self.macs)} MACs, {format_count(self.bitops)} BitOps, "
                f"peak activations {peak} (batch 1)")

    def table(self, max_rows: int | None = None) -> str:
        """Plain-text table: one row per op with stored bytes or MACs (graph order), then totals."""
        rows = [lc for lc in self.layers if lc.bytes or lc.macs]
        shown = rows if max_rows is None else sorted(rows, key=lambda r: (-r.bytes, r.name))[:max_rows]
        if max_rows is not None:
            order = {id(r): i for i, r in enumerate(rows)}
            shown.sort(key=lambda r: order[id(r)])
        header = ("layer", "op", "weight", "w bits", "a bits", "params", "bytes", "MACs", "BitOps")
        body = []
        for lc in shown:
            body.append((_short(lc.name), lc.op_type, lc.weight_format or "-",
                         "-" if lc.weight_bits is None else str(lc.weight_bits),
                         "-" if lc.act_bits is None else str(lc.act_bits),
                         str(lc.params) if lc.params else "-", str(lc.bytes),
                         format_count(lc.macs) if lc.macs else "-", format_count(lc.bitops) if lc.macs else "-"))
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = []
        for r in [header, *body]:
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2])]
            cells += [c.rjust(w) for c, w in zip(r[3:], widths[3:])]
            lines.append("  ".join(cells).rstrip())
        lines.insert(1, "  ".join("-" * w for w in widths))
        if max_rows is not None and len(rows) > len(shown):
            lines.append(f"... {len(rows) - len(shown)} more op(s) (largest {len(shown)} by bytes shown)")
        avg = self.average_weight_bits()
        lines += [
            "",
            f"total bytes       {self.total_bytes} ({format_bytes(self.total_bytes)}): tensors {self.tensor_bytes}"
            f" + graph structure {self.overhead_bytes}"
            + (f" (of which {self.unattributed_bytes} in tensors no op reads)" if self.unattributed_bytes else ""),
            f"MACs              {self.macs} ({format_count(self.macs)})",
            f"BitOps            {self.bitops} ({format_count(self.bitops)})",
            f"avg weight bits   {'-' if avg is None else f'{avg:.3f}'}",
            "peak activations  " + ("unknown (shapes unavailable)" if self.peak_activation_bytes is None else
                                    f"{self.peak_activation_bytes} ({format_bytes(self.peak_activation_bytes)}) "
                                    f"at '{self.peak_at}', batch 1"),
            "feed shapes       " + (", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in self.feed_shapes.items())
                                    or "-") + f" (shapes from {self.shapes_from})",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def format_count(n: float) -> str:
    for unit, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.3g}{unit}"
    return f"{n:.0f}"


def _short(name: str, width: int = 44) -> str:
    if len(name) <= width:
        return name
    keep = width - 3
    return name[: keep // 2] + "..." + name[len(name) - (keep - keep // 2):]


# ----------------------------------------------------------------------------------------------- shapes
def parse_shapes(items: Sequence[str]) -> dict[str, list[int]]:
    """``["x=1,3,48,320", "h=1x1x128"]`` -> {"x": [1, 3, 48, 320], "h": [1, 1, 128]}."""
    out: dict[str, list[int]] = {}
    for item in items:
        for part in [p for p in str(item).split(";") if p.strip()]:
            name, sep, dims = part.partition("=")
            if not sep or not name.strip():
                raise UserError(f"--shape: expected NAME=D0,D1,... got '{part}'")
            try:
                vals = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
            except ValueError:
                raise UserError(f"--shape: dimensions of '{name.strip()}' must be integers, got '{dims}'") from None
            if any(v < 0 for v in vals):
                raise UserError(f"--shape: dimensions of '{name.strip()}' must be >= 0, got '{dims}'")
            out[name.strip()] = vals
    return out


def _input_feed_shapes(graph: gs.Graph, given: Mapping[str, Sequence[int]], dynamic: int,
                       spatial: int | None) -> dict[str, list[int]]:
    names = {t.name for t in graph.inputs if not isinstance(t, gs.Constant)}
    unknown = sorted(set(given) - names)
    if unknown:
        raise UserError(f"--shape: '{unknown[0]}' is not an input of the model (inputs: {', '.join(sorted(names))})")
    out: dict[str, list[int]] = {}
    for t in graph.inputs:
        if isinstance(t, gs.Constant):
            continue
        if t.name in given:
            shape = [int(d) for d in given[t.name]]
            declared = list(t.shape or [])
            if declared and len(declared) != len(shape):
                raise UserError(f"--shape: input '{t.name}' has rank {len(declared)}, got {len(shape)} dims")
            for i, (d, g) in enumerate(zip(declared, shape)):
                if isinstance(d, int) and d >= 0 and d != g:
                    raise UserError(f"--shape: input '{t.name}' dim {i} is fixed at {d}, got {g}")
            out[t.name] = shape
            continue
        shape = []
        rank = len(t.shape or [])
        for axis, d in enumerate(t.shape or []):
            if isinstance(d, int) and d >= 0:
                shape.append(int(d))
            elif spatial is not None and axis > 0 and rank >= 3 and not (rank == 4 and axis == 1):
                shape.append(spatial)
            else:
                shape.append(dynamic)
        out[t.name] = shape
    return out


def _feeds(graph: gs.Graph, shapes: Mapping[str, list[int]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for t in graph.inputs:
        if isinstance(t, gs.Constant) or t.name not in shapes:
            continue
        dtype = np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32)
        shape = tuple(shapes[t.name])
        if dtype.kind == "f":
            feeds[t.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[t.name] = np.zeros(shape, dtype=dtype)
        else:
            feeds[t.name] = np.zeros(shape, dtype=dtype)
    return feeds


def _produced_names(graph: gs.Graph) -> list[str]:
    names: list[str] = []
    seen: set[str] = set()
    for node in graph.nodes:
        for t in node.outputs:
            if t.name and t.name not in seen:
                seen.add(t.name)
                names.append(t.name)
    return names


def _static_shapes(model: onnx.ModelProto, graph: gs.Graph, shapes: Mapping[str, list[int]],
                   known: Mapping[str, tuple[Sequence[int], Any]] | None = None
                   ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """What :func:`_runtime_shapes` returns, from ONNX shape inference with the inputs at ``shapes`` (helped by
    the measured ``known`` shapes when they were measured at those input shapes) — or ``{}`` unless inference
    gives every tensor a node produces a full shape and a numpy dtype (then the model is run)."""
    seeds: dict[str, tuple[Sequence[int], Any]] = {}
    if known:
        inputs = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
        if all(t.name in known and [int(d) for d in known[t.name][0]] == [int(d) for d in shapes.get(t.name, [])]
               for t in inputs):
            tensors = graph.tensors()
            seeds = {k: v for k, v in known.items() if k in tensors and not isinstance(tensors[k], gs.Constant)}
    inferred = ir.infer_shapes(model, {k: list(v) for k, v in shapes.items()}, seeds)
    if not inferred:
        return {}
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for name in _produced_names(graph):
        if name not in inferred:
            return {}
        out[name] = inferred[name]
    for t in graph.inputs:
        if isinstance(t, gs.Constant) or t.name not in shapes:
            continue
        out[t.name] = (tuple(int(d) for d in shapes[t.name]),
                       np.dtype(t.dtype) if t.dtype is not None else np.dtype(np.float32))
    return out


def _runtime_shapes(model: onnx.ModelProto, graph: gs.Graph, feeds: dict[str, np.ndarray]
                    ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every tensor a node produces, from one onnxruntime run (raises on failure). The run
    is unoptimized (every tensor is an output anyway; optimizing the graph would only cost time) on one thread."""
    names = _produced_names(graph)
    sess = ir.session(ir.with_outputs(model, names, keep_outputs=False) if names else model, optimize=False,
                      threads=1)
    wanted = [o.name for o in sess.get_outputs()]
    vals = sess.run(wanted, feeds)
    out = {n: (tuple(int(d) for d in v.shape), np.asarray(v).dtype) for n, v in zip(wanted, vals)}
    for name, arr in feeds.items():
        out[name] = (tuple(arr.shape), arr.dtype)
    return out


def _inferred_shapes(graph: gs.Graph, shapes: Mapping[str, list[int]]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """ONNX shape inference with the inputs fixed at ``shapes``: only fully known shapes are returned."""
    import onnx

    g = graph.copy()
    for t in g.inputs:
        if t.name in shapes and not isinstance(t, gs.Constant):
            t.shape = list(shapes[t.name])
    for t in g.tensors().values():
        if isinstance(t, gs.Variable) and t not in g.inputs and t not in g.outputs:
            t.shape = None
    try:
        inferred = onnx.shape_inference.infer_shapes(ir.export_model(g), strict_mode=False, data_prop=True)
    except Exception as e:  # inference is a fallback; no shapes then
        log.info("cost: shape inference failed: %s", e)
        return {}
    g2, _ = ir.import_graph(inferred)
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    for t in g2.tensors().values():
        if isinstance(t, gs.Constant) or t.shape is None or t.dtype is None:
            continue
        if all(isinstance(d, int) and d >= 0 for d in t.shape):
            out[t.name] = (tuple(int(d) for d in t.shape), np.dtype(t.dtype))
    return out


# --------------------------------------------------------------------------------------------- analysis
def _const_values(t: Any) -> gs.Constant | None:
    """The constant behind tensor ``t``: itself, or the value of the Constant node producing it."""
    if isinstance(t, gs.Constant):
        return t
    if t is not None and len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return v
    return None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class _Analysis:
    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        self.graph = graph
        self.shapes = shapes
        self.order = {id(n): i for i, n in enumerate(graph.nodes)}

    # ------------------------------------------------------------------------------ shapes of tensors
    def shape(self, t: Any) -> tuple[int, ...] | None:
        if t is None:
            return None
        c = _const_values(t)
        if c is not None:
            return tuple(int(d) for d in c.shape)
        s = self.shapes.get(t.name)
        if s is not None:
            return s[0]
        if t.shape is not None and all(isinstance(d, int) and d >= 0 for d in t.shape):
            return tuple(int(d) for d in t.shape)
        return None

    def dtype(self, t: Any) -> np.dtype | None:
        c = _const_values(t)
        if c is not None:
            return np.dtype(c.dtype)
        s = self.shapes.get(t.name)
        if s is not None:
            return s[1]
        return np.dtype(t.dtype) if getattr(t, "dtype", None) is not None else None

    # ----------------------------------------------------------------------------------- bits of inputs
    def tensor_bits(self, t: Any, *, weight: bool) -> tuple[int | None, str]:
        """(bits, format) of a value read by an op: float width, DQ codes width / scheme, Q output width."""
        if t is None:
            return None, ""
        c = _const_values(t)
        if c is not None:
            dt = np.dtype(c.dtype)
            return dtype_bits(dt), dt.name
        prod = t.inputs[0] if t.inputs else None
        lt = _load_time_codes(t)
        if lt is not None:  # Cast -> [Sub] -> Mul of stored codes: the ort target's load-time dequantization
            codes_c, zp_v = lt
            width = dtype_bits(codes_c.dtype)
            if weight and np.dtype(codes_c.dtype).kind in "iu":
                bits, scheme = code_bits(np.asarray(codes_c.values), zp_v, width)
                return bits, (np.dtype(codes_c.dtype).name if scheme == "int" else scheme)
            return width, np.dtype(codes_c.dtype).name
        if prod is not None and prod.op == "DequantizeLinear":
            src = prod.inputs[0]
            codes = _const_values(src)
            if codes is not None:
                width = dtype_bits(codes.dtype)
                zp = _const_values(prod.inputs[2]) if len(prod.inputs) > 2 else None
                if weight and np.dtype(codes.dtype).kind in "iu":
                    bits, scheme = code_bits(np.asarray(codes.values), None if zp is None else
                                             np.asarray(zp.values), width)
                    return bits, (np.dtype(codes.dtype).name if scheme == "int" else scheme)
                return width, np.dtype(codes.dtype).name
            dt = self.dtype(src)
            if dt is not None:
                return dtype_bits(dt), dt.name
        dt = self.dtype(t)
        if dt is None:
            return None, ""
        return dtype_bits(dt), dt.name

    # ------------------------------------------------------------------------------------------- MACs
    def macs(self, node: gs.Node) -> int | None:
        op = node.op
        ins, outs = node.inputs, node.outputs
        y = self.shape(outs[0]) if outs else None
        try:
            if op in ("Conv", "ConvInteger", "QLinearConv"):
                w = self.shape(ins[3] if op == "QLinearConv" else ins[1])
                if y is None or w is None:
                    return None
                return _numel(y) * _numel(w[1:])
            if op == "ConvTranspose":
                x, w = self.shape(ins[0]), self.shape(ins[1])
                if x is None or w is None:
                    return None
                return _numel(x) * _numel(w[1:])
            if op in ("Gemm", "QGemm"):
                a = self.shape(ins[0])
                if y is None or a is None:
                    return None
                k = a[0] if int(node.attrs.get("transA", 0)) else a[-1]
                return _numel(y) * int(k)
            if op in ("MatMul", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul"):
                a = self.shape(ins[0])
                if y is None or a is None:
                    return None
                return _numel(y) * int(a[-1])
            if op == "MatMulNBits":
                return None if y is None else _numel(y) * int(node.attrs.get("K", 0))
            if op in _GATES:
                x, w, r = self.shape(ins[0]), self.shape(ins[1]), self.shape(ins[2])
                if x is None or w is None or r is None:
                    return None
                layout = int(node.attrs.get("layout", 0))
                steps, batch = (x[1], x[0]) if layout else (x[0], x[1])
                dirs, gh, i_size = w
                h = r[2]
                return int(dirs) * int(steps) * int(batch) * int(gh) * (int(i_size) + int(h))
            if node.domain == "ai.qcompiler" and op.endswith(("Conv", "MatMul", "Gemm")):
                return self._packed_macs(node, y)
        except (IndexError, TypeError, ValueError):
            return None
        return 0 if op not in MAC_OPS else None

    def _packed_macs(self, node: gs.Node, y: tuple[int, ...] | None) -> int | None:
        """Custom packed ops: the reduction size from the attribute the op carries (or the weight shape)."""
        if y is None:
            return None
        attrs = node.attrs
        for key in ("weight_shape", "shape", "kernel"):
            ws = attrs.get(key)
            if isinstance(ws, (list, tuple)) and ws:
                ws = [int(v) for v in ws]
                if node.op.endswith("Conv"):
                    return _numel(y) * _numel(ws[1:])
                k = ws[1] if node.op.endswith("Gemm") and int(attrs.get("transB", 0)) else ws[0]
                return _numel(y) * int(k)
        if "K" in attrs:
            return _numel(y) * int(attrs["K"])
        return None

    # ------------------------------------------------------------------------------------------- params
    def params(self, node: gs.Node) -> int:
        if node.op in _GATES:
            return sum(_numel(s) for s in (self.shape(t) for t in node.inputs[1:3]) if s is not None)
        if node.op in MAC_OPS and node.op != "MatMulNBits" and len(node.inputs) > 1:
            w = node.inputs[3] if node.op == "QLinearConv" else node.inputs[1]
            if self._is_weight(w):
                s = self.shape(w)
                return _numel(s) if s is not None else 0
        if node.op == "MatMulNBits":
            return int(node.attrs.get("K", 0)) * int(node.attrs.get("N", 0))
        if node.domain == "ai.qcompiler":
            for key in ("weight_shape", "shape"):
                ws = node.attrs.get(key)
                if isinstance(ws, (list, tuple)) and ws:
                    return _numel([int(v) for v in ws])
        return 0

    @staticmethod
    def _is_weight(t: Any) -> bool:
        """A constant, or a DequantizeLinear of a constant (a stored, quantized weight)."""
        if _const_values(t) is not None:
            return True
        prod = t.inputs[0] if t is not None and t.inputs else None
        if prod is not None and prod.op == "DequantizeLinear" and _const_values(prod.inputs[0]) is not None:
            return True
        return _load_time_codes(t) is not None


def _codes_cast(node: gs.Node | None) -> gs.Constant | None:
    """The stored codes of ``Cast(codes -> float)`` when ``codes`` is a constant of a quantized code type."""
    if node is None or node.op != "Cast" or not node.inputs:
        return None
    c = _const_values(node.inputs[0])
    return c if c is not None and is_code_dtype(c.dtype) else None


def _load_time_step(node: gs.Node) -> bool:
    """A node of the ort target's load-time dequantization ``Mul(Cast(codes) [− z'], s')`` (see
    ``runtime_targets/ort/load_time_dequant.py``): attributed, like a DequantizeLinear, to the op it feeds."""
    if _codes_cast(node) is not None:
        return True
    if node.op not in ("Sub", "Mul") or len(node.inputs) != 2 or _const_values(node.inputs[1]) is None:
        return False
    src = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    return src is not None and (_codes_cast(src) is not None or (node.op == "Mul" and src.op == "Sub"
                                                                  and _load_time_step(src)))


def _scale_product(node: gs.Node) -> bool:
    """``Mul`` of two stored constants read only by DequantizeLinear nodes: an int32 bias scale ``s_w · s_x``
    computed in the graph (insert-qdq); its inputs belong, like the bias, to the op reading the dequantized bias."""
    return (node.op == "Mul" and len(node.inputs) == 2 and all(_const_values(i) is not None for i in node.inputs)
            and bool(node.outputs) and bool(node.outputs[0].outputs)
            and all(c.op == "DequantizeLinear" for c in node.outputs[0].outputs))


def _load_time_codes(t: Any) -> tuple[gs.Constant, np.ndarray | None] | None:
    """(codes, zero point) of a weight the load-time dequantization produces, else None."""
    mul = t.inputs[0] if t is not None and getattr(t, "inputs", None) else None
    if mul is None or mul.op != "Mul" or not _load_time_step(mul):
        return None
    src = mul.inputs[0].inputs[0]
    zp = None
    if src.op == "Sub":
        z = _const_values(src.inputs[1])
        zp = None if z is None else np.asarray(z.values)
        src = src.inputs[0].inputs[0]
    codes = _codes_cast(src)
    return None if codes is None else (codes, zp)


def _owners(graph: gs.Graph, order: dict[int, int]) -> tuple[dict[str, int], int]:
    """Stored bytes per owning node name, and bytes of stored tensors no op reads."""
    owned: dict[str, int] = defaultdict(int)
    unattributed = 0
    stored: list[tuple[Any, int]] = []  # (tensor as read by ops, bytes)
    seen: set[int] = set()
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and id(t) not in seen:
            seen.add(id(t))
            stored.append((t, stored_bytes(t.shape, t.dtype)))
    for node in graph.nodes:
        if node.op == "Constant" and node.outputs:
            v = node.attrs.get("value")
            if isinstance(v, gs.Constant):
                stored.append((node.outputs[0], stored_bytes(v.shape, v.dtype)))
            else:  # value_float(s) / value_int(s): a few bytes, kept with the graph structure
                continue
    for t, nbytes in stored:
        owner = _first_reader(t, order)
        if owner is None:
            unattributed += nbytes
        else:
            owned[owner.name] += nbytes
    return owned, unattributed


def _first_reader(t: Any, order: dict[int, int]) -> gs.Node | None:
    """The first op (topological order) reading ``t`` through Q / DQ / Identity chains."""
    best: gs.Node | None = None
    stack = [t]
    visited: set[int] = set()
    while stack:
        cur = stack.pop()
        if id(cur) in visited:
            continue
        visited.add(id(cur))
        for consumer in cur.outputs:
            if (consumer.op in PASS_THROUGH or _load_time_step(consumer) or _scale_product(consumer)) \
                    and consumer.outputs:
                stack.extend(consumer.outputs)
                continue
            if best is None or order.get(id(consumer), 1 << 60) < order.get(id(best), 1 << 60):
                best = consumer
    return best


def _peak(graph: gs.Graph, ana: _Analysis) -> tuple[int | None, str | None]:
    """Liveness peak of activation bytes over the node order (see module docstring)."""
    nodes = graph.nodes
    alias: dict[str, str] = {}
    size: dict[str, int] = {}
    weightlike: set[str] = set()

    def nbytes(t: Any) -> int | None:
        s, dt = ana.shape(t), ana.dtype(t)
        if s is None or dt is None:
            return None
        return stored_bytes(s, dt)

    for node in nodes:
        if node.op == "Constant" or all(_const_values(i) is not None or i.name in weightlike
                                        for i in node.inputs if i is not None):
            weightlike.update(o.name for o in node.outputs)
            continue
        if node.op == "DequantizeLinear" and node.inputs and _const_values(node.inputs[0]) is None:
            src = node.inputs[0].name
            alias[node.outputs[0].name] = alias.get(src, src)
    graph_in = [t for t in graph.inputs if not isinstance(t, gs.Constant)]
    graph_out = {t.name for t in graph.outputs}
    tensors: dict[str, Any] = {}
    for t in graph_in:
        tensors[t.name] = t
    for node in nodes:
        for o in node.outputs:
            if o.name and o.name not in weightlike:
                tensors[o.name] = o
    unknown = 0
    for name, t in tensors.items():
        if name in alias:
            continue
        b = nbytes(t)
        if b is None:
            unknown += 1
            continue
        readers = list(t.outputs)
        if readers and t.inputs and all(c.op == "QuantizeLinear" for c in readers):  # produced, not given
            qdt = ana.dtype(readers[0].outputs[0])
            if qdt is not None:
                s = ana.shape(t)
                b = stored_bytes(s or (), qdt)
        size[name] = b
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    end = len(nodes)
    for t in graph_in:
        first[t.name] = -1
        last[t.name] = -1
    for i, node in enumerate(nodes):
        for o in node.outputs:
            name = alias.get(o.name, o.name)
            if name in size:
                first.setdefault(name, i)
                last[name] = max(last.get(name, i), i)
        for inp in node.inputs:
            if inp is None or not inp.name:
                continue
            name = alias.get(inp.name, inp.name)
            if name in size:
                last[name] = max(last.get(name, i), i)
    for name in graph_out:
        if alias.get(name, name) in size:
            last[alias.get(name, name)] = end
    delta = np.zeros(end + 3, dtype=np.int64)
    for name, b in size.items():
        if name not in first:
            continue
        start = first[name] + 1  # shift by one: graph inputs live from slot 0
        stop = max(last.get(name, first[name]), first[name]) + 1
        delta[start] += b
        delta[stop + 1] -= b
    live = np.cumsum(delta)
    if unknown:
        log.info("cost: %d activation tensor(s) of unknown size left out of the peak", unknown)
    if not size:
        return 0, None
    i = int(np.argmax(live))
    at = "graph inputs" if i == 0 else (nodes[i - 1].name if 0 < i <= len(nodes) else "graph outputs")
    return int(live[i]), at


# ------------------------------------------------------------------------------------------------ API
def model_cost(model: onnx.ModelProto | str | os.PathLike[str], *,
               feed_shapes: Mapping[str, Sequence[int]] | None = None,
               files: Sequence[str | os.PathLike[str]] | None = None,
               shapes: bool = True,
               known_shapes: Mapping[str, tuple[Sequence[int], Any]] | None = None) -> CostReport:
    """Cost report of ``model`` (a path or a loaded ``ModelProto``).

    ``feed_shapes``: shapes of (some) graph inputs, resolving their dynamic dims (others: 1).
    ``files``: the files the model is stored in (their sizes are the total; default: the path given, plus its
    external data files; for a ModelProto without files, its serialized size).
    ``shapes=False`` skips the shapes: bytes only (MACs, BitOps and the peak are then unknown).
    ``known_shapes``: name -> (shape, dtype) of tensors measured at these input shapes (the graph inputs'
    entries say which shapes: the others are used only when those agree with the shapes here), helping static
    shape inference so that the model need not be run.
    """
    path: Path | None = None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        model = ir.load_model(path)
    graph, _meta = ir.import_graph(model)
    graph.toposort()
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    notes: list[str] = []

    # ---- bytes --------------------------------------------------------------------------------------
    owned, unattributed = _owners(graph, order)
    file_list: list[Path] = [Path(f) for f in files] if files is not None else []
    if files is None and path is not None:
        file_list = [path, *_external_files(model)]
    if file_list:
        total = sum(f.stat().st_size for f in dict.fromkeys(file_list))
    else:
        total = len(ir.serialize(model))
        if ir.has_external_data(model):
            total += sum(stored_bytes(c.shape, c.dtype) for c in ir.all_constants(graph)
                         if isinstance(getattr(c, "_values", None), np.memmap))
            notes.append("external data counted from its tensors (no files given)")
    tensor_bytes = sum(owned.values()) + unattributed

    # ---- shapes -------------------------------------------------------------------------------------
    rt: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    shapes_from = "none"
    used: dict[str, list[int]] = {}
    given = dict(feed_shapes or {})
    if shapes:
        attempts: list[tuple[str, int, int | None]] = [("dynamic dims 1", 1, None)]
        if any(not isinstance(d, int) or d < 0 for t in graph.inputs if not isinstance(t, gs.Constant)
               and t.name not in given for d in (t.shape or [])):
            attempts.append(("dynamic spatial / sequence dims 32", 1, 32))
        errors = []
        for label, dyn, spatial in attempts:
            used = _input_feed_shapes(graph, given, dyn, spatial)
            try:
                if spatial is None:  # static inference first: no session when it gives every shape
                    rt = _static_shapes(model, graph, used, known_shapes)
                    shapes_from = "shape inference"
                if not rt:
                    rt = _runtime_shapes(model, graph, _feeds(graph, used))
                    shapes_from = "onnxruntime"
                if spatial is not None:
                    notes.append(f"the run with dynamic dims 1 failed; shapes use {label} "
                                 "(give --shape NAME=DIMS for the real ones)")
                else:
                    dyn_dims = [f"{t.name}[{i}]" for t in graph.inputs if not isinstance(t, gs.Constant)
                                and t.name not in given for i, d in enumerate(t.shape or [])
                                if not isinstance(d, int) or d < 0]
                    if dyn_dims:
                        notes.append(f"dynamic dims set to 1: {', '.join(dyn_dims)} "
                                     "(give --shape NAME=DIMS for real ones)")
                break
            except UserError:
                raise
            except Exception as e:
                errors.append(f"{label}: {_first_line(e)}")
        if not rt:
            used = _input_feed_shapes(graph, given, 1, None)
            rt = _inferred_shapes(graph, used)
            shapes_from = "shape inference" if rt else "none"
            notes.append("onnxruntime could not run the model (" + "; ".join(errors) + "); "
                         + ("shapes from ONNX shape inference" if rt else "MACs and peak memory unknown"))

    ana = _Analysis(graph, rt)
    layers: list[LayerCost] = []
    for node in graph.nodes:
        if node.op in PASS_THROUGH or node.op == "Constant":
            continue
        nbytes = owned.get(node.name, 0)
        is_mac = node.op in MAC_OPS or (node.domain == "ai.qcompiler" and node.op.endswith(("Conv", "MatMul",
                                                                                               "Gemm")))
        if not nbytes and not is_mac:
            continue
        lc = LayerCost(name=node.name, op_type=node.op if node.domain in (None, "", "ai.onnx") else
                       f"{node.domain}.{node.op}", bytes=nbytes)
        if is_mac:
            lc.params = ana.params(node)
            macs = ana.macs(node) if shapes else None
            lc.macs = int(macs or 0)
            lc.shapes_known = macs is not None
            self_bits = _node_bits(node, ana)
            lc.weight_bits, lc.weight_format, lc.act_bits = self_bits
        layers.append(lc)
    if shapes and any(not lc.shapes_known for lc in layers):
        missing = [lc.name for lc in layers if not lc.shapes_known]
        notes.append(f"MACs unknown for {len(missing)} op(s): {', '.join(missing[:5])}"
                     + (" ..." if len(missing) > 5 else ""))
    peak, peak_at = (_peak(graph, ana) if rt else (None, None))
    return CostReport(layers=layers, total_bytes=int(total), tensor_bytes=int(tensor_bytes),
                      unattributed_bytes=int(unattributed), peak_activation_bytes=peak, peak_at=peak_at,
                      feed_shapes=used if shapes else {}, shapes_from=shapes_from,
                      files=[str(f) for f in dict.fromkeys(file_list)], notes=notes)


def _node_bits(node: gs.Node, ana: _Analysis) -> tuple[int | None, str, int | None]:
    """(weight bits, weight format, activation bits) of a MAC op."""
    ins = node.inputs
    if node.op == "MatMulNBits":
        a_bits, _ = ana.tensor_bits(ins[0], weight=False)
        return int(node.attrs.get("bits", 4)), f"int{int(node.attrs.get('bits', 4))}-block", a_bits
    if node.domain == "ai.qcompiler":
        prefix = next((p for p in _PACKED_PREFIX_BITS if node.op.startswith(p)), None)
        w_bits: int | None
        if prefix is not None:
            w_bits = _PACKED_PREFIX_BITS[prefix]
        elif node.op.startswith("Shift"):
            w_bits = int(node.attrs.get("bits", 4))
        else:
            w_bits, _ = ana.tensor_bits(ins[1] if len(ins) > 1 else None, weight=True)
        a_bits, _ = ana.tensor_bits(ins[0], weight=False)
        if float(node.attrs.get("input_scale", 0.0) or 0.0) > 0.0:
            a_bits = 1  # XNOR layer: the op binarizes its input
        return w_bits, f"packed-{(prefix or node.op[:5]).lower()}", a_bits
    if node.op == "QLinearConv" or node.op == "QLinearMatMul":
        w_bits, fmt = ana.tensor_bits(ins[3], weight=True)
        a_bits, _ = ana.tensor_bits(ins[0], weight=False)
        return w_bits, fmt, a_bits
    w = ins[1] if len(ins) > 1 else None
    is_weight = w is not None and _Analysis._is_weight(w)
    w_bits, fmt = ana.tensor_bits(w, weight=is_weight)
    a_bits, _ = ana.tensor_bits(ins[0] if ins else None, weight=False)
    if not is_weight:
        fmt = "activation"
    return w_bits, fmt, a_bits


def _external_files(model: onnx.ModelProto) -> list[Path]:
    """The external data files of a model loaded with :func:`qcompiler.ir.load_model`."""
    return sorted(ir.external_files(model)) if ir.has_external_data(model) else []


def compile_cost(model: onnx.ModelProto, path: Path, calib: Any = None, *, shapes: bool = True,
                 known_shapes: Mapping[str, tuple[Sequence[int], Any]] | None = None) -> CostReport:
    """The cost section of a compile: ``model`` as written to ``path`` (plus ``path``.data when there is one),
    dynamic dims from the first calibration sample (``calib``: a CalibrationSource or ``None``);
    ``known_shapes``: the tensor shapes calibration measured on its first sample (see :func:`model_cost`)."""
    feed_shapes: dict[str, list[int]] | None = None
    if calib is not None and shapes:
        first = next(iter(calib), None)
        if first is not None:
            feed_shapes = {k: list(np.shape(v)) for k, v in first.items()}
    files = [f for f in (Path(path), Path(path).with_name(Path(path).name + ".data")) if f.exists()]
    return model_cost(model, feed_shapes=feed_shapes, files=files, shapes=shapes, known_shapes=known_shapes)


def _first_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
