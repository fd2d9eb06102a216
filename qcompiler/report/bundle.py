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
staging folder beside the destination and renames it (and the zip) into place together, after checking both
paths against every input before any work (:class:`qcompiler.ir.OutputSet`): a failed run leaves nothing behind
(an SQNR below the gate leaves only the compile report, ``BUNDLE.rejected.report.json``). Every file is
deterministic — the same inputs give byte-identical bundles (no timestamps;
zip entries carry a fixed date).

:func:`verify_bundle` re-hashes every file against ``manifest.json`` (a changed, missing or unexpected file is a
:class:`UserError` naming it), loads the model through the checks of :func:`qcompiler.ir.load_model`, and reruns
validation: the quantized model on ``check/feeds.npz`` against ``check/reference.npz`` must reproduce the
recorded SQNRs (within ``CHECK_TOLERANCE_DB``) and pass the recorded threshold; given the float model and data,
the full validation is rerun too.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler import __version__, ir
from qcompiler.core.errors import UserError
from qcompiler.core.files import regular_file
from qcompiler.core.numbers import c_contiguous, json_float, sqnr_db
from qcompiler.ir.report_support import custom_op_domains, library_versions
from qcompiler.plan.checks import Check, parse_check
from qcompiler.report.html import render_html
from qcompiler.report.validate.compare import validate
from qcompiler.report.validate.files import load_feeds, load_names

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "qcompiler-bundle"
BUNDLE_VERSION = 1
MODEL_NAME = "model.onnx"
MANIFEST = "manifest.json"
#: Feeds kept in ``check/`` for ``verify`` to rerun.
CHECK_SAMPLES = 4
#: ``verify``: a check SQNR may differ from the recorded one by this much (other CPU, other onnxruntime build).
CHECK_TOLERANCE_DB = 0.5
#: a manifest larger than this is refused before it is read (real ones are a few KiB)
MAX_MANIFEST_BYTES = 16 << 20
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
            arr = c_contiguous(arrays[name])
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
    """The tensor outputs of ``sess`` on each feed (a ZipMap's sequence of maps is not checked: no SQNR, no .npz)."""
    names = [o.name for o in sess.get_outputs() if o.type.startswith("tensor(")]
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
                  check_samples: int = CHECK_SAMPLES,
                  inputs: Sequence[tuple[str | os.PathLike[str], str]] = ()) -> BundleResult:
    """Write a deployment bundle of ``model`` at ``bundle``: ``compile_into(model, path)`` compiles it with
    validation to ``path`` (a :func:`qcompiler.api.compile_model` with ``validate=True`` and the same ``calib``,
    ``plan``, ``min_sqnr_db`` and ``validate_data``) and returns its result (``.validation``, ``.report``,
    ``.pipeline``); ``inputs``: further files the compile reads, as ``(path, what)`` (plugins), which the bundle
    may not overwrite; the other arguments are those of :func:`qcompiler.api.build_bundle`."""
    src, dest = Path(model), Path(bundle)
    if str(calib) in ("random", "none") and validate_data is None:
        raise UserError(f"--calib {calib}: a bundle needs real calibration data (or --validate-data) to validate")
    if check_samples <= 0:
        raise UserError(f"--check-samples must be positive, got {check_samples}")
    zip_dest = dest.with_name(dest.name + ".zip") if make_zip else None
    # The bundle folder and its zip: new paths, checked against every input before any work, assembled in a
    # staging folder beside them and moved into place together (qcompiler.ir.outputs).
    outs = ir.OutputSet()
    outs.add_input(src, "model", model=True)
    outs.add_input(calib, "calibration data")
    plan_file = getattr(plan, "source", plan)
    if plan_file is not None and Path(str(plan_file)).is_file():
        outs.add_input(str(plan_file), "plan")
    outs.add_input(validate_data, "validation data")
    for path, what in inputs:
        outs.add_input(path, what)
    outs.add_output(dest, "-o bundle folder", directory=True, new=True, primary=True)
    if zip_dest is not None:
        outs.add_output(zip_dest, "--zip", new=True)
    with outs:
        tmp = outs.path(dest)
        tmp.mkdir()
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
            "validation": {"samples": validation.samples, "min_sqnr_db": min_sqnr_db, "passed": validation.passed if validation.gated else None,
                           "worst_output_sqnr_db": vjson["worst_output_sqnr_db"],
                           "worst_slice_sqnr_db": vjson["worst_slice_sqnr_db"],
                           "checks": [{k: c[k] for k in ("check", "source", "value", "passed")}
                                      for c in vjson["checks"]],
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
            _write_zip(tmp, outs.path(zip_dest), dest.name)
        outs.commit()  # the zip, then the folder; a failed move rolls back the one already moved
        return BundleResult(dest, zip_dest, files, manifest, validation, report)


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
        for info in zf.infolist():
            if info.flag_bits & 0x1:
                raise UserError(f"{path}: entry '{info.filename}' is encrypted; a bundle zip is never encrypted")
            try:
                zf.extract(info, into)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError, ValueError,
                    zlib.error) as e:  # a bad CRC, a compression method zipfile lacks, a truncated member
                raise UserError(f"{path}: entry '{info.filename}' cannot be extracted ({type(e).__name__}: "
                                f"{_first_line(e)})") from None
    return into / roots.pop()


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else "")[:200]


