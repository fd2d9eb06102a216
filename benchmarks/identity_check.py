"""Byte-identity check: compiled outputs of a base git commit against the working tree.

A re-layout (or any refactoring meant to preserve behaviour) must leave every compiled file unchanged. This
script compiles the same inputs with two copies of the package and compares the outputs byte for byte::

    python benchmarks/identity_check.py --base c7f7966                 # fixtures + real models, every preset
    python benchmarks/identity_check.py --base c7f7966 --models fixtures --presets default,w8a8 -j 4

Each copy is importable without installing: the commit is read with ``git archive`` (the working tree is
copied as it is on disk, uncommitted edits included) into a temporary folder, and ``pkg/qcompiler`` is assembled
from ``pyproject.toml``'s ``[tool.setuptools] package-dir`` (``qcompiler/``, ``passes/`` as
``qcompiler/passes``, ``runtime_targets/`` as ``qcompiler/runtime_targets``). Every compile runs in its own
process, ``PYTHONPATH=pkg python -m qcompiler.cli compile MODEL -o out.onnx --calib DATA [--preset P]
[--no-validate]`` with ``PYTHONHASHSEED=0``, in an empty folder; a probe first checks that ``qcompiler``,
``qcompiler.passes`` and ``qcompiler.runtime_targets`` are imported from that copy (not from an installed one).

Cases: every fixture ``models/*.onnx`` of the working tree with its ``.npz`` as ``--calib``, and the public real
models of ``tests/realdata.py`` (ppocr_cls, ppocr_rec, silero_vad; fetched into ``$QCOMPILER_REAL_MODELS_CACHE``)
with 16 calibration samples written as a folder of ``.npz`` feeds; each with the default plan and each shipped
preset (``qcompiler/plan/presets/*.yaml``, or ``qcompiler/presets/`` in the old layout; the union of both trees).

Every file a compile writes (``.onnx``, ``.onnx.data``, ``.plan.yaml``, ...) is compared byte for byte; in text
side files only, the package copy's own path (the preset file a ``.plan.yaml`` names, which moved in the
re-layout and depends on where the package lies) is replaced by a placeholder first. A case is
``identical``, ``differs`` (files listed), ``both failed`` with the same error line, or ``one failed``. When two
outputs differ, the working tree's compile is run once more: if it does not reproduce itself the row says so.
The base commit's outputs are cached under ``.cache/identity/<hash>/`` (keyed by the inputs and the command
line), so the base runs once; the working tree's are kept under ``.cache/identity/worktree/`` for inspection.
Exit status 1 when any case is not identical or both-failed-alike, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = "c7f7966"
REAL_MODELS = ("ppocr_cls", "ppocr_rec", "silero_vad")
REAL_SAMPLES = 16
# package-dir of pyproject.toml when it cannot be read (tomllib needs Python 3.11)
DEFAULT_PACKAGE_DIR = {"qcompiler": "qcompiler", "qcompiler.passes": "passes",
                       "qcompiler.runtime_targets": "runtime_targets"}
PRESET_DIRS = ("qcompiler/plan/presets", "qcompiler/presets")
TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".txt")
CACHE_FORMAT = 2  # bump when the cached result layout changes


# ==================================================================================================
# package copies
# ==================================================================================================


@dataclass
class Tree:
    """One importable copy of the package: ``pkg`` goes on PYTHONPATH."""

    label: str  # "base" | "tree"
    name: str  # the commit hash, or "worktree"
    pkg: Path
    presets: list[str] = field(default_factory=list)
    compile_flags: set[str] = field(default_factory=set)


def _git(*args: str, binary: bool = False) -> Any:
    proc = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=not binary)
    if proc.returncode != 0:
        err = proc.stderr if not binary else proc.stderr.decode(errors="replace")
        raise SystemExit(f"error: git {' '.join(args)} failed: {err.strip()}")
    return proc.stdout


def resolve_commit(rev: str) -> str:
    """The full hash of ``rev`` ("" when it names no commit)."""
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _package_dir(src: Path) -> dict[str, str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return dict(DEFAULT_PACKAGE_DIR)
    try:
        data = tomllib.loads((src / "pyproject.toml").read_text())
        mapping = data["tool"]["setuptools"]["package-dir"]
    except (OSError, KeyError, ValueError):
        return dict(DEFAULT_PACKAGE_DIR)
    return {str(k): str(v) for k, v in mapping.items() if str(k).split(".")[0] == "qcompiler"}


def _ignore(_dir: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("__pycache__", ".mypy_cache") or n.endswith((".pyc", ".pyo"))]


def assemble(src: Path, pkg: Path) -> None:
    """``pkg/qcompiler`` from a source tree ``src``, laid out as setuptools installs it."""
    mapping = _package_dir(src)
    if pkg.exists():
        shutil.rmtree(pkg)
    pkg.mkdir(parents=True)
    # parents before children: qcompiler first, then qcompiler.passes into it
    for name, rel in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        dest = pkg.joinpath(*name.split("."))
        source = src / rel
        if not source.is_dir():
            continue
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(source, dest, ignore=_ignore)


def export_commit(commit: str, dest: Path) -> None:
    """The commit's pyproject.toml and package folders into ``dest`` (``git archive``, no worktree state)."""
    listed = str(_git("ls-tree", "--name-only", commit)).split()
    wanted = [p for p in ("pyproject.toml", "qcompiler", "passes", "runtime_targets") if p in listed]
    data = _git("archive", "--format=tar", commit, "--", *wanted, binary=True)
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        try:
            tf.extractall(dest, filter="data")
        except TypeError:  # Python without extraction filters
            tf.extractall(dest)


