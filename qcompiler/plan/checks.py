"""Validation checks on named output slices: ``--check 'output0[..., 4:]>=20dB'`` and the plan's ``checks:``.

A check names a graph output, optionally a numpy-style basic slice of it (integers, ``start:stop:step`` and
``...``, comma separated), one metric and its threshold:

* ``>=20dB`` (or ``sqnr>=20``): SQNR of the slice, in dB, at least the threshold;
* ``cos>=0.999``: cosine similarity at least the threshold;
* ``maxerr<=0.05``: largest absolute difference at most the threshold;
* ``top1>=99`` (or ``top1>=99%``): top-1 agreement over the slice's last axis, in percent, at least the threshold;
* ``iou@0.3>=0.9`` (``iou`` alone: level 0.5): the IoU of the masks ``value > 0.3`` of the float and the quantized
  slice, Σ|F ∩ Q| / Σ|F ∪ Q| over all samples (1 when both are empty), at least the threshold — a probability map
  thresholded downstream (a text detector's, a segmenter's).

Text form: ``OUTPUT[SLICE] METRIC OP VALUE[UNIT]`` (spaces optional; ``OUTPUT>=20dB`` checks the whole output).
Plan form: ``checks: [{output: output0, slice: '..., 4:', min_sqnr_db: 20}]`` with one or more of
``min_sqnr_db``, ``min_cosine``, ``max_abs``, ``min_top1`` (percent), ``min_iou`` (with ``iou_level``, default
0.5) per entry. The validation
(:mod:`qcompiler.report.validate`) measures each check streaming and fails the gate when one misses its threshold.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qcompiler.core.config import check_keys, described, settings_of
from qcompiler.core.errors import UserError

#: metric -> (comparison, JSON key of the plan form, what it is)
METRICS: dict[str, tuple[str, str, str]] = {
    "sqnr": (">=", "min_sqnr_db", "SQNR in dB"),
    "cos": (">=", "min_cosine", "cosine similarity"),
    "maxerr": ("<=", "max_abs", "largest absolute difference"),
    "top1": (">=", "min_top1", "top-1 agreement in percent"),
    "iou": (">=", "min_iou", "IoU of the thresholded masks"),
}
_METRIC_ALIASES = {"db": "sqnr", "sqnr": "sqnr", "cos": "cos", "cosine": "cos", "maxerr": "maxerr",
                   "max_abs": "maxerr", "top1": "top1", "iou": "iou"}
#: the mask level of ``iou`` without ``@LEVEL``
DEFAULT_IOU_LEVEL = 0.5
_TEXT = re.compile(r"^\s*(?P<out>[^\[\]<>=\s]+)\s*(?:\[(?P<slice>[^\[\]]*)\])?\s*(?P<metric>[A-Za-z_0-9]+)?"
                   r"(?:@(?P<level>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?\s*"
                   r"(?P<op>>=|<=)\s*(?P<val>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<unit>dB|db|%)?\s*$")
_INT = re.compile(r"^\s*[-+]?\d+\s*$")


@dataclass
class CheckKeys:
    """One check of the plan's ``checks:`` list: an output (or a slice of it) and its thresholds."""

    output: str | None = field(default=None, metadata=described("the graph output's name"))
    slice: str | None = field(default=None, metadata=described(
        "numpy-style basic slice of the output, without brackets (e.g. '..., 4:'); absent: the whole output"))
    min_sqnr_db: float | None = field(default=None, metadata=described("the slice's SQNR must be at least this (dB)"))
    min_cosine: float | None = field(default=None, metadata=described("cosine similarity at least this"))
    max_abs: float | None = field(default=None, metadata=described("largest absolute difference at most this"))
    min_top1: float | None = field(default=None, metadata=described(
        "top-1 agreement over the slice's last axis at least this (percent)"))
    min_iou: float | None = field(default=None, metadata=described(
        "IoU of the masks value > iou_level of the float and quantized slice at least this (0..1)"))
    iou_level: float | None = field(default=None, metadata=described(
        "the mask level of min_iou (default 0.5)"))
    comment: str | None = field(default=None, metadata=described("free text"))


CHECK_SETTINGS = settings_of(CheckKeys)


