"""Issue 14: the measured default (``--plan auto``) and every w8a8 preset (guarded) vs the plain default plan, and
the measured default vs onnxruntime's best int8 (QDQ, per-channel, MinMax / Entropy / Percentile), on a real model.

    python benchmarks/measured_default.py ppocr_cls --samples 32 --eval 32 -o out/md_ppocr_cls.json

Calibration feeds from the ``calib`` split, evaluation feeds from the disjoint ``eval`` split; every number is the
worst graph output's SQNR (dB) against the float model on the evaluation feeds, and onnxruntime latency vs float
(one thread, median)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _common as C
import realdata

from qcompiler.api import CompileOptions, compile_model

PRESETS = ("w8a8", "w8a8-percentile", "w8a8-cle", "w8a8-auto", "w8a8-dynamic")


def worst_sqnr(ref: list[dict[str, np.ndarray]], q: list[dict[str, np.ndarray]]) -> float:
    return min(C.sqnr_db([r[k] for r in ref], [x[k] for x in q]) for k in ref[0])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--effort", default="normal")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip (auto, ort, w8a8, ...)")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    model = realdata.fetch_model(args.model)
    calib, ev = C.zoo_feeds(args.model, args.samples, "calib"), C.zoo_feeds(args.model, args.eval, "eval")
    ref = C.run_all(model, ev)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        folder = C.write_feeds(calib, work / "calib")
        runs: dict[str, CompileOptions] = {"default": CompileOptions(plan="default", calib=str(folder),
                                                                   validate=False)}
        if "auto" not in skip:
            runs["auto"] = CompileOptions(plan="auto", calib=str(folder), validate=False, effort=args.effort)
        for p in PRESETS:
            if p not in skip:
                runs[p] = CompileOptions(preset=p, calib=str(folder), validate=False)
        paths: dict[str, Any] = {"float": model}
        for name, opts in runs.items():
            out = work / f"{name}.onnx"
            t0 = time.perf_counter()
            res = compile_model(model, out, opts)
            secs = time.perf_counter() - t0
            rows[name] = {"sqnr_db": worst_sqnr(ref, C.run_all(out, ev)), "seconds": round(secs, 1),
                          "bytes": res.report["cost"]["total_bytes"]}
            if "recipe" in res.report:
                rows[name]["recipe"] = res.report["recipe"]
            paths[name] = out
            print(name, rows[name]["sqnr_db"], rows[name].get("recipe", {}).get("winner", ""),
                  rows[name].get("recipe", {}).get("dropped", ""), flush=True)
        if "ort" not in skip:
            best = None
            for method in C.ORT_METHODS:
                out = work / f"ort-{method}.onnx"
                try:
                    C.ort_quantize(model, out, folder, method=method, workdir=work)
                except Exception as e:
                    rows[f"ort-{method}"] = {"error": f"{type(e).__name__}: {e}"[:200]}
                    continue
                s = worst_sqnr(ref, C.run_all(out, ev))
                rows[f"ort-{method}"] = {"sqnr_db": s}
                if best is None or s > rows[best]["sqnr_db"]:
                    best = f"ort-{method}"
                print(method, s, flush=True)
            if best is not None:
                paths["ort-best"] = work / f"{best}.onnx"
                rows["ort-best"] = {**rows[best], "method": best}
        lat = C.latency_ms({k: str(v) for k, v in paths.items()}, ev[0], threads=1, warmup=5, rounds=5,
                           per_round=10)
        for k, v in lat.items():
            if k != "float":
                rows[k]["latency_ratio"] = round(v["median"] / lat["float"]["median"], 3)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"model": args.model, "samples": args.samples, "eval": args.eval,
                                             "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
