#!/usr/bin/env python
"""Dynamic quantization: qcompiler's ``w8a8-dynamic`` preset against onnxruntime's ``quantize_dynamic``.

    python benchmarks/dynamic_compare.py                        # ppocr_rec, silero_vad, ppocr_cls
    python benchmarks/dynamic_compare.py --models ppocr_rec --rounds 20

Neither tool sees calibration data. For each model: qcompiler ``compile_model(..., preset="w8a8-dynamic")``
(int8 per-channel weights everywhere; MatMul inputs quantized at run time → onnxruntime ``DynamicQuantizeMatMul``;
other ops keep float activations) on the ``ort`` target and on ``ort-qop``; onnxruntime ``quantize_dynamic`` with
its defaults (int8 per-tensor weights; MatMul, Conv → ConvInteger, LSTM → DynamicQuantizeLSTM, ...) and with
``per_channel=True`` (opset upgraded to 13 first, as its per-channel quantization needs). Each file scored on
the held-back evaluation samples (``eval`` split): output SQNR against the float model, the task agreement, file
bytes, compile seconds (in-process) and onnxruntime CPU latency at 1 thread (interleaved rounds, first eval
feed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

from qcompiler.api import CompileOptions, compile_model


def _ort_dynamic(model: Path, out: Path, per_channel: bool, work: Path) -> float:
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import QuantType, quantize_dynamic

    t0 = time.perf_counter()
    src = model
    if per_channel:
        m = onnx.load(str(model))
        opset = next((int(i.version) for i in m.opset_import if i.domain in ("", "ai.onnx")), 1)
        if opset < 13:
            src = work / f"{model.stem}.opset13.onnx"
            onnx.save(version_converter.convert_version(m, 13), str(src))
    quantize_dynamic(str(src), str(out), per_channel=per_channel, weight_type=QuantType.QInt8)
    return time.perf_counter() - t0


def run_model(key: str, args: argparse.Namespace, work: Path) -> None:
    task = C.load_task(key, 1, args.eval)  # no calibration: the one calibration sample is not used
    model = Path(task.model)
    ref = C.run_all(model, task.eval)
    files: dict[str, Path] = {"float (fp32)": model}
    seconds: dict[str, float] = {}
    for target in ("ort", "ort-qop"):
        name = f"qcompiler w8a8-dynamic ({target})"
        out = work / f"{key}.{target}.onnx"
        t0 = time.perf_counter()
        compile_model(model, out, CompileOptions(preset="w8a8-dynamic", target=target, validate=False))
        seconds[name] = time.perf_counter() - t0
        files[name] = out
    for per_channel in (False, True):
        name = f"ort quantize_dynamic{' per_channel' if per_channel else ' (default)'}"
        out = work / f"{key}.ortdyn{int(per_channel)}.onnx"
        try:
            seconds[name] = _ort_dynamic(model, out, per_channel, work)
            files[name] = out
        except Exception as e:  # its failure is a result too
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    lat = C.latency_ms({k: str(v) for k, v in files.items()}, task.eval[0], threads=1, rounds=args.rounds)
    fp32 = model.stat().st_size
    rows: list[list[Any]] = []
    for name, path in files.items():
        s = C.score(key, ref, C.run_all(path, task.eval), labels=task.labels)
        rows.append([name, f"{s.primary_sqnr:.2f}" if name != "float (fp32)" else "inf", f"{100 * s.agreement:.1f} %",
                     f"{path.stat().st_size:,}", f"{path.stat().st_size / fp32:.3f}",
                     f"{seconds[name]:.2f}" if name in seconds else "-", f"{lat[name]['median']:.3f}",
                     f"{lat[name]['median'] / lat['float (fp32)']['median']:.2f}"])
    print(f"\n#### {key}: {model.name}, {len(task.eval)} held-back evaluation samples, no calibration data\n")
    print(C.fmt_table(["tool", "SQNR dB", C.AGREEMENT.get(key, "agreement"), "file bytes", "x fp32", "compile s",
                       "latency ms (1 thr)", "x float"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ppocr_rec,silero_vad,ppocr_cls")
    ap.add_argument("--eval", type=int, default=48, help="held-back evaluation samples (default 48)")
    ap.add_argument("--rounds", type=int, default=15, help="latency rounds (x20 runs per model)")
    args = ap.parse_args()
    print(f"machine: {C.machine()}")
    with tempfile.TemporaryDirectory() as td:
        for key in args.models.split(","):
            run_model(key.strip(), args, Path(td))


if __name__ == "__main__":
    main()
