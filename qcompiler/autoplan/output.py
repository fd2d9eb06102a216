"""What ``qcompiler plan`` writes: the plan file (:func:`write_plan`), the Pareto front as CSV and as a
hand-written SVG plot (:func:`write_front`), with the output SQNR of some of its points measured
(:func:`measure_front`)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from qcompiler import ir
from qcompiler.autoplan.plans import text_for_choice
from qcompiler.autoplan.probes import measure_sqnr
from qcompiler.autoplan.result import AutoPlanResult, FrontPoint, Progress
from qcompiler.plan import Plan


def measure_front(model_path: str | Path, result: AutoPlanResult, calib: str | Path, *, points: int = 5,
                  validate_data: str | Path | None = None, calib_samples: int | None = None,
                  progress: Progress | None = None) -> list[FrontPoint]:
    """Measure the output SQNR of up to ``points`` front points spread over the cost range, plus the chosen
    plan; fills their ``measured_sqnr_db`` and returns them."""
    front = result.front
    if not front or points <= 0:
        return []
    picked = set(np.unique(np.round(np.linspace(0, len(front) - 1, points)).astype(int)).tolist())
    picked |= {i for i, p in enumerate(front) if p.chosen}
    order = sorted(picked)
    for k, i in enumerate(order):
        if progress:
            progress("measure front", k, len(order))
        p = front[i]
        plan = result.plan if p.chosen and not result.uniform else Plan.from_text(text_for_choice(result, p.choice), source="<front>")
        p.measured_sqnr_db = measure_sqnr(model_path, plan, calib, target=result.target,
                                          validate_data=validate_data, calib_samples=calib_samples)
    if progress:
        progress("measure front", len(order), len(order))
    return [front[i] for i in order]


def write_plan(result: AutoPlanResult, path: str | Path) -> Path:
    p = Path(path)
    with ir.atomic_output(p) as tmp:
        tmp.write_text(result.text, encoding="utf-8")
    return p


def front_csv(result: AutoPlanResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["point", "chosen", "bytes", "bitops", "avg_weight_bits", "predicted_sensitivity",
                "predicted_sqnr_db", "measured_sqnr_db", *[f"n_{c}" for c in result.candidates], "plan"])
    for i, p in enumerate(result.front):
        counts = p.counts(result.candidates)
        w.writerow([i, int(p.chosen), round(p.bytes), round(p.bitops), f"{p.avg_bits:.4f}",
                    f"{p.sensitivity:.6g}",
                    "" if p.predicted_sqnr_db is None or not math.isfinite(p.predicted_sqnr_db)
                    else f"{p.predicted_sqnr_db:.3f}",
                    "" if p.measured_sqnr_db is None else f"{p.measured_sqnr_db:.3f}",
                    *[counts[c] for c in result.candidates],
                    " ".join(result.candidates[ci] for ci in p.choice)])
    return buf.getvalue()


def write_front(result: AutoPlanResult, csv_path: str | Path, svg_path: str | Path | None = None) -> list[Path]:
    """Write the Pareto front as CSV and (default: beside it, ``.svg``) as a hand-written SVG plot."""
    out = []
    p = Path(csv_path)
    with ir.atomic_output(p) as tmp:
        tmp.write_text(front_csv(result), encoding="utf-8")
    out.append(p)
    svg = Path(svg_path) if svg_path is not None else p.with_suffix(".svg")
    with ir.atomic_output(svg) as tmp:
        tmp.write_text(front_svg(result), encoding="utf-8")
    out.append(svg)
    return out


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    ticks = []
    x = start
    while x <= hi + 1e-9 * step:
        ticks.append(round(x, 10))
        x += step
    return ticks


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def front_svg(result: AutoPlanResult) -> str:
    """Predicted and measured output SQNR against the budget's cost, as a standalone SVG (no plotting library)."""
    unit = result.unit
    xs_of = {"bytes": lambda p: p.bytes, "bitops": lambda p: p.bitops, "bits": lambda p: p.avg_bits}[unit]
    pts = result.front
    pred = [(xs_of(p), p.predicted_sqnr_db) for p in pts if p.predicted_sqnr_db is not None
            and math.isfinite(p.predicted_sqnr_db)]
    meas = [(xs_of(p), p.measured_sqnr_db) for p in pts if p.measured_sqnr_db is not None
            and math.isfinite(p.measured_sqnr_db)]
    sens = [(xs_of(p), p.sensitivity) for p in pts]
    use_sens = not pred and not meas
    series = sens if use_sens else pred + meas
    w, h, ml, mr, mt, mb = 720, 440, 80, 30, 50, 60
    xs = [x for x, _ in (series or [(0.0, 0.0)])] + [result.budget_value]
    ys = [y for _, y in (series or [(0.0, 0.0)])]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 <= x0:
        x1 = x0 + 1.0
    if y1 <= y0:
        y1 = y0 + 1.0
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def px(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * (w - ml - mr)

    def py(y: float) -> float:
        return h - mb - (y - y0) / (y1 - y0) * (h - mt - mb)

    label_x = {"bytes": "model bytes", "bitops": "BitOps", "bits": "average weight bits"}[unit]
    label_y = "predicted sensitivity (lower is better)" if use_sens else "output SQNR (dB)"
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
          'font-family="sans-serif" font-size="12">',
          f'<rect x="0" y="0" width="{w}" height="{h}" fill="white"/>',
          f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="15">'
          f'{_esc(Path(result.model).name)}: Pareto front ({_esc(result.sensitivity.metric)}, '
          f'{_esc(", ".join(result.candidates))})</text>',
          f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="black"/>',
          f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="black"/>']
    scale, suffix = 1.0, ""
    if unit == "bytes":
        scale, suffix = next(((f, u) for f, u in ((1024.0**2, " MiB"), (1024.0, " KiB")) if x1 >= 4 * f), (1.0, " B"))
    elif unit == "bitops":
        scale, suffix = next(((f, u) for f, u in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")) if x1 >= 4 * f),
                             (1.0, ""))
    for t_scaled in _nice_ticks(x0 / scale, x1 / scale):
        tx = t_scaled * scale
        lab = f"{t_scaled:g}{suffix}"
        el.append(f'<line x1="{px(tx):.1f}" y1="{h - mb}" x2="{px(tx):.1f}" y2="{h - mb + 5}" stroke="black"/>')
        el.append(f'<text x="{px(tx):.1f}" y="{h - mb + 18}" text-anchor="middle">{_esc(lab)}</text>')
        el.append(f'<line x1="{px(tx):.1f}" y1="{mt}" x2="{px(tx):.1f}" y2="{h - mb}" stroke="#eee"/>')
    for ty in _nice_ticks(y0, y1):
        el.append(f'<line x1="{ml - 5}" y1="{py(ty):.1f}" x2="{ml}" y2="{py(ty):.1f}" stroke="black"/>')
        el.append(f'<text x="{ml - 8}" y="{py(ty) + 4:.1f}" text-anchor="end">{ty:g}</text>')
        el.append(f'<line x1="{ml}" y1="{py(ty):.1f}" x2="{w - mr}" y2="{py(ty):.1f}" stroke="#eee"/>')
    el.append(f'<text x="{(ml + w - mr) / 2}" y="{h - 15}" text-anchor="middle">{label_x}</text>')
    el.append(f'<text x="18" y="{(mt + h - mb) / 2}" text-anchor="middle" '
              f'transform="rotate(-90 18 {(mt + h - mb) / 2})">{label_y}</text>')
    bx = px(result.budget_value)
    el.append(f'<line x1="{bx:.1f}" y1="{mt}" x2="{bx:.1f}" y2="{h - mb}" stroke="#c33" stroke-dasharray="5,4"/>')
    el.append(f'<text x="{bx + 4:.1f}" y="{mt + 12}" fill="#c33">budget</text>')
    line_pts = sens if use_sens else pred
    if line_pts:
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in line_pts)
        el.append(f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>')
        for x, y in line_pts:
            el.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="#1f77b4"/>')
    for x, y in meas:
        el.append(f'<rect x="{px(x) - 4:.1f}" y="{py(y) - 4:.1f}" width="8" height="8" fill="#ff7f0e"/>')
    for p in pts:
        if p.chosen:
            yc: float | None = p.sensitivity if use_sens else (
                p.measured_sqnr_db if p.measured_sqnr_db is not None else p.predicted_sqnr_db)
            if yc is not None and math.isfinite(yc):
                el.append(f'<circle cx="{px(xs_of(p)):.1f}" cy="{py(yc):.1f}" r="7" fill="none" stroke="#2ca02c" '
                          'stroke-width="2"/>')
    lx, ly = w - mr - 200, h - mb - 60
    el.append(f'<rect x="{lx}" y="{ly}" width="195" height="56" fill="white" stroke="#999"/>')
    el.append(f'<circle cx="{lx + 12}" cy="{ly + 14}" r="3" fill="#1f77b4"/><text x="{lx + 22}" y="{ly + 18}">'
              f'{"predicted sensitivity" if use_sens else "predicted SQNR"}</text>')
    el.append(f'<rect x="{lx + 8}" y="{ly + 26}" width="8" height="8" fill="#ff7f0e"/><text x="{lx + 22}" '
              f'y="{ly + 34}">measured SQNR</text>')
    el.append(f'<circle cx="{lx + 12}" cy="{ly + 46}" r="6" fill="none" stroke="#2ca02c" stroke-width="2"/>'
              f'<text x="{lx + 22}" y="{ly + 50}">chosen plan</text>')
    el.append("</svg>")
    return "\n".join(el) + "\n"