@dataclass(frozen=True)
class Check:
    """One threshold on one output slice. ``index`` is the parsed slice (a tuple for ``array[index]``; ``()``:
    the whole output); ``where`` names it in messages (``--check '...'`` or ``plan.yaml: checks[0]``)."""

    output: str
    slice_text: str
    index: tuple[Any, ...]
    metric: str
    threshold: float
    where: str
    #: ``iou``: the mask level (positions with a value above it)
    level: float = DEFAULT_IOU_LEVEL

    @property
    def op(self) -> str:
        return METRICS[self.metric][0]

    def describe(self) -> str:
        """Canonical text form, e.g. ``output0[..., 4:] sqnr>=20``, ``map iou@0.3>=0.9``."""
        target = self.output + (f"[{self.slice_text}]" if self.slice_text else "")
        at = f"@{self.level:g}" if self.metric == "iou" else ""
        return f"{target} {self.metric}{at}{self.op}{self.threshold:g}"

    def passes(self, value: float | None) -> bool:
        """Whether a measured ``value`` meets the threshold (``None`` or NaN never does)."""
        if value is None or math.isnan(value):
            return False
        return value >= self.threshold if self.op == ">=" else value <= self.threshold

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "slice": self.slice_text or None, "metric": self.metric, "op": self.op,
                "threshold": self.threshold, "check": self.describe(), "source": self.where,
                **({"level": self.level} if self.metric == "iou" else {})}


def parse_slice(text: str, where: str) -> tuple[Any, ...]:
    """``'..., 4:'`` -> ``(Ellipsis, slice(4, None, None))``; basic slicing only (integers, slices, one ``...``)."""
    if not text.strip():
        return ()
    items: list[Any] = []
    for raw in text.split(","):
        part = raw.strip()
        if part == "...":
            if Ellipsis in items:
                raise UserError(f"{where}: more than one '...' in the slice")
            items.append(Ellipsis)
        elif ":" in part:
            bounds = part.split(":")
            if len(bounds) > 3:
                raise UserError(f"{where}: bad slice item '{part}' (start:stop:step at most)")
            nums: list[int | None] = []
            for b in bounds:
                if not b.strip():
                    nums.append(None)
                elif _INT.match(b):
                    nums.append(int(b))
                else:
                    raise UserError(f"{where}: bad slice bound '{b.strip()}' in '{part}' (an integer or nothing)")
            while len(nums) < 3:
                nums.append(None)
            if nums[2] == 0:
                raise UserError(f"{where}: slice step cannot be zero in '{part}'")
            items.append(slice(nums[0], nums[1], nums[2]))
        elif _INT.match(part):
            items.append(int(part))
        else:
            raise UserError(f"{where}: bad slice item '{part}' (an integer, start:stop[:step] or ...)")
    return tuple(items)


def parse_check(text: str) -> Check:
    """A ``--check`` value (see the module docstring); :class:`UserError` naming the check when it is malformed."""
    where = f"--check {text!r}"
    if text.count("[") != text.count("]"):
        raise UserError(f"{where}: unbalanced '[' / ']' (expected OUTPUT[SLICE]>=20dB)")
    m = _TEXT.match(text)
    if m is None:
        raise UserError(f"{where}: cannot parse (expected e.g. 'output0[..., 4:]>=20dB', 'output0 cos>=0.999', "
                        "'output0 maxerr<=0.05', 'output0 top1>=99%', 'output0 iou@0.3>=0.9')")
    unit = (m.group("unit") or "").lower()
    metric_raw = (m.group("metric") or "").lower()
    if metric_raw and metric_raw not in _METRIC_ALIASES:
        raise UserError(f"{where}: unknown metric '{m.group('metric')}' (one of: dB, sqnr, cos, maxerr, top1, iou)")
    if m.group("level") is not None and metric_raw != "iou":
        raise UserError(f"{where}: '@LEVEL' goes with the iou metric only (e.g. 'output0 iou@0.3>=0.9')")
    metric = _METRIC_ALIASES[metric_raw] if metric_raw else ("top1" if unit == "%" else "sqnr")
    if (unit == "db" and metric != "sqnr") or (unit == "%" and metric != "top1"):
        raise UserError(f"{where}: unit '{m.group('unit')}' does not fit metric '{metric}'")
    if m.group("op") != METRICS[metric][0]:
        raise UserError(f"{where}: {metric} takes '{METRICS[metric][0]}' ({METRICS[metric][2]})")
    slice_text = (m.group("slice") or "").strip()
    level = _level(float(m.group("level")), where) if m.group("level") is not None else DEFAULT_IOU_LEVEL
    return Check(output=m.group("out"), slice_text=slice_text, index=parse_slice(slice_text, where),
                 metric=metric, threshold=float(m.group("val")), where=where, level=level)


