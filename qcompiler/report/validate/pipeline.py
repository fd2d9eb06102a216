"""The order of validation's onnxruntime runs: samples are taken from the feeds in order and their runs go to a
thread pool ahead of the sample being measured, so onnxruntime (which releases the GIL) keeps the cores busy
while the measuring thread accumulates.

* A sample's graph-output runs (float, quantized) and its per-layer runs (the sessions exposing every compared
  tensor) are submitted separately: the output runs of the next samples start while the per-layer sessions are
  still being built, and a sample's per-layer runs are submitted once those sessions exist.
* Results are read in sample order and, within a sample, in a fixed order (float before quantized, outputs
  before layers), so the metrics, and the error raised first, do not depend on the number of workers. A feed
  the iterator fails to give raises in its own turn, after the samples before it are measured.
* Without a pool (one worker) nothing runs ahead: each run happens when its result is read.

Part of :mod:`qcompiler.report.validate`.
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

#: Graph-output bytes of a sample (float + quantized) up to which more samples run ahead of the one measured.
LOOKAHEAD_BYTES = 32 << 20
#: At most this many samples run ahead.
MAX_LOOKAHEAD = 4
#: Per-layer samples run one ahead only when one sample's exposed tensors (float + quantized) are within this:
#: a second sample's tensors are held meanwhile (PP-OCR det's 252 layers: 232 MiB a sample, so none ahead; its
#: runs and sums still go two at a time within the sample).
LAYER_LOOKAHEAD_BYTES = 64 << 20

Job = Callable[[], dict[str, np.ndarray]]


def lookahead(f_first: Mapping[str, Any], q_first: Mapping[str, Any]) -> int:
    """Samples to keep running ahead of the one measured, from the size of the first sample's outputs: up to
    :data:`MAX_LOOKAHEAD` within :data:`LOOKAHEAD_BYTES`, none when one sample's outputs are larger than that."""
    size = nbytes(f_first, q_first)
    return max(0, min(MAX_LOOKAHEAD, LOOKAHEAD_BYTES // max(1, size)))


def layer_lookahead(ahead: int, f_layers: Mapping[str, Any] | None, q_layers: Mapping[str, Any] | None) -> int:
    """Samples to run ahead while per-layer runs go on, from one sample's exposed tensors (the trial runs'):
    one (at most ``ahead``) within :data:`LAYER_LOOKAHEAD_BYTES`, else none."""
    return min(1, ahead) if nbytes(f_layers, q_layers) <= LAYER_LOOKAHEAD_BYTES else 0


def nbytes(*results: Mapping[str, Any] | None) -> int:
    """Bytes of the arrays in some run results."""
    return sum(int(np.asarray(v).nbytes) for r in results if r for v in r.values())


class Results:
    """The results of some runs, read by index: from the pool's futures, or run here on first read."""

    def __init__(self, jobs: list[Job], pool: concurrent.futures.ThreadPoolExecutor | None) -> None:
        self.jobs = jobs
        self.futures = [pool.submit(j) for j in jobs] if pool is not None else None

    def get(self, i: int) -> dict[str, np.ndarray]:
        if self.futures is not None:
            return self.futures[i].result()
        return self.jobs[i]()


class Sample:
    """One sample taken from the feeds: its index, its feed (until its per-layer runs are submitted), its
    output runs and per-layer runs, or the error the feeds raised in its place."""

    __slots__ = ("error", "feed", "idx", "layers", "outputs")

    def __init__(self, idx: int, feed: dict[str, np.ndarray] | None, error: BaseException | None = None) -> None:
        self.idx = idx
        self.feed = feed
        self.error = error
        self.outputs: Results | None = None
        self.layers: Results | None = None


class Pipeline:
    """Samples from ``feeds`` (sample 0, already taken, is ``first``) with their runs submitted ahead.

    ``output_jobs(idx, feed)``: the graph-output runs of a sample (none for sample 0, run beforehand);
    ``layer_jobs(idx, feed)``: its per-layer runs, or None when the sample has none (asked again when the
    sample comes up if it had none when submitted)."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor | None, first: dict[str, np.ndarray],
                 feeds: Iterator[dict[str, np.ndarray]], output_jobs: Callable[[int, dict[str, np.ndarray]], list[Job]],
                 layer_jobs: Callable[[int, dict[str, np.ndarray]], list[Job] | None]) -> None:
        self.pool = pool
        self.first: dict[str, np.ndarray] | None = first
        self.feeds = feeds
        self.output_jobs = output_jobs
        self.layer_jobs = layer_jobs
        self.queue: collections.deque[Sample] = collections.deque()
        self.taken = 0  # samples taken from the feeds (sample 0 included)
        self.more = True

    def fill(self, depth: int) -> None:
        """Take samples until ``depth`` + 1 are waiting (the next one to measure and ``depth`` ahead)."""
        while self.more and len(self.queue) <= depth:
            idx = self.taken
            if idx == 0:
                feed, self.first = self.first, None
            else:
                try:
                    feed = next(self.feeds)
                except StopIteration:
                    self.more = False
                    return
                except Exception as e:  # raised in its turn
                    self.queue.append(Sample(idx, None, error=e))
                    self.more = False
                    return
            self.taken += 1
            assert feed is not None
            s = Sample(idx, feed)
            s.outputs = Results(self.output_jobs(idx, feed), self.pool)
            self._submit_layers(s)
            self.queue.append(s)

    def _submit_layers(self, s: Sample) -> None:
        if s.layers is None and s.feed is not None:
            jobs = self.layer_jobs(s.idx, s.feed)
            if jobs is not None:
                s.layers = Results(jobs, self.pool)
                s.feed = None

    def next(self, depth: int) -> Sample | None:
        """The next sample to measure (its per-layer runs submitted now if they were not), with ``depth``
        samples submitted behind it; None when the feeds are exhausted."""
        if self.queue:
            self._submit_layers(self.queue[0])
        self.fill(depth)
        if not self.queue:
            return None
        s = self.queue.popleft()
        if s.error is not None:
            raise s.error
        s.feed = None
        return s
