"""Compile the model corpora that ship inside the installed wheels and count what crashes.

Two corpora, each model with its own recorded input (and output):

* ``node``: ONNX's operator test cases, ``onnx.backend.test.case.node.collect_testcases()`` — 1,884 single-op
  models generated in memory, with inputs and the outputs the ONNX authors computed in numpy;
* ``backend``: onnx's ``backend/test/data/{pytorch-converted,pytorch-operator,simple}`` — 140 PyTorch exports of
  opsets 6-9 and hand-made graphs, with ``test_data_set_0`` inputs / outputs (StringNormalizer models left out: their
  string inputs have no calibration form).

Each model is compiled through the API with its input as calibration data (``--samples 1``: the input itself, so
the plain plans validate on it; ``--samples 16``: the input and 15 scaled, jittered copies, so the measured default
and the guarded presets have samples to hold back) and sorted into ``ok`` (compiled and validated), ``user`` (a
one-line ``UserError``: exit 2), ``BUG`` (any other exception: what the CLI reports as an internal error, exit 1)
and ``skip`` (inputs an ``.npz`` cannot hold). Variants: ``--fp16`` (float32 graph inputs / outputs / initializers
made float16, for models with no Cast / Constant / subgraph and whose fp16 model onnxruntime runs), ``--dynamic``
(every graph input / output dim made symbolic), ``--external`` (every tensor in external data), ``--package``
(``build_bundle`` then ``verify_bundle``). Results as JSON lines; the summary counts them and lists every ``BUG``::

    python benchmarks/corpus_sweep.py node -j 2                           # default plan
    python benchmarks/corpus_sweep.py node --plan auto --samples 16 -j 2  # the measured default
    python benchmarks/corpus_sweep.py node --plan w4a8 --target tensorrt -j 2
    python benchmarks/corpus_sweep.py backend --samples 16 --plan auto -j 2

benchmarks/RESULTS.md, "Session 22", has the counts.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import logging
import multiprocessing
import shutil
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

from qcompiler.api import CompileOptions, build_bundle, compile_model
from qcompiler.core.errors import UserError
from qcompiler.report.bundle import verify_bundle

BACKEND = Path(onnx.__file__).parent / "backend" / "test" / "data"
NO_FP16 = {"Constant", "ConstantOfShape", "Cast", "CastLike", "EyeLike", "RandomNormal", "RandomUniform",
           "RandomNormalLike", "RandomUniformLike", "Bernoulli", "Multinomial", "If", "Loop", "Scan"}


def _node_cases() -> list[tuple[str, onnx.ModelProto, list[Any]]]:
    from onnx.backend.test.case import node

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return [(c.name, c.model, list(c.data_sets[0][0])) for c in node.collect_testcases(None)
                if c.data_sets and c.model is not None]


def _backend_cases() -> list[tuple[str, onnx.ModelProto, list[Any]]]:
    out = []
    for d in sorted(glob.glob(str(BACKEND / "pytorch-converted" / "*")) + glob.glob(str(BACKEND / "pytorch-operator" / "*"))
                    + glob.glob(str(BACKEND / "simple" / "*"))):
        if "strnorm" in d:
            continue
        files = sorted(glob.glob(d + "/test_data_set_0/input_*.pb"), key=lambda p: int(p.rsplit("_", 1)[1][:-3]))
        inputs = []
        for f in files:
            t = onnx.TensorProto()
            t.ParseFromString(Path(f).read_bytes())
            inputs.append(numpy_helper.to_array(t))
        out.append((f"{Path(d).parent.name}/{Path(d).name}", onnx.load(d + "/model.onnx"), inputs))
    return out


def _samples(a: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if n == 1 or a.dtype.kind != "f" or a.dtype.itemsize < 4:
        return np.stack([a] * n)
    scale = float(np.abs(a).mean()) if a.size else 0.0
    return np.stack([a] + [(a * rng.uniform(0.8, 1.2) + 0.05 * scale * rng.standard_normal(a.shape)).astype(a.dtype)
                           for _ in range(n - 1)])


def _fp16(m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    if m.functions or any(n.op_type in NO_FP16 or n.domain not in ("", "ai.onnx") for n in m.graph.node):
        return None
    vis = [*m.graph.input, *m.graph.output]
    if not any(v.type.tensor_type.elem_type == TensorProto.FLOAT for v in vis):
        return None
    for v in vis:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    for i, t in enumerate(list(m.graph.initializer)):
        if t.data_type == TensorProto.FLOAT:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    return {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}


def _one(args: argparse.Namespace, index: int, name: str, m: onnx.ModelProto, inputs: list[Any],
         work: Path) -> tuple[str, str, str]:
    inits = {t.name for t in m.graph.initializer}
    names = [i.name for i in m.graph.input if i.name not in inits]
    if len(inputs) != len(names) or any(not isinstance(a, np.ndarray) or a.dtype == object for a in inputs):
        return name, "skip", "inputs an .npz cannot hold"
    feeds: dict[str, np.ndarray] = dict(zip(names, inputs))
    if args.fp16:
        f16 = _fp16(m, feeds)
        if f16 is None:
            return name, "skip", "not an fp16 candidate"
        feeds = f16
    if args.dynamic:
        for vi in [*m.graph.input, *m.graph.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                for j, dim in enumerate(vi.type.tensor_type.shape.dim):
                    dim.dim_param = f"{vi.name[:8]}_{j}"
        del m.graph.value_info[:]
    d = Path(tempfile.mkdtemp(prefix="sweep", dir=work))
    try:
        model = d / "m.onnx"
        onnx.save(m, model, save_as_external_data=args.external, all_tensors_to_one_file=True, location="m.data",
                  size_threshold=0)
        if args.fp16:
            try:
                ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, feeds)
            except Exception:
                return name, "skip", "the fp16 model does not run"
        rng = np.random.default_rng(index)
        arrays: dict[str, Any] = {k: _samples(v, args.samples, rng) for k, v in feeds.items()}
        np.savez(d / "c.npz", **arrays)
        plan = None if args.plan == "auto" else args.plan
        if args.package:
            build_bundle(model, d / "b", calib=str(d / "c.npz"), plan=plan or "auto", target=args.target)
            verify_bundle(d / "b")
        else:
            compile_model(model, d / "o" / "q.onnx", CompileOptions(plan=plan or "auto", calib=str(d / "c.npz"),
                                                                    target=args.target))
        return name, "ok", ""
    except UserError as e:
        return name, "user", str(e).splitlines()[0][:300]
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return name, "BUG", f"{type(e).__name__}: {str(e)[:300]} @ {Path(tb.filename).name}:{tb.lineno}"
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _shard(job: tuple[argparse.Namespace, int, int, str]) -> list[tuple[str, str, str]]:
    args, shard, shards, work = job
    logging.disable(logging.WARNING)
    cases = _node_cases() if args.corpus == "node" else _backend_cases()
    return [_one(args, i, name, m, inputs, Path(work)) for i, (name, m, inputs) in enumerate(cases)
            if i % shards == shard]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", choices=["node", "backend"])
    ap.add_argument("--plan", default="default", help="a plan / preset name, 'default' or 'auto' (measured default)")
    ap.add_argument("--target", default="ort")
    ap.add_argument("--samples", type=int, default=1, help="calibration samples per model (16 for auto / presets)")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--dynamic", action="store_true")
    ap.add_argument("--external", action="store_true")
    ap.add_argument("--package", action="store_true")
    ap.add_argument("-j", type=int, default=1)
    ap.add_argument("--json", help="write every result here (one JSON list per line)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qcompiler-sweep-") as work:
        jobs = [(args, s, args.j, work) for s in range(args.j)]
        if args.j > 1:
            with multiprocessing.get_context("spawn").Pool(args.j) as pool:
                parts = pool.map(_shard, jobs)
        else:
            parts = [_shard(jobs[0])]
    results = sorted(r for part in parts for r in part)
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in results), encoding="utf-8")
    counts = collections.Counter(kind for _, kind, _ in results)
    print(f"{args.corpus}: {len(results)} models — " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for name, kind, why in results:
        if kind == "BUG":
            print(f"  BUG {name}: {why}")
    return 1 if counts.get("BUG") else 0


if __name__ == "__main__":
    sys.exit(main())
