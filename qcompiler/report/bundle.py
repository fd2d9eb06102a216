"""Deployment bundles: ``qcompiler package`` writes one, ``qcompiler verify`` checks one.

A bundle is a folder (and optionally a ``.zip`` of it) holding everything a deployment needs and the evidence
that it was validated::

    BUNDLE/
      manifest.json          sha256 + size of every other file; qcompiler / onnx / onnxruntime versions; target;
                             canonical pipeline; input / output signatures; opset imports; custom-op domains;
                             validation summary and the check SQNRs
      model.onnx             the quantized model (+ model.onnx.data when it has external data)
      model.plan.yaml        the resolved precision plan (which rule decided every node)
      model.names.json       with ``compact_names``: the map from the model's short names back to the originals
      validation.json        the validation report (per output and per layer: SQNR, cosine, errors, top-1)
      validation.html        the same as a self-contained page: verdict, legend, an inline-SVG per-layer SQNR bar
                             chart, every layer in graph order (op, node, plan rule; the worst highlighted)
      check/feeds.npz        the first few validation feeds ...
      check/reference.npz    ... and the float model's outputs on them

:func:`qcompiler.api.build_bundle` compiles with validation (the ``min_sqnr_db`` gate included), then assembles the bundle in a
temporary folder beside the destination and renames it into place: a failed run leaves nothing behind (an SQNR
below the gate leaves only the compile report, ``BUNDLE.rejected.report.json``). Every file is deterministic — the same inputs give byte-identical bundles (no timestamps;
zip entries carry a fixed date).

:func:`verify_bundle` re-hashes every file against ``manifest.json`` (a changed, missing or unexpected file is a
:class:`UserError` naming it), loads the model through the checks of :func:`qcompiler.ir.load_model`, and reruns
validation: the quantized model on ``check/feeds.npz`` against ``check/reference.npz`` must reproduce the
recorded SQNRs (within ``CHECK_TOLERANCE_DB``) and pass the recorded threshold; given the float model and data,
the full validation is rerun too.
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler import __version__, ir
from qcompiler.core.errors import UserError
from qcompiler.core.numbers import json_float, sqnr_db
from qcompiler.ir.report_support import custom_op_domains, library_versions
from qcompiler.report.validate.compare import validate
from qcompiler.report.validate.files import load_feeds, load_names
from qcompiler.report.validate.result import LEGEND, NO_THRESHOLD

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "qcompiler-bundle"
BUNDLE_VERSION = 1
MODEL_NAME = "model.onnx"
MANIFEST = "manifest.json"
#: Feeds kept in ``check/`` for ``verify`` to rerun.
CHECK_SAMPLES = 4
#: ``verify``: a check SQNR may differ from the recorded one by this much (other CPU, other onnxruntime build).
CHECK_TOLERANCE_DB = 0.5
#: Layers shown in the HTML bar chart (worst first).
CHART_LAYERS = 60
#: Layers highlighted in the HTML table of layers in graph order.
WORST_LAYERS = 5
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------------------------- helpers
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A deterministic .npz (fixed entry dates, sorted names, stored), readable with ``allow_pickle=False``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            arr = np.ascontiguousarray(arrays[name])
            if arr.dtype.hasobject:
                raise ValueError(f"array '{name}' holds Python objects")
            member = io.BytesIO()
            np.lib.format.write_array(member, arr, allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except Exception as e:
        raise UserError(f"{path}: cannot read ({type(e).__name__}: {e})") from None


def _stack_feeds(feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``check/feeds.npz`` layout: one array per input and sample, ``{input}/{i}`` (shapes may differ)."""
    out: dict[str, np.ndarray] = {}
    for i, feed in enumerate(feeds):
        for k, v in feed.items():
            out[f"{k}/{i:04d}"] = np.asarray(v)
    return out


