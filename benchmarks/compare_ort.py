#!/usr/bin/env python
"""qcompiler against onnxruntime's ``quantize_static``, side by side on the same calibration samples.

    python benchmarks/compare_ort.py ppocr_cls                       # or ppocr_rec, silero_vad
    python benchmarks/compare_ort.py MODEL.onnx --calib-data CALIB --eval-data EVAL   # any model
    python benchmarks/compare_ort.py ppocr_rec --mode speed --repeat 1    # issue 15: time / RSS vs onnxruntime
    python benchmarks/compare_ort.py silero_vad --mode calib-rss     # calibration peak RSS, 64 vs 256 samples
    python benchmarks/compare_ort.py --mode conv-fixture             # models/conv_bn_relu.onnx latency
    python benchmarks/compare_ort.py ppocr_cls --mode all --json out.json
    python benchmarks/compare_ort.py ppocr_cls --target ort-qop --ort-format QOperator   # integer-op files

Mode ``compare`` (default), for one model:

* **qcompiler**: ``compile_model`` with the plan given by ``--plan`` (default: the default W8A8 plan) and the
  calibration feeds as a folder of ``.npz`` files (``--calib FOLDER``); validation off (it is not part of
  compiling; ``qcompiler compile`` validates on top when given data).
* **onnxruntime**: opset upgraded to 13 when lower (per-channel QDQ needs it), ``quant_pre_process(
  skip_symbolic_shape=True)``, ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations) with
  each calibrator of ``--ort-methods`` (MinMax is its default); plus MinMax restricted to Conv/MatMul.
  The time counted includes the upgrade and the pre-processing (``--ort-symbolic-shapes``: the pre-processing at
  its defaults, symbolic shape inference included, which fails on the PP-OCR models). ``--target ort-qop --ort-format QOperator``
  compares the files that hold onnxruntime's integer operators (QLinearConv, ...) instead of QDQ.

Each compile runs ``--repeat`` times, each time in its own process: compile seconds are the median of the
in-process compile call (imports excluded; CPU seconds of the process over the call in parentheses), peak RSS
the largest high-water mark (``VmHWM``) of those processes, read by each process itself, so peaks of different
runs never mix. (``ru_maxrss`` from ``wait4`` / ``RUSAGE_CHILDREN`` would not do: Linux carries the parent's
high-water mark into a child across ``fork``/``exec``.) ``--mem-limit-gb`` kills a compile that grows beyond it.
All models are then scored on the held-back evaluation feeds (``eval`` split: other photos, words, voices
and seeds than the calibration feeds): SQNR of every graph output against the float model, the task agreement
(top-1 for the angle classifier; per-position argmax and whole-line greedy CTC for the recognizer; speech
decision p > 0.5 for the VAD), the file bytes, and the onnxruntime CPU latency (``--threads`` intra-op
threads, sequential executor, warm-up, then the median over interleaved rounds) on the first evaluation feed.

Mode ``speed`` (issue 15), for one model: compile time and peak RSS, ``--repeat`` runs each: qcompiler's
default plan with validation (as ``qcompiler compile --calib`` does) and without (``--no-validate``) against
onnxruntime MinMax, and ``--preset w8a8`` (without validation) against onnxruntime Percentile, each pair
scored on the evaluation feeds (output SQNR); prints the issue's "Done means" ratios and whether each is met.

Mode ``calib-rss``: qcompiler's (and onnxruntime MinMax's) compile peak RSS with ``--rss-samples`` (64,256)
calibration samples; qcompiler's calibration is streaming, so its peak must not grow.

Mode ``conv-fixture``: ``models/conv_bn_relu.onnx`` compiled with its sample file; latency float vs compiled at
batch 1 and ``--batch``.

The tables are printed in Markdown; ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

WORKER_FLAG = "--worker"
TARGETS = {
    "bytes_ratio": 0.30,  # qcompiler file bytes <= 0.30 x fp32
    "compile_ratio": 0.5,  # qcompiler compile seconds <= 0.5 x onnxruntime's (default, with pre-processing)
    "latency_ratio": 1.0,  # qcompiler latency <= float
    "rss_growth": 0.05,  # peak RSS with 256 samples <= 1.05 x with 64
}


# ============================================================================================== worker
def _worker(spec: dict[str, Any]) -> None:
    """One compile in this (fresh) process; prints ``RESULT {json}`` as its last line."""
    import onnx  # noqa: F401  (imported before the baseline, as both tools need it)
    import onnxruntime

    tool = spec["tool"]
    if tool == "qcompiler":  # each tool's own modules are imported before the clock starts
        from qcompiler.api import CompileOptions, compile_model
        from qcompiler.core.registry import registry
        from qcompiler.runtime_targets import targets

        registry()  # the built-in pass modules (onnxruntime.quantization's are imported below for the other)
        targets()  # and the runtime targets' modules
    else:
        import onnxruntime.quantization  # noqa: F401
    import resource

    baseline = C.self_peak_rss_mb()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    if tool == "qcompiler":
        res = compile_model(spec["model"], spec["out"],
                            CompileOptions(plan=spec.get("plan") or "default", calib=spec["calib"],
                                           validate=bool(spec.get("validate", False)),
                                           target=spec.get("target", "ort"),
                                           compact_names=bool(spec.get("compact_names"))))
        passes: dict[str, float] = {}
        for r in res.records:
            name, k = r.name, 2
            while name in passes:
                name, k = f"{r.name}#{k}", k + 1
            passes[name] = round(r.seconds, 3)
        info["passes"] = passes
        info["calibration"] = res.report.get("calibration", {})
    else:
        info["phases"] = C.ort_quantize(spec["model"], spec["out"], spec["calib"], method=spec["method"],
                                        op_types=spec.get("op_types"), workdir=spec.get("workdir"),
                                        per_channel=not spec.get("per_tensor"),
                                        quant_format=spec.get("quant_format", "QDQ"),
                                        symbolic_shapes=bool(spec.get("symbolic_shapes")))
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    print("RESULT " + json.dumps({"seconds": seconds, "cpu_seconds": cpu, "baseline_rss_mb": baseline,
                                  "peak_rss_mb": C.self_peak_rss_mb(), **info}), flush=True)


def _run_once(spec: dict[str, Any], mem_limit_mb: float | None) -> dict[str, Any]:
    """One compile in a fresh process; ``error`` set on failure."""
    Path(spec["out"]).unlink(missing_ok=True)
    child = C.run_child([sys.executable, __file__, WORKER_FLAG, json.dumps(spec)], mem_limit_mb=mem_limit_mb)
    line = next((ln for ln in reversed(child.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if child.returncode != 0 or line is None:
        if child.killed_for_memory:
            why = f"killed above the {(mem_limit_mb or 0) / 1024:.0f} GB memory limit after {child.seconds:.0f} s"
        else:
            lines = [ln for ln in child.stderr.strip().splitlines() if ln.strip()]
            why = lines[-1].strip() if lines else f"exit code {child.returncode}"
        return {"error": why[:300], "peak_rss_mb": child.polled_rss_mb, "process_seconds": child.seconds}
    r: dict[str, Any] = json.loads(line[len("RESULT "):])  # peak_rss_mb: the child's own VmHWM
    r["process_seconds"] = child.seconds
    return r


def _summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median / min seconds, median CPU seconds, largest peak RSS over the runs of one tool."""
    bad = next((r for r in runs if "error" in r), None)
    if bad is not None:
        return bad
    out = dict(runs[-1])
    out["seconds"] = statistics.median(r["seconds"] for r in runs)
    out["min_seconds"] = min(r["seconds"] for r in runs)
    out["seconds_runs"] = [round(r["seconds"], 3) for r in runs]
    out["cpu_seconds"] = statistics.median(r["cpu_seconds"] for r in runs)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    out["baseline_rss_mb"] = min(r["baseline_rss_mb"] for r in runs)
    return out


