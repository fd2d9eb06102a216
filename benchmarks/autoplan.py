#!/usr/bin/env python
"""Automatic mixed precision (``qcompiler plan``) on the real models: budgets, measured SQNR, ranking, speed.

    python benchmarks/autoplan.py                           # every real model, Markdown on stdout
    python benchmarks/autoplan.py --models ppocr_cls --rank-eval 256 --json out.json

For each model (``tests/realdata.py``; calibration split for planning and calibration, the disjoint eval split
for every measured number: its first ``--eval`` (32) samples, and — for the int4 / int8 comparisons and the
ranking — its first ``--rank-eval`` (256) samples as well, of which the 32 are the first):

1. **Uniform baselines**: every layer int8 / every layer int4 (W8A8 base plan: per-channel weights, uint8
   activations), compiled for real; bytes as ``inspect --cost`` counts them; measured worst-output SQNR.
2. **Sensitivities**: pd over every candidate once, as ``qcompiler plan`` measures them
   (:func:`qcompiler.autoplan.measure_sensitivity`: activation ranges over the whole calibration set, the
   samples grown when the distortions rest on fewer than 2 effective samples), reused by the plans below.
3. **Mixed at the bytes of uniform int4**: ``qcompiler plan --budget <uniform int4 bytes> --target packed`` with
   the six candidates ``fp32,int8,int4,ternary,binary,shift4`` and with ``shift3,shift2`` added (the packed
   target stores binary / ternary / shift weights in 1 / 2 / 2–4 bits).
4. **Mixed at the bytes of uniform int8**: ``--budget <uniform int8 bytes> --candidates fp32,int8,int4``.
5. **Ranking**: every layer compiled alone (its weights int4, its input uint8, the rest float) and measured on
   the ``--rank-eval`` samples (and on the first ``--eval``); Spearman correlation of each metric's predicted
   int4 sensitivity with the measured per-layer output SQNR (negated: more sensitive = lower SQNR), and the
   median effective sample size of the measured per-layer noise.
6. **Speed**: ``qcompiler plan`` (pd, candidates int8,int4, default ``--samples``) against one calibration pass
   of ``qcompiler compile`` over the same calibration set (the ``calibrate`` pass, W8A8), measured before and
   after the search (the machine is shared, so both are taken back to back and averaged).

The budget check is also recorded: every compiled plan's bytes (``qcompiler.report.cost``) against its budget.
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
from _common import (
    REAL_MODELS,
    fmt_table,
    load_task,
    machine,
    run_all,
    score,
    sqnr_db,
    task_inputs,
    write_feeds,
)

from qcompiler import autoplan
from qcompiler.api import CompileOptions, compile_model
from qcompiler.autoplan.sensitivity import METRICS, LayerUnderTest, compute, effective_samples
from qcompiler.plan import Plan, presets
from qcompiler.report import cost

#: the candidates at the bytes of uniform int4: SIX as in the first measurements, ALL with 3- and 2-bit shift
#: weights (the packed target stores them at their own width)
SIX = "fp32,int8,int4,ternary,binary,shift4"
ALL = SIX + ",shift3,shift2"
#: ... and the uniform 3- / 2-bit integer weights (mid-rise, packed Int3* / Int2* ops)
INTS = ALL + ",int3,int2"
INT4_SETS = {"six": SIX, "all": ALL, "ints": INTS}
SET_LABELS = {SIX: "six", ALL: "+shift3,2", INTS: "+shift3,2,int3,2"}


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


def worst_sqnr(ref: list[dict[str, np.ndarray]], q: list[dict[str, np.ndarray]]) -> float:
    return min(sqnr_db([r[o] for r in ref], [x[o] for x in q]) for o in ref[0])


def compile_and_measure(task: Any, plan: Plan, calib: Path, workdir: Path, target: str, name: str,
                        more: list[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Compile, count bytes, measure on the eval split (and, with ``more``, the worst-output SQNR on those)."""
    out = workdir / f"{name}.onnx"
    res = compile_model(task.model, out, CompileOptions(plan=plan, calib=str(calib), target=target, validate=False))
    c = cost.model_cost(out, shapes=False)
    ref = task.extra.setdefault("_ref", run_all(task.model, task.eval))
    sc = score(task.key, ref, run_all(out, task.eval), task.labels)
    worst = min(sc.sqnr.values())
    calib_s = next((r.seconds for r in res.records if r.name == "calibrate"), float("nan"))
    extra: dict[str, Any] = {}
    if more is not None:
        ref_more = task.extra.setdefault("_ref_more", run_all(task.model, more))
        extra["sqnr_db_more"] = worst_sqnr(ref_more, run_all(out, more))
    for f in res.files:
        f.unlink(missing_ok=True)
    return {"bytes": c.total_bytes, "sqnr_db": worst, "agreement": sc.agreement, "calibrate_s": calib_s,
            "outputs": sc.sqnr, **extra}


