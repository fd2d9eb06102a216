"""Opening user input files safely: only regular files (after resolving symlinks), of a bounded size.

A FIFO given as ``--calib x.npz`` would block forever on open, a symlink to ``/dev/zero`` would be read without
end, a socket or a device is no input at all: :func:`regular_file` refuses them before anything is opened, with
one line naming the path (:class:`UserError`). Every input qcompiler reads — model, external data, plan,
calibration / validation data, names file, bundle files — goes through it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from qcompiler.core.errors import UserError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """Words for what a non-regular file is (``a FIFO (named pipe)``, ``a character device``, ...)."""
    for test, words in _KINDS:
        if test(mode):
            return words
    return "not a regular file"


def regular_file(path: str | os.PathLike[str], *, what: str = "a file", max_bytes: int | None = None,
                 allow_dir: bool = False) -> os.stat_result:
    """``os.stat`` of ``path`` (symlinks followed) when it is a regular file (or, with ``allow_dir``, a folder)
    of at most ``max_bytes``; else :class:`UserError` naming the path: ``calib.npz: is a FIFO (named pipe), not a
    regular file; refused as calibration data``. ``what`` names the role with its article (``an .onnx file``). Nothing is opened."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    except (OSError, ValueError) as e:  # permission, a loop of symlinks, a NUL in the name
        raise UserError(f"{p}: cannot read {what} ({type(e).__name__}: {e})") from None
    if stat.S_ISDIR(st.st_mode):
        if allow_dir:
            return st
        raise UserError(f"{p}: is a directory, expected {what}")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{p}: is {file_kind(st.st_mode)}, not a regular file; refused as {what}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UserError(f"{p}: {st.st_size} bytes is beyond the {max_bytes}-byte limit for {what}")
    return st
