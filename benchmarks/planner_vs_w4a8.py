"""Issue 14, item 5's "Done means": ``qcompiler plan --budget <bytes of --preset w4a8>`` against uniform
``--preset w4a8``, on one model of the zoo.

    python benchmarks/planner_vs_w4a8.py ppocr_cls --samples 64 --eval 32 --json out/pw4_ppocr_cls.json

Both are compiled from the same ``calib``-split feeds (``--samples``, 64): uniform ``--preset w4a8`` (its bytes, as
``qcompiler inspect --cost`` counts them, are the budget), then ``qcompiler plan MODEL --calib DATA --budget
<those bytes>`` with its default options (it holds back a spread of the calibration samples, every 4th, to measure
plans on) and the written plan compiled with all the feeds, as ``qcompiler compile --plan PLAN`` would. Both files are scored on the
disjoint ``eval`` split against the float model: the worst output slice's SQNR (dB; the rule of ``qcompiler
validate``: each output's worst slice along its channel / feature axis, or the whole tensor when lower). Prints one
table row and the target (planner >= w4a8 + 1 dB; never below it; within the budget), whether the planner's 16-bit
activations step was kept, and the planned file's onnxruntime latency against w4a8's (1 thread, ``--latency-rounds``
interleaved rounds on the first eval feed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import _common as C
import realdata

from qcompiler import autoplan
from qcompiler.api import CompileOptions, compile_model
from qcompiler.report import cost
from qcompiler.report import validate as qv


def compiled_bytes(path: Path, shapes: dict[str, list[int]]) -> int:
    return int(cost.model_cost(path, feed_shapes=shapes).total_bytes)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, default=64, help="calibration feeds (calib split)")
    ap.add_argument("--eval", type=int, default=32, help="evaluation feeds (eval split)")
    ap.add_argument("--candidates", default=None, help="qcompiler plan --candidates (default: its default)")
    ap.add_argument("--latency-rounds", type=int, default=10,
                    help="interleaved latency rounds, planned vs w4a8 (onnxruntime, 1 thread); 0: not measured")
    ap.add_argument("--max-latency-ratio", type=float, default=None,
                    help="qcompiler plan --max-latency-ratio R (default: none, nothing timed)")
    ap.add_argument("--json")
    args = ap.parse_args()
    model = Path(realdata.fetch_model(args.model))
    calib, ev = C.zoo_feeds(args.model, args.samples, "calib"), C.zoo_feeds(args.model, args.eval, "eval")
    shapes = {k: list(v.shape) for k, v in calib[0].items()}
    row: dict[str, Any] = {"model": args.model, "samples": len(calib), "eval": len(ev)}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        folder = C.write_feeds(calib, work / "calib")
        uni = work / "w4a8.onnx"
        t0 = time.perf_counter()
        compile_model(model, uni, CompileOptions(preset="w4a8", calib=str(folder), validate=False))
        row["w4a8_seconds"] = round(time.perf_counter() - t0, 2)
        row["w4a8_bytes"] = compiled_bytes(uni, shapes)
        print(f"w4a8: {row['w4a8_bytes']} bytes, {row['w4a8_seconds']} s", file=sys.stderr, flush=True)
        cands = args.candidates or autoplan.DEFAULT_CANDIDATES
        opts = autoplan.PlanOptions(budget=autoplan.Budget.parse(str(row["w4a8_bytes"])),
                                    candidates=autoplan.parse_candidates(cands),
                                    default_candidates=args.candidates is None,
                                    max_latency_ratio=args.max_latency_ratio)
        t0 = time.perf_counter()
        res = autoplan.auto_plan(model, folder, opts)
        row["plan_seconds"] = round(time.perf_counter() - t0, 2)
        plan_file = work / "plan.yaml"
        plan_file.write_text(res.text)
        planned = work / "planned.onnx"
        t0 = time.perf_counter()
        compile_model(model, planned, CompileOptions(plan=str(plan_file), calib=str(folder), validate=False))
        row["planned_compile_seconds"] = round(time.perf_counter() - t0, 2)
        row["planned_bytes"] = compiled_bytes(planned, shapes)
        row["uniform_returned"] = bool(res.uniform)
        row["base"] = res.baseline.get("name") if res.baseline else None
        # the layers of the plan returned; a returned uniform base (no mix beat it) is the base, not the best mix
        row["counts"] = None if res.uniform else {k: v for k, v in res.counts().items() if v}
        row["best_mix_counts"] = {k: v for k, v in res.counts().items() if v}
        row["held_back"] = res.measured
        row["timings"] = {k: round(v, 2) for k, v in res.timings.items()}
        row["presets"] = res.baseline.get("presets") if res.baseline else None
        row["searches"] = res.baseline.get("searches") if res.baseline else None
        row["activations"] = res.baseline.get("activations") if res.baseline else None
        row["plan_latency"] = res.baseline.get("latency") if res.baseline else None
        files = [("w4a8", uni), ("planned", planned)]
        if res.baseline and res.baseline.get("text") and not res.uniform:
            # the uniform plan the planner started from, alone: how much of the gain is the mix's
            base_file = work / "base.yaml"
            base_file.write_text(res.baseline["text"])
            based = work / "base.onnx"
            compile_model(model, based, CompileOptions(plan=str(base_file), calib=str(folder), validate=False))
            row["base_bytes"] = compiled_bytes(based, shapes)
            files.append(("base", based))
        for name, path in files:
            rep = qv.validate(model, path, ev, per_layer=False)
            row[f"{name}_worst_slice_db"] = round(rep.worst_slice_sqnr(), 2)
            row[f"{name}_whole_db"] = round(rep.worst_output_sqnr(), 2)
        if args.latency_rounds:
            # onnxruntime, 1 thread, interleaved rounds on the first eval feed: the planned file against w4a8
            lat = C.latency_ms({"float": model, "w4a8": uni, "planned": planned}, ev[0], threads=1, warmup=10,
                               rounds=args.latency_rounds, per_round=5)
            row["latency_ms"] = {k: round(v["median"], 3) for k, v in lat.items()}
            row["latency_ratio"] = round(lat["planned"]["median"] / lat["w4a8"]["median"], 3)
            row["planned_vs_float"] = round(lat["planned"]["median"] / lat["float"]["median"], 3)
    row["gain_db"] = round(row["planned_worst_slice_db"] - row["w4a8_worst_slice_db"], 2)
    row["within_budget"] = row["planned_bytes"] <= row["w4a8_bytes"]
    row["met"] = row["gain_db"] >= 1.0 and row["within_budget"]
    row["never_below"] = row["gain_db"] >= 0.0
    act = row.get("activations") or {}
    print(C.fmt_table(["model", "w4a8 worst slice", "planner worst slice", "planner's base alone", "w4a8 bytes",
                       "planned bytes", "gain", "met", "16-bit activations", "latency × w4a8", "plan s"],
                      [[args.model, str(row["w4a8_worst_slice_db"]), str(row["planned_worst_slice_db"]),
                        str(row.get("base_worst_slice_db", "(returned)")),
                        str(row["w4a8_bytes"]), str(row["planned_bytes"]), f"{row['gain_db']:+.2f}",
                        "met" if row["met"] else "missed",
                        (f"{act.get('tensors', 0)} kept" if act.get("kept") else
                         f"{act.get('tensors', 0)} tried, not kept" if act.get("tried") else "none"),
                        str(row.get("latency_ratio", "-")), str(row["plan_seconds"])]]))
    print(json.dumps(row, default=str), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
