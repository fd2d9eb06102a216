#!/usr/bin/env python
"""Low-bit weight schemes (binary / ternary / shift) on the Conv fixtures and PP-OCR: accuracy and bytes.

    python benchmarks/lowbit.py                  # every model, Markdown tables on stdout
    python benchmarks/lowbit.py --models ppocr_cls --json out.json

For each model and each scheme, the same plan is compiled for the ``ort`` and the ``packed`` target: the first
and last layers int8 (the plan defaults: per-channel int8 weights, uint8 activations), the *middle layers*
(``MIDDLE`` below: the same layers for every scheme) with the scheme's weights (uint8 activations). Reported:

* **weight SQNR**: mean over the middle layers of 10·log10(ΣW² / Σ(W − Ŵ)²) (``report["lowbit"]``);
* **layer SQNR**: mean over the middle layers of the SQNR of the layer's output tensor (BatchNorm folded in)
  against the float model, on held-out inputs (``qcompiler.report.validate``, per layer) — what "on the same layers"
  means below;
* **output SQNR** of the graph output, and top-1 agreement for the angle classifier;
* **packed bytes**: the stored bytes of the packed layers (packed codes + one float32 scale per output channel)
  against their fp32 weights, per layer; with K weights per output channel and b bits each the ratio is
  32·K / (b·K + 32), so 1/30 for binary needs K ≥ 480 and 1/15 for ternary K ≥ 240.

``ppocr_rec`` (PP-OCRv4 recognizer; larger layers) is compiled for ``packed`` only for the bytes table.
The evaluation feeds are the ``eval`` split of ``tests/realdata.py`` (disjoint from calibration); the fixtures
use their sample files (first 24 samples calibrate, last 8 evaluate).

OpenBLAS is limited to one thread (set before numpy loads): with onnxruntime's spinning thread pool on a small
machine, multithreaded BLAS dot products in the validator take ~30 ms each instead of microseconds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import realdata  # noqa: E402
from _common import fmt_table, machine  # noqa: E402

from qcompiler import ir  # noqa: E402
from qcompiler.api import CompileOptions, compile_model  # noqa: E402
from qcompiler.plan import Plan  # noqa: E402
from qcompiler.report import validate as qv  # noqa: E402

SCHEMES = ("binary", "ternary", "shift")
#: the middle layers of each model (first and last layers stay int8)
MIDDLE = {
    "conv_bn_relu": r"^(conv2|block\.conv[12]|dw\.conv)$",
    "depthwise": r"^dw\.conv$",
    "ppocr_cls": r"^Conv@([1-9]|[1-4][0-9]|5[0-2])$",  # all 52 Convs between Conv@0 and the MatMul
    "ppocr_cls_late": r"^Conv@(4[1-9]|5[0-2])$",  # the last two blocks only
    "ppocr_rec": r"^p2o\.(Conv\.([1-9]|[1-3][0-9])|MatMul\.([0-9]|1[0-9]|2[0-2]))$",
}
N_CALIB, N_EVAL = 32, 32


def _data(model: str, tmp: Path) -> tuple[Path, Path, list[dict[str, np.ndarray]]]:
    """(model path, calibration .npz, evaluation feeds)."""
    if model in ("conv_bn_relu", "depthwise"):
        with np.load(REPO / "models" / f"{model}.npz") as z:
            arrays = {k: z[k] for k in z.files}
        calib = tmp / f"{model}.calib.npz"
        np.savez(calib, **{k: v[:24] for k, v in arrays.items()})
        evals = [{k: v[i] for k, v in arrays.items()} for i in range(24, 32)]
        return REPO / "models" / f"{model}.onnx", calib, evals
    key = "ppocr_cls" if model.startswith("ppocr_cls") else model
    if key == "ppocr_cls":
        c, _ = realdata.ppocr_cls_inputs(N_CALIB, "calib")
        e, _ = realdata.ppocr_cls_inputs(N_EVAL, "eval")
    else:
        c = realdata.ppocr_rec_inputs(8, "calib")
        e = []
    folder = tmp / f"{model}.calib"
    folder.mkdir(exist_ok=True)
    for i, f in enumerate(c):
        np.savez(folder / f"{i:05d}.npz", **f)
    return realdata.fetch_model(key), folder, [{k: v for k, v in f.items()} for f in e]


def run_model(model: str, tmp: Path, targets: tuple[str, ...] = ("ort", "packed")) -> list[dict[str, Any]]:
    src, calib, evals = _data(model, tmp)
    float_model = ir.load_model(src)
    rows = []
    for scheme in SCHEMES:
        plan = Plan.from_dict({"version": 1, "rules": [{"match": {"name_regex": MIDDLE[model]},
                                                        "weight": {"scheme": scheme}}]})
        for target in targets:
            out = tmp / f"{model}.{scheme}.{target}.onnx"
            t0 = time.perf_counter()
            res = compile_model(src, out, CompileOptions(plan=plan, target=target, calib=calib, validate=False))
            seconds = time.perf_counter() - t0
            lowbit = res.report["lowbit"]["layers"]
            row: dict[str, Any] = {
                "model": model, "scheme": scheme, "target": target, "layers": len(lowbit),
                "compile_s": round(seconds, 2), "file_bytes": out.stat().st_size,
                "weight_sqnr_db": round(float(np.mean([v["weight_sqnr_db"] for v in lowbit.values()])), 2),
            }
            if scheme == "ternary":
                row["sparsity"] = round(float(np.mean([v["sparsity"] for v in lowbit.values()])), 3)
            packed = res.report.get("packed")
            if packed:
                ratios = [v["float_bytes"] / v["packed_bytes"] for v in packed["layers"].values()]
                tot = packed["totals"]
                row.update({"packed_ratio_min": round(min(ratios), 2), "packed_ratio_max": round(max(ratios), 2),
                            "packed_ratio_total": round(tot["float_bytes"] / tot["packed_bytes"], 2),
                            "packed_layers": {k: {"shape": v["weight_shape"], "ratio": v["ratio"]}
                                              for k, v in packed["layers"].items()}})
            if evals:
                qm = onnx.load(out)
                layer_names = [n.output[0] for n in qm.graph.node if n.name in lowbit]
                rep = qv.validate(float_model, qm, evals, layer_names=layer_names)
                row["layer_sqnr_db"] = round(float(np.mean([m.sqnr_db for m in rep.layers])), 2)
                row["layers_measured"] = len(rep.layers)
                row["output_sqnr_db"] = round(rep.worst_output_sqnr(), 2)
                top1 = rep.outputs[0].top1_agreement
                row["top1"] = None if top1 is None else round(top1, 3)
            rows.append(row)
            print(f"# {model} {scheme} {target}: {json.dumps({k: v for k, v in row.items() if k != 'packed_layers'})}",
                  file=sys.stderr)
    return rows


def int8_baseline(model: str, tmp: Path) -> dict[str, Any]:
    src, calib, evals = _data(model, tmp)
    out = tmp / f"{model}.int8.onnx"
    compile_model(src, out, CompileOptions(plan="default", calib=calib, validate=False))
    rep = qv.validate(ir.load_model(src), onnx.load(out), evals, per_layer=False)
    return {"model": model, "output_sqnr_db": round(rep.worst_output_sqnr(), 2),
            "top1": rep.outputs[0].top1_agreement}


def markdown(rows: list[dict[str, Any]], base: dict[str, dict[str, Any]]) -> str:
    lines = ["| model (middle layers) | scheme | target | weight SQNR dB | layer SQNR dB | output SQNR dB | top-1 |"
             " packed bytes ratio (min / total) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "layer_sqnr_db" not in r:
            continue
        ratio = f"{r['packed_ratio_min']} / {r['packed_ratio_total']}" if "packed_ratio_min" in r else "—"
        top1 = "—" if r.get("top1") is None else f"{100 * r['top1']:.1f} %"
        lines.append(f"| {r['model']} ({r['layers']}) | {r['scheme']} | {r['target']} | {r['weight_sqnr_db']} | "
                     f"{r['layer_sqnr_db']} | {r['output_sqnr_db']} | {top1} | {ratio} |")
    for m, b in base.items():
        top1 = "—" if b.get("top1") is None else f"{100 * b['top1']:.1f} %"
        lines.append(f"| {m} | int8 everywhere | ort | — | — | {b['output_sqnr_db']} | {top1} | — |")
    return "\n".join(lines)


def bytes_table(rows: list[dict[str, Any]]) -> str:
    """Per K bucket: the packed/fp32 ratios of the packed layers."""
    out = []
    for r in rows:
        if r["target"] != "packed" or "packed_layers" not in r or r["scheme"] == "shift":
            continue
        buckets: dict[str, list[float]] = {}
        for v in r["packed_layers"].values():
            shape = v["shape"]
            k = int(np.prod(shape[1:])) if len(shape) == 4 else int(shape[0])
            key = "K ≥ 480" if k >= 480 else ("240 ≤ K < 480" if k >= 240 else "K < 240")
            buckets.setdefault(key, []).append(float(v["ratio"]))
        for key in ("K ≥ 480", "240 ≤ K < 480", "K < 240"):
            if key in buckets:
                v = buckets[key]
                out.append((r["model"], r["scheme"], key, len(v), f"{min(v):.2f}", f"{max(v):.2f}"))
    return fmt_table(["model", "scheme", "K per channel", "layers", "min ratio", "max ratio"], out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["conv_bn_relu", "depthwise", "ppocr_cls", "ppocr_cls_late",
                                                    "ppocr_rec"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    base: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        for m in args.models:
            rows += run_model(m, tmp, ("packed",) if m == "ppocr_rec" else ("ort", "packed"))
            if m in ("conv_bn_relu", "depthwise", "ppocr_cls"):
                base[m] = int8_baseline(m, tmp)
    print(f"machine: {machine()}\n")
    print(markdown(rows, base))
    print()
    print(bytes_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "int8": base}, indent=2))


if __name__ == "__main__":
    main()
