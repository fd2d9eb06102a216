"""Issue 16, "never crash on input": inputs that used to hang, exhaust memory, crash with exit 1 or compile a
broken model. Each one ends as exit 2 with one ``error:`` line naming the file / node / rule, nothing written and
the inputs unchanged — or, where the input is valid after all (IR-version-3 exports, -inf in attention masks),
compiles. The bad files are built here.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _robust_cases as C

from qcompiler import ir
from qcompiler.calib.feeds import MAX_DYNAMIC_DIM
from qcompiler.cli import cli
from qcompiler.core.errors import UserError
from qcompiler.ir import load as ir_load
from qcompiler.plan.spec import MAX_BLOCK_SIZE

BACKEND_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


# ------------------------------------------------------------------------------------------------ helpers
def refused(args: list[Any], expected: list[str], inp: Path, out: Path | None = None) -> str:
    """Run the CLI in-process: exit 2, exactly one ``error:`` line holding every ``expected`` part, no
    traceback, ``out`` not created, ``inp`` unchanged. Returns the error line."""
    before = C.snapshot(inp)
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, repr(res.exception))
    text = res.stdout + res.stderr
    assert "Traceback" not in text and "internal error" not in text, text
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, res.stderr
    for part in expected:
        assert part in errors[0], (part, errors[0])
    if out is not None:
        assert not out.exists() and not out.parent.exists(), sorted(out.parent.rglob("*"))
    assert C.snapshot(inp) == before
    return errors[0]


def refused_process(args: list[Any], expected: list[str], inp: Path, out: Path | None = None) -> str:
    """Like :func:`refused`, as a real process with a timeout (for inputs that used to block forever)."""
    before = C.snapshot(inp)
    proc = subprocess.run([sys.executable, "-m", "qcompiler.cli", *map(str, args)], capture_output=True, text=True,
                          env=C.env_without_color(), timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for part in expected:
        assert part in errors[0], (part, errors[0])
    if out is not None:
        assert not out.exists() and not out.parent.exists()
    assert C.snapshot(inp) == before
    return errors[0]


def compiled(args: list[Any]) -> Any:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr, repr(res.exception))
    return res


@pytest.fixture()
def inp(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    return d


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    return tmp_path / "out" / "q.onnx"


def mm_inputs(inp: Path, n: int = 4) -> tuple[Path, Path]:
    """The one-MatMul model (x [1, 16]) and a stacked calibration file for it."""
    model = C.save(C.matmul_model(), inp / "model.onnx")
    calib = inp / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((n, 1, 16)).astype(np.float32))
    return model, calib


def npy_bytes(header: str, data: bytes = b"") -> bytes:
    """A version 1.0 .npy member with a hand-written header dict (padded as numpy pads it)."""
    h = header.encode("latin1")
    pad = 64 - (10 + len(h) + 1) % 64
    h = h + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + data


def zip_with(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def patch_zip_headers(data: bytes, *, flag: int | None = None, method: int | None = None) -> bytes:
    """Set the general-purpose flag bits (| ``flag``) and / or the compression method of every entry, in the
    local headers and the central directory alike (what an encrypting / deflate64 zip tool writes)."""
    b = bytearray(data)
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        for m in re.finditer(re.escape(sig), bytes(b)):
            i = m.start()
            if flag is not None:
                struct.pack_into("<H", b, i + flag_at, struct.unpack_from("<H", b, i + flag_at)[0] | flag)
            if method is not None:
                struct.pack_into("<H", b, i + method_at, method)
    return bytes(b)


# ====================================================================== regular files only, bounded sizes
def test_calib_fifo_refused_instead_of_blocking(inp: Path, out: Path) -> None:
    model, _ = mm_inputs(inp)
    os.mkfifo(inp / "x.npz")
    refused_process(["compile", model, "-o", out, "--calib", inp / "x.npz"],
                    ["x.npz", "is a FIFO (named pipe), not a regular file"], inp, out)


def test_calib_symlink_to_dev_zero_refused(inp: Path, out: Path) -> None:
    model, _ = mm_inputs(inp)
    (inp / "zero.npz").symlink_to("/dev/zero")
    refused_process(["compile", model, "-o", out, "--calib", inp / "zero.npz"],
                    ["zero.npz", "is a character device, not a regular file"], inp, out)


def test_validate_data_fifo_refused(inp: Path, out: Path) -> None:
    model, calib = mm_inputs(inp)
    os.mkfifo(inp / "held.npz")
    refused_process(["compile", model, "-o", out, "--calib", calib, "--validate-data", inp / "held.npz"],
                    ["held.npz", "is a FIFO"], inp, out)


def test_model_fifo_and_device_refused(inp: Path, out: Path) -> None:
    os.mkfifo(inp / "pipe.onnx")
    (inp / "zero.onnx").symlink_to("/dev/zero")
    refused_process(["compile", inp / "pipe.onnx", "-o", out, "--calib", "none"], ["pipe.onnx", "is a FIFO"], inp, out)
    refused_process(["compile", inp / "zero.onnx", "-o", out, "--calib", "none"],
                    ["zero.onnx", "is a character device"], inp, out)


def test_plan_fifo_refused(inp: Path, out: Path) -> None:
    model, calib = mm_inputs(inp)
    os.mkfifo(inp / "plan.yaml")
    refused_process(["compile", model, "-o", out, "--calib", calib, "--plan", inp / "plan.yaml"],
                    ["plan.yaml", "is a FIFO", "refused as a plan file"], inp, out)


def test_names_file_fifo_refused(inp: Path) -> None:
    model, calib = mm_inputs(inp)
    os.mkfifo(inp / "q.names.json")
    refused_process(["validate", model, model, "--data", calib, "--names", inp / "q.names.json"],
                    ["q.names.json", "is a FIFO", "names file"], inp)


def test_external_data_fifo_refused(inp: Path, out: Path) -> None:
    m = C.matmul_model(k=128, n=128)  # 64 KiB: big enough to stay external
    onnx.save_model(m, str(inp / "model.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    (inp / "w.bin").unlink()
    os.mkfifo(inp / "w.bin")
    refused_process(["compile", inp / "model.onnx", "-o", out, "--calib", "none"],
                    ["w.bin", "is a FIFO", "external data file"], inp, out)


def test_calib_dynamic_dim_beyond_cap_refused_before_allocation(inp: Path, out: Path) -> None:
    """A header may not make qcompiler allocate more than a feed of the model can be: here a dynamic batch of
    2^25 rows (the member itself is a few bytes)."""
    m = C.matmul_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model = C.save(m, inp / "model.onnx")
    big = MAX_DYNAMIC_DIM * 2
    (inp / "calib.npz").write_bytes(zip_with({"x.npy": npy_bytes(
        f"{{'descr': '<f4', 'fortran_order': False, 'shape': (2, {big}, 16), }}", b"\0" * 64)}))
    refused(["compile", model, "-o", out, "--calib", inp / "calib.npz"],
            ["calib.npz", "array 'x'", f"dim 0 ({big}) is beyond the {MAX_DYNAMIC_DIM} limit"], inp, out)


def test_calib_header_declaring_more_than_member_holds_refused(inp: Path, out: Path) -> None:
    model, _ = mm_inputs(inp)
    (inp / "calib.npz").write_bytes(zip_with({"x.npy": npy_bytes(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 1, 16), }", b"\0" * 64)}))
    refused(["compile", model, "-o", out, "--calib", inp / "calib.npz"],
            ["calib.npz", "array 'x' declares shape [100000, 1, 16]", "but its member holds"], inp, out)


# ======================================================================= .npz / .npy that used to exit 1
def test_npz_encrypted_member_refused(inp: Path, out: Path) -> None:
    model, calib = mm_inputs(inp)
    calib.write_bytes(patch_zip_headers(calib.read_bytes(), flag=0x1))
    refused(["compile", model, "-o", out, "--calib", calib], ["calib.npz", "array 'x' is encrypted"], inp, out)


def test_npz_encrypted_member_in_folder_refused(inp: Path, out: Path) -> None:
    model, _ = mm_inputs(inp)
    d = inp / "calib"
    d.mkdir()
    np.savez(d / "000.npz", x=np.ones((1, 16), np.float32))
    (d / "000.npz").write_bytes(patch_zip_headers((d / "000.npz").read_bytes(), flag=0x1))
    refused(["compile", model, "-o", out, "--calib", d], ["000.npz", "array 'x' is encrypted"], inp, out)


def test_npz_deflate64_member_refused(inp: Path, out: Path) -> None:
    model, calib = mm_inputs(inp)
    calib.write_bytes(patch_zip_headers(calib.read_bytes(), method=9))
    refused(["compile", model, "-o", out, "--calib", calib],
            ["calib.npz", "array 'x' uses deflate64 compression"], inp, out)


@pytest.mark.parametrize("header, words", [
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (-4, 1, 16), }", ["shape (-4, 1, 16)", "non-negative"]),
    ("{'descr': np.float32, 'fortran_order': False, 'shape': (4, 1, 16), }", ["malformed .npy header"]),
    ("{'descr': 'not-a-type', 'fortran_order': False, 'shape': (4, 1, 16), }", ["malformed .npy header"]),
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 1, 16.5), }", ["malformed .npy header"]),
    # found by test_fuzz_calibration_data (a duplicated / cut header): numpy's header filter tokenizes an
    # unclosed bracket and raises tokenize.TokenError, which used to exit 1
    ("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 1, 16", ["malformed .npy header", "TokenError"]),
], ids=["negative-shape", "non-literal-descr", "unknown-descr", "float-dim", "unclosed-bracket"])
def test_malformed_npy_header_refused(inp: Path, out: Path, header: str, words: list[str]) -> None:
    model, _ = mm_inputs(inp)
    (inp / "calib.npz").write_bytes(zip_with({"x.npy": npy_bytes(header, b"\0" * 256)}))
    refused(["compile", model, "-o", out, "--calib", inp / "calib.npz"], ["calib.npz", "array 'x'", *words], inp, out)


def test_malformed_npy_header_in_folder_refused(inp: Path, out: Path) -> None:
    model, _ = mm_inputs(inp)
    d = inp / "calib"
    d.mkdir()
    (d / "000.npz").write_bytes(zip_with({"x.npy": npy_bytes(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1, -16), }", b"\0" * 64)}))
    refused(["compile", model, "-o", out, "--calib", d], ["000.npz", "array 'x'", "non-negative"], inp, out)



def test_data_npy_unclosed_header_refused(inp: Path, tmp_path: Path) -> None:
    """`qcompiler data` on a folder of .npy arrays: the same damaged header (tokenize.TokenError inside numpy)
    is one error line naming the file, nothing written."""
    model, _ = mm_inputs(inp)
    d = inp / "arrays"
    d.mkdir()
    np.save(d / "000.npy", np.zeros((1, 16), np.float32))
    (d / "001.npy").write_bytes(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 16", b"\0" * 64))
    out = tmp_path / "out" / "feeds.npz"
    refused(["data", model, d, "-o", out], ["001.npy", "not a readable .npy array", "TokenError"], inp, out)


@pytest.mark.parametrize("extra", [[], ["--external-data", "100000000"]], ids=["default", "external-data-out"])
def test_external_data_location_too_long_for_the_file_system_refused(inp: Path, out: Path,
                                                                     extra: list[str]) -> None:
    """Found by test_fuzz_external_data (location 'a' * 300): stat() raises ENAMETOOLONG, an OSError that used
    to end as exit 1 (at load, and in the output check's scan of the model's external data files)."""
    m = C.matmul_model()
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="a" * 300)
    model = C.save(m, inp / "model.onnx")
    refused(["compile", model, "-o", out, "--calib", "random", *extra],
            ["model.onnx: tensor 'W'", "external data location 'aaaa", "(300 characters) cannot be opened",
             "File name too long"], inp, out)

# ================================================================================ plans that used to exit 1
def test_plan_non_string_key_refused(inp: Path, out: Path) -> None:
    model, calib = mm_inputs(inp)
    (inp / "top.yaml").write_text("version: 1\n1: x\nfoo: y\n")
    refused(["compile", model, "-o", out, "--calib", calib, "--plan", inp / "top.yaml"],
            ["top.yaml", "unknown top-level key '1'"], inp, out)
    # another target's section is not checked against a target: its keys still must be names
    (inp / "targets.yaml").write_text("version: 1\ntargets: {tensorrt: {1: x, foo: y}}\n")
    refused(["compile", model, "-o", out, "--calib", calib, "--plan", inp / "targets.yaml"],
            ["targets.yaml: targets.tensorrt: key 1 (int) is not a name"], inp, out)


@pytest.mark.parametrize("name, text", [
    ("deep.json", "[" * 100_000 + "]" * 100_000),
    ("deep-map.json", '{"version": 1, "comment": ' + '{"a": ' * 5000 + "1" + "}" * 5001),
    ("deep.yaml", "version: 1\ncomment: " + "[" * 100_000 + "]" * 100_000 + "\n"),
], ids=["json-lists", "json-mappings", "yaml-lists"])
def test_plan_nested_too_deeply_refused(inp: Path, out: Path, name: str, text: str) -> None:
    model, calib = mm_inputs(inp)
    (inp / name).write_text(text)
    refused(["compile", model, "-o", out, "--calib", calib, "--plan", inp / name], [name, "nested too deeply"], inp, out)


def test_plan_nested_deeper_than_limit_refused(inp: Path, out: Path) -> None:
    model, calib = mm_inputs(inp)
    (inp / "p.json").write_text('{"version": 1, "comment": ' + "[" * 40 + "]" * 40 + "}")
    refused(["compile", model, "-o", out, "--calib", calib, "--plan", inp / "p.json"],
            ["p.json: comment[0]", "is nested deeper than 32 levels"], inp, out)


@pytest.mark.parametrize("name, text, words", [
    ("huge.yaml", "version: 1" + "0" * 5000 + "\n", ["huge.yaml: not valid YAML/JSON", "4300 digits"]),
    ("huge.json", '{"version": 1' + "0" * 5000 + "}", ["huge.json: not valid YAML/JSON", "4300 digits"]),
    ("month.yaml", "version: 1\ncomment: 2001-13-14\n", ["month.yaml: not valid YAML/JSON", "month must be"]),
], ids=["yaml-int-5001-digits", "json-int-5001-digits", "yaml-13th-month"])
def test_plan_value_the_parser_cannot_build_refused(inp: Path, out: Path, name: str, text: str,
                                                    words: list[str]) -> None:
    """Found by test_fuzz_plan_texts (wrap huge-int): Python's int() refuses over 4300 digits with ValueError,
    and PyYAML's timestamp constructor raises ValueError on an impossible date; both used to exit 1."""
    model, calib = mm_inputs(inp)
    (inp / name).write_text(text)
    refused(["compile", model, "-o", out, "--calib", calib, "--plan", inp / name], words, inp, out)