def _compile_all(specs: dict[str, dict[str, Any]], repeat: dict[str, int], mem_limit_mb: float | None
                 ) -> dict[str, dict[str, Any]]:
    """Run every spec ``repeat[name]`` times, round-robin (so a burst of load from other processes is spread
    over the tools rather than hitting the runs of one)."""
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in specs}
    for r in range(max(repeat.values())):
        for name, spec in specs.items():
            if r >= repeat[name] or any("error" in x for x in runs[name]):
                continue
            print(f"compiling: {name} (run {r + 1}/{repeat[name]}) ...", file=sys.stderr, flush=True)
            runs[name].append(_run_once(spec, mem_limit_mb))
    return {k: {**_summarize(v), "path": specs[k]["out"]} for k, v in runs.items()}


# ============================================================================================== data
def _task(args: argparse.Namespace, model: str, n_calib: int) -> C.Task:
    if model in C.SCORED_MODELS:
        return C.load_task(model, n_calib, args.eval)
    path = Path(model)
    if not path.is_file():
        raise SystemExit(f"error: {model}: not one of {', '.join(C.SCORED_MODELS)} and not a file")
    if not args.calib_data or not args.eval_data:
        raise SystemExit("error: a model file needs --calib-data and --eval-data (folder of .npz or one .npz "
                         "with a leading sample axis)")
    from qcompiler.report import validate as qv

    calib = list(qv.load_feeds(args.calib_data, str(path)))[:n_calib]
    ev = list(qv.load_feeds(args.eval_data, str(path)))[: args.eval]
    return C.Task(key="custom", model=path, calib=calib, eval=ev, agreement_name="top-1 agreement (output 0)")