def plan(task: Any, calib: Path, budget: str, cands: str, target: str, samples: int,
         sens: Any = None, metric: str = "pd", max_samples: int = 64, **kw: Any) -> autoplan.AutoPlanResult:
    opts = autoplan.PlanOptions(budget=autoplan.Budget.parse(budget), candidates=autoplan.parse_candidates(cands),
                                metric=metric, target=target, samples=samples, max_samples=max_samples, **kw)
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

    # held-back samples for the per-layer ranking and the int4-bytes comparison: the first --eval of them are
    # the eval split every other number uses; --rank-eval of them give the same measurement on more samples
    n_rank = max(args.rank_eval, args.eval)
    rank_feeds = task_inputs(key, n_rank, "eval")[0] if n_rank > len(task.eval) else task.eval

    # ---- 1. uniform baselines ---------------------------------------------------------------------------
    u = {}
    for name, cands, target in (("int8", "int8", "ort"), ("int4", "int4", "ort"), ("int4 (packed)", "int4", "packed")):
        r = plan(task, calib, "1000000000", cands, target, args.samples)
        m = compile_and_measure(task, r.plan, calib, work, target, f"uniform_{name.split()[0]}_{target}",
                                more=rank_feeds if name in ("int4 (packed)", "int8") else None)
        u[name] = {"bytes": m["bytes"], "sqnr_db": m["sqnr_db"], "agreement": m["agreement"],
                   "calibrate_s": m["calibrate_s"], **({"sqnr_db_more": m["sqnr_db_more"]} if "sqnr_db_more" in m
                                                       else {})}
        log("uniform", name, u[name])
    out["uniform"] = u

    # ---- sensitivities: pd over every candidate, once (reused by the plans below), as `qcompiler plan` measures
    # them (activation ranges over the whole calibration set; more samples when they rest on few)
    prep, lut = layers_of(task, INTS, "packed")
    ranges = autoplan.calib_source(prep.graph, calib, args.samples, 0)
    t = time.perf_counter()
    sens_all, feeds = autoplan.measure_sensitivity(
        prep.graph, lut, [c.name for c in autoplan.parse_candidates(INTS)], ranges,
        autoplan.PlanOptions(budget=autoplan.Budget.parse("100%"), samples=args.samples,
                             max_samples=args.max_samples))
    out["pd_all_seconds"] = time.perf_counter() - t
    out["pd_samples"] = sens_all.samples
    out["pd_ess"] = {"final": sens_all.details.get("ess"), "first_pass": sens_all.details.get("first_pass")}
    log("pd over", INTS, f"{out['pd_all_seconds']:.1f} s on {sens_all.samples} samples", out["pd_ess"])

    # ---- 2. mixed at the bytes of uniform int4 ----------------------------------------------------------
    b4 = u["int4 (packed)"]["bytes"]
    sets: list[tuple[str, str, dict[str, int]]] = [(k, v, {}) for k, v in INT4_SETS.items()]
    if args.tight:
        sets.append(("tight", INTS, {"select": args.tight[0], "exchange": args.tight[1]}))
    for set_name, cands, kw in sets:
        t = time.perf_counter()
        r4 = plan(task, calib, str(b4), cands, "packed", args.samples, sens_all, **kw)
        plan_s = time.perf_counter() - t
        m4 = compile_and_measure(task, r4.plan, calib, work, "packed", "mixed4", more=rank_feeds)
        key4 = {"all": "mixed_at_int4", "ints": "mixed_at_int4_ints"}.get(set_name, f"mixed_at_int4_{set_name}")
        out[key4] = {"candidates": cands, "options": kw, "plan_seconds": plan_s, "budget": b4, "bytes": m4["bytes"], "sqnr_db": m4["sqnr_db"],
                     "agreement": m4["agreement"], "sqnr_db_more": m4["sqnr_db_more"], "more_samples": n_rank,
                     "gain_db_more": m4["sqnr_db_more"] - u["int4 (packed)"]["sqnr_db_more"],
                     "counts": r4.counts(), "predicted_sqnr_db": r4.predicted.get("sqnr_db"),
                     "joint_sqnr_db": r4.predicted.get("joint_sqnr_db"),
                     "gain_db": m4["sqnr_db"] - u["int4 (packed)"]["sqnr_db"], "within_budget": m4["bytes"] <= b4}
        log(key4, out[key4])

    # ---- 3. mixed at the bytes of uniform int8 ----------------------------------------------------------
    b8 = u["int8"]["bytes"]
    r8 = plan(task, calib, str(b8), "fp32,int8,int4", "ort", args.samples, sens_all)
    m8 = compile_and_measure(task, r8.plan, calib, work, "ort", "mixed8", more=rank_feeds)
    out["mixed_at_int8"] = {"budget": b8, "bytes": m8["bytes"], "sqnr_db": m8["sqnr_db"], "agreement": m8["agreement"],
                            "sqnr_db_more": m8["sqnr_db_more"], "more_samples": n_rank,
                            "gain_db_more": m8["sqnr_db_more"] - u["int8"]["sqnr_db_more"],
                            "counts": r8.counts(), "predicted_sqnr_db": r8.predicted.get("sqnr_db"),
                            "gain_db": m8["sqnr_db"] - u["int8"]["sqnr_db"], "within_budget": m8["bytes"] <= b8}
    log("mixed@int8", out["mixed_at_int8"])

    # ---- 4. ranking: measured per-layer SQNR vs predicted sensitivity ------------------------------------
    if not args.skip_ranking:
        # every layer alone at int4, measured on the first --rank-eval held-back samples (the first --eval of
        # them are the samples every other number uses: that narrower measurement is reported too)
        ref_rank = task.extra.setdefault("_ref_more", run_all(task.model, rank_feeds))
        names = [la.name for la in prep.layers]
        measured: dict[str, list[float]] = {"eval": [], "rank": []}
        ess: dict[str, list[float]] = {"eval": [], "rank": []}
        base = prep.base.to_dict()["defaults"]
        for la in prep.layers:
            act = la.activation.to_dict() if la.activation is not None else {"dtype": "float"}
            text = ("version: 1\ndefaults:\n  weight: {dtype: float}\n  activation: {dtype: float}\nrules:\n"
                    f"  - {{match: {{name: {json.dumps(la.name)}}}, weight: {json.dumps({**base['weight'], 'dtype': 'int4'})},"
                    f" activation: {json.dumps(act)}}}\n")
            one = work / "one.onnx"
            res1 = compile_model(task.model, one, CompileOptions(plan=Plan.from_text(text), calib=str(calib),
                                                                 target="ort", validate=False))
            q = run_all(one, rank_feeds)
            for f in res1.files:
                f.unlink(missing_ok=True)
            for which, n in (("eval", len(task.eval)), ("rank", n_rank)):
                worst, per = math.inf, np.zeros(n)
                for o in ref_rank[0]:
                    db = sqnr_db([r[o] for r in ref_rank[:n]], [x[o] for x in q[:n]])
                    if db < worst:
                        worst = db
                        per = np.array([float(np.sum((np.asarray(r[o], np.float64) - x[o]) ** 2))
                                        for r, x in zip(ref_rank[:n], q[:n])])
                measured[which].append(worst)
                ess[which].append(effective_samples(per))
        ci = sens_all.candidates.index("int4")
        ranking = {"layers": names, "measured_sqnr_db": measured["rank"], "measured_sqnr_db_eval": measured["eval"],
                   "rank_samples": n_rank, "eval_samples": len(task.eval),
                   "measurement_ess_median": {k: float(np.median(v)) for k, v in ess.items()}, "metrics": {}}
        for metric in METRICS:
            t = time.perf_counter()
            res = sens_all if metric == "pd" else compute(metric, prep.graph, lut, ["int4"], feeds,
                                                          range_source=ranges)
            secs = out["pd_all_seconds"] if metric == "pd" else time.perf_counter() - t
            col = res.values[:, ci if metric == "pd" else 0]
            entry: dict[str, Any] = {"seconds": secs, "values": [float(v) for v in col]}
            for which, key_ in (("rank", "spearman"), ("eval", "spearman_eval")):
                m = measured[which]
                ok = [i for i in range(len(names)) if np.isfinite(col[i]) and math.isfinite(m[i])]
                entry[key_] = spearman([float(col[i]) for i in ok], [-m[i] for i in ok])
            ranking["metrics"][metric] = entry
            log("spearman", metric, f"{entry['spearman']:.3f} ({n_rank} samples), "
                f"{entry['spearman_eval']:.3f} ({len(task.eval)})")
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


