"""Calibration / validation feeds from raw files (``qcompiler data``).

Raw images, ``.wav`` audio, lines of text (with a WordPiece vocabulary) or ``.npy`` arrays become one stacked
``.npz`` per split — the format ``--calib`` and ``--validate-data`` read (arrays keyed by model input name, with
a leading sample axis). One module per job:

* :mod:`~qcompiler.calib.make.samples`: items, the model's inputs, ``--limit`` / ``--split`` selection, stacking;
* :mod:`~qcompiler.calib.make.images`, :mod:`~qcompiler.calib.make.audio`, :mod:`~qcompiler.calib.make.text`
  (with :mod:`~qcompiler.calib.make.wordpiece`), :mod:`~qcompiler.calib.make.arrays`: one modality each;
* :mod:`~qcompiler.calib.make.writer`: atomic, reproducible ``.npz`` output that never replaces an input;
* :mod:`~qcompiler.calib.make.build`: :func:`make_data`, the whole job.
"""

from __future__ import annotations

from qcompiler.calib.make.audio import AudioOptions, resample
from qcompiler.calib.make.build import KINDS, MadeFile, MakeOptions, MakeResult, make_data
from qcompiler.calib.make.images import ImageOptions
from qcompiler.calib.make.samples import InputSummary, parse_split, select
from qcompiler.calib.make.text import TextOptions
from qcompiler.calib.make.wordpiece import WordPiece

__all__ = [
    "KINDS",
    "AudioOptions",
    "ImageOptions",
    "InputSummary",
    "MadeFile",
    "MakeOptions",
    "MakeResult",
    "TextOptions",
    "WordPiece",
    "make_data",
    "parse_split",
    "resample",
    "select",
]