def test_plan_block_size_2_pow_31_refused(inp: Path, out: Path) -> None:
    model, calib = mm_inputs(inp)
    (inp / "plan.yaml").write_text("version: 1\nrules:\n  - match: {name: mm}\n"
                                   "    weight: {dtype: int4, granularity: block, block_size: 2147483648}\n")
    refused(["compile", model, "-o", out, "--calib", calib, "--plan", inp / "plan.yaml"],
            ["plan.yaml: rules[0].weight: block_size 2147483648 is beyond the 65536 limit"], inp, out)


def test_block_size_beyond_reduction_axis_is_one_block(inp: Path, tmp_path: Path) -> None:
    """The largest allowed block on a K=16 weight: computed as one block (no 65536-row padding), the same
    codes and scales as block 32, with the plan's block_size on DequantizeLinear."""
    model, calib = mm_inputs(inp)
    outs = {}
    for b in (32, MAX_BLOCK_SIZE):
        (inp / f"b{b}.yaml").write_text("version: 1\nrules:\n  - match: {name: mm}\n"
                                        f"    weight: {{dtype: int4, granularity: block, block_size: {b}}}\n")
        q = tmp_path / f"o{b}" / "q.onnx"
        compiled(["compile", model, "-o", q, "--calib", calib, "--plan", inp / f"b{b}.yaml"])
        outs[b] = onnx.load(str(q))
    dq = {b: next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("W"))
          for b, m in outs.items()}
    assert {b: helper.get_attribute_value(next(a for a in n.attribute if a.name == "block_size"))
            for b, n in dq.items()} == {32: 32, MAX_BLOCK_SIZE: MAX_BLOCK_SIZE}
    inits = {b: {t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for b, m in outs.items()}
    assert len(dq[32].input) == len(dq[MAX_BLOCK_SIZE].input)
    for i in range(len(dq[32].input)):  # codes, scale (, zero point)
        a, b = inits[32][dq[32].input[i]], inits[MAX_BLOCK_SIZE][dq[MAX_BLOCK_SIZE].input[i]]
        assert a.shape == b.shape and np.array_equal(a, b), i
    assert inits[32][dq[32].input[1]].shape == (1, 8)  # one block along K=16


@pytest.mark.parametrize("axis", [99, -3, 2])
def test_plan_axis_outside_weight_rank_refused(inp: Path, out: Path, axis: int) -> None:
    model, calib = mm_inputs(inp)
    (inp / "plan.yaml").write_text(f"version: 1\nrules:\n  - match: {{name: mm}}\n"
                                   f"    weight: {{granularity: per_channel, axis: {axis}}}\n")
    refused(["compile", model, "-o", out, "--calib", calib, "--plan", inp / "plan.yaml"],
            ["plan.yaml: rules[0] (name=mm).weight", f"axis {axis} is outside weight 'W' of node 'mm'",
             "rank 2", "[-2, 1]"], inp, out)


def test_plan_default_axis_outside_weight_rank_refused(inp: Path, out: Path) -> None:
    model, calib = mm_inputs(inp)
    (inp / "plan.yaml").write_text("version: 1\ndefaults:\n  weight: {axis: 5}\n")
    refused(["compile", model, "-o", out, "--calib", calib, "--plan", inp / "plan.yaml"],
            ["plan.yaml: defaults.weight: axis 5 is outside weight 'W' of node 'mm'"], inp, out)


# ====================================================================================== models
def test_graph_name_not_utf8_refused(inp: Path, out: Path) -> None:
    m = C.matmul_model()
    m.graph.name = "gX"
    data = m.SerializeToString()
    assert data.count(b"gX") == 1
    (inp / "model.onnx").write_bytes(data.replace(b"gX", b"g\xff"))
    _, calib = inp / "model.onnx", inp / "calib.npz"
    np.savez(calib, x=np.ones((2, 1, 16), np.float32))
    refused(["compile", inp / "model.onnx", "-o", out, "--calib", calib],
            ["model.onnx: GraphProto.name b'g\\xff' is not valid UTF-8 text"], inp, out)


def _dup_names() -> onnx.ModelProto:
    m = C.matmul_model()
    m.graph.node[1].name = "mm"
    return m


def _init_type_mismatch() -> onnx.ModelProto:
    """An initializer that is also a graph input, of another element type than the input declares."""
    m = C.matmul_model()
    m.graph.input.append(C.vi("W", [16, 8], TensorProto.DOUBLE))
    return m


def _if_branch_counts() -> onnx.ModelProto:
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["a"], name="t")], "then", [],
                               [C.vi("a", [1, 4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["b"], name="e"),
                                helper.make_node("Identity", ["x"], ["c"], name="e2")], "else", [],
                               [C.vi("b", [1, 4]), C.vi("c", [1, 4])])
    return C.small_model([helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g,
                                           else_branch=else_g)],
                         [C.vi("cond", [], TensorProto.BOOL), C.vi("x", [1, 4])], [C.vi("y", [1, 4])])


