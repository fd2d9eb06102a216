#!/usr/bin/env python
"""Two measurements of the measured default's cost (benchmarks/RESULTS.md, "Measured default cost (session 10)").

    python benchmarks/measured_default_cost.py gptq-fit rec cls det vad vit   # step 2: final compile's GPTQ on N - h
    python benchmarks/measured_default_cost.py union rec vit                  # one session for every candidate?

``gptq-fit``: the measured default compiled twice in fresh processes, as it is (the final compile's GPTQ on all N
calibration samples) and with GPTQ in the final compile given only the N - h samples the candidates calibrated on
(so its Hessians and sweeps are the winner candidate's, from the cache; calibration still on all N); both files
scored as the recipe scores (worst slice, binary probability outputs in logit space) and by the worst whole-output
SQNR, on the h held-back calibration samples and on the ``eval`` feeds.

``union``: every collection of calibration statistics that runs on a graph an earlier collection of the same compile
ran on is collected once more from a session exposing the earlier tensors as well, and compared (min, max, count):
would the plain default plan's session serve the other candidates bit for bit?

Feeds: ``/tmp/feeds/KEY-calib`` (64) and ``/tmp/feeds/KEY-eval`` folders of ``.npz`` (benchmarks/README.md).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
import realdata  # noqa: E402

KEYS = {"rec": "ppocr_rec", "cls": "ppocr_cls", "det": "ppocr_det", "vad": "silero_vad", "vit": "vit_focus"}
WORK = Path("/tmp/measured_default_cost")


def _model(key: str) -> str:
    return str(realdata.fetch_model(KEYS[key]))


def _calib(key: str) -> str:
    return f"/tmp/feeds/{KEYS[key]}-calib"


def compile_variant(key: str, variant: str, out: str) -> None:
    from qcompiler.api import CompileOptions, compile_model
    from qcompiler.calib import held_back_indices

    gptq = importlib.import_module("qcompiler.passes.gptq")
    real = gptq.source_for
    used: list[Any] = []

    n_all = len(list(Path(_calib(key)).glob("*.npz")))

    def source_for(ctx: Any, name: str, samples: int | None = None) -> Any:
        src = real(ctx, name, samples)
        if variant == "fit" and src is not None and len(src) == n_all:  # the final compile (candidates: N - h)
            held = set(held_back_indices(n_all))
            src = src.subset([i for i in range(n_all) if i not in held])
        used.append(None if src is None else len(src))
        return src

    gptq.source_for = source_for
    t = time.perf_counter()
    r = compile_model(_model(key), out, CompileOptions(calib=_calib(key), validate=False))
    print(json.dumps({"key": key, "variant": variant, "seconds": round(time.perf_counter() - t, 2),
                      "gptq_sources": used, "winner": r.report["recipe"]["winner"], "gptq": r.report.get("gptq")}))


def score(key: str, files: list[str]) -> None:
    import numpy as np

    from qcompiler import ir
    from qcompiler.calib import held_back_indices
    from qcompiler.recipe.measure import logit_sqnr, probability_outputs
    from qcompiler.recipe.measure import score as recipe_score
    from qcompiler.report import validate as qv

    calib = sorted(Path(_calib(key)).glob("*.npz"))
    evals = sorted(Path(f"/tmp/feeds/{KEYS[key]}-eval").glob("*.npz"))

    def load(p: Path) -> dict[str, Any]:
        with np.load(p) as z:
            return {k: z[k] for k in z.files}

    for name, feeds in (("held", [load(calib[i]) for i in held_back_indices(len(calib))]),
                        ("eval", [load(p) for p in evals])):
        ref = qv.float_reference(_model(key), feeds)
        probs = probability_outputs(ref.outputs)
        for f in files:
            keep: list[Any] = []
            rep = qv.validate_against(ref, ir.load_model(f, check=False), keep=keep)
            logit = {n: logit_sqnr(ref.outputs, keep, n) for n in probs} if probs else None
            print(f"{key} {name} {Path(f).name}: score {recipe_score(rep, logit):.3f} dB, worst output "
                  f"{rep.worst_output_sqnr():.3f} dB")


def union(key: str) -> None:
    from qcompiler.api import CompileOptions, compile_model
    from qcompiler.calib import stats_cache
    from qcompiler.core.activations import graph_key

    collect_mod = importlib.import_module("qcompiler.calib.collect")
    calibrate = importlib.import_module("qcompiler.passes.calibrate")
    real = collect_mod.collect
    seen: dict[str, dict[str, Any]] = {}

    def collect(graph: Any, specs: dict[str, Any], source: Any, **kw: Any) -> Any:
        got = real(graph, specs, source, **kw)
        gk = graph_key(graph)
        if gk in seen:
            both = {**seen[gk], **specs}
            cache = stats_cache()
            cap, cache.max_bytes = cache.max_bytes, 0  # a fresh collection, not a cache hit
            t = time.perf_counter()
            st = real(graph, both, source)
            cache.max_bytes = cap
            diff = [n for n in specs if (st[n].min, st[n].max, st[n].count) != (got[n].min, got[n].max, got[n].count)]
            print(f"{key}: {len(specs)} tensors ({len(set(specs) - set(seen[gk]))} not in the earlier {len(seen[gk])}) "
                  f"in a {len(both)}-tensor session on {len(source)} samples: {len(specs) - len(diff)} identical, "
                  f"{len(diff)} differ {diff[:3]} [{time.perf_counter() - t:.1f} s]", flush=True)
        seen.setdefault(gk, {}).update(specs)
        return got

    collect_mod.collect = collect
    calibrate.collect = collect
    compile_model(_model(key), WORK / f"{key}-union.onnx", CompileOptions(calib=_calib(key), validate=False))
    print(f"{key}: {len(seen)} graph(s) collected on, tensors {[len(v) for v in seen.values()]}")


def main(argv: list[str]) -> int:
    WORK.mkdir(parents=True, exist_ok=True)
    if argv[:1] == ["_compile"]:
        compile_variant(argv[1], argv[2], argv[3])
        return 0
    if len(argv) < 2 or argv[0] not in ("gptq-fit", "union"):
        print(__doc__)
        return 2
    for key in argv[1:]:
        if argv[0] == "union":
            union(key)
            continue
        outs = []
        for variant in ("all", "fit"):
            out = str(WORK / f"{key}-{variant}.onnx")
            subprocess.run([sys.executable, __file__, "_compile", key, variant, out], check=True)
            outs.append(out)
        score(key, outs)
        same = Path(outs[0]).read_bytes() == Path(outs[1]).read_bytes()
        print(f"{key}: files {'identical' if same else 'differ'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
