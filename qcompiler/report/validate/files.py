"""The files validation reads: feeds (``--data``, in the calibration data formats) and the ``compact-names``
side file mapping short tensor names back to the originals.

Part of :mod:`qcompiler.report.validate`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from qcompiler import ir
from qcompiler.calib import CalibrationSource, input_signatures
from qcompiler.calib.feeds import with_shapes
from qcompiler.calib.shared import shared_source
from qcompiler.core.errors import UserError
from qcompiler.core.files import regular_file
from qcompiler.report.validate.sessions import ModelLike, _as_model

log = logging.getLogger(__name__)
#: a names file larger than this is refused before it is read
MAX_NAMES_BYTES = 1 << 30


def load_names(path: str | os.PathLike[str]) -> dict[str, str]:
    """The tensor map (new name -> original) of a ``compact-names`` side file ``OUT.names.json``; raises
    :class:`UserError` naming the file when it is missing or not such a file."""
    p = Path(path)
    regular_file(p, what="a names file", max_bytes=MAX_NAMES_BYTES)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    except (OSError, ValueError) as e:  # ValueError: bad UTF-8, bad JSON, an int over 4300 digits
        raise UserError(f"{p}: not a names file ({type(e).__name__}: {e})") from None
    except RecursionError:
        raise UserError(f"{p}: not a names file (nested too deeply)") from None
    tensors = data.get("tensors") if isinstance(data, dict) else None
    if (not isinstance(data, dict) or data.get("version") != 1 or not isinstance(tensors, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in tensors.items())):
        raise UserError(f"{p}: not a names file (expected {{\"version\": 1, \"tensors\": {{new: old}}, ...}}, "
                        "as `qcompiler compile --compact-names` writes)")
    return dict(tensors)


def load_node_names(path: str | os.PathLike[str]) -> dict[str, str]:
    """The node map (new name -> original) of a ``compact-names`` side file (empty when it has none)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    nodes = data.get("nodes") if isinstance(data, dict) else None
    return {str(k): str(v) for k, v in nodes.items()} if isinstance(nodes, dict) else {}


def load_plan_nodes(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]] | None:
    """Node name -> its entry (``op_type``, ``rule``, ``float`` when kept float) of a resolved plan side file
    ``OUT.plan.yaml``, as the compile writes it; ``None`` (with a warning) when the file is not one."""
    p = Path(path)
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
        log.warning("%s: not a resolved plan (%s); layers shown without their plan rules", p, type(e).__name__)
        return None
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, list) or not all(isinstance(n, dict) and "node" in n for n in nodes):
        log.warning("%s: not a resolved plan (no node list); layers shown without their plan rules", p)
        return None
    return {str(n["node"]): n for n in nodes}


# ---------------------------------------------------------------------------------------------- feeds
def load_feeds(path: str | os.PathLike[str], model: ModelLike,
               shapes: Sequence[tuple[str, Sequence[int]]] = ()) -> CalibrationSource:
    """Feeds for ``model`` from ``path`` (the CLI's ``--data``), in the calibration data formats (the same
    reader as ``--calib``, :mod:`qcompiler.calib`):

    * a single ``.npz`` whose arrays are keyed by input name, each ``[N, *feed_shape]`` (same ``N``);
    * a folder of ``.npz`` files, one feed each (arrays of the feed shape), in sorted name order.

    The result is re-iterable, has a ``len`` and streams one sample at a time; arrays come cast to the input
    dtypes. Pickled arrays are refused. Raises :class:`UserError` naming the file and array for a missing
    path, an array that is not an input, a missing input, a wrong rank / shape / dtype, or no samples —
    these are checked here from the .npy headers; NaN / Inf values are found (and raised) while iterating.
    ``shapes``: ``(input, dims)`` a compile fixed (``--input-shape``): the arrays must have those dims.
    """
    p = Path(path)
    if not p.exists():  # checked here so that no calibration keyword (e.g. 'random') is taken for data
        raise UserError(f"{p}: no such file or folder")
    graph, _meta = ir.import_graph(_as_model(model))
    sigs = with_shapes(input_signatures(graph), shapes)
    return shared_source(p, sigs)  # inside a compile: the source its calibration reads
