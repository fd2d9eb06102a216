"""Fuzzing what qcompiler reads and writes as files (issue 16): deployment bundles given to ``verify`` (manifest
edits, file edits with and without a re-hashed manifest, added / removed / replaced files, zip corruption and
hostile zip entries) and output paths of ``compile`` / ``package`` (aliasing an input — the model, its external
data, the plan, through ``..``, symlinks, hard links, a side file or ``--report`` —, directories or files in the
way, dangling links). Each case is held to the contract of ``test_robustness_fuzz_contract``; ``verify`` must
never write anything, and a refused output path must leave every input byte-identical.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _robust_cases as C
import test_robustness_fuzz as P
import test_robustness_fuzz_contract as F
import test_robustness_fuzz_data as D

from qcompiler.cli import cli

# ------------------------------------------------------------------------------------------------ bundles
_TEMPLATES: dict[str, Path] = {}
TEMPLATES = {"plain": ("gemm_head", []), "external": ("conv_bn_relu", ["--external-data", "0"])}


def template(kind: str) -> Path:
    """A bundle (folder, with ``bundle.zip`` beside it) packaged once per process."""
    if kind not in _TEMPLATES:
        d = Path(tempfile.mkdtemp(prefix="qcompiler-fuzz-bundle-"))
        atexit.register(shutil.rmtree, d, True)
        fixture, extra = TEMPLATES[kind]
        shutil.copy(C.MODELS / f"{fixture}.onnx", d / "model.onnx")
        np.savez(d / "calib.npz", **{k: v[:3] for k, v in C.fixture_npz(fixture).items()})
        res = CliRunner().invoke(cli, ["package", str(d / "model.onnx"), "-o", str(d / "bundle"), "--calib",
                                       str(d / "calib.npz"), "--zip", "--check-samples", "2", *extra])
        assert res.exit_code == 0, res.stderr
        _TEMPLATES[kind] = d
    return _TEMPLATES[kind]


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


MANIFEST_PATHS = [["format"], ["format_version"], ["model"], ["files"], ["files", "model.onnx"],
                  ["files", "model.onnx", "sha256"], ["files", "model.onnx", "bytes"], ["files", "../evil"],
                  ["files", "/etc/passwd"], ["files", "check"], ["check"], ["check", "sqnr_db"],
                  ["check", "sqnr_db", "output"], ["check", "tolerance_db"], ["check", "samples"],
                  ["validation"], ["validation", "min_sqnr_db"], ["validation", "outputs"], ["inputs"],
                  ["outputs"], ["target"], ["versions"], ["pipeline"], ["custom_op_domains"], ["opset_imports"]]
VALUES: list[Any] = [None, 0, -1, 2, 1e9, -1e9, "x", "", [], {}, True, "NaN", {"bytes": 1, "sha256": "0" * 64}]
BUNDLE_EDIT = st.one_of(
    st.tuples(st.just("set"), st.integers(0, len(MANIFEST_PATHS) - 1), st.integers(0, len(VALUES) - 1)),
    st.tuples(st.just("del"), st.integers(0, len(MANIFEST_PATHS) - 1), st.just(0)),
    st.tuples(st.just("manifest-bytes"), st.just(0), F.MUTATIONS),
    st.tuples(st.just("file-bytes"), st.integers(0, 16), F.MUTATIONS),
    st.tuples(st.sampled_from(["file-delete", "file-to-dir", "file-symlink", "file-empty"]), st.integers(0, 16),
              st.just(0)),
    st.tuples(st.just("file-add"), st.sampled_from(["extra.txt", "check/x.npz", ".hidden", "model.onnx.data"]),
              st.just(0)),
)


def _set(doc: Any, path: list[str], value: Any, delete: bool) -> None:
    for key in path[:-1]:
        if not isinstance(doc, dict):
            return
        doc = doc.setdefault(key, {})
    if isinstance(doc, dict):
        if delete:
            doc.pop(path[-1], None)
        else:
            doc[path[-1]] = value


def _edit_bundle(b: Path, edit: list[Any], root: Path) -> None:
    kind, a, arg = edit
    files = _files(b)
    target = b / files[a % len(files)] if isinstance(a, int) and files else b / "manifest.json"
    if kind in ("set", "del"):
        doc = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
        _set(doc, MANIFEST_PATHS[a], VALUES[arg], kind == "del")
        (b / "manifest.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
    elif kind == "manifest-bytes":
        (b / "manifest.json").write_bytes(F.mutate((b / "manifest.json").read_bytes(), arg))
    elif kind == "file-bytes":
        target.write_bytes(F.mutate(target.read_bytes(), arg))
    elif kind == "file-delete":
        target.unlink()
    elif kind == "file-empty":
        target.write_bytes(b"")
    elif kind == "file-to-dir":
        target.unlink()
        target.mkdir()
    elif kind == "file-symlink":
        outside = root / f"outside-{target.name}"
        shutil.copy(target, outside)
        target.unlink()
        target.symlink_to(outside)
    else:
        (b / a).parent.mkdir(parents=True, exist_ok=True)
        (b / a).write_bytes(b"extra")


def _rehash(b: Path) -> None:
    """Make the manifest agree with the (edited) files it lists, so that verify gets past the hashes."""
    try:
        doc = json.loads((b / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), dict):
        return
    for rel in list(doc["files"]):
        p = b / rel
        if p.is_file() and not p.is_symlink() and b in p.resolve().parents:
            doc["files"][rel] = {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    (b / "manifest.json").write_text(json.dumps(doc, indent=2, sort_keys=True), encoding="utf-8")


def _zip(folder: Path, dest: Path, hostile: str) -> None:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder.parent).as_posix()
            if p.is_symlink():
                info = zipfile.ZipInfo(rel)
                info.external_attr = (0o120777 << 16)
                zf.writestr(info, os.readlink(p))
            elif p.is_dir():
                zf.writestr(rel + "/", b"")
            else:
                zf.write(p, rel)
        if hostile == "symlink-entry":
            info = zipfile.ZipInfo(f"{folder.name}/link")
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
        elif hostile:
            zf.writestr(hostile, b"x")


@F.builder("bundle")
def build_bundle(p: dict[str, Any], root: Path) -> F.Call:
    src = template(p["template"])
    b = root / "bundle"
    shutil.copytree(src / "bundle", b, symlinks=True)
    for edit in p["edits"]:
        try:
            _edit_bundle(b, edit, root)
        except (OSError, ValueError):  # an edit that no longer applies (e.g. after a manifest-bytes edit)
            pass
    if p["rehash"]:
        _rehash(b)
    argv = ["verify"]
    if p["form"] == "zip":
        z = root / "bundle.zip"
        _zip(b, z, p["hostile"])
        shutil.rmtree(b)
        if p["zip_ops"]:
            z.write_bytes(F.mutate(z.read_bytes(), p["zip_ops"]))
        argv.append(str(z))
    else:
        argv.append(str(b))
    if p["full"]:
        shutil.copy(src / "model.onnx", root / "float.onnx")
        shutil.copy(src / "calib.npz", root / "calib.npz")
        argv += ["--model", str(root / "float.onnx"), "--data", str(root / "calib.npz")]
    return F.Call(argv, None, "none")


@F.examples(60)
@given(template=st.sampled_from(sorted(TEMPLATES)), edits=st.lists(BUNDLE_EDIT, max_size=3),
       rehash=st.booleans(), form=st.sampled_from(["folder", "zip"]),
       hostile=st.sampled_from(["", "", "", "../evil", "/abs", "bundle/../../x", "other/top", "symlink-entry"]),
       zip_ops=st.one_of(st.just([]), st.just([]), F.MUTATIONS), full=st.sampled_from([False, False, True]))
def test_fuzz_bundles(template: str, edits: list[Any], rehash: bool, form: str, hostile: str, zip_ops: list[Any],
                      full: bool) -> None:
    zipped = form == "zip"
    F.check_case("bundle", {"template": template, "edits": edits, "rehash": rehash, "form": form,
                            "hostile": hostile if zipped else "", "zip_ops": zip_ops if zipped else [],
                            "full": full})


# ------------------------------------------------------------------------------------------ output paths
COMPILE_SHAPES = ["ok", "alias-model", "alias-model-dotdot", "alias-model-dot", "alias-model-double-slash",
                  "alias-plan", "alias-data", "alias-side-plan", "alias-side-names", "alias-report-model",
                  "alias-report-calib", "alias-report-output", "alias-report-plan", "symlink-to-model",
                  "symlink-dangling", "symlinked-outdir-to-in", "symlink-model-input", "hardlink-model",
                  "dotdot-ok", "dir-in-the-way", "nonempty-dir-in-the-way", "data-dir-in-the-way",
                  "side-dir-in-the-way", "parent-is-file", "existing-output", "trailing-slash", "no-suffix",
                  "deep-new-folders", "output-is-root", "report-dir-in-the-way", "report-parent-is-file"]
PACKAGE_SHAPES = ["ok", "exists-empty-dir", "is-model-dir", "inside-model-dir", "zip-dir-in-the-way", "zip-exists",
                  "parent-is-file", "symlink-to-in", "symlink-dangling", "dotdot", "alias-model-file",
                  "trailing-slash", "alias-calib-file", "deep-new-folders"]


@F.builder("output-path")
def build_output_path(p: dict[str, Any], root: Path) -> F.Call:
    inp, outd = root / "in", root / "out"
    inp.mkdir()
    shape, cmd = p["shape"], p["cmd"]
    ext = p["ext"] or shape == "alias-data"
    plan_name = {"alias-plan": "plan.onnx", "alias-side-plan": "q.plan.yaml"}.get(shape, "plan.yaml")
    fixture = "conv_bn_relu"
    model = inp / "model.onnx"
    if ext:
        mb, db = D.ext_base(fixture, 0)
        data_name = "q.onnx.data" if shape == "alias-data" else "model.onnx.data"
        if data_name != "model.onnx.data":
            m = onnx.load_model_from_string(mb)
            for t in m.graph.initializer:
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
            mb = m.SerializeToString()
        model.write_bytes(mb)
        (inp / data_name).write_bytes(db)
    else:
        model.write_bytes(C.fixture_bytes(fixture))
    calib = inp / "calib.npz"
    np.savez(calib, **{k: v[:3] for k, v in C.fixture_npz(fixture).items()})
    with_plan = p["plan"] or shape in ("alias-plan", "alias-side-plan", "alias-report-plan")
    plan = inp / plan_name
    if with_plan:
        plan.write_text("version: 1\ndefaults: {weight: {dtype: int8}}\n", encoding="utf-8")
    replace: set[str] = set()
    out = outd / ("q.onnx" if cmd == "compile" else "bundle")
    out_arg: str | None = None
    report: Path | None = root / "report.json" if p["report"] else None
    if shape in ("alias-model", "alias-plan", "alias-data", "alias-side-plan", "alias-side-names"):
        out = {"alias-model": model, "alias-plan": plan}.get(shape, inp / "q.onnx")
        if shape == "alias-side-names":  # a stale side file, read by nothing: a successful compile replaces it
            (inp / "q.names.json").write_text("{}")
            replace.add("in/q.names.json")
    elif shape == "alias-model-dotdot":
        out_arg = f"{inp}/../in/model.onnx"
    elif shape == "alias-model-dot":
        out_arg = f"{inp}/./model.onnx"
    elif shape == "alias-model-double-slash":
        out_arg = f"{inp}//model.onnx"
    elif shape.startswith("alias-report-"):
        report = {"alias-report-model": model, "alias-report-calib": calib, "alias-report-output": out,
                  "alias-report-plan": plan}[shape]
    elif shape == "symlink-to-model":
        outd.mkdir()
        out.symlink_to(model)
        replace.add("out/q.onnx")
    elif shape == "symlink-dangling":
        outd.mkdir()
        out.symlink_to(outd / "nowhere")
        replace.add(f"out/{out.name}")
    elif shape == "symlinked-outdir-to-in":
        outd.symlink_to(inp)
        out = outd / "model.onnx"
    elif shape in ("symlink-model-input", "symlink-to-in"):
        if cmd == "compile":
            (root / "link.onnx").symlink_to(model)
            model, out = root / "link.onnx", root / "link.onnx"
        else:
            outd.mkdir()
            out.symlink_to(inp)
    elif shape == "hardlink-model":
        outd.mkdir()
        os.link(model, out)
        replace.add("out/q.onnx")
    elif shape in ("dotdot-ok", "dotdot"):
        out_arg = f"{inp}/../out/{out.name}"
    elif shape in ("dir-in-the-way", "exists-empty-dir"):
        out.mkdir(parents=True)
    elif shape == "nonempty-dir-in-the-way":
        (out / "keep").mkdir(parents=True)
        (out / "keep" / "file.txt").write_text("keep me")
    elif shape == "data-dir-in-the-way":
        (outd / "q.onnx.data").mkdir(parents=True)
    elif shape == "side-dir-in-the-way":
        (outd / "q.plan.yaml").mkdir(parents=True)
    elif shape in ("parent-is-file", "report-parent-is-file"):
        outd.write_text("a file")
        if shape == "report-parent-is-file":
            out, report = root / "o2" / out.name, outd / "report.json"
    elif shape == "report-dir-in-the-way":
        report = root / "report.json"
        report.mkdir()
    elif shape == "existing-output":
        outd.mkdir()
        out.write_bytes(b"an old output")
        replace.add("out/q.onnx")
    elif shape == "trailing-slash":
        out_arg = f"{out}/"
    elif shape == "no-suffix":
        out = outd / "q"
    elif shape == "deep-new-folders":
        out = outd / "a" / "b" / "c" / out.name
    elif shape == "output-is-root":
        out = root
    elif shape == "is-model-dir":
        out = inp
    elif shape == "inside-model-dir":
        out = inp / "bundle"
    elif shape == "zip-dir-in-the-way":
        (outd / "bundle.zip").mkdir(parents=True)
    elif shape == "zip-exists":
        outd.mkdir()
        (outd / "bundle.zip").write_bytes(b"old zip")
    elif shape == "alias-model-file":
        out = model
    elif shape == "alias-calib-file":
        out = calib
    argv = [cmd, str(model), "-o", out_arg or str(out), "--calib", str(calib), "--calib-samples", "2"]
    if with_plan:
        argv += ["--plan", str(plan)]
    if cmd == "package":
        argv += ["--check-samples", "1"] + (["--zip"] if p["zip"] or "zip" in shape else [])
    elif report is not None:
        argv += ["--report", str(report)]
    if cmd == "compile" and p["names"]:
        argv.append("--compact-names")
    return F.Call(argv, out if cmd == "compile" and out.suffix == ".onnx" else
                  (out if cmd == "package" else None), "model" if cmd == "compile" else "bundle", replace)


SHAPES = [("compile", s) for s in COMPILE_SHAPES] + [("package", s) for s in PACKAGE_SHAPES]


@F.examples(50)
@given(shape=st.sampled_from(SHAPES), ext=st.booleans(), plan=st.booleans(), report=st.booleans(),
       zipped=st.booleans(), names=st.booleans())
def test_fuzz_output_paths(shape: tuple[str, str], ext: bool, plan: bool, report: bool, zipped: bool,
                           names: bool) -> None:
    cmd, s = shape
    F.check_case("output-path", {"cmd": cmd, "shape": s, "ext": ext, "plan": plan,
                                 "report": report and cmd == "compile", "zip": zipped and cmd == "package",
                                 "names": (names or s == "alias-side-names") and cmd == "compile"})


def test_every_fuzz_category_is_registered_and_replayable() -> None:
    assert P.SEEDS and D.CALIB_FIXTURES
    assert set(F.BUILDERS) == {"model-bytes", "plan", "plan-text", "pipeline", "calib", "model-external", "bundle",
                               "output-path"}
    ok = F.run_case("output-path", {"cmd": "compile", "shape": "ok", "ext": True, "plan": True, "report": True,
                                    "zip": False, "names": False})
    assert (ok.exit_code, ok.violations) == (0, [])
    refused = F.run_case("output-path", {"cmd": "compile", "shape": "alias-model", "ext": False, "plan": False,
                                         "report": False, "zip": False, "names": False})
    assert (refused.exit_code, refused.violations) == (2, [])
    assert "would overwrite the input" in refused.error
    assert refused.reproducer().startswith("python benchmarks/fuzz_long.py --replay '{\"category\": \"output-path\"")
