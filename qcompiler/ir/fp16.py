"""fp16 models: converted to fp32 for the compiler's math, their fp16 interface restored afterwards."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from qcompiler.core.tags import tag


def _is_f16(d: Any) -> bool:
    """Whether a graphsurgeon tensor dtype is float16 (``None`` and the non-numpy types of sequence / map values,
    such as a ZipMap output's, are not)."""
    if d is None:
        return False
    try:
        return bool(np.dtype(d) == np.float16)
    except TypeError:
        return False


def to_float32(graph: gs.Graph) -> dict[str, Any]:
    """Rewrite an fp16 graph to fp32 in place. Returns the original dtypes of its inputs/outputs."""
    io = {t.name: t.dtype for t in [*graph.inputs, *graph.outputs]}
    if not any(_is_f16(d) for d in io.values()) and not any(
        isinstance(t, gs.Constant) and t.values.dtype == np.float16 for t in graph.tensors().values()
    ):
        return {}
    f16 = int(TensorProto.FLOAT16)
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant):
            if t.values.dtype == np.float16:
                t.values = np.asarray(t.values, dtype=np.float32)
        elif _is_f16(t.dtype):
            t.dtype = np.float32
    for n in graph.nodes:
        if n.op == "Cast" and int(n.attrs.get("to", 0)) == f16:
            n.attrs["to"] = int(TensorProto.FLOAT)
        for k, v in list(n.attrs.items()):
            if isinstance(v, gs.Constant) and v.values.dtype == np.float16:
                n.attrs[k] = gs.Constant(v.name, np.asarray(v.values, dtype=np.float32))
    return {k: np.dtype(v) for k, v in io.items() if _is_f16(v)}


def _replace_in(seq: Any, old: Any, new: Any) -> None:
    for i, x in enumerate(list(seq)):
        if x is old:
            seq[i] = new


def restore_io_dtypes(graph: gs.Graph, io_dtypes: dict[str, Any], pass_name: str = "import") -> None:
    """Put the fp16 interface back: Cast at every fp16 graph input and output, keeping their names."""
    if not io_dtypes:
        return
    for i, inp in enumerate(list(graph.inputs)):
        if inp.name not in io_dtypes:
            continue
        inner = gs.Variable(inp.name + "_fp32", dtype=np.float32, shape=inp.shape)
        for consumer in list(inp.outputs):
            _replace_in(consumer.inputs, inp, inner)
        inp.dtype = np.float16
        graph.nodes.append(tag(gs.Node("Cast", name=inp.name + "_to_fp32", attrs={"to": int(TensorProto.FLOAT)},
                                       inputs=[inp], outputs=[inner]), pass_name))
        graph.inputs[i] = inp
    for i, out in enumerate(list(graph.outputs)):
        if out.name not in io_dtypes:
            continue
        inner = gs.Variable(out.name + "_fp32", dtype=np.float32, shape=out.shape)
        for producer in list(out.inputs):
            _replace_in(producer.outputs, out, inner)
        for consumer in list(out.outputs):
            _replace_in(consumer.inputs, out, inner)
        out.dtype = np.float16
        graph.nodes.append(tag(gs.Node("Cast", name=out.name + "_to_fp16", attrs={"to": int(TensorProto.FLOAT16)},
                                       inputs=[inner], outputs=[out]), pass_name))
        graph.outputs[i] = out
