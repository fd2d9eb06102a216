#!/usr/bin/env python
"""Automatic mixed precision (``qcompiler plan``) on the real models: budgets, measured SQNR, ranking, speed.

    python benchmarks/autoplan.py                           # every real model, Markdown on stdout
    python benchmarks/autoplan.py --models ppocr_cls --json out.json

For each model (``tests/realdata.py``; calibration split for planning and calibration, the disjoint eval split
for every measured number):

1. **Uniform baselines**: every layer int8 / every layer int4 (W8A8 base plan: per-channel weights, uint8
   activations), compiled for real; bytes as ``inspect --cost`` counts them; measured worst-output SQNR.
2. **Mixed at the bytes of uniform int4**: ``qcompiler plan --budget <uniform int4 bytes> --candidates
   fp32,int8,int4,ternary,binary,shift4 --target packed`` (the packed target stores binary / ternary in 1 / 2
   bits).
3. **Mixed at the bytes of uniform int8**: ``--budget <uniform int8 bytes> --candidates fp32,int8,int4``.
4. **Ranking**: every layer compiled alone (its weights int4, its input uint8, the rest float) and measured;
   Spearman correlation of each metric's predicted int4 sensitivity with the measured per-layer output SQNR
   (negated: more sensitive = lower SQNR).
5. **Speed**: ``qcompiler plan`` (pd, candidates int8,int4, default ``--samples``) against one calibration pass
   of ``qcompiler compile`` over the same calibration set (the ``calibrate`` pass, W8A8), measured before and
   after the search (the machine is shared, so both are taken back to back and averaged).

The budget check is also recorded: every compiled plan's bytes (``qcompiler.cost``) against its budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REAL_MODELS, fmt_table, load_task, machine, run_all, score, write_feeds

from qcompiler import autoplan, cost
from qcompiler.compiler import CompileOptions, compile_model
from qcompiler.plan import Plan
from qcompiler.sensitivity import METRICS, LayerUnderTest, compute

ALL = "fp32,int8,int4,ternary,binary,shift4"


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x: list[float]) -> np.ndarray:
        arr = np.asarray(x, dtype=np.float64)
        order = np.argsort(arr, kind="stable")
        r = np.empty(len(arr))
        r[order] = np.arange(len(arr))
        for v in np.unique(arr):  # average ranks of ties
            idx = np.where(arr == v)[0]
            r[idx] = r[idx].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return float(ra @ rb) / den if den else float("nan")


def compile_and_measure(task: Any, plan: Plan, calib: Path, workdir: Path, target: str, name: str) -> dict[str, Any]:
    out = workdir / f"{name}.onnx"
    res = compile_model(task.model, out, CompileOptions(plan=plan, calib=str(calib), target=target, validate=False))
    c = cost.model_cost(out, shapes=False)
    ref = task.extra.setdefault("_ref", run_all(task.model, task.eval))
    sc = score(task.key, ref, run_all(out, task.eval), task.labels)
    worst = min(sc.sqnr.values())
    calib_s = next((r.seconds for r in res.records if r.name == "calibrate"), float("nan"))
    for f in res.files:
        f.unlink(missing_ok=True)
    return {"bytes": c.total_bytes, "sqnr_db": worst, "agreement": sc.agreement, "calibrate_s": calib_s,
            "outputs": sc.sqnr}


def plan(task: Any, calib: Path, budget: str, cands: str, target: str, samples: int,
         sens: Any = None, metric: str = "pd") -> autoplan.AutoPlanResult:
    opts = autoplan.PlanOptions(budget=autoplan.Budget.parse(budget), candidates=autoplan.parse_candidates(cands),
                                metric=metric, target=target, samples=samples)
    return autoplan.auto_plan(task.model, calib, opts, sensitivity=sens)


def layers_of(task: Any, cands: str, target: str) -> tuple[Any, list[LayerUnderTest]]:
    cl = autoplan.parse_candidates(cands)
    prep = autoplan.prepare(task.model, cl, target=target)
    oq = autoplan.output_quant(prep, cl, autoplan.layer_rules(prep, cl))
    by = {n.name: n for n in prep.graph.nodes}
    lut = [LayerUnderTest(la.name, by[la.name], prep.nodes[la.name].weight_inputs, prep.specs[i],
                          prep.nodes[la.name].activation if 0 in prep.nodes[la.name].activation_inputs else None,
                          oq[i])
           for i, la in enumerate(prep.layers)]
    return prep, lut


def run_model(key: str, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"model": key}
    task = load_task(key, n_calib=args.calib, n_eval=args.eval)
    work = Path(tempfile.mkdtemp(prefix=f"autoplan-{key}-"))
    calib = write_feeds(task.calib, work / "calib")

    def log(*a: Any) -> None:
        print(f"[{key}]", *a, file=sys.stderr, flush=True)

    # ---- 1. uniform baselines ---------------------------------------------------------------------------
    u = {}
    for name, cands, target in (("int8", "int8", "ort"), ("int4", "int4", "ort"), ("int4 (packed)", "int4", "packed")):
        r = plan(task, calib, "1000000000", cands, target, args.samples)
        m = compile_and_measure(task, r.plan, calib, work, target, f"uniform_{name.split()[0]}_{target}")
        u[name] = {"bytes": m["bytes"], "sqnr_db": m["sqnr_db"], "agreement": m["agreement"],
                   "calibrate_s": m["calibrate_s"]}
        log("uniform", name, u[name])
    out["uniform"] = u

    # ---- sensitivities: pd over every candidate, once (reused by the plans below) -------------------------
    prep, lut = layers_of(task, ALL, "packed")
    feeds = autoplan.load_feeds(prep.graph, calib, args.samples, 0)
    t = time.perf_counter()
    sens_all = compute("pd", prep.graph, lut, [c.name for c in autoplan.parse_candidates(ALL)], feeds)
    out["pd_all_seconds"] = time.perf_counter() - t
    log("pd over", ALL, f"{out['pd_all_seconds']:.1f} s")

    # ---- 2. mixed at the bytes of uniform int4 ----------------------------------------------------------
    b4 = u["int4 (packed)"]["bytes"]
    r4 = plan(task, calib, str(b4), ALL, "packed", args.samples, sens_all)
    m4 = compile_and_measure(task, r4.plan, calib, work, "packed", "mixed4")
    out["mixed_at_int4"] = {"budget": b4, "bytes": m4["bytes"], "sqnr_db": m4["sqnr_db"], "agreement": m4["agreement"],
                            "counts": r4.counts(), "predicted_sqnr_db": r4.predicted.get("sqnr_db"),
                            "gain_db": m4["sqnr_db"] - u["int4 (packed)"]["sqnr_db"], "within_budget": m4["bytes"] <= b4}
    log("mixed@int4", out["mixed_at_int4"])

    # ---- 3. mixed at the bytes of uniform int8 ----------------------------------------------------------
    b8 = u["int8"]["bytes"]
    r8 = plan(task, calib, str(b8), "fp32,int8,int4", "ort", args.samples, sens_all)
    m8 = compile_and_measure(task, r8.plan, calib, work, "ort", "mixed8")
    out["mixed_at_int8"] = {"budget": b8, "bytes": m8["bytes"], "sqnr_db": m8["sqnr_db"], "agreement": m8["agreement"],
                            "counts": r8.counts(), "predicted_sqnr_db": r8.predicted.get("sqnr_db"),
                            "gain_db": m8["sqnr_db"] - u["int8"]["sqnr_db"], "within_budget": m8["bytes"] <= b8}
    log("mixed@int8", out["mixed_at_int8"])

    # ---- 4. ranking: measured per-layer SQNR vs predicted sensitivity ------------------------------------
    if not args.skip_ranking:
        names = [la.name for la in prep.layers]
        measured = []
        base = prep.base.to_dict()["defaults"]
        for la in prep.layers:
            act = la.activation.to_dict() if la.activation is not None else {"dtype": "float"}
            text = ("version: 1\ndefaults:\n  weight: {dtype: float}\n  activation: {dtype: float}\nrules:\n"
                    f"  - {{match: {{name: {json.dumps(la.name)}}}, weight: {json.dumps({**base['weight'], 'dtype': 'int4'})},"
                    f" activation: {json.dumps(act)}}}\n")
            measured.append(compile_and_measure(task, Plan.from_text(text), calib, work, "ort", "one")["sqnr_db"])
        ci = sens_all.candidates.index("int4")
        ranking = {"layers": names, "measured_sqnr_db": measured, "metrics": {}}
        for metric in METRICS:
            t = time.perf_counter()
            res = sens_all if metric == "pd" else compute(metric, prep.graph, lut, ["int4"], feeds)
            secs = out["pd_all_seconds"] if metric == "pd" else time.perf_counter() - t
            col = res.values[:, ci if metric == "pd" else 0]
            ok = [i for i in range(len(names)) if np.isfinite(col[i]) and math.isfinite(measured[i])]
            rho = spearman([float(col[i]) for i in ok], [-measured[i] for i in ok])
            ranking["metrics"][metric] = {"spearman": rho, "seconds": secs, "values": [float(v) for v in col]}
            log("spearman", metric, f"{rho:.3f}")
        out["ranking"] = ranking

    # ---- 5. speed: search (pd, int8,int4) vs one calibration pass ---------------------------------------
    cal_before = u["int8"]["calibrate_s"]
    t = time.perf_counter()
    rs = plan(task, calib, str(u["int8"]["bytes"]), "int8,int4", "ort", args.samples)
    search = time.perf_counter() - t
    cal_after = compile_and_measure(task, Plan.default(), calib, work, "ort", "cal")["calibrate_s"]
    calib_pass = (cal_before + cal_after) / 2
    out["speed"] = {"search_s": search, "sensitivity_s": rs.timings["sensitivity"], "costs_s": rs.timings["costs"],
                    "calibration_pass_s": calib_pass, "calibration_samples": len(task.calib),
                    "sensitivity_samples": rs.sensitivity.samples, "evaluations": rs.sensitivity.evaluations,
                    "params": int(sum(la.params for la in rs.layers)), "ratio": search / calib_pass}
    log("speed", out["speed"])
    return out


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"Machine: {machine().get('cpu', '?')}, {os.cpu_count()} cores. Calibration {args.calib} samples "
             f"(calib split), evaluation {args.eval} samples (eval split), sensitivity on the first {args.samples}.",
             ""]
    rows = []
    for r in results:
        u = r["uniform"]
        m4, m8 = r["mixed_at_int4"], r["mixed_at_int8"]
        rows.append((r["model"], f"{u['int4 (packed)']['bytes']}", f"{u['int4 (packed)']['sqnr_db']:.2f}",
                     f"{m4['bytes']}", f"{m4['sqnr_db']:.2f}", f"{m4['gain_db']:+.2f}",
                     " ".join(f"{k}:{v}" for k, v in m4["counts"].items() if v)))
    lines += ["**At the bytes of uniform int4** (`--candidates fp32,int8,int4,ternary,binary,shift4 --target packed`; "
              "bytes as `inspect --cost` counts them, worst-output SQNR in dB on the eval split):", "",
              fmt_table(["model", "int4 bytes", "int4 SQNR", "mixed bytes", "mixed SQNR", "gain", "layers"], rows), ""]
    rows = []
    for r in results:
        u = r["uniform"]
        m8 = r["mixed_at_int8"]
        rows.append((r["model"], f"{u['int8']['bytes']}", f"{u['int8']['sqnr_db']:.2f}", f"{m8['bytes']}",
                     f"{m8['sqnr_db']:.2f}", f"{m8['gain_db']:+.2f}",
                     " ".join(f"{k}:{v}" for k, v in m8["counts"].items() if v)))
    lines += ["**At the bytes of uniform int8** (`--candidates fp32,int8,int4`, target ort):", "",
              fmt_table(["model", "int8 bytes", "int8 SQNR", "mixed bytes", "mixed SQNR", "gain", "layers"], rows), ""]
    rows = []
    for r in results:
        if "ranking" not in r:
            continue
        rk = r["ranking"]
        rows.append((r["model"], str(len(rk["layers"])),
                     *[f"{rk['metrics'][m]['spearman']:.3f} ({rk['metrics'][m]['seconds']:.0f} s)" for m in METRICS]))
    if rows:
        lines += ["**Ranking**: Spearman correlation of the predicted int4 sensitivity with the measured output "
                  "SQNR of each layer quantized alone (weights int4, input uint8), negated; metric time in "
                  "parentheses (pd: over all six candidates):", "",
                  fmt_table(["model", "layers", *METRICS], rows), ""]
    rows = []
    for r in results:
        s = r["speed"]
        rows.append((r["model"], f"{s['params'] / 1e6:.2f} M", f"{s['search_s']:.1f}", f"{s['sensitivity_s']:.1f}",
                     str(s["evaluations"]), f"{s['sensitivity_samples']}",
                     f"{s['calibration_pass_s']:.2f} ({s['calibration_samples']})", f"{s['ratio']:.1f}x"))
    lines += ["**Speed** (`qcompiler plan --candidates int8,int4`, pd): whole search vs one calibration pass of "
              "`qcompiler compile` over the calibration set:", "",
              fmt_table(["model", "params", "search s", "sensitivity s", "evaluations", "samples",
                         "calib pass s (samples)", "ratio"], rows), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(REAL_MODELS))
    ap.add_argument("--calib", type=int, default=64, help="calibration samples")
    ap.add_argument("--eval", type=int, default=32, help="evaluation samples")
    ap.add_argument("--samples", type=int, default=8, help="sensitivity samples (qcompiler plan --samples)")
    ap.add_argument("--skip-ranking", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = []
    for key in [k for k in args.models.split(",") if k]:
        results.append(run_model(key, args))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(markdown(results, args))


if __name__ == "__main__":
    main()