def run_issue14(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Issue 14: ``qcompiler plan --budget <bytes of uniform --preset w4a8>`` (default options: the shipped presets
    searched and measured on the last calibration samples held back, default candidates) against uniform
    ``--preset w4a8``; both compiled with the whole calibration split, both measured on the same eval samples."""
    task = load_task(key, n_calib=args.calib, n_eval=args.eval)
    work = Path(tempfile.mkdtemp(prefix=f"issue14-{key}-"))
    calib = write_feeds(task.calib, work / "calib")

    def log(*a: Any) -> None:
        print(f"[{key}]", *a, file=sys.stderr, flush=True)

    uni = compile_and_measure(task, Plan.from_file(str(presets.preset_path("w4a8"))), calib, work, "ort", "w4a8")
    log("uniform w4a8", uni["bytes"], f"{uni['sqnr_db']:.2f} dB")
    out: dict[str, Any] = {"model": key, "w4a8": {k: uni[k] for k in ("bytes", "sqnr_db", "agreement")}, "runs": {}}
    for label, cands in (("default", None), *[(c, c) for c in args.issue14_candidates]):
        t = time.perf_counter()
        opts = autoplan.PlanOptions(budget=autoplan.Budget.parse(str(uni["bytes"])),
                                    candidates=autoplan.parse_candidates(cands or autoplan.DEFAULT_CANDIDATES),
                                    default_candidates=cands is None, samples=args.samples,
                                    max_samples=args.max_samples, holdout=args.holdout)
        r = autoplan.auto_plan(task.model, calib, opts)
        secs = time.perf_counter() - t
        m = compile_and_measure(task, r.plan, calib, work, "ort", f"planned-{label.replace(',', '_')}")
        entry = {"seconds": secs, "bytes": m["bytes"], "sqnr_db": m["sqnr_db"], "agreement": m["agreement"],
                 "gain_db": m["sqnr_db"] - uni["sqnr_db"], "within_budget": m["bytes"] <= uni["bytes"],
                 "base": r.baseline.get("name"), "uniform": r.uniform, "counts": r.counts(),
                 "held_back": r.measured, "predicted_sqnr_db": r.predicted.get("sqnr_db"),
                 "presets": r.baseline.get("presets")}
        out["runs"][label] = entry
        log("plan", label, {k: v for k, v in entry.items() if k != "presets"})
    return out


def markdown_issue14(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    rows = []
    for r in results:
        for label, e in r["runs"].items():
            hb = e["held_back"]
            mixed = hb.get("mixed", hb) if e["uniform"] else hb
            rows.append((r["model"], label, str(r["w4a8"]["bytes"]), f"{r['w4a8']['sqnr_db']:.2f}", str(e["bytes"]),
                         f"{e['sqnr_db']:.2f}", f"{e['gain_db']:+.2f}", e["base"],
                         "uniform" if e["uniform"] else " ".join(f"{k}:{v}" for k, v in e["counts"].items() if v),
                         f"{mixed['sqnr_db']:.2f} / {e['predicted_sqnr_db']:.2f}", f"{e['seconds']:.0f}"))
    return "\n".join([
        f"Machine: {machine().get('cpu', '?')}, {os.cpu_count()} cores. Calibration: {args.calib} samples (calib "
        f"split; the planner holds back the last {args.holdout}, at most a quarter, to measure on); every number "
        f"below measured on the first {args.eval} samples of the eval split (worst output SQNR, dB). Both plans "
        "compiled with the whole calibration split.", "",
        fmt_table(["model", "candidates", "w4a8 bytes", "w4a8 SQNR", "planned bytes", "planned SQNR", "gain",
                   "base preset", "planned layers", "mixed: held-back measured / predicted", "plan s"], rows), ""])


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [f"Machine: {machine().get('cpu', '?')}, {os.cpu_count()} cores. Calibration {args.calib} samples "
             f"(calib split), evaluation {args.eval} samples (eval split), sensitivity on the first {args.samples}.",
             ""]
    rows = []
    for r, m4 in [(r, r[k]) for r in results
                   for k in ("mixed_at_int4_six", "mixed_at_int4", "mixed_at_int4_ints", "mixed_at_int4_tight")
                   if k in r]:
        u = r["uniform"]
        label = SET_LABELS.get(m4["candidates"], m4["candidates"]) + "".join(
            f" --{k} {v}" for k, v in m4.get("options", {}).items())
        rows.append((r["model"], label,
                     f"{u['int4 (packed)']['bytes']}", f"{u['int4 (packed)']['sqnr_db']:.2f}",
                     f"{m4['bytes']}", f"{m4['sqnr_db']:.2f}", f"{m4['gain_db']:+.2f}",
                     f"{u['int4 (packed)']['sqnr_db_more']:.2f} → {m4['sqnr_db_more']:.2f} ({m4['gain_db_more']:+.2f})",
                     " ".join(f"{k}:{v}" for k, v in m4["counts"].items() if v)))
    n_more = results[0]["mixed_at_int4"]["more_samples"] if results else 0
    lines += [f"**At the bytes of uniform int4** (`--target packed`, candidates six = `{SIX}`, +shift3,2 = "
              f"`{ALL}`, +shift3,2,int3,2 = `{INTS}`; bytes as `inspect --cost` counts them, worst-output SQNR in dB on the {args.eval} eval "
              f"samples, and on the first {n_more} eval samples):", "",
              fmt_table(["model", "candidates", "int4 bytes", "int4 SQNR", "mixed bytes", "mixed SQNR", "gain",
                         f"int4 → mixed ({n_more})", "layers"], rows), ""]
    rows = []
    for r in results:
        u = r["uniform"]
        m8 = r["mixed_at_int8"]
        rows.append((r["model"], f"{u['int8']['bytes']}", f"{u['int8']['sqnr_db']:.2f}", f"{m8['bytes']}",
                     f"{m8['sqnr_db']:.2f}", f"{m8['gain_db']:+.2f}",
                     f"{u['int8']['sqnr_db_more']:.2f} → {m8['sqnr_db_more']:.2f} ({m8['gain_db_more']:+.2f})",
                     " ".join(f"{k}:{v}" for k, v in m8["counts"].items() if v)))
    lines += [f"**At the bytes of uniform int8** (`--candidates fp32,int8,int4`, target ort; SQNR on the {args.eval} "
              f"eval samples, and on the first {n_more} eval samples):", "",
              fmt_table(["model", "int8 bytes", "int8 SQNR", "mixed bytes", "mixed SQNR", "gain",
                         f"int8 → mixed ({n_more})", "layers"], rows), ""]
    rows = []
    for r in results:
        if "ranking" not in r:
            continue
        rk = r["ranking"]
        ess = rk["measurement_ess_median"]
        rows.append((r["model"], str(len(rk["layers"])), f"{r['pd_samples']}",
                     f"{ess['eval']:.1f} / {ess['rank']:.1f}",
                     *[f"{rk['metrics'][m]['spearman']:.3f} [{rk['metrics'][m]['spearman_eval']:.3f}] "
                       f"({rk['metrics'][m]['seconds']:.0f} s)" for m in METRICS]))
    if rows:
        lines += ["**Ranking**: Spearman correlation of the predicted int4 sensitivity with the measured output "
                  f"SQNR of each layer quantized alone (weights int4, input uint8), negated, measured on "
                  f"{args.rank_eval} eval samples [on the {args.eval} of the other tables]; metric time in "
                  "parentheses (pd: over all candidates); pd samples after the effective-sample check; "
                  "measurement ESS: median effective samples of the per-layer measured noise "
                  f"({args.eval} / {args.rank_eval} samples):", "",
                  fmt_table(["model", "layers", "pd samples", "measurement ESS", *METRICS], rows), ""]
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


def _tight(text: str) -> tuple[int, ...]:
    if text.strip() == "0":
        return ()
    vals = tuple(int(x) for x in text.split(","))
    if len(vals) != 2:
        raise argparse.ArgumentTypeError("SELECT,EXCHANGE (two integers) or 0")
    return vals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(REAL_MODELS))
    ap.add_argument("--calib", type=int, default=64, help="calibration samples")
    ap.add_argument("--eval", type=int, default=32, help="evaluation samples")
    ap.add_argument("--samples", type=int, default=8, help="sensitivity samples (qcompiler plan --samples)")
    ap.add_argument("--max-samples", type=int, default=64,
                    help="pd: measure again on up to this many when the sensitivities rest on few samples")
    ap.add_argument("--rank-eval", type=int, default=256,
                    help="held-back samples for the per-layer ranking measurement (also reported on --eval)")
    ap.add_argument("--skip-ranking", action="store_true")
    ap.add_argument("--tight", type=_tight, default=(32, 2),
                    metavar="SELECT,EXCHANGE",
                    help="one more int4-bytes row: +shift3,2,int3,2 with --select / --exchange (default 32,2; 0 off)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--issue14", action="store_true",
                    help="only the issue-14 table: plan --budget <bytes of --preset w4a8> vs uniform --preset w4a8")
    ap.add_argument("--issue14-candidates", default="", type=lambda t: [c for c in t.split(" ") if c],
                    help="--issue14: more candidate lists to plan with besides the default (space-separated)")
    ap.add_argument("--holdout", type=int, default=autoplan.HOLDOUT, help="--issue14: qcompiler plan --holdout")
    args = ap.parse_args()
    if args.issue14:
        res14 = []
        for key in [k for k in args.models.split(",") if k]:
            res14.append(run_issue14(key, args))
            if args.json:
                args.json.write_text(json.dumps(res14, indent=2, default=str) + "\n")
        print(markdown_issue14(res14, args))
        return
    results = []
    for key in [k for k in args.models.split(",") if k]:
        results.append(run_model(key, args))
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(markdown(results, args))


if __name__ == "__main__":
    main()
