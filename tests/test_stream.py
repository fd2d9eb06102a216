"""passes/_stream.py: the PTQ passes' pass over the calibration data (runs in flight, consumed in order)."""

from __future__ import annotations

import numpy as np
import pytest
from _graphs import matmul_relu_graph

from qcompiler.calib import CalibrationSource, input_signatures
from qcompiler.core.errors import UserError
from qcompiler.passes._stream import layer_threads, one_blas_thread, stream


def _feeds(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((2, 6)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("workers", [1, 2, 5])
def test_stream_consumes_every_sample_in_order_for_any_workers(workers):
    graph = matmul_relu_graph()
    feeds = _feeds(9)
    src = CalibrationSource.from_feeds(feeds, input_signatures(graph))
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    done: list[tuple[int, int]] = []
    n = stream(graph, ["x", "h"], src, lambda v: seen.append((v["x"], v["h"])), workers=workers,
               progress=lambda d, t: done.append((d, t)))
    assert n == 9 and done == [(i, 9) for i in range(1, 10)]
    w = np.asarray(graph.tensors()["w"].values)
    for (x, h), feed in zip(seen, feeds):
        assert np.array_equal(x, feed["x"])  # sample order kept
        np.testing.assert_allclose(h, feed["x"] @ w, rtol=1e-5, atol=1e-5)


def test_stream_names_the_failing_sample():
    graph = matmul_relu_graph()
    feeds = _feeds(4)
    src = CalibrationSource.from_feeds(feeds, input_signatures(graph), "calib")
    src.feeds[2] = {"x": np.zeros((2, 5), np.float32)}  # type: ignore[attr-defined]  # past the feed check
    seen: list[int] = []
    with pytest.raises(UserError, match=r"^calib: sample 2: onnxruntime failed on this calibration sample"):
        stream(graph, ["h"], src, lambda v: seen.append(1), workers=2)
    assert len(seen) == 2  # the samples before it were folded in, none after


def test_layer_threads_and_one_blas_thread():
    assert layer_threads(1) == 1 and 1 <= layer_threads(64) <= 64
    a = np.random.default_rng(0).standard_normal((300, 40)).astype(np.float32)
    before = a.T @ a
    with one_blas_thread():
        inside = a.T @ a
    np.testing.assert_allclose(inside, before, rtol=1e-4, atol=1e-3)
    try:
        from threadpoolctl import threadpool_info, threadpool_limits  # noqa: F401
    except ImportError:
        pytest.fail("threadpoolctl is a dependency (pyproject.toml)")
    with one_blas_thread():
        blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        assert blas and all(i["num_threads"] == 1 for i in blas)
