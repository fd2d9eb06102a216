"""Fuzzing the data a compile reads besides the model's protobuf (issue 16): calibration / validation data
(.npz, .npy, folders of them: edited arrays — dtypes, shapes, NaN / Inf, names, pickled objects — and corrupted
bytes — .npy headers, array payloads, the zip container) and models with external data (mutated data files,
edited external-data entries: locations, offsets, lengths, dtypes, dims, symlinks). Each case is held to the
contract of ``test_robustness_fuzz_contract`` (exit 0 or 2, one ``error:`` line, nothing written on failure,
every input — external data included — byte-identical afterwards).
"""

from __future__ import annotations

import io
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _robust_cases as C
import test_robustness_fuzz_contract as F

# ------------------------------------------------------------------------------------ calibration data
CALIB_FIXTURES = ["gemm_head", "conv_bn_relu", "shared_weight"]
_SAMPLES = 3
DTYPES = ["float16", "float64", "int32", "int64", "uint8", "bool", "complex64", "object", "<U3", "V4", ">f4"]
POISON = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "1e38": 1e38, "-1e38": -1e38, "denormal": 1e-45}
SHAPES = ["add-axis", "drop-axis", "trim-last", "zero-samples", "one-sample", "transpose", "scalar", "fortran",
          "broadcast-last", "double-last"]
EDIT = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(DTYPES)),
    st.tuples(st.just("poison"), st.tuples(st.sampled_from(sorted(POISON)), st.integers(0, 1 << 16))),
    st.tuples(st.just("shape"), st.sampled_from(SHAPES)),
    st.tuples(st.just("name"), st.sampled_from(["rename", "extra", "drop", "empty", "slash", "dotdot", "unicode"])),
)


def _edit(arrays: dict[str, np.ndarray], edit: list[Any], key: str) -> dict[str, np.ndarray]:
    kind, arg = edit
    if key not in arrays:
        return arrays
    x = arrays[key]
    if kind == "dtype":
        if arg == "object":
            y = np.empty(x.shape[:1], dtype=object)
            y[:] = [{"not": "an array"}] * len(y)
            arrays[key] = y
        elif arg == "V4":
            arrays[key] = np.zeros(x.shape, dtype="V4")
        else:
            arrays[key] = (x * 10).astype(arg)
    elif kind == "poison":
        y = x.astype(np.float32).copy()
        if y.size:
            y.reshape(-1)[arg[1] % y.size] = POISON[arg[0]]
        arrays[key] = y
    elif kind == "shape":
        reshaped: Any = {"add-axis": lambda: x[:, None], "drop-axis": lambda: x[:, 0],
                         "trim-last": lambda: x[..., :-1], "zero-samples": lambda: x[:0],
                         "one-sample": lambda: x[:1], "transpose": lambda: x.T, "scalar": lambda: np.float32(1.5),
                         "fortran": lambda: np.asfortranarray(x), "broadcast-last": lambda: x[..., :1],
                         "double-last": lambda: np.concatenate([x, x], axis=-1)}[arg]()
        arrays[key] = reshaped
    else:
        new = {"rename": key + "_typo", "extra": "unrelated", "empty": "", "slash": "a/b", "dotdot": "../x",
               "unicode": "ünï"}.get(arg)
        if arg == "drop":
            del arrays[key]
        elif arg == "extra":
            arrays["unrelated"] = np.zeros((len(x) if x.ndim else 1, 3), np.float32)
        else:
            arrays[new] = arrays.pop(key)  # type: ignore[index]
    return arrays


def _npy(arr: Any) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(arr), allow_pickle=True)
    return buf.getvalue()


def _corrupt_member(member: bytes, target: str, ops: list[Any]) -> bytes:
    if target == "header":  # only the .npy header (magic, version, length, dict)
        end = member.find(b"\n") + 1 or len(member)
        return F.mutate(member[:end], ops) + member[end:]
    if target == "member":
        return F.mutate(member, ops)
    return member


