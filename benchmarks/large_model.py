"""Scale benchmark: a generated transformer-like model above 2 GB (external data) through ``qcompiler compile``.

The model (never committed; generated into a temporary folder) is ``LAYERS`` pre-norm FFN blocks::

    x -> LayerNorm -> MatMul [D, F] -> Relu -> MatMul [F, D] -> Add(x) -> ...      (D = 4096, F = 3072)

so 24 layers hold 48 float32 weight matrices, 2.42 GB, written tensor by tensor into ``model.onnx.data``
(the generator never holds more than one weight). Two compiles run, each in its own process, measured with
``wait4`` (peak RSS of the child):

* ``--plan w4a16``: int4 block-wise weight-only, lowered to ``com.microsoft.MatMulNBits``;
* the default W8A8 plan on a few calibration samples.

Both validate the output against the float model in onnxruntime (calibration data = validation data here), and
the output is then loaded and run once more in a fresh process. Peak RSS must stay under 1.5x the model's bytes.

    python benchmarks/large_model.py [--layers 24] [--keep DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

D, F = 4096, 3072
SEQ = 8


def generate(folder: Path, layers: int, seed: int = 0) -> Path:
    """Write ``model.onnx`` + ``model.onnx.data`` into ``folder``; weights streamed, one at a time."""
    rng = np.random.default_rng(seed)
    data_name = "model.onnx.data"
    inits: list[TensorProto] = []
    nodes = []
    offset = 0

    def external(name: str, arr: np.ndarray, f) -> None:  # type: ignore[no-untyped-def]
        nonlocal offset
        pad = (-offset) % 4096
        f.write(b"\0" * pad)
        offset += pad
        f.write(arr.tobytes())
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(arr.shape))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(arr.nbytes))):
            t.external_data.add(key=k, value=v)
        offset += arr.nbytes
        inits.append(t)

    x = "x"
    with open(folder / data_name, "wb") as f:
        for i in range(layers):
            p = f"layers.{i}"
            inits.append(helper.make_tensor(f"{p}.ln.scale", TensorProto.FLOAT, [D],
                                            (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32)))
            inits.append(helper.make_tensor(f"{p}.ln.bias", TensorProto.FLOAT, [D],
                                            (0.1 * rng.standard_normal(D)).astype(np.float32)))
            external(f"{p}.ffn.up.weight", (rng.standard_normal((D, F), dtype=np.float32) / np.float32(np.sqrt(D))), f)
            external(f"{p}.ffn.down.weight", (rng.standard_normal((F, D), dtype=np.float32) / np.float32(np.sqrt(F))), f)
            nodes += [
                helper.make_node("LayerNormalization", [x, f"{p}.ln.scale", f"{p}.ln.bias"], [f"{p}.ln"],
                                 name=f"/{p}/ln", axis=-1, epsilon=1e-5),
                helper.make_node("MatMul", [f"{p}.ln", f"{p}.ffn.up.weight"], [f"{p}.up"], name=f"/{p}/ffn/up"),
                helper.make_node("Relu", [f"{p}.up"], [f"{p}.act"], name=f"/{p}/ffn/act"),
                helper.make_node("MatMul", [f"{p}.act", f"{p}.ffn.down.weight"], [f"{p}.down"],
                                 name=f"/{p}/ffn/down"),
                helper.make_node("Add", [x, f"{p}.down"], [f"{p}.out"], name=f"/{p}/residual"),
            ]
            x = f"{p}.out"
    nodes.append(helper.make_node("LayerNormalization", [x, "final.scale", "final.bias"], ["y"], name="/final/ln",
                                  axis=-1))
    inits.append(helper.make_tensor("final.scale", TensorProto.FLOAT, [D], np.ones(D, np.float32)))
    inits.append(helper.make_tensor("final.bias", TensorProto.FLOAT, [D], np.zeros(D, np.float32)))
    graph = helper.make_graph(nodes, "ffn_stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SEQ, D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SEQ, D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="large_model.py")
    model.ir_version = 8
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def run_measured(cmd: list[str]) -> tuple[int, float, int, str]:
    """(exit code, seconds, peak RSS bytes of the child, combined output)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read().decode(errors="replace")
    return proc.returncode, time.perf_counter() - t0, int(usage.ru_maxrss) * 1024, out


_RUN_OUTPUT = r"""
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.log_severity_level = 3
so.add_session_config_entry("session.disable_prepacking", "1")
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
x = np.load(sys.argv[2])["x"][0]
y = s.run(None, {"x": x})[0]
print("ran", y.shape, y.dtype, bool(np.isfinite(y).all()))
print("ops", sorted({n.op_type for n in __import__("onnx").load(sys.argv[1], load_external_data=False).graph.node}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--samples", type=int, default=4, help="calibration samples")
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    ap.add_argument("--plans", default="w4a16,w8a8")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="qcompiler-large-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {}
    try:
        t0 = time.perf_counter()
        model = generate(work, args.layers)
        model_bytes = sum(p.stat().st_size for p in work.glob("model.onnx*"))
        rng = np.random.default_rng(1)
        np.savez(work / "calib.npz", x=rng.standard_normal((args.samples, 1, SEQ, D)).astype(np.float32))
        print(f"generated {args.layers} layers: {model_bytes / 1e9:.3f} GB in {time.perf_counter() - t0:.1f} s "
              f"({work})", flush=True)
        results["model_bytes"] = model_bytes
        results["layers"] = args.layers
        qc = [sys.executable, "-m", "qcompiler.cli"]
        for plan in args.plans.split(","):
            out = work / f"q_{plan}.onnx"
            cmd = [*qc, "compile", str(model), "-o", str(out), "--plan", plan, "--calib", str(work / "calib.npz"),
                   "--report", str(work / f"report_{plan}.json")]
            rc, sec, rss, log = run_measured(cmd)
            if rc != 0:
                print(log)
                print(f"{plan}: compile failed with exit code {rc}")
                return 1
            report = json.loads((work / f"report_{plan}.json").read_text())
            files = sorted(p.name for p in work.glob(f"q_{plan}.onnx*"))
            out_bytes = sum((work / f).stat().st_size for f in files)
            sqnr = report.get("validation", {}).get("worst_output_sqnr_db")
            rc2, _, rss2, log2 = run_measured([sys.executable, "-c", _RUN_OUTPUT, str(out), str(work / "calib.npz")])
            if rc2 != 0:
                print(log2)
                return 1
            r = {"seconds": round(sec, 1), "peak_rss_bytes": rss, "rss_ratio": round(rss / model_bytes, 3),
                 "output_files": files, "output_bytes": out_bytes, "output_sqnr_db": sqnr,
                 "passes_ms": {p["pass"]: round(p["seconds"] * 1000) for p in report["passes"]},
                 "reload_run": log2.strip().splitlines(), "reload_peak_rss_bytes": rss2}
            results[plan] = r
            print(f"{plan}: {sec:.1f} s, peak RSS {rss / 1e9:.2f} GB = {rss / model_bytes:.2f}x the model; output "
                  f"{out_bytes / 1e9:.3f} GB {files}; output SQNR {sqnr} dB; reloaded: {log2.strip()}", flush=True)
            ok = rss <= 1.5 * model_bytes
            print(f"  peak RSS <= 1.5x model bytes: {'yes' if ok else 'NO'}", flush=True)
            for f in files:
                (work / f).unlink()
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
        return 0 if all(isinstance(v, dict) and v["rss_ratio"] <= 1.5 for k, v in results.items()
                        if isinstance(v, dict)) else 1
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
