"""Reading ``.npz`` calibration files without loading them whole: the zip members, the ``.npy`` headers
(shape, dtype, memory order) and, where streaming does not apply, one member through ``np.load``. Problems
are one-line :class:`UserError` messages naming the file and the array."""

from __future__ import annotations

import io
import math
import tokenize
import zipfile
import zlib
from pathlib import Path
from typing import IO

import numpy as np

from qcompiler.core.errors import UserError
from qcompiler.core.files import regular_file

#: zip compression methods Python's zipfile reads (numpy writes stored or deflated members)
_READABLE = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
             zipfile.ZIP_LZMA: "lzma"}
_METHOD_NAMES = {9: "deflate64", 6: "implode", 93: "zstandard", 95: "xz", 98: "ppmd", 97: "wavpack"}
#: exceptions reading a zip member can raise on a damaged or unusual archive (RuntimeError: an encrypted
#: member; NotImplementedError: a compression method zipfile lacks; zlib.error: a corrupt deflate stream;
#: tokenize.TokenError: numpy's parser of an old-style .npy header on an unterminated bracket)
ZIP_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error,
              KeyError, tokenize.TokenError)
#: exceptions numpy's .npy header parser raises on a damaged header (it tokenizes and evaluates a dict literal)
HEADER_ERRORS = (ValueError, SyntaxError, TypeError, KeyError, EOFError, OverflowError, RecursionError, MemoryError,
                 tokenize.TokenError)


def npz_members(path: Path, zf: zipfile.ZipFile) -> dict[str, str]:
    """Array name -> zip member name. Encrypted members and compression methods zipfile cannot read are
    refused here, before any member is opened."""
    out: dict[str, str] = {}
    for info in zf.infolist():
        m = info.filename
        if m.endswith("/"):
            continue
        key = m[:-4] if m.endswith(".npy") else m
        if info.flag_bits & 0x1:
            raise UserError(f"{path}: array '{key}' is encrypted; an .npz must be a plain zip (numpy.savez)")
        if info.compress_type not in _READABLE:
            method = _METHOD_NAMES.get(info.compress_type, f"method {info.compress_type}")
            raise UserError(f"{path}: array '{key}' uses {method} compression, which cannot be read; save it "
                            "with numpy.savez or numpy.savez_compressed")
        out[key] = m
    if not out:
        raise UserError(f"{path}: the .npz holds no arrays")
    return out


def member_nbytes(zf: zipfile.ZipFile, member: str) -> int:
    """Uncompressed size of a zip member, as its directory entry records it."""
    return int(zf.getinfo(member).file_size)


def check_member_size(path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype, stored: int) -> None:
    """Refuse a member whose header declares more data than the member holds (a header cannot make qcompiler
    allocate what the file does not contain)."""
    need = math.prod(shape) * dtype.itemsize
    if need > stored:
        raise UserError(f"{path}: array '{key}' declares shape {list(shape)} of {dtype} ({need} bytes) but its "
                        f"member holds {stored} bytes")


def read_header(fp: IO[bytes], where: str = "", key: str = "") -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) from an .npy stream; None for a header version we do not stream. A header
    numpy cannot parse, with a negative or non-integer dimension, or with a dtype that is not a literal numpy
    type is a :class:`UserError` naming ``where`` and ``key``."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(fp)
        else:
            return None
        out_dtype = np.dtype(dtype)
    except HEADER_ERRORS as e:
        raise UserError(f"{where}: array '{key}' has a malformed .npy header ({type(e).__name__}: "
                        f"{_first_line(e)})") from None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise UserError(f"{where}: array '{key}' has a malformed .npy header (shape {shape}: dimensions must be "
                        "non-negative integers)")
    return tuple(int(d) for d in shape), bool(fortran), out_dtype


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= 200 else line[:197] + "..."


def open_zip(path: Path) -> zipfile.ZipFile:
    """The zip of an .npz: a regular file (no FIFO / device behind a symlink), opened for reading."""
    regular_file(path, what="an .npz file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: not a valid .npz file ({type(e).__name__}: {e})") from None


def member_meta(path: Path, zf: zipfile.ZipFile, key: str, member: str) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with zf.open(member) as fp:
            head = read_header(fp, str(path), key)
    except ZIP_ERRORS as e:
        raise UserError(f"{path}: array '{key}' is not a valid .npy member ({type(e).__name__}: "
                        f"{_first_line(e)})") from None
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
                head = read_header(io.BytesIO(raw), str(path), key)
                if head is not None and not head[2].hasobject:
                    return head[0], head[2], (None if head[1] else raw)
    except ZIP_ERRORS:
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
        raise UserError(f"{path}: array '{key}' cannot be read ({_first_line(e)})") from None
    except (SyntaxError, TypeError, *ZIP_ERRORS) as e:
        raise UserError(f"{path}: array '{key}' cannot be read ({type(e).__name__}: {_first_line(e)})") from None
