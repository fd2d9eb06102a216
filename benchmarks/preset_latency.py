#!/usr/bin/env python
"""A preset's onnxruntime latency against the float model, on one model of the zoo.

    python benchmarks/preset_latency.py minilm --preset w4a8
    python benchmarks/preset_latency.py vit_focus --preset w4a8 --samples 16 --eval 8 --json out/lat.json

Compiles ``--preset`` (its guard as shipped, ``--samples`` calibration feeds of the ``calib`` split) into a
temporary folder, then times the float model and the compiled one side by side on the first ``eval``-split feed
(1 onnxruntime thread, interleaved rounds: ``_common.latency_ms``), and scores the compiled file on ``--eval``
feeds (worst output slice and whole-output SQNR, the rule of ``qcompiler validate``). Prints one line: the
medians, their ratio, the file's bytes against the fp32 file's. Run it from two checkouts (or an assembled
copy of an older commit, ``identity_check.py``'s ``export_commit`` / ``assemble``) to compare lowerings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

from qcompiler.api import CompileOptions, compile_model
from qcompiler.report import validate as qv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a zoo key (tests/realdata.py, tests/realdata_heldout.py)")
    ap.add_argument("--preset", default="w4a8")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    model = C.realdata.fetch_model(args.model)
    calib, ev = C.zoo_feeds(args.model, args.samples, "calib"), C.zoo_feeds(args.model, args.eval, "eval")
    with tempfile.TemporaryDirectory() as td:
        folder = C.write_feeds(calib, Path(td) / "calib")
        out = Path(td) / "q.onnx"
        compile_model(model, out, CompileOptions(plan=args.preset, calib=str(folder), validate=False))
        lat = C.latency_ms({"float": model, "quantized": out}, ev[0], rounds=args.rounds)
        rep = qv.validate(model, out, ev, per_layer=False)
        size = out.stat().st_size
    ratio = lat["quantized"]["median"] / lat["float"]["median"]
    row = {"model": args.model, "preset": args.preset, "float_ms": lat["float"]["median"],
           "quantized_ms": lat["quantized"]["median"], "latency_ratio": ratio, "bytes": size,
           "bytes_ratio": size / Path(model).stat().st_size, "worst_slice_db": rep.worst_slice_sqnr(),
           "whole_db": rep.worst_output_sqnr(), "machine": C.machine()}
    print(f"{args.model} {args.preset}: float {row['float_ms']:.2f} ms, quantized {row['quantized_ms']:.2f} ms "
          f"({ratio:.2f}x), {size} bytes ({row['bytes_ratio']:.3f}x fp32), eval worst slice "
          f"{row['worst_slice_db']:.2f} dB, whole {row['whole_db']:.2f} dB ({len(ev)} feeds)")
    if args.json:
        C.write_json(args.json, row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