def verify_bundle(bundle: str | os.PathLike[str], *, float_model: Any = None, data: Any = None) -> VerifyResult:
    """Check ``bundle`` (folder or .zip) against its manifest and rerun its validation; :class:`UserError` on
    any mismatch."""
    path = Path(bundle)
    if not path.exists():
        raise UserError(f"{path}: no such bundle")
    regular_file(path, what="a bundle (a folder or a .zip)", allow_dir=True)
    if path.is_file():
        with tempfile.TemporaryDirectory(prefix="qcompiler-verify-") as td:
            return _verify_folder(_extract_zip(path, Path(td)), float_model, data, label=path)
    return _verify_folder(path, float_model, data, label=path)


def _verify_folder(root: Path, float_model: Any, data: Any, label: Path) -> VerifyResult:
    mpath = root / MANIFEST
    if not mpath.exists():
        raise UserError(f"{label}: no {MANIFEST}; not a qcompiler bundle")
    regular_file(mpath, what="a bundle manifest", max_bytes=MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{label}/{MANIFEST}: not valid JSON ({e})") from None
    except RecursionError:
        raise UserError(f"{label}/{MANIFEST}: nested too deeply to be a manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{label}/{MANIFEST}: not a qcompiler bundle manifest")
    if manifest.get("format_version") != BUNDLE_VERSION:
        raise UserError(f"{label}/{MANIFEST}: bundle format version {manifest.get('format_version')} is not "
                        f"{BUNDLE_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_NAME not in files:
        raise UserError(f"{label}/{MANIFEST}: 'files' lists no {MODEL_NAME}")
    fields = _manifest_fields(manifest, f"{label}/{MANIFEST}")
    root_r = root.resolve()
    for rel, meta in sorted(files.items()):
        f = root / rel
        if not isinstance(meta, dict) or ".." in Path(rel).parts or Path(rel).is_absolute() or (
                root_r not in f.resolve().parents):
            raise UserError(f"{label}/{MANIFEST}: bad entry '{rel}'")
        if not isinstance(meta.get("bytes"), int) or isinstance(meta.get("bytes"), bool) or not isinstance(
                meta.get("sha256"), str):
            raise UserError(f"{label}/{MANIFEST}: files.{rel}: expected {{\"bytes\": integer, \"sha256\": text}}")
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
    versions = fields.versions
    now = _versions()
    messages = [f"{k} {versions.get(k)} -> {v}" for k, v in now.items() if versions.get(k) not in (None, v)]

    # rerun: the quantized model on the check feeds against the recorded float outputs
    feeds = _unstack(_load_npz(root / "check" / "feeds.npz"))
    reference = _unstack(_load_npz(root / "check" / "reference.npz"))
    got = _run(ir.session(qmodel, threads=1), feeds)
    measured = _check_sqnrs(reference, got)
    recorded, tol, gate = fields.recorded, fields.tolerance, fields.gate
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
        full = validate(fm, qmodel, load_feeds(data, fm), min_sqnr_db=gate, names=names, checks=fields.checks)
        if full.failed_checks():
            raise UserError(f"{label}: full validation: {full.failure()}")
        if gate is not None and not full.passed:
            raise UserError(f"{label}: full validation: output SQNR {full.worst_slice_sqnr():.2f} dB (whole "
                            f"outputs and their worst slices) is below the bundle's --min-sqnr {gate} dB")
    return VerifyResult(files=len(files) + 1, check=check, full=full, messages=messages)


@dataclass
class _ManifestFields:
    """The manifest values ``verify`` computes with, type-checked."""

    versions: dict[str, Any]
    recorded: dict[str, float]
    tolerance: float
    gate: float | None
    checks: list[Check] = field(default_factory=list)


def _manifest_fields(manifest: dict[str, Any], where: str) -> _ManifestFields:
    """``versions``, ``check.sqnr_db``, ``check.tolerance_db`` and ``validation.min_sqnr_db`` of a manifest,
    each of the type ``package`` writes; a tampered one is a :class:`UserError` naming the key."""

    def mapping(value: Any, key: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserError(f"{where}: '{key}' must be a mapping, got {type(value).__name__}")
        return value

    def number(value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{where}: '{key}' must be a number, got {type(value).__name__}")
        if not isinstance(value, str):
            return value  # as written: an int gate stays an int in messages
        try:
            return _num(value)
        except ValueError:
            raise UserError(f"{where}: '{key}' must be a number, got '{str(value)[:40]}'") from None

    check = mapping(manifest.get("check"), "check")
    sqnrs = mapping(check.get("sqnr_db"), "check.sqnr_db")
    recorded = {str(k): number(v, f"check.sqnr_db.{k}") for k, v in sqnrs.items()}
    tolerance = number(check.get("tolerance_db", CHECK_TOLERANCE_DB), "check.tolerance_db")
    if not tolerance >= 0:
        raise UserError(f"{where}: 'check.tolerance_db' must be >= 0, got {tolerance}")
    gate_raw = mapping(manifest.get("validation"), "validation").get("min_sqnr_db")
    gate = None if gate_raw is None else number(gate_raw, "validation.min_sqnr_db")
    checks_raw = mapping(manifest.get("validation"), "validation").get("checks") or []
    if not isinstance(checks_raw, list):
        raise UserError(f"{where}: 'validation.checks' must be a list, got {type(checks_raw).__name__}")
    checks = []
    for i, entry in enumerate(checks_raw):
        key = f"validation.checks[{i}]"
        text = entry.get("check") if isinstance(entry, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{where}: '{key}.check' must be a string")
        try:
            checks.append(replace(parse_check(text), where=f"{where}: {key}"))
        except UserError as e:
            raise UserError(f"{where}: '{key}.check': {e}") from None
    return _ManifestFields(mapping(manifest.get("versions"), "versions"), recorded, tolerance, gate, checks)