def _opset_99() -> onnx.ModelProto:
    m = C.matmul_model()
    m.opset_import[0].version = 99
    return m


@pytest.mark.parametrize("make, words", [
    (_dup_names, ["two nodes with same node name (mm)"]),
    (_init_type_mismatch, ["W"]),
    (_if_branch_counts, ["branch"]),
    (_opset_99, ["Opset 99"]),
], ids=["duplicate-node-names", "initializer-type", "if-branch-outputs", "opset-99"])
def test_model_onnxruntime_refuses_is_user_error(inp: Path, out: Path, make: Any, words: list[str]) -> None:
    m = make()
    assert not C.onnx_rejects(m.SerializeToString())  # the ONNX checker accepts it ...
    with pytest.raises(Exception, match=r"ONNXRuntimeError"):  # ... onnxruntime does not
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    model = C.save(m, inp / "model.onnx")
    line = refused(["compile", model, "-o", out, "--calib", "random"],
                   ["model.onnx: onnxruntime refuses the model: ", *words], inp, out)
    assert "[ONNXRuntimeError]" not in line and "onnxruntime_src" not in line


def test_load_checks_run_once_per_content_and_again_when_the_file_changes(inp: Path, monkeypatch: Any) -> None:
    """The checker / shape inference / onnxruntime trial of a load are remembered by the file's path and content
    digest: the same bytes loaded again (the candidate compiles of --plan auto) are not re-checked, and a file
    replaced by a model onnxruntime refuses is refused, whatever its timestamps."""
    runs: list[str] = []
    real = ir_load._check_runtime
    monkeypatch.setattr(ir_load, "_check_runtime", lambda m, p, **kw: (runs.append(str(p)), real(m, p, **kw))[1])
    path = C.save(C.matmul_model(seed=123), inp / "model.onnx")
    ir.load_model(path)
    ir.load_model(path)
    ir.load_model(path, check=False)
    assert runs == [str(path)]
    bad = _dup_names()
    stat = path.stat()
    C.save(bad, path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same timestamps: only the content tells
    with pytest.raises(UserError, match="onnxruntime refuses the model"):
        ir.load_model(path)
    assert len(runs) == 2


def test_constant_of_shape_in_if_branch_refused(inp: Path, out: Path) -> None:
    """The load-time size check sees subgraph bodies: a 2^40-element ConstantOfShape inside an If branch."""
    shape = numpy_helper.from_array(np.array([1 << 20, 1 << 20], np.int64), "shape")
    then_g = helper.make_graph([helper.make_node("ConstantOfShape", ["shape"], ["big"], name="fill"),
                                helper.make_node("ReduceSum", ["big"], ["s"], name="sum", keepdims=0)],
                               "then", [], [C.vi("s", [])], initializer=[shape])
    else_g = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["s2"], name="sum2", keepdims=0)], "else", [],
                               [C.vi("s2", [])])
    m = C.small_model([helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g,
                                        else_branch=else_g)],
                      [C.vi("cond", [], TensorProto.BOOL), C.vi("x", [1, 4])], [C.vi("y", [])])
    assert not C.onnx_rejects(m.SerializeToString())
    model = C.save(m, inp / "model.onnx")
    refused(["compile", model, "-o", out, "--calib", "random"],
            ["model.onnx: tensor 'big' (output of node 'fill') would have 1099511627776 elements"], inp, out)


