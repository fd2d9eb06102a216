"""qcompiler/core/activations.py: calibration's float activations kept (bounded) for the passes that stream
the same samples later; passes/_stream.py reads them instead of running onnxruntime again."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from _graphs import matmul_relu_graph

from qcompiler.calib import CalibrationSource, collect, input_signatures
from qcompiler.core.activations import CACHE_ENV, ActivationCache, default_max_bytes, graph_key
from qcompiler.passes import _stream
from qcompiler.passes._stream import stream
from qcompiler.plan import QuantSpec


def _source(graph, n=5):
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal((2, 6)).astype(np.float32)} for _ in range(n)]
    return CalibrationSource.from_feeds(feeds, input_signatures(graph), "calib")


def test_graph_key_follows_weights_and_structure():
    g = matmul_relu_graph()
    k = graph_key(g)
    assert k is not None and graph_key(matmul_relu_graph()) == k  # same graph, same key
    w = g.tensors()["w"]
    w.values = np.asarray(w.values) * 1.0001  # a weight rewritten (smooth, equalize, ...)
    assert graph_key(g) != k
    g2 = matmul_relu_graph()
    g2.nodes[1].op = "Sigmoid"
    assert graph_key(g2) != k


def test_graph_key_reads_tensor_valued_attributes():
    # a ConstantOfShape's value is a tensor attribute (the vision transformer of the zoo keeps one after cleanup):
    # fingerprinted by its bytes, so such graphs are cached too, and a changed value is another key
    def graph(fill: float) -> gs.Graph:
        g = matmul_relu_graph()
        shape = gs.Constant("cos_shape", np.array([1], dtype=np.int64))
        out = gs.Variable("cos_out", dtype=np.float32)
        g.nodes.append(gs.Node("ConstantOfShape", "cos", attrs={"value": gs.Constant(
            "cos_value", np.array([fill], dtype=np.float32))}, inputs=[shape], outputs=[out]))
        g.outputs.append(out)
        return g

    k = graph_key(graph(1.0))
    assert k is not None and graph_key(graph(1.0)) == k
    assert graph_key(graph(2.0)) != k


def test_cache_keeps_at_most_its_cap_and_gives_read_only_arrays():
    c = ActivationCache(max_bytes=3 * 48)  # three [2, 6] float32 samples
    a = np.ones((2, 6), np.float32)
    kept = [c.store("k", f"s{i}", {"t": a * i}) for i in range(5)]
    assert kept == [True, True, True, False, False] and c.nbytes == 3 * 48
    hit = c.lookup("k", "s1", ["t"])
    assert hit is not None and np.array_equal(hit["t"], a) and not hit["t"].flags.writeable
    assert c.lookup("k", "s4", ["t"]) is None and c.lookup("other", "s1", ["t"]) is None
    assert c.lookup("k", "s1", ["t", "u"]) is None  # all names or nothing
    c.clear()
    assert c.nbytes == 0 and c.lookup("k", "s1", ["t"]) is None


def test_cap_from_the_environment(monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "0")
    assert default_max_bytes() == 0 and not ActivationCache().store("k", "s", {"t": np.ones(3)})
    monkeypatch.setenv(CACHE_ENV, "1.5")
    assert default_max_bytes() == int(1.5 * 2**20)


def test_calibration_fills_the_cache_and_stream_reads_it_without_a_session(monkeypatch):
    graph = matmul_relu_graph()
    src = _source(graph)
    cache = ActivationCache()
    spec = QuantSpec(dtype="uint8")
    collect(graph, {"h": spec, "y": spec}, src, cache=cache, workers=2)
    assert cache.nbytes == 5 * 2 * (2 * 4 * 4)
    ref: list[np.ndarray] = []
    stream(graph, ["h"], src, lambda v: ref.append(np.array(v["h"])), cache=None, workers=1)

    def no_session(*a, **k):
        raise AssertionError("a hit must not build a session")

    monkeypatch.setattr(_stream.ir, "graph_session", no_session)
    got: list[np.ndarray] = []
    n = stream(graph, ["h", "x"], src, lambda v: got.append(np.array(v["h"])), cache=cache, workers=2)
    assert n == 5 and all(np.array_equal(a, b) for a, b in zip(got, ref))  # bit for bit what a run gives
    graph.tensors()["w"].values = np.asarray(graph.tensors()["w"].values) * 2.0  # the graph changed: misses
    with pytest.raises(AssertionError, match="must not build a session"):
        stream(graph, ["h"], src, lambda v: None, cache=cache, workers=1)


def test_collect_keeps_nothing_beyond_the_cap_or_for_random_data():
    graph = matmul_relu_graph()
    cache = ActivationCache(max_bytes=2 * 32)
    collect(graph, {"h": QuantSpec(dtype="uint8")}, _source(graph), cache=cache, workers=1)
    assert cache.nbytes == 2 * 32  # two samples of five fit
    c2 = ActivationCache()
    collect(graph, {"h": QuantSpec(dtype="uint8")}, CalibrationSource.from_arg("random", input_signatures(graph)),
            cache=c2, workers=1)
    assert c2.nbytes == 0  # synthetic inputs: nothing kept (the passes skip their data-driven work on them)
