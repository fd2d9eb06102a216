"""What :func:`~qcompiler.report.validate.validate` returns: :class:`ValidationReport`, its JSON form and the
plain-text tables ``qcompiler validate`` prints.

Part of :mod:`qcompiler.report.validate`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qcompiler.core.numbers import json_float
from qcompiler.report.validate.metrics import TensorMetrics
from qcompiler.report.validate.slices import CheckResult

#: What each metric means and which direction is good (printed under the tables, in the JSON and the HTML).
LEGEND: dict[str, str] = {
    "sqnr_db": "SQNR: signal-to-quantization-noise ratio, 10*log10(sum ref^2 / sum (ref - q)^2) in dB; higher is "
               "better (inf: identical; each +6 dB halves the error's amplitude)",
    "cosine": "cosine: cosine similarity of the float and quantized values; closer to 1 is better",
    "max_abs": "max|d|: largest absolute difference float - quantized, in the tensor's units; lower is better",
    "mean_abs": "mean|d|: mean absolute difference; lower is better",
    "worst_slice": "worst slice: the output's slice (one index of its channel / feature axis) of lowest SQNR: axis, "
                   "index, SQNR in dB and max|d|; higher SQNR is better",
    "topk": "top-k: for probability / logit outputs, the fraction of positions where the float top-1 class is "
            "among the quantized top-k; higher is better",
    "mask": "mask: for probability maps (Sigmoid outputs), the IoU of the positions above the level in the float "
            "and quantized outputs, and the fraction deciding alike; higher is better",
    "top1": "top1/exact: for class-score outputs, the fraction of positions whose argmax agrees (top-1); for "
            "integer tensors the fraction of exactly equal elements; higher is better (100% = the same)",
}
#: Verdict when no threshold (``--min-sqnr``) was given: there is nothing to pass or fail.
NO_THRESHOLD = "no threshold set"
#: Worst layers a ready-to-paste plan rule is suggested for.
SUGGESTED_RULES = 3
#: Ops (float or as lowered) whose nodes carry weights: rules are suggested for them when no resolved plan is known.
_WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN", "QLinearConv",
                         "QLinearMatMul", "ConvInteger", "MatMulInteger", "MatMulNBits"})


@dataclass
class LayerInfo:
    """Where a compared tensor comes from: the node computing it (as the compiled graph names it), its op type,
    and the plan rule that decided that node (``None`` when no resolved plan is known)."""

    node: str
    op_type: str
    rule: str | None = None
    quantized: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "op_type": self.op_type, "rule": self.rule, "quantized": self.quantized}


@dataclass
class ValidationReport:
    """Result of :func:`validate`.

    ``outputs``: one entry per graph output (in the float model's order). ``layers``: intermediate tensors
    present in both graphs, worst SQNR first; ``layer_order`` the same names in graph order. ``layer_info``:
    per layer tensor, the node computing it, its op type and (once :meth:`attach_plan` ran) the plan rule that
    decided the node. ``passed``: every check met and every output's SQNR — whole tensor and worst slice — ≥
    ``min_sqnr_db`` (``True`` when no threshold and no check was given — then :attr:`verdict` is "no threshold
    set", never PASS; a NaN SQNR never passes). ``checks``: the ``--check`` / plan ``checks:`` results.
    """

    outputs: list[TensorMetrics]
    layers: list[TensorMetrics]
    samples: int
    min_sqnr_db: float | None = None
    passed: bool = True
    skipped_layers: list[str] = field(default_factory=list)
    layer_samples: int | None = None  # samples the per-layer metrics cover (None: all of them)
    layer_order: list[str] = field(default_factory=list)
    layer_info: dict[str, LayerInfo] = field(default_factory=dict)
    checks: list[CheckResult] = field(default_factory=list)
    #: samples whose float reference came from calibration's runs (``validate(calib_outputs=)``), not a float run
    float_from_calibration: int = 0
    #: tensor -> pass: tensors both graphs produce that a pass rescaled on purpose (a Conv whose BatchNormalization
    #: was folded into it ahead of a bias Add, an equalized or smoothed layer): not compared per layer
    rescaled_layers: dict[str, str] = field(default_factory=dict)
    #: streamed validation: input -> the graph output fed back into it from the sample before (each model its own)
    stream: dict[str, str] = field(default_factory=dict)
    #: tensor -> the compared tensor whose elements it holds rearranged (a Reshape / Transpose / ... of it in both
    #: graphs): not compared per layer, its metrics are that tensor's
    rearranged_layers: dict[str, str] = field(default_factory=dict)

    @property
    def gated(self) -> bool:
        """Whether there is anything to pass or fail (``min_sqnr_db`` or checks)."""
        return self.min_sqnr_db is not None or bool(self.checks)

    @property
    def verdict(self) -> str:
        """``PASS`` / ``FAIL`` against ``min_sqnr_db`` and the checks; :data:`NO_THRESHOLD` without any."""
        if not self.gated:
            return NO_THRESHOLD
        return "PASS" if self.passed else "FAIL"

    def worst_slice_sqnr(self) -> float:
        """Lowest SQNR in dB over the outputs, each output counting its worst slice (or its whole-tensor SQNR
        when lower, or when it has no slices); NaN if any is NaN, ``inf`` when all are identical."""
        if not self.outputs:
            return math.inf
        values = [m.worst_sqnr() for m in self.outputs]
        if any(math.isnan(v) for v in values):
            return math.nan
        return min(values)

    def failed_checks(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.passed]

    def failure(self) -> str:
        """One line saying why the gate failed (empty when it passed)."""
        if self.passed:
            return ""
        parts = []
        if self.min_sqnr_db is not None and not self.worst_slice_sqnr() >= self.min_sqnr_db:
            m = min(self.outputs, key=lambda o: -math.inf if math.isnan(o.worst_sqnr()) else o.worst_sqnr())
            ws = m.worst_slice
            where = (f" (slice {ws.index} of axis {ws.axis})" if ws is not None and ws.index is not None
                     and not ws.sqnr_db > m.sqnr_db else "")
            parts.append(f"output '{m.name}'{where} SQNR {_fmt_db(m.worst_sqnr())} dB is below --min-sqnr "
                         f"{self.min_sqnr_db} dB")
        for c in self.failed_checks():
            shown = "not measurable" if c.value is None else f"{c.value:.4g}"
            parts.append(f"check {c.check.describe()} failed ({c.check.where}): measured {shown}")
        return "; ".join(parts)

    def worst_output_sqnr(self) -> float:
        """Lowest output SQNR in dB (NaN if any output is NaN; ``inf`` when all are identical)."""
        if not self.outputs:
            return math.inf
        if any(math.isnan(m.sqnr_db) for m in self.outputs):
            return math.nan
        return min(m.sqnr_db for m in self.outputs)

    def attach_plan(self, plan_nodes: Mapping[str, Mapping[str, Any]],
                    node_names: Mapping[str, str] | None = None) -> None:
        """Name the plan rule that decided each layer's node. ``plan_nodes``: node name -> its entry of the
        resolved plan (``rule``, ``op_type``, and ``float`` for a node kept float: the ``nodes`` of
        ``OUT.plan.yaml``). ``node_names``: compiled node name -> the name the plan knows (``compact-names``)."""
        for info in self.layer_info.values():
            name = node_names.get(info.node, info.node) if node_names else info.node
            entry = plan_nodes.get(name)
            info.node = name
            if entry is None:
                continue
            info.op_type = str(entry.get("op_type", info.op_type))
            info.quantized = "float" not in entry
            info.rule = str(entry.get("rule", "defaults")) + ("" if info.quantized else " (float)")

    def suggested_rules(self, n: int = SUGGESTED_RULES) -> str:
        """Plan rules (YAML, to paste under ``rules:``) keeping the nodes of the ``n`` worst layers float: the
        worst layers whose node the plan quantized (when no plan is known: the nodes of ops with weights), one rule
        each."""
        picked: list[tuple[str, TensorMetrics]] = []
        for m in self.layers:
            info = self.layer_info.get(m.name)
            if info is None or not info.node or info.quantized is False or math.isinf(m.sqnr_db):
                continue
            if info.quantized is None and info.op_type not in _WEIGHT_OPS:  # no plan known: layers with weights
                continue
            if info.node not in (p for p, _ in picked):
                picked.append((info.node, m))
            if len(picked) >= n:
                break
        lines = []
        for node, m in picked:
            lines.append(f"- match: {{name: {_yaml_str(node)}}}  # {m.name}: {_fmt_db(m.sqnr_db)} dB")
            lines.append("  skip: true")
        return "\n".join(lines)

    def _layer_json(self, m: TensorMetrics, index: dict[str, int]) -> dict[str, Any]:
        d = m.to_json()
        d["index"] = index.get(m.name)
        info = self.layer_info.get(m.name)
        d.update(info.to_json() if info is not None else {"node": None, "op_type": None, "rule": None,
                                                           "quantized": None})
        return d

    def to_json(self) -> dict[str, Any]:
        """JSON-serializable summary. Non-finite floats are the strings ``"inf"``, ``"-inf"``, ``"nan"``
        (an infinite SQNR means the tensors are identical); SQNR is rounded to 0.001 dB, cosine to 8
        decimals, absolute errors to 6 significant digits. ``passed`` is ``null`` without a threshold
        (``verdict``: "no threshold set"). ``layers`` are worst first, each with its graph position ``index``,
        node, op type and plan rule; ``graph_order`` lists them in graph order."""
        order = self.layer_order or [m.name for m in self.layers]
        index = {name: i for i, name in enumerate(order)}
        return {
            "samples": int(self.samples),
            "min_sqnr_db": None if self.min_sqnr_db is None else float(self.min_sqnr_db),
            "passed": None if not self.gated else bool(self.passed),
            "verdict": self.verdict,
            "worst_output_sqnr_db": json_float(self.worst_output_sqnr(), 3),
            "worst_slice_sqnr_db": json_float(self.worst_slice_sqnr(), 3),
            "outputs": [m.to_json() for m in self.outputs],
            "checks": [c.to_json() for c in self.checks],
            "failure": self.failure() or None,
            "layers": [self._layer_json(m, index) for m in self.layers],
            "graph_order": [n for n in order if n in {m.name for m in self.layers}],
            "suggested_rules": self.suggested_rules(),
            "legend": dict(LEGEND),
            "skipped_layers": list(self.skipped_layers),
            "layer_samples": int(self.layer_samples) if self.layer_samples is not None else int(self.samples),
            **({"float_from_calibration": int(self.float_from_calibration)} if self.float_from_calibration else {}),
            **({"rescaled_layers": dict(self.rescaled_layers)} if self.rescaled_layers else {}),
            **({"stream": dict(self.stream)} if self.stream else {}),
            **({"rearranged_layers": dict(self.rearranged_layers)} if self.rearranged_layers else {}),
        }

    def table(self, max_layers: int = 15) -> str:
        """Plain-text tables: every graph output, then the ``max_layers`` worst layers (with the node, op type and
        plan rule of each), a plan rule to paste for the worst, the legend, then the verdict."""
        lines = [f"validation over {self.samples} sample(s)"]
        if self.stream:
            lines[0] += (" streamed in order, each model fed its own previous " + ", ".join(
                f"{o} as {i}" for i, o in self.stream.items()))
        lines += ["", "outputs:"]
        lines += _format_rows(self.outputs)
        lines += _slice_lines(self.outputs)
        if self.checks:
            lines += ["", "checks:"] + ["  " + c.line() for c in self.checks]
        if self.layers and max_layers > 0:
            shown = self.layers[:max_layers]
            over = (f", over the first {self.layer_samples} sample(s)"
                    if self.layer_samples is not None and self.layer_samples < self.samples else "")
            lines += ["", f"worst layers ({len(shown)} of {len(self.layers)}{over}), worst first (graph order in "
                      "the JSON report):"]
            lines += _format_rows(shown, self.layer_info)
            rules = self.suggested_rules()
            if rules:
                lines += ["", "to keep the worst layers float, paste under `rules:` in the plan:"]
                lines += ["  " + r for r in rules.splitlines()]
        if self.rescaled_layers:
            by = Counter(self.rescaled_layers.values())
            lines += ["", f"not compared per layer: {len(self.rescaled_layers)} tensor(s) rescaled on purpose ("
                      + ", ".join(f"{p}: {k}" for p, k in sorted(by.items()))
                      + "), other quantities than the float model's of the same name"]
        if self.rearranged_layers:
            lines += ["", f"not compared per layer: {len(self.rearranged_layers)} tensor(s) only rearranging a compared "
                      "one (Reshape / Transpose / Flatten / Squeeze / Unsqueeze / Identity: the same values)"]
        lines += ["", "legend: " + "; ".join(LEGEND[k].split(":", 1)[0] + ":" + _direction(LEGEND[k])
                                              for k in LEGEND)]
        worst = _fmt_db(self.worst_output_sqnr())
        worst_slice = _fmt_db(self.worst_slice_sqnr())
        if not self.gated:
            lines.append(f"worst output SQNR {worst} dB, worst slice {worst_slice} dB ({NO_THRESHOLD}; give "
                         "--min-sqnr DB or --check for a verdict)")
        else:
            gate = f", threshold {self.min_sqnr_db:g} dB" if self.min_sqnr_db is not None else ""
            failed = len(self.failed_checks())
            checks = f", {len(self.checks) - failed} of {len(self.checks)} check(s) met" if self.checks else ""
            lines.append(f"{self.verdict}: worst output SQNR {worst} dB, worst slice {worst_slice} dB{gate}{checks}")
        return "\n".join(lines)


def _slice_lines(outputs: Sequence[TensorMetrics]) -> list[str]:
    """The worst slice and top-k agreement of each output (none when no output has them)."""
    lines = []
    for m in outputs:
        ws = m.worst_slice
        part = []
        if ws is not None and ws.index is not None:
            left = f", {ws.silent} silent left out" if ws.silent else ""
            part.append(f"worst slice {ws.index} of axis {ws.axis} ({ws.slices} slices{left}): SQNR "
                        f"{_fmt_db(ws.sqnr_db)} dB, max|d| {ws.max_abs:.4g}")
        if m.topk:
            part.append(", ".join(f"top-{k} {100.0 * v:.2f}%" for k, v in sorted(m.topk.items())))
        if m.mask is not None:
            part.append(f"mask > {m.mask.level:g}: IoU {m.mask.iou:.4f}, {100.0 * m.mask.agreement:.2f}% of "
                        f"positions decide alike ({100.0 * m.mask.positives:.2f}% above in the float model)")
        if m.nonfinite_matched or m.nonfinite_mismatched:
            part.append(f"{m.nonfinite_matched} non-finite value(s) equal in both models left out"
                        + (f", {m.nonfinite_mismatched} non-finite in one model only (an infinite error)"
                           if m.nonfinite_mismatched else ""))
        if part:
            lines.append(f"  {_short(m.name)}: " + "; ".join(part))
    return ["", "per output:", *lines] if lines else []


def _direction(text: str) -> str:
    """The "... is better" part of a legend entry."""
    part = next((p for p in text.split(";") if "better" in p), text)
    return " " + part.strip().split(" (")[0]


def _yaml_str(s: str) -> str:
    """``s`` as a single-quoted YAML scalar."""
    return "'" + s.replace("'", "''") + "'"


def _fmt_db(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) else str(x)


def _short(name: str, width: int = 48) -> str:
    if len(name) <= width:
        return name
    keep = width - 3
    return name[: keep // 2] + "..." + name[len(name) - (keep - keep // 2):]


def _format_rows(rows: Sequence[TensorMetrics], info: Mapping[str, LayerInfo] | None = None) -> list[str]:
    header: tuple[str, ...] = ("tensor", "SQNR dB", "cosine", "max|d|", "mean|d|", "top1/exact", "elements")
    if info is not None:
        header += ("op", "node", "plan rule")
    body = []
    for m in rows:
        agree = m.top1_agreement if m.top1_agreement is not None else m.exact_match
        row: tuple[str, ...] = (
            _short(m.name),
            _fmt_db(m.sqnr_db),
            f"{m.cosine:.6f}",
            f"{m.max_abs:.4g}",
            f"{m.mean_abs:.4g}",
            "-" if agree is None else f"{100.0 * agree:.2f}%",
            str(m.elements),
        )
        if info is not None:
            li = info.get(m.name)
            row += (li.op_type, _short(li.node or "-", 32), li.rule or "-") if li is not None else ("-", "-", "-")
        body.append(row)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    left = {0, 7, 8, 9}
    out = []
    for r in [header, *body]:
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  " + "  ".join(cells).rstrip())
    return out
