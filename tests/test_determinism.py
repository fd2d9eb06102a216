"""Determinism (issue 6): the same input, plan and calibration data give byte-identical output files — model,
external data and the resolved-plan side file — whatever the output folder, the working directory or the
Python hash seed (set iteration order), and so do deployment bundles.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from qcompiler.cli import cli

MODELS = Path(__file__).resolve().parent.parent / "models"


def digests(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


CASES = {
    "conv-w8a8": ("conv_bn_relu", ["--plan", "w8a8"]),
    "transformer-percentile-external": ("transformer_block", ["--plan", "w8a8-percentile", "--external-data", "0"]),
    "transformer-w4a16": ("transformer_block", ["--plan", "w4a16"]),
    "fp16-conv": ("fp16_conv", []),
    "opset11-upgrade": ("opset11_constants", ["--plan", "w4a8"]),
    "conv-compact-names-external": ("conv_bn_relu", ["--compact-names", "--external-data", "0"]),
    "conv-auto-ort-qop": ("conv_bn_relu", ["--plan", "w8a8-auto", "--target", "ort-qop"]),
    "transformer-dynamic-ort-qop": ("transformer_block", ["--plan", "w8a8-dynamic", "--target", "ort-qop"]),
}


@pytest.mark.parametrize("cid", sorted(CASES))
def test_same_inputs_same_bytes_in_other_folder_and_cwd(cid: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    fixture, extra = CASES[cid]
    runs = []
    for i in range(2):
        work = tmp_path / f"run{i}" / ("deeper" * i)
        work.mkdir(parents=True)
        monkeypatch.chdir(work)
        res = CliRunner().invoke(cli, ["compile", str(MODELS / f"{fixture}.onnx"), "-o", "out/q.onnx", "--calib",
                                       str(MODELS / f"{fixture}.npz"), "--calib-samples", "8", *extra])
        assert res.exit_code == 0, res.stderr
        runs.append(digests(work / "out"))
    assert runs[0] == runs[1]
    assert "q.onnx" in runs[0] and "q.plan.yaml" in runs[0]
    if "--external-data" in extra:
        assert "q.onnx.data" in runs[0]
    if "--compact-names" in extra:
        assert "q.names.json" in runs[0]


def test_same_bytes_across_processes_with_other_hash_seeds(tmp_path: Path) -> None:
    """Separate interpreters with different PYTHONHASHSEED: any set/dict-order dependence would show here."""
    outs = []
    for seed in ("1", "12345"):
        work = tmp_path / f"p{seed}"
        work.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed}
        for fixture, plan in (("transformer_block", "w8a8"), ("shared_weight", "w4a8")):
            proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", "compile", str(MODELS / f"{fixture}.onnx"),
                                   "-o", str(work / f"{fixture}.onnx"), "--plan", plan, "--calib",
                                   str(MODELS / f"{fixture}.npz"), "--calib-samples", "8", "-q"],
                                  cwd=work, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
        outs.append(digests(work))
    assert outs[0] == outs[1] and len(outs[0]) == 4


def test_bundles_are_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = []
    for i in range(2):
        work = tmp_path / f"b{i}"
        work.mkdir()
        monkeypatch.chdir(work)
        res = CliRunner().invoke(cli, ["package", str(MODELS / "transformer_block.onnx"), "-o", "bundle", "--calib",
                                       str(MODELS / "transformer_block.npz"), "--calib-samples", "8", "--zip",
                                       "--plan", "w4a16", "-q"])
        assert res.exit_code == 0, res.stderr
        runs.append(digests(work))
    assert runs[0] == runs[1]
    assert {"bundle.zip", "bundle/manifest.json", "bundle/model.onnx", "bundle/validation.html"} <= set(runs[0])
