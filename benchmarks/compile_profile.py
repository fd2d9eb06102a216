#!/usr/bin/env python
"""Where the seconds of ``qcompiler compile`` go, step by step, on the real models.

    python benchmarks/compile_profile.py ppocr_cls ppocr_rec silero_vad      # any key tests/realdata.py knows
    python benchmarks/compile_profile.py ppocr_rec --preset w8a8 --no-validate
    python benchmarks/compile_profile.py MODEL.onnx --calib CALIB_DIR          # any model

For each model: its calibration feeds (``--samples``, default 64, realdata's ``calib`` split) are written as a
folder of ``.npz`` files, and ``qcompiler compile --profile`` runs in a fresh process (the imports count, as
they do for a user), so the table is the one the command prints: every step (import, load, opset upgrade,
each pass and what inside it took the time, export, cost report, validation, ...) with its seconds and share.
``--json`` writes every profile (the ``profile`` section of each compile's JSON report).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import realdata  # noqa: E402  (tests/realdata.py: the pinned real models and their realistic inputs)
import realdata_heldout  # noqa: E402  (tests/realdata_heldout.py: the held-out models' inputs)


def calib_feeds(key: str, n: int) -> list[dict[str, Any]]:
    """``n`` calibration feeds of realdata model ``key`` (its ``KEY_inputs(n, "calib")``, in realdata or, for the
    held-out magika / nudenet, realdata_heldout)."""
    fn = getattr(realdata, f"{key}_inputs", None) or getattr(realdata_heldout, f"{key}_inputs", None)
    if fn is None:
        raise SystemExit(f"error: tests/realdata.py has no {key}_inputs() for model '{key}'")
    out = fn(n, "calib")
    return list(out[0] if isinstance(out, tuple) else out)


def write_feeds(feeds: list[dict[str, Any]], folder: Path) -> Path:
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:05d}.npz", **feed)
    return folder


def profile_one(model: Path, calib: Path, work: Path, extra: list[str]) -> dict[str, Any]:
    out = work / (model.stem + ".q.onnx")
    report = work / (model.stem + ".report.json")
    cmd = [sys.executable, "-m", "qcompiler.cli", "compile", str(model), "-o", str(out), "--calib", str(calib),
           "--report", str(report), "--profile", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    table = proc.stdout.split("\ncompiled ")[0]
    return {"model": str(model), "table": table, "profile": json.loads(report.read_text())["profile"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help=f"{' | '.join(realdata.MODELS)} | path/to/model.onnx")
    ap.add_argument("--calib", help="a model file's calibration data (folder of .npz or one .npz)")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples of a real model (default 64)")
    ap.add_argument("--preset", help="compile with this preset (default: the measured default)")
    ap.add_argument("--plan", help="compile with this plan (e.g. 'default': the plain default plan)")
    ap.add_argument("--no-validate", action="store_true", help="compile with --no-validate")
    ap.add_argument("--json", help="write every profile here")
    args = ap.parse_args(argv)
    extra = (["--preset", args.preset] if args.preset else []) + (["--plan", args.plan] if args.plan else []) \
        + (["--no-validate"] if args.no_validate else [])
    results = []
    with tempfile.TemporaryDirectory(prefix="qcompiler-profile-") as tmp:
        work = Path(tmp)
        for key in args.models:
            if key in realdata.MODELS:
                model = realdata.fetch_model(key)
                calib = write_feeds(calib_feeds(key, args.samples), work / f"{key}-calib")
            else:
                model = Path(key)
                if not model.is_file() or not args.calib:
                    raise SystemExit(f"error: {key}: not a key of tests/realdata.py ({', '.join(realdata.MODELS)}) "
                                     "nor a model file given with --calib")
                calib = Path(args.calib)
            res = profile_one(model, calib, work, extra)
            res["key"] = key
            print(f"\n## {key}{' --preset ' + args.preset if args.preset else ''}"
                  f"{' --plan ' + args.plan if args.plan else ''}"
                  f"{' --no-validate' if args.no_validate else ''}\n\n{res['table']}", flush=True)
            results.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
