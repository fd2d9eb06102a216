"""Issue 14, transformers: SmoothQuant's alpha chosen by measurement and per-token dynamic activations, on a real
model.

    python benchmarks/transformers_smooth.py vit_focus --samples 32 --eval 16 -o out/tsq_vit_focus.json

Rows: the default plan, the default plan with ``smooth: true`` (alpha 0.5; also ``affine: true``, smoothing
through a LayerNorm exported as primitive ops, as ``auto`` does) and with ``smooth: {alpha: auto}``,
``w8a8-dynamic``, ``w8a8-dynamic`` with per-token activations, and that with ``smooth: {alpha: auto}``
(:data:`PLANS`). Calibration feeds from the
``calib`` split, evaluation feeds from the disjoint ``eval`` split; each row: the worst graph output's SQNR (dB)
against the float model on the evaluation feeds, the compile seconds, the ``smooth`` pass's chosen alphas, and
onnxruntime latency vs float (one thread, median of interleaved rounds).

    python benchmarks/transformers_smooth.py vit_focus --mode lowering --eval 8 -o out/tsq_lowering_vit.json

compares, for the per-token lowering decision, per-tensor dynamic, per-token in its reference form and lowered,
and int8 symmetric per-token (:func:`lowering_probe`)."""

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
from measured_default import worst_sqnr

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.plan import Plan
from qcompiler.runtime_targets import DEFAULT_PIPELINE

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
                                                                    "symmetric": False, "calibration": "dynamic"}}]},
}
PLANS["w8a8-dynamic-per-token+smooth-auto"] = {**PLANS["w8a8-dynamic-per-token"],
                                               "algorithms": {"smooth": {"alpha": "auto"}}}


def _per_token(dtype: str = "uint8", symmetric: bool = False) -> dict[str, Any]:
    rule = {"match": {"op_type": ["MatMul", "Gemm"]}, "activation": {"dtype": dtype, "granularity": "per_token",
                                                                    "symmetric": symmetric, "calibration": "dynamic"}}
    return {**DYNAMIC, "rules": [rule]}


def lowering_probe(model: Path, ev: list[dict[str, Any]], work: Path) -> dict[str, Any]:
    """``--mode lowering``: per-tensor dynamic, per-token in its reference form (no ``lower``), per-token lowered,
    int8 symmetric per-token; SQNR, latency vs float, and the lowered vs the reference form (no onnxruntime
    optimization, whose MatMulNBits fusion changes the reference form's rounding)."""
    ref = C.run_all(model, ev)
    rows: dict[str, Any] = {}
    paths: dict[str, Any] = {"float": model}
    no_lower = DEFAULT_PIPELINE.replace(",lower", "")
    for name, plan, pipeline in (("per_tensor", PLANS["w8a8-dynamic"], None),
                                 ("per_token_reference", _per_token(), no_lower),
                                 ("per_token_lowered", _per_token(), None),
                                 ("per_token_int8", _per_token("int8", True), None)):
        out = work / f"{name}.onnx"
        compile_model(model, out, CompileOptions(plan=Plan.from_dict(plan, source=name), validate=False,
                                                 pipeline=pipeline))
        rows[name] = {"sqnr_db": round(worst_sqnr(ref, C.run_all(out, ev)), 2)}
        paths[name] = out
        print(name, rows[name], flush=True)
    lat = C.latency_ms({k: str(v) for k, v in paths.items()}, ev[0], threads=1, warmup=5, rounds=5, per_round=10)
    for k, v in lat.items():
        if k != "float":
            rows[k]["latency_ratio"] = round(v["median"] / lat["float"]["median"], 3)
    a, b = ir.session(str(paths["per_token_reference"]), optimize=False), ir.session(str(paths["per_token_lowered"]))
    ra, rb = [a.run(None, f) for f in ev], [b.run(None, f) for f in ev]
    rows["lowered_vs_reference_db"] = [round(C.sqnr_db([x[i] for x in ra], [y[i] for y in rb]), 1)
                                       for i in range(len(ra[0]))]
    print(rows, flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("plans", "lowering"), default="plans")
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--rows", default=",".join(PLANS), help="comma-separated rows (default: all)")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    model = C.realdata.fetch_model(args.model)
    if args.mode == "lowering":
        with tempfile.TemporaryDirectory() as td:
            rows = lowering_probe(Path(model), C.zoo_feeds(args.model, args.eval, "eval"), Path(td))
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"model": args.model, "eval": args.eval, "mode": "lowering",
                                                 "rows": rows}, indent=2, default=str) + "\n")
        return 0
    calib, ev = C.zoo_feeds(args.model, args.samples, "calib"), C.zoo_feeds(args.model, args.eval, "eval")
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
