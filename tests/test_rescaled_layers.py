"""Tensors a pass rescales on purpose are not compared per layer (``qcompiler.rescaled`` marks).

``fold-batchnorm`` folding a BN through a bias Add scales the Conv's own output by the BN's factors; ``equalize``
scales the tensors between its two layers; ``smooth`` divides a LayerNorm's output by the smoothing factors. Those
tensors keep their names, so a per-layer comparison by name measured a different quantity (PP-OCR det: its
ConvTranspose output came out as the "worst layer" at -18 dB under an output of 22 dB, and the suggested rule
asked to keep it float). The oracle here is onnxruntime run on both models with the tensors exposed: a marked
tensor really differs from its float namesake far beyond quantization error, and every tensor still compared is
not marked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompiler import ir
from qcompiler.api import CompileOptions, compile_model
from qcompiler.core.tags import RESCALED_KEY, TAG_KEY
from qcompiler.plan import Plan
from qcompiler.report import validate as qv

try:
    from tests import _graphs as G
    from tests.test_equalize import badly_scaled_depthwise
    from tests.test_smooth import W8A8, ln_model, tokens
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import _graphs as G  # type: ignore[no-redef]
    from test_equalize import badly_scaled_depthwise  # type: ignore[no-redef]
    from test_smooth import W8A8, ln_model, tokens  # type: ignore[no-redef]

NO_FOLD_BIAS = {**W8A8, "algorithms": {"fold_bias": False}}


def conv_add_bn(*, with_add: bool = True) -> onnx.ModelProto:
    """x -> Conv -> [Add(per-channel b) ->] BN (gains 3-6: the fold scales the Conv's output by them) -> Relu
    -> Conv -> y (the Paddle export pattern of PP-OCR det's ConvTranspose)."""
    b = G.Builder(3)
    h = b.node("Conv", ["x", b.init("c1.w", b.randn(8, 4, 3, 3))], ["h"], name="c1", pads=[1, 1, 1, 1])
    if with_add:
        h = b.node("Add", [h, b.init("c1.b", b.randn(1, 8, 1, 1))], ["h2"], name="c1.add")
    params = [b.init("bn.g", b.rng.uniform(3.0, 6.0, 8).astype(np.float32)),
              b.init("bn.beta", b.randn(8, scale=0.2)), b.init("bn.m", b.randn(8, scale=0.2)),
              b.init("bn.v", b.rng.uniform(0.5, 1.0, 8).astype(np.float32))]
    b.node("BatchNormalization", [h, *params], ["bn_out"], name="bn")
    b.node("Relu", ["bn_out"], ["r"], name="relu")
    b.node("Conv", ["r", b.init("c2.w", b.randn(4, 8, 1, 1))], ["y"], name="c2")
    return b.model([G.vi("x", ["N", 4, 8, 8])], [G.vi("y", ["N", 4, 8, 8])])


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref64, err = ref.astype(np.float64), ref.astype(np.float64) - got.astype(np.float64)
    return float(10.0 * np.log10(np.sum(ref64 ** 2) / max(float(np.sum(err ** 2)), 1e-30)))


def _exposed(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The named tensors of ``model`` on ``feed`` (onnxruntime, no graph optimization: nothing fused away)."""
    return G.ort_run(ir.with_outputs(model, names), feed)


def _exposed_pair(float_model: onnx.ModelProto, q: onnx.ModelProto, name: str,
                  feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return _exposed(float_model, [name], feed)[name], _exposed(q, [name], feed)[name]


def _compile(tmp_path: Path, model: onnx.ModelProto, plan: Plan, calib: dict[str, np.ndarray],
             feeds: list[dict[str, np.ndarray]]) -> tuple[onnx.ModelProto, qv.ValidationReport]:
    src, out = tmp_path / "float.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "calib.npz", **calib)
    compile_model(src, out, CompileOptions(plan=plan, calib=str(tmp_path / "calib.npz"), validate=False))
    return onnx.load(out), qv.validate(src, out, feeds)


def _fitted_sqnr(ref: np.ndarray, got: np.ndarray, axis: int) -> float:
    """SQNR of ``got`` against ``ref`` once each channel (along ``axis``) of ``ref`` is mapped onto ``got`` by its
    own least-squares line a·ref + b: what is left is quantization error, not a rescaling."""
    r = np.moveaxis(ref.astype(np.float64), axis, 0).reshape(ref.shape[axis], -1)
    g = np.moveaxis(got.astype(np.float64), axis, 0).reshape(got.shape[axis], -1)
    fit = np.empty_like(r)
    for c in range(r.shape[0]):
        a, b = np.polyfit(r[c], g[c], 1) if np.ptp(r[c]) > 0 else (0.0, float(g[c].mean()))
        fit[c] = a * r[c] + b
    return _sqnr(g, fit)


def _check_marked_are_other_quantities(float_model: onnx.ModelProto, q: onnx.ModelProto,
                                       rep: qv.ValidationReport, feed: dict[str, np.ndarray], axis: int) -> None:
    """No marked tensor is among the compared layers, and each is a per-channel rescaling of its float namesake:
    mapped channel by channel onto it, its SQNR rises by 6 dB or more (a quantized copy of the same quantity gains
    nothing from that)."""
    marked = ir.rescaled_tensors(q)
    assert marked and rep.rescaled_layers == marked
    assert not set(marked) & {m.name for m in rep.layers}
    f = _exposed(float_model, sorted(marked), feed)
    qt = _exposed(q, sorted(marked), feed)
    for n in marked:
        raw, fitted = _sqnr(f[n], qt[n]), _fitted_sqnr(f[n], qt[n], axis)
        assert fitted >= raw + 6.0, (n, raw, fitted)


def test_fold_through_bias_add_marks_the_conv_output(tmp_path):
    model = conv_add_bn()
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((32, 1, 4, 8, 8)).astype(np.float32)
    feeds = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    q, rep = _compile(tmp_path, model, Plan.from_dict(NO_FOLD_BIAS), {"x": calib}, feeds)
    marks = {n.name: [(p.key, p.value) for p in n.metadata_props] for n in q.graph.node}
    assert (RESCALED_KEY, "fold-batchnorm") in marks["c1"]
    assert TAG_KEY not in dict(marks["c1"])  # an input-model node: rescaled, not created
    assert ir.rescaled_tensors(q) == {"h": "fold-batchnorm"}
    # "h" is the BN's gain (3-6) times the float Conv output: far below any quantization error
    _check_marked_are_other_quantities(model, q, rep, feeds[0], axis=1)
    assert _sqnr(*_exposed_pair(model, q, "h", feeds[0])) < 0.0 < min(o.sqnr_db for o in rep.outputs) - 20.0
    assert {"bn_out", "r"} <= {m.name for m in rep.layers}  # the BN's output is the float BN's: still compared
    assert "not compared per layer: 1 tensor(s) rescaled on purpose (fold-batchnorm: 1)" in rep.table()
    assert rep.to_json()["rescaled_layers"] == {"h": "fold-batchnorm"}


def test_plain_fold_and_fold_bias_mark_nothing(tmp_path):
    """Conv -> BN (the Conv takes the BN's output), and Conv -> Add -> BN with fold-bias (the Add folded into the
    Conv, which then produces the BN's output): no tensor keeps a name with other values."""
    rng = np.random.default_rng(1)
    calib = {"x": rng.standard_normal((16, 1, 4, 8, 8)).astype(np.float32)}
    feeds = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(2)]
    for i, (model, plan) in enumerate(((conv_add_bn(with_add=False), Plan.from_dict(NO_FOLD_BIAS)),
                                       (conv_add_bn(), Plan.default()))):
        sub = tmp_path / str(i)
        sub.mkdir()
        q, rep = _compile(sub, model, plan, calib, feeds)
        assert ir.rescaled_tensors(q) == {}
        assert rep.rescaled_layers == {}
        assert "rescaled_layers" not in rep.to_json() and "rescaled on purpose" not in rep.table()
        assert "r" in {m.name for m in rep.layers}


def test_equalize_marks_the_joining_tensors(tmp_path):
    rng = np.random.default_rng(1)
    calib = rng.standard_normal((32, 1, 8, 16, 16)).astype(np.float32)
    feeds = [{"x": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(4)]
    model = badly_scaled_depthwise()
    q, rep = _compile(tmp_path, model, Plan.from_dict({"algorithms": {"equalize": True}}), {"x": calib}, feeds)
    marked = ir.rescaled_tensors(q)
    assert set(marked.values()) == {"equalize"}
    # the fixture's two pairs: expand -> depthwise -> project; the tensors between them (each layer's output and
    # its ReLU's) are equalized; the graph output is not
    assert 2 <= len(marked) <= 4 and not set(marked) & {o.name for o in model.graph.output}
    _check_marked_are_other_quantities(model, q, rep, feeds[0], axis=1)


def test_smooth_marks_the_layernorm_output(tmp_path):
    feeds = [{"x": f} for f in tokens(4, 2)]
    model = ln_model()
    q, rep = _compile(tmp_path, model, Plan.from_dict({**W8A8, "algorithms": {"smooth": {"alpha": 0.5}}}),
                      {"x": tokens(32, 1)}, feeds)
    assert ir.rescaled_tensors(q) == {"h": "smooth"}
    _check_marked_are_other_quantities(model, q, rep, feeds[0], axis=-1)


def test_marks_survive_compact_names(tmp_path):
    """With ``--compact-names`` the validation maps names back; the marked tensor is still left out."""
    model = conv_add_bn()
    rng = np.random.default_rng(2)
    src, out = tmp_path / "float.onnx", tmp_path / "q.onnx"
    onnx.save(model, src)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((16, 1, 4, 8, 8)).astype(np.float32))
    res = compile_model(src, out, CompileOptions(plan=Plan.from_dict(NO_FOLD_BIAS), calib=str(tmp_path / "calib.npz"),
                                                 compact_names=True))
    assert res.validation is not None
    assert res.validation.rescaled_layers == {"h": "fold-batchnorm"}
    assert "h" not in {m.name for m in res.validation.layers} and "r" in {m.name for m in res.validation.layers}


@pytest.mark.parametrize("requested", [["h", "r"], ["r"]])
def test_requested_rescaled_layer_is_not_compared(tmp_path, requested):
    model = conv_add_bn()
    rng = np.random.default_rng(3)
    calib = {"x": rng.standard_normal((16, 1, 4, 8, 8)).astype(np.float32)}
    feeds = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}]
    _compile(tmp_path, model, Plan.from_dict(NO_FOLD_BIAS), calib, feeds)
    rep = qv.validate(tmp_path / "float.onnx", tmp_path / "q.onnx", feeds, layer_names=requested)
    assert [m.name for m in rep.layers] == ["r"]