def _bn_model(poison: str, value: float) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    params = {"gamma": np.ones(4, np.float32), "beta": np.zeros(4, np.float32),
              "mean": np.zeros(4, np.float32), "var": np.ones(4, np.float32)}
    params[poison] = params[poison].copy()
    params[poison][2] = value
    inits = [numpy_helper.from_array(w, "W"), *(numpy_helper.from_array(v, k) for k, v in params.items())]
    return C.small_model([helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                          helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"],
                                           name="bn")],
                         [C.vi("x", [1, 3, 8, 8])], [C.vi("y", [1, 4, 8, 8])], inits, check=True)


@pytest.mark.parametrize("poison, value", [("gamma", np.nan), ("mean", np.nan), ("var", np.inf),
                                           ("beta", -np.inf)])
def test_batchnorm_nan_parameter_refused_at_fold(inp: Path, out: Path, poison: str, value: float) -> None:
    model = C.save(_bn_model(poison, value), inp / "model.onnx")
    refused(["compile", model, "-o", out, "--calib", "random"],
            ["node 'bn' (BatchNormalization): parameter '" + poison + "' contains NaN or Inf"], inp, out)


def test_batchnorm_negative_variance_refused_at_fold(inp: Path, out: Path) -> None:
    model = C.save(_bn_model("var", -1.0), inp / "model.onnx")
    refused(["compile", model, "-o", out, "--calib", "random"],
            ["node 'bn' (BatchNormalization): variance + epsilon is not positive", "'var'"], inp, out)


