"""Reading ``.npz`` calibration files without loading them whole: the zip members, the ``.npy`` headers
(shape, dtype, memory order) and, where streaming does not apply, one member through ``np.load``. Problems
are one-line :class:`UserError` messages naming the file and the array."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from qcompiler.core.errors import UserError


def npz_members(path: Path, zf: zipfile.ZipFile) -> dict[str, str]:
    """Array name -> zip member name."""
    out: dict[str, str] = {}
    for m in zf.namelist():
        if m.endswith("/"):
            continue
        key = m[:-4] if m.endswith(".npy") else m
        out[key] = m
    if not out:
        raise UserError(f"{path}: the .npz holds no arrays")
    return out


def read_header(fp: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) from an .npy stream; None for a header version we do not stream."""
    fmt = np.lib.format
    version = fmt.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(fp)
    else:
        return None
    return tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)


def open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise UserError(f"{path}: not a valid .npz file ({type(e).__name__}: {e})") from None


def member_meta(path: Path, zf: zipfile.ZipFile, key: str, member: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with zf.open(member) as fp:
            head = read_header(fp)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: array '{key}' is not a valid .npy member ({e})") from None
    if head is None:  # unusual header version: load it to learn its metadata
        arr = load_member(path, key)
        return tuple(arr.shape), arr.dtype
    if head[2].hasobject:
        raise UserError(f"{path}: array '{key}' holds Python objects (pickled); refused")
    return head[0], head[2]


def member_layout(path: Path, zf: zipfile.ZipFile, key: str, member: str
                   ) -> tuple[tuple[int, ...], np.dtype, bytes | None]:
    """(shape, dtype, raw header bytes) of an .npy member; the raw header is None when the array is not stored
    plainly (Fortran order, a header version other than 1.0 / 2.0, an unreadable header)."""
    try:
        with zf.open(member) as fp:
            pre = fp.read(8)
            if len(pre) == 8 and pre[:6] == b"\x93NUMPY" and pre[6] in (1, 2):
                size = fp.read(2 if pre[6] == 1 else 4)
                raw = pre + size + fp.read(int.from_bytes(size, "little"))
                head = read_header(io.BytesIO(raw))
                if head is not None and not head[2].hasobject:
                    return head[0], head[2], (None if head[1] else raw)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, SyntaxError):
        pass
    shape, dtype = member_meta(path, zf, key, member)  # the usual checks and messages
    return shape, dtype, None


def load_member(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            return np.asarray(z[key])
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise UserError(f"{path}: array '{key}' holds Python objects (pickled); refused") from None
        raise UserError(f"{path}: array '{key}' cannot be read ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise UserError(f"{path}: array '{key}' cannot be read ({type(e).__name__}: {e})") from None
