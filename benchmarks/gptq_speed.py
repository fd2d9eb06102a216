#!/usr/bin/env python
"""GPTQ's own seconds on the zoo models, and the bytes it writes (A/B of passes/gptq.py).

    python benchmarks/gptq_speed.py --tag before ppocr_rec ppocr_det --presets w8a8 w4a8
    python benchmarks/gptq_speed.py --tag after  ppocr_rec ppocr_det --presets w8a8 w4a8 --compare before
    git show e50a045:passes/gptq.py > /tmp/gptq_e50a045.py   # an earlier version, same checkout
    python benchmarks/gptq_speed.py --tag old ppocr_rec --gptq-source /tmp/gptq_e50a045.py

Each (model, preset) is compiled once in a fresh process with the preset **without its guard** (one compile, so
every second of ``gptq`` in the profile is GPTQ building each layer's Hessian over the 64 ``calib`` samples and
sweeping it once, no cache hit), ``--no-validate``. Printed per compile: GPTQ's ``hessians`` and ``sweep`` seconds
(``compile --profile``), the compile's wall and CPU seconds (user + sys of the child), the load average; the
written model goes to ``WORK/TAG/MODEL-PRESET.onnx`` and ``--compare TAG`` says whether it is byte-identical to
that earlier tag's. Feeds: realdata's ``calib`` split (det / ViT: the folders under ``/tmp/feeds`` when there).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import realdata  # noqa: E402
from _common import write_feeds, zoo_feeds  # noqa: E402

PRESETS = HERE.parent / "qcompiler" / "plan" / "presets"


def feeds_dir(key: str, n: int, work: Path) -> Path:
    shared = Path(f"/tmp/feeds/{key}-calib")
    if shared.is_dir() and n == 64:
        return shared
    d = work / "feeds" / f"{key}-{n}"
    if not d.is_dir():
        write_feeds(zoo_feeds(key, n, "calib"), d)
    return d


def unguarded_plan(preset: str, work: Path) -> Path:
    plan = yaml.safe_load((PRESETS / f"{preset}.yaml").read_text())
    plan.get("algorithms", {}).pop("guard", None)
    out = work / "plans" / f"{preset}-unguarded.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(plan))
    return out


def child(model: str, out: str, calib: str, plan: str, report: str) -> None:
    """One compile in this process, GPTQ's CPU seconds (process time: every thread) measured around its
    Hessians and its whole pass; printed as JSON on the last line. ``$GPTQ_SOURCE``: run this file as
    ``qcompiler.passes.gptq`` instead (an earlier version, for an A/B in one checkout)."""
    source = os.environ.get("GPTQ_SOURCE")
    if source:
        import importlib.util

        import qcompiler.passes

        spec = importlib.util.spec_from_file_location("qcompiler.passes.gptq", source)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["qcompiler.passes.gptq"] = mod
        spec.loader.exec_module(mod)
        qcompiler.passes.gptq = mod  # type: ignore[attr-defined]
    from qcompiler.api import compile_model
    from qcompiler.compile import CompileOptions
    from qcompiler.passes import gptq

    cpu = {"hessians": 0.0, "gptq": 0.0}
    acc, run = gptq.GPTQPass._accumulate, gptq.GPTQPass._run

    def timed(name, fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            t0 = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                cpu[name] += time.process_time() - t0
        return wrapper

    gptq.GPTQPass._accumulate = timed("hessians", acc)  # type: ignore[method-assign]
    gptq.GPTQPass._run = timed("gptq", run)  # type: ignore[method-assign]
    t0 = time.process_time()
    compile_model(model, out, CompileOptions(plan=plan, calib=calib, validate=False, report=report))
    cpu["compile"] = time.process_time() - t0
    print(json.dumps(cpu))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help=" | ".join(realdata.MODELS))
    ap.add_argument("--presets", nargs="+", default=["w8a8", "w4a8"])
    ap.add_argument("--tag", required=True, help="where the written models go (WORK/TAG)")
    ap.add_argument("--compare", help="an earlier tag: byte-compare the written models with its")
    ap.add_argument("--work", default="/tmp/gptq_speed")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--gptq-source", help="compile with this passes/gptq.py instead (e.g. `git show REV:passes/gptq.py "
                    "> /tmp/gptq_before.py`): the A/B's other side")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    work = Path(args.work)
    (work / args.tag).mkdir(parents=True, exist_ok=True)
    print("CPU seconds (process time) of GPTQ's Hessians, its sweep (the rest of the pass), the compile; wall and "
          "CPU of the whole child process")
    print(f"{'model':<11} {'preset':<6} {'hessians':>8} {'sweep':>7} {'gptq':>7} {'compile':>7} {'wall':>7} "
          f"{'cpu':>7}  load  same")
    for key in args.models:
        calib = feeds_dir(key, args.samples, work)
        model = realdata.fetch_model(key)
        for preset in args.presets:
            plan = unguarded_plan(preset, work)
            out = work / args.tag / f"{key}-{preset}.onnx"
            report = work / args.tag / f"{key}-{preset}.report.json"
            cmd = [sys.executable, __file__, "x", "--tag", "x", "--child", str(model), str(out), str(calib), str(plan),
                   str(report)]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            env = {**os.environ, **({"GPTQ_SOURCE": str(Path(args.gptq_source).resolve())} if args.gptq_source else {})}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode != 0:
                raise SystemExit(f"error: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            same = ""
            if args.compare:
                ref = work / args.compare / out.name
                same = "same" if ref.is_file() and filecmp.cmp(ref, out, shallow=False) else "DIFF"
            print(f"{key:<11} {preset:<6} {got['hessians']:8.2f} {got['gptq'] - got['hessians']:7.2f} "
                  f"{got['gptq']:7.2f} {got['compile']:7.2f} {wall:7.2f} {cpu:7.2f}  {os.getloadavg()[0]:4.1f}  "
                  f"{same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
