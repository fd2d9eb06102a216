"""Saving models: exporting a graph tensor by tensor, and writing atomically.

Files go to a temporary folder beside the destination (:func:`staging`), then into place with ``os.replace``,
so that a failure leaves nothing behind; large tensors go to external data, streamed. The commands' output-path
policy (outputs checked against the inputs, staged and committed together) is :class:`~qcompiler.ir.outputs.OutputSet`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto

from qcompiler.core.errors import UserError
from qcompiler.ir.convert import ModelMeta, export_model
from qcompiler.ir.external import DEFAULT_EXTERNAL_THRESHOLD, ExternalDataWriter, has_external_data
from qcompiler.ir.facts import constant_bytes, tensor_nbytes
from qcompiler.ir.load import PROTOBUF_LIMIT
from qcompiler.ir.outputs import OutputSet
from qcompiler.ir.walk import _iter_all_tensors

#: Graphs whose constants exceed this are written with external data even when not asked to (protobuf's
#: 2 GB limit, with room for the graph itself), and are given to onnxruntime through a temporary folder.
INLINE_LIMIT = 2**31 - 2**27


def write_model(graph: gs.Graph, meta: ModelMeta | None, path: str | os.PathLike[str], *,
                external_data_threshold: int | None = None, consume: bool = False) -> list[Path]:
    """Export ``graph`` and write it to ``path`` tensor by tensor (not atomic: write into a staging folder, see
    :func:`staging`). With ``external_data_threshold`` — or automatically when the constants exceed
    ``INLINE_LIMIT`` — tensors of at least that many bytes go to ``<name>.data`` beside it, streamed, so the
    model is never held twice in memory. ``consume``: see :func:`export_model`. Returns the files written
    (model first)."""
    dest = Path(path)
    threshold = external_data_threshold
    if threshold is None and constant_bytes(graph) >= INLINE_LIMIT:
        threshold = DEFAULT_EXTERNAL_THRESHOLD
    files = [dest]
    try:
        if threshold is not None:
            data = dest.with_name(dest.name + ".data")
            with ExternalDataWriter(data, threshold) as w:
                model = export_model(graph, meta, external=w, consume=consume)
            if w.wrote:
                files.append(data)
        else:
            model = export_model(graph, meta, consume=consume)
        _write_proto_file(model, dest)
    except OSError as e:  # disk full, permissions: the environment, not a bug
        raise UserError(f"{dest}: cannot write the model: {e.strerror or e}") from None
    return files


def _write_proto_file(model: onnx.ModelProto, dest: Path) -> None:
    size = model.ByteSize()
    if size >= PROTOBUF_LIMIT:
        raise UserError(f"{dest}: the model is {size} bytes without its external data, beyond the 2 GB protobuf "
                        "limit (give a smaller external data threshold)")
    with open(dest, "wb") as f:
        f.write(model.SerializeToString())


@contextlib.contextmanager
def staging(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary folder beside ``dest`` to write a model and its side files into. When the block succeeds,
    every file in it is moved (``os.replace``) into ``dest``'s folder; on any failure the folder is removed and
    nothing is left behind."""
    d = Path(dest)
    created = []  # folders made here, removed again when nothing gets written
    p = d.parent.absolute()
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=".qcompiler-", dir=d.parent))
    except OSError as e:
        for c in created:
            with contextlib.suppress(OSError):
                c.rmdir()
        raise UserError(f"{d}: cannot write the output here: {e.strerror or e}") from None
    ok = False
    try:
        yield tmpdir
        umask = os.umask(0)
        os.umask(umask)
        for f in sorted(tmpdir.iterdir()):
            if f.is_file():
                os.chmod(f, 0o666 & ~umask)
        for f in sorted(tmpdir.iterdir()):
            os.replace(f, d.parent / f.name)
        ok = True
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if not ok:
            for c in created:
                with contextlib.suppress(OSError):
                    c.rmdir()


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data_threshold: int | None = None,
) -> list[Path]:
    """Write ``model`` atomically. With ``external_data_threshold`` (bytes) — or automatically when the
    model is over the 2 GB protobuf limit or has external data — tensors at least that large go to
    ``<name>.data`` beside it (external tensors of a loaded model are copied there, chunk by chunk).

    Returns the paths written. On failure nothing is left behind. ``model`` is not modified.
    """
    dest = Path(path)
    if external_data_threshold is None and (model.ByteSize() >= PROTOBUF_LIMIT or has_external_data(model)):
        external_data_threshold = DEFAULT_EXTERNAL_THRESHOLD
    written: list[Path] = []
    with staging(dest) as tmpdir:
        tmp_model = tmpdir / dest.name
        if external_data_threshold is None:
            _write_proto_file(model, tmp_model)
        else:
            out = onnx.ModelProto()
            out.CopyFrom(model)
            with ExternalDataWriter(tmpdir / (dest.name + ".data"), external_data_threshold) as w:
                for t in _iter_all_tensors(out):
                    if t.data_location != TensorProto.EXTERNAL and (
                            not t.HasField("raw_data") or tensor_nbytes(t) < w.threshold):
                        continue
                    ref = w.add_tensor(t)
                    t.ClearField("raw_data")
                    del t.external_data[:]
                    t.external_data.extend(ref.external_data)
                    t.data_location = TensorProto.EXTERNAL
            _write_proto_file(out, tmp_model)
            del out
        written = [dest.parent / f.name for f in sorted(tmpdir.iterdir())]
    return written


def serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
    """Context manager yielding a temp path; moved to ``path`` only when the block succeeds. The path is checked
    first (a folder in the way, an unwritable place: :class:`UserError`) — an :class:`OutputSet` of one file
    (commands with inputs declare them in their own :class:`OutputSet`, so that outputs cannot overwrite them)."""
    with OutputSet() as outs:
        outs.add_output(path, "output", primary=True)
        yield outs.path(path)
        outs.commit()