# ========================================================================== verify: tampered bundles
@pytest.fixture(scope="module")
def bundle_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bundle")
    model, calib = mm_inputs(d)
    compiled(["package", model, "-o", d / "b", "--calib", calib, "--zip"])
    assert (d / "b" / "manifest.json").is_file() and (d / "b.zip").is_file()
    return d


@pytest.mark.parametrize("key, value, words", [
    ("versions", [], ["'versions' must be a mapping, got list"]),
    ("check", "x", ["'check' must be a mapping, got str"]),
    ("check", {"sqnr_db": {"y": "abc"}}, ["'check.sqnr_db.y' must be a number, got 'abc'"]),
    ("check", {"sqnr_db": {"y": [1]}}, ["'check.sqnr_db.y' must be a number, got list"]),
    ("check", {"sqnr_db": {}, "tolerance_db": "wide"}, ["'check.tolerance_db' must be a number"]),
    ("validation", [], ["'validation' must be a mapping, got list"]),
    ("validation", {"min_sqnr_db": {"x": 1}}, ["'validation.min_sqnr_db' must be a number, got dict"]),
    ("files", {"model.onnx": {"bytes": "12", "sha256": "x"}}, ["files.model.onnx: expected"]),
], ids=["versions", "check", "sqnr-text", "sqnr-list", "tolerance", "validation", "gate", "file-bytes"])
def test_verify_tampered_manifest_types(bundle_src: Path, tmp_path: Path, key: str, value: Any,
                                        words: list[str]) -> None:
    b = tmp_path / "in" / "b"
    shutil.copytree(bundle_src / "b", b)
    manifest = json.loads((b / "manifest.json").read_text())
    manifest[key] = value
    (b / "manifest.json").write_text(json.dumps(manifest))
    refused(["verify", b], ["manifest.json: ", *words], tmp_path / "in")


