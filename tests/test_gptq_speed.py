"""GPTQ's faster arithmetic (session 9) computes what it replaced: the transposed unfolding gives the very
Hessians (bit for bit) of the row unfolding, layers reading one input share one Hessian, the reversed-Cholesky
inverse factor equals the direct one, the contiguous-column sweep gives the codes of the reference loop, and sweeps
started longest first (session 19) are taken in layer order."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from _graphs import Builder, vi
from threadpoolctl import threadpool_limits

from qcompiler.api import CompileOptions, compile_model
from qcompiler.plan import Plan, QuantSpec

RNG = np.random.default_rng(29)


@pytest.fixture(autouse=True)
def no_gptq_caches():
    """Every compile does its GPTQ work (no Hessian / sweep of an earlier test's compile)."""
    from qcompiler.passes import _gptq_cache

    _gptq_cache.reset_caches(0, 0)
    yield
    _gptq_cache.reset_caches()


def _conv_layer(c: int, groups: int, kshape: tuple[int, ...], attrs: dict) -> SimpleNamespace:
    w = np.zeros((c, c // groups, *kshape), np.float32)
    node = SimpleNamespace(name="conv", inputs=[SimpleNamespace(name="x"), SimpleNamespace(values=w)], attrs=attrs)
    return SimpleNamespace(op="Conv", node=node, groups=groups, w=w, in_axis=1)


@pytest.mark.parametrize("n,c,spatial,kshape,groups,attrs", [
    (1, 24, (12, 20), (5, 5), 24, {"pads": [2, 2, 2, 2]}),  # depthwise (PP-OCR)
    (2, 8, (11, 9), (3, 2), 2, {"pads": [2, 0, 1, 3], "strides": [2, 1], "dilations": [1, 3]}),
    (1, 16, (10, 10), (1, 1), 1, {}),  # 1x1 on one image: the input itself, no copy
    (3, 16, (10, 10), (1, 1), 2, {"strides": [2, 2]}),
    (2, 6, (7, 7), (3, 3), 3, {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    (1, 4, (9, 8), (3, 3), 1, {"auto_pad": b"SAME_LOWER", "dilations": [2, 2]}),
    (1, 8, (9, 9), (3, 3), 4, {"auto_pad": "VALID", "strides": [3, 1]}),
    (2, 12, (31,), (3,), 1, {"pads": [1, 1]}),  # 1-D
    (1, 96, (40, 40), (3, 3), 1, {"pads": [1, 1, 1, 1]}),  # a dense 3x3 Conv (PP-OCR det)
])
def test_transposed_unfolding_gives_the_row_unfoldings_hessian_bit_for_bit(n, c, spatial, kshape, groups, attrs):
    from qcompiler.passes._gptq_rows import _cols, _im2col

    lay = _conv_layer(c, groups, kshape, attrs)
    x = RNG.standard_normal((n, c, *spatial)).astype(np.float32)
    rows = _im2col(lay.node, x, groups)  # [groups, P, K]
    cols = _cols(lay, x)  # [groups, K, P]
    assert cols.shape == (rows.shape[0], rows.shape[2], rows.shape[1]) and cols.dtype == np.float32
    assert np.array_equal(cols, rows.transpose(0, 2, 1))
    with threadpool_limits(limits=1, user_api="blas"):
        ref = np.matmul(rows.transpose(0, 2, 1), rows)
        got = np.empty_like(ref)
        np.matmul(cols, cols.transpose(0, 2, 1), out=got)
    assert np.array_equal(got, ref)  # numpy's syrk either way: the same float32 sums


def test_matmul_unfolding_is_a_view_of_the_tokens():
    from qcompiler.passes._gptq_rows import _cols, _rows

    w = np.zeros((64, 48), np.float32)
    lay = SimpleNamespace(op="MatMul", node=SimpleNamespace(inputs=[SimpleNamespace(name="x")]), groups=1, w=w,
                          in_axis=0)
    x = RNG.standard_normal((2, 5, 64)).astype(np.float32)
    cols = _cols(lay, x)
    assert np.shares_memory(cols, x) and np.array_equal(cols, _rows(lay, x).transpose(0, 2, 1))


def _shared_input_model() -> onnx.ModelProto:
    """Three MatMuls (a Q / K / V triple) and two Convs of one geometry on one tensor, a third Conv on it with
    another stride: five Hessians to build, three distinct."""
    b = Builder(31)
    b.node("Conv", ["x", b.init("wa", b.randn(8, 8, 3, 3, scale=0.2))], ["ya"], name="ca", pads=[1, 1, 1, 1])
    b.node("Conv", ["x", b.init("wb", b.randn(8, 8, 3, 3, scale=0.2))], ["yb"], name="cb", pads=[1, 1, 1, 1])
    b.node("Conv", ["x", b.init("wc", b.randn(8, 8, 3, 3, scale=0.2))], ["yc"], name="cc", pads=[1, 1, 1, 1],
           strides=[2, 2])
    b.node("Add", ["ya", "yb"], ["s"], name="add")
    b.node("Transpose", ["s"], ["t"], name="tr", perm=[0, 2, 3, 1])
    for q in ("q", "k", "v"):
        b.node("MatMul", ["t", b.init(f"w{q}", b.randn(8, 16, scale=0.3))], [q], name=f"mm_{q}")
    return b.model([vi("x", ["N", 8, 6, 6])],
                   [vi("yc", ["N", 8, 3, 3]), vi("q", ["N", 6, 6, 16]), vi("k", ["N", 6, 6, 16]),
                    vi("v", ["N", 6, 6, 16])])


def _compile(tmp_path, model: onnx.ModelProto, tag: str, gptq: dict | None = None):
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    calib = tmp_path / "calib.npz"
    if not calib.exists():
        z = np.random.default_rng(3).standard_normal((12, 1, 8, 6, 6)).astype(np.float32)
        np.savez(calib, x=z.cumsum(axis=2))  # correlated channels
    plan = Plan.from_dict({"defaults": {"weight": {"dtype": "int4", "granularity": "per_channel", "symmetric": True},
                                        "activation": {"dtype": "float"}},
                           "algorithms": {"gptq": gptq or True}}, source="test-plan")
    out = tmp_path / f"{tag}.onnx"
    res = compile_model(src, out, CompileOptions(plan=plan, calib=str(calib), validate=False))
    return out, res


def test_layers_reading_one_input_share_one_hessian_and_write_the_same_bytes(tmp_path, monkeypatch):
    from qcompiler.passes import gptq as gptq_mod

    calls: list[str] = []
    real_cols = gptq_mod._cols

    def counting(lay, x):  # type: ignore[no-untyped-def]
        calls.append(lay.node.name)
        return real_cols(lay, x)

    monkeypatch.setattr(gptq_mod, "_cols", counting)
    shared, res = _compile(tmp_path, _shared_input_model(), "shared")
    assert res.report["gptq"]["layers"] == 6 and res.report["gptq"]["samples"] == 12
    assert sorted(set(calls)) == ["ca", "cc", "mm_q"] and len(calls) == 3 * 12  # one of each geometry, per sample
    calls.clear()
    monkeypatch.setattr(gptq_mod, "_rows_key", lambda lay: lay.node.name)  # every layer its own Hessian
    alone, res_alone = _compile(tmp_path, _shared_input_model(), "alone")
    assert len(calls) == 6 * 12
    assert shared.read_bytes() == alone.read_bytes()
    assert res.report["gptq"] == res_alone.report["gptq"]


def test_a_row_quota_shares_no_hessian(tmp_path, monkeypatch):
    """With ``max_rows`` each layer draws its own rows (seeded by its place): nothing is shared."""
    from qcompiler.passes import gptq as gptq_mod

    calls: list[str] = []
    real_rows = gptq_mod._rows

    def counting(lay, x, pick=None):  # type: ignore[no-untyped-def]
        calls.append(lay.node.name)
        return real_rows(lay, x, pick)

    monkeypatch.setattr(gptq_mod, "_rows", counting)
    _compile(tmp_path, _shared_input_model(), "quota", gptq={"max_rows": 60})
    assert len(calls) == 6 * 12


def _spd(k: int, seed: int, rank: int | None = None) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((rank or 3 * k, k))
    x[:, : k // 3] *= 4.0
    h = x.T @ x
    return h + 0.01 * float(np.mean(np.diag(h))) * np.eye(k)


@pytest.mark.parametrize("k", [7, 64, 128, 129, 300, 701])
def test_inverse_cholesky_factor_is_upper_and_inverts_h(k):
    from qcompiler.passes._gptq_linalg import DIRECT_MAX_K, inverse_cholesky_upper

    h = _spd(k, k)
    u = inverse_cholesky_upper(h)
    assert u.shape == (k, k) and np.array_equal(u, np.triu(u)) and np.all(np.diag(u) > 0)
    direct = np.linalg.cholesky(np.linalg.inv(h)).T
    if k <= DIRECT_MAX_K:
        assert np.array_equal(u, direct)  # the arithmetic of before: small layers' codes unchanged
    else:
        assert np.max(np.abs(u - direct)) <= 1e-11 * np.max(np.abs(direct))
    np.testing.assert_allclose(u.T @ u @ h, np.eye(k), atol=1e-8)


def test_inverse_cholesky_damps_a_singular_hessian_and_stacks_equal_single_calls():
    from qcompiler.passes._gptq_linalg import inverse_cholesky_upper, inverse_cholesky_upper_stack

    low = _spd(200, 1, rank=20)  # rank 20 plus the damping: positive definite, badly conditioned
    singular = np.zeros((150, 150))
    singular[:10, :10] = _spd(10, 2)
    u = inverse_cholesky_upper(singular)  # not positive definite: extra damping, no error
    assert np.all(np.isfinite(u)) and np.array_equal(u, np.triu(u))
    assert np.all(np.isfinite(inverse_cholesky_upper(low)))
    for k in (25, 200):
        hs = np.stack([_spd(k, s) for s in range(4)])
        stacked = inverse_cholesky_upper_stack(hs)
        assert all(np.array_equal(stacked[g], inverse_cholesky_upper(hs[g])) for g in range(4))


def _reference_sweep(w: np.ndarray, u: np.ndarray, grid, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """The sweep loop before session 9 (column views, outer-product updates of the whole block rest)."""
    k = w.shape[1]
    codes = np.zeros(w.shape, dtype=np.int64)
    deq = np.zeros_like(w)
    for i1 in range(0, k, bs):
        i2 = min(i1 + bs, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            s32 = grid.scale.astype(np.float32)
            q = np.clip(np.rint(w1[:, i].astype(np.float32) / s32).astype(np.int64) + grid.zp, grid.qmin, grid.qmax)
            d = ((q - grid.zp).astype(np.float32) * s32).astype(np.float64)
            codes[:, i1 + i] = q
            deq[:, i1 + i] = d
            e = (w1[:, i] - d) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return codes, deq


@pytest.mark.parametrize("rows,k,bs,symmetric", [(300, 90, 128, True), (40, 300, 128, False), (7, 64, 16, True)])
def test_contiguous_column_sweep_gives_the_reference_codes(monkeypatch, rows, k, bs, symmetric):
    from qcompiler.passes import gptq as gptq_mod

    dtype = "int4" if symmetric else "uint4"
    spec = QuantSpec(dtype=dtype, granularity="per_channel", symmetric=symmetric)
    w = np.random.default_rng(rows).standard_normal((rows, k)) * 0.1
    h = _spd(k, rows)
    lo, hi = w.min(axis=1), w.max(axis=1)
    if symmetric:
        scale, zp = np.maximum(-lo, hi) / 7.0, np.zeros(rows, np.int64)
    else:
        scale = (hi - lo) / 15.0
        zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.int64)
    grid = gptq_mod._Grid(spec, scale, zp)
    p = gptq_mod.GPTQPass.__new__(gptq_mod.GPTQPass)
    p.options = gptq_mod.Options(block_size=bs)
    seen: list[np.ndarray] = []
    real = gptq_mod.inverse_cholesky_upper
    monkeypatch.setattr(gptq_mod, "inverse_cholesky_upper", lambda hd: seen.append(real(hd)) or seen[-1])
    codes, deq = p._gptq_ordered(w.copy(), h, grid, n_rows=10 * k)
    ref_codes, ref_deq = _reference_sweep(w.copy(), seen[0], grid, bs)
    assert np.array_equal(codes, ref_codes) and np.array_equal(deq, ref_deq)
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax


def _uneven_chain_model() -> onnx.ModelProto:
    """Three MatMuls whose sweeps cost most in the middle, then last, then first (K = 8, 96, 24): the longest-
    first order is not the layer order."""
    b = Builder(37)
    b.node("MatMul", ["x", b.init("w1", b.randn(8, 96, scale=0.3))], ["h1"], name="mm1")
    b.node("Relu", ["h1"], ["r1"], name="relu")
    b.node("MatMul", ["r1", b.init("w2", b.randn(96, 24, scale=0.1))], ["h2"], name="mm2")
    b.node("MatMul", ["h2", b.init("w3", b.randn(24, 16, scale=0.2))], ["y"], name="mm3")
    return b.model([vi("x", ["N", 6, 8])], [vi("y", ["N", 6, 16])])


def test_sweeps_started_longest_first_are_taken_in_layer_order(tmp_path, monkeypatch):
    """The sweeps start in order of decreasing cost, each layer still gets its own codes: the same bytes as
    started in layer order (equal costs: a stable sort keeps it) and in the reverse of the cost order."""
    from qcompiler.passes import gptq as gptq_mod

    model = _uneven_chain_model()
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(5).standard_normal((12, 1, 6, 8)).astype(np.float32))
    plan = Plan.from_dict({"defaults": {"weight": {"dtype": "int4", "granularity": "per_channel", "symmetric": True},
                                        "activation": {"dtype": "float"}},
                           "algorithms": {"gptq": True}}, source="test-plan")
    real_cost = gptq_mod._sweep_cost
    costs: dict[str, float] = {}

    def recording(job):  # type: ignore[no-untyped-def]
        costs[job.layer.node.name] = real_cost(job)
        return costs[job.layer.node.name]

    outs = []
    for tag, cost in (("longest", recording), ("layer", lambda job: 0.0),
                      ("reverse", lambda job: -real_cost(job))):
        monkeypatch.setattr(gptq_mod, "_sweep_cost", cost)
        out = tmp_path / f"{tag}.onnx"
        res = compile_model(src, out, CompileOptions(plan=plan, calib=str(calib), validate=False))
        assert res.report["gptq"]["layers"] == 3
        outs.append(out.read_bytes())
    assert sorted(costs, key=lambda n: -costs[n]) == ["mm2", "mm3", "mm1"]  # not the layer order
    assert outs[0] == outs[1] == outs[2]
