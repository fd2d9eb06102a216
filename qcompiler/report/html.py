"""The bundle's validation page: ``validation.html``, one self-contained HTML file (no scripts, no external
resources) with the verdict, a legend, an SVG bar chart of the worst layers' SQNR, the layers in graph order
(the worst highlighted) and plan rules ready to paste. Rendered from the manifest and the validation JSON.
"""

from __future__ import annotations

import html
import math
from typing import Any

from qcompiler.report.validate.result import LEGEND, NO_THRESHOLD

#: Layers shown in the HTML bar chart (worst first).
CHART_LAYERS = 60
#: Layers highlighted in the HTML table of layers in graph order.
WORST_LAYERS = 5


def _bar_color(v: float, gate: float | None) -> str:
    if math.isnan(v) or (gate is not None and v < gate):
        return "#d64545"
    if v >= 30:
        return "#2e8b57"
    if v >= 20:
        return "#6aa84f"
    if v >= 10:
        return "#e69138"
    return "#d64545"


def _svg_chart(layers: list[dict[str, Any]], gate: float | None) -> str:
    """Horizontal bars, one per layer (worst first), SQNR in dB; ``inf`` drawn full width, ``nan`` red."""
    rows = layers[:CHART_LAYERS]
    if not rows:
        return "<p>No per-layer metrics (per-layer validation was skipped for this model).</p>"
    vals = [float(r["sqnr_db"]) for r in rows]
    finite = [v for v in vals if math.isfinite(v)]
    top = max([*finite, gate or 0.0, 10.0])
    top = math.ceil(top / 10.0) * 10.0
    bottom = min([0.0, *finite])
    label_w, bar_w, row_h, pad = 330, 480, 18, 44
    width = label_w + bar_w + 80
    height = pad + row_h * len(rows) + 30

    def x(v: float) -> float:
        return label_w + bar_w * (min(max(v, bottom), top) - bottom) / (top - bottom)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="per-layer SQNR in dB" '
           'font-family="sans-serif" font-size="11">']
    for tick in range(int(bottom), int(top) + 1, 10):
        tx = x(float(tick))
        out.append(f'<line x1="{tx:.1f}" y1="{pad - 6}" x2="{tx:.1f}" y2="{height - 24}" stroke="#ddd"/>')
        out.append(f'<text x="{tx:.1f}" y="{height - 10}" text-anchor="middle" fill="#555">{tick}</text>')
    out.append(f'<text x="{label_w + bar_w / 2:.0f}" y="13" text-anchor="middle" fill="#333">SQNR (dB), '
               f'worst layers first</text>')
    for i, (r, v) in enumerate(zip(rows, vals)):
        y = pad + i * row_h
        name = str(r["name"])
        short = name if len(name) <= 48 else name[:22] + "…" + name[-23:]
        val = "nan" if math.isnan(v) else ("inf" if v == math.inf else ("-inf" if v == -math.inf else f"{v:.2f}"))
        w = 0.0 if math.isnan(v) else x(v if math.isfinite(v) else (top if v > 0 else bottom)) - x(bottom)
        out.append(f'<text x="{label_w - 6}" y="{y + 12}" text-anchor="end" fill="#222">'
                   f'<title>{html.escape(name)}</title>{html.escape(short)}</text>')
        out.append(f'<rect x="{x(bottom):.1f}" y="{y + 2}" width="{max(w, 1.0):.1f}" height="{row_h - 5}" '
                   f'fill="{_bar_color(v, gate)}"/>')
        out.append(f'<text x="{x(bottom) + max(w, 1.0) + 4:.1f}" y="{y + 12}" fill="#222">{val}</text>')
    if gate is not None:
        gx = x(float(gate))
        out.append(f'<line x1="{gx:.1f}" y1="{pad - 6}" x2="{gx:.1f}" y2="{height - 24}" stroke="#d64545" '
                   'stroke-dasharray="4 3"/>')
        out.append(f'<text x="{gx + 3:.1f}" y="{pad - 9}" fill="#d64545">gate {gate:g} dB</text>')
    out.append("</svg>")
    return "\n".join(out)


def _verdict_class(verdict: str) -> str:
    return {"PASS": "pass", "FAIL": "fail"}.get(verdict, "none")


def _layer_table(validation: dict[str, Any], gate: float | None) -> str:
    """Every compared layer in graph order with its op type, node and plan rule; the ``WORST_LAYERS`` worst (and
    any below the gate) highlighted."""
    layers = validation.get("layers", [])
    if not layers:
        return "<p>No per-layer metrics.</p>"
    worst = {str(r["name"]) for r in layers[:WORST_LAYERS]}  # ``layers`` are worst first
    worst |= {str(r["name"]) for r in layers if gate is not None and not float(r["sqnr_db"]) >= gate}
    by_name = {str(r["name"]): r for r in layers}
    order = [n for n in validation.get("graph_order", []) if n in by_name] or sorted(
        by_name, key=lambda n: by_name[n].get("index") if by_name[n].get("index") is not None else 0)
    e = html.escape

    def cell(v: Any) -> str:
        return f"<td>{e(str(v)) if v is not None else '–'}</td>"

    rows = []
    for i, name in enumerate(order):
        r = by_name[name]
        cls = ' class="worst"' if name in worst else ""
        rows.append(f"<tr{cls}><td>{i}</td>{cell(name)}{cell(r.get('op_type'))}{cell(r.get('node'))}"
                    f"{cell(r.get('rule'))}{cell(r['sqnr_db'])}{cell(r['cosine'])}{cell(r['max_abs'])}</tr>")
    return ("<p>Highlighted: the worst layers" + (" and any below the gate" if gate is not None else "") + ".</p>\n"
            "<table>\n<tr><th>#</th><th>tensor</th><th>op</th><th>node</th><th>plan rule</th><th>SQNR dB</th>"
            "<th>cosine</th><th>max |d|</th></tr>\n" + "\n".join(rows) + "\n</table>")