def test_verify_manifest_fifo_refused(bundle_src: Path, tmp_path: Path) -> None:
    b = tmp_path / "in" / "b"
    shutil.copytree(bundle_src / "b", b)
    (b / "manifest.json").unlink()
    os.mkfifo(b / "manifest.json")
    refused_process(["verify", b], ["manifest.json", "is a FIFO"], tmp_path / "in")


def test_verify_bundle_fifo_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    os.mkfifo(tmp_path / "in" / "b.zip")
    refused_process(["verify", tmp_path / "in" / "b.zip"], ["b.zip", "is a FIFO"], tmp_path / "in")


def test_verify_zip_encrypted_entry_refused(bundle_src: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    z = tmp_path / "in" / "b.zip"
    z.write_bytes(patch_zip_headers((bundle_src / "b.zip").read_bytes(), flag=0x1))
    refused(["verify", z], ["b.zip: entry 'b/", "is encrypted"], tmp_path / "in")


def test_verify_zip_bad_crc_refused(bundle_src: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    z = tmp_path / "in" / "b.zip"
    data = bytearray((bundle_src / "b.zip").read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("b/manifest.json")
    # the manifest's CRC-32 in the central directory and the local header: one bit off
    for sig, crc_at in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        for m in re.finditer(re.escape(sig), bytes(data)):
            if struct.unpack_from("<I", data, m.start() + crc_at)[0] == info.CRC:
                struct.pack_into("<I", data, m.start() + crc_at, info.CRC ^ 1)
    z.write_bytes(bytes(data))
    refused(["verify", z], ["b.zip: entry 'b/manifest.json' cannot be extracted", "BadZipFile"], tmp_path / "in")


# ============================================================================ valid after all: compiles
IR3_MODELS = ["test_operator_pad", "test_operator_clip", "test_operator_chunk", "test_operator_concat2",
              "test_operator_repeat", "test_operator_mm"]


@pytest.mark.parametrize("name", IR3_MODELS)
def test_ir_version_3_backend_models_compile(tmp_path: Path, name: str) -> None:
    """ONNX backend test corpus (shipped with onnx): IR-version-3 exports. Their opsets (< 11) are upgraded when
    loaded, which lifts the IR version to the new opset's; had it stayed below 4, every initializer would have to be
    listed as a graph input too."""
    src = BACKEND_DATA / "pytorch-operator" / name / "model.onnx"
    assert src.is_file(), src  # part of the onnx wheel
    assert onnx.load(str(src)).ir_version == 3
    q = tmp_path / "out" / "q.onnx"
    compiled(["compile", src, "-o", q, "--calib", "random"])
    m = onnx.load(str(q))
    onnx.checker.check_model(m, full_check=True)
    assert ir.opset_of(m) >= 11 and m.ir_version >= 6, (ir.opset_of(m), m.ir_version)
    listed = {i.name for i in m.graph.input}
    assert m.ir_version >= 4 or all(t.name in listed for t in m.graph.initializer)
    ort.InferenceSession(str(q), providers=["CPUExecutionProvider"])


def _mask_model() -> onnx.ModelProto:
    """scores = x @ W + mask; y = Softmax(scores): the mask input holds 0 / -inf, as attention exports feed it."""
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    return C.small_model([helper.make_node("MatMul", ["x", "W"], ["s"], name="mm"),
                          helper.make_node("Add", ["s", "mask"], ["m"], name="add_mask"),
                          helper.make_node("Softmax", ["m"], ["y"], name="softmax", axis=-1)],
                         [C.vi("x", [1, 16]), C.vi("mask", [1, 8])], [C.vi("y", [1, 8])],
                         [numpy_helper.from_array(w, "W")], check=True)


def _mask_feeds(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, 1, 8), np.float32)
    mask[:, :, 5:] = -np.inf
    return {"x": rng.standard_normal((n, 1, 16)).astype(np.float32), "mask": mask}


def test_calibration_and_validation_accept_minus_inf_mask(inp: Path, tmp_path: Path) -> None:
    model = C.save(_mask_model(), inp / "model.onnx")
    np.savez(inp / "calib.npz", **_mask_feeds(8, 0))
    np.savez(inp / "held.npz", **_mask_feeds(4, 1))
    q = tmp_path / "out" / "q.onnx"
    compiled(["compile", model, "-o", q, "--calib", inp / "calib.npz", "--validate-data", inp / "held.npz"])
    m = onnx.load(str(q))
    scales = [numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith(":s")]
    assert scales and all(np.isfinite(s).all() and (s > 0).all() for s in scales)
    feeds = {k: v[0] for k, v in _mask_feeds(1, 2).items()}
    y = ort.InferenceSession(str(q), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.isfinite(y).all() and np.allclose(y[:, 5:], 0.0) and np.isclose(y.sum(), 1.0, atol=1e-3)


def test_plus_inf_in_quantized_input_keeps_ranges_finite(inp: Path, tmp_path: Path) -> None:
    model, calib = mm_inputs(inp)
    x = np.random.default_rng(0).standard_normal((4, 1, 16)).astype(np.float32)
    x[1, 0, 3] = np.inf
    np.savez(calib, x=x)
    q = tmp_path / "out" / "q.onnx"
    compiled(["compile", model, "-o", q, "--plan", "default", "--calib", calib])
    m = onnx.load(str(q))
    x_scale = [numpy_helper.to_array(t) for t in m.graph.initializer if t.name == "x:s"]
    finite = x[np.isfinite(x)]  # the range of the finite values: +inf is counted apart, not in the range
    assert x_scale and np.isclose(float(x_scale[0]), (finite.max() - min(finite.min(), 0)) / 255, rtol=1e-5)


def test_nan_in_calibration_still_refused(inp: Path, out: Path) -> None:
    model = C.save(_mask_model(), inp / "model.onnx")
    feeds = _mask_feeds(4, 0)
    feeds["mask"][2, 0, 1] = np.nan
    np.savez(inp / "calib.npz", **feeds)
    refused(["compile", model, "-o", out, "--calib", inp / "calib.npz"],
            ["calib.npz: sample 2: array 'mask' contains NaN (first at index (0, 1))"], inp, out)