def export_worktree(dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")
    for d in ("qcompiler", "passes", "runtime_targets"):
        if (REPO / d).is_dir():
            shutil.copytree(REPO / d, dest / d, ignore=_ignore)


def _env(pkg: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pkg)
    env["PYTHONHASHSEED"] = "0"
    env.pop("PYTHONSTARTUP", None)
    return env


PROBE = (
    "import importlib, json, sys\n"
    "mods = ['qcompiler', 'qcompiler.passes', 'qcompiler.runtime_targets']\n"
    "print(json.dumps({m: importlib.import_module(m).__file__ for m in mods}))\n"
)


def probe(tree: Tree, workdir: Path) -> None:
    """Check that the copy is the one imported, list its presets and the compile options it has."""
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=workdir,
                          env=_env(tree.pkg))
    if proc.returncode != 0:
        raise SystemExit(f"error: the {tree.label} copy ({tree.name}) does not import:\n{proc.stderr}")
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    for mod, f in files.items():
        if f is None or not Path(f).resolve().is_relative_to(tree.pkg.resolve()):
            raise SystemExit(f"error: {mod} of the {tree.label} copy was imported from {f}, not from {tree.pkg}; "
                             "an installed qcompiler shadows PYTHONPATH")
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", "compile", "--help"], capture_output=True,
                          text=True, cwd=workdir, env=_env(tree.pkg))
    if proc.returncode != 0:
        raise SystemExit(f"error: `python -m qcompiler.cli compile --help` fails in the {tree.label} copy:\n"
                         f"{proc.stderr}")
    tree.compile_flags = {w.strip(",") for w in proc.stdout.split() if w.startswith("--")}
    for rel in PRESET_DIRS:
        d = tree.pkg / rel
        if d.is_dir():
            tree.presets = sorted(p.stem for p in d.glob("*.yaml"))
            break


# ==================================================================================================
# cases
# ==================================================================================================


@dataclass(frozen=True)
class Case:
    name: str
    model: Path
    calib: Path | None


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(f.name.encode())
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def fixture_cases() -> list[Case]:
    out = []
    for model in sorted((REPO / "models").glob("*.onnx")):
        npz = model.with_suffix(".npz")
        out.append(Case(model.stem, model, npz if npz.is_file() else None))
    return out


def real_cases(cache: Path) -> list[Case]:
    if str(REPO / "tests") not in sys.path:
        sys.path.insert(0, str(REPO / "tests"))
    import numpy as np
    import realdata  # tests/realdata.py: the pinned public models and their calibration inputs

    makers = {"ppocr_cls": lambda n: realdata.ppocr_cls_inputs(n, "calib")[0],
              "ppocr_rec": lambda n: realdata.ppocr_rec_inputs(n, "calib"),
              "silero_vad": lambda n: realdata.silero_vad_inputs(n, "calib")}
    out = []
    for key in REAL_MODELS:
        model = realdata.fetch_model(key)
        folder = cache / "calib" / f"{key}-{REAL_SAMPLES}"
        done = folder / ".complete"
        if not done.is_file():
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            for i, feed in enumerate(makers[key](REAL_SAMPLES)):
                np.savez(folder / f"{i:04d}.npz", **feed)
            done.write_text("ok\n")
        out.append(Case(key, model, folder))
    return out


# ==================================================================================================
# compiles
# ==================================================================================================


