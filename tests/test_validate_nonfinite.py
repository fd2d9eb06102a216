"""Outputs with non-finite values in the float model: the -inf of a masked log-softmax, NaN of a square root of a
negative input. Where both models give the same non-finite value it is the float value reproduced: left out of
the sums (counted); where only one model does, the error is infinite. Before, every metric of such an output was
NaN: validation printed `nan dB`, `--min-sqnr` refused a faithful model, and the measured default scored every
candidate -inf (it kept the plain default plan blind). Oracle: numpy over the finite positions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qcompiler.cli import cli
from qcompiler.report import validate as qv
from qcompiler.report.validate.metrics import _Accumulator, mask_nonfinite


def _masked_log_softmax(path: Path) -> Path:
    """y = LogSoftmax(x @ W + mask): the mask holds 0 / -inf, so y holds -inf where it is -inf."""
    w = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["s"], name="mm"),
         helper.make_node("Add", ["s", "mask"], ["m"], name="add_mask"),
         helper.make_node("LogSoftmax", ["m"], ["y"], name="lsm", axis=-1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _feeds(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.zeros((n, 1, 8), np.float32)
    mask[:, :, 5:] = -np.inf
    mask[::3, :, 2] = -np.inf  # every third sample masks one more class
    return {"x": rng.standard_normal((n, 1, 16)).astype(np.float32), "mask": mask}


def _run(model: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    n = len(next(iter(feeds.values())))
    return np.stack([sess.run(None, {k: v[i] for k, v in feeds.items()})[0] for i in range(n)])


def test_masked_log_softmax_validates_on_its_finite_values(tmp_path: Path) -> None:
    model = _masked_log_softmax(tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **_feeds(16, 0))
    q, report = tmp_path / "out" / "q.onnx", tmp_path / "out" / "r.json"
    res = CliRunner().invoke(cli, ["compile", str(model), "-o", str(q), "--calib", str(tmp_path / "calib.npz"),
                                   "--min-sqnr", "30", "--report", str(report)])
    assert res.exit_code == 0, (res.stdout, res.stderr)  # refused before: nan dB is below any threshold
    assert "nan" not in res.stdout.split("outputs:")[1].split("worst layers")[0]
    rep = json.loads(report.read_text())
    # every candidate of the measured default scored a number (all -inf before)
    assert all(math.isfinite(c["sqnr_db"]) for c in rep["recipe"]["candidates"] if c.get("sqnr_db") is not None)
    out = rep["validation"]["outputs"][0]
    feeds = _feeds(16, 0)
    f, g = _run(model, feeds), _run(q, feeds)
    assert np.array_equal(np.isneginf(f), np.isneginf(g))  # the masked classes stay masked
    fin = np.isfinite(f)
    oracle = 10 * np.log10(np.sum(f[fin].astype(np.float64) ** 2) / np.sum((f[fin] - g[fin]).astype(np.float64) ** 2))
    assert abs(out["sqnr_db"] - oracle) < 2e-3, (out["sqnr_db"], oracle)
    assert out["nonfinite_matched"] == int((~fin).sum()) == 16 * 3 + 6
    assert "nonfinite_mismatched" not in out
    # the worst slice: per class over its finite values; the masked classes 5-7 carry no signal and are left out
    per = []
    for c in range(8):
        fc, gc = f[..., c].astype(np.float64), g[..., c].astype(np.float64)
        ok = np.isfinite(fc)
        per.append(math.inf if not ok.any() else 10 * np.log10(np.sum(fc[ok] ** 2) / np.sum((fc[ok] - gc[ok]) ** 2)))
    ws = out["worst_slice"]
    assert ws["index"] == int(np.argmin(per[:5])) and abs(ws["sqnr_db"] - min(per[:5])) < 2e-3, (ws, per)
    assert ws["silent"] == 3


def test_a_non_finite_value_in_one_model_only_is_an_infinite_error(tmp_path: Path) -> None:
    """float: y = Log(Relu(x)) (-inf where x <= 0); other: y = Log(Relu(x) + 1e-3), finite everywhere."""
    def model(path: Path, eps: float | None) -> Path:
        nodes = [helper.make_node("Relu", ["x"], ["r"])]
        if eps is None:
            nodes.append(helper.make_node("Log", ["r"], ["y"]))
            inits = []
        else:
            nodes += [helper.make_node("Add", ["r", "e"], ["re"]), helper.make_node("Log", ["re"], ["y"])]
            inits = [numpy_helper.from_array(np.array(eps, np.float32), "e")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    fm, om = model(tmp_path / "f.onnx", None), model(tmp_path / "o.onnx", 1e-3)
    feeds = [{"x": np.array([[1.0, 2.0, -1.0, 3.0], [0.5, 4.0, 2.5, 1.5]], np.float32)}]
    rep = qv.validate(fm, om, feeds, per_layer=False)
    m = rep.outputs[0]
    assert m.sqnr_db == -math.inf and m.max_abs == math.inf and m.nonfinite_mismatched == 1
    assert m.worst_slice.sqnr_db == -math.inf  # the slice holding it
    same = qv.validate(fm, fm, feeds, per_layer=False).outputs[0]
    assert same.sqnr_db == math.inf and same.nonfinite_matched == 1 and same.nonfinite_mismatched == 0
    assert "1 non-finite value(s) equal in both models left out" in qv.validate(fm, fm, feeds).table()


def test_mask_nonfinite_and_the_accumulator_against_numpy() -> None:
    r = np.array([1.0, -np.inf, np.nan, 2.0, np.inf, 3.0])
    x = np.array([1.5, -np.inf, np.nan, np.inf, -np.inf, 2.0])
    rr, xx = r.copy(), x.copy()
    matched, mismatched, mask = mask_nonfinite(rr, xx)
    assert (matched, mismatched) == (2, 2) and mask is not None and mask.tolist() == [0, 0, 0, 1, 1, 0]
    assert rr.tolist() == [1.0, 0, 0, 0, 0, 3.0] and xx.tolist() == [1.5, 0, 0, 0, 0, 2.0]
    # all finite: nothing touched, the same numbers bit for bit as before the change
    a = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    b = a + np.float32(0.01) * np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    acc = _Accumulator("t")
    acc.update(a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert acc.ref2 == float(np.add.reduce(a64 * a64)) and acc.noise2 == float(np.add.reduce((a64 - b64) ** 2))
    assert acc.nonfinite == acc.mismatched == 0
    # the caller's float64 arrays are not modified when values are masked
    f = np.array([[0.5, -np.inf, 2.0]])
    g = np.array([[0.25, -np.inf, 2.0]])
    acc2 = _Accumulator("u")
    acc2.update(f, g)
    assert np.isneginf(f[0, 1]) and np.isneginf(g[0, 1])
    assert acc2.nonfinite == 1 and acc2.metrics().sqnr_db == 10 * math.log10((0.25 + 4.0) / 0.0625)


def test_sqnr_db_of_the_shared_numbers_module_counts_finite_values_only() -> None:
    """``qcompiler.core.numbers.sqnr_db`` (the package check, calibration auto's scores) follows the same rule."""
    from qcompiler.core.numbers import energies, sqnr_db

    r = np.array([[1.0, -np.inf, 2.0]], np.float32)
    q = np.array([[1.1, -np.inf, 2.0]], np.float32)
    want = 10 * math.log10(5.0 / float((np.float64(np.float32(1.0)) - np.float64(np.float32(1.1))) ** 2))
    assert abs(sqnr_db(r, q) - want) < 1e-9
    # summed over pairs: the second pair adds its signal, no noise
    assert abs(sqnr_db([r, r], [q, r]) - (want + 10 * math.log10(2.0))) < 1e-9
    assert sqnr_db(r, np.array([[1.1, 0.0, 2.0]], np.float32)) == -math.inf
    assert energies(np.array([np.nan, 1.0]), np.array([np.nan, 1.0])) == (1.0, 0.0)
