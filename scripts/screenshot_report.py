"""Render a bundle's ``validation.html`` in headless Chromium: screenshot + DOM check (not part of the tests).

    python scripts/screenshot_report.py [--bundle BUNDLE] [--model M.onnx --calib DATA] [--out report.png]

Without ``--bundle`` it packages ``--model`` (default: the ``transformer_block`` fixture) into a temporary bundle
first. Chromium comes from Debian (``apt-get install -y chromium``) and runs with networking, sync, component
updates and the GPU off, in a throw-away profile. The script checks that the rendered DOM holds the per-layer
SVG chart with one bar per layer shown and that the page loaded nothing from outside (it has no URLs to load),
then writes the PNG; look at it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no chromium found: apt-get install -y chromium")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "transformer_block.onnx")
    ap.add_argument("--calib", type=Path, default=REPO / "models" / "transformer_block.npz")
    ap.add_argument("--min-sqnr", type=float, default=None)
    ap.add_argument("--out", type=Path, default=Path("validation.png"))
    ap.add_argument("--size", default="1100,1500")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="qcompiler-shot-") as td:
        bundle = args.bundle
        if bundle is None:
            bundle = Path(td) / "bundle"
            cmd = [sys.executable, "-m", "qcompiler.cli", "package", str(args.model), "-o", str(bundle),
                   "--calib", str(args.calib), "-q"]
            if args.min_sqnr is not None:
                cmd += ["--min-sqnr", str(args.min_sqnr)]
            subprocess.run(cmd, check=True)
        page = (bundle / "validation.html").resolve()
        html = page.read_text(encoding="utf-8")
        if re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", html):
            print("FAIL: the page references external resources")
            return 1
        profile = Path(td) / "profile"
        base = [chromium(), *FLAGS, f"--user-data-dir={profile}"]
        dom = subprocess.run([*base, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
        bars = dom.stdout.count("<rect")
        svg = "<svg" in dom.stdout
        shot = subprocess.run([*base, f"--screenshot={args.out.resolve()}", f"--window-size={args.size}",
                               page.as_uri()], capture_output=True, text=True, timeout=120)
        if shot.returncode != 0 or not args.out.exists():
            print(shot.stderr[-2000:])
            print("FAIL: no screenshot")
            return 1
        print(f"rendered {page}: svg chart {'present' if svg else 'MISSING'}, {bars} bars; screenshot {args.out}")
        return 0 if svg and bars > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
