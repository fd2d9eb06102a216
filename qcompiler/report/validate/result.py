"""What :func:`~qcompiler.report.validate.validate` returns: :class:`ValidationReport`, its JSON form and the
plain-text tables ``qcompiler validate`` prints.

Part of :mod:`qcompiler.report.validate`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qcompiler.core.numbers import json_float
from qcompiler.report.validate.metrics import TensorMetrics


@dataclass
class ValidationReport:
    """Result of :func:`validate`.

    ``outputs``: one entry per graph output (in the float model's order). ``layers``: intermediate tensors
    present in both graphs, worst SQNR first. ``passed``: every output's SQNR ≥ ``min_sqnr_db`` (always
    ``True`` when no threshold was given; a NaN SQNR never passes).
    """

    outputs: list[TensorMetrics]
    layers: list[TensorMetrics]
    samples: int
    min_sqnr_db: float | None = None
    passed: bool = True
    skipped_layers: list[str] = field(default_factory=list)
    layer_samples: int | None = None  # samples the per-layer metrics cover (None: all of them)

    def worst_output_sqnr(self) -> float:
        """Lowest output SQNR in dB (NaN if any output is NaN; ``inf`` when all are identical)."""
        if not self.outputs:
            return math.inf
        if any(math.isnan(m.sqnr_db) for m in self.outputs):
            return math.nan
        return min(m.sqnr_db for m in self.outputs)

    def to_json(self) -> dict[str, Any]:
        """JSON-serializable summary. Non-finite floats are the strings ``"inf"``, ``"-inf"``, ``"nan"``
        (an infinite SQNR means the tensors are identical); SQNR is rounded to 0.001 dB, cosine to 8
        decimals, absolute errors to 6 significant digits."""
        return {
            "samples": int(self.samples),
            "min_sqnr_db": None if self.min_sqnr_db is None else float(self.min_sqnr_db),
            "passed": bool(self.passed),
            "worst_output_sqnr_db": json_float(self.worst_output_sqnr(), 3),
            "outputs": [m.to_json() for m in self.outputs],
            "layers": [m.to_json() for m in self.layers],
            "skipped_layers": list(self.skipped_layers),
            "layer_samples": int(self.layer_samples) if self.layer_samples is not None else int(self.samples),
        }

    def table(self, max_layers: int = 15) -> str:
        """Plain-text tables: every graph output, then the ``max_layers`` worst layers, then the verdict."""
        lines = [f"validation over {self.samples} sample(s)", "", "outputs:"]
        lines += _format_rows(self.outputs)
        if self.layers and max_layers > 0:
            shown = self.layers[:max_layers]
            over = (f", over the first {self.layer_samples} sample(s)"
                    if self.layer_samples is not None and self.layer_samples < self.samples else "")
            lines += ["", f"worst layers ({len(shown)} of {len(self.layers)}{over}):"]
            lines += _format_rows(shown)
        lines.append("")
        worst = _fmt_db(self.worst_output_sqnr())
        if self.min_sqnr_db is None:
            lines.append(f"worst output SQNR {worst} dB (no threshold)")
        else:
            verdict = "PASS" if self.passed else "FAIL"
            lines.append(f"{verdict}: worst output SQNR {worst} dB, threshold {self.min_sqnr_db:g} dB")
        return "\n".join(lines)


def _fmt_db(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else str(x)


def _short(name: str, width: int = 48) -> str:
    if len(name) <= width:
        return name
    keep = width - 3
    return name[: keep // 2] + "..." + name[len(name) - (keep - keep // 2):]


def _format_rows(rows: Sequence[TensorMetrics]) -> list[str]:
    header = ("tensor", "SQNR dB", "cosine", "max|d|", "mean|d|", "top1/exact", "elements")
    body = []
    for m in rows:
        agree = m.top1_agreement if m.top1_agreement is not None else m.exact_match
        body.append((
            _short(m.name),
            _fmt_db(m.sqnr_db),
            f"{m.cosine:.6f}",
            f"{m.max_abs:.4g}",
            f"{m.mean_abs:.4g}",
            "-" if agree is None else f"{100.0 * agree:.2f}%",
            str(m.elements),
        ))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    out = []
    for r in [header, *body]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        out.append("  " + "  ".join(cells).rstrip())
    return out