@dataclass
class Result:
    rc: int
    error: str  # the error line when rc != 0
    files: dict[str, str]  # relative name -> sha256
    seconds: float
    folder: Path
    norm: dict[str, str] = field(default_factory=dict)  # relative name -> sha256 after normalise()


def _error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("error:", "internal error:")):
            return ln
    return lines[-1] if lines else ""


def normalise(name: str, data: bytes, pkg: Path) -> bytes:
    """Text side files name where the package copy lies (``plan: <pkg>/qcompiler/presets/w8a8.yaml`` in
    ``.plan.yaml``): that path is the install location, and the presets folder moved in the re-layout. It is
    replaced by ``<presets>/`` (or ``<pkg>``). Models (``.onnx``, ``.onnx.data``) are never normalised."""
    if not name.endswith(TEXT_SUFFIXES):
        return data
    for root in dict.fromkeys([str(pkg).encode(), str(pkg.resolve()).encode()]):
        for rel in PRESET_DIRS:
            data = data.replace(root + b"/" + rel.encode() + b"/", b"<presets>/")
        data = data.replace(root, b"<pkg>")
    return data


def _argv(case: Case, preset: str, tree: Tree) -> list[str]:
    argv = ["compile", str(case.model), "-o", "out.onnx"]
    if case.calib is not None:
        argv += ["--calib", str(case.calib)]
    if preset != "default":
        argv += ["--preset", preset]
    if "--no-validate" in tree.compile_flags:
        argv.append("--no-validate")
    return argv


def run_compile(tree: Tree, case: Case, preset: str, folder: Path, key: str, timeout: float,
                use_cache: bool) -> Result:
    meta_path = folder / "result.json"
    if use_cache and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key and meta.get("format") == CACHE_FORMAT:
                return Result(meta["rc"], meta["error"], meta["files"], meta["seconds"], folder, meta["norm"])
        except (OSError, ValueError, KeyError):
            pass
    if folder.exists():
        shutil.rmtree(folder)
    out = folder / "out"
    out.mkdir(parents=True)
    argv = [sys.executable, "-m", "qcompiler.cli", *_argv(case, preset, tree)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=out, env=_env(tree.pkg), timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        error = _error_line(stderr) if rc != 0 else ""
    except subprocess.TimeoutExpired as e:
        rc, error = -1, f"timeout after {timeout:.0f} s"
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    seconds = time.perf_counter() - t0
    (folder / "stdout.txt").write_text(stdout)
    (folder / "stderr.txt").write_text(stderr)
    files, norm = {}, {}
    for f in sorted(out.rglob("*")):
        if f.is_file():
            name, data = str(f.relative_to(out)), f.read_bytes()
            files[name] = hashlib.sha256(data).hexdigest()
            norm[name] = hashlib.sha256(normalise(name, data, tree.pkg)).hexdigest()
    meta = {"format": CACHE_FORMAT, "key": key, "argv": argv[1:], "rc": rc, "error": error, "files": files,
            "norm": norm, "seconds": round(seconds, 2)}
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, meta_path)  # written last: a killed run leaves no result.json, so it is redone
    return Result(rc, error, files, seconds, folder, norm)


def compare(base: Result, tree: Result) -> tuple[str, bool]:
    """(verdict, ok)."""
    if base.rc == 0 and tree.rc == 0:
        names = sorted(set(base.files) | set(tree.files))
        bad = [n for n in names if base.norm.get(n) != tree.norm.get(n)]
        if not bad:
            moved = [n for n in names if base.files.get(n) != tree.files.get(n)]
            return "identical" + (f" (package path normalised in {', '.join(moved)})" if moved else ""), True
        return "differs: " + ", ".join(
            n + (" (only base)" if n not in tree.files else " (only tree)" if n not in base.files else "")
            for n in bad), False
    if base.rc != 0 and tree.rc != 0:
        if base.error == tree.error:
            return f"both failed (same error: {base.error[:80]})", True
        return f"both failed, different errors: base `{base.error[:60]}` / tree `{tree.error[:60]}`", False
    who, res = ("base", base) if base.rc != 0 else ("tree", tree)
    return f"one failed ({who}: {res.error[:100]})", False


