"""``calibration: auto``'s float reference from calibration's own runs (issue 15).

The method trials ran the float graph once more on the held-out samples that calibration had just run; the
calibrate pass now keeps those samples' graph outputs from the same runs (or, in the measured default, the plain
default plan candidate's collection keeps them in the statistics cache with its statistics), and the trials take
them once their own float session gives the first sample's outputs bit for bit as kept. Nothing the compile writes
changes: the same scores, the same choice, the same bytes."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
from _graphs import matmul_relu_graph
from _helpers import npz_folder

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import (
    CalibrationSource,
    FloatOutputs,
    collect,
    input_signatures,
    reset_stats_cache,
    stats_cache,
)
from qcompiler.calib.statcache import auto_parts, graph_base
from qcompiler.core.activations import graph_key
from qcompiler.plan import Plan, QuantSpec

calibrate_module = importlib.import_module("qcompiler.passes.calibrate")
MODELS = Path(__file__).resolve().parent.parent / "models"
#: a fixture whose float outputs calibration's session (tensors exposed, one thread) and the trials' session give
#: bit for bit (conv_bn_relu's do not: exposing the Conv output there changes onnxruntime's fusion)
DW = MODELS / "depthwise.onnx"

pytestmark = pytest.mark.usefixtures("fresh_stats_cache")  # tests/conftest.py


def _plan(method: str) -> Plan:
    return Plan.from_dict({"version": 1, "defaults": {
        "weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": True},
        "activation": {"dtype": "uint8", "granularity": "per_tensor", "symmetric": False, "calibration": method}},
        "rules": []})


def _calib(tmp: Path) -> str:
    data = dict(np.load(MODELS / "depthwise.npz"))
    (name, x), = data.items()
    x = x.copy()
    x[3].reshape(-1)[:12] *= 50.0  # an outlier: the methods score apart
    path = tmp / "calib.npz"
    np.savez(path, **{name: x})
    return str(path)


def _float_runs(monkeypatch) -> list[int]:
    """Counts the runs of every session ``_choose_method`` builds, one entry per session (the first: the float
    graph)."""
    runs: list[int] = []
    real = calibrate_module.ir.graph_session

    class _Counted:
        def __init__(self, sess):
            self._sess, self._i = sess, len(runs)
            runs.append(0)

        def get_inputs(self):
            return self._sess.get_inputs()

        def run(self, *a, **k):
            runs[self._i] += 1
            return self._sess.run(*a, **k)

    class _Ir:
        def __getattr__(self, name):
            return getattr(ir, name)

        @staticmethod
        def graph_session(*a, **k):
            return _Counted(real(*a, **k))

    monkeypatch.setattr(calibrate_module, "ir", _Ir())
    return runs


def _compile(tmp: Path, name: str, calib: str) -> tuple[bytes, dict]:
    out = tmp / f"{name}.onnx"
    res = compile_model(DW, out, CompileOptions(plan=_plan("auto"), calib=calib, validate=False))
    return out.read_bytes(), res.report["calibration"]["auto"]


def test_trials_take_the_float_reference_from_calibrations_runs_same_scores_same_bytes(tmp_path, monkeypatch):
    calib = _calib(tmp_path)
    runs = _float_runs(monkeypatch)
    kept_bytes, kept = _compile(tmp_path, "kept", calib)
    assert kept["samples"] == 8 and runs == [1, 8, 8, 8, 8]  # the float graph ran the first held-out sample only

    runs.clear()
    reset_stats_cache()
    monkeypatch.setattr(calibrate_module, "_holds", lambda *a: False)  # as before: every sample runs here
    fresh_bytes, fresh = _compile(tmp_path, "fresh", calib)
    assert runs == [8, 8, 8, 8, 8]
    assert kept == fresh and kept_bytes == fresh_bytes  # every method's score to the digit, and the file
    assert kept["method"] != "minmax"


def test_a_kept_reference_whose_first_sample_differs_is_not_taken(tmp_path, monkeypatch):
    calib = _calib(tmp_path)
    want_bytes, want = _compile(tmp_path, "want", calib)
    reset_stats_cache()
    runs = _float_runs(monkeypatch)
    real_put = FloatOutputs.put

    def off_by_a_bit(self, i, outputs):  # another session's values: one ulp off on the first sample
        if i == 0:
            outputs = {k: np.nextafter(v, np.inf).astype(v.dtype) for k, v in outputs.items()}
        real_put(self, i, outputs)

    monkeypatch.setattr(FloatOutputs, "put", off_by_a_bit)
    got_bytes, got = _compile(tmp_path, "got", calib)
    assert runs == [8, 8, 8, 8, 8]  # checked on sample 0, refused: the float graph ran every sample itself
    assert got == want and got_bytes == want_bytes


@pytest.mark.parametrize("n", [12, 64, 200])
def test_a_for_auto_collection_keeps_the_held_out_parts_outputs_only_and_a_hit_serves_them(tmp_path, n):
    graph = matmul_relu_graph()
    src = CalibrationSource.from_arg(str(npz_folder(tmp_path / "calib", n, 3)), input_signatures(graph))
    minmax = {"h": QuantSpec(dtype="uint8"), "y": QuantSpec(dtype="uint8")}
    auto = {k: QuantSpec(dtype="uint8", calibration="auto") for k in minmax}
    collect(graph, minmax, src, workers=2, for_auto=True)
    held = auto_parts(n)[-1]
    cache = stats_cache()
    # the held-out part only (min(16, N / 4) samples, whatever N): memory bounded by h, not by the samples
    per_sample = 2 * 4 * 4  # y: [2, 4] float32
    assert cache.outputs_nbytes == len(held) * per_sample and len(held) == min(16, n // 4)

    kept = FloatOutputs(len(held), 1 << 20)
    served = collect(graph, auto, src.subset(held), workers=1, outputs=kept)
    assert cache.outputs_hits == 1 and cache.hits == 1 and all(st.has_histogram for st in served.values())
    assert cache.outputs_nbytes == 0  # taken out: one reader, their memory goes with it
    sess = ir.graph_session(graph, threads=1)
    for i, feed in enumerate(src.subset(held)):
        assert kept.values[i]["y"].tobytes() == sess.run(["y"], feed)[0].tobytes()
    # a collection of other samples (the first part) gets none
    other = FloatOutputs(len(held), 1 << 20)
    collect(graph, auto, src.subset(auto_parts(n)[0]), workers=1, outputs=other)
    assert other.values == {}


def test_kept_outputs_are_bounded_and_off_with_the_cache(tmp_path):
    graph = matmul_relu_graph()
    gbase = graph_base(graph_key(graph), input_signatures(graph))
    one = [{"y": np.zeros(1024, np.float32)}]  # 4 KiB
    cache = reset_stats_cache()
    cache.keep_outputs(gbase, ["a"], one, max_bytes=3 * 4096)
    cache.keep_outputs(gbase, ["too-big"], [{"y": np.zeros(4096, np.float32)}], max_bytes=3 * 4096)
    assert cache.take_outputs(gbase, ["too-big"]) is None
    for k in "bcd":
        cache.keep_outputs(gbase, [k], one, max_bytes=3 * 4096)
    assert cache.outputs_nbytes == 3 * 4096 and cache.take_outputs(gbase, ["a"]) is None  # least recent gone
    assert cache.take_outputs(gbase, ["d", "c"]) is None  # exactly the ids
    assert cache.take_outputs(gbase, ["d"]) is not None and cache.outputs_nbytes == 2 * 4096  # taken: gone
    assert cache.take_outputs(gbase, ["d"]) is None
    off = reset_stats_cache(0)
    off.keep_outputs(gbase, ["a"], one)
    assert off.take_outputs(gbase, ["a"]) is None and off.outputs_nbytes == 0