def _score(task: C.Task, ref: list[dict[str, np.ndarray]], path: Path) -> C.Score:
    key = task.key if task.key in C.SCORED_MODELS else "custom"
    return C.score(key, ref, C.run_all(path, task.eval), labels=task.labels)


# ============================================================================================ compare
def _fmt(x: float | None, spec: str = ".2f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def compare(args: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    task = _task(args, model, args.samples)
    calib_dir = C.write_feeds(task.calib, work / "calib")
    fp32 = Path(task.model)
    fp32_bytes = fp32.stat().st_size
    print(f"\n## {model}: {fp32.name} ({fp32_bytes / 1e6:.2f} MB), {len(task.calib)} calibration samples, "
          f"{len(task.eval)} evaluation samples\n", flush=True)

    specs: dict[str, dict[str, Any]] = {
        "qcompiler": {"tool": "qcompiler", "model": str(fp32), "out": str(work / "qcompiler.onnx"),
                      "calib": str(calib_dir), "plan": args.plan, "target": args.target,
                      "compact_names": args.compact_names}}
    repeat = {"qcompiler": args.repeat}
    variants: list[tuple[str, str, list[str] | None]] = [(f"ort {m}", m, None) for m in args.ort_methods]
    if args.ort_convmatmul:
        variants.append(("ort MinMax Conv/MatMul only", "MinMax", ["Conv", "MatMul"]))
    for name, method, op_types in variants:
        out = work / (name.replace(" ", "_").replace("/", "_") + ".onnx")
        specs[name] = {"tool": "ort", "model": str(fp32), "out": str(out), "calib": str(calib_dir),
                       "method": method, "op_types": op_types, "workdir": str(work),
                       "quant_format": args.ort_format, "symbolic_shapes": args.ort_symbolic_shapes,
                       "per_tensor": args.ort_per_tensor}
        repeat[name] = args.repeat if (method == "MinMax" and op_types is None) else 1  # the default: timed
    tools = _compile_all(specs, repeat, args.mem_limit_mb)

    print("scoring on the evaluation feeds ...", file=sys.stderr, flush=True)
    ref = C.run_all(fp32, task.eval)
    for t in tools.values():
        if "error" in t:
            continue
        try:
            s = _score(task, ref, Path(t["path"]))
        except Exception as e:  # a quantized model onnxruntime refuses to run
            t["error"] = f"does not run in onnxruntime: {str(e).strip().splitlines()[0][:200]}"
            continue
        t.update(sqnr=s.sqnr, primary=s.primary, agreement=s.agreement, extra=s.extra,
                 bytes=Path(t["path"]).stat().st_size)
        t["bytes_ratio"] = t["bytes"] / fp32_bytes
    f_extra = C.score(task.key if task.key in C.SCORED_MODELS else "custom", ref, ref, labels=task.labels).extra

    print("measuring latency ...", file=sys.stderr, flush=True)
    lat_models = {"float": str(fp32), **{k: t["path"] for k, t in tools.items() if "error" not in t}}
    lat = C.latency_ms(lat_models, task.eval[0], threads=args.threads, rounds=args.rounds)
    for k, t in tools.items():
        if k in lat:
            t["latency"] = lat[k]
            t["latency_ratio"] = lat[k]["median"] / lat["float"]["median"]

    ort_ok = {k: t for k, t in tools.items() if k.startswith("ort ") and "error" not in t and "sqnr" in t}
    calibrators = {k: t for k, t in ort_ok.items() if "Conv/MatMul" not in k}
    best = max(calibrators, key=lambda k: calibrators[k]["sqnr"][calibrators[k]["primary"]], default=None)
    default = "ort MinMax" if "ort MinMax" in ort_ok else None

    # ---------------------------------------------------------------------------------------- table
    rows = [["float (fp32)", "-", "-", "-", "-", "inf", "", "100.0%", f"{fp32_bytes:,}", "1.000",
             _fmt(lat["float"]["median"], ".3f"), "1.00"]]
    for name, t in tools.items():
        label = name + (" (default)" if name == default else "") + (" (best calibrator)" if name == best else "")
        if "error" in t:
            rows.append([label, _fmt(t.get("process_seconds"), ".1f"), "", "", _fmt(t.get("peak_rss_mb"), ".0f"),
                         "failed: " + t["error"], "", "", "", "", "", ""])
            continue
        others = ", ".join(f"{k} {_fmt(v)}" for k, v in t["sqnr"].items() if k != t["primary"])
        rows.append([label, f"{t['seconds']:.2f}", f"{t['min_seconds']:.2f}", f"{t['cpu_seconds']:.2f}",
                     _fmt(t["peak_rss_mb"], ".0f"), _fmt(t["sqnr"][t["primary"]]),
                     others, f"{100 * t['agreement']:.1f}%", f"{t['bytes']:,}", _fmt(t["bytes_ratio"], ".3f"),
                     _fmt(t["latency"]["median"], ".3f"), _fmt(t["latency_ratio"], ".2f")])
    primary = next((t["primary"] for t in tools.values() if "primary" in t), "output 0")
    headers = ["tool", "compile s (median)", "min s", "CPU s", "peak RSS MB", f"SQNR dB ({primary})", "other outputs SQNR dB",
               task.agreement_name, "file bytes", "x fp32", f"latency ms ({args.threads} thr)", "x float"]
    print(C.fmt_table(headers, rows, align_right=lambda i: i not in (0, 6)))
    extras = {k: {n: v for n, v in t["extra"].items() if "(float)" not in n} for k, t in tools.items()
              if t.get("extra")}
    keys = sorted({k for e in extras.values() for k in e})
    f_only = {k: v for k, v in f_extra.items() if "(float)" in k}
    if f_only:
        print("\nfloat model: " + ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in f_only.items()))
    if keys:
        print()
        print(C.fmt_table(["tool", *keys], [[n, *[_fmt(e.get(k), ".3f") for k in keys]] for n, e in extras.items()]))
    q = tools["qcompiler"]
    if "passes" in q:
        print("\nqcompiler passes (s, last run): " + ", ".join(f"{k} {v:.2f}" for k, v in q["passes"].items()))
    for k, t in ort_ok.items():
        if "phases" in t:
            print(f"{k} phases (s, last run): " + ", ".join(f"{p} {v:.2f}" for p, v in t["phases"].items()))
    print(f"latency input: {', '.join(f'{n} {list(a.shape)}' for n, a in task.eval[0].items())}; "
          f"float p10/p90 {lat['float']['p10']:.3f}/{lat['float']['p90']:.3f} ms")

    checks = _targets(q, tools.get(default) if default else None, tools.get(best) if best else None)
    print("\ntargets (issue 2, 'Done means'):")
    for c in checks:
        print(f"- {'MET ' if c['met'] else 'MISS'}  {c['what']}: {c['detail']}")
    return {"model": model, "fp32_bytes": fp32_bytes, "float_latency": lat["float"], "float_extra": f_extra,
            "tools": tools, "ort_default": default, "ort_best": best, "targets": checks,
            "calib_samples": len(task.calib), "eval_samples": len(task.eval)}