def _unstack(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    samples: dict[int, dict[str, np.ndarray]] = {}
    for key, arr in arrays.items():
        name, _, idx = key.rpartition("/")
        if not name or not idx.isdigit():
            raise UserError(f"check data: unexpected array name '{key}'")
        samples.setdefault(int(idx), {})[name] = arr
    return [samples[i] for i in sorted(samples)]


def _num(x: Any) -> float:
    if isinstance(x, str):
        return float(x)  # "inf" / "-inf" / "nan"
    return float(x)


def _signatures(model: Any) -> dict[str, Any]:
    info = ir.model_summary(model)
    return {"inputs": info["inputs"], "outputs": info["outputs"], "opset_imports": info["opset"]}


def _run(sess: Any, feeds: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    names = [o.name for o in sess.get_outputs()]
    wanted = {i.name for i in sess.get_inputs()}
    out = []
    for i, feed in enumerate(feeds):
        try:
            vals = sess.run(names, {k: v for k, v in feed.items() if k in wanted})
        except Exception as e:
            raise UserError(f"check sample {i}: onnxruntime failed: {' '.join(str(e).split())[:300]}") from None
        out.append(dict(zip(names, vals)))
    return out


def _check_sqnrs(ref: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]) -> dict[str, float]:
    names = list(ref[0]) if ref else []
    return {n: sqnr_db([r[n] for r in ref], [g.get(n, np.empty(0)) for g in got]) for n in names}


# ------------------------------------------------------------------------------------------------ build
@dataclass
class BundleResult:
    path: Path
    zip_path: Path | None
    files: dict[str, dict[str, Any]]
    manifest: dict[str, Any]
    validation: Any = None
    compile_report: dict[str, Any] = field(default_factory=dict)


def package_model(model: str | os.PathLike[str], bundle: str | os.PathLike[str],
                  compile_into: Callable[[Path, Path], Any], *, calib: str | os.PathLike[str], plan: Any = None,
                  min_sqnr_db: float | None = None, make_zip: bool = False, validate_data: Any = None,
                  check_samples: int = CHECK_SAMPLES) -> BundleResult:
    """Write a deployment bundle of ``model`` at ``bundle``: ``compile_into(model, path)`` compiles it with
    validation to ``path`` (a :func:`qcompiler.api.compile_model` with ``validate=True`` and the same ``calib``,
    ``plan``, ``min_sqnr_db`` and ``validate_data``) and returns its result (``.validation``, ``.report``,
    ``.pipeline``); the other arguments are those of :func:`qcompiler.api.build_bundle`."""
    src, dest = Path(model), Path(bundle)
    if str(calib) in ("random", "none") and validate_data is None:
        raise UserError(f"--calib {calib}: a bundle needs real calibration data (or --validate-data) to validate")
    if dest.exists():
        raise UserError(f"{dest}: already exists; remove it or choose another -o")
    zip_dest = dest.with_name(dest.name + ".zip") if make_zip else None
    if zip_dest is not None and zip_dest.exists():
        raise UserError(f"{zip_dest}: already exists; remove it or choose another -o")
    if check_samples <= 0:
        raise UserError(f"--check-samples must be positive, got {check_samples}")

    created = []
    p = dest.parent.absolute()
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as e:
        raise UserError(f"{dest}: cannot write here: {e.strerror or e}") from None
    done = False
    try:
        result = compile_into(src, tmp / MODEL_NAME)
        validation = result.validation
        assert validation is not None
        report = result.report

        # check data: the first few validation feeds and the float model's outputs on them
        float_model = ir.load_model(src)
        feeds_src = validate_data if validate_data is not None else calib
        feeds = [dict(f) for _, f in zip(range(check_samples), load_feeds(feeds_src, float_model))]
        reference = _run(ir.session(float_model, threads=1), feeds)
        del float_model
        qsess = ir.session(tmp / MODEL_NAME, threads=1)
        check = _check_sqnrs(reference, _run(qsess, feeds))
        del qsess
        (tmp / "check").mkdir()
        (tmp / "check" / "feeds.npz").write_bytes(_npz_bytes(_stack_feeds(feeds)))
        (tmp / "check" / "reference.npz").write_bytes(_npz_bytes(_stack_feeds(reference)))

        qmodel = ir.load_model(tmp / MODEL_NAME, check=False)
        vjson = validation.to_json()
        vjson["data"] = Path(str(feeds_src)).name
        (tmp / "validation.json").write_text(json.dumps(vjson, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_VERSION,
            "model": MODEL_NAME,
            "source_model": src.name,
            "versions": _versions(),
            "target": report["target"],
            "pipeline": result.pipeline,
            "plan": Path(str(getattr(plan, "source", plan))).name if plan is not None else "<default plan>",
            **_signatures(qmodel),
            "custom_op_domains": custom_op_domains(qmodel),
            "validation": {"samples": validation.samples, "min_sqnr_db": min_sqnr_db, "passed": validation.passed if min_sqnr_db is not None else None,
                           "worst_output_sqnr_db": vjson["worst_output_sqnr_db"],
                           "outputs": {m["name"]: m["sqnr_db"] for m in vjson["outputs"]}},
            "check": {"samples": len(feeds), "tolerance_db": CHECK_TOLERANCE_DB,
                      "sqnr_db": {k: json_float(v, 3) for k, v in check.items()}},
            "sizes": report.get("sizes", {}),
        }
        del qmodel
        (tmp / "validation.html").write_text(render_html(manifest, vjson), encoding="utf-8")
        files = _hash_tree(tmp)
        manifest["files"] = files
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")

        if zip_dest is not None:
            ztmp = tmp.with_name(tmp.name + ".zip")
            _write_zip(tmp, ztmp, dest.name)
            os.chmod(ztmp, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        os.rename(tmp, dest)
        if zip_dest is not None:
            os.replace(ztmp, zip_dest)
        done = True
        return BundleResult(dest, zip_dest, files, manifest, validation, report)
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
            Path(str(tmp) + ".zip").unlink(missing_ok=True)
            for c in created:
                try:
                    c.rmdir()
                except OSError:
                    break


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _versions() -> dict[str, str]:
    return {"qcompiler": __version__, **library_versions()}


def _hash_tree(root: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for f in sorted(root.rglob("*")):
        if f.is_file():
            rel = f.relative_to(root).as_posix()
            if rel != MANIFEST:
                files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return files


def _write_zip(folder: Path, dest: Path, prefix: str) -> None:
    """A deterministic zip of ``folder`` (sorted entries under ``prefix/``, fixed dates and permissions)."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for f in sorted(folder.rglob("*")):
            if not f.is_file():
                continue
            info = zipfile.ZipInfo(f"{prefix}/{f.relative_to(folder).as_posix()}", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            with open(f, "rb") as src, zf.open(info, "w", force_zip64=True) as out:
                shutil.copyfileobj(src, out, 1 << 20)


# ----------------------------------------------------------------------------------------------- verify
@dataclass
class VerifyResult:
    files: int
    check: dict[str, tuple[float, float]]  # output -> (measured, recorded)
    full: Any = None
    messages: list[str] = field(default_factory=list)


def _extract_zip(path: Path, into: Path) -> Path:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path}: not a valid bundle zip ({type(e).__name__})") from None
    with zf:
        roots = set()
        for info in zf.infolist():
            name = info.filename
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or ".." in parts or ":" in name or (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise UserError(f"{path}: entry '{name}' escapes the bundle folder; refused")
            if parts:
                roots.add(parts[0])
        if len(roots) != 1:
            raise UserError(f"{path}: a bundle zip holds exactly one top-level folder")
        zf.extractall(into)
    return into / roots.pop()


def verify_bundle(bundle: str | os.PathLike[str], *, float_model: Any = None, data: Any = None) -> VerifyResult:
    """Check ``bundle`` (folder or .zip) against its manifest and rerun its validation; :class:`UserError` on
    any mismatch."""
    path = Path(bundle)
    if not path.exists():
        raise UserError(f"{path}: no such bundle")
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="qcompiler-verify-") as td:
            return _verify_folder(_extract_zip(path, Path(td)), float_model, data, label=path)
    return _verify_folder(path, float_model, data, label=path)


def _verify_folder(root: Path, float_model: Any, data: Any, label: Path) -> VerifyResult:
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise UserError(f"{label}: no {MANIFEST}; not a qcompiler bundle")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{label}/{MANIFEST}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{label}/{MANIFEST}: not a qcompiler bundle manifest")
    if manifest.get("format_version") != BUNDLE_VERSION:
        raise UserError(f"{label}/{MANIFEST}: bundle format version {manifest.get('format_version')} is not "
                        f"{BUNDLE_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_NAME not in files:
        raise UserError(f"{label}/{MANIFEST}: 'files' lists no {MODEL_NAME}")
    root_r = root.resolve()
    for rel, meta in sorted(files.items()):
        f = root / rel
        if not isinstance(meta, dict) or ".." in Path(rel).parts or Path(rel).is_absolute() or (
                root_r not in f.resolve().parents):
            raise UserError(f"{label}/{MANIFEST}: bad entry '{rel}'")
        if not f.is_file():
            raise UserError(f"{label}/{rel}: missing (listed in {MANIFEST})")
        if f.stat().st_size != meta.get("bytes"):
            raise UserError(f"{label}/{rel}: size {f.stat().st_size} bytes differs from the manifest's "
                            f"{meta.get('bytes')}; the file was modified")
        digest = sha256_file(f)
        if digest != meta.get("sha256"):
            raise UserError(f"{label}/{rel}: sha256 {digest[:16]}… differs from the manifest's "
                            f"{str(meta.get('sha256'))[:16]}…; the file was modified")
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and rel != MANIFEST and rel not in files:
            raise UserError(f"{label}/{rel}: not listed in {MANIFEST}")

    qmodel = ir.load_model(root / MODEL_NAME)
    versions = manifest.get("versions", {})
    now = _versions()
    messages = [f"{k} {versions.get(k)} -> {v}" for k, v in now.items() if versions.get(k) not in (None, v)]

    # rerun: the quantized model on the check feeds against the recorded float outputs
    feeds = _unstack(_load_npz(root / "check" / "feeds.npz"))
    reference = _unstack(_load_npz(root / "check" / "reference.npz"))
    got = _run(ir.session(qmodel, threads=1), feeds)
    measured = _check_sqnrs(reference, got)
    recorded = {k: _num(v) for k, v in manifest.get("check", {}).get("sqnr_db", {}).items()}
    tol = float(manifest.get("check", {}).get("tolerance_db", CHECK_TOLERANCE_DB))
    gate = manifest.get("validation", {}).get("min_sqnr_db")
    check: dict[str, tuple[float, float]] = {}
    for name, rec in recorded.items():
        m = measured.get(name, math.nan)
        check[name] = (m, rec)
        same = (m == rec) or (math.isfinite(m) and math.isfinite(rec) and abs(m - rec) <= tol)
        if not same:
            raise UserError(f"{label}/{MODEL_NAME}: output '{name}' SQNR on the check feeds is {m:.3f} dB, the "
                            f"manifest recorded {rec:.3f} dB (tolerance {tol} dB)")
        if gate is not None and not (m >= float(gate)):
            raise UserError(f"{label}/{MODEL_NAME}: output '{name}' SQNR {m:.3f} dB is below the bundle's "
                            f"--min-sqnr {gate} dB")
    full = None
    if float_model is not None or data is not None:
        if float_model is None or data is None:
            raise UserError("verify: give both --model FLOAT.onnx and --data DATA to rerun the full validation")
        fm = ir.load_model(float_model)
        names_file = root / (Path(MODEL_NAME).stem + ".names.json")  # a --compact-names bundle
        names = load_names(names_file) if names_file.is_file() else None
        full = validate(fm, qmodel, load_feeds(data, fm), min_sqnr_db=gate, names=names)
        if gate is not None and not full.passed:
            raise UserError(f"{label}: full validation: output SQNR {full.worst_output_sqnr():.2f} dB is below "
                            f"the bundle's --min-sqnr {gate} dB")
    return VerifyResult(files=len(files) + 1, check=check, full=full, messages=messages)


# ------------------------------------------------------------------------------------------------- HTML
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
    vals = [_num(r["sqnr_db"]) for r in rows]
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
    worst |= {str(r["name"]) for r in layers if gate is not None and not _num(r["sqnr_db"]) >= gate}
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


def render_html(manifest: dict[str, Any], validation: dict[str, Any]) -> str:
    """The self-contained validation page (no scripts, no external resources)."""
    e = html.escape
    gate = manifest["validation"].get("min_sqnr_db")

    def fmt(v: Any) -> str:
        return e(str(v)) if v is not None else "–"

    out_rows = "\n".join(
        f"<tr><td>{e(m['name'])}</td><td>{fmt(m['sqnr_db'])}</td><td>{fmt(m['cosine'])}</td>"
        f"<td>{fmt(m['max_abs'])}</td><td>{fmt(m['mean_abs'])}</td>"
        f"<td>{fmt(m['top1_agreement'] if m['top1_agreement'] is not None else m.get('exact_match'))}</td></tr>"
        for m in validation["outputs"])
    sig = "\n".join(f"<tr><td>{e(kind)}</td><td>{e(s['name'])}</td><td>{e(str(s['dtype']))}</td>"
                    f"<td>{e(str(s['shape']))}</td></tr>"
                    for kind in ("inputs", "outputs") for s in manifest[kind])
    verdict = ("PASS" if validation["passed"] else "FAIL") if gate is not None else NO_THRESHOLD
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
<tr><th>output</th><th>SQNR dB</th><th>cosine</th><th>max |d|</th><th>mean |d|</th><th>top-1 / exact</th></tr>
{out_rows}
</table>
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
