"""Writing the stacked ``.npz`` files: atomically (all splits or nothing), reproducibly (fixed zip timestamps,
members stored in input order, so the same data gives the same bytes) and never over a file that was read."""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from qcompiler.core.errors import UserError
from qcompiler.core.numbers import c_contiguous
from qcompiler.ir.save import staging

log = logging.getLogger(__name__)

_EPOCH = (1980, 1, 1, 0, 0, 0)


def output_paths(out: Path, splits: Iterable[str]) -> dict[str, Path]:
    """``-o data.npz`` -> {"": data.npz}; with splits calib, eval -> data.calib.npz, data.eval.npz."""
    if out.suffix.lower() != ".npz":
        raise UserError(f"{out}: the output must be an .npz file")
    names = list(splits)
    if not names:
        return {"": out}
    return {n: out.with_name(f"{out.stem}.{n}.npz") for n in names}


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_outputs(outputs: Iterable[Path], inputs: Iterable[Path]) -> None:
    """Refuse an output that is a folder or one of the files read (the model, the raw data, the tokenizer)."""
    ins = list(inputs)
    for out in outputs:
        if out.is_dir():
            raise UserError(f"{out}: is a folder; give an .npz file name")
        for src in ins:
            if _same(out, src):
                raise UserError(f"{out}: is one of the inputs ({src}); refusing to overwrite it")


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` layout (``NAME.npy`` members, stored), with fixed timestamps."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as fp:
                np.lib.format.write_array(fp, c_contiguous(arr), allow_pickle=False)


def write_outputs(files: Mapping[Path, Mapping[str, np.ndarray]]) -> list[Path]:
    """Write every file, all in one folder, atomically: each is staged beside its destination and moved in only
    when all were written."""
    paths = list(files)
    if not paths:
        return []
    parents = {p.parent.absolute() for p in paths}
    if len(parents) != 1:
        raise UserError("the output files must share one folder")
    with staging(paths[0]) as tmp:
        for p, arrays in files.items():
            try:
                write_npz(tmp / p.name, arrays)
            except OSError as e:
                raise UserError(f"{p}: cannot write ({e.strerror or e})") from None
    for p in paths:
        log.info("wrote %s", p)
    return paths
