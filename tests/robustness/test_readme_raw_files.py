"""Issue 16's done-means: "from a fresh clone, a newcomer goes from a folder of images to a validated deployment
bundle with four commands copied from the README". The README's "From raw files to a validated model" block is
parsed here and its commands run as written (through bash, in a copy of the clone's ``models/``), the set-up
line excepted: it is checked to be the plain venv + ``pip install -e .`` (installing needs the network; this
environment is that install, and ``qcompiler`` on PATH is its entry point).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SETUP = "python3 -m venv .venv && . .venv/bin/activate && pip install -e ."
FLOOR_DB = 25.0  # measured 32.5 dB on the eval split; the README's gate is 20


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## From raw files to a validated model", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section holds one bash block"
    return [ln for ln in blocks[0].splitlines() if ln.strip()]


def test_readme_raw_files_section_is_four_commands_on_files_in_the_clone() -> None:
    cmds = readme_commands()
    assert len(cmds) == 4, cmds
    assert cmds[0] == SETUP
    assert [c.split()[:2] for c in cmds[1:]] == [["qcompiler", "data"], ["qcompiler", "package"],
                                                  ["qcompiler", "verify"]]
    # the folder of images and the model are tracked files of the clone, small
    tracked = subprocess.run(["git", "ls-files", "models"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    images = [t for t in tracked if t.startswith("models/images/")]
    assert len(images) == 8 and all(t.endswith(".jpg") for t in images), images
    assert sum((REPO / t).stat().st_size for t in images) < 200_000
    assert "models/conv_bn_relu.onnx" in tracked and "models/images/" in cmds[1]


def test_readme_raw_files_commands_run_verbatim(tmp_path: Path) -> None:
    shutil.copytree(REPO / "models", tmp_path / "models")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "models").rglob("*") if p.is_file()}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "NO_COLOR": "1"}
    assert shutil.which("qcompiler", path=env["PATH"]), "qcompiler is installed in this environment"
    for cmd in readme_commands()[1:]:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", cmd], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr
    assert "7 files match manifest.json" in proc.stdout and "(recorded " in proc.stdout, proc.stdout
    out = tmp_path / "out"
    # the data step: 5 + 3 disjoint images, ImageNet-normalized NCHW 32x32
    calib, ev = np.load(out / "feeds.calib.npz")["input"], np.load(out / "feeds.eval.npz")["input"]
    assert calib.shape == (5, 1, 3, 32, 32) and ev.shape == (3, 1, 3, 32, 32)
    assert -2.2 < float(calib.min()) < 0 < float(calib.max()) < 2.7
    # the bundle: validated on the eval split above the floor, the gate recorded, verify's line printed
    manifest = json.loads((out / "bundle" / "manifest.json").read_text())
    validation = json.loads((out / "bundle" / "validation.json").read_text())
    assert validation["data"] == "feeds.eval.npz" and validation["samples"] == 3 and validation["passed"] is True
    assert validation["min_sqnr_db"] == 20
    assert validation["worst_output_sqnr_db"] > FLOOR_DB, validation["worst_output_sqnr_db"]
    assert manifest["check"]["sqnr_db"]["logits"] > FLOOR_DB
    assert set(manifest["files"]) >= {"model.onnx", "model.plan.yaml", "validation.json", "validation.html",
                                      "check/feeds.npz", "check/reference.npz"}
    # the inputs are untouched
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in (tmp_path / "models").rglob("*") if p.is_file()} == before