# ==================================================================================================
# main
# ==================================================================================================


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=DEFAULT_BASE, help="Base git commit (default %(default)s).")
    ap.add_argument("--models", default="fixtures,real",
                    help="Comma list of fixtures, real, or case names (a fixture stem or a real model key).")
    ap.add_argument("--presets", default=None,
                    help="Comma list of presets; 'default' is the default plan (default: default + every preset).")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="Compiles run in parallel (default %(default)s).")
    ap.add_argument("--timeout", type=float, default=1800, help="Seconds per compile (default %(default)s).")
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "identity",
                    help="Cache folder (default .cache/identity).")
    ap.add_argument("--no-cache", action="store_true", help="Recompile the base even when cached.")
    ap.add_argument("--json", type=Path, help="Write every row as JSON here.")
    args = ap.parse_args(argv)

    base_hash = resolve_commit(args.base)
    if not base_hash:
        ap.error(f"unknown commit {args.base!r}")
    cache: Path = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)

    wanted = [w.strip() for w in args.models.split(",") if w.strip()]
    fixtures = fixture_cases()
    cases: list[Case] = []
    if "fixtures" in wanted:
        cases += fixtures
    real_wanted = [k for k in REAL_MODELS if "real" in wanted or k in wanted]
    if real_wanted:
        cases += [c for c in real_cases(cache) if c.name in real_wanted]
    cases += [c for c in fixtures if c.name in wanted and c not in cases]
    unknown = [w for w in wanted if w not in ("fixtures", "real", *REAL_MODELS, *(c.name for c in fixtures))]
    if unknown:
        ap.error(f"unknown --models entries {unknown}")
    if not cases:
        ap.error("no cases selected")

    with tempfile.TemporaryDirectory(prefix="identity-") as tmp_s:
        tmp = Path(tmp_s)
        export_commit(base_hash, tmp / "base-src")
        assemble(tmp / "base-src", tmp / "base-pkg")
        export_worktree(tmp / "tree-src")
        assemble(tmp / "tree-src", tmp / "tree-pkg")
        base = Tree("base", base_hash, tmp / "base-pkg")
        tree = Tree("tree", "worktree", tmp / "tree-pkg")
        for t in (base, tree):
            probe(t, tmp / f"probe-{t.label}")

        if args.presets:
            presets = [p.strip() for p in args.presets.split(",") if p.strip()]
        else:
            presets = ["default", *sorted(set(base.presets) | set(tree.presets))]
        print(f"base {base_hash[:12]} vs working tree {REPO}: {len(cases)} models x {len(presets)} plans, "
              f"-j {args.jobs}", flush=True)

        jobs: dict[tuple[str, str, str], concurrent.futures.Future[Result]] = {}
        digests = {c.name: _digest([c.model, *([c.calib] if c.calib else [])]) for c in cases}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for case in cases:
                for preset in presets:
                    for t in (base, tree):
                        key = json.dumps([t.name, digests[case.name], _argv(case, preset, t)])
                        folder = cache / t.name / case.name / preset
                        jobs[(case.name, preset, t.label)] = pool.submit(
                            run_compile, t, case, preset, folder, key, args.timeout,
                            t is base and not args.no_cache)
            rows = []
            failed = 0
            for case in cases:
                for preset in presets:
                    b = jobs[(case.name, preset, "base")].result()
                    r = jobs[(case.name, preset, "tree")].result()
                    verdict, ok = compare(b, r)
                    if not ok and b.rc == 0 and r.rc == 0:
                        key = json.dumps(["recheck", digests[case.name], _argv(case, preset, tree)])
                        again = run_compile(tree, case, preset, cache / "worktree-recheck" / case.name / preset,
                                            key, args.timeout, False)
                        if again.norm != r.norm:
                            verdict += " [the working tree does not reproduce itself]"
                    failed += not ok
                    rows.append({"case": case.name, "preset": preset, "result": verdict, "ok": ok,
                                 "base_s": round(b.seconds, 1), "tree_s": round(r.seconds, 1)})
                    print(f"  {case.name:20s} {preset:18s} {verdict}", flush=True)

    print()
    widths = [max(len(str(row[k])) for row in [*rows, {"case": "case", "preset": "preset", "result": "result"}])
              for k in ("case", "preset", "result")]
    header = ["case", "preset", "result"]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " | base s | tree s |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|--------|--------|")
    for row in rows:
        print("| " + " | ".join(str(row[k]).ljust(w) for k, w in zip(header, widths, strict=True))
              + f" | {row['base_s']:6.1f} | {row['tree_s']:6.1f} |")
    same = sum(1 for row in rows if row["result"].startswith("identical"))
    print(f"\n{len(rows)} cases: {same} identical, {len(rows) - same - failed} both failed alike, "
          f"{failed} different (base {base_hash[:12]} cached under {cache / base_hash})")
    if args.json:
        args.json.write_text(json.dumps({"base": base_hash, "rows": rows}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
