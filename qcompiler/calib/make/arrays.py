"""A folder of ``.npy`` arrays -> feeds, one file per sample.

* single-input models: ``FOLDER/*.npy``;
* any model: ``FOLDER/<input name>/*.npy``, one subfolder per model input, files matched by name (every subfolder
  must hold the same file names).

Each array has the input's feed shape, or that shape without the leading batch axis (a batch of 1 is added).
Pickled (object) arrays are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from qcompiler.calib.feeds import InputSig
from qcompiler.calib.make.samples import Arrays, Item, RawSource
from qcompiler.calib.npz import HEADER_ERRORS
from qcompiler.core.errors import UserError

log = logging.getLogger(__name__)

ARRAY_SUFFIXES = (".npy",)


def load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise UserError(f"{path}: the array holds Python objects (pickled); refused") from None
        raise UserError(f"{path}: not a readable .npy array ({e})") from None
    except (OSError, *HEADER_ERRORS) as e:  # a damaged header: SyntaxError, TokenError, TypeError, ...
        raise UserError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):
        raise UserError(f"{path}: not a single .npy array")
    return arr


def _npy_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in ARRAY_SUFFIXES)


def per_input_folders(root: Path, sigs: list[InputSig]) -> bool:
    """True when ``root`` has a subfolder named after a model input."""
    return any((root / s.name).is_dir() for s in sigs)


def array_source(root: Path, sigs: list[InputSig]) -> RawSource:
    names = [s.name for s in sigs]
    if per_input_folders(root, sigs):
        by_input: dict[str, dict[str, Path]] = {}
        for s in sigs:
            sub = root / s.name
            if not sub.is_dir():
                raise UserError(f"{root}: no subfolder '{s.name}' for model input '{s.name}' (inputs: "
                                f"{', '.join(names)})")
            by_input[s.name] = {p.name: p for p in _npy_files(sub)}
        first = by_input[names[0]]
        if not first:
            raise UserError(f"{root / names[0]}: no .npy files")
        for n in names[1:]:
            missing = sorted(set(first) ^ set(by_input[n]))
            if missing:
                where = root / (n if missing[0] in first else names[0])
                raise UserError(f"{where}: no '{missing[0]}' (every input subfolder needs the same file names)")
        stems = sorted(first)
    else:
        if len(sigs) != 1:
            raise UserError(f"{root}: the model has {len(sigs)} inputs ({', '.join(names)}); give one subfolder "
                            "of .npy files per input, named after it")
        stems = [p.name for p in _npy_files(root)]
        if not stems:
            raise UserError(f"{root}: no .npy files")
        by_input = {names[0]: {n: root / n for n in stems}}

    def item(stem: str) -> Item:
        def load() -> Arrays:
            return {n: load_npy(by_input[n][stem]) for n in names}
        return Item(stem, load)

    files = [p for d in by_input.values() for p in d.values()]
    log.info("arrays: %d samples from %s", len(stems), root)
    return RawSource("arrays", [item(s) for s in stems], f"{root} ({len(stems)} .npy samples)", files=files)
