"""The long fuzz profile (issue 16): every ``tests/robustness/test_robustness_fuzz*.py`` generator with
``QCOMPILER_FUZZ_PROFILE=long`` (4x the CI examples), recording every case instead of stopping at the first
violation. Prints a table of cases by category and exit code, the number of distinct cases, and every
violation grouped by category and cause, each with a reproducer.

    python benchmarks/fuzz_long.py                    # the long profile (a few minutes on 2 cores)
    python benchmarks/fuzz_long.py --profile default  # the CI profile, recorded the same way
    python benchmarks/fuzz_long.py --replay '{"category": "calib", "params": {...}}'   # one case, verbosely

Exit status: 0 when no case violated the contract, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests" / "robustness"


def replay(case_json: str) -> int:
    sys.path.insert(0, str(TESTS))
    import test_robustness_fuzz  # noqa: F401  (registers the builders)
    import test_robustness_fuzz_contract as F
    import test_robustness_fuzz_data  # noqa: F401
    import test_robustness_fuzz_files  # noqa: F401

    case = json.loads(case_json)
    out = F.run_case(case["category"], case["params"])
    print(f"category {out.category}: exit {out.exit_code}")
    print(f"error line: {out.error or '(none)'}")
    for v in out.violations:
        print(f"VIOLATION: {v}")
    return 1 if out.violations else 0


def _cause(v: str) -> str:
    """A violation without the case-specific parts (paths, numbers), to group cases by cause."""
    v = re.sub(r"/tmp/qcompiler-fuzz-[^/\s']+", "<case>", v)
    v = re.sub(r"'[^']*'", "'…'", v)
    return re.sub(r"\d+", "N", v)[:160]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="long", choices=["long", "default"])
    ap.add_argument("--replay", help="run one case given as JSON (from a failure's reproducer)")
    ap.add_argument("--keep", help="also write the recorded cases (JSON lines) here")
    args = ap.parse_args()
    if args.replay:
        return replay(args.replay)
    with tempfile.TemporaryDirectory() as td:
        record = Path(args.keep or Path(td) / "cases.jsonl")
        record.unlink(missing_ok=True)
        env = {**os.environ, "QCOMPILER_FUZZ_PROFILE": args.profile, "QCOMPILER_FUZZ_RECORD": str(record)}
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *sorted(str(p) for p in TESTS.glob("test_robustness_fuzz*.py"))],
                              cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.time() - t0
        rows = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()] \
            if record.exists() else []
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
        print(f"pytest exited {proc.returncode} (a generator itself failed); the table covers what was recorded")
    distinct = {json.dumps([r["category"], r["params"]], sort_keys=True) for r in rows}
    by_cat: dict[str, Counter[str]] = defaultdict(Counter)
    bad: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        key = json.dumps([r["category"], r["params"]], sort_keys=True)
        by_cat[r["category"]][str(r["exit"])] += 1
        if r["violations"]:
            bad[r["category"]].add(key)
    print(f"fuzz profile '{args.profile}': {len(rows)} cases ({len(distinct)} distinct) in {seconds:.0f} s")
    print(f"{'category':16s} {'cases':>6s} {'distinct':>8s} {'exit 0':>7s} {'exit 2':>7s} {'other':>6s} "
          f"{'violating':>9s}")
    for cat in sorted(by_cat):
        c = by_cat[cat]
        n = sum(c.values())
        nd = len({d for d in distinct if json.loads(d)[0] == cat})
        other = n - c["0"] - c["2"]
        print(f"{cat:16s} {n:6d} {nd:8d} {c['0']:7d} {c['2']:7d} {other:6d} {len(bad[cat]):9d}")
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    seen: set[str] = set()
    for r in rows:
        key = json.dumps([r["category"], r["params"]], sort_keys=True)
        if not r["violations"] or key in seen:
            continue
        seen.add(key)
        groups[r["category"], _cause(r["violations"][0])].append(r)
    n_bad = len(seen)
    print(f"\nviolations: {n_bad} distinct case(s) in {len(groups)} group(s)")
    for (cat, cause), rs in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        case = json.dumps({"category": cat, "params": rs[0]["params"]}, sort_keys=True)
        print(f"- [{cat}] x{len(rs)}: {cause}")
        print(f"    reproduce: python benchmarks/fuzz_long.py --replay {shlex.quote(case)}")
    return 1 if n_bad or proc.returncode not in (0, 1) else 0


if __name__ == "__main__":
    sys.exit(main())
