#!/usr/bin/env python
"""Peak RSS of every shipped preset against onnxruntime's Percentile calibration (issue 15, "Done means":
"Peak RSS of every preset <= 1.0x onnxruntime's Percentile run on the same model and samples").

    python benchmarks/preset_rss.py silero_vad                 # or ppocr_cls, ppocr_rec
    python benchmarks/preset_rss.py MODEL.onnx --calib-data CALIB --eval-data EVAL
    python benchmarks/preset_rss.py ppocr_cls --presets w8a8,w4a8 --json out.json

Each compile runs once, in its own fresh process (``compare_ort.py``'s worker: qcompiler's modules imported before
the clock, the peak is the process's own ``VmHWM``, so peaks of different runs never mix): every preset of
``qcompiler/plan/presets`` compiled with ``--plan NAME`` and no validation (as ``compare_ort.py --mode speed``
compiles ``w8a8``), plus the plain default plan and the measured default (``auto``) with validation (what a user's
``qcompiler compile --calib`` does), then onnxruntime's ``quantize_static`` with the Percentile calibrator (its
pre-processing included) on the same calibration feeds. A compile that grows beyond ``--mem-limit-gb`` is killed:
onnxruntime's Percentile is killed above 8 GB on PP-OCR rec / det and the ViT, so there any qcompiler peak under the
limit is below it. Prints one table (seconds, CPU seconds, peak RSS, ratio to Percentile's) and the target.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import compare_ort as CO

from qcompiler.plan import presets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help=f"{' | '.join(C.REAL_MODELS)} | path/to/model.onnx")
    ap.add_argument("--presets", help="comma-separated presets (default: every shipped preset)")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    ap.add_argument("--eval", type=int, default=4, help="evaluation feeds read (only for a model file; default 4)")
    ap.add_argument("--calib-data", help="model file: calibration feeds (folder of .npz or one stacked .npz)")
    ap.add_argument("--eval-data", help="model file: evaluation feeds")
    ap.add_argument("--mem-limit-gb", type=float, default=8.0, help="kill a compile above this RSS (default 8)")
    ap.add_argument("--json", help="write all numbers here")
    args = ap.parse_args(argv)
    names = [p.strip() for p in args.presets.split(",")] if args.presets else presets.names()
    unknown = [n for n in names if n not in presets.names()]
    if unknown:
        ap.error(f"--presets: unknown {unknown[0]} (shipped: {', '.join(presets.names())})")
    mem_limit_mb = args.mem_limit_gb * 1024.0
    mach = C.machine()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores; onnxruntime {mach['onnxruntime']}, qcompiler "
          f"{mach['qcompiler']}; {mach['date']}; load average {mach['loadavg']}")
    print("command: python benchmarks/preset_rss.py " + " ".join(sys.argv[1:] if argv is None else argv))
    with tempfile.TemporaryDirectory(prefix="preset_rss.") as tmp:
        work = Path(tmp)
        task = CO._task(args, args.model, args.samples)
        calib = C.write_feeds(task.calib, work / "calib")
        q = {"tool": "qcompiler", "model": str(task.model), "calib": str(calib), "target": "ort"}
        specs: dict[str, dict[str, Any]] = {
            f"--plan {n}": {**q, "plan": n, "out": str(work / f"q_{n}.onnx")} for n in names}
        specs["--plan default (validated)"] = {**q, "plan": "default", "validate": True,
                                               "out": str(work / "q_default.onnx")}
        specs["measured default (validated)"] = {**q, "plan": "auto", "validate": True,
                                                 "out": str(work / "q_auto.onnx")}
        specs["ort Percentile"] = {"tool": "ort", "model": str(task.model), "calib": str(calib), "workdir": str(work),
                                   "op_types": None, "quant_format": "QDQ", "symbolic_shapes": False,
                                   "method": "Percentile", "out": str(work / "ort_percentile.onnx")}
        res = CO._compile_all(specs, {k: 1 for k in specs}, mem_limit_mb)
    ort = res["ort Percentile"]
    ort_killed = "error" in ort
    ort_mb = ort.get("peak_rss_mb")
    rows, checks = [], []
    for name, r in res.items():
        if "error" in r:
            rows.append([name, "failed: " + r["error"][:90], "", "", ""])
            continue
        ratio = "" if ort_killed or name == "ort Percentile" else f"{r['peak_rss_mb'] / ort_mb:.2f}x"
        rows.append([name, f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.2f}", f"{r['peak_rss_mb']:.0f}", ratio])
        if name == "ort Percentile":
            continue
        if ort_killed:
            met = r["peak_rss_mb"] < mem_limit_mb
            detail = (f"{r['peak_rss_mb']:.0f} MB; onnxruntime Percentile killed above {args.mem_limit_gb:g} GB "
                      f"({ort['error'][:60]})")
        else:
            met = r["peak_rss_mb"] <= ort_mb
            detail = f"{r['peak_rss_mb']:.0f} vs {ort_mb:.0f} MB = {r['peak_rss_mb'] / ort_mb:.2f}x"
        checks.append({"what": f"{name}: peak RSS <= 1.0x ort Percentile", "met": met, "detail": detail})
    for name, r in res.items():
        if "error" in r and name != "ort Percentile":
            checks.append({"what": f"{name}: peak RSS <= 1.0x ort Percentile", "met": False,
                           "detail": "failed: " + r["error"][:90]})
    print(f"\n## {args.model}: peak RSS of every preset, {len(task.calib)} calibration samples, one run each\n")
    print(C.fmt_table(["compile", "seconds", "CPU s", "peak RSS MB", "x ort Percentile"], rows,
                      align_right=lambda i: i != 0))
    print("\ntargets (issue 15, 'Done means'):")
    for c in checks:
        print(f"- {'MET ' if c['met'] else 'MISS'}  {c['what']}: {c['detail']}")
    if args.json:
        C.write_json(args.json, {"machine": mach, "model": args.model, "runs": res, "targets": checks})
    return 0 if all(c["met"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
