"""The user's asks of the auto planner: the ``--budget`` (:class:`Budget`) and the ``--candidates``
(:class:`Candidate`, :func:`parse_candidates`) a layer may take."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import qcompiler.quant.schemes  # noqa: F401  (the low-bit candidates' schemes)
from qcompiler.core.errors import UserError
from qcompiler.plan import DTYPES, SHIFT_BITS, UNIFORM_BITS
from qcompiler.report import cost

BUDGET_KINDS = ("bytes", "fraction", "bits", "bitops", "bitops-fraction")
DEFAULT_CANDIDATES = "int8,int4"
_BINARY_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2, "mib": 1024**2,
                 "g": 1024**3, "gb": 1024**3, "gib": 1024**3}
_DECIMAL_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


@dataclass(frozen=True)
class Budget:
    """A parsed ``--budget``: ``kind`` in :data:`BUDGET_KINDS`, ``value`` in its unit (fractions in [0, 1])."""

    kind: str
    value: float
    text: str

    @classmethod
    def parse(cls, text: str, *, bitops: bool = False) -> Budget:
        s = str(text).strip()
        low = s.lower().replace(" ", "")
        if not low:
            raise UserError("--budget: empty")
        if low.endswith("%"):
            try:
                pct = float(low[:-1])
            except ValueError:
                raise UserError(f"--budget: '{s}' is not a percentage") from None
            if not (0.0 < pct <= 100.0) or not math.isfinite(pct):
                raise UserError(f"--budget: a percentage must be in (0, 100], got '{s}'")
            return cls("bitops-fraction" if bitops else "fraction", pct / 100.0, s)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)(bits?)", low)
        if m:
            if bitops:
                raise UserError(f"--budget: '{s}' is average weight bits, which --bitops does not take")
            bits = float(m.group(1))
            if not (0.0 < bits <= 32.0):
                raise UserError(f"--budget: average weight bits must be in (0, 32], got '{s}'")
            return cls("bits", bits, s)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)([a-z]*)", low)
        if not m:
            raise UserError(f"--budget: cannot read '{s}' (bytes like 4000000 or 4MB, a fraction like 25%, "
                            "average weight bits like 4.5bits, or BitOps with --bitops)")
        num, unit = float(m.group(1)), m.group(2)
        if bitops:
            if unit not in _DECIMAL_UNITS:
                raise UserError(f"--budget: unknown BitOps unit '{m.group(2)}' in '{s}' (k, M, G, T)")
            value = num * _DECIMAL_UNITS[unit]
            kind = "bitops"
        else:
            if unit not in _BINARY_UNITS:
                raise UserError(f"--budget: unknown size unit '{m.group(2)}' in '{s}' (B, KB, MB, GB; 1024-based)")
            value = num * _BINARY_UNITS[unit]
            kind = "bytes"
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"--budget: must be positive, got '{s}'")
        return cls(kind, float(math.floor(value)) if kind == "bytes" else value, s)

    @property
    def unit(self) -> str:
        """What the budget counts: ``bytes``, ``bits`` (parameter-weighted) or ``bitops``."""
        return {"bytes": "bytes", "fraction": "bytes", "bits": "bits", "bitops": "bitops",
                "bitops-fraction": "bitops"}[self.kind]

    def describe(self) -> str:
        if self.kind == "bytes":
            return f"{int(self.value)} bytes ({cost.format_bytes(self.value)})"
        if self.kind == "fraction":
            return f"{self.value * 100:g}% of the float model's bytes"
        if self.kind == "bits":
            return f"{self.value:g} average weight bits"
        if self.kind == "bitops":
            return f"{cost.format_count(self.value)} BitOps"
        return f"{self.value * 100:g}% of the float model's BitOps"


@dataclass(frozen=True)
class Candidate:
    """One precision a layer may take: ``weight`` = the plan keys it sets (``None``: keep the layer float)."""

    name: str
    weight: tuple[tuple[str, Any], ...] | None

    @property
    def is_float(self) -> bool:
        return self.weight is None

    def keys(self) -> dict[str, Any]:
        return dict(self.weight or ())

    @property
    def lowbit(self) -> bool:
        return self.keys().get("scheme", "int") != "int"


def parse_candidates(text: str | Sequence[str]) -> list[Candidate]:
    """``"fp32,int8,int4,ternary,binary,shift4"`` -> candidates (order kept, duplicates refused). A candidate may
    fix its granularity (``int4/tensor``, ``int4/channel``, ``int4/block64``), then its symmetry
    (``int4/block64/sym``: no zero points stored; ``/asym``), and last store its scales as float16
    (``int4/block32/sym/f16``, ``int4/f16``: ``scale: float16``, half the bytes of float32 scales)."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if str(t).strip()]
    if not items:
        raise UserError("--candidates: empty list")
    out: list[Candidate] = []
    for raw in items:
        name, _, gran = raw.lower().partition("/")
        if name in ("fp32", "float", "float32"):
            cand = Candidate("fp32", None)
        elif name in DTYPES and name != "float":
            cand = Candidate(name, (("dtype", name), ("scheme", "int")))
        elif name in ("binary", "ternary"):
            cand = Candidate(name, (("scheme", name),))
        elif re.fullmatch(r"int[0-9]+", name) and name not in DTYPES:
            bits = int(name[3:])
            if bits not in UNIFORM_BITS:
                raise UserError(f"--candidates: '{raw}': unknown integer width (int8, int4, and the uniform "
                                f"{', '.join(f'int{b}' for b in UNIFORM_BITS)} of the packed target)")
            cand = Candidate(name, (("scheme", "uniform"), ("bits", bits)))
        elif re.fullmatch(r"shift[0-9]*", name):
            bits = int(name[5:] or 4)
            if bits not in SHIFT_BITS:
                raise UserError(f"--candidates: '{raw}': shift takes {', '.join(map(str, SHIFT_BITS))} bits")
            cand = Candidate(f"shift{bits}", (("scheme", "shift"), ("bits", bits)))
        else:
            raise UserError(f"--candidates: unknown candidate '{raw}' (fp32, int8, int4, uint8, uint4, int16, "
                            "fp8e4m3, fp8e5m2, int3, int2, binary, ternary, shift2..shift4)")
        parts = gran.split("/") if gran else []
        f16 = bool(parts) and parts[-1] in _SCALE_SUFFIX
        if f16:
            parts = parts[:-1]
        if len(parts) > 2:
            raise UserError(f"--candidates: '{raw}': too many suffixes (dtype/granularity/symmetry/f16, e.g. "
                            "int4/block32/sym/f16)")
        gran, sym = (*parts, "", "")[:2]
        if gran:
            cand = _with_granularity(cand, gran, raw)
        if sym:
            cand = _with_symmetry(cand, sym, raw)
        if f16:
            cand = _with_scale(cand, "f16", raw)
        if any(c.name == cand.name for c in out):
            raise UserError(f"--candidates: '{raw}' given twice")
        out.append(cand)
    return out