def _npz(arrays: dict[str, np.ndarray], deflate: bool, target: str, ops: list[Any]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as zf:
        for i, (name, arr) in enumerate(arrays.items()):
            member = _npy(arr)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", (1980, 1, 1, 0, 0, 0)),
                        _corrupt_member(member, target, ops) if i == 0 else member,
                        zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
        if target == "dup-member" and arrays:
            name = next(iter(arrays))
            zf.writestr(f"{name}.npy", _npy(np.zeros(3, np.float32)))
    data = buf.getvalue()
    return F.mutate(data, ops) if target == "file" else data


@F.builder("calib")
def build_calib(p: dict[str, Any], root: Path) -> F.Call:
    inp = root / "in"
    inp.mkdir()
    model = inp / "model.onnx"
    model.write_bytes(C.fixture_bytes(p["fixture"]))
    arrays = {k: v[:_SAMPLES] for k, v in C.fixture_npz(p["fixture"]).items()}
    key = C._first_input(arrays)
    for edit in p["edits"]:
        arrays = _edit(arrays, edit, key)
    container, target, ops = p["container"], p["target"], p["ops"]
    deflate = container.endswith("deflated")
    if container.startswith("folder"):
        data = inp / "calib"
        data.mkdir()
        for i in range(_SAMPLES):
            feed = {k: (v[i] if getattr(v, "ndim", 0) and len(v) > i else v) for k, v in arrays.items()}
            if container == "folder-npy":
                blob = _corrupt_member(_npy(feed[key]) if key in feed else b"", target, ops) if i == 0 \
                    else _npy(feed.get(key, np.zeros(1)))
                (data / f"{i:03d}.npy").write_bytes(F.mutate(blob, ops) if target == "file" and i == 0 else blob)
            else:
                (data / f"{i:03d}.npz").write_bytes(_npz(feed, deflate, target if i == 0 else "none", ops))
    elif container == "npy":
        data = inp / "calib.npy"
        blob = _corrupt_member(_npy(arrays.get(key, np.zeros(1))), target, ops)
        data.write_bytes(F.mutate(blob, ops) if target == "file" else blob)
    else:
        data = inp / "calib.npz"
        data.write_bytes(_npz(arrays, deflate, target, ops))
    out = root / "out" / "q.onnx"
    if p["use"] == "validate":
        argv = ["compile", str(model), "-o", str(out), "--calib", "random", "--validate-data", str(data)]
    else:
        argv = ["compile", str(model), "-o", str(out), "--calib", str(data)]
    return F.Call([*argv, "--calib-samples", "2"], out)


@F.examples(70)
@given(fixture=st.sampled_from(CALIB_FIXTURES), edits=st.lists(EDIT, max_size=2),
       container=st.sampled_from(["npz", "npz-deflated", "folder", "folder-deflated", "folder-npy", "npy"]),
       target=st.sampled_from(["none", "none", "header", "member", "file", "dup-member"]),
       ops=F.MUTATIONS, use=st.sampled_from(["calib", "calib", "validate"]))
def test_fuzz_calibration_data(fixture: str, edits: list[Any], container: str, target: str, ops: list[Any],
                               use: str) -> None:
    F.check_case("calib", {"fixture": fixture, "edits": edits, "container": container, "target": target,
                           "ops": ops if target not in ("none", "dup-member") else [], "use": use})


# ---------------------------------------------------------------------------------- external data
EXT_FIXTURES = ["gemm_head", "conv_bn_relu", "transformer_block"]
_EXT_BASE: dict[tuple[str, int], tuple[bytes, bytes]] = {}
LOCATIONS = ["abs-inside", "abs-outside", "dotdot", "dotdot-inside", "missing", "empty", "dir", "symlink-out",
             "symlink-in", "nul", "backslash", "dot", "self", "long", "subdir"]
NUMBERS = ["-1", "0", "1", "7", "1e3", "abc", "99999999999999999999", "", " 4", "0x10", "4096"]
ENTRY = st.one_of(
    st.tuples(st.just("location"), st.sampled_from(LOCATIONS)),
    st.tuples(st.just("offset"), st.sampled_from(NUMBERS)),
    st.tuples(st.just("length"), st.sampled_from(NUMBERS)),
    st.tuples(st.just("key"), st.sampled_from(["checksum", "basepath", "location"])),
    st.tuples(st.just("dtype"), st.sampled_from([0, TensorProto.DOUBLE, TensorProto.INT8, TensorProto.STRING,
                                                 TensorProto.FLOAT16, 999])),
    st.tuples(st.just("dims"), st.sampled_from([[], [0], [-1], [1 << 40], [3], [2, 2, 2, 2, 2]])),
    st.tuples(st.just("inline"), st.just("")),
)


def ext_base(fixture: str, threshold: int) -> tuple[bytes, bytes]:
    """The fixture saved by onnx with its tensors (>= threshold bytes) in ``model.onnx.data``."""
    if (fixture, threshold) not in _EXT_BASE:
        with tempfile.TemporaryDirectory() as td:
            m = onnx.load_model_from_string(C.fixture_bytes(fixture))
            onnx.save_model(m, f"{td}/model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=threshold)
            _EXT_BASE[fixture, threshold] = (Path(td, "model.onnx").read_bytes(),
                                             Path(td, "model.onnx.data").read_bytes())
    return _EXT_BASE[fixture, threshold]


def _location(kind: str, inp: Path, root: Path) -> str:
    (root / "outside.bin").write_bytes(bytes(range(256)) * 64)
    if kind in ("symlink-out", "symlink-in"):
        (inp / "link.data").unlink(missing_ok=True)
        (inp / "link.data").symlink_to(root / "outside.bin" if kind == "symlink-out" else inp / "model.onnx.data")
        return "link.data"
    if kind == "dir":
        (inp / "adir").mkdir(exist_ok=True)
        return "adir"
    if kind == "subdir":
        (inp / "sub").mkdir(exist_ok=True)
        (inp / "sub" / "w.data").write_bytes((inp / "model.onnx.data").read_bytes())
        return "sub/w.data"
    return {"abs-inside": str(inp / "model.onnx.data"), "abs-outside": str(root / "outside.bin"),
            "dotdot": "../outside.bin", "dotdot-inside": "sub/../model.onnx.data", "missing": "nope.data",
            "empty": "", "nul": "model.onnx.data\x00x", "backslash": "..\\outside.bin", "dot": "./model.onnx.data",
            "self": "model.onnx", "long": "a" * 300}[kind]


def _edit_entry(t: TensorProto, edit: list[Any], inp: Path, root: Path) -> None:
    kind, arg = edit
    entries = {e.key: e for e in t.external_data}
    if kind in ("location", "offset", "length"):
        value = _location(arg, inp, root) if kind == "location" else arg
        if kind in entries:
            entries[kind].value = value
        else:
            t.external_data.add(key=kind, value=value)
    elif kind == "key":
        t.external_data.add(key=arg, value="x" if arg != "location" else "model.onnx.data")
    elif kind == "dtype":
        t.data_type = arg
    elif kind == "dims":
        del t.dims[:]
        t.dims.extend(arg)
    else:
        t.data_location = TensorProto.DEFAULT


@F.builder("model-external")
def build_model_external(p: dict[str, Any], root: Path) -> F.Call:
    inp = root / "in"
    inp.mkdir()
    model_bytes, data_bytes = ext_base(p["fixture"], p["threshold"])
    (inp / "model.onnx.data").write_bytes(F.mutate(data_bytes, p["ops"]) if p["target"] == "data" else data_bytes)
    if p["target"] == "model":
        model_bytes = F.mutate(model_bytes, p["ops"])
    elif p["target"] == "entry":
        m = onnx.ModelProto()
        m.ParseFromString(model_bytes)
        ext = [t for t in m.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        for i, edit in enumerate(p["edits"]):
            _edit_entry(ext[(p["tensor"] + i) % len(ext)], edit, inp, root)
        model_bytes = m.SerializeToString()
    (inp / "model.onnx").write_bytes(model_bytes)
    out = root / "out" / "q.onnx"
    return F.Call(["compile", str(inp / "model.onnx"), "-o", str(out), "--calib", "random", "--calib-samples", "2",
                   *p["extra"]], out)


@F.examples(60)
@given(fixture=st.sampled_from(EXT_FIXTURES), threshold=st.sampled_from([0, 1024]),
       target=st.sampled_from(["entry", "entry", "data", "model"]), ops=F.MUTATIONS,
       edits=st.lists(ENTRY, min_size=1, max_size=2), tensor=st.integers(0, 16),
       extra=st.sampled_from([[], [], ["--external-data", "0"], ["--external-data", "100000000"]]))
def test_fuzz_external_data(fixture: str, threshold: int, target: str, ops: list[Any], edits: list[Any],
                            tensor: int, extra: list[str]) -> None:
    F.check_case("model-external", {"fixture": fixture, "threshold": threshold, "target": target,
                                    "ops": ops if target != "entry" else [],
                                    "edits": edits if target == "entry" else [], "tensor": tensor,
                                    "extra": extra})
