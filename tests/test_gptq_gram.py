"""GPTQ's Hessian of a stride-1 Conv from shifted products of its input (passes/_gptq_gram.py): the same ``XᵀX``
as the unfolded rows (held to their float64 product, on paddings, dilations, groups, 1-D kernels, batches, inputs of
changing size), used only where it applies, and a compile through it writes the codes of the unfolding path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from _graphs import Builder, vi

from qcompiler.api import CompileOptions, compile_model
from qcompiler.calib import held_back_indices
from qcompiler.passes import _gptq_cache, _gptq_gram
from qcompiler.passes import gptq as gptq_mod
from qcompiler.passes._gptq_rows import _im2col
from qcompiler.plan import Plan

RNG = np.random.default_rng(41)
#: float32 products summed in another order, borders subtracted: a few float32 ulps of the largest entry
REL_TOL = 2e-6


def _layer(cin: int, cout: int, groups: int, kshape: tuple[int, ...], attrs: dict, op: str = "Conv"):
    w = np.zeros((cout, cin // groups, *kshape), np.float32)
    node = SimpleNamespace(name="conv", inputs=[SimpleNamespace(name="x"), SimpleNamespace(values=w)],
                           attrs={"group": groups, **attrs})
    return SimpleNamespace(op=op, node=node, groups=groups, w=w, in_axis=1)


def _reference(lay, xs: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """float64 Σ rowsᵀ·rows of the unfolded samples (the definition of H) and the row count."""
    h, rows = 0.0, 0
    for x in xs:
        r = _im2col(lay.node, x, lay.groups).astype(np.float64)  # [groups, P, K]
        h = h + r.transpose(0, 2, 1) @ r
        rows += r.shape[1]
    return np.asarray(h), rows


GEOMETRIES = [
    (16, 1, (3, 3), {"pads": [1, 1, 1, 1]}, [(1, 16, 9, 7)]),
    (16, 1, (3, 3), {}, [(2, 16, 6, 5)]),  # no padding, two images per sample
    (32, 2, (3, 3), {"pads": [0, 2, 1, 0]}, [(1, 32, 7, 8)]),  # groups, uneven padding
    (16, 1, (3, 5), {"pads": [1, 2, 1, 2], "dilations": [2, 1]}, [(1, 16, 10, 9)]),
    (16, 1, (5,), {"pads": [2, 2]}, [(3, 16, 20)]),  # 1-D
    (16, 1, (3,), {"auto_pad": "SAME_UPPER"}, [(1, 16, 11)]),
    (16, 1, (2, 2), {"auto_pad": b"SAME_LOWER", "dilations": [2, 3]}, [(1, 16, 6, 9)]),
    (16, 1, (1, 3), {"pads": [0, 1, 0, 1]}, [(1, 16, 5, 6)]),
    (16, 1, (3, 3), {"pads": [3, 0, 0, 3]}, [(2, 16, 4, 5)]),  # a tap that reads only padding on some rows
    (16, 1, (3, 3), {"pads": [1, 1, 1, 1]}, [(1, 16, 9, 7), (1, 16, 5, 12), (2, 16, 3, 3)]),  # sizes change
    (16, 1, (5, 5), {"dilations": [1, 2]}, [(1, 16, 6, 9), (1, 16, 8, 10)]),  # a kernel wider than half the input
    (16, 1, (3, 2, 3), {"pads": [1, 0, 1, 1, 1, 0]}, [(2, 16, 4, 5, 6)]),  # 3-D
]


@pytest.mark.parametrize("cin,groups,kshape,attrs,shapes", GEOMETRIES)
def test_shifted_products_give_the_unfolded_rows_hessian(cin, groups, kshape, attrs, shapes) -> None:
    lay = _layer(cin, 8, groups, kshape, attrs)
    assert _gptq_gram.eligible(lay)
    xs = [RNG.standard_normal(s).astype(np.float32) for s in shapes]
    gram = _gptq_gram.ConvGram(lay)
    for x in xs:
        gram.add(x)
    ref, rows = _reference(lay, xs)
    got = gram.total()
    assert got.dtype == np.float64 and got.shape == ref.shape and gram.rows == rows
    assert np.abs(got - ref).max() <= REL_TOL * np.abs(ref).max()
    assert np.array_equal(got, got.transpose(0, 2, 1))  # exactly symmetric, as H must be for the Cholesky


@pytest.mark.parametrize("kshape,attrs,shape", [
    ((3,), {"pads": [1, 1]}, (64, 16, 1)),  # silero-vad's encoder.3: one position, the outer taps read padding
    ((3,), {"pads": [4, 4]}, (1, 16, 2)),
    ((3, 3), {"pads": [1, 1, 1, 1]}, (1, 16, 1, 6)),
])
def test_an_input_that_a_tap_never_reads_nonzero_is_exactly_zero_in_h(kshape, attrs, shape) -> None:
    """GPTQ takes an exactly-zero ``H_ii`` as a dead input (``H_ii = 1``, the column zeroed): the border
    subtractions must not leave rounding there. Channels 0-3 are zero except on the first and last positions,
    which the outer taps read and the centre tap (on one position) does not."""
    lay = _layer(16, 4, 1, kshape, attrs)
    x = np.maximum(RNG.standard_normal(shape), 0).astype(np.float32)  # ReLU output: zeros too
    x[:, :4] = 0
    x[:, :4, ..., 0] = 1.5
    gram = _gptq_gram.ConvGram(lay)
    gram.add(x)
    ref, _ = _reference(lay, [x])
    got = gram.total()
    assert np.abs(got - ref).max() <= REL_TOL * np.abs(ref).max()
    zero = np.diagonal(ref, axis1=1, axis2=2) == 0
    assert zero.any()
    assert np.array_equal(np.diagonal(got, axis1=1, axis2=2) == 0, zero)
    assert not got[:, zero[0], :].any() and not got[:, :, zero[0]].any()


@pytest.mark.parametrize("cin,groups,kshape,attrs,shapes", GEOMETRIES)
def test_which_inputs_each_tap_reads_nonzero_is_the_unfolded_rows(cin, groups, kshape, attrs, shapes) -> None:
    """``ConvGram.alive`` (a comparison over the taps' common box, exact counts for the channels zero there)
    against the unfolded rows themselves: input (tap, channel) is alive when its column of rows has a nonzero.
    Channels all zero, nonzero on one border or corner only, on one position, NaN, sparse."""
    lay = _layer(cin, 8, groups, kshape, attrs)
    gram = _gptq_gram.ConvGram(lay)
    seen = None
    for s in shapes:
        x = np.where(RNG.random(s) < 0.3, RNG.standard_normal(s), 0.0).astype(np.float32)
        x[:, 0] = 0.0  # dead everywhere
        x[:, 1] = 0.0
        x[:, 1, ..., 0] = 2.0  # the first position of the last axis only
        x[:, 2] = 0.0
        x[(slice(None), 2, *[-1] * (x.ndim - 2))] = -1.0  # the last corner only
        x[:, 3] = 0.0
        x[(slice(None), 3, *[0] * (x.ndim - 2))] = np.nan  # NaN counts as nonzero
        x[:, 4] = np.where(RNG.random(x[:, 4].shape) < 0.02, 1.0, 0.0)  # a few scattered values
        gram.add(x)
        rows = _im2col(lay.node, x, groups)  # [groups, P, (tap, channel)]
        here = np.any(rows != 0, axis=1).reshape(groups, -1, cin // groups)  # [groups, taps, cg]
        seen = here if seen is None else seen | here
    assert gram.alive is not None and seen is not None
    assert gram.alive.shape == seen.shape
    assert np.array_equal(gram.alive, seen)
    assert not seen.all() and seen.any()  # the pattern has dead and live inputs


@pytest.mark.parametrize("cin,groups,kshape,attrs,op", [
    (16, 1, (3, 3), {"strides": [2, 2]}, "Conv"),  # strided: the taps' boxes are not shifts of one another
    (8, 1, (3, 3), {}, "Conv"),  # few channels per group: the unfolding is as fast
    (64, 64, (3, 3), {}, "Conv"),  # depthwise
    (16, 1, (1, 1), {}, "Conv"),  # one tap: the input itself
    (16, 1, (3, 3), {}, "MatMul"),
])
def test_where_the_shifted_products_do_not_apply(cin, groups, kshape, attrs, op) -> None:
    assert not _gptq_gram.eligible(_layer(cin, 8, groups, kshape, attrs, op))


def _conv_model(seed: int = 3) -> onnx.ModelProto:
    """Two stride-1 3x3 Convs of 24 channels (one dilated) around a strided one: two layers on the shifted
    products, one on the unfolding."""
    b = Builder(seed)
    h = b.node("Conv", ["x", b.init("w1", b.randn(24, 24, 3, 3, scale=0.1))], ["c1"], name="c1", pads=[1, 1, 1, 1])
    h = b.node("Relu", [h], ["r1"], name="r1")
    h = b.node("Conv", [h, b.init("w2", b.randn(24, 24, 3, 3, scale=0.1))], ["c2"], name="c2", pads=[2, 2, 2, 2],
               dilations=[2, 2])
    h = b.node("Relu", [h], ["r2"], name="r2")
    b.node("Conv", [h, b.init("w3", b.randn(8, 24, 3, 3, scale=0.1))], ["y"], name="c3", strides=[2, 2])
    return b.model([vi("x", [1, 24, 12, 12])], [vi("y", [1, 8, 5, 5])])


def _folder(tmp, n: int):
    d = tmp / "calib"
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        np.savez(d / f"{i:03d}.npz", x=rng.standard_normal((1, 24, 12, 12)).astype(np.float32))
    return d


def _compile(tmp, calib, tag: str, indices=None) -> tuple[bytes, dict]:
    src = tmp / "m.onnx"
    if not src.exists():
        onnx.save(_conv_model(), src)
    plan = Plan.from_dict({"defaults": {"weight": {"dtype": "int8", "granularity": "per_channel", "symmetric": True},
                                        "activation": {"dtype": "uint8"}},
                           "algorithms": {"gptq": {"max_bits": 8}}}, source="test-plan")
    out = tmp / f"{tag}.onnx"
    res = compile_model(src, out, CompileOptions(plan=plan, calib=str(calib), validate=False, calib_indices=indices))
    assert res.report["gptq"]["layers"] == 3
    return out.read_bytes(), res.report["gptq"]


def test_a_compile_through_the_shifted_products_writes_the_unfolding_paths_codes(tmp_path, monkeypatch) -> None:
    calib = _folder(tmp_path, 6)
    used = []
    real_add = _gptq_gram.ConvGram.add
    monkeypatch.setattr(_gptq_gram.ConvGram, "add", lambda self, x: (used.append(self.lay.node.name),
                                                                     real_add(self, x))[1])
    _gptq_cache.reset_caches(0, 0)
    try:
        shifted, rep_shifted = _compile(tmp_path, calib, "shifted")
        assert sorted(set(used)) == ["c1", "c2"] and len(used) == 12  # the strided c3 unfolded, 6 samples each
        monkeypatch.setattr(gptq_mod, "SHIFTED_GRAM", False)
        unfolded, rep_unfolded = _compile(tmp_path, calib, "unfolded")
        assert len(used) == 12
    finally:
        _gptq_cache.reset_caches()
    assert shifted == unfolded  # the same int8 codes, scales and graph
    assert rep_shifted.keys() == rep_unfolded.keys()


def test_a_prefix_continued_through_the_shifted_products_matches_the_scratch_hessian(tmp_path) -> None:
    """The measured default's candidates on the fit samples, then all of them: the cached Hessian continued
    equals one accumulated from scratch up to float64 rounding (the shifted products' sums are assembled per
    compile), and the compile writes the same bytes."""
    calib = _folder(tmp_path, 8)
    fit = tuple(i for i in range(8) if i not in held_back_indices(8))
    _gptq_cache.reset_caches()
    try:
        _compile(tmp_path, calib, "short", indices=fit)
        merged, _ = _compile(tmp_path, calib, "merged")
        hc = _gptq_cache.hessian_cache()
        assert hc.partial_hits == 3
        h_merged = {(k, len(ids)): v[0][0] for (k, ids), v in hc._data.items()}
        _gptq_cache.reset_caches()
        scratch, _ = _compile(tmp_path, calib, "scratch")
        h_scratch = {(k, len(ids)): v[0][0] for (k, ids), v in _gptq_cache.hessian_cache()._data.items()}
    finally:
        _gptq_cache.reset_caches()
    assert h_merged.keys() == h_scratch.keys() and len(h_merged) == 3
    for k, h in h_merged.items():
        assert np.allclose(h, h_scratch[k], rtol=1e-12, atol=1e-12 * np.abs(h).max())
    assert merged == scratch