#: ``--candidates`` granularity suffixes (``int4/tensor``, ``int8/channel``, ``int4/block64``)
_GRANULARITY_SUFFIX = {"tensor": "per_tensor", "pt": "per_tensor", "channel": "per_channel", "pc": "per_channel"}


def _with_granularity(cand: Candidate, gran: str, raw: str) -> Candidate:
    """``cand`` with its weight granularity fixed by a ``/tensor``, ``/channel`` or ``/blockN`` suffix."""
    if cand.is_float:
        raise UserError(f"--candidates: '{raw}': fp32 has no granularity")
    m = re.fullmatch(r"block([0-9]+)", gran)
    if gran in _GRANULARITY_SUFFIX:
        keys: tuple[tuple[str, Any], ...] = (("granularity", _GRANULARITY_SUFFIX[gran]),)
        label = "tensor" if keys[0][1] == "per_tensor" else "channel"
    elif m and not cand.lowbit and int(m.group(1)) >= 2:
        keys = (("granularity", "block"), ("block_size", int(m.group(1))))
        label = f"block{int(m.group(1))}"
    else:
        raise UserError(f"--candidates: '{raw}': the granularity suffix must be /tensor, /channel or /blockN "
                        "(N >= 2; int dtypes only)")
    return Candidate(f"{cand.name}/{label}", (*(cand.weight or ()), *keys))


#: ``--candidates`` scale suffixes (the last one): ``/f16`` stores the weight scales as float16 (``scale: float16``)
_SCALE_SUFFIX = {"f16": "float16"}


def _with_scale(cand: Candidate, suffix: str, raw: str) -> Candidate:
    """``cand`` with its weight scales stored as float16 (``/f16``, last: ``int4/block32/sym/f16``)."""
    if cand.is_float or cand.lowbit:
        raise UserError(f"--candidates: '{raw}': the /f16 suffix (float16 scales) takes an int dtype "
                        "(int4/block32/sym/f16, int8/f16)")
    return Candidate(f"{cand.name}/{suffix}", (*(cand.weight or ()), ("scale", _SCALE_SUFFIX[suffix])))


def _with_symmetry(cand: Candidate, sym: str, raw: str) -> Candidate:
    """``cand`` with its weight codes symmetric (``/sym``: zero point 0, none stored) or asymmetric (``/asym``: a
    zero point per scale) whatever the base plan says (``int4/block64/sym``)."""
    if cand.is_float or cand.lowbit or sym not in ("sym", "asym"):
        raise UserError(f"--candidates: '{raw}': the symmetry suffix must be /sym or /asym, after a granularity "
                        "(int4/block64/sym; int dtypes only)")
    return Candidate(f"{cand.name}/{sym}", (*(cand.weight or ()), ("symmetric", sym == "sym")))


def fmt_unit(x: float, unit: str) -> str:
    if unit == "bytes":
        return f"{round(x)} bytes ({cost.format_bytes(x)})"
    if unit == "bitops":
        return f"{cost.format_count(x)} BitOps"
    return f"{x:.3f} average weight bits"
