"""Issue 14, "Done means", measured side by side in one run on one model of the zoo.

    python benchmarks/issue14_done.py ppocr_cls --samples 64 --eval 32 --json out/i14_ppocr_cls.json

Compiles, from the same ``calib``-split feeds:

* ``qc default``: ``qcompiler compile MODEL --calib DIR`` with no plan (the measured default);
* ``qc plain``: ``--plan default`` (the plain default plan, the floor the presets are held to);
* every 8-bit preset (``--presets``; each with its algorithm guard as shipped);
* onnxruntime: ``quantize_static`` QDQ (per-channel int8 weights, uint8 activations) with MinMax / Entropy /
  Percentile calibration, MinMax restricted to Conv + MatMul (``op_types_to_quantize``), and ``quantize_dynamic``
  (per-channel int8), and MinMax with per-tensor weights — each in a fresh process killed above
  ``--mem-limit-gb``.

Scores every file on the disjoint ``eval``-split feeds against the float model: the worst output slice's SQNR (dB;
the same worst-slice rule as ``qcompiler validate``: each output's worst slice along its channel / feature axis,
or its whole-tensor SQNR when lower, with the index of that slice), the worst whole-output SQNR, the model's task
metric where ``_common.score`` has one (cls / rec / silero; the held-out ``magika``: top-1 agreement and the worst
class among those that fire; ``nudenet``: detections agreement and the score rows' SQNR), onnxruntime latency
against float (1 thread, interleaved rounds, median) and file bytes (with external data) against the fp32 file.
A compile or onnxruntime quantization that raises is a row with its error. Prints the table and the issue's
targets (met / missed) for this model."""

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

from qcompiler.api import CompileOptions, compile_model
from qcompiler.report import validate as qv

PRESETS = ("w8a8", "w8a8-percentile", "w8a8-cle", "w8a8-auto", "w8a8-dynamic")
WORKER_FLAG = "--ort-worker"


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _ort_worker(spec: dict[str, Any]) -> None:
    """One onnxruntime quantization in this (fresh) process."""
    if spec["kind"] == "dynamic":
        import onnx
        from onnx import version_converter
        from onnxruntime.quantization import QuantType, quantize_dynamic

        src = Path(spec["model"])
        m = onnx.load(str(src))
        opset = next((int(i.version) for i in m.opset_import if i.domain in ("", "ai.onnx")), 1)
        if opset < 13:
            src = Path(spec["workdir"]) / "dyn-opset13.onnx"
            onnx.save(version_converter.convert_version(m, 13), str(src))
        del m
        # its pre-processing (as for quantize_static): it folds Constant-node weights into initializers, which
        # quantize_dynamic requires (PP-OCR rec / det: "Expected conv2d_157.w_0 to be an initializer" without it)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = Path(spec["workdir"]) / "dyn-pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), spec["out"], per_channel=True, weight_type=QuantType.QInt8)
    else:
        C.ort_quantize(spec["model"], spec["out"], spec["calib"], method=spec["method"],
                       op_types=spec.get("op_types"), workdir=spec["workdir"],
                       per_channel=spec.get("per_channel", True))
    print("RESULT ok", flush=True)


