"""gptq: error-compensating rounding of low-bit weights (Frantar et al. 2023, "GPTQ").

For a layer ``y = W·x`` (W viewed as ``[out, K]``, K the reduction: MatMul/Gemm input features, Conv
``Cin/g × kH × kW`` per group) rounding each weight to nearest ignores how errors combine over the inputs.
GPTQ minimizes the layer's output error ``‖(Ŵ − W)·X‖²`` over the calibration inputs X instead. With
``H = XᵀX`` (K × K, accumulated streaming over the samples: Conv inputs are unfolded into their K-wide patches),
it quantizes the columns of W one at a time and spreads each column's rounding error over the columns not
yet quantized, in proportion to the inverse Hessian:

    H ← H + (λ + min(K/n, 1))·mean(diag H)·I  (damping λ = ``damp``, plus shrinkage when the n calibration
                                              rows are few for K; dead inputs get H_ii = 1, W[:, i] = 0)
    U = chol(H⁻¹)ᵀ  (upper)
    for each column j:  q_j = Q(w_j);  e = (w_j − q_j) / U_jj;  w_{j+1:} ← w_{j+1:} − e · U_{j, j+1:}

in blocks of ``block_size`` columns (updates inside a block are immediate, the rest of the matrix is updated
once per block: the "lazy batch" form). With ``act_order`` (per-channel grids only) the columns are swept in
order of decreasing ``H_jj`` — W and H permuted alike, the codes put back in the weight's column order — so the
inputs with the most energy are rounded while the most columns remain to absorb their error. The grid Q is
the plan's: per-channel scales are fixed from the whole weight (``range: minmax`` or ``mse``) before the sweep;
block-wise scales (``granularity: block``) are chosen when the sweep reaches the first column of each block, from
the already-updated weights, as GPTQ's grouped variant does. Conv columns are ordered (kH, kW, Cin).

The result goes to ``ctx.weight_overrides[(node, 1)]`` as a :class:`~qcompiler.quant.QuantizedTensor` in the
weight's own layout, which ``insert-qdq`` emits as is; the float graph is not changed. Applies to Conv / Gemm /
MatMul weights the plan quantizes to an integer dtype of at most ``max_bits`` bits (int4 by default), scheme
``int``, not shared with another node. Needs real calibration data: without it (no ``--calib``, ``none`` or
``random``) the pass skips, with a warning (round to nearest). Runs after ``resolve-plan``, before ``insert-qdq``;
a second run skips layers with an override. All numpy (float64 sums of float32 per-sample products); memory
is one K × K matrix per layer, plus one float32 K × K product buffer per thread and layer shape.

Rows: ``H`` is built from every row of every sample unless ``max_rows`` (N > 0) bounds it: then each sample
gives ``ceil(N / samples)`` rows per layer (all of them when it has no more), drawn without replacement by
``numpy.random.default_rng((compile seed, sample, layer))`` in increasing order and gathered before the patches
are copied, and the shrinkage above counts the rows used. Building ``H`` is most of GPTQ's time (the sweep is
cheap by comparison); see docs/ptq.md for the measured accuracy cost and why the default is every row.
Arithmetic (:mod:`._gptq_rows`, :mod:`._gptq_gram`, :mod:`._gptq_linalg`): a stride-1 Conv with several taps
and at least 16 input channels per group builds ``H`` from shifted products of its input, without unfolding it
(``XᵀX`` in exact arithmetic; float32 rounding in another order; assembled once after the last sample); other
Conv inputs are unfolded transposed (``[groups, K, P]``) and ``H`` is numpy's ``syrk`` of them, bit for bit the
product of the rows; layers reading one tensor with one
geometry (Q / K / V) share one ``H``, built once (not with ``max_rows``: each layer draws its own rows); above
K = 128 the sweep's ``U`` comes from the reversed Cholesky factor's triangular inverse (docs/ptq.md, "Speed:
the arithmetic").
Wide layers: ``H`` is K × K float64 and the sweep holds a few more K × K matrices (a VGG's first fully connected
layer, K = 25088: 5 GiB each, beyond a 24 GiB machine). A layer wider than :data:`MAX_WIDTH` columns is swept in
the fewest equal column chunks of at most that width made of whole taps (Conv) or whole weight blocks, each chunk
with its own ``H_c = X_cᵀX_c`` — the diagonal blocks of ``H``, so a chunk's rounding error is spread over its own
columns only (block-diagonal GPTQ; the proxy losses are summed over the chunks), and its per-sample product
buffer is one chunk's; a layer with no such split is rounded to nearest (``skipped_too_wide``). Stats
``chunked_layers``. All layers' Hessians together are bounded too: above :data:`MAX_WAVE_BYTES` the layers go in
waves (consecutive in graph order), each accumulated over its own pass through the data, swept, and its ``H``
released before the next (each ``H`` the same sum: the same codes; stats ``hessian_waves``).
Order: the samples the measured default holds back (``calib.held_back_indices``) are summed last. Caches
(:mod:`._gptq_cache`): a layer's ``H`` over the same samples (or their first ones: only the rest is accumulated,
bit for bit the same sum, up to float64 rounding where the shifted products assemble it — so all N continue the
candidates' N - h) and its sweep come from an earlier compile.
Stats: ``layers``, ``samples``, ``skipped_*``; ``ctx.report["gptq"]`` the summed proxy losses ``‖ΔW·X‖²``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompiler import quant
from qcompiler.core import profile
from qcompiler.core.context import CompileContext
from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import Pass, PassResult
from qcompiler.ir.graph import GraphIndex, is_onnx_op
from qcompiler.plan import QuantSpec

from . import _gptq_cache, _gptq_gram
from ._gptq_grids import _axes, _BlockGrid, _fixed_grid, _Grid, _proxy, _rows_of_scale
from ._gptq_linalg import inverse_cholesky_upper, inverse_cholesky_upper_stack
from ._gptq_rows import _chunk_count, _cols, _im2col, _Pick, _rows, _rows_key  # noqa: F401  (_im2col: tests)
from ._layers import Layer, find_layer
from ._stream import layer_threads, one_blas_thread, progress_of, release_activations, source_for, stream

log = logging.getLogger(__name__)

_INT_BITS = {"int4": 4, "uint4": 4, "int8": 8, "uint8": 8, "int16": 16, "uint16": 16}
#: sweep one-row groups (depthwise Convs, per-channel grids) together (:meth:`GPTQPass._gptq_one_row_groups`);
#: False: one group at a time (the reference the tests compare with)
BATCH_ONE_ROW_GROUPS = True
#: default ``max_rows``: rows (im2col positions / tokens) per layer Hessian, over all samples (0: all of them)
MAX_ROWS = 0
#: stride-1 Convs' Hessians from shifted products of the input (:mod:`._gptq_gram`); False: every layer from its
#: unfolded rows (the reference the tests compare with)
SHIFTED_GRAM = True
#: the most bytes of Hessians accumulated at once: above it the layers (in graph order) go in waves, each
#: accumulated over its own pass through the data, swept and released before the next (the same sums)
MAX_WAVE_BYTES = 4 << 30
_RELEASED = np.zeros((0, 0, 0))
#: a layer with more columns (K) than this is swept in equal column chunks of at most this width, each with its
#: own diagonal block of H (module docstring, "Wide layers"): 8192 columns are 512 MiB of float64 H
MAX_WIDTH = 8192


@dataclass
class Options:
    block_size: int = 128  # columns per lazy-update block
    damp: float = 0.01  # λ: H + λ·mean(diag H)·I
    max_bits: int = 4  # only weights quantized to at most this many bits
    samples: int | None = None  # use at most N calibration samples
    act_order: bool = False  # per-channel grids: quantize the columns in order of decreasing H_ii
    #: Hessian of a layer from at most this many rows (im2col positions / tokens) in all, an even share per
    #: sample, drawn with a fixed seed; 0: every row (see the module docstring, "Rows")
    max_rows: int = MAX_ROWS

    def validate(self, pass_name: str = "gptq") -> None:
        if self.block_size < 1:
            raise UserError(f"pass '{pass_name}' option 'block-size': must be >= 1, got {self.block_size}")
        if not 0.0 < self.damp < 1.0:
            raise UserError(f"pass '{pass_name}' option 'damp': must be in (0, 1), got {self.damp}")
        if self.max_bits < 2:
            raise UserError(f"pass '{pass_name}' option 'max-bits': must be >= 2, got {self.max_bits}")
        if self.samples is not None and self.samples <= 0:
            raise UserError(f"pass '{pass_name}' option 'samples': must be a positive integer, got {self.samples}")
        if self.max_rows < 0:
            raise UserError(f"pass '{pass_name}' option 'max-rows': must be >= 0 (0: every row), got {self.max_rows}")


@dataclass
class _Job:
    layer: Layer
    spec: QuantSpec
    axis: int | None  # quantization axis in the weight's own layout (as insert-qdq would use)
    block: int | None
    h: np.ndarray  # [groups · chunks, K / chunks, K / chunks]: one Hessian per group and column chunk
    rows: int = 0
    chunks: int = 1  # column chunks per group (a layer wider than MAX_WIDTH: block-diagonal H)


class GPTQPass(Pass):
    """GPTQ rounding (inverse-Hessian error feedback) for low-bit Conv / Gemm / MatMul weights."""

    name = "gptq"
    Options = Options
    requires = frozenset({"plan-resolved"})
    produces = frozenset({"gptq"})
    invalidates = frozenset({"qdq"})
    invalidates_why = "it chooses the weights' codes"

    def run(self, ctx: CompileContext) -> PassResult:
        try:
            return self._run(ctx)
        finally:
            release_activations(ctx)  # calibration's activations, kept for this pass only

    def _run(self, ctx: CompileContext) -> PassResult:
        opts: Options = self.options
        opts.validate(self.name)
        assert ctx.resolved is not None
        stats: Counter[str] = Counter()
        index = GraphIndex(ctx.graph)
        jobs: list[_Job] = []
        for node in ctx.graph.nodes:
            np_ = ctx.resolved.nodes.get(node.name)
            if np_ is None or np_.weight is None or not is_onnx_op(node, "Conv", "Gemm", "MatMul"):
                continue
            spec = np_.weight
            bits = _INT_BITS.get(spec.dtype)
            if bits is None or bits > opts.max_bits or spec.scheme != "int" or spec.scale not in ("float", "float16"):
                stats["skipped_not_low_bit"] += 1
                continue
            if (node.name, 1) in ctx.weight_overrides:
                stats["skipped_already_done"] += 1
                continue
            lay = find_layer(node, index, exclusive=False)
            if lay is None or len(lay.weight.outputs) != 1:
                stats["skipped_shared_or_layout"] += 1
                continue
            axis, block = _axes(lay, spec)
            if axis is None and spec.granularity != "per_tensor":
                stats["skipped_layout"] += 1
                continue
            _, _, in_g, taps = lay.grouped(lay.w).shape
            k = in_g * taps
            chunks = _chunk_count(k, in_g, taps, block, MAX_WIDTH)
            if chunks is None:  # too wide for one H and no equal split keeps its taps / blocks whole
                log.warning("gptq: %s: K = %d columns, above %d, cannot be split into equal chunks of whole "
                            "taps / weight blocks: rounded to nearest", node.name, k, MAX_WIDTH)
                stats["skipped_too_wide"] += 1
                continue
            if chunks > 1:
                log.info("gptq: %s: K = %d columns swept in %d chunks of %d (block-diagonal H: above %d columns)",
                         node.name, k, chunks, k // chunks, MAX_WIDTH)
                stats["chunked_layers"] += 1
            kc = k // chunks
            jobs.append(_Job(lay, spec, axis, block, np.zeros((lay.groups * chunks, kc, kc)), chunks=chunks))
        if not jobs:
            return PassResult(False, stats)
        source = source_for(ctx, self.name, self.options.samples)
        if source is None:
            stats["skipped_no_data"] = len(jobs)
            return PassResult(False, stats)
        source = source.held_back_last()  # the order H is summed in (module doc, "Order")
        with profile.step("cache keys"):  # the same Hessians / sweeps of an earlier compile (_gptq_cache)
            keys = _gptq_cache.Keys.of(ctx.graph, source, [(j.layer.node, j.layer.w) for j in jobs], opts.max_rows,
                                       ctx.seed, [j.chunks for j in jobs])
            what = (opts.block_size, opts.damp, opts.act_order, BATCH_ONE_ROW_GROUPS)  # all the sweep reads
            done = _gptq_cache.cached_sweeps(keys, [repr((j.spec, j.axis, j.block, what)) for j in jobs])
        loss_rtn = loss_gptq = 0.0
        layer_progress = progress_of(ctx, "gptq layers")
        waves = _waves([j.h.nbytes if d is None else 0 for j, d in zip(jobs, done)], MAX_WAVE_BYTES)
        if len(waves) > 1:
            log.info("gptq: %d layers' Hessians in %d waves of at most %d MiB (one pass over the data each)",
                     len(jobs), len(waves), MAX_WAVE_BYTES >> 20)
            stats["hessian_waves"] = len(waves)
        for wave in waves:
            with profile.step("hessians"):
                stats["samples"] = self._accumulate(source, ctx, jobs, keys,
                                                    [done[j] is None and j in wave for j in range(len(jobs))])
            todo = [jobs[j] for j in wave if done[j] is None]
            # independent sweeps in parallel threads on one BLAS thread each; taken in layer order (timing-free)
            with profile.step("sweep"), one_blas_thread(), \
                    ThreadPoolExecutor(max_workers=layer_threads(len(jobs))) as pool:
                # the costliest sweeps started first (longest first: no big layer left running alone at the end),
                # results taken in layer order
                started = {i: pool.submit(self._quantize, todo[i])
                           for i in sorted(range(len(todo)), key=lambda i: -_sweep_cost(todo[i]))}
                swept = (started[i].result() for i in range(len(todo)))
                for li in wave:
                    job, got = jobs[li], done[li]
                    if got is None:
                        got = next(swept)
                        _gptq_cache.store_sweep(keys, li, got)
                    qt, l_rtn, l_gptq = got
                    if layer_progress is not None:
                        layer_progress(li + 1, len(jobs))
                    ctx.weight_overrides[(job.layer.node.name, 1)] = qt
                    loss_rtn, loss_gptq = loss_rtn + l_rtn, loss_gptq + l_gptq
                    job.h = _RELEASED  # swept: the pass keeps no H (the cache may)
        stats["layers"] = len(jobs)
        ctx.report["gptq"] = {"layers": stats["layers"], "samples": stats["samples"],
                              "proxy_loss_round_to_nearest": float(f"{loss_rtn:.6g}"),
                              "proxy_loss_gptq": float(f"{loss_gptq:.6g}")}
        # the graph's float weights are unchanged; the chosen codes travel in ctx.weight_overrides
        return PassResult(False, stats)

    # ------------------------------------------------------------------------------------------ Hessians
    def _accumulate(self, source: Any, ctx: CompileContext, jobs: list[_Job], keys: _gptq_cache.Keys | None,
                    need: list[bool]) -> int:
        """The ``need``-ed jobs' H over ``source``, cached ones (or prefixes) taken. Returns the sample count."""
        n = len(source)
        start = [0 if nd else n for nd in need]  # per job: the samples its H already holds
        for j, hit in enumerate(_gptq_cache.cached_hessians(keys, need)):
            if hit is not None:
                jobs[j].h, jobs[j].rows, start[j] = hit.h, hit.rows, hit.covered
        todo = [j for j in range(len(jobs)) if start[j] < n]
        if not todo:
            return n
        first = min(start[j] for j in todo)
        quota = -(-self.options.max_rows // max(n, 1)) if self.options.max_rows else None  # rows per sample, layer
        # layers reading the same input with the same geometry (a Q / K / V triple, branches of one tensor) have
        # the same H: built once, by the first of them (same samples only); without a row quota only
        share: dict[Any, int] = {}
        followers: dict[int, int] = {}
        for j in todo:
            lead = share.setdefault((_rows_key(jobs[j].layer), jobs[j].chunks, start[j]), j) if quota is None else j
            if lead != j:
                followers[j] = lead
        lead_todo = [j for j in todo if j not in followers]
        names = {j: jobs[j].layer.node.inputs[0].name for j in lead_todo}
        sample = [first]
        grams = {j: _gptq_gram.ConvGram(jobs[j].layer) for j in lead_todo
                 if SHIFTED_GRAM and not quota and jobs[j].chunks == 1 and _gptq_gram.eligible(jobs[j].layer)}
        scratch = threading.local()  # per thread: a float32 [groups, K, K] product buffer per shape

        def one(i: int, j: int, x: np.ndarray) -> None:
            job = jobs[j]
            x32 = np.asarray(x, dtype=np.float32)
            if j in grams:  # stride-1 Conv: shifted products, H assembled after the last sample
                grams[j].add(x32)
                return
            bufs = scratch.__dict__.setdefault("bufs", {})
            shape = job.h.shape if job.chunks == 1 else job.h.shape[1:]  # a wide layer: one chunk at a time
            buf = bufs.get(shape)
            if buf is None:
                buf = bufs[shape] = np.empty(shape, dtype=np.float32)
            if quota:
                rows = _rows(job.layer, x32, _Pick(quota, (ctx.seed, i, j)))  # [groups, P, K]
                a, b = rows.transpose(0, 2, 1), rows
            else:
                a = _cols(job.layer, x32)  # [groups, K, P]: the same product as rows^T rows, bit for bit
                b = a.transpose(0, 2, 1)
            if job.chunks > 1:  # each group's K columns as `chunks` runs: only H's diagonal blocks are summed
                a = a.reshape(a.shape[0] * job.chunks, a.shape[1] // job.chunks, a.shape[2])
                for c in range(a.shape[0]):  # the same products as one stacked matmul, a chunk's buffer only
                    np.matmul(a[c], a[c].T, out=buf)
                    np.add(job.h[c], buf, out=job.h[c])
            else:
                np.matmul(a, b, out=buf)  # float32 product per sample (numpy: syrk, a and b one buffer)
                np.add(job.h, buf, out=job.h)  # summed in float64 (the float32 values converted exactly)
            job.rows += a.shape[2]

        # a sample's layers in parallel threads, each product on one BLAS thread: the same sums on any machine
        # (docs/ptq.md "threads, not BLAS threads": 2 BLAS threads made one syrk up to 100x slower under load)
        with ThreadPoolExecutor(max_workers=layer_threads(len(lead_todo))) as pool, one_blas_thread():
            def consume(values: dict[str, np.ndarray]) -> None:
                i = sample[0]
                sample[0] += 1
                # the sample's costliest products started first (longest first), each layer's sum unchanged
                mine = sorted((j for j in names if i >= start[j]),  # not cached
                              key=lambda j: -_product_cost(jobs[j], values[names[j]]))
                for f in [pool.submit(one, i, j, values[names[j]]) for j in mine]:
                    f.result()

            report = progress_of(ctx, "gptq hessians")
            got = stream(ctx.graph, list(dict.fromkeys(names.values())),
                         source if first == 0 else source.subset(range(first, n)), consume, cache=ctx.activations,
                         progress=None if report is None else lambda done, _t: report(first + done, n))
        for j, gram in grams.items():
            np.add(jobs[j].h, gram.total(), out=jobs[j].h)
            jobs[j].rows += gram.rows
        for j, lead in followers.items():
            jobs[j].h, jobs[j].rows = jobs[lead].h.copy(), jobs[lead].rows
        _gptq_cache.store_hessians(keys, [(j, jobs[j].h, jobs[j].rows) for j in todo])
        return first + got

    # ---------------------------------------------------------------------------------------- quantizing
    def _quantize(self, job: _Job) -> tuple[quant.QuantizedTensor, float, float]:
        lay, spec = job.layer, job.spec
        w = lay.w.astype(np.float64)
        gw = lay.grouped(w)  # [g, out_g, in_g, taps]
        g_n, out_g, in_g, taps = gw.shape
        # columns ordered (tap, in): a block of input channels at one tap is contiguous
        mats = [gw[g].transpose(0, 2, 1).reshape(out_g, taps * in_g) for g in range(g_n)]
        per_channel_scale = None
        if spec.granularity != "block":
            ref = _fixed_grid(w.astype(np.float32), spec, job.axis, lay.node.name)
            per_channel_scale = (ref.scale, ref.zero_point)
        if (BATCH_ONE_ROW_GROUPS and (per_channel_scale is not None or job.block is not None) and out_g == 1
                and g_n > 1 and taps * in_g <= self.options.block_size and job.chunks == 1):
            # depthwise-like: many one-row groups, each swept on its own K <= block_size columns — the same
            # arithmetic, vectorized over the groups (per-channel grids, or block grids chosen as the sweep goes)
            q_all, l_rtn, l_gptq, bg = self._gptq_one_row_groups(np.stack(mats)[:, 0, :], job, per_channel_scale,
                                                                 lay, g_n, in_g, taps)
            s_rows = [] if bg is None else list(bg.scales[:, None, :])
            z_rows = [] if bg is None else list(bg.zps[:, None, :])
            qt = self._assemble(lay, spec, job, list(q_all[:, None, :]), s_rows, z_rows, per_channel_scale, in_g,
                                taps)
            return qt, l_rtn, l_gptq
        q_mats: list[np.ndarray] = []
        s_mats: list[np.ndarray] = []
        z_mats: list[np.ndarray] = []
        l_rtn = l_gptq = 0.0
        c = job.chunks  # column chunks (whole taps, or runs of input channels when there is one tap)
        in_c, taps_c = (in_g, taps // c) if taps > 1 else (in_g // c, 1)
        kc = in_c * taps_c
        for g in range(g_n):
            grid = None if per_channel_scale is None else _Grid(spec, *_rows_of_scale(per_channel_scale, lay, g, out_g))
            codes_c: list[np.ndarray] = []
            scales_c: list[np.ndarray] = []
            zps_c: list[np.ndarray] = []
            for ci in range(c):
                h = job.h[g * c + ci] / max(job.rows, 1)
                m = mats[g][:, ci * kc:(ci + 1) * kc]
                if grid is not None:
                    codes, deq = self._gptq(m.copy(), h, grid, None, in_c, taps_c, job.rows)
                else:
                    assert job.block is not None
                    codes, deq, sc, zp = self._gptq_blocks(m.copy(), h, spec, job.block, in_c, taps_c, job.rows)
                    scales_c.append(sc)
                    zps_c.append(zp)
                codes_c.append(codes.astype(np.int32))  # small integers: int32 holds them exactly
                rtn = self._rtn(m, spec, per_channel_scale, lay, g, out_g, job.block, in_c, taps_c)
                l_rtn += _proxy(m, rtn, h)
                l_gptq += _proxy(m, deq, h)
            # the chunks side by side: codes in (tap, in) column order, block scales in (tap, block) order
            q_mats.append(_side_by_side(codes_c))
            if grid is None:
                s_mats.append(_side_by_side(scales_c))
                z_mats.append(_side_by_side(zps_c))
        qt = self._assemble(lay, spec, job, q_mats, s_mats, z_mats, per_channel_scale, in_g, taps)
        return qt, l_rtn, l_gptq

    def _gptq_one_row_groups(self, m: np.ndarray, job: _Job, per_channel: tuple[np.ndarray, np.ndarray] | None,
                             lay: Layer, g_n: int, in_g: int, taps: int
                             ) -> tuple[np.ndarray, float, float, _BlockGrid | None]:
        """:meth:`_gptq` (per-channel grid, or block grids: ``per_channel`` None; one lazy block) for ``g_n``
        groups of one row each, ``m`` [g_n, K], all at once: element for element the arithmetic of the per-group
        sweep (the same damping, inverse Cholesky factor, rounding, block scales and updates), so the codes are
        the same. Returns (codes [g_n, K], proxy loss of round-to-nearest, of GPTQ, the block grids or None)."""
        opts: Options = self.options
        k = m.shape[1]
        h0 = job.h / max(job.rows, 1)  # [g, K, K]
        bg = None
        if per_channel is None:  # block grids, one row per group: each block's scales chosen at its first column
            assert job.block is not None
            bg = _BlockGrid(job.spec, job.block, in_g, taps, g_n)
            grid = _Grid(job.spec, np.ones(g_n), np.zeros(g_n))
        else:
            scale, zp = (np.concatenate(v) for v in zip(*(_rows_of_scale(per_channel, lay, g, 1)
                                                          for g in range(g_n))))
            grid = _Grid(job.spec, scale, zp)  # one row per group: a column of all groups rounds as one

        w = m.copy()
        h = h0
        perm = None
        if opts.act_order and bg is None:
            perm = np.argsort(-np.diagonal(h0, axis1=1, axis2=2), axis=1, kind="stable")
            w = np.take_along_axis(w, perm, axis=1)
            h = np.take_along_axis(np.take_along_axis(h0, perm[:, :, None], axis=1), perm[:, None, :], axis=2)
        h = h.copy()
        eye = np.eye(k)
        diag = np.diagonal(h, axis1=1, axis2=2).copy()
        dead = diag == 0
        h[:, np.arange(k), np.arange(k)] = np.where(dead, 1.0, diag)
        w[dead] = 0.0
        mean = np.array([float(np.mean(np.diag(h[g]))) for g in range(g_n)])
        h = h + ((opts.damp + min(k / max(job.rows, 1), 1.0)) * mean)[:, None, None] * eye
        u = inverse_cholesky_upper_stack(h)
        codes = np.zeros(w.shape, dtype=np.int64)
        deq = np.zeros_like(w)
        for i in range(k):
            if bg is not None:
                bg.start(i, w, w, 0, i)
            q, d = (grid if bg is None else bg.grid(i)).round(w[:, i])
            codes[:, i] = q
            deq[:, i] = d
            e = (w[:, i] - d) / u[:, i, i]
            w[:, i:] -= e[:, None] * u[:, i, i:]
        if perm is not None:
            inv = np.argsort(perm, axis=1)
            codes = np.take_along_axis(codes, inv, axis=1)
            deq = np.take_along_axis(deq, inv, axis=1)
        if bg is None:
            rtn = grid.round_matrix(m)
        else:  # round-to-nearest on block grids of the weights as they are (as _rtn, all groups at once)
            rg = _BlockGrid(job.spec, job.block or 1, in_g, taps, g_n)
            rtn = np.zeros_like(m)
            for col in range(k):
                rg.start(col, m, m, 0, col)
                rtn[:, col] = rg.grid(col).round(m[:, col])[1]
        l_rtn = float(np.sum(np.matmul((rtn - m)[:, None, :], h0)[:, 0, :] * (rtn - m)))
        l_gptq = float(np.sum(np.matmul((deq - m)[:, None, :], h0)[:, 0, :] * (deq - m)))
        return codes, l_rtn, l_gptq, bg

    def _gptq(self, w: np.ndarray, h: np.ndarray, grid: _Grid, blocks: _BlockGrid | None,
              in_g: int, taps: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """The GPTQ sweep over the columns of ``w`` [rows, K]; returns (codes, dequantized) [rows, K]."""
        opts: Options = self.options
        if opts.act_order and blocks is None:
            # the columns with the largest input energy first, while the most columns are left to absorb their
            # rounding error; the fixed per-row grid makes the order free to choose
            perm = np.argsort(-np.diag(h), kind="stable")
            c, d = self._gptq_ordered(w[:, perm], h[np.ix_(perm, perm)], grid, n_rows)
            inv = np.argsort(perm)
            return c[:, inv], d[:, inv]
        return self._gptq_ordered(w, h, grid, n_rows, blocks)

    def _gptq_ordered(self, w: np.ndarray, h: np.ndarray, grid: _Grid, n_rows: int,
                      blocks: _BlockGrid | None = None) -> tuple[np.ndarray, np.ndarray]:
        opts: Options = self.options
        k = w.shape[1]
        h = h.copy()
        dead = np.diag(h) == 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        # damping, plus shrinkage towards the diagonal when few calibration rows estimate a K x K matrix
        # (on the diagonal only: h + c·I, value for value, without a K x K identity)
        h[np.diag_indices(k)] += (opts.damp + min(k / max(n_rows, 1), 1.0)) * float(np.mean(np.diag(h)))
        u = inverse_cholesky_upper(h)
        codes = np.zeros(w.shape, dtype=np.int64)
        deq = np.zeros_like(w)
        bs = opts.block_size
        tmp = np.empty((min(bs, k), w.shape[0]))
        for i1 in range(0, k, bs):
            i2 = min(i1 + bs, k)
            # the block's columns as contiguous rows ([cols, rows]): each column's read and each rank-1 update
            # of the rest run over contiguous memory, with no temporaries (the same products and differences,
            # in the same order, as w1[:, i:] -= outer(e, u1[i, i:]))
            w1t = np.ascontiguousarray(w[:, i1:i2].T)
            err1 = np.empty((w.shape[0], i2 - i1))
            u1 = u[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if blocks is not None:
                    blocks.start(col, w1t.T, w, i1, i)
                cur = blocks.grid(col) if blocks is not None else grid
                wi = w1t[i]
                q, d = cur.round(wi)
                codes[:, col] = q
                deq[:, col] = d
                e = (wi - d) / u1[i, i]
                rest = w1t[i + 1:]  # column i itself is not read again
                if len(rest):
                    t = np.multiply(u1[i, i + 1:, None], e[None, :], out=tmp[:len(rest)])
                    np.subtract(rest, t, out=rest)
                err1[:, i] = e
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
        return codes, deq

    def _gptq_blocks(self, w: np.ndarray, h: np.ndarray, spec: QuantSpec, block: int, in_g: int,
                     taps: int, n_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        bg = _BlockGrid(spec, block, in_g, taps, w.shape[0])
        codes, deq = self._gptq(w, h, _Grid(spec, np.ones(w.shape[0]), np.zeros(w.shape[0])), bg, in_g, taps,
                                n_rows)
        return codes, deq, bg.scales, bg.zps

    def _rtn(self, m: np.ndarray, spec: QuantSpec, per_channel: tuple[np.ndarray, np.ndarray] | None,
             lay: Layer, g: int, out_g: int, block: int | None, in_g: int, taps: int) -> np.ndarray:
        """Round-to-nearest with the same kind of grid (for the proxy-loss report)."""
        if per_channel is not None:
            s, z = _rows_of_scale(per_channel, lay, g, out_g)
            return _Grid(spec, s, z).round_matrix(m)
        assert block is not None
        bg = _BlockGrid(spec, block, in_g, taps, m.shape[0])
        out = np.zeros_like(m)
        for col in range(m.shape[1]):
            bg.start(col, m, m, 0, col)
            out[:, col] = bg.grid(col).round(m[:, col])[1]
        return out

    # ---------------------------------------------------------------------------------------- assembling
    def _assemble(self, lay: Layer, spec: QuantSpec, job: _Job, q_mats: list[np.ndarray], s_mats: list[np.ndarray],
                  z_mats: list[np.ndarray], per_channel: tuple[np.ndarray, np.ndarray] | None, in_g: int,
                  taps: int) -> quant.QuantizedTensor:
        dt = quant.qdtype(spec.dtype)
        w = lay.w
        # codes back to the grouped layout [g, out_g, in_g, taps], then to the weight's layout; clipped to the
        # dtype's range first and held as int32 (the same values; a wide layer's int64 copies ran to GBs)
        g_n = len(q_mats)
        out_g = q_mats[0].shape[0]
        lo, hi = int(dt.qmin), int(dt.qmax)  # an integer dtype (gptq's weights): integral bounds, no float copy
        grouped = np.stack([np.clip(q, lo, hi).astype(np.int32, copy=False).reshape(out_g, taps, in_g)
                            .transpose(0, 2, 1) for q in q_mats])
        codes = lay.ungrouped(grouped.reshape(g_n, out_g, in_g, taps), w)
        q = codes.astype(dt.np_dtype)
        if per_channel is not None:
            scale, zp = per_channel
            return quant.QuantizedTensor(q, scale, zp, job.axis, None, spec.dtype)
        assert job.block is not None and job.axis is not None
        # block scales: per group [out_g, n_blocks_per_tap * taps] -> the weight's scale layout
        nb = -(-in_g // job.block)
        sc = np.stack([s.reshape(out_g, taps, nb).transpose(0, 2, 1) for s in s_mats])  # [g, out_g, nb, taps]
        zp = np.stack([z.reshape(out_g, taps, nb).transpose(0, 2, 1) for z in z_mats])
        if lay.op == "Conv":
            shape = (w.shape[0], nb, *w.shape[2:])
            scale = sc.reshape(shape)
            zpa = zp.reshape(shape)
        else:  # 2-D: [out, nb] when out_axis == 0 else [nb, out]
            scale = sc.reshape(out_g, nb)
            zpa = zp.reshape(out_g, nb)
            if lay.out_axis == 1:
                scale, zpa = scale.T, zpa.T
        return quant.QuantizedTensor(q, np.ascontiguousarray(scale, dtype=np.float32),
                                     np.ascontiguousarray(zpa).astype(np.int64).astype(dt.np_dtype),
                                     job.axis, job.block, spec.dtype)


def _side_by_side(parts: list[np.ndarray]) -> np.ndarray:
    """Column chunks joined along axis 1 (one chunk: itself, no copy)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def _waves(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of the layers ``0 .. len(sizes) - 1`` whose Hessian bytes (``sizes``: 0 for a layer whose
    sweep is cached) add up to at most ``budget`` (a larger layer alone); one run when all fit."""
    waves: list[list[int]] = [[]]
    total = 0
    for j, size in enumerate(sizes):
        if waves[-1] and total + size > budget:
            waves.append([])
            total = 0
        waves[-1].append(j)
        total += size
    return waves


def _sweep_cost(job: _Job) -> float:
    """A layer's sweep cost, for ordering only: per group the inverse Cholesky factor (K³) and the updates of the
    group's rows (rows · K²)."""
    g, k = job.h.shape[0], job.h.shape[-1]
    rows = job.layer.grouped(job.layer.w).shape[1]
    return float(g) * k * k * (k + rows)


def _product_cost(job: _Job, x: np.ndarray) -> float:
    """One sample's Hessian product for a layer, for ordering only: groups · K² · positions (the input's elements
    over its channels: NCHW for a Conv, the last axis for MatMul / Gemm)."""
    channels = int(x.shape[1]) if job.layer.op == "Conv" and x.ndim > 1 else int(x.shape[-1]) if x.ndim else 1
    return float(job.h.size) * (x.size / max(channels, 1))

