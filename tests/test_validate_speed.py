"""Validation at speed (issue 15): the runs go ahead on a pool, the sums reuse scratch buffers, the exposing
sessions' trial run is sample 0's result — and none of it changes a number the report gives."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompiler import ir
from qcompiler.core.errors import UserError
from qcompiler.report import validate
from qcompiler.report.validate import compare, pipeline, sessions
from qcompiler.report.validate.metrics import Workspace, _Accumulator

F32 = TensorProto.FLOAT


def _convnet(seed: int, noise: float = 0.0) -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Softmax over the last axis: float outputs, class-score-like last axis, and
    layers (weights perturbed by ``noise`` to stand for the quantized model)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 4
    w2 = rng.standard_normal((4, 8, 3, 3)).astype(np.float32) / 6
    if noise:
        nrng = np.random.default_rng(seed + 100)
        w1 = (w1 + noise * nrng.standard_normal(w1.shape)).astype(np.float32)
        w2 = (w2 + noise * nrng.standard_normal(w2.shape)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Softmax", ["c2"], ["y"], name="softmax", axis=-1),
             helper.make_node("ReduceMean", ["r1"], ["m"], name="mean", keepdims=0, axes=[2, 3])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F32, [1, 3, 12, 12])],
                              [helper.make_tensor_value_info("y", F32, [1, 4, 12, 12]),
                               helper.make_tensor_value_info("m", F32, [1, 8])],
                              initializer=[numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 3, 12, 12)).astype(np.float32)} for _ in range(n)]


def _report(workers: int, monkeypatch: pytest.MonkeyPatch, feeds=None, **kw) -> dict:
    monkeypatch.setenv(compare.WORKERS_ENV, str(workers))
    r = validate.validate(_convnet(0), _convnet(0, noise=0.02), feeds if feeds is not None else _feeds(12), **kw)
    return r.to_json()


# --------------------------------------------------------------------------------- the same numbers
@pytest.mark.parametrize("layer_samples", [None, 0, 1, 3])
def test_pipelined_report_equals_the_sequential_one(monkeypatch, layer_samples):
    """One worker (every run when its result is read, nothing ahead) and two (runs ahead, layer sums on the
    pool, lookahead of several samples) give the same report, byte for byte."""
    one = _report(1, monkeypatch, layer_samples=layer_samples)
    two = _report(2, monkeypatch, layer_samples=layer_samples)
    three = _report(3, monkeypatch, layer_samples=layer_samples)
    assert json.dumps(one, sort_keys=True) == json.dumps(two, sort_keys=True) == json.dumps(three, sort_keys=True)
    assert one["samples"] == 12
    per_sample = {"c1": 8 * 144, "r1": 8 * 144, "c2": 4 * 144}
    measured = 12 if layer_samples is None else layer_samples
    # layer_samples=0: no layer compared, so none listed (not every layer with 0 elements and SQNR inf)
    assert {m["name"]: m["elements"] for m in one["layers"]} == {
        k: v * measured for k, v in per_sample.items() if measured > 0}


@pytest.mark.parametrize("budget", ["LOOKAHEAD_BYTES", "LAYER_LOOKAHEAD_BYTES"])
def test_no_lookahead_gives_the_same_report(monkeypatch, budget):
    """Outputs (or exposed layers) above the lookahead budget: nothing runs ahead, same numbers."""
    ahead = _report(2, monkeypatch, layer_samples=4)
    monkeypatch.setattr(pipeline, budget, 1)
    none = _report(2, monkeypatch, layer_samples=4)
    assert json.dumps(ahead, sort_keys=True) == json.dumps(none, sort_keys=True)


def test_whole_output_sqnr_is_the_plain_float64_sum_over_samples(monkeypatch):
    """The output metrics the compile prints are the sums of before (fresh float64 copies, ``np.sum`` of the
    products, accumulated sample after sample), exactly, however many workers ran them."""
    feeds = _feeds(9, seed=3)
    fs, qs = ir.session(_convnet(0)), ir.session(_convnet(0, noise=0.02))
    ref2 = noise2 = dot = q2 = abs_sum = 0.0
    max_abs = 0.0
    for f in feeds:
        r = fs.run(["y"], f)[0].astype(np.float64).ravel()
        x = qs.run(["y"], f)[0].astype(np.float64).ravel()
        d = r - x
        ref2 += float(np.sum(r * r))
        q2 += float(np.sum(x * x))
        dot += float(np.sum(r * x))
        noise2 += float(np.sum(d * d))
        abs_sum += float(np.abs(d).sum())
        max_abs = max(max_abs, float(np.abs(d).max()))
    for workers in (1, 2):
        monkeypatch.setenv(compare.WORKERS_ENV, str(workers))
        rep = validate.validate(_convnet(0), _convnet(0, noise=0.02), feeds, layer_samples=2)
        y = next(m for m in rep.outputs if m.name == "y")
        assert y.sqnr_db == 10.0 * math.log10(ref2 / noise2)
        assert y.cosine == max(-1.0, min(1.0, dot / (math.sqrt(ref2) * math.sqrt(q2))))
        assert y.max_abs == max_abs
        assert y.mean_abs == abs_sum / y.elements


def _slots(acc: _Accumulator) -> list:
    return [getattr(acc, s) for s in _Accumulator.__slots__]


def _same(a: list, b: list) -> bool:
    return all(x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
               for x, y in zip(a, b))


def test_workspace_sums_are_bit_identical_to_fresh_copies():
    """Every dtype and layout the sessions give: the buffered update equals the allocating one in every slot."""
    rng = np.random.default_rng(7)
    a = rng.standard_normal((5, 6, 7)).astype(np.float32)
    nan = a.copy()
    nan[1, 2, 3] = np.nan
    d64 = rng.standard_normal((6, 4))
    cases = [
        (a, a + np.float32(0.01) * rng.standard_normal(a.shape).astype(np.float32)),
        (a[:, ::2, :], a[:, ::2, :] * 1.01),                       # strided float32
        (d64.T, (d64 + 0.1).T),                                    # float64, not contiguous
        (d64, d64 * 0.99),                                         # float64, contiguous: used in place
        (a.astype(np.float16), (a * 1.02).astype(np.float16)),
        (rng.integers(0, 5, (3, 4)), rng.integers(0, 5, (3, 4))),  # integers: exact match too
        (np.array(2.5, np.float32), np.array(2.0, np.float32)),    # 0-d
        (np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)),
        (a, nan),
        (a, np.full_like(a, np.inf)),
    ]
    ws = Workspace()
    fresh, reused = _Accumulator("t"), _Accumulator("t")
    with np.errstate(invalid="ignore", over="ignore"):
        for ref, q in cases:
            one, two = _Accumulator("t"), _Accumulator("t")
            one.update(ref, q)
            two.update(ref, q, ws)
            assert _same(_slots(one), _slots(two)), (ref.dtype, ref.shape)
            if not np.isnan(q).any() and not np.isinf(q).any():
                fresh.update(ref, q)      # streaming over samples of different sizes (buffers grow and shrink)
                reused.update(ref, q, ws)
    assert _same(_slots(fresh), _slots(reused))
    assert d64.T.flags.c_contiguous is False
    assert not np.shares_memory(ws.float64(0, d64.T), d64)
    assert np.shares_memory(ws.float64(0, d64), d64)


# ---------------------------------------------------------------------------------- fewer runs
def test_exposing_sessions_run_sample_zero_once(monkeypatch):
    """The trial run of each exposing session is sample 0's per-layer result: 3 layer samples, 3 runs each
    (were 4: sample 0 ran twice)."""
    calls: dict[str, int] = {"float": 0, "quant": 0}
    orig = sessions._Runner.run

    def counting(self, feed, sample, names):
        if self.extra:
            calls["float" if self.sess is float_sessions[0] else "quant"] += 1
        return orig(self, feed, sample, names)

    float_sessions: list = []
    orig_init = sessions._Runner.__init__

    def init(self, model, extra=(), optimize=True, threads=0):
        orig_init(self, model, extra, optimize, threads)
        if extra and model.graph.node[0].name == "conv1" and not float_sessions:
            float_sessions.append(self.sess)

    monkeypatch.setattr(sessions._Runner, "run", counting)
    monkeypatch.setattr(sessions._Runner, "__init__", init)
    for workers in (1, 2):
        calls.update(float=0, quant=0)
        float_sessions.clear()
        rep = _report(workers, monkeypatch, feeds=_feeds(6), layer_samples=3)
        assert rep["layer_samples"] == 3
        assert calls == {"float": 3, "quant": 3}, workers


@pytest.mark.parametrize("cpus,workers,threads", [(2, 2, 1), (16, 2, 8), (3, 2, 1), (8, 1, 0)])
def test_session_threads_share_the_cpus_among_the_runs(monkeypatch, cpus, workers, threads):
    monkeypatch.setattr(compare, "usable_cpus", lambda: cpus)
    assert compare.session_threads(workers) == threads


def test_lookahead_is_bounded_by_the_output_bytes():
    small = {"y": np.zeros(1000, np.float32)}
    assert pipeline.lookahead(small, small) == pipeline.MAX_LOOKAHEAD
    big = {"y": np.zeros(pipeline.LOOKAHEAD_BYTES // 4, np.float32)}  # one sample over the budget
    assert pipeline.lookahead(big, big) == 0
    half = {"y": np.zeros(pipeline.LOOKAHEAD_BYTES // 16, np.float32)}  # 2 x 1/4 of the budget a sample
    assert pipeline.lookahead(half, half) == 2
    assert pipeline.layer_lookahead(4, small, small) == 1
    assert pipeline.layer_lookahead(0, small, small) == 0
    layer = {"t": np.zeros(pipeline.LAYER_LOOKAHEAD_BYTES // 8 + 1, np.float32)}  # half the budget and a bit
    assert pipeline.layer_lookahead(4, layer, layer) == 0


# ---------------------------------------------------------------------------- errors in their turn
def _failing_feeds(good: int, exc: BaseException):
    yield from _feeds(good)
    raise exc


@pytest.mark.parametrize("workers", [1, 2])
def test_a_feed_error_is_raised_after_the_samples_before_it(monkeypatch, workers):
    done: list[int] = []
    monkeypatch.setenv(compare.WORKERS_ENV, str(workers))
    with pytest.raises(UserError, match="sample 4 is broken"):
        validate.validate(_convnet(0), _convnet(0, noise=0.02), _failing_feeds(4, UserError("sample 4 is broken")),
                          layer_samples=2, progress=lambda d, t: done.append(d))
    assert done == [1, 2, 3, 4]


@pytest.mark.parametrize("workers", [1, 2])
def test_an_earlier_failing_sample_is_reported_before_a_later_bad_feed(monkeypatch, workers):
    """Sample 1 has the wrong shape (the float model fails on it); the feeds break at sample 3, which the
    pool may already have taken: the error is sample 1's."""
    feeds = _feeds(1)
    feeds.append({"x": np.zeros((1, 3, 5, 5), np.float32)})
    feeds.append(_feeds(1)[0])

    def gen():
        yield from feeds
        raise UserError("feeds broke at sample 3")

    monkeypatch.setenv(compare.WORKERS_ENV, str(workers))
    with pytest.raises(UserError, match=r"float model: onnxruntime failed on sample 1"):
        validate.validate(_convnet(0), _convnet(0, noise=0.02), gen(), layer_samples=2)


