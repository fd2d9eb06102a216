"""The protobuf-level pieces the reports (:mod:`qcompiler.report`) need: shape inference of a graphsurgeon graph
through ONNX, the custom-op domains a model uses, and the versions of the ONNX libraries.

The reports themselves work on the graphsurgeon graph and numpy only; what needs ``onnx`` / ``onnxruntime``
lives here.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
import onnxruntime
from onnx import ModelProto

from qcompiler import ir

__all__ = ["ModelProto", "custom_op_domains", "library_versions", "shape_inferred_model"]


def shape_inferred_model(graph: gs.Graph) -> ModelProto:
    """``graph`` exported and run through ONNX shape inference (not strict, with data propagation): a model
    whose value infos carry the shapes and dtypes inference found (import it with :func:`qcompiler.ir.import_graph`).
    Raises whatever export or inference raises."""
    return onnx.shape_inference.infer_shapes(ir.export_model(graph), strict_mode=False, data_prop=True)


def custom_op_domains(model: ModelProto) -> list[str]:
    """The sorted op domains other than the default one (``""`` / ``ai.onnx``) that the nodes of ``model`` use,
    subgraphs included; inside a model-local function, calls to the function's own domain do not count."""
    domains: set[str] = set()

    def walk(g: onnx.GraphProto) -> None:
        for n in g.node:
            if n.domain not in ("", "ai.onnx"):
                domains.add(n.domain)
            for a in n.attribute:
                if a.HasField("g"):
                    walk(a.g)
                for sub in a.graphs:
                    walk(sub)

    walk(model.graph)
    for fn in model.functions:
        for n in fn.node:
            if n.domain not in ("", "ai.onnx") and n.domain != fn.domain:
                domains.add(n.domain)
    return sorted(domains)


def library_versions() -> dict[str, str]:
    """``{"onnx": version, "onnxruntime": version}`` of the libraries loaded."""
    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
