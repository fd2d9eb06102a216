"""Generated bad inputs for the CLI (issue 6): each case builds its files in a folder and says how to call
``qcompiler`` on them and which text the one error line must contain.

A case's ``build(inp, out)`` writes inputs under ``inp`` and returns ``(argv, expected)``; ``out`` is the output
model path (its folder does not exist and must not exist afterwards). Corruption cases (truncated / bit-flipped
files) are kept only when an independent oracle — ``onnx`` itself (protobuf parse, graph / ir_version / opset
present, ``onnx.checker.check_model``) — rejects the mutated file, so every case here is really bad input.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
FIXTURES = ["conv_bn_relu", "convtranspose_bn", "depthwise", "fp16_conv", "gemm_head", "opset11_constants",
            "shared_weight", "transformer_block"]

Build = Callable[[Path, Path], tuple[list[str], str]]


@dataclass(frozen=True)
class Case:
    id: str
    build: Build


CASES: list[Case] = []


def case(cid: str) -> Callable[[Build], Build]:
    def deco(fn: Build) -> Build:
        CASES.append(Case(cid, fn))
        return fn
    return deco


def add(cid: str, fn: Build) -> None:
    CASES.append(Case(cid, fn))


# ---------------------------------------------------------------------------------------------- helpers
def fixture_bytes(name: str) -> bytes:
    return (MODELS / f"{name}.onnx").read_bytes()


def fixture_npz(name: str) -> dict[str, np.ndarray]:
    with np.load(MODELS / f"{name}.npz") as z:
        return {k: np.array(z[k]) for k in z.files}


def onnx_rejects(data: bytes) -> bool:
    """The oracle: does the ONNX library itself refuse this file as a model?"""
    m = onnx.ModelProto()
    try:
        m.ParseFromString(data)
    except Exception:
        return True
    if m.ir_version <= 0 or not m.HasField("graph") or not m.opset_import:
        return True
    try:
        onnx.checker.check_model(m)
    except Exception:
        return True
    return False


def small_model(nodes: list[Any], inputs: list[Any], outputs: list[Any], inits: list[Any] = (),  # type: ignore[assignment]
                opset: int = 17, ir_version: int = 8, check: bool = False) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir_version
    if check:
        onnx.checker.check_model(m)
    return m


def vi(name: str, dims: list[Any], dtype: int = TensorProto.FLOAT) -> Any:
    return helper.make_tensor_value_info(name, dtype, dims)


def matmul_model(k: int = 16, n: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x[1, k] -> MatMul(W[k, n]) -> Relu -> y: one quantizable node, valid."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    return small_model([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                        helper.make_node("Relu", ["h"], ["y"], name="relu")],
                       [vi("x", [1, k])], [vi("y", [1, n])], [numpy_helper.from_array(w, "W")], check=True)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def compile_args(model: Path, out: Path, *extra: Any) -> list[str]:
    return ["compile", str(model), "-o", str(out), "--calib", "none", *map(str, extra)]


# =============================================================================== A. truncated .onnx files
_TRUNCATE_AT = [0.001, 0.02, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.97, 0.999]


def _truncated(name: str, frac: float) -> Build:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        data = fixture_bytes(name)
        p = inp / "model.onnx"
        p.write_bytes(data[: max(1, int(len(data) * frac))])
        return compile_args(p, out), "model.onnx"
    return build


for _name in FIXTURES:
    _data = fixture_bytes(_name)
    for _frac in _TRUNCATE_AT:
        if onnx_rejects(_data[: max(1, int(len(_data) * _frac))]):
            add(f"truncated-{_name}-{_frac}", _truncated(_name, _frac))


# ============================================================================= B. bit-flipped .onnx files
_FLIPS_PER_FIXTURE = 7


def _flipped(name: str, pos: int, bit: int) -> Build:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        data = bytearray(fixture_bytes(name))
        data[pos] ^= 1 << bit
        p = inp / "model.onnx"
        p.write_bytes(bytes(data))
        return compile_args(p, out), "model.onnx"
    return build


for _i, _name in enumerate(FIXTURES):
    _data = fixture_bytes(_name)
    _rng = np.random.default_rng(1000 + _i)
    _kept = 0
    for _ in range(400):
        _pos, _bit = int(_rng.integers(0, len(_data))), int(_rng.integers(0, 8))
        _m = bytearray(_data)
        _m[_pos] ^= 1 << _bit
        if onnx_rejects(bytes(_m)):
            add(f"bitflip-{_name}-{_pos}.{_bit}", _flipped(_name, _pos, _bit))
            _kept += 1
            if _kept == _FLIPS_PER_FIXTURE:
                break


# =================================================================================== C. not ONNX at all
def _npz_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, x=np.zeros(3))
    return buf.getvalue()


def _zip_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model.onnx", fixture_bytes("gemm_head"))
    return buf.getvalue()


_NOT_ONNX: dict[str, Callable[[], bytes]] = {
    "text": lambda: b"hello, this is not a model\n",
    "png": lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(64)),
    "npz": _npz_bytes,
    "zip-of-model": _zip_bytes,
    "json": lambda: json.dumps({"graph": {"node": []}, "ir_version": 8}).encode(),
    "yaml": lambda: b"version: 1\ndefaults: {}\n",
    "pdf": lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
    "elf": lambda: b"\x7fELF\x02\x01\x01" + b"\x00" * 57,
    "zeros": lambda: b"\x00" * 256,
    "ones": lambda: b"\xff" * 256,
    "random-1": lambda: np.random.default_rng(1).bytes(1000),
    "random-2": lambda: np.random.default_rng(2).bytes(50),
    "random-3": lambda: np.random.default_rng(3).bytes(4096),
    "tensorproto": lambda: numpy_helper.from_array(np.ones((4, 4), np.float32), "w").SerializeToString(),
    "graphproto": lambda: matmul_model().graph.SerializeToString(),
    "utf16": lambda: "not a model".encode("utf-16"),
}


def _not_onnx(kind: str) -> Build:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        p = inp / "model.onnx"
        p.write_bytes(_NOT_ONNX[kind]())
        return compile_args(p, out), "model.onnx"
    return build


for _kind, _make in _NOT_ONNX.items():
    assert onnx_rejects(_make()), _kind
    add(f"not-onnx-{_kind}", _not_onnx(_kind))


# ======================================================================= D. empty file, folder, missing
@case("empty-file")
def _empty(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(b"")
    return compile_args(inp / "model.onnx", out), "model.onnx: empty file"


@case("directory")
def _directory(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").mkdir()
    return compile_args(inp / "model.onnx", out), "is a directory"


@case("missing-file")
def _missing(inp: Path, out: Path) -> tuple[list[str], str]:
    return compile_args(inp / "nope.onnx", out), "nope.onnx: no such file"


@case("broken-symlink")
def _broken_symlink(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").symlink_to(inp / "gone.onnx")
    return compile_args(inp / "model.onnx", out), "model.onnx: no such file"


@case("symlink-to-directory")
def _symlink_dir(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "d").mkdir()
    (inp / "model.onnx").symlink_to(inp / "d")
    return compile_args(inp / "model.onnx", out), "is a directory"


@case("empty-file-inspect")
def _empty_inspect(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(b"")
    return ["inspect", str(inp / "model.onnx")], "model.onnx: empty file"


# =================================================================================== E. checker failures
def _checker_case(cid: str, make: Callable[[], onnx.ModelProto], expect: str = "fails the ONNX checker") -> None:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        p = save(make(), inp / "model.onnx")
        return compile_args(p, out), expect
    assert onnx_rejects(make().SerializeToString()), cid
    add(f"checker-{cid}", build)


def _unknown_op() -> onnx.ModelProto:
    return small_model([helper.make_node("NoSuchOp", ["x"], ["y"], name="bad")], [vi("x", [1])], [vi("y", [1])])


def _undefined_input() -> onnx.ModelProto:
    return small_model([helper.make_node("Add", ["x", "ghost"], ["y"], name="add")], [vi("x", [1])], [vi("y", [1])])


def _duplicate_output() -> onnx.ModelProto:
    return small_model([helper.make_node("Relu", ["x"], ["y"], name="a"), helper.make_node("Neg", ["x"], ["y"], name="b")],
                       [vi("x", [1])], [vi("y", [1])])


def _bad_attr_type() -> onnx.ModelProto:
    m = matmul_model()
    m.graph.node.append(helper.make_node("Softmax", ["y"], ["z"], name="sm", axis="one"))
    m.graph.output.append(vi("z", [1, 8]))
    return m


def _ir_too_new() -> onnx.ModelProto:
    m = matmul_model()
    m.ir_version = 99
    return m


def _raw_size_mismatch() -> onnx.ModelProto:
    m = matmul_model()
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-4]
    return m


def _empty_graph_name() -> onnx.ModelProto:
    m = matmul_model()
    m.graph.name = ""
    return m


def _empty_op_type() -> onnx.ModelProto:
    m = matmul_model()
    m.graph.node[1].op_type = ""
    return m


def _duplicate_initializer() -> onnx.ModelProto:
    m = matmul_model()
    m.graph.initializer.append(m.graph.initializer[0])
    return m


def _wrong_arity() -> onnx.ModelProto:
    return small_model([helper.make_node("MatMul", ["x"], ["y"], name="mm")], [vi("x", [1, 2])], [vi("y", [1, 2])])


_checker_case("unknown-op", _unknown_op)
_checker_case("undefined-input", _undefined_input)
_checker_case("duplicate-output", _duplicate_output)
_checker_case("attribute-type", _bad_attr_type)
_checker_case("ir-version-99", _ir_too_new)
_checker_case("raw-data-size", _raw_size_mismatch)
_checker_case("empty-graph-name", _empty_graph_name)
_checker_case("empty-op-type", _empty_op_type)
_checker_case("duplicate-initializer", _duplicate_initializer)
_checker_case("wrong-arity", _wrong_arity)


@case("no-opset-import")
def _no_opset(inp: Path, out: Path) -> tuple[list[str], str]:
    m = matmul_model()
    del m.opset_import[:]
    return compile_args(save(m, inp / "model.onnx"), out), "not an ONNX model"


@case("no-graph")
def _no_graph(inp: Path, out: Path) -> tuple[list[str], str]:
    m = onnx.ModelProto(ir_version=8)
    m.opset_import.add(domain="", version=17)
    return compile_args(save(m, inp / "model.onnx"), out), "not an ONNX model"


# ========================================================================================== F. cycles
def _cycle(kind: str) -> onnx.ModelProto:
    if kind == "two-nodes":
        nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2"),
                 helper.make_node("Identity", ["a"], ["y"], name="n3")]
    elif kind == "self-loop":
        nodes = [helper.make_node("Add", ["x", "a"], ["a"], name="n1"), helper.make_node("Identity", ["a"], ["y"], name="n2")]
    elif kind == "three-nodes":
        nodes = [helper.make_node("Add", ["x", "c"], ["a"], name="n1"), helper.make_node("Relu", ["a"], ["b"], name="n2"),
                 helper.make_node("Neg", ["b"], ["c"], name="n3"), helper.make_node("Identity", ["c"], ["y"], name="n4")]
    else:  # inside an If branch
        then_g = helper.make_graph([helper.make_node("Add", ["x", "q"], ["p"], name="t1"),
                                    helper.make_node("Relu", ["p"], ["q"], name="t2")], "then", [], [vi("q", [1])])
        else_g = helper.make_graph([helper.make_node("Identity", ["x"], ["r"], name="e1")], "else", [], [vi("r", [1])])
        nodes = [helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
                 helper.make_node("Greater", ["s", "zero"], ["cond"], name="gt"),
                 helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_g, else_branch=else_g)]
        return small_model(nodes, [vi("x", [1])], [vi("y", [1])],
                           [numpy_helper.from_array(np.zeros((), np.float32), "zero")])
    return small_model(nodes, [vi("x", [1])], [vi("y", [1])])


for _kind in ("two-nodes", "self-loop", "three-nodes", "in-subgraph"):
    _checker_case(f"cycle-{_kind}", lambda k=_kind: _cycle(k), "topologically sorted")  # type: ignore[misc]


# ============================================================================ G/H. external data problems
def _external_model(inp: Path, location: str, *, offset: Any = None, length: Any = None,
                    write_data: bool = True, data_type: int = TensorProto.FLOAT) -> Path:
    """matmul_model with W stored externally at ``location`` (data written to inp/weights.bin)."""
    m = matmul_model()
    w = m.graph.initializer[0]
    raw = w.raw_data
    if write_data:
        (inp / "weights.bin").write_bytes(raw)
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    w.data_type = data_type
    w.external_data.add(key="location", value=location)
    if offset is not None:
        w.external_data.add(key="offset", value=str(offset))
    if length is not None:
        w.external_data.add(key="length", value=str(length))
    return save(m, inp / "model.onnx")


def _ext_case(cid: str, expect: str, location: str = "weights.bin", **kw: Any) -> None:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        return compile_args(_external_model(inp, location, **kw), out), expect
    add(f"external-{cid}", build)


_ext_case("missing-file", "external data file 'weights.bin' not found", write_data=False)
_ext_case("offset-beyond", "exceeds file", offset=1 << 20)
_ext_case("length-beyond", "exceeds file", length=1 << 20)
_ext_case("length-mismatch", "does not match its shape", length=16)
_ext_case("negative-offset", "exceeds file", offset=-8)
_ext_case("offset-not-int", "offset 'abc' is not an integer", offset="abc")
_ext_case("length-not-int", "length '1e3' is not an integer", length="1e3")
_ext_case("empty-location", "empty location", location="")
_ext_case("string-type", "cannot be stored as external data", data_type=TensorProto.STRING)


@case("external-data-is-directory")
def _ext_dir(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "blob").mkdir()
    return compile_args(_external_model(inp, "blob"), out), "not found next to the model"


# H. path traversal (CVE-2024-27318 / 27319): absolute, '..', symlink escaping the folder
def _outside(inp: Path) -> Path:
    target = inp.parent / "outside.bin"
    target.write_bytes(np.zeros(16 * 8, np.float32).tobytes())
    return target


def _traversal(cid: str, expect: str, loc: Callable[[Path], str]) -> None:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        return compile_args(_external_model(inp, loc(inp)), out), expect
    add(f"traversal-{cid}", build)


_traversal("absolute-outside", "is absolute; refused", lambda inp: str(_outside(inp)))
_traversal("absolute-inside", "is absolute; refused", lambda inp: str(inp / "weights.bin"))
_traversal("absolute-etc-passwd", "is absolute; refused", lambda inp: "/etc/passwd")
_traversal("dotdot", "contains '..'; refused", lambda inp: (_outside(inp), "../outside.bin")[1])
_traversal("dotdot-nested", "contains '..'; refused", lambda inp: (_outside(inp), "sub/../../outside.bin")[1])
_traversal("dotdot-backslash", "contains '..'; refused", lambda inp: (_outside(inp), "..\\outside.bin")[1])
_traversal("drive-letter", "is absolute; refused", lambda inp: "C:/weights.bin")
_traversal("backslash-root", "is absolute; refused", lambda inp: "\\weights.bin")


def _symlink_file(inp: Path) -> str:
    (inp / "link.bin").symlink_to(_outside(inp))
    return "link.bin"


def _symlink_dir(inp: Path) -> str:
    d = inp.parent / "outside_dir"
    d.mkdir(exist_ok=True)
    (d / "weights.bin").write_bytes(np.zeros(16 * 8, np.float32).tobytes())
    (inp / "sub").symlink_to(d)
    return "sub/weights.bin"


_traversal("symlink-file-escape", "resolves outside the model folder; refused", _symlink_file)
_traversal("symlink-dir-escape", "resolves outside the model folder; refused", _symlink_dir)


# ========================================================================== I/J. calibration data problems
def _calib_case(cid: str, fixture: str, mutate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
                expect: str, *, folder: bool = False, pickle: bool = False) -> None:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        model = inp / "model.onnx"
        model.write_bytes(fixture_bytes(fixture))
        arrays = mutate(fixture_npz(fixture))
        if folder:
            d = inp / "calib"
            d.mkdir()
            n = len(next(iter(fixture_npz(fixture).values())))
            for i in range(min(n, 4)):
                feed = {k: (v[i] if v.ndim and len(v) == n else v) for k, v in arrays.items()}
                np.savez(d / f"{i:03d}.npz", **feed)
            data = d
        else:
            data = inp / "calib.npz"
            np.savez(data, allow_pickle=pickle, **arrays)  # type: ignore[arg-type]
        return ["compile", str(model), "-o", str(out), "--calib", str(data)], expect
    add(f"calib-{cid}-{fixture}", build)


def _first_input(a: dict[str, np.ndarray]) -> str:
    return sorted(a)[-1] if "input" not in a else "input"


def _poison(value: float, at: int = 0) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def f(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        k = _first_input(a)
        x = a[k].copy()
        x.reshape(-1)[at] = value
        a[k] = x
        return a
    return f


def _astype(dtype: Any) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    def f(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        k = _first_input(a)
        a[k] = (a[k] * 10).astype(dtype)
        return a
    return f


def _extra_axis(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    k = _first_input(a)
    a[k] = a[k][:, None]
    return a


def _drop_axis(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    k = _first_input(a)
    a[k] = a[k][:, 0]
    return a


def _wrong_dim(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    k = _first_input(a)
    a[k] = a[k][..., :-1]  # the last dim is fixed in every fixture
    return a


def _renamed(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    k = _first_input(a)
    a[k + "_typo"] = a.pop(k)
    return a


def _extra_key(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    a["unrelated"] = np.zeros((len(next(iter(a.values()))), 3), np.float32)
    return a


def _objects(a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    k = _first_input(a)
    obj = np.empty(a[k].shape[:1], dtype=object)
    obj[:] = [{"not": "an array"}] * len(obj)
    a[k] = obj
    return a


for _f in FIXTURES:
    _in = _first_input(fixture_npz(_f))
    _calib_case("nan", _f, _poison(np.nan, 5), "contains NaN")
    # ±inf is data (attention masks): accepted, see tests/robustness/test_bad_inputs.py
    _calib_case("nan-folder", _f, _poison(np.nan, 3), "contains NaN", folder=True)
    _calib_case("int32", _f, _astype(np.int32), f"array '{_in}' is int32")
    _calib_case("complex", _f, _astype(np.complex64), f"array '{_in}' is complex64")
    _calib_case("extra-axis", _f, _extra_axis, f"array '{_in}'")
    _calib_case("wrong-dim", _f, _wrong_dim, f"array '{_in}'")
    _calib_case("unknown-name", _f, _renamed, f"array '{_in}_typo' is not an input of the model")
    _calib_case("extra-array", _f, _extra_key, "array 'unrelated' is not an input of the model")
    _calib_case("pickled-objects", _f, _objects, f"array '{_in}'", pickle=True)
_calib_case("drop-axis", "gemm_head", _drop_axis, "array 'input'")
_calib_case("missing-input", "shared_weight", lambda a: {"input": a["input"]}, "no array for model input 'dyn_weight'")
_calib_case("mismatched-samples", "shared_weight", lambda a: {**a, "dyn_weight": a["dyn_weight"][:5]}, "dyn_weight")
_calib_case("bool", "transformer_block", _astype(np.bool_), "array 'x' is bool")
_calib_case("string", "gemm_head", lambda a: {"input": np.array([["a"] * 64] * 3)}, "array 'input'")


@case("calib-empty-npz")
def _calib_empty(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    np.savez(inp / "calib.npz")
    return ["compile", str(inp / "model.onnx"), "-o", str(out), "--calib", str(inp / "calib.npz")], "calib.npz"


@case("calib-not-a-zip")
def _calib_not_zip(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    (inp / "calib.npz").write_bytes(b"definitely not a zip")
    return ["compile", str(inp / "model.onnx"), "-o", str(out), "--calib", str(inp / "calib.npz")], "calib.npz"


@case("calib-wrong-extension")
def _calib_ext(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    (inp / "calib.txt").write_text("1 2 3")
    return ["compile", str(inp / "model.onnx"), "-o", str(out), "--calib", str(inp / "calib.txt")], "calib.txt"


@case("calib-missing")
def _calib_missing(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    return ["compile", str(inp / "model.onnx"), "-o", str(out), "--calib", str(inp / "nothere.npz")], "nothere.npz"


@case("calib-zero-samples")
def _calib_zero(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    np.savez(inp / "calib.npz", input=np.zeros((0, 1, 64), np.float32))
    return ["compile", str(inp / "model.onnx"), "-o", str(out), "--calib", str(inp / "calib.npz")], "calib.npz"


@case("calib-empty-folder")
def _calib_empty_folder(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    (inp / "calib").mkdir()
    return ["compile", str(inp / "model.onnx"), "-o", str(out), "--calib", str(inp / "calib")], "calib"


# ============================================================================================== L. plans
_PLANS: dict[str, tuple[str, str]] = {
    "unknown-top-key": ("version: 1\nfoo: 1\n", "unknown top-level key 'foo'"),
    "unknown-spec-key": ("version: 1\ndefaults: {weight: {dtpye: int8}}\n", "unknown key 'dtpye'"),
    "bad-dtype": ("version: 1\ndefaults: {weight: {dtype: int3}}\n", "bad dtype 'int3'"),
    "bad-granularity": ("version: 1\ndefaults: {weight: {granularity: per_row}}\n", "bad granularity 'per_row'"),
    "bad-calibration": ("version: 1\ndefaults: {activation: {calibration: magic}}\n", "bad calibration 'magic'"),
    "bad-regex": ("version: 1\nrules:\n  - match: {name_regex: '(['}\n    skip: true\n", "rules[0]: bad name_regex"),
    "regex-not-string": ("version: 1\nrules:\n  - match: {name_regex: 5}\n    skip: true\n", "rules[0]"),
    "op-type-empty": ("version: 1\nrules:\n  - match: {op_type: []}\n    skip: true\n", "rules[0]"),
    "block-size-3": ("version: 1\ndefaults: {weight: {block_size: 3}}\n", "block_size"),
    "block-size-0": ("version: 1\ndefaults: {weight: {block_size: 0}}\n", "block_size"),
    "percentile-200": ("version: 1\ndefaults: {activation: {percentile: 200}}\n", "percentile"),
    "symmetric-string": ("version: 1\ndefaults: {weight: {symmetric: 'yes'}}\n", "symmetric"),
    "version-2": ("version: 2\n", "unsupported plan version '2'"),
    "top-level-list": ("- a\n- b\n", "a plan must be a mapping"),
    "yaml-syntax": ("version: 1\ndefaults: {weight: [\n", "not valid YAML/JSON"),
    "yaml-python-tag": ("!!python/object/apply:os.system ['echo pwned']\n", "not valid YAML/JSON"),
    "json-syntax": ('{"version": 1, "defaults": ', "not valid YAML/JSON"),
    "rules-not-list": ("version: 1\nrules: {a: 1}\n", "'rules' must be a list"),
    "rule-without-match": ("version: 1\nrules:\n  - skip: true\n", "rules[0]"),
    "rule-sets-nothing": ("version: 1\nrules:\n  - match: {op_type: Conv}\n", "rules[0]: rule sets nothing"),
    "rule-unknown-key": ("version: 1\nrules:\n  - match: {op_type: Conv}\n    wieght: {}\n    skip: true\n",
                         "rules[0]: unknown key 'wieght'"),
    "match-unknown-key": ("version: 1\nrules:\n  - match: {op: Conv}\n    skip: true\n", "rules[0]: match: unknown key"),
    "defaults-unknown-key": ("version: 1\ndefaults: {bias: {}}\n", "defaults: unknown key 'bias'"),
    "threshold-range": ("version: 1\ndefaults: {weight: {threshold: 5}}\n", "threshold"),
    "axis-string": ("version: 1\ndefaults: {weight: {axis: last}}\n", "axis"),
    "bad-scheme": ("version: 1\ndefaults: {weight: {scheme: quinary}}\n", "bad scheme 'quinary'"),
    "empty-file": ("", "a plan must be a mapping"),
    "skip-not-bool": ("version: 1\nrules:\n  - match: {op_type: Conv}\n    skip: 'no'\n", "rules[0]: skip"),
    "spec-not-mapping": ("version: 1\ndefaults: {weight: int8}\n", "defaults.weight: expected a mapping"),
}


def _plan_case(cid: str, text: str, expect: str, fixture: str) -> None:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        (inp / "model.onnx").write_bytes(fixture_bytes(fixture))
        (inp / "plan.yaml").write_text(text, encoding="utf-8")
        return compile_args(inp / "model.onnx", out, "--plan", inp / "plan.yaml"), expect
    add(f"plan-{cid}-{fixture}", build)


for _cid, (_text, _expect) in _PLANS.items():
    _plan_case(_cid, _text, _expect, "conv_bn_relu")
for _cid in ("bad-dtype", "bad-regex", "version-2", "yaml-python-tag"):
    _plan_case(_cid, *_PLANS[_cid], "transformer_block")


@case("plan-binary-garbage")
def _plan_binary(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    (inp / "plan.yaml").write_bytes(b"\xff\xfe\x00\x81garbage")
    return compile_args(inp / "model.onnx", out, "--plan", inp / "plan.yaml"), "plan.yaml"


@case("plan-missing")
def _plan_missing(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    return compile_args(inp / "model.onnx", out, "--plan", inp / "nope.yaml"), "nope.yaml"


@case("plan-directory")
def _plan_dir(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    (inp / "plan.yaml").mkdir()
    return compile_args(inp / "model.onnx", out, "--plan", inp / "plan.yaml"), "plan.yaml"


@case("plan-preset-typo")
def _plan_typo(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    return compile_args(inp / "model.onnx", out, "--plan", "w8a9"), "w8a9"


# ================================================================================ M. passes and options
_PIPELINES: dict[str, tuple[str, str]] = {
    "unknown-pass": ("cleanup,fold-bn,resolve-plan", "unknown pass 'fold-bn'"),
    "underscore-name": ("cleanup,insert_qdq", "unknown pass 'insert_qdq'"),
    "unknown-option": ("resolve-plan,calibrate{methd=minmax},insert-qdq", "unknown option 'methd'"),
    "bad-method": ("resolve-plan,calibrate{method=magic},insert-qdq", "bad value 'magic'"),
    "bad-percentile": ("resolve-plan,calibrate{percentile=30},insert-qdq", "percentile"),
    "bad-int": ("resolve-plan,calibrate{samples=many},insert-qdq", "expected int, got 'many'"),
    "negative-samples": ("resolve-plan,calibrate{samples=-3},insert-qdq", "samples"),
    "bad-bool": ("cleanup{fold_shapes=perhaps}", "expected true/false, got 'perhaps'"),
    "unbalanced-open": ("cleanup,calibrate{method=minmax", "unbalanced"),
    "unbalanced-close": ("cleanup}", "unbalanced"),
    "empty": ("", "empty pipeline"),
    "empty-items": (",,", "cannot parse"),
    "not-key-value": ("resolve-plan,calibrate{minmax},insert-qdq", "is not key=value"),
    "requirement": ("insert-qdq", "requires"),
    "requirement-order": ("calibrate,resolve-plan,insert-qdq", "requires 'plan-resolved'"),
}


def _pipeline_case(cid: str, text: str, expect: str) -> None:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        (inp / "model.onnx").write_bytes(fixture_bytes("conv_bn_relu"))
        return compile_args(inp / "model.onnx", out, "--pipeline", text), expect
    add(f"pipeline-{cid}", build)


for _cid, (_text, _expect) in _PIPELINES.items():
    _pipeline_case(_cid, _text, _expect)


@case("dump-after-unknown-pass")
def _dump_unknown(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("conv_bn_relu"))
    return compile_args(inp / "model.onnx", out, "--dump-after", "nope"), "--dump-after: no pass named 'nope'"


# ================================================================= N. unsupported op / scheme for a target
def _lstm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((1, 32, 4)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.standard_normal((1, 32, 8)).astype(np.float32), "R")
    return small_model([helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm", hidden_size=8)],
                       [vi("x", [5, 1, 4])], [vi("y", [5, 1, 1, 8])], [w, r], check=True)


_UNSUPPORTED: dict[str, tuple[str, str, str, str]] = {
    # id: (fixture or 'lstm', target, plan, expected)
    "activation-per-channel": ("transformer_block", "ort",
                               "version: 1\ndefaults: {activation: {granularity: per_channel}}\n",
                               "activation granularity per_channel is not supported"),
    "activation-int4": ("conv_bn_relu", "ort", "version: 1\ndefaults: {activation: {dtype: int4}}\n",
                        "activation dtype int4 is not supported"),
    "lstm-ternary": ("lstm", "ort", "version: 1\ndefaults: {weight: {scheme: ternary}}\n",
                     "node 'lstm' (LSTM"),
    "tensorrt-int16-weights": ("conv_bn_relu", "tensorrt", "version: 1\ndefaults: {weight: {dtype: int16}}\n",
                               "weight dtype int16 is not supported"),
    "qonnx-fp8": ("gemm_head", "qonnx", "version: 1\ndefaults: {weight: {dtype: fp8e4m3}}\n",
                  "weight dtype fp8e4m3 is not supported"),
    "ort-qop-int16-activation": ("conv_bn_relu", "ort-qop", "version: 1\ndefaults: {activation: {dtype: int16}}\n",
                                 "activation dtype int16 is not supported"),
    "ort-qop-int4-with-activations": ("transformer_block", "ort-qop",
                                      "version: 1\ndefaults: {weight: {dtype: int4, granularity: per_channel}}\n",
                                      "int4 weights run only weight-only"),
    "layernorm-int4-activation": ("transformer_block", "ort",
                                  "version: 1\nrules:\n  - match: {op_type: LayerNormalization}\n"
                                  "    activation: {dtype: int4}\n", "activation dtype int4 is not supported"),
}


def _unsupported(cid: str, fixture: str, target: str, plan: str, expect: str) -> None:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        model = inp / "model.onnx"
        if fixture == "lstm":
            save(_lstm_model(), model)
        else:
            model.write_bytes(fixture_bytes(fixture))
        (inp / "plan.yaml").write_text(plan)
        return compile_args(model, out, "--plan", inp / "plan.yaml", "--target", target), expect
    add(f"unsupported-{cid}", build)


for _cid, _spec in _UNSUPPORTED.items():
    _unsupported(_cid, *_spec)


# ====================================================================================== O. absurd shapes
def _absurd(cid: str, make: Callable[[], onnx.ModelProto], expect: str, *extra: str) -> None:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        p = save(make(), inp / "model.onnx")
        args = compile_args(p, out)
        if extra:
            args = ["compile", str(p), "-o", str(out), *extra]
        return args, expect
    add(f"absurd-{cid}", build)


def _huge_initializer() -> onnx.ModelProto:
    m = matmul_model()
    t = m.graph.initializer[0]
    del t.dims[:]
    t.dims.extend([1 << 20, 1 << 20])
    return m


def _negative_dim() -> onnx.ModelProto:
    m = matmul_model()
    t = m.graph.initializer[0]
    t.dims[0] = -16
    return m


def _constant_of_shape(shape: list[int]) -> onnx.ModelProto:
    return small_model([helper.make_node("ConstantOfShape", ["s"], ["z"], name="fill",
                                         value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
                        helper.make_node("Add", ["x", "z"], ["y"], name="add")],
                       [vi("x", [1])], [vi("y", shape)], [numpy_helper.from_array(np.array(shape, np.int64), "s")])


def _expand_huge() -> onnx.ModelProto:
    return small_model([helper.make_node("Expand", ["x", "s"], ["y"], name="expand")], [vi("x", [1, 1])],
                       [vi("y", [1 << 18, 1 << 18])], [numpy_helper.from_array(np.array([1 << 18, 1 << 18], np.int64), "s")])


def _huge_input_conv() -> onnx.ModelProto:
    w = np.zeros((4, 3, 3, 3), np.float32)
    return small_model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], [vi("x", [1, 3, 200000, 200000])],
                       [vi("y", [1, 4, 199998, 199998])], [numpy_helper.from_array(w, "w")])


def _huge_input_random() -> onnx.ModelProto:
    return small_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x", [1, 1 << 30])],
                       [vi("y", [1, 1 << 30])])


def _huge_constant_attr() -> onnx.ModelProto:
    t = helper.make_tensor("v", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    del t.dims[:]
    t.dims.extend([1 << 30, 1 << 30])
    return small_model([helper.make_node("Constant", [], ["c"], name="const", value=t),
                        helper.make_node("Add", ["x", "c"], ["y"], name="add")], [vi("x", [1])], [vi("y", [1])])


_absurd("initializer-2^40", _huge_initializer, "declares 1099511627776 elements")
_absurd("negative-dim", _negative_dim, "negative dimension")
_absurd("constant-of-shape", lambda: _constant_of_shape([1 << 20, 1 << 20]), "tensor 'z' (output of node 'fill')")
_absurd("constant-of-shape-3d", lambda: _constant_of_shape([1 << 12, 1 << 12, 1 << 12]), "node 'fill'")
_absurd("expand", _expand_huge, "node 'expand'")
_absurd("input-conv", _huge_input_conv, "node 'conv'")
_absurd("random-calibration", _huge_input_random, "random sample", "--calib", "random", "--plan", "w8a8",
        "--pipeline", "resolve-plan,calibrate,insert-qdq")
_absurd("constant-attribute", _huge_constant_attr, "declares")


# ======================================================================================= P. CLI misuse
def _misuse(cid: str, make_args: Callable[[Path, Path], list[str]], expect: str) -> None:
    def build(inp: Path, out: Path) -> tuple[list[str], str]:
        (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
        np.savez(inp / "calib.npz", **fixture_npz("gemm_head"))
        return make_args(inp, out), expect
    add(f"cli-{cid}", build)


_M = "model.onnx"
_misuse("output-not-onnx", lambda i, o: ["compile", str(i / _M), "-o", str(o.with_suffix(".bin"))], "must end in .onnx")
_misuse("output-is-input", lambda i, o: ["compile", str(i / _M), "-o", str(i / _M)], "would overwrite the input")
_misuse("calib-samples-zero", lambda i, o: ["compile", str(i / _M), "-o", str(o), "--calib", str(i / "calib.npz"),
                                            "--calib-samples", "0"], "must be positive")
_misuse("calib-samples-negative", lambda i, o: ["compile", str(i / _M), "-o", str(o), "--calib",
                                                str(i / "calib.npz"), "--calib-samples", "-2"], "must be positive")
_misuse("unknown-target", lambda i, o: ["compile", str(i / _M), "-o", str(o), "--target", "tpu9000"],
        "unknown target 'tpu9000'")
_misuse("plugin-missing-file", lambda i, o: ["compile", str(i / _M), "-o", str(o), "--plugin", str(i / "p.py")],
        "p.py")
_misuse("plugin-missing-module", lambda i, o: ["compile", str(i / _M), "-o", str(o), "--plugin",
                                               "no_such_module_xyz:Pass"], "no_such_module_xyz")
_misuse("min-sqnr-without-data", lambda i, o: ["compile", str(i / _M), "-o", str(o), "--calib", "random",
                                               "--min-sqnr", "20"], "--min-sqnr needs validation data")
_misuse("validate-data-missing", lambda i, o: ["compile", str(i / _M), "-o", str(o), "--calib",
                                               str(i / "calib.npz"), "--validate-data", str(i / "held.npz")],
        "held.npz")
_misuse("min-sqnr-unreachable", lambda i, o: ["compile", str(i / _M), "-o", str(o), "--calib", str(i / "calib.npz"),
                                              "--min-sqnr", "200"], "below --min-sqnr 200")
_misuse("calib-keyword-typo", lambda i, o: ["compile", str(i / _M), "-o", str(o), "--calib", "randon"], "randon")
_misuse("validate-missing-quant", lambda i, o: ["validate", str(i / _M), str(i / "q.onnx"), "--data",
                                                str(i / "calib.npz")], "q.onnx")


def _plugin_not_pass(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    (inp / "plug.py").write_text("X = 1\n")
    return ["compile", str(inp / "model.onnx"), "-o", str(out), "--plugin", str(inp / "plug.py")], "plug.py"


add("cli-plugin-without-pass", _plugin_not_pass)


@case("cli-output-is-directory")
def _out_dir(inp: Path, out: Path) -> tuple[list[str], str]:
    (inp / "model.onnx").write_bytes(fixture_bytes("gemm_head"))
    (inp / "q.onnx").mkdir()
    return ["compile", str(inp / "model.onnx"), "-o", str(inp / "q.onnx"), "--calib", "none"], "is a directory"


# NaN / Inf weights: the model is valid ONNX, but quantizing a non-finite weight is refused
def _nan_weight(value: float) -> Callable[[], onnx.ModelProto]:
    def make() -> onnx.ModelProto:
        m = matmul_model()
        w = numpy_helper.to_array(m.graph.initializer[0]).copy()
        w[3, 2] = value
        m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
        return m
    return make


for _v, _n in ((np.nan, "nan"), (np.inf, "inf"), (-np.inf, "neginf")):
    _absurd(f"weight-{_n}", _nan_weight(_v), "weight 'W' contains NaN or Inf", "--calib", "random")


def case_ids() -> list[str]:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return ids


def case_by_id(cid: str) -> Case:
    return next(c for c in CASES if c.id == cid)


def env_without_color() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FORCE_COLOR", None)
    return env


def snapshot(root: Path) -> dict[str, tuple[str, str, int]]:
    """Every entry under ``root`` (symlinks and FIFOs not followed or opened): kind, digest / target, mtime."""
    out: dict[str, tuple[str, str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p), st.st_mtime_ns)
            elif p.is_dir():
                out[rel] = ("dir", "", st.st_mtime_ns)
            elif p.is_file():
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
            else:
                out[rel] = ("special", "", st.st_mtime_ns)
    return out
