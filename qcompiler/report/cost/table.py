"""The cost report: :class:`LayerCost` per op and :class:`CostReport` for the model, their JSON form, the
summary line and the plain-text table ``qcompiler inspect --cost`` prints; byte and count formatting.

Part of the cost model (:mod:`qcompiler.report.cost`, where the numbers are defined).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qcompiler.report.cost.bits import FLOAT_BITS


@dataclass
class LayerCost:
    """Cost of one op: the stored bytes attributed to it, its MACs and BitOps."""

    name: str
    op_type: str
    bytes: int = 0  # stored tensor bytes attributed to this op
    params: int = 0  # elements of its weight (input 1 of a MAC op; W and R of LSTM / GRU / RNN)
    macs: int = 0
    weight_bits: int | None = None
    act_bits: int | None = None
    weight_format: str = ""  # float32 / int8 / int4 / binary / ternary / shift / packed ...
    shapes_known: bool = True

    @property
    def bitops(self) -> int:
        if not self.macs:
            return 0
        return int(self.macs) * int(self.weight_bits or FLOAT_BITS) * int(self.act_bits or FLOAT_BITS)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "bytes": int(self.bytes), "params": int(self.params),
                "macs": int(self.macs), "weight_bits": self.weight_bits, "act_bits": self.act_bits,
                "bitops": self.bitops, "weight_format": self.weight_format}


@dataclass
class CostReport:
    """Costs of a whole model (see the module docstring for what each number means)."""

    layers: list[LayerCost]
    total_bytes: int  # measured: files on disk, or the serialized model
    tensor_bytes: int  # Σ stored tensor bytes
    unattributed_bytes: int  # stored tensors no op reads (e.g. constants feeding graph outputs only)
    peak_activation_bytes: int | None
    peak_at: str | None
    feed_shapes: dict[str, list[int]]
    shapes_from: str  # "onnxruntime" | "shape inference" | "none"
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def overhead_bytes(self) -> int:
        return self.total_bytes - self.tensor_bytes

    @property
    def macs(self) -> int:
        return sum(lc.macs for lc in self.layers)

    @property
    def bitops(self) -> int:
        return sum(lc.bitops for lc in self.layers)

    def layer(self, name: str) -> LayerCost | None:
        for lc in self.layers:
            if lc.name == name:
                return lc
        return None

    def by_name(self) -> dict[str, LayerCost]:
        return {lc.name: lc for lc in self.layers}

    def average_weight_bits(self) -> float | None:
        """Parameter-weighted mean weight bits over the MAC ops with a weight."""
        n = sum(lc.params for lc in self.layers if lc.params and lc.weight_bits)
        if not n:
            return None
        return sum(lc.params * (lc.weight_bits or FLOAT_BITS) for lc in self.layers if lc.params) / n

    def to_json(self) -> dict[str, Any]:
        avg = self.average_weight_bits()
        return {
            "total_bytes": int(self.total_bytes),
            "tensor_bytes": int(self.tensor_bytes),
            "overhead_bytes": int(self.overhead_bytes),
            "unattributed_bytes": int(self.unattributed_bytes),
            "macs": int(self.macs),
            "bitops": int(self.bitops),
            "average_weight_bits": None if avg is None else round(avg, 4),
            "peak_activation_bytes": self.peak_activation_bytes,
            "peak_at": self.peak_at,
            "feed_shapes": {k: list(v) for k, v in self.feed_shapes.items()},
            "shapes_from": self.shapes_from,
            "files": list(self.files),
            "notes": list(self.notes),
            "layers": [lc.to_json() for lc in self.layers],
        }

    def summary_line(self) -> str:
        peak = "unknown" if self.peak_activation_bytes is None else format_bytes(self.peak_activation_bytes)
        return (f"cost: {format_bytes(self.total_bytes)} stored ({self.total_bytes} bytes; tensors "
                f"{format_bytes(self.tensor_bytes)}, graph {format_bytes(self.overhead_bytes)}), "
                f"{format_count(self.macs)} MACs, {format_count(self.bitops)} BitOps, "
                f"peak activations {peak} (batch 1)")

    def table(self, max_rows: int | None = None) -> str:
        """Plain-text table: one row per op with stored bytes or MACs (graph order), then totals."""
        rows = [lc for lc in self.layers if lc.bytes or lc.macs]
        shown = rows if max_rows is None else sorted(rows, key=lambda r: (-r.bytes, r.name))[:max_rows]
        if max_rows is not None:
            order = {id(r): i for i, r in enumerate(rows)}
            shown.sort(key=lambda r: order[id(r)])
        header = ("layer", "op", "weight", "w bits", "a bits", "params", "bytes", "MACs", "BitOps")
        body = []
        for lc in shown:
            body.append((_short(lc.name), lc.op_type, lc.weight_format or "-",
                         "-" if lc.weight_bits is None else str(lc.weight_bits),
                         "-" if lc.act_bits is None else str(lc.act_bits),
                         str(lc.params) if lc.params else "-", str(lc.bytes),
                         format_count(lc.macs) if lc.macs else "-", format_count(lc.bitops) if lc.macs else "-"))
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = []
        for r in [header, *body]:
            cells = [r[0].ljust(widths[0]), r[1].ljust(widths[1]), r[2].ljust(widths[2])]
            cells += [c.rjust(w) for c, w in zip(r[3:], widths[3:])]
            lines.append("  ".join(cells).rstrip())
        lines.insert(1, "  ".join("-" * w for w in widths))
        if max_rows is not None and len(rows) > len(shown):
            lines.append(f"... {len(rows) - len(shown)} more op(s) (largest {len(shown)} by bytes shown)")
        avg = self.average_weight_bits()
        lines += [
            "",
            f"total bytes       {self.total_bytes} ({format_bytes(self.total_bytes)}): tensors {self.tensor_bytes}"
            f" + graph structure {self.overhead_bytes}"
            + (f" (of which {self.unattributed_bytes} in tensors no op reads)" if self.unattributed_bytes else ""),
            f"MACs              {self.macs} ({format_count(self.macs)})",
            f"BitOps            {self.bitops} ({format_count(self.bitops)})",
            f"avg weight bits   {'-' if avg is None else f'{avg:.3f}'}",
            "peak activations  " + ("unknown (shapes unavailable)" if self.peak_activation_bytes is None else
                                    f"{self.peak_activation_bytes} ({format_bytes(self.peak_activation_bytes)}) "
                                    f"at '{self.peak_at}', batch 1"),
            "feed shapes       " + (", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in self.feed_shapes.items())
                                    or "-") + f" (shapes from {self.shapes_from})",
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def format_count(n: float) -> str:
    for unit, f in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.3g}{unit}"
    return f"{n:.0f}"


def _short(name: str, width: int = 44) -> str:
    if len(name) <= width:
        return name
    keep = width - 3
    return name[: keep // 2] + "..." + name[len(name) - (keep - keep // 2):]
