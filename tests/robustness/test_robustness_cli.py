"""Bad input through the CLI (issue 6): every generated case of ``_robust_cases`` must give exactly one error line
that names the file / node / rule at fault, exit code 2, no traceback, no output (no file, no side file, no
output folder, no staging leftovers) and leave every input file's bytes and mtime as they were.

Cases run in-process through click's CliRunner; a handful also run as real subprocesses (``python -m
qcompiler.cli``) to check the process exit code and that nothing resembling a traceback reaches the terminal.
Also here: a crashing pass is a bug (exit 1, the pass name and the ``--debug`` hint), zero-range activations
compile (scale > 0), rules matching nothing only warn, and the security properties (no unpickling, no YAML
object construction, no plugin imported from a model or plan).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _robust_cases as C

from qcompiler.cli import cli

IDS = C.case_ids()


def test_at_least_200_generated_cases() -> None:
    assert len(IDS) >= 200
    kinds = {i.split("-")[0] for i in IDS}
    assert {"truncated", "bitflip", "not", "empty", "directory", "checker", "external", "traversal", "calib",
            "plan", "pipeline", "unsupported", "absurd", "cli"} <= kinds


def check_rejected(stdout: str, stderr: str, code: int, expected: str, tmp: Path,
                   before: dict[str, tuple[str, str, int]]) -> None:
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1, stderr
    # nothing else but (at most) logging warnings that came before the error
    assert all(ln.startswith("WARNING ") for ln in lines if ln not in errors), stderr
    assert expected in errors[0], (expected, errors[0])
    assert stdout.strip() == "", stdout
    if "below --min-sqnr" in expected:  # a refused model: no model, its report beside it, named in the error line
        assert sorted(p.name for p in (tmp / "out").rglob("*")) == ["q.rejected.report.json"]
        assert str(tmp / "out" / "q.rejected.report.json") in errors[0]
    else:
        assert not (tmp / "out").exists(), sorted(p.name for p in (tmp / "out").rglob("*"))
    assert sorted(p.name for p in tmp.iterdir() if p.name not in ("in", "out") and not p.name.startswith("outside")) == []
    assert C.snapshot(tmp / "in") == before


def prepare(cid: str, tmp: Path) -> tuple[list[str], str, dict[str, tuple[str, str, int]]]:
    inp = tmp / "in"
    inp.mkdir()
    args, expected = C.case_by_id(cid).build(inp, tmp / "out" / "q.onnx")
    return args, expected, C.snapshot(inp)


@pytest.mark.parametrize("cid", IDS)
def test_bad_input_exit_2_one_line_nothing_written(cid: str, tmp_path: Path) -> None:
    args, expected, before = prepare(cid, tmp_path)
    res = CliRunner().invoke(cli, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    check_rejected(res.stdout, res.stderr, res.exit_code, expected, tmp_path, before)


SUBPROCESS_CASES = ["truncated-conv_bn_relu-0.5", "traversal-dotdot", "calib-nan-gemm_head", "plan-bad-regex-conv_bn_relu",
                    "pipeline-unknown-pass", "absurd-constant-of-shape", "not-onnx-random-1", "external-missing-file"]


@pytest.mark.parametrize("cid", SUBPROCESS_CASES)
def test_bad_input_real_process(cid: str, tmp_path: Path) -> None:
    assert cid in IDS
    args, expected, before = prepare(cid, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", *args], capture_output=True, text=True,
                          env=C.env_without_color(), timeout=120)
    check_rejected(proc.stdout, proc.stderr, proc.returncode, expected, tmp_path, before)


# ---------------------------------------------------------------------------------------- bugs: exit 1
CRASH_PLUGIN = '''
from qcompiler.core.pass_base import Pass, PassResult

class Explode(Pass):
    """Crashes on purpose."""
    name = "explode"

    def run(self, ctx):
        return {}["missing key"]
'''


def test_crashing_pass_exit_1_names_pass_and_debug_hint(tmp_path: Path) -> None:
    plugin = tmp_path / "explode.py"
    plugin.write_text(CRASH_PLUGIN)
    model = C.MODELS / "gemm_head.onnx"
    args = ["compile", str(model), "-o", str(tmp_path / "out" / "q.onnx"), "--calib", "none", "--plugin", str(plugin),
            "--pipeline", "cleanup,explode"]
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "pass 'explode'" in lines[0] and "KeyError" in lines[0] and "--debug" in lines[0]
    assert not (tmp_path / "out").exists()
    dbg = subprocess.run([sys.executable, "-m", "qcompiler.cli", "--debug", *args], capture_output=True, text=True,
                         timeout=120)
    assert dbg.returncode == 1 and "Traceback (most recent call last)" in dbg.stderr and "explode.py" in dbg.stderr


# ------------------------------------------------------------------------------- valid edge cases: exit 0
def _activation_scales(model: onnx.ModelProto) -> list[float]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            out.append(float(np.asarray(inits[n.input[1]]).reshape(-1)[0]))
    return out


@pytest.mark.parametrize("fixture", ["conv_bn_relu", "gemm_head", "transformer_block"])
@pytest.mark.parametrize("fill", [0.0, 3.0])
def test_zero_range_activations_get_positive_scales(fixture: str, fill: float, tmp_path: Path) -> None:
    """All-constant calibration data: every activation range is a single value; scales must stay > 0 and the
    output must run with finite values close to the float model's on that same input."""
    import onnxruntime as ort

    data = {k: np.full_like(v, fill) for k, v in C.fixture_npz(fixture).items()}
    np.savez(tmp_path / "const.npz", **data)
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["compile", str(C.MODELS / f"{fixture}.onnx"), "-o", str(out), "--calib",
                                   str(tmp_path / "const.npz"), "--no-validate"])
    assert res.exit_code == 0, res.stderr
    q = onnx.load(str(out))
    scales = _activation_scales(q)
    assert scales and all(np.isfinite(s) and s > 0 for s in scales), scales
    feed = {k: v[0] for k, v in data.items()}
    fo = ort.InferenceSession(str(C.MODELS / f"{fixture}.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)
    qo = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feed)
    for a, b in zip(fo, qo):
        assert np.isfinite(b).all()
        # one value per activation: quantization of the calibrated value itself is exact up to the weight error
        err = np.abs(a.astype(np.float64) - b).max()
        assert err <= 0.05 * max(1.0, float(np.abs(a).max())), err


def test_rule_matching_nothing_warns_and_compiles(tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nrules:\n  - match: {name: no_such_node}\n    skip: true\n")
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["compile", str(C.MODELS / "conv_bn_relu.onnx"), "-o", str(out), "--plan", str(plan),
                                   "--calib", str(C.MODELS / "conv_bn_relu.npz")])
    assert res.exit_code == 0, res.stderr
    assert "rules[0] (name=no_such_node) matches no node" in res.stderr and "error" not in res.stderr
    assert out.is_file()


# ----------------------------------------------------------------------------------------------- security
class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def test_calibration_files_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    arr = np.empty(1, dtype=object)
    arr[0] = _Evil(str(marker))
    np.savez(tmp_path / "evil.npz", input=arr, allow_pickle=True)
    for data in (tmp_path / "evil.npz",):
        res = CliRunner().invoke(cli, ["compile", str(C.MODELS / "gemm_head.onnx"), "-o", str(tmp_path / "q.onnx"),
                                       "--calib", str(data)])
        assert res.exit_code == 2 and "holds Python objects" in res.stderr, res.stderr
        res = CliRunner().invoke(cli, ["validate", str(C.MODELS / "gemm_head.onnx"), str(C.MODELS / "gemm_head.onnx"),
                                       "--data", str(data)])
        assert res.exit_code == 2
    assert not marker.exists()
    # the check is real: numpy with allow_pickle=True would have created the file
    with np.load(tmp_path / "evil.npz", allow_pickle=True) as z:
        z["input"]
    assert marker.exists()


def test_plans_are_loaded_with_safe_load(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"!!python/object/apply:builtins.open ['{marker}', 'w']\n")
    res = CliRunner().invoke(cli, ["compile", str(C.MODELS / "gemm_head.onnx"), "-o", str(tmp_path / "q.onnx"),
                                   "--plan", str(plan)])
    assert res.exit_code == 2 and "not valid YAML/JSON" in res.stderr
    assert not marker.exists()


def test_plugins_only_from_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module name inside a model (metadata, node domain), a plan (comment) or a pipeline is never imported."""
    marker = tmp_path / "imported"
    mod = tmp_path / "evil_plugin_mod.py"
    mod.write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = onnx.load(str(C.MODELS / "gemm_head.onnx"))
    m.metadata_props.add(key="qcompiler.plugin", value="evil_plugin_mod:Pass")
    m.metadata_props.add(key="plugins", value="evil_plugin_mod")
    model = tmp_path / "m.onnx"
    model.write_bytes(m.SerializeToString())
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\ncomment: 'plugin: evil_plugin_mod:Pass'\n"
                    "rules:\n  - match: {op_type: evil_plugin_mod}\n    skip: true\n")
    res = CliRunner().invoke(cli, ["compile", str(model), "-o", str(tmp_path / "q.onnx"), "--plan", str(plan),
                                   "--calib", "none"])
    assert res.exit_code == 0, res.stderr
    res = CliRunner().invoke(cli, ["compile", str(model), "-o", str(tmp_path / "q2.onnx"), "--pipeline",
                                   "cleanup,evil_plugin_mod"])
    assert res.exit_code == 2 and "unknown pass 'evil_plugin_mod'" in res.stderr
    assert "evil_plugin_mod" not in sys.modules and not marker.exists()
    # named by the user, it is imported
    res = CliRunner().invoke(cli, ["compile", str(model), "-o", str(tmp_path / "q3.onnx"), "--plugin", str(mod)])
    assert res.exit_code == 2 and "no Pass subclass" in res.stderr
    assert marker.exists()