def _worst_slice_cell(ws: Any) -> str:
    """``index i of axis a: SQNR dB, max |d|`` of an output's worst slice (``–`` without one)."""
    if not isinstance(ws, dict) or ws.get("index") is None:
        return "–"
    return html.escape(f"{ws['index']} of axis {ws['axis']}: {ws['sqnr_db']} dB, max |d| {ws['max_abs']}")


def render_html(manifest: dict[str, Any], validation: dict[str, Any]) -> str:
    """The self-contained validation page (no scripts, no external resources)."""
    e = html.escape
    gate = manifest["validation"].get("min_sqnr_db")

    def fmt(v: Any) -> str:
        return e(str(v)) if v is not None else "–"

    out_rows = "\n".join(
        f"<tr><td>{e(m['name'])}</td><td>{fmt(m['sqnr_db'])}</td><td>{fmt(m['cosine'])}</td>"
        f"<td>{fmt(m['max_abs'])}</td><td>{fmt(m['mean_abs'])}</td>"
        f"<td>{fmt(m['top1_agreement'] if m['top1_agreement'] is not None else m.get('exact_match'))}</td>"
        f"<td>{_worst_slice_cell(m.get('worst_slice'))}</td></tr>"
        for m in validation["outputs"])
    checks = validation.get("checks") or []
    checks_html = ("<h2>Checks</h2>\n<ul>\n" + "\n".join(
        f"<li><span class=\"{'pass' if c.get('passed') else 'fail'}\">{'pass' if c.get('passed') else 'FAIL'}</span> "
        f"<code>{e(str(c.get('check')))}</code>: measured {fmt(c.get('value'))}</li>" for c in checks)
        + "\n</ul>") if checks else ""
    sig = "\n".join(f"<tr><td>{e(kind)}</td><td>{e(s['name'])}</td><td>{e(str(s['dtype']))}</td>"
                    f"<td>{e(str(s['shape']))}</td></tr>"
                    for kind in ("inputs", "outputs") for s in manifest[kind])
    verdict = ("PASS" if validation["passed"] else "FAIL") if gate is not None or checks else NO_THRESHOLD
    gate_txt = f"threshold {gate:g} dB" if gate is not None else "give --min-sqnr DB for a verdict"
    legend = "\n".join(f"<li>{e(text)}</li>" for text in validation.get("legend", LEGEND).values())
    rules = str(validation.get("suggested_rules") or "")
    rules_html = (f"<p>To keep the worst layers float, paste under <code>rules:</code> in the plan:</p>\n"
                  f"<pre>{e(rules)}</pre>") if rules else ""
    versions = ", ".join(f"{k} {v}" for k, v in sorted(manifest["versions"].items()))
    opsets = ", ".join(f"{k} {v}" for k, v in sorted(manifest["opset_imports"].items()))
    n_layers = len(validation.get("layers", []))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>qcompiler validation: {e(manifest['source_model'])}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; max-width: 1000px; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-top: 28px; }}
table {{ border-collapse: collapse; font-size: 13px; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #f2f2f2; }}
.pass {{ color: #2e8b57; font-weight: bold; }} .fail {{ color: #d64545; font-weight: bold; }}
.none {{ color: #555; font-weight: bold; }} tr.worst td {{ background: #fbe3e3; }}
code {{ background: #f4f4f4; padding: 1px 4px; }}
</style>
</head>
<body>
<h1>Validation of {e(manifest['source_model'])} → {e(manifest['model'])}</h1>
<p><span class="{_verdict_class(verdict)}">{e(verdict)}</span>: worst output SQNR {fmt(validation['worst_output_sqnr_db'])} dB,
{e(gate_txt)}, over {validation['samples']} sample(s) of <code>{e(str(validation.get('data', '')))}</code>.</p>
<p>Target <code>{e(manifest['target'])}</code>; pipeline <code>{e(manifest['pipeline'])}</code>;
plan <code>{e(str(manifest['plan']))}</code>.<br>
Opset imports: {e(opsets)}; custom-op domains: {e(', '.join(manifest['custom_op_domains']) or 'none')}.<br>
{e(versions)}.</p>
<h2>Graph outputs</h2>
<table>
<tr><th>output</th><th>SQNR dB</th><th>cosine</th><th>max |d|</th><th>mean |d|</th><th>top-1 / exact</th>
<th>worst slice</th></tr>
{out_rows}
</table>
{checks_html}
<h2>Per-layer SQNR ({min(n_layers, CHART_LAYERS)} worst of {n_layers} layers)</h2>
{_svg_chart(validation.get('layers', []), gate)}
{rules_html}
<h2>Layers in graph order</h2>
{_layer_table(validation, gate)}
<h2>Legend</h2>
<ul>
{legend}
</ul>
<h2>Signature</h2>
<table>
<tr><th></th><th>name</th><th>dtype</th><th>shape</th></tr>
{sig}
</table>
</body>
</html>
"""
