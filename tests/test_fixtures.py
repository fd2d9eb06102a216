"""The committed ONNX fixtures (models/*.onnx + *.npz) and the real-model data helpers (tests/realdata.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
MODELS = REPO / "models"
sys.path.insert(0, str(TESTS))

import realdata  # noqa: E402


def _load_make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", MODELS / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


make_fixtures = _load_make_fixtures()
NAMES = list(make_fixtures.FIXTURES)


def _session(path_or_bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    src = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _samples(name: str) -> dict[str, np.ndarray]:
    with np.load(MODELS / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_fixture_is_valid(name):
    model = onnx.load(MODELS / f"{name}.onnx")
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version in (8, 9)
    opset = {o.domain: o.version for o in model.opset_import}[""]
    assert opset == (11 if name == "opset11_constants" else 17)

    samples = _samples(name)
    assert sorted(samples) == sorted(i.name for i in model.graph.input)
    for inp in model.graph.input:
        dims = inp.type.tensor_type.shape.dim
        arr = samples[inp.name]
        assert arr.shape[0] == 32
        want_dtype = {"fp16_conv": np.float16, "text_encoder": np.int64}.get(name, np.float32)
        assert arr.dtype == want_dtype
        if inp.name in make_fixtures.WEIGHT_INPUTS:
            assert arr.shape[1:] == tuple(d.dim_value for d in dims)
        else:
            assert dims[0].dim_param == "N", "batch dim must be dynamic"
            assert arr.shape[1:] == (1, *(d.dim_value for d in dims[1:]))


@pytest.mark.parametrize("name", NAMES)
def test_fixture_runs_on_its_samples(name):
    sess = _session(MODELS / f"{name}.onnx")
    samples = _samples(name)
    outs = []
    for i in range(32):
        res = sess.run(None, {k: v[i] for k, v in samples.items()})
        assert all(np.isfinite(r.astype(np.float32)).all() for r in res)
        outs.append(res[0].astype(np.float32))
    out = np.stack(outs)
    assert out.std() > 1e-2, "outputs should vary across samples"
    # batched run (dynamic N) agrees with per-sample runs
    batched = {k: (v[0] if k in make_fixtures.WEIGHT_INPUTS else v[:, 0]) for k, v in samples.items()}
    if "dyn_weight" not in samples:
        got = sess.run(None, batched)[0].astype(np.float32)
        tol = 2e-2 if name == "fp16_conv" else 1e-4
        np.testing.assert_allclose(got, out[:, 0], rtol=tol, atol=tol)


def test_fixtures_regenerate_byte_identical(tmp_path):
    written = make_fixtures.write_all(tmp_path)
    assert {p.name for p in written} == {f"{n}.{ext}" for n in NAMES for ext in ("onnx", "npz")}
    for p in written:
        assert p.read_bytes() == (MODELS / p.name).read_bytes(), f"{p.name} differs from the committed file"


def test_fixtures_total_size():
    # text_encoder carries a 4000 x 128 embedding table (2 MB of float32): a realistic table is the point of it
    small = [n for n in NAMES if n != "text_encoder"]
    total = sum((MODELS / f"{n}.{ext}").stat().st_size for n in small for ext in ("onnx", "npz"))
    assert total < 2 * 1024 * 1024
    assert sum((MODELS / f"text_encoder.{ext}").stat().st_size for ext in ("onnx", "npz")) < 3 * 1024 * 1024


def _nodes(name: str, op: str) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(MODELS / f"{name}.onnx").graph.node if n.op_type == op]


def _attr(node: onnx.NodeProto, key: str, default=None):
    for a in node.attribute:
        if a.name == key:
            return onnx.helper.get_attribute_value(a)
    return default


def test_fixture_structures():
    # conv_bn_relu: residual Add, a depthwise conv, Gemm head with transB=1, BN with non-trivial stats
    convs = _nodes("conv_bn_relu", "Conv")
    assert any(_attr(c, "group", 1) > 1 for c in convs)
    assert _nodes("conv_bn_relu", "Add") and _attr(_nodes("conv_bn_relu", "Gemm")[0], "transB") == 1
    m = onnx.load(MODELS / "conv_bn_relu.onnx")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    for bn in _nodes("conv_bn_relu", "BatchNormalization"):
        assert np.abs(inits[bn.input[3]]).max() > 0.05 and np.abs(inits[bn.input[4]] - 1).max() > 0.05
    # convtranspose: stride 2, weight [C_in, C_out/group, kH, kW]
    (ct,) = _nodes("convtranspose_bn", "ConvTranspose")
    assert _attr(ct, "strides") == [2, 2]
    # shared_weight: two Convs share one weight initializer; one Conv takes its weight from a graph input
    m = onnx.load(MODELS / "shared_weight.onnx")
    weights = [n.input[1] for n in m.graph.node if n.op_type == "Conv"]
    inits = {t.name for t in m.graph.initializer}
    assert len([w for w in weights if w in inits]) == 2 and len(set(weights) & inits) == 1
    assert "dyn_weight" in weights and "dyn_weight" in {i.name for i in m.graph.input}
    # fp16
    m = onnx.load(MODELS / "fp16_conv.onnx")
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    # opset11: no initializers, weights in Constant nodes
    m = onnx.load(MODELS / "opset11_constants.onnx")
    assert len(m.graph.initializer) == 0 and len(_nodes("opset11_constants", "Constant")) >= 10
    # transformer: LayerNorm, erf-GELU, activation x activation MatMuls
    assert len(_nodes("transformer_block", "LayerNormalization")) == 2 and _nodes("transformer_block", "Erf")
    assert len(_nodes("transformer_block", "MatMul")) == 8
    # gemm_head: both Gemm layouts and a MatMul+Add, each followed by BN
    gemms = _nodes("gemm_head", "Gemm")
    assert sorted(_attr(g, "transB", 0) for g in gemms) == [0, 1]
    assert len(_nodes("gemm_head", "BatchNormalization")) == 3


# ------------------------------------------------------------------------------------------------
# real models and their inputs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cls_session():
    return _session(realdata.fetch_model("ppocr_cls"))


def test_fetch_model_paths():
    for key in ("ppocr_cls", "ppocr_rec", "silero_vad"):
        p = realdata.fetch_model(key)
        assert p.is_file() and p.suffix == ".onnx" and realdata.CACHE in p.parents
        assert realdata.fetch_model(key) == p  # cached
    with pytest.raises(KeyError):
        realdata.fetch_model("nope")


def test_ppocr_cls_inputs_shapes_and_determinism():
    feeds, labels = realdata.ppocr_cls_inputs(16, "calib")
    assert len(feeds) == 16 and labels.shape == (16,) and labels.sum() == 8
    for f in feeds:
        assert list(f) == ["x"] and f["x"].shape == (1, 3, 48, 192) and f["x"].dtype == np.float32
        assert -1.0 <= f["x"].min() and f["x"].max() <= 1.0
    again, labels2 = realdata.ppocr_cls_inputs(8, "calib")
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(again, feeds[:8]))
    assert np.array_equal(labels2, labels[:8])
    ev, _ = realdata.ppocr_cls_inputs(8, "eval")
    assert not any(np.array_equal(a["x"], b["x"]) for a, b in zip(ev, feeds[:8]))


def test_ppocr_cls_accuracy_on_rendered_lines(cls_session):
    # measured: 1.00 on eval[:64], 0.97 on calib[:64]; 0.99 on 512 lines of either split
    for split in ("calib", "eval"):
        feeds, labels = realdata.ppocr_cls_inputs(64, split)
        preds = np.array([cls_session.run(None, f)[0][0].argmax() for f in feeds])
        acc = float((preds == labels).mean())
        assert acc >= 0.9, f"{split}: angle-classifier accuracy {acc:.3f}"


def test_ppocr_rec_inputs_and_model():
    feeds, texts = realdata.ppocr_rec_inputs(16, "eval", return_text=True)
    widths = {f["x"].shape[3] for f in feeds}
    for f in feeds:
        n, c, h, w = f["x"].shape
        assert (n, c, h) == (1, 3, 48) and w % 8 == 0 and 160 <= w <= 320 and f["x"].dtype == np.float32
    assert len(widths) >= 4, "widths should vary"
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(realdata.ppocr_rec_inputs(4, "eval"), feeds))

    path = realdata.fetch_model("ppocr_rec")
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    chars = ["", *meta["character"].splitlines(), " "]
    sess = _session(path)
    exact = 0
    for f, text in zip(feeds, texts):
        probs = sess.run(None, f)[0][0]
        assert probs.shape[-1] == len(chars) and np.allclose(probs.sum(-1), 1.0, atol=1e-3)
        ids = probs.argmax(-1)
        decoded = "".join(chars[k] for j, k in enumerate(ids) if k and (j == 0 or k != ids[j - 1]))
        exact += decoded.strip() == text
    # measured 14/16 exact
    assert exact >= 10, f"recognizer read only {exact}/16 rendered lines exactly"


def test_silero_vad_inputs_and_separation():
    feeds, masks = realdata.silero_vad_inputs(32, "eval", return_mask=True)
    assert len(feeds) == 32
    for f, mk in zip(feeds, masks):
        assert sorted(f) == ["c", "h", "input"]
        assert f["input"].shape == (64, 576) and f["input"].dtype == np.float32
        assert f["h"].shape == (1, 1, 128) and f["c"].shape == (1, 1, 128)
        assert mk.shape == (64,) and mk.dtype == bool
        # 64-sample context equals the tail of the previous frame
        np.testing.assert_array_equal(f["input"][1:, :64], f["input"][:-1, -64:])
    mk_all = np.concatenate(masks)
    assert 0.2 < mk_all.mean() < 0.8

    sess = _session(realdata.fetch_model("silero_vad"))
    probs = np.concatenate([sess.run(None, f)[0].reshape(-1) for f in feeds])
    speech, silence = probs[mk_all].mean(), probs[~mk_all].mean()
    # measured ~0.93 vs ~0.13
    assert speech > 0.75 and silence < 0.3 and speech - silence > 0.5, (speech, silence)

    calib = realdata.silero_vad_inputs(4, "calib")
    assert not any(np.array_equal(a["input"], b["input"]) for a, b in zip(calib, feeds[:4]))
