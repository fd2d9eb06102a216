#!/usr/bin/env python
"""Activation calibration methods, and ``calibration: auto``, on the real models.

    python benchmarks/calibration_methods.py                      # ppocr_cls, silero_vad, ppocr_rec
    python benchmarks/calibration_methods.py --models silero_vad --samples 64

For each model: the default W8A8 plan (int8 per-channel weights, uint8 per-tensor activations) compiled with each
activation calibration method — minmax, percentile (99.99), entropy, mse — and with ``auto`` (the calibrate pass
measures the four on held-out calibration samples and keeps the best), on the same ``--samples`` calibration
samples; each file scored on the held-back evaluation samples (``eval`` split: other photos, words, voices):
output SQNR against the float model, the task agreement, and the in-process compile seconds. For ``auto`` also
the held-out SQNR it measured per method and its choice.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

from qcompiler.api import CompileOptions, compile_model
from qcompiler.plan import Plan

METHODS = ("minmax", "percentile", "entropy", "mse", "auto")


def _plan(method: str) -> Plan:
    return Plan.from_dict({"version": 1, "defaults": {
        "weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": True},
        "activation": {"dtype": "uint8", "granularity": "per_tensor", "symmetric": False, "calibration": method}},
        "rules": []})


def run_model(key: str, samples: int, work: Path) -> None:
    task = C.load_task(key, samples)
    calib = C.write_feeds(task.calib, work / f"{key}_calib")
    ref = C.run_all(task.model, task.eval)
    rows = []
    auto_info = None
    for method in METHODS:
        out = work / f"{key}.{method}.onnx"
        t0 = time.perf_counter()
        res = compile_model(task.model, out, CompileOptions(plan=_plan(method), calib=str(calib), validate=False))
        seconds = time.perf_counter() - t0
        s = C.score(key, ref, C.run_all(out, task.eval), labels=task.labels)
        if method == "auto":
            auto_info = res.report["calibration"]["auto"]
        rows.append((method, s.primary_sqnr, s.agreement, seconds))
    print(f"\n#### {key}: {len(task.calib)} calibration samples, {len(task.eval)} held-back evaluation samples\n")
    print(f"| calibration | output SQNR dB | {C.AGREEMENT.get(key, 'agreement')} | compile s |")
    print("|:--|--:|--:|--:|")
    for method, sq, ag, sec in rows:
        label = f"auto → {auto_info['method']}" if method == "auto" and auto_info else method
        print(f"| {label} | {sq:.2f} | {100 * ag:.1f} % | {sec:.2f} |")
    if auto_info:
        print(f"\nauto: held out {auto_info['samples']} calibration samples; their mean output SQNR per method: "
              + ", ".join(f"{m} {v:.2f} dB" for m, v in auto_info["output_sqnr_db"].items())
              + f" → {auto_info['method']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ppocr_cls,silero_vad,ppocr_rec")
    ap.add_argument("--samples", type=int, default=64, help="calibration samples (default 64)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        for key in args.models.split(","):
            run_model(key.strip(), args.samples, Path(td))


if __name__ == "__main__":
    main()
