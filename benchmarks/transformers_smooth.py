"""Issue 14, transformers: SmoothQuant's alpha chosen by measurement and per-token dynamic activations, on a real
model.

    python benchmarks/transformers_smooth.py vit_focus --samples 32 --eval 16 -o out/tsq_vit_focus.json

Rows: the default plan, the default plan with ``smooth: true`` (alpha 0.5; also ``affine: true``, smoothing
through a LayerNorm exported as primitive ops, as ``auto`` does) and with ``smooth: {alpha: auto}``,
``w8a8-dynamic``, ``w8a8-dynamic`` with per-token activations, and that with ``smooth: {alpha: auto}``
(:data:`PLANS`). Calibration feeds from the
``calib`` split, evaluation feeds from the disjoint ``eval`` split; each row: the worst graph output's SQNR (dB)
against the float model on the evaluation feeds, the compile seconds, the ``smooth`` pass's chosen alphas, and
onnxruntime latency vs float (one thread, median of interleaved rounds)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from measured_default import inputs, worst_sqnr

from qcompiler.api import CompileOptions, compile_model
from qcompiler.plan import Plan

DYNAMIC = {"defaults": {"weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": True},
                        "activation": {"dtype": "float"}}}
#: the rows: a plan as a dict (the default plan is ``{}``)
PLANS: dict[str, dict[str, Any]] = {
    "default": {},
    "smooth-0.5": {"algorithms": {"smooth": True}},
    "smooth-0.5-affine": {"algorithms": {"smooth": {"alpha": 0.5, "affine": True}}},
    "smooth-auto": {"algorithms": {"smooth": {"alpha": "auto"}}},
    "w8a8-dynamic": {**DYNAMIC, "rules": [{"match": {"op_type": ["MatMul", "Gemm"]},
                                           "activation": {"dtype": "uint8", "granularity": "per_tensor",
                                                          "symmetric": False, "calibration": "dynamic"}}]},
    "w8a8-dynamic-per-token": {**DYNAMIC, "rules": [{"match": {"op_type": ["MatMul", "Gemm"]},
                                                     "activation": {"dtype": "uint8", "granularity": "per_token",
                                                                    "symmetric": False,
                                                                    "calibration": "dynamic"}}]},
}
PLANS["w8a8-dynamic-per-token+smooth-auto"] = {**PLANS["w8a8-dynamic-per-token"],
                                               "algorithms": {"smooth": {"alpha": "auto"}}}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--rows", default=",".join(PLANS), help="comma-separated rows (default: all)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    model = C.realdata.fetch_model(args.model)
    calib, ev = inputs(args.model, args.samples, "calib"), inputs(args.model, args.eval, "eval")
    ref = C.run_all(model, ev)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        folder = C.write_feeds(calib, work / "calib")
        paths: dict[str, Any] = {"float": model}
        for name in filter(None, args.rows.split(",")):
            out = work / f"{name}.onnx"
            t0 = time.perf_counter()
            res = compile_model(model, out, CompileOptions(plan=Plan.from_dict(PLANS[name], source=name),
                                                           calib=str(folder), validate=False))
            secs = time.perf_counter() - t0
            smooth = next((r for r in res.records if r.name == "smooth"), None)
            rows[name] = {"sqnr_db": round(worst_sqnr(ref, C.run_all(out, ev)), 2), "seconds": round(secs, 1)}
            if smooth is not None:
                rows[name]["smooth_stats"] = dict(smooth.stats)
                rows[name]["smooth_seconds"] = round(smooth.seconds, 1)
            paths[name] = out
            print(name, rows[name], flush=True)
        if not args.no_latency:
            lat = C.latency_ms({k: str(v) for k, v in paths.items()}, ev[0], threads=1, warmup=5, rounds=5,
                               per_round=10)
            for k, v in lat.items():
                if k != "float":
                    rows[k]["latency_ratio"] = round(v["median"] / lat["float"]["median"], 3)
            print({k: rows[k].get("latency_ratio") for k in rows}, flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"model": args.model, "samples": args.samples, "eval": args.eval,
                                             "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