# ------------------------------------------------------------------------------ load: one serialization
def _record_checks(monkeypatch) -> list:
    from qcompiler.ir import load as ir_load

    seen: list = []
    for name in ("check_model", "_check_inferred_sizes", "_check_runtime"):
        real = getattr(ir_load, name)

        def wrapper(*a, _real=real, _name=name, **kw):
            seen.append((_name, kw.get("serialized")))
            return _real(*a, **kw)
        monkeypatch.setattr(ir_load, name, wrapper)
    ir_load._CHECKED.clear()
    return seen


def test_load_checks_an_inline_model_from_the_file_bytes(tmp_path, monkeypatch):
    """No external data: the checker, shape inference and the onnxruntime trial get the file's bytes (no
    re-serialization of the proto); the model loaded is the same."""
    path = tmp_path / "m.onnx"
    onnx.save_model(_convnet(0), str(path))
    seen = _record_checks(monkeypatch)
    m = ir.load_model(path)
    assert [n for n, _ in seen] == ["check_model", "_check_inferred_sizes", "_check_runtime"]
    assert all(blob == path.read_bytes() for _, blob in seen)
    assert m.SerializeToString() == _convnet(0).SerializeToString()


def test_load_checks_a_model_with_external_data_from_the_proto(tmp_path, monkeypatch):
    """External tensors (small ones read inline while loading, so the proto no longer matches the file): the
    checks see the proto, not the file's bytes."""
    path = tmp_path / "m.onnx"
    onnx.save_model(_convnet(0), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").stat().st_size > 0
    seen = _record_checks(monkeypatch)
    ir.load_model(path)
    assert seen and all(blob is None for _, blob in seen)


@pytest.mark.parametrize("bad", ["checker", "runtime"])
def test_load_refusals_are_unchanged_with_the_file_bytes(tmp_path, bad):
    """A model the checker refuses, and one only onnxruntime refuses, still fail with their one-line errors."""
    m = _convnet(0)
    if bad == "checker":
        m.graph.node[1].input[0] = "nowhere"  # an input nothing produces
        want = "fails the ONNX checker"
    else:
        m.graph.node[1].name = "conv1"  # duplicate node names: the checker passes, onnxruntime refuses
        want = "onnxruntime refuses the model"
    path = tmp_path / "bad.onnx"
    path.write_bytes(m.SerializeToString())
    from qcompiler.ir import load as ir_load

    ir_load._CHECKED.clear()
    with pytest.raises(UserError, match=want) as e:
        ir.load_model(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------- per-layer samples by bytes
@pytest.mark.parametrize("workers", [1, 2])
def test_layer_bytes_bounds_the_per_layer_samples_only(monkeypatch, workers):
    """``layer_bytes`` (what the compile gives, for a large model's layers) keeps as many first samples for the
    per-layer metrics as their exposed tensors fit (float + quantized, measured on sample 0; at least one, at
    most ``layer_samples``): the report is the one ``layer_samples`` of that many gives, outputs untouched."""
    feeds = _feeds(12)
    per_sample = 2 * 4 * 144 * (8 + 8 + 4)  # c1, r1, c2 in both models (outputs y, m are not layers)
    bounded = _report(workers, monkeypatch, feeds, layer_samples=8, layer_bytes=2 * per_sample + per_sample // 2)
    assert bounded["layer_samples"] == 2 and bounded["layers"]
    assert bounded == _report(workers, monkeypatch, feeds, layer_samples=2)
    assert bounded["outputs"] == _report(workers, monkeypatch, feeds, layer_samples=8)["outputs"]
    assert _report(workers, monkeypatch, feeds, layer_samples=8, layer_bytes=1)["layer_samples"] == 1
    assert _report(workers, monkeypatch, feeds, layer_samples=3, layer_bytes=1 << 30)["layer_samples"] == 3
    assert _report(workers, monkeypatch, feeds, layer_bytes=3 * per_sample)["layer_samples"] == 3


# --------------------------------------------------------------------------------- the measured default's reference
def test_float_reference_and_validate_against_give_validates_numbers_with_one_or_two_workers(monkeypatch):
    """The float reference runs side by side (as validate's runs, one intra-op thread each): its outputs, and
    the report validate_against gives from them, are validate's (per_layer=False) byte for byte, with 1 or 2
    workers; the first failing sample is the one named."""
    fm, qm, feeds = _convnet(0), _convnet(0, noise=0.02), _feeds(9)
    results = {}
    for workers in (1, 2):
        monkeypatch.setenv(compare.WORKERS_ENV, str(workers))
        ref = validate.float_reference(fm, feeds)
        results[workers] = (ref.outputs, validate.validate_against(ref, qm).to_json())
    (o1, r1), (o2, r2) = results[1], results[2]
    assert all(np.array_equal(a[n], b[n]) for a, b in zip(o1, o2, strict=True) for n in a) and r1 == r2
    monkeypatch.setenv(compare.WORKERS_ENV, "2")
    full = validate.validate(fm, qm, feeds, per_layer=False).to_json()
    assert full == results[2][1]
    bad = [dict(f) for f in feeds]
    bad[5] = {"x": np.zeros((1, 3, 7, 7), np.float32)}
    bad[7] = {"x": np.zeros((1, 3, 5, 5), np.float32)}
    with pytest.raises(UserError, match="on sample 5"):
        validate.float_reference(fm, bad)