def ort_run(spec: dict[str, Any], mem_limit_mb: float) -> tuple[float, str | None]:
    child = C.run_child([sys.executable, __file__, WORKER_FLAG, json.dumps(spec)], mem_limit_mb=mem_limit_mb)
    if child.returncode == 0 and "RESULT ok" in child.stdout:
        return child.seconds, None
    if child.killed_for_memory:
        return child.seconds, f"killed above {mem_limit_mb / 1024:.0f} GB after {child.seconds:.0f} s"
    lines = [ln for ln in child.stderr.strip().splitlines() if ln.strip()]
    return child.seconds, (lines[-1].strip() if lines else f"exit {child.returncode}")[:200]


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == WORKER_FLAG:
        _ort_worker(json.loads(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--skip", default="", help="comma-separated rows to skip (ort-Entropy, w8a8-cle, ...)")
    ap.add_argument("--mem-limit-gb", type=float, default=8.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    model = Path(realdata.fetch_model(args.model))
    calib, ev = C.zoo_feeds(args.model, args.samples, "calib"), C.zoo_feeds(args.model, args.eval, "eval")
    rows: dict[str, dict[str, Any]] = {}
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        folder = C.write_feeds(calib, work / "calib")
        runs: dict[str, CompileOptions] = {"qc default": CompileOptions(calib=str(folder), validate=False),
                                           "qc plain": CompileOptions(plan="default", calib=str(folder),
                                                                      validate=False)}
        for p in filter(None, args.presets.split(",")):
            runs[f"qc {p}"] = CompileOptions(preset=p, calib=str(folder), validate=False)
        for name, opts in runs.items():
            if name in skip or name.removeprefix("qc ") in skip:
                continue
            out = work / f"{name.replace(' ', '_')}.onnx"
            t0 = time.perf_counter()
            try:
                res = compile_model(model, out, opts)
            except Exception as e:  # a crash is a result here (held-out models): recorded, the run goes on
                rows[name] = {"seconds": round(time.perf_counter() - t0, 2),
                              "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"}
                print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
                continue
            rows[name] = {"seconds": round(time.perf_counter() - t0, 2)}
            rec = res.report.get("recipe")
            if rec:
                rows[name]["recipe"] = {k: rec.get(k) for k in ("winner", "dropped", "reason")}
            files[name] = out
            print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
        ort_specs: dict[str, dict[str, Any]] = {
            f"ort {m}": {"kind": "static", "method": m} for m in C.ORT_METHODS}
        ort_specs["ort MinMax Conv+MatMul"] = {"kind": "static", "method": "MinMax", "op_types": ["Conv", "MatMul"]}
        # per-tensor weights: what a user falls back to where per-channel fails (magika: onnxruntime 1.32's
        # int32-bias scale adjustment raises on per-channel scales)
        ort_specs["ort MinMax per-tensor"] = {"kind": "static", "method": "MinMax", "per_channel": False}
        ort_specs["ort dynamic"] = {"kind": "dynamic"}
        for name, spec in ort_specs.items():
            if name in skip or name.removeprefix("ort ") in skip:
                continue
            out = work / f"{name.replace(' ', '_').replace('+', '_')}.onnx"
            secs, err = ort_run({**spec, "model": str(model), "out": str(out), "calib": str(folder),
                                 "workdir": str(work)}, args.mem_limit_gb * 1024)
            rows[name] = {"seconds": round(secs, 2)}
            if err:
                rows[name]["error"] = err
            else:
                files[name] = out
            print(f"{name}: {rows[name]}", file=sys.stderr, flush=True)
        ref = C.run_all(model, ev) if args.model in C.AGREEMENT else None
        for name, path in files.items():
            rep = qv.validate(model, path, ev, per_layer=False)
            rows[name].update(worst_slice_db=round(rep.worst_slice_sqnr(), 2),
                              whole_db=round(rep.worst_output_sqnr(), 2),
                              file_ratio=round(file_bytes(path) / file_bytes(model), 3))
            ws = next((m.worst_slice for m in rep.outputs if m.worst_slice is not None), None)
            if ws is not None:
                rows[name]["worst_slice_index"] = ws.index
            if ref is not None:  # the task metric of tests/realdata*.py's models (C.score)
                sc = C.score(args.model, ref, C.run_all(path, ev))
                rows[name]["agreement"] = round(sc.agreement, 4)
                rows[name].update({k: round(v, 2) for k, v in sc.extra.items() if k.endswith(" dB")})
        lat = C.latency_ms({"float": str(model), **{k: str(v) for k, v in files.items()}}, ev[0], threads=1,
                           warmup=5, rounds=7, per_round=10)
        for k in files:
            rows[k]["latency_ratio"] = round(lat[k]["median"] / lat["float"]["median"], 3)
    ort_ok = {k: v for k, v in rows.items() if k.startswith("ort") and "worst_slice_db" in v}
    best = max(ort_ok, key=lambda k: ort_ok[k]["worst_slice_db"]) if ort_ok else None
    extra_cols = sorted({k for v in rows.values() for k in v if k.endswith(" dB")})
    table = [[k, str(v.get("worst_slice_db", "-")), str(v.get("worst_slice_index", "-")), str(v.get("whole_db", "-")),
              *[str(v.get(c, "-")) for c in extra_cols],
              str(v.get("agreement", "-")), str(v.get("latency_ratio", "-")),
              str(v.get("file_ratio", "-")), str(v["seconds"]),
              v.get("error") or (v.get("recipe") or {}).get("winner") or ""] for k, v in rows.items()]
    agreement = C.AGREEMENT.get(args.model, "agreement")
    print(f"\n## {args.model}: {len(calib)} calibration / {len(ev)} evaluation feeds\n")
    headers = ["", "worst slice dB", "slice", "whole dB", *extra_cols, agreement, "latency x float", "file x fp32",
               "compile s", "note"]
    print(C.fmt_table(headers, table, align_right=lambda i: 0 < i < len(headers) - 1))
    targets: list[dict[str, Any]] = []
    d = rows.get("qc default", {})
    if best is not None and "worst_slice_db" in d:
        gain = d["worst_slice_db"] - rows[best]["worst_slice_db"]
        targets.append({"what": f"default >= best onnxruntime int8 ({best}) + 1 dB, worst slice",
                        "met": gain >= 1.0, "detail": f"{gain:+.2f} dB"})
    if "latency_ratio" in d:
        targets.append({"what": "default <= 1.0x float latency", "met": d["latency_ratio"] <= 1.0,
                        "detail": f"{d['latency_ratio']:.2f}x"})
        targets.append({"what": "default file <= 0.30x fp32", "met": d["file_ratio"] <= 0.30,
                        "detail": f"{d['file_ratio']:.3f}x"})
    plain = rows.get("qc plain", {}).get("worst_slice_db")
    if plain is not None:
        for k, v in rows.items():
            if k.startswith("qc w8a8") and "worst_slice_db" in v:
                targets.append({"what": f"{k} >= plain default - 0.5 dB", "met": v["worst_slice_db"] >= plain - 0.5,
                                "detail": f"{v['worst_slice_db'] - plain:+.2f} dB"})
    print("\ntargets (issue 14):")
    for t in targets:
        print(f"- {'MET ' if t['met'] else 'MISS'}  {t['what']}: {t['detail']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        C.write_json(args.json, {"model": args.model, "samples": len(calib), "eval": len(ev), "rows": rows,
                                 "ort_best": best, "targets": targets})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
