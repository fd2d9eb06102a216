#!/usr/bin/env python
"""PTQ algorithms and presets against onnxruntime's ``quantize_static``, on the real models.

    python benchmarks/ptq_compare.py                                  # every mode, every real model
    python benchmarks/ptq_compare.py --mode accuracy --models ppocr_cls
    python benchmarks/ptq_compare.py --mode calib-cost --cost-samples 256
    python benchmarks/ptq_compare.py --mode select --mode data-free --json out.json

Modes (``--mode`` may be repeated; default all):

* ``accuracy`` — per model, on the same calibration samples (``--samples``, the ``calib`` split of
  ``tests/realdata.py``) and held-back evaluation samples (``eval`` split; ``--eval``, 200 for the classifier):
  **W8A8**: onnxruntime ``quantize_static`` (opset upgraded to 13, ``quant_pre_process(skip_symbolic_shape=
  True)``, QDQ, per-channel int8 weights, uint8 activations) with MinMax, Entropy and Percentile — when a
  histogram calibrator crashes on inputs of varying shapes (PP-OCR rec), it is retried with the calibration
  inputs zero-padded to the widest — against qcompiler's ``w8a8`` preset and variants (other calibration
  methods, ``equalize``, ``bias_correct``, ``w8a8-cle``). **W4A8**: onnxruntime with int4 per-channel weights
  (QInt4, opset 21) and MinMax, against the ``w4a8`` preset and its ablations (no GPTQ, no bias correction).
  Scores: SQNR of every output against the float model, the task agreement (top-1 for the angle classifier,
  per-position argmax for the recognizer, speech decision p > 0.5 for the VAD), file bytes / fp32 file bytes.
* ``calib-cost`` — calibration with entropy and with percentile on ``--cost-samples`` (256) samples: qcompiler
  (``compile_model``, the w8a8 plan with that calibration method) and onnxruntime (``quantize_static`` with
  ``CalibrationMethod.Entropy`` / ``Percentile``), each compile in a fresh process that reports its own peak
  RSS (``VmHWM``) and the seconds of the compile call. PP-OCR rec inputs are padded to one width for both tools
  (onnxruntime's histogram calibrators need it).
* ``select`` — ``--calib-select N`` out of a pool of ``--pool`` samples against the first N, N random ones
  (median of 3 draws) and the whole pool (PP-OCR cls, w8a8).
* ``data-free`` — ``--calib none`` (ranges from the BatchNorm statistics) against ``--calib random`` and real
  data (PP-OCR cls: w8a8, and w8a8-cle whose bias correction is analytic without data).

Markdown tables on stdout; ``--json`` writes every number; the "targets" lines say met / not met.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

WORKER_FLAG = "--worker"
#: held-back samples. PP-OCR cls: 2000 lines — its softmax output SQNR is set by the few lines nearest the
#: decision boundary (on 200 lines one line carried 43-59 % of the noise; on 2000 the largest share is 14-33 %);
#: the score also reports the first 200 (the earlier protocol) and each quarter of 500
N_EVAL = {"ppocr_cls": 2000, "ppocr_rec": 64, "silero_vad": 64}
#: PP-OCR cls: SQNR also on these slices of the evaluation lines
CLS_SLICES = {"first 200": (0, 200), "lines 0-499": (0, 500), "lines 500-999": (500, 1000),
              "lines 1000-1499": (1000, 1500), "lines 1500-1999": (1500, 2000)}
TARGETS = {"w8a8_margin_db": 3.0, "cls_top1": 0.995, "w4a8_margin_db": 6.0, "rss_ratio": 0.3, "time_ratio": 0.5,
           "file_ratio": 0.30}


# ======================================================================================= onnxruntime
def ort_quantize(model: str | Path, output: str | Path, calib_folder: str | Path, method: str = "MinMax",
                 weight_type: str = "QInt8", workdir: str | Path | None = None) -> dict[str, float]:
    """``quantize_static`` as a user runs it on these models (:func:`_common.ort_quantize`: per-channel QDQ,
    uint8 activations), with the weight type as a parameter: int4 weights (QInt4) upgrade to opset 21."""
    return C.ort_quantize(model, output, calib_folder, method=method, workdir=workdir, weight_type=weight_type)


def padded(feeds: Sequence[C.Feed]) -> list[C.Feed]:
    """Every array zero-padded at the end of each axis to the largest shape among the feeds."""
    out = []
    for f in feeds:
        g = {}
        for k, v in f.items():
            big = np.max([np.asarray(x[k].shape) for x in feeds], axis=0)
            g[k] = np.pad(v, [(0, int(b - s)) for s, b in zip(v.shape, big)])
        out.append(g)
    return out


# ============================================================================================ scoring
def file_ratio(path: Path, float_path: Path) -> float:
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + ".data"))
    return size / float_path.stat().st_size


def evaluate(task: C.Task, ref: list[dict[str, np.ndarray]], path: Path) -> dict[str, Any]:
    q = C.run_all(path, task.eval)
    s = C.score(task.key, ref, q, task.labels)
    slices = {}
    if task.key == "ppocr_cls":
        for name, (a, b) in CLS_SLICES.items():
            if b <= len(ref):
                slices[name] = C.sqnr_db([r[s.primary] for r in ref[a:b]], [x[s.primary] for x in q[a:b]])
    return {"sqnr": s.sqnr, "primary": s.primary, "primary_sqnr": s.primary_sqnr, "agreement": s.agreement,
            "file_ratio": file_ratio(path, task.model), "slices": slices, **{k: v for k, v in s.extra.items()}}


def _plan(preset: str, calibration: str | None = None, algorithms: dict[str, Any] | None = None,
          drop: Sequence[str] = (), ort: dict[str, Any] | None = None) -> Any:
    from qcompiler.plan import load_plan

    p = load_plan(preset)
    if calibration is not None:
        p.activation_defaults = {**p.activation_defaults, "calibration": calibration}
    p.algorithms = {k: v for k, v in {**p.algorithms, **(algorithms or {})}.items() if k not in drop}
    # off even where the default pipeline has it; an algorithm asked for is on even where the preset turns it off
    p.disabled_algorithms = (set(p.disabled_algorithms) - set(algorithms or {})) | set(drop)
    if ort is not None:
        p.target_options = {**p.target_options, "ort": {**p.target_options.get("ort", {}), **ort}}
    p.source = f"{preset} (modified)" if (calibration or algorithms or drop or ort) else p.source
    return p


def ours(task: C.Task, ref: list[dict[str, np.ndarray]], folder: Path, work: Path, tag: str, plan: Any,
         **kw: Any) -> dict[str, Any]:
    from qcompiler.api import CompileOptions, compile_model

    out = work / f"{task.key}.{tag}.onnx"
    t0 = time.perf_counter()
    try:
        res = compile_model(task.model, out, CompileOptions(plan=plan, calib=str(folder), validate=False, **kw))
    except Exception as e:  # a benchmark row, not a crash
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    r = evaluate(task, ref, out)
    r["seconds"] = time.perf_counter() - t0
    r["pipeline"] = res.pipeline
    return r


def theirs(task: C.Task, ref: list[dict[str, np.ndarray]], folder: Path, work: Path, method: str,
           weight_type: str = "QInt8") -> dict[str, Any]:
    out = work / f"{task.key}.ort.{method}.{weight_type}.onnx"
    try:
        t = ort_quantize(task.model, out, folder, method=method, weight_type=weight_type, workdir=work)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
    r = evaluate(task, ref, out)
    r["seconds"] = t["total"]
    return r


def _fmt_row(name: str, r: dict[str, Any]) -> list[str]:
    if "error" in r:
        return [name, "failed: " + r["error"][:90], "", "", "", ""]
    others = ", ".join(f"{k} {v:.2f}" for k, v in r["sqnr"].items() if k != r["primary"])
    slices = " / ".join(f"{v:.2f}" for v in r.get("slices", {}).values()) or "-"
    return [name, f"{r['primary_sqnr']:.2f}", f"{100 * r['agreement']:.1f} %", others or "-", f"{r['file_ratio']:.3f}",
            slices]


HEAD = ["quantizer", "output SQNR dB", "agreement", "other outputs (SQNR dB)", "file / fp32",
        "cls: first 200 / 4 × 500 lines (dB)"]


# ============================================================================================ accuracy
def accuracy(args: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    task = C.load_task(model, args.samples, args.eval or N_EVAL[model])
    folder = C.write_feeds(task.calib, work / f"{model}.calib")
    ref = C.run_all(task.model, task.eval)
    print(f"\n### {model}: {len(task.calib)} calibration / {len(task.eval)} held-back samples, "
          f"{task.agreement_name}\n", flush=True)

    rows_w8: dict[str, dict[str, Any]] = {}
    pad_folder: Path | None = None
    for method in C.ORT_METHODS:
        print(f"onnxruntime W8A8 {method} ...", file=sys.stderr, flush=True)
        r = theirs(task, ref, folder, work, method)
        rows_w8[f"onnxruntime {method}"] = r
        if "error" in r and method != "MinMax":
            if pad_folder is None:
                pad_folder = C.write_feeds(padded(task.calib), work / f"{model}.calib-padded")
            rows_w8[f"onnxruntime {method} (calibration inputs padded)"] = theirs(task, ref, pad_folder, work, method)
    variants: list[tuple[str, Any]] = [
        ("qcompiler w8a8 (preset)", _plan("w8a8")),
        ("qcompiler w8a8, minmax", _plan("w8a8", calibration="minmax")),
        ("qcompiler w8a8, entropy", _plan("w8a8", calibration="entropy")),
        ("qcompiler w8a8, mse", _plan("w8a8", calibration="mse")),
        ("qcompiler w8a8 + equalize", _plan("w8a8", algorithms={"equalize": {}})),
        ("qcompiler w8a8 + equalize{ranges=activations}", _plan("w8a8", algorithms={
            "equalize": {"ranges": "activations"}})),
        ("qcompiler w8a8 + bias_correct", _plan("w8a8", algorithms={"bias_correct": {}})),
        ("qcompiler w8a8-cle (equalize + bias_correct)", _plan("w8a8-cle")),
        ("qcompiler w8a8 with fold_bias (the preset before this session)", _plan("w8a8", algorithms={"fold_bias": {}})),
        ("qcompiler w8a8 without gptq", _plan("w8a8", drop=["gptq"])),
        ("qcompiler w8a8 with every Conv output requantized (ort default)", _plan(
            "w8a8", ort={"requantize_conv_outputs": True})),
        ("qcompiler w8a8 without gptq, every Conv output requantized", _plan(
            "w8a8", drop=["gptq"], ort={"requantize_conv_outputs": True})),
    ]
    for name, plan in variants:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows_w8[name] = ours(task, ref, folder, work, name.replace(" ", "_").replace("/", "-"), plan)
    compact = "qcompiler w8a8 (preset) --compact-names"
    print(f"{compact} ...", file=sys.stderr, flush=True)
    rows_w8[compact] = ours(task, ref, folder, work, "w8a8_compact", _plan("w8a8"), compact_names=True)
    print("W8A8\n")
    print(C.fmt_table(HEAD, [_fmt_row(k, v) for k, v in rows_w8.items()], align_right=lambda i: i in (1, 2, 4)))

    rows_w4: dict[str, dict[str, Any]] = {}
    print("onnxruntime W4A8 MinMax ...", file=sys.stderr, flush=True)
    rows_w4["onnxruntime int4 per-channel MinMax"] = theirs(task, ref, folder, work, "MinMax", "QInt4")
    for name, plan in [("qcompiler w4a8 (preset: gptq + bias_correct)", _plan("w4a8")),
                       ("qcompiler w4a8 without bias_correct", _plan("w4a8", drop=["bias_correct"])),
                       ("qcompiler w4a8 without gptq", _plan("w4a8", drop=["gptq"])),
                       ("qcompiler w4a8 round-to-nearest (no algorithms)", _plan("w4a8", drop=["gptq", "bias_correct"]))]:
        print(f"{name} ...", file=sys.stderr, flush=True)
        rows_w4[name] = ours(task, ref, folder, work, name.replace(" ", "_").replace(":", ""), plan)
    print("\nW4A8\n")
    print(C.fmt_table(HEAD, [_fmt_row(k, v) for k, v in rows_w4.items()], align_right=lambda i: i in (1, 2, 4)))

    checks = []
    ort8 = [r for k, r in rows_w8.items() if k.startswith("onnxruntime") and "error" not in r]
    q8 = rows_w8["qcompiler w8a8 (preset)"]
    if ort8 and "error" not in q8:
        best = max(r["primary_sqnr"] for r in ort8)
        checks.append({"what": f"{model} W8A8: preset w8a8 output SQNR >= onnxruntime best + "
                               f"{TARGETS['w8a8_margin_db']:.0f} dB",
                       "met": q8["primary_sqnr"] >= best + TARGETS["w8a8_margin_db"],
                       "detail": f"{q8['primary_sqnr']:.2f} dB vs {best:.2f} dB ({q8['primary_sqnr'] - best:+.2f})"})
        best_any = max(r["primary_sqnr"] for k, r in rows_w8.items() if k.startswith("qcompiler") and "error" not in r)
        for sl in q8.get("slices", {}):
            best_sl = max(r["slices"][sl] for r in ort8)
            checks.append({"what": f"{model} W8A8 ({sl}): preset >= onnxruntime best on the same lines + 3 dB",
                           "met": q8["slices"][sl] >= best_sl + TARGETS["w8a8_margin_db"],
                           "detail": f"{q8['slices'][sl]:.2f} dB vs {best_sl:.2f} dB ({q8['slices'][sl] - best_sl:+.2f})"})
        checks.append({"what": f"{model} W8A8: best qcompiler variant >= onnxruntime best + 3 dB",
                       "met": best_any >= best + TARGETS["w8a8_margin_db"],
                       "detail": f"{best_any:.2f} dB vs {best:.2f} dB ({best_any - best:+.2f})"})
    qc = rows_w8[compact]
    if "error" not in qc:
        checks.append({"what": f"{model} W8A8: file <= {TARGETS['file_ratio']:.2f} x fp32 (preset, --compact-names)",
                       "met": qc["file_ratio"] <= TARGETS["file_ratio"],
                       "detail": f"{qc['file_ratio']:.4f} (without --compact-names {q8.get('file_ratio', float('nan')):.4f}; "
                                 f"output SQNR {qc['primary_sqnr']:.2f} dB, the same model up to names)"})
    if model == "ppocr_cls" and "error" not in q8:
        checks.append({"what": "ppocr_cls W8A8: top-1 agreement >= 99.5 %", "met": q8["agreement"] >= TARGETS["cls_top1"],
                       "detail": f"{100 * q8['agreement']:.1f} % on {len(task.eval)} samples"})
    o4 = rows_w4["onnxruntime int4 per-channel MinMax"]
    q4 = rows_w4["qcompiler w4a8 (preset: gptq + bias_correct)"]
    if "error" not in o4 and "error" not in q4:
        checks.append({"what": f"{model} W4A8: preset w4a8 >= onnxruntime int4 MinMax + "
                               f"{TARGETS['w4a8_margin_db']:.0f} dB",
                       "met": q4["primary_sqnr"] >= o4["primary_sqnr"] + TARGETS["w4a8_margin_db"],
                       "detail": f"{q4['primary_sqnr']:.2f} dB vs {o4['primary_sqnr']:.2f} dB "
                                 f"({q4['primary_sqnr'] - o4['primary_sqnr']:+.2f})"})
    _print_checks(checks)
    return {"model": model, "samples": len(task.calib), "eval": len(task.eval), "w8a8": rows_w8, "w4a8": rows_w4,
            "targets": checks}


def _print_checks(checks: list[dict[str, Any]]) -> None:
    print("\ntargets:")
    for c in checks:
        mark = "n/a " if c["met"] is None else ("MET " if c["met"] else "MISS")
        print(f"- {mark}  {c['what']}: {c['detail']}")


# ========================================================================================== calib cost
def _worker(spec: dict[str, Any]) -> None:
    """One compile in this fresh process; prints ``RESULT {json}`` last."""
    import onnx  # noqa: F401
    import onnxruntime

    if spec["tool"] == "qcompiler":
        from qcompiler.api import CompileOptions, compile_model
        from qcompiler.plan import load_plan
    else:
        import onnxruntime.quantization  # noqa: F401
    baseline = C.self_peak_rss_mb()
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if spec["tool"] == "qcompiler":
        plan = load_plan("w8a8")
        plan.algorithms.pop("gptq", None)  # the calibration's cost, not GPTQ's (onnxruntime has none)
        plan.activation_defaults = {**plan.activation_defaults, "calibration": spec["method"]}
        res = compile_model(spec["model"], spec["out"], CompileOptions(plan=plan, calib=spec["calib"],
                                                                      validate=False))
        extra["calibrate_seconds"] = sum(r.seconds for r in res.records if r.name == "calibrate")
    else:
        C.ort_quantize(spec["model"], spec["out"], spec["calib"], method=spec["method"], workdir=spec["workdir"])
    seconds = time.perf_counter() - t0
    print("RESULT " + json.dumps({"seconds": seconds, "peak_rss_mb": C.self_peak_rss_mb(),
                                  "baseline_rss_mb": baseline, **extra}), flush=True)


def _child(spec: dict[str, Any], mem_limit_mb: float) -> dict[str, Any]:
    child = C.run_child([sys.executable, __file__, WORKER_FLAG, json.dumps(spec)], mem_limit_mb=mem_limit_mb)
    line = next((ln for ln in reversed(child.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if child.returncode != 0 or line is None:
        lines = [ln for ln in child.stderr.strip().splitlines() if ln.strip()]
        why = (f"killed above {mem_limit_mb / 1024:.0f} GB after {child.seconds:.0f} s" if child.killed_for_memory
               else (lines[-1] if lines else f"exit {child.returncode}"))
        return {"error": why[:200], "peak_rss_mb": child.polled_rss_mb, "killed_for_memory": child.killed_for_memory,
                "seconds": child.seconds, "limit_mb": mem_limit_mb}
    return dict(json.loads(line[len("RESULT "):]))


def calib_cost(args: argparse.Namespace, model: str, work: Path) -> dict[str, Any]:
    n = args.cost_samples
    feeds, _ = C.task_inputs(model, n, "calib")
    if model == "ppocr_rec":
        feeds = padded(feeds)
    folder = C.write_feeds(feeds, work / f"{model}.cost{n}")
    del feeds
    src = C.realdata.fetch_model(model)
    print(f"\n### {model}: calibration on {n} samples (compile call in a fresh process)\n", flush=True)
    rows, res, checks = [], {}, []
    for method, ort_method in (("entropy", "Entropy"), ("percentile", "Percentile")):
        for tool in ("qcompiler", "onnxruntime"):
            print(f"{tool} {method} on {n} samples ...", file=sys.stderr, flush=True)
            spec = {"tool": tool, "model": str(src), "out": str(work / f"{model}.cost.{tool}.{method}.onnx"),
                    "calib": str(folder), "method": method if tool == "qcompiler" else ort_method,
                    "workdir": str(work)}
            r = _child(spec, args.mem_limit_gb * 1024)
            res[f"{tool} {method}"] = r
            rows.append([f"{tool} {method}", "failed: " + r["error"] if "error" in r else
                         f"{r['seconds']:.1f} s", "" if "error" in r else f"{r['peak_rss_mb']:.0f} MB",
                         "" if "error" in r else f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f} MB"])
        q, o = res[f"qcompiler {method}"], res[f"onnxruntime {method}"]
        if "error" not in q and o.get("killed_for_memory"):  # onnxruntime's peak and time are lower bounds
            checks.append({"what": f"{model} {method} on {n} samples: peak RSS <= {TARGETS['rss_ratio']} x onnxruntime",
                           "met": q["peak_rss_mb"] <= TARGETS["rss_ratio"] * o["limit_mb"],
                           "detail": f"{q['peak_rss_mb']:.0f} MB vs > {o['limit_mb']:.0f} MB (onnxruntime killed at "
                                     f"the limit; < {q['peak_rss_mb'] / o['limit_mb']:.2f}x)"})
            checks.append({"what": f"{model} {method} on {n} samples: time <= {TARGETS['time_ratio']} x onnxruntime",
                           # vs a lower bound of onnxruntime's time: met when below half of it, else undetermined
                           "met": True if q["seconds"] <= TARGETS["time_ratio"] * o["seconds"] else None,
                           "detail": f"{q['seconds']:.1f} s vs > {o['seconds']:.0f} s (onnxruntime unfinished when "
                                     f"killed; < {q['seconds'] / o['seconds']:.2f}x)"})
        if "error" not in q and "error" not in o:
            checks.append({"what": f"{model} {method} on {n} samples: peak RSS <= {TARGETS['rss_ratio']} x onnxruntime",
                           "met": q["peak_rss_mb"] <= TARGETS["rss_ratio"] * o["peak_rss_mb"],
                           "detail": f"{q['peak_rss_mb']:.0f} MB vs {o['peak_rss_mb']:.0f} MB "
                                     f"({q['peak_rss_mb'] / o['peak_rss_mb']:.2f}x)"})
            checks.append({"what": f"{model} {method} on {n} samples: time <= {TARGETS['time_ratio']} x onnxruntime",
                           "met": q["seconds"] <= TARGETS["time_ratio"] * o["seconds"],
                           "detail": f"{q['seconds']:.1f} s vs {o['seconds']:.1f} s ({q['seconds'] / o['seconds']:.2f}x)"})
    print(C.fmt_table(["compile", "seconds", "peak RSS", "peak RSS over imports"], rows,
                      align_right=lambda i: i > 0))
    _print_checks(checks)
    return {"model": model, "samples": n, "runs": res, "targets": checks}


# =================================================================================== selection, data-free
def select(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model, n = "ppocr_cls", args.select_n
    task = C.load_task(model, args.pool, args.eval or N_EVAL[model])
    ref = C.run_all(task.model, task.eval)
    pool = C.write_feeds(task.calib, work / "select.pool")
    first = C.write_feeds(task.calib[:n], work / "select.first")
    print(f"\n### {model}: {n} calibration samples out of a pool of {len(task.calib)} (w8a8)\n", flush=True)
    from qcompiler.plan import load_plan

    rows: dict[str, dict[str, Any]] = {}
    rows[f"first {n}"] = ours(task, ref, first, work, "sel-first", load_plan("w8a8"))
    draws = []
    for seed in range(3):
        idx = np.random.default_rng(seed).choice(len(task.calib), n, replace=False)
        folder = C.write_feeds([task.calib[i] for i in sorted(idx)], work / f"select.random{seed}")
        draws.append(ours(task, ref, folder, work, f"sel-rand{seed}", load_plan("w8a8")))
    med = sorted(draws, key=lambda r: r.get("primary_sqnr", -math.inf))[1]
    rows[f"{n} random (median of 3 draws: " + ", ".join(f"{d.get('primary_sqnr', math.nan):.2f}" for d in draws)
         + ")"] = med
    rows[f"--calib-select {n} (feature=ranges)"] = ours(task, ref, pool, work, "sel-ranges", load_plan("w8a8"),
                                                        calib_select=n)
    from qcompiler.api import CompileOptions, compile_model

    out = work / "sel-penult.onnx"
    compile_model(task.model, out, CompileOptions(plan="w8a8", calib=str(pool), validate=False, pipeline=(
        "cleanup,fold-batchnorm,fold-scale,fold-bias,cleanup,resolve-plan," f"calib-select{{n={n},feature=penultimate}},"
        "calibrate,insert-qdq,lower")))
    rows[f"calib-select {n} (feature=penultimate)"] = evaluate(task, ref, out)
    rows[f"whole pool ({len(task.calib)})"] = ours(task, ref, pool, work, "sel-all", load_plan("w8a8"))
    print(C.fmt_table(HEAD, [_fmt_row(k, v) for k, v in rows.items()], align_right=lambda i: i in (1, 2, 4)))
    return {"model": model, "n": n, "pool": len(task.calib), "rows": rows}


def data_free(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    model = "ppocr_cls"
    task = C.load_task(model, args.samples, args.eval or N_EVAL[model])
    ref = C.run_all(task.model, task.eval)
    folder = C.write_feeds(task.calib, work / "df.calib")
    print(f"\n### {model}: data-free (--calib none) against random and real calibration data\n", flush=True)
    from qcompiler.api import CompileOptions, compile_model

    rows: dict[str, dict[str, Any]] = {}
    for preset in ("w8a8", "w8a8-cle"):
        for calib in ("none", "random", str(folder)):
            out = work / f"df.{preset}.{Path(calib).name}.onnx"
            compile_model(task.model, out, CompileOptions(preset=preset, calib=calib, validate=False))
            label = {"none": "--calib none", "random": "--calib random"}.get(calib, f"{len(task.calib)} real samples")
            rows[f"{preset}, {label}"] = evaluate(task, ref, out)
    print(C.fmt_table(HEAD, [_fmt_row(k, v) for k, v in rows.items()], align_right=lambda i: i in (1, 2, 4)))
    return {"model": model, "rows": rows}


# ================================================================================================ main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER_FLAG]:
        _worker(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", action="append", choices=("accuracy", "calib-cost", "select", "data-free"))
    ap.add_argument("--models", default=",".join(C.REAL_MODELS), help="comma-separated real models")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    ap.add_argument("--eval", type=int, default=0, help="held-back samples (default: 200 cls, 64 rec / vad)")
    ap.add_argument("--cost-samples", type=int, default=256, help="calib-cost: samples (default 256)")
    ap.add_argument("--pool", type=int, default=256, help="select: pool size (default 256)")
    ap.add_argument("--select-n", type=int, default=32, help="select: samples to keep (default 32)")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0, help="kill a calib-cost compile above this RSS")
    ap.add_argument("--workdir", help="keep the models here (default: a temporary folder)")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args(argv)
    modes = args.mode or ["accuracy", "calib-cost", "select", "data-free"]
    models = [m for m in args.models.split(",") if m]
    results: dict[str, Any] = {"machine": C.machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="ptq_compare.") as td:
        work = Path(args.workdir or td)
        work.mkdir(parents=True, exist_ok=True)
        print(f"machine: {results['machine']['cpu']}, {results['machine']['cores']} cores, onnxruntime "
              f"{results['machine']['onnxruntime']}, numpy {results['machine']['numpy']}")
        if "accuracy" in modes:
            results["accuracy"] = [accuracy(args, m, work) for m in models]
        if "calib-cost" in modes:
            results["calib_cost"] = [calib_cost(args, m, work) for m in models]
        if "select" in modes:
            results["select"] = select(args, work)
        if "data-free" in modes:
            results["data_free"] = data_free(args, work)
    if args.json:
        C.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