def _targets(q: dict[str, Any], ort: dict[str, Any] | None, best: dict[str, Any] | None) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    if "error" in q:
        return [{"what": "qcompiler compiles", "met": False, "detail": q["error"]}]
    p = q["primary"]
    if ort is not None and "sqnr" in ort:
        checks.append({"what": "output SQNR >= onnxruntime default", "met": q["sqnr"][p] >= ort["sqnr"][p],
                       "detail": f"{q['sqnr'][p]:.2f} dB vs {ort['sqnr'][p]:.2f} dB ({p})"})
        checks.append({"what": "task agreement >= onnxruntime default", "met": q["agreement"] >= ort["agreement"],
                       "detail": f"{100 * q['agreement']:.1f}% vs {100 * ort['agreement']:.1f}%"})
        ratio = q["seconds"] / ort["seconds"]
        cpu_ratio = q["cpu_seconds"] / ort["cpu_seconds"]
        checks.append({"what": f"compile time <= {TARGETS['compile_ratio']} x onnxruntime's (with pre-processing)",
                       "met": ratio <= TARGETS["compile_ratio"],
                       "detail": f"median {q['seconds']:.2f} s vs {ort['seconds']:.2f} s = {ratio:.2f}x (fastest runs "
                                 f"{q['min_seconds'] / ort['min_seconds']:.2f}x, CPU time {cpu_ratio:.2f}x)"})
    if best is not None and "sqnr" in best:
        checks.append({"what": "output SQNR >= onnxruntime's best calibrator", "met": q["sqnr"][p] >= best["sqnr"][p],
                       "detail": f"{q['sqnr'][p]:.2f} dB vs {best['sqnr'][p]:.2f} dB"})
    checks.append({"what": f"file bytes <= {TARGETS['bytes_ratio']} x fp32",
                   "met": q["bytes_ratio"] <= TARGETS["bytes_ratio"],
                   "detail": f"{q['bytes']:,} B = {q['bytes_ratio']:.3f}x"})
    checks.append({"what": "compiled no slower than float (onnxruntime CPU)",
                   "met": q["latency_ratio"] <= TARGETS["latency_ratio"],
                   "detail": f"{q['latency']['median']:.3f} ms vs float = {q['latency_ratio']:.2f}x"})
    return checks


