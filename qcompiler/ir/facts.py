"""What a model holds, read from it without loading any tensor data.

Bytes of a tensor (packed 4-bit and 2-bit types count a fraction of a byte), of all the parameters of a
ModelProto and of the constants of a graphsurgeon graph; element type names; and the summary that
``qcompiler inspect`` prints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from qcompiler.ir.walk import _iter_all_tensors, all_constants

#: 4-bit (and 2-bit) types are packed two (four) per byte in raw data.
_PACKED_TYPES: dict[int, int] = {
    int(getattr(TensorProto, name)): bits
    for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2))
    if hasattr(TensorProto, name)
}


def _external_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _elements(t: TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= int(d)
    return n


def _bits(data_type: int) -> int | None:
    """Bits per element of an ONNX tensor type in raw_data (None: not representable as raw bytes)."""
    if data_type in _PACKED_TYPES:
        return _PACKED_TYPES[data_type]
    if data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        return int(np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize) * 8
    except Exception:  # unknown / future types
        return None


def tensor_nbytes(t: TensorProto) -> int:
    """Bytes of a tensor's data (raw layout; packed 4-bit types count half a byte), without reading it."""
    bits = _bits(t.data_type)
    if bits is None:
        if t.data_location == TensorProto.EXTERNAL:
            return int(_external_info(t).get("length", "0") or 0)
        return sum(len(s) for s in t.string_data)
    return (_elements(t) * bits + 7) // 8


def parameter_bytes(model: onnx.ModelProto) -> int:
    """Bytes of all tensors of ``model`` (external ones included), without reading any."""
    return sum(tensor_nbytes(t) for t in _iter_all_tensors(model))


def constant_bytes(graph: gs.Graph) -> int:
    """Total bytes of the constants of ``graph`` and its subgraphs (without loading lazy values)."""
    return sum(int(getattr(c._values, "nbytes", 0) or 0) for c in all_constants(graph))


def dtype_name(elem_type: int) -> str:
    return str(helper.tensor_dtype_to_np_dtype(elem_type))


def model_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Facts for ``qcompiler inspect``: opset, IO signatures, op histogram, parameter bytes."""
    g = model.graph
    init_names = {t.name for t in g.initializer}

    def sig(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        tt = vi.type.tensor_type
        dims: list[Any] = []
        for d in tt.shape.dim:
            dims.append(d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?"))
        return {"name": vi.name, "dtype": helper.tensor_dtype_to_np_dtype(tt.elem_type).name
                if tt.elem_type else "?", "shape": dims}

    ops: dict[str, int] = {}
    for n in g.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        ops[key] = ops.get(key, 0) + 1
    param_bytes = parameter_bytes(model)
    return {
        "ir_version": int(model.ir_version),
        "opset": {imp.domain or "ai.onnx": int(imp.version) for imp in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [sig(i) for i in g.input if i.name not in init_names],
        "outputs": [sig(o) for o in g.output],
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "nodes": len(g.node),
        "parameter_bytes": param_bytes,
    }
