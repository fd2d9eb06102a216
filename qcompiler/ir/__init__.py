"""Loading, saving and converting models: the only package that touches ONNX protobuf objects.

Everything else in qcompiler works on an onnx-graphsurgeon :class:`gs.Graph`. The modules, by job:

* :mod:`~qcompiler.ir.load` loads a model file, checking the path, the protobuf, the ONNX checker and any
  external data (whose ``location`` must stay inside the model's folder);
* :mod:`~qcompiler.ir.external` memory-maps external tensors at import and streams large ones out at export;
* :mod:`~qcompiler.ir.convert` imports a model into graphsurgeon and exports it back, carrying the
  ``qcompiler.pass`` tag of every node a pass created as node ``metadata_props``; upgrades the opset;
* :mod:`~qcompiler.ir.fp16` converts fp16 models to fp32 and restores the fp16 interface afterwards;
* :mod:`~qcompiler.ir.save` saves atomically (to a temporary folder beside the destination, then
  ``os.replace``), optionally with external data; :mod:`~qcompiler.ir.outputs` is the output-path policy of
  every command (:class:`OutputSet`: outputs checked against the inputs up front, staged, committed together);
* :mod:`~qcompiler.ir.sessions` builds onnxruntime sessions, including ones that expose intermediate tensors;
* :mod:`~qcompiler.ir.shapes` (static shape inference), :mod:`~qcompiler.ir.walk` (subgraphs and tensors, in
  order), :mod:`~qcompiler.ir.facts` (sizes and summaries), :mod:`~qcompiler.ir.memory` (freeing weights);
* :mod:`~qcompiler.ir.graph` and :mod:`~qcompiler.ir.axes`: graphsurgeon-level helpers for passes and targets.

The names below are re-exported so that ``from qcompiler import ir; ir.load_model(...)`` works; inside qcompiler,
import from the defining module.
"""

from __future__ import annotations

from qcompiler.core.tags import TAG_KEY, tag, tag_of
from qcompiler.ir.convert import (
    MIN_IR_FOR_TAGS,
    ModelMeta,
    copy_graph,
    export_model,
    import_graph,
    name_nodes,
    opset_of,
    rescaled_tensors,
    upgrade_opset,
)
from qcompiler.ir.external import (
    DEFAULT_EXTERNAL_THRESHOLD,
    EXTERNAL_ALIGN,
    EXTERNAL_ALIGN_MIN_BYTES,
    MMAP_MIN_BYTES,
    ExternalDataWriter,
    external_array,
    external_files,
    has_external_data,
    map_external_constants,
)
from qcompiler.ir.facts import constant_bytes, dtype_name, model_summary, parameter_bytes, tensor_nbytes
from qcompiler.ir.fp16 import restore_io_dtypes, to_float32
from qcompiler.ir.load import (
    MAX_ACTIVATION_ELEMENTS,
    MAX_TENSOR_ELEMENTS,
    PROTOBUF_LIMIT,
    check_model,
    load_model,
    load_model_keyed,
)
from qcompiler.ir.memory import release_graph, release_values, trim_memory
from qcompiler.ir.outputs import OutputSet, external_data_files, resolve_path
from qcompiler.ir.save import INLINE_LIMIT, atomic_output, save_model, serialize, staging, write_model
from qcompiler.ir.sessions import (
    NO_PREPACK_BYTES,
    graph_session,
    optimized_op_types,
    quiet_default_logger,
    session,
    with_outputs,
)
from qcompiler.ir.shapes import INFER_MAX_PROTO_BYTES, infer_shapes
from qcompiler.ir.walk import all_constants, readers_by_name, renamed_tensors, tensor_names, walk_graphs

__all__ = [
    "DEFAULT_EXTERNAL_THRESHOLD",
    "EXTERNAL_ALIGN",
    "EXTERNAL_ALIGN_MIN_BYTES",
    "INFER_MAX_PROTO_BYTES",
    "INLINE_LIMIT",
    "MAX_ACTIVATION_ELEMENTS",
    "MAX_TENSOR_ELEMENTS",
    "MIN_IR_FOR_TAGS",
    "MMAP_MIN_BYTES",
    "NO_PREPACK_BYTES",
    "PROTOBUF_LIMIT",
    "TAG_KEY",
    "ExternalDataWriter",
    "ModelMeta",
    "OutputSet",
    "all_constants",
    "atomic_output",
    "check_model",
    "constant_bytes",
    "copy_graph",
    "dtype_name",
    "export_model",
    "external_array",
    "external_data_files",
    "external_files",
    "graph_session",
    "has_external_data",
    "import_graph",
    "infer_shapes",
    "load_model",
    "load_model_keyed",
    "map_external_constants",
    "model_summary",
    "name_nodes",
    "opset_of",
    "optimized_op_types",
    "parameter_bytes",
    "quiet_default_logger",
    "readers_by_name",
    "release_graph",
    "release_values",
    "renamed_tensors",
    "rescaled_tensors",
    "resolve_path",
    "restore_io_dtypes",
    "save_model",
    "serialize",
    "session",
    "staging",
    "tag",
    "tag_of",
    "tensor_names",
    "tensor_nbytes",
    "to_float32",
    "trim_memory",
    "upgrade_opset",
    "walk_graphs",
    "with_outputs",
    "write_model",
]