# ================================================================================================ speed
SPEED = {"default": 1.0, "default --no-validate": 0.5, "w8a8": 1.0, "rss": 1.0, "sqnr_db": 0.3}


def speed(args: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    """Issue 15: qcompiler default (validated / not) vs onnxruntime MinMax, w8a8 vs onnxruntime Percentile."""
    task = _task(args, model, args.samples)
    calib_dir = C.write_feeds(task.calib, work / "calib")
    fp32 = Path(task.model)
    print(f"\n## {model}: compile speed, {len(task.calib)} calibration samples, {args.repeat} run(s) each\n",
          flush=True)
    q = {"tool": "qcompiler", "model": str(fp32), "calib": str(calib_dir), "target": args.target}
    o = {"tool": "ort", "model": str(fp32), "calib": str(calib_dir), "workdir": str(work), "op_types": None,
         "quant_format": args.ort_format, "symbolic_shapes": args.ort_symbolic_shapes,
         "per_tensor": args.ort_per_tensor}
    specs: dict[str, dict[str, Any]] = {
        "qcompiler default": {**q, "out": str(work / "q_default.onnx"), "validate": True},
        "qcompiler default --no-validate": {**q, "out": str(work / "q_default_nv.onnx")},
        # the default a user gets since the measured default became it: no plan, real calibration data
        "qcompiler measured default": {**q, "out": str(work / "q_auto.onnx"), "plan": "auto", "validate": True},
        "qcompiler measured default --no-validate": {**q, "out": str(work / "q_auto_nv.onnx"), "plan": "auto"},
        "qcompiler w8a8": {**q, "out": str(work / "q_w8a8.onnx"), "plan": "w8a8"},
        "ort MinMax": {**o, "out": str(work / "ort_minmax.onnx"), "method": "MinMax"},
        "ort Percentile": {**o, "out": str(work / "ort_percentile.onnx"), "method": "Percentile"}}
    tools = _compile_all(specs, {k: args.repeat for k in specs}, args.mem_limit_mb)
    print("scoring on the evaluation feeds ...", file=sys.stderr, flush=True)
    ref = C.run_all(fp32, task.eval)
    for t in tools.values():
        if "error" not in t:
            s = _score(task, ref, Path(t["path"]))
            t.update(sqnr=s.sqnr, primary=s.primary)
    rows = []
    for name, t in tools.items():
        if "error" in t:
            rows.append([name, "failed: " + t["error"], "", "", "", ""])
            continue
        rows.append([name, f"{t['seconds']:.2f}", f"{t['min_seconds']:.2f}", f"{t['cpu_seconds']:.2f}",
                     _fmt(t["peak_rss_mb"], ".0f"), _fmt(t["sqnr"][t["primary"]])])
    print(C.fmt_table(["tool", "compile s (median)", "min s", "CPU s", "peak RSS MB", "SQNR dB"], rows,
                      align_right=lambda i: i != 0))
    checks: list[dict[str, Any]] = []

    def ratio(a: str, b: str, limit: float, what: str) -> None:
        ta, tb = tools[a], tools[b]
        if "error" in ta or "error" in tb:
            checks.append({"what": what, "met": False, "detail": "a compile failed"})
            return
        r = ta["seconds"] / tb["seconds"]
        checks.append({"what": what, "met": r <= limit, "ratio": r,
                       "detail": f"{ta['seconds']:.2f} s vs {tb['seconds']:.2f} s = {r:.2f}x (limit {limit}x)"})

    ratio("qcompiler default", "ort MinMax", SPEED["default"], "--plan default (validated) <= 1.0x ort MinMax")
    ratio("qcompiler default --no-validate", "ort MinMax", SPEED["default --no-validate"],
          "--plan default --no-validate <= 0.5x ort MinMax")
    ratio("qcompiler measured default", "ort MinMax", SPEED["default"],
          "measured default (validated) <= 1.0x ort MinMax")
    ratio("qcompiler measured default --no-validate", "ort MinMax", SPEED["default --no-validate"],
          "measured default --no-validate <= 0.5x ort MinMax")
    ratio("qcompiler w8a8", "ort Percentile", SPEED["w8a8"], "w8a8 <= 1.0x ort Percentile")
    w, p = tools["qcompiler w8a8"], tools["ort Percentile"]
    if "sqnr" in w and "sqnr" in p:
        d = w["sqnr"][w["primary"]] - p["sqnr"][p["primary"]]
        checks.append({"what": "w8a8 SQNR >= ort Percentile - 0.3 dB", "met": d >= -SPEED["sqnr_db"],
                       "detail": f"{w['sqnr'][w['primary']]:.2f} vs {p['sqnr'][p['primary']]:.2f} dB ({d:+.2f})"})
        r = w["peak_rss_mb"] / p["peak_rss_mb"]
        checks.append({"what": "w8a8 peak RSS <= 1.0x ort Percentile", "met": r <= SPEED["rss"],
                       "detail": f"{w['peak_rss_mb']:.0f} vs {p['peak_rss_mb']:.0f} MB = {r:.2f}x"})
    print("\ntargets (issue 15, 'Done means'):")
    for c in checks:
        print(f"- {'MET ' if c['met'] else 'MISS'}  {c['what']}: {c['detail']}")
    return {"model": model, "tools": tools, "targets": checks, "calib_samples": len(task.calib)}


# ============================================================================================ calib-rss
def calib_rss(args: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    counts = sorted(args.rss_samples)
    task = _task(args, model, max(counts))
    print(f"\n## {model}: compile peak RSS vs calibration samples\n", flush=True)
    rows: list[list[str]] = []
    res: dict[str, dict[int, dict[str, Any]]] = {}
    for tool in ("qcompiler", "ort MinMax"):
        res[tool] = {}
        for n in counts:
            folder = work / f"calib{n}"
            if not folder.exists():
                C.write_feeds(task.calib[:n], folder)
            out = work / f"rss_{tool.split()[0]}_{n}.onnx"
            print(f"{tool} with {n} samples ...", file=sys.stderr, flush=True)
            spec: dict[str, Any] = {"tool": "qcompiler" if tool == "qcompiler" else "ort", "model": str(task.model),
                                    "out": str(out), "calib": str(folder), "plan": args.plan, "method": "MinMax",
                                    "workdir": str(work)}
            res[tool][n] = _summarize([_run_once(spec, args.mem_limit_mb)])
    for tool, by_n in res.items():
        lo, hi = by_n[counts[0]], by_n[counts[-1]]
        growth = (hi["peak_rss_mb"] / lo["peak_rss_mb"] - 1.0) if lo.get("peak_rss_mb") else math.nan
        cells = [tool]
        for n in counts:
            r = by_n[n]
            cells.append("failed: " + r["error"] if "error" in r else
                         f"{r['peak_rss_mb']:.0f} MB (+{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} over imports), "
                         f"{r['seconds']:.2f} s")
        cells.append(f"{100 * growth:+.1f}%")
        rows.append(cells)
    print(C.fmt_table(["tool", *[f"{n} samples" for n in counts], f"growth {counts[0]}->{counts[-1]}"], rows,
                      align_right=lambda i: False))
    q_lo, q_hi = res["qcompiler"][counts[0]], res["qcompiler"][counts[-1]]
    checks = []
    if "error" not in q_lo and "error" not in q_hi:
        g = q_hi["peak_rss_mb"] / q_lo["peak_rss_mb"] - 1.0
        checks.append({"what": f"qcompiler calibration peak RSS flat {counts[0]}->{counts[-1]} samples "
                               f"(growth <= {100 * TARGETS['rss_growth']:.0f}%)", "met": g <= TARGETS["rss_growth"],
                       "detail": f"{q_lo['peak_rss_mb']:.0f} MB -> {q_hi['peak_rss_mb']:.0f} MB ({100 * g:+.1f}%)"})
    print("\ntargets:")
    for c in checks:
        print(f"- {'MET ' if c['met'] else 'MISS'}  {c['what']}: {c['detail']}")
    return {"model": model, "samples": counts, "runs": {k: {str(n): v for n, v in d.items()} for k, d in res.items()},
            "targets": checks}


# ========================================================================================= conv fixture
def conv_fixture(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from qcompiler.api import CompileOptions, compile_model

    src = C.REPO / "models" / "conv_bn_relu.onnx"
    data = C.REPO / "models" / "conv_bn_relu.npz"
    out = work / "conv_bn_relu.q.onnx"
    compile_model(src, out, CompileOptions(plan=args.plan or "default", calib=str(data), validate=False))
    with np.load(data) as z:
        x = z["input"]  # [S, 1, 3, 32, 32]
    print(f"\n## models/conv_bn_relu.onnx: float vs compiled latency ({args.threads} thread(s))\n", flush=True)
    rows, res = [], {}
    for b in sorted({1, args.batch}):
        reps = -(-b // x.shape[0])
        feed = {"input": np.ascontiguousarray(np.concatenate([x] * reps, axis=0)[:b, 0])}
        lat = C.latency_ms({"float": str(src), "compiled": str(out)}, feed, threads=args.threads, rounds=args.rounds)
        ratio = lat["compiled"]["median"] / lat["float"]["median"]
        res[b] = {"float": lat["float"], "compiled": lat["compiled"], "ratio": ratio}
        rows.append([str(b), f"{lat['float']['median']:.3f}", f"{lat['compiled']['median']:.3f}", f"{ratio:.2f}",
                     f"{lat['float']['median'] / lat['compiled']['median']:.2f}x"])
    print(C.fmt_table(["batch", "float ms", "compiled ms", "compiled / float", "speed-up"], rows))
    from qcompiler import ir

    ops = ir.optimized_op_types(out)
    print(f"\nonnxruntime runs: {', '.join(f'{k} {v}' for k, v in sorted(ops.items()))}")
    b = args.batch
    checks = [{"what": f"compiled Conv fixture faster than fp32 at batch {b}", "met": res[b]["ratio"] < 1.0,
               "detail": f"compiled / float = {res[b]['ratio']:.2f}"}]
    print("\ntargets:")
    for c in checks:
        print(f"- {'MET ' if c['met'] else 'MISS'}  {c['what']}: {c['detail']}")
    return {"batches": {str(k): v for k, v in res.items()}, "optimized_ops": ops, "targets": checks}


# ================================================================================================ main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        _worker(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help=f"{' | '.join(C.SCORED_MODELS)} | path/to/model.onnx")
    ap.add_argument("--mode", default="compare", choices=("compare", "speed", "calib-rss", "conv-fixture", "all"))
    ap.add_argument("--plan", help="qcompiler plan (file or preset); default: the default plan")
    ap.add_argument("--compact-names", action="store_true", help="qcompiler: compile with --compact-names")
    ap.add_argument("--target", default="ort", help="qcompiler target (default ort; ort-qop writes onnxruntime's "
                                                     "integer ops)")
    ap.add_argument("--ort-symbolic-shapes", action="store_true",
                    help="onnxruntime's quant_pre_process at its defaults (symbolic shape inference; fails on the "
                         "PP-OCR models) instead of skip_symbolic_shape=True")
    ap.add_argument("--ort-per-tensor", action="store_true",
                    help="onnxruntime: per-tensor weights (magika: onnxruntime 1.32's per-channel quantize_static "
                         "raises in its int32-bias scale adjustment)")
    ap.add_argument("--ort-format", default="QDQ", choices=("QDQ", "QOperator"),
                    help="onnxruntime quantize_static quant_format (default QDQ; QOperator to compare with ort-qop)")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    ap.add_argument("--eval", type=int, default=48, help="held-back evaluation samples (default 48)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for latency (default 1)")
    ap.add_argument("--repeat", type=int, default=3, help="compile runs per tool for the timing (default 3)")
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds (x20 runs per model, default 15)")
    ap.add_argument("--ort-methods", default=",".join(C.ORT_METHODS),
                    help="onnxruntime calibrators to run (default MinMax,Entropy,Percentile)")
    ap.add_argument("--no-ort-convmatmul", dest="ort_convmatmul", action="store_false",
                    help="skip onnxruntime MinMax restricted to Conv/MatMul")
    ap.add_argument("--rss-samples", default="64,256", help="calib-rss mode: sample counts (default 64,256)")
    ap.add_argument("--batch", type=int, default=32, help="conv-fixture mode: batch (default 32)")
    ap.add_argument("--calib-data", help="model file: calibration feeds (folder of .npz or one stacked .npz)")
    ap.add_argument("--eval-data", help="model file: evaluation feeds (folder of .npz or one stacked .npz)")
    ap.add_argument("--mem-limit-gb", type=float, default=8.0, help="kill a compile above this RSS (default 8)")
    ap.add_argument("--workdir", help="keep the compiled models here (default: a temporary folder)")
    ap.add_argument("--json", help="write all numbers here")
    args = ap.parse_args(argv)
    args.ort_methods = [m.strip() for m in args.ort_methods.split(",") if m.strip()]
    bad = [m for m in args.ort_methods if m not in C.ORT_METHODS]
    if bad:
        ap.error(f"--ort-methods: unknown {bad[0]} (known: {', '.join(C.ORT_METHODS)})")
    args.rss_samples = [int(n) for n in args.rss_samples.split(",")]
    args.mem_limit_mb = args.mem_limit_gb * 1024.0
    if args.mode != "conv-fixture" and not args.model:
        ap.error(f"MODEL is required for --mode {args.mode}")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="compare_ort."))
    work.mkdir(parents=True, exist_ok=True)
    mach = C.machine()
    print(f"machine: {mach['cpu']}, {mach['cores']} cores ({mach['isa']}); {mach['os']}; python {mach['python']}, "
          f"onnx {mach['onnx']}, onnxruntime {mach['onnxruntime']}, numpy {mach['numpy']}, "
          f"qcompiler {mach['qcompiler']}; {mach['date']}; load average {mach['loadavg']}")
    print("command: python benchmarks/compare_ort.py " + " ".join(argv))
    result: dict[str, Any] = {"machine": mach, "argv": argv}
    try:
        if args.mode in ("compare", "all"):
            result["compare"] = compare(args, args.model, work / "compare")
        if args.mode == "speed":
            result["speed"] = speed(args, args.model, work / "speed")
        if args.mode in ("calib-rss", "all"):
            result["calib_rss"] = calib_rss(args, args.model, work / "rss")
        if args.mode in ("conv-fixture", "all"):
            result["conv_fixture"] = conv_fixture(args, work / "fixture")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        C.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