def _level(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise UserError(f"{where}: the iou mask level must be a finite number, got {value!r}")
    return value


def parse_plan_checks(data: Any, source: str) -> list[Check]:
    """The plan's ``checks:`` list -> one :class:`Check` per threshold of each entry."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise UserError(f"{source}: 'checks' must be a list")
    checks: list[Check] = []
    for i, entry in enumerate(data):
        where = f"{source}: checks[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping with 'output' and a threshold such as 'min_sqnr_db'")
        check_keys(entry, CHECK_SETTINGS, where)
        output = entry.get("output")
        if not isinstance(output, str) or not output:
            raise UserError(f"{where}: 'output' (the graph output's name) is required")
        slice_text = entry.get("slice") or ""
        if not isinstance(slice_text, str):
            raise UserError(f"{where}.slice: expected a string such as '..., 4:'")
        slice_text = slice_text.strip()
        if slice_text.startswith("[") and slice_text.endswith("]"):
            slice_text = slice_text[1:-1].strip()
        index = parse_slice(slice_text, f"{where}.slice")
        level = entry.get("iou_level")
        if level is not None and (isinstance(level, bool) or not isinstance(level, (int, float))):
            raise UserError(f"{where}.iou_level: expected a number, got {level!r}")
        if level is not None and entry.get("min_iou") is None:
            raise UserError(f"{where}.iou_level: goes with min_iou (the mask level of its IoU)")
        level = DEFAULT_IOU_LEVEL if level is None else _level(float(level), f"{where}.iou_level")
        found = False
        for metric, (_, key, _what) in METRICS.items():
            value = entry.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"{where}.{key}: expected a number, got {value!r}")
            checks.append(Check(output=output, slice_text=slice_text, index=index, metric=metric,
                                threshold=float(value), where=where, level=level))
            found = True
        if not found:
            raise UserError(f"{where}: no threshold (give min_sqnr_db, min_cosine, max_abs, min_top1 or min_iou)")
    return checks


def plan_checks_to_dict(checks: list[Check]) -> list[dict[str, Any]]:
    """The plan form of ``checks`` (one entry per threshold)."""
    return [{"output": c.output, **({"slice": c.slice_text} if c.slice_text else {}),
             METRICS[c.metric][1]: c.threshold,
             **({"iou_level": c.level} if c.metric == "iou" and c.level != DEFAULT_IOU_LEVEL else {})}
            for c in checks]


def parse_slice_axes(values: Any) -> dict[str, int]:
    """``--slice-axis OUTPUT=AXIS`` values -> ``{output: axis}``; :class:`UserError` naming the bad one."""
    axes: dict[str, int] = {}
    for v in values:
        name, sep, axis = str(v).rpartition("=")
        if not sep or not name.strip() or not _INT.match(axis):
            raise UserError(f"--slice-axis {v!r}: expected OUTPUT=AXIS with an integer AXIS (e.g. output0=1)")
        axes[name.strip()] = int(axis)
    return axes


def parse_pairs(values: Any, flag: str, expected: str) -> list[tuple[str, str]]:
    """``NAME=VALUE`` values of option ``flag`` -> ``[(name, value)]`` in order, both stripped; a
    :class:`UserError` naming a value without ``=`` or an empty side (``expected`` says the form) or a name given
    twice."""
    pairs: list[tuple[str, str]] = []
    for v in values:
        name, sep, value = str(v).partition("=")
        if not sep or not name.strip() or not value.strip():
            raise UserError(f"{flag} {v!r}: expected {expected}")
        if any(n == name.strip() for n, _ in pairs):
            raise UserError(f"{flag} {v!r}: input '{name.strip()}' given twice")
        pairs.append((name.strip(), value.strip()))
    return pairs


def parse_streams(values: Any) -> dict[str, str]:
    """``--stream IN=OUT`` values -> ``{input: output}``; :class:`UserError` naming the bad one."""
    return dict(parse_pairs(values, "--stream", "IN=OUT (a model input and the graph output fed back into it, "
                                                "e.g. h=hn)"))


def parse_shapes(values: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``--input-shape NAME=D0,D1,...`` values (dimensions separated by ``,`` or ``x``) -> ``[(name, dims)]``;
    :class:`UserError` naming the bad one."""
    out = []
    for name, text in parse_pairs(values, "--input-shape", "NAME=D0,D1,... (e.g. input=1,576)"):
        parts = [p.strip() for p in text.replace("x", ",").split(",")]
        try:
            dims = tuple(int(p) for p in parts)
        except ValueError:
            raise UserError(f"--input-shape {name}={text}: dimensions are integers separated by commas") from None
        if any(d < 1 for d in dims):
            raise UserError(f"--input-shape {name}={text}: every dimension must be at least 1")
        out.append((name, dims))
    return out


def check_shape_fits(name: str, dims: Sequence[int], declared: Sequence[Any] | None) -> None:
    """``--input-shape NAME=dims`` fits input ``name``'s declared shape (``None``: undeclared, anything fits): the
    same rank, and equal where it declares a static dimension; a :class:`UserError` naming the flag if not."""
    if declared is None:
        return
    where = f"--input-shape {name}={','.join(map(str, dims))}"
    if len(declared) != len(dims):
        raise UserError(f"{where}: input '{name}' has rank {len(declared)} (shape {list(declared)})")
    for i, (have, want) in enumerate(zip(declared, dims, strict=True)):
        if isinstance(have, (int, np.integer)) and int(have) > 0 and int(have) != want:
            raise UserError(f"{where}: dimension {i} of input '{name}' is {int(have)} in the model")
