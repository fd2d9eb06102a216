"""External data, in and out: tensors that live in a data file beside the model.

* In: an external tensor whose location :func:`qcompiler.ir.load.load_model` checked and resolved is
  memory-mapped (:func:`external_array`) when the graph is imported (:func:`map_external_constants`), so nothing
  is read until a pass asks for the values.
* Out: :class:`ExternalDataWriter` streams the large tensors of a model to one data file, tensor by tensor,
  at aligned offsets, never holding the model twice in memory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from qcompiler.core.errors import UserError
from qcompiler.ir.facts import _PACKED_TYPES, _bits, _external_info, tensor_nbytes
from qcompiler.ir.memory import _advise_dontneed
from qcompiler.ir.walk import _external_tensors, _iter_all_tensors, all_constants

#: External tensors of at least this many bytes are memory-mapped at import; smaller ones are read.
MMAP_MIN_BYTES = 1 << 16
#: Tensors at least this large start at a multiple of ``EXTERNAL_ALIGN`` in written external data files
#: (so that onnxruntime and numpy can map them); smaller ones at a multiple of 64 bytes.
EXTERNAL_ALIGN = 1 << 16
EXTERNAL_ALIGN_MIN_BYTES = 1 << 20
#: ``external_data_threshold`` used when the input model had external data (or the output is too big).
DEFAULT_EXTERNAL_THRESHOLD = 1024


def _checked_external(t: TensorProto) -> tuple[str, int, int]:
    """(absolute file, offset, length) of an external tensor whose location :func:`load_model` resolved."""
    info = _external_info(t)
    loc = info.get("location", "")
    if not os.path.isabs(loc):
        raise UserError(f"tensor '{t.name}': external data location '{loc}' was not checked; load the model "
                        "with qcompiler.ir.load_model")
    return loc, int(info.get("offset", "0") or 0), int(info.get("length", "0") or 0)


def external_files(model: onnx.ModelProto) -> set[Path]:
    """The (resolved) files the external tensors of a model loaded by :func:`load_model` live in."""
    out = set()
    for t in _external_tensors(model):
        loc = _external_info(t).get("location", "")
        if os.path.isabs(loc):
            out.add(Path(loc))
    return out


def has_external_data(model: onnx.ModelProto) -> bool:
    """True when some tensor of ``model`` lives in an external data file."""
    return any(t.data_location == TensorProto.EXTERNAL for t in _iter_all_tensors(model))


def _lazy_external(c: gs.Constant) -> TensorProto | None:
    v = c._values
    if isinstance(v, LazyValues) and not isinstance(v, SparseValues) and isinstance(v.tensor, TensorProto):
        if v.tensor.data_location == TensorProto.EXTERNAL:
            return v.tensor
    return None


def external_array(t: TensorProto) -> np.ndarray:
    """The values of an external tensor resolved by :func:`load_model`: a read-only ``numpy.memmap`` over its
    byte range (no copy) when large, else read. Packed 4-bit types are read and unpacked."""
    loc, offset, length = _checked_external(t)
    shape = tuple(int(d) for d in t.dims)
    if t.data_type in _PACKED_TYPES or length < MMAP_MIN_BYTES:
        with open(loc, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise UserError(f"tensor '{t.name}': external data file '{loc}' is shorter than expected")
        tmp = TensorProto()
        tmp.data_type = t.data_type
        tmp.dims.extend(shape)
        tmp.raw_data = data
        return np.array(numpy_helper.to_array(tmp))
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).newbyteorder("<")
    arr = np.memmap(loc, dtype=dtype, mode="r", offset=offset, shape=shape)
    return arr


def map_external_constants(graph: gs.Graph) -> int:
    """Give every constant still pointing at an external data file (graphsurgeon's lazy values) a memory-mapped
    array instead: nothing is read until a pass asks for the values, and the pages can be dropped again
    (:func:`release_values`). Lazy constants of bfloat16 / fp8 types get their numpy (ml_dtypes) dtype.
    Returns how many constants were mapped."""
    n = 0
    for c in all_constants(graph):
        v = c._values
        if isinstance(v, LazyValues) and isinstance(v.dtype, int):
            # graphsurgeon leaves bfloat16 / fp8 as ONNX type numbers; their values load as ml_dtypes arrays
            with contextlib.suppress(Exception):
                v.dtype = np.dtype(helper.tensor_dtype_to_np_dtype(v.dtype))
        t = _lazy_external(c)
        if t is None:
            continue
        c.values = external_array(t)
        c.data_location = None  # graphsurgeon would otherwise mark the re-exported inline tensor external
        n += 1
    return n


class ExternalDataWriter:
    """Streams the large tensors of a model to one external data file, one tensor at a time.

    Used on a graphsurgeon graph *copy* (:meth:`externalize`, called by :func:`export_model`): every constant of
    at least ``threshold`` bytes is written to ``path`` (offsets aligned, see ``EXTERNAL_ALIGN``) and replaced, in
    the copy, by a TensorProto that only references it, so the exported ModelProto stays small. Contiguous numpy
    arrays are written without a copy; a memory-mapped source gives its pages back once written. The file is
    created on the first tensor written (``wrote`` tells whether it was).
    """

    def __init__(self, path: str | os.PathLike[str], threshold: int = DEFAULT_EXTERNAL_THRESHOLD,
                 location: str | None = None) -> None:
        self.path = Path(path)
        self.location = location or self.path.name
        self.threshold = max(int(threshold), 0)
        self.offset = 0
        self.tensors = 0
        self._f: Any = None
        self._done: dict[int, tuple[int, int, int, list[int]]] = {}  # id(values) -> offset, length, type, dims

    @property
    def wrote(self) -> bool:
        return self._f is not None

    def __enter__(self) -> ExternalDataWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()

    def _write(self, chunks: Iterable[Any], length: int) -> int:
        if self._f is None:
            self._f = open(self.path, "wb")  # closed in close()
        align = EXTERNAL_ALIGN if length >= EXTERNAL_ALIGN_MIN_BYTES else 64
        pad = (-self.offset) % align
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for chunk in chunks:
            self._f.write(chunk)
        self.offset += length
        self.tensors += 1
        return start

    def _reference(self, name: str, data_type: int, dims: Sequence[int], offset: int, length: int) -> TensorProto:
        t = TensorProto()
        t.name = name
        t.data_type = int(data_type)
        t.dims.extend(int(d) for d in dims)
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=self.location)
        t.external_data.add(key="offset", value=str(offset))
        t.external_data.add(key="length", value=str(length))
        return t

    def add_tensor(self, t: TensorProto) -> TensorProto:
        """An external reference for the TensorProto ``t`` (raw data, or an already external resolved tensor)."""
        length = tensor_nbytes(t)
        if t.data_location == TensorProto.EXTERNAL:
            src, offset, length = _checked_external(t)

            def copy() -> Iterator[bytes]:
                with open(src, "rb") as f:
                    f.seek(offset)
                    left = length
                    while left > 0:
                        chunk = f.read(min(left, 64 << 20))
                        if not chunk:
                            raise UserError(f"tensor '{t.name}': external data file '{src}' is shorter than "
                                            "expected")
                        left -= len(chunk)
                        yield chunk

            start = self._write(copy(), length)
        elif t.HasField("raw_data"):
            data = t.raw_data
            start = self._write([data], len(data))
            length = len(data)
            del data
        else:
            arr = numpy_helper.to_array(t)
            ref = numpy_helper.from_array(arr, t.name)
            data = ref.raw_data
            start = self._write([data], len(data))
            length = len(data)
        return self._reference(t.name, t.data_type, list(t.dims), start, length)

    def add_array(self, name: str, arr: np.ndarray, export_dtype: Any = None) -> TensorProto | None:
        """An external reference for array ``arr`` (None when it cannot be stored as raw bytes: strings)."""
        if arr.dtype.hasobject or arr.dtype.kind in "USV":
            return None
        key = id(arr)
        if key in self._done and export_dtype is None:
            offset, length, data_type, dims = self._done[key]
            return self._reference(name, data_type, dims, offset, length)
        if export_dtype is not None and np.dtype(export_dtype) != arr.dtype:
            proto = gs.exporters.onnx_exporter.constant_to_onnx_tensor(gs.Constant(name, arr, export_dtype=export_dtype))
            return self.add_tensor(proto)
        data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        dims = [int(d) for d in arr.shape]
        if data_type in _PACKED_TYPES:
            raw = numpy_helper.from_array(np.asarray(arr), name).raw_data
            offset = self._write([raw], len(raw))
            length = len(raw)
        else:
            flat = np.ascontiguousarray(arr)
            if flat.dtype.byteorder == ">":
                flat = flat.astype(flat.dtype.newbyteorder("<"))
            length = int(flat.nbytes)
            offset = self._write([flat.reshape(-1).view(np.uint8)] if length else [], length)
            del flat
        _advise_dontneed(arr)
        self._done[key] = (offset, length, data_type, dims)
        return self._reference(name, data_type, dims, offset, length)

    def externalize(self, graph: gs.Graph) -> int:
        """Write the large constants of ``graph`` (a copy: its constants are swapped for references)."""
        n = 0
        for c in all_constants(graph, attributes=False):
            v = c._values
            if isinstance(v, SparseValues):
                continue
            if isinstance(v, LazyValues):
                t = v.tensor
                if not isinstance(t, TensorProto) or tensor_nbytes(t) < self.threshold or (
                        t.data_location != TensorProto.EXTERNAL and not t.HasField("raw_data")
                        and _bits(t.data_type) is None):
                    continue
                ref: TensorProto | None = self.add_tensor(t)
                ref.name = c.name  # type: ignore[union-attr]
            else:
                arr = np.asarray(v)
                if arr.nbytes < self.threshold:
                    continue
                ref = self.add_array(c.name, arr, c._export_dtype)
            if ref is None:
                continue
            c._values = LazyValues(ref)
            c.data_location = None
            n += 1
        return n
