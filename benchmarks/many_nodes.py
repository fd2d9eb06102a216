"""Scale benchmark: passes stay linear. A generated 10 000-node graph through the compiler's passes.

The graph is ``BLOCKS`` repetitions of ``Conv(8->8, 3x3) -> BatchNormalization -> Relu`` (3 nodes each, plus one
final Identity: 10 000 nodes for 3333 blocks) on a [1, 8, 8, 8] input. Each pass of the default pipeline is
timed on it: ``cleanup``, ``fold-batchnorm`` (folds all 3333 BatchNormalization), ``resolve-plan``,
``calibrate`` (one random sample through onnxruntime), ``insert-qdq`` and ``lower``, then the export. The
requirement is fold-batchnorm + resolve-plan + insert-qdq <= 10 s on this machine.

    python benchmarks/many_nodes.py [--blocks 3333] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

C = 8


def build(blocks: int, seed: int = 0):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(blocks):
        w = (rng.standard_normal((C, C, 3, 3)) / np.sqrt(C * 9)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"b{i}.conv.w"),
                  numpy_helper.from_array(rng.uniform(0.8, 1.2, C).astype(np.float32), f"b{i}.bn.gamma"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(C)).astype(np.float32), f"b{i}.bn.beta"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(C)).astype(np.float32), f"b{i}.bn.mean"),
                  numpy_helper.from_array(rng.uniform(0.5, 1.5, C).astype(np.float32), f"b{i}.bn.var")]
        nodes += [
            helper.make_node("Conv", [x, f"b{i}.conv.w"], [f"b{i}.conv"], name=f"/b{i}/conv", pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", [f"b{i}.conv", f"b{i}.bn.gamma", f"b{i}.bn.beta", f"b{i}.bn.mean",
                                                    f"b{i}.bn.var"], [f"b{i}.bn"], name=f"/b{i}/bn"),
            helper.make_node("Relu", [f"b{i}.bn"], [f"b{i}.out"], name=f"/b{i}/relu"),
        ]
        x = f"b{i}.out"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="/out"))
    g = helper.make_graph(nodes, "many_nodes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, 8, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=3333)
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()

    from qcompiler import ir
    from qcompiler.core.context import CompileContext
    from qcompiler.core.registry import build_pipeline
    from qcompiler.plan import Plan
    from qcompiler.runtime_targets import get_target

    model = build(args.blocks)
    graph, meta = ir.import_graph(model)
    n_nodes = len(graph.nodes)
    ctx = CompileContext(graph=graph, meta=meta, plan=Plan.default(), target=get_target("ort"))
    times: dict[str, float] = {}
    stats: dict[str, dict[str, int]] = {}
    pipeline = build_pipeline("cleanup,fold-batchnorm,cleanup,resolve-plan,calibrate{samples=1},insert-qdq,lower")
    for i, p in enumerate(pipeline):
        t0 = time.perf_counter()
        r = p.run(ctx)
        dt = time.perf_counter() - t0
        ctx.properties |= set(p.produces)
        key = p.name if p.name not in times else f"{p.name}#{i}"
        times[key] = round(dt, 3)
        stats[key] = {k: int(v) for k, v in sorted(r.stats.items()) if v}
        print(f"{key:16s} {dt:7.3f} s  {stats[key]}", flush=True)
    t0 = time.perf_counter()
    out = ir.export_model(ctx.graph, meta)
    times["export"] = round(time.perf_counter() - t0, 3)
    print(f"{'export':16s} {times['export']:7.3f} s  ({len(out.graph.node)} nodes)")
    core = times["fold-batchnorm"] + times["resolve-plan"] + times["insert-qdq"]
    print(f"{n_nodes} nodes: fold-batchnorm + resolve-plan + insert-qdq = {core:.2f} s "
          f"({'<=' if core <= 10 else '>'} 10 s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"nodes": n_nodes, "seconds": times, "stats": stats, "core_seconds": round(core, 3)}, f,
                      indent=2)
    return 0 if core <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
