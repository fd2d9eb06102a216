"""``qcompiler data`` (issue 16): calibration / validation feeds from raw images, .wav audio, text lines and .npy
arrays — exact arrays against independent computations (Pillow directly, normalization by hand,
``scipy.signal.resample_poly``, a reference tokenizer on a tiny vocabulary), deterministic disjoint splits,
byte-identical reruns, one-line refusals (exit 2, nothing written, inputs unchanged), and the path
data -> compile --calib -> validation.
"""

from __future__ import annotations

import hashlib
import json
import re
import wave
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper
from PIL import Image

from qcompiler.calib.make import WordPiece, resample, select
from qcompiler.cli import cli

MODELS = Path(__file__).resolve().parent.parent / "models"
CBR = MODELS / "conv_bn_relu.onnx"  # input [N, 3, 32, 32] float32
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def run(*args: object) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def identity_model(path: Path, inputs: list[tuple[str, list, int]]) -> Path:
    """A model whose outputs are its inputs (Identity each): name, dims, ONNX dtype."""
    nodes = [helper.make_node("Identity", [n], [f"{n}_out"], name=f"id_{n}") for n, _, _ in inputs]
    g = helper.make_graph(nodes, "ident", [helper.make_tensor_value_info(n, t, d) for n, d, t in inputs],
                          [helper.make_tensor_value_info(f"{n}_out", t, d) for n, d, t in inputs])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def save_images(folder: Path, sizes: list[tuple[int, int]], fmt: str = "png", seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy) * 127 / (h + w)], -1)
        px = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        p = folder / f"img{i:02d}.{fmt}"
        Image.fromarray(px).save(p)
        out.append(p)
    return out


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------------------------- images
def ref_image(p: Path, h: int, w: int, *, scale: float = 1.0, mean=None, std=None, bgr: bool = False,
              chw: bool = True) -> np.ndarray:
    im = Image.open(p).convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    x = np.asarray(im).astype(np.float32)
    if bgr:
        x = x[:, :, ::-1]
    x = x * np.float32(scale)
    if mean is not None:
        x = (x - np.float32(mean)) / np.float32(std)
    return x.transpose(2, 0, 1) if chw else x


def test_images_nchw_exact_against_pillow_and_hand_normalization(tmp_path: Path) -> None:
    files = save_images(tmp_path / "imgs", [(40, 50), (32, 32), (64, 20), (17, 33)])
    Image.open(files[1]).save(tmp_path / "imgs" / "zz.bmp")
    (tmp_path / "imgs" / "sub").mkdir()
    Image.open(files[2]).save(tmp_path / "imgs" / "sub" / "a.jpg", quality=95)
    out = tmp_path / "out" / "calib.npz"
    res = run("data", CBR, tmp_path / "imgs", "-o", out, "--scale", "1/255", "--mean", ",".join(map(str, MEAN)),
              "--std", ",".join(map(str, STD)))
    assert res.exit_code == 0, res.output
    z = load_npz(out)
    assert list(z) == ["input"]
    x = z["input"]
    assert x.shape == (6, 1, 3, 32, 32) and x.dtype == np.float32
    order = ["img00.png", "img01.png", "img02.png", "img03.png", "sub/a.jpg", "zz.bmp"]
    for i, rel in enumerate(order):
        want = ref_image(tmp_path / "imgs" / rel, 32, 32, scale=1 / 255, mean=MEAN, std=STD)
        np.testing.assert_allclose(x[i, 0], want, rtol=0, atol=1e-6)
    # the preview: shape, dtype, min / mean / max and the first names
    assert "input: [6, 1, 3, 32, 32] float32" in res.output
    m = re.search(r"min (\S+)\s+mean (\S+)\s+max (\S+)", res.output)
    assert m is not None
    assert [float(v) for v in m.groups()] == pytest.approx([x.min(), x.mean(), x.max()], rel=1e-3, abs=1e-4)
    assert "first: img00.png, img01.png, img02.png, ... (+3)" in res.output


def test_images_nhwc_bgr_and_uint8_raw_pixels(tmp_path: Path) -> None:
    files = save_images(tmp_path / "imgs", [(30, 40), (12, 18)])
    nhwc = identity_model(tmp_path / "nhwc.onnx", [("x", ["N", 24, 20, 3], TensorProto.FLOAT)])
    res = run("data", nhwc, tmp_path / "imgs", "-o", tmp_path / "a.npz", "--bgr", "--scale", "0.5",
              "--mean", "10", "--std", "2")
    assert res.exit_code == 0, res.output
    x = load_npz(tmp_path / "a.npz")["x"]
    assert x.shape == (2, 1, 24, 20, 3)
    for i, p in enumerate(files):
        want = ref_image(p, 24, 20, scale=0.5, mean=(10.0,), std=(2.0,), bgr=True, chw=False)
        np.testing.assert_allclose(x[i, 0], want, rtol=0, atol=1e-6)
    u8 = identity_model(tmp_path / "u8.onnx", [("img", [1, 3, 16, 16], TensorProto.UINT8)])
    res = run("data", u8, tmp_path / "imgs", "-o", tmp_path / "b.npz")
    assert res.exit_code == 0, res.output
    y = load_npz(tmp_path / "b.npz")["img"]
    assert y.dtype == np.uint8 and y.shape == (2, 1, 3, 16, 16)
    want = np.asarray(Image.open(files[0]).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(y[0, 0], want.transpose(2, 0, 1))
    res = run("data", u8, tmp_path / "imgs", "-o", tmp_path / "c.npz", "--scale", "1/255")
    assert res.exit_code == 2 and "takes raw pixels" in res.output and not (tmp_path / "c.npz").exists()


def test_images_center_crop_and_letterbox(tmp_path: Path) -> None:
    (p,) = save_images(tmp_path / "imgs", [(30, 60)])  # H 30, W 60
    model = identity_model(tmp_path / "m.onnx", [("x", [1, 3, 16, 16], TensorProto.FLOAT)])
    res = run("data", model, tmp_path / "imgs", "-o", tmp_path / "crop.npz", "--resize", "center-crop",
              "--crop-pct", "0.8")
    assert res.exit_code == 0, res.output
    im = Image.open(p).convert("RGB")
    # cover 20x20 (16 / 0.8): scale 20/30 -> 40x20, then the centered 16x16
    want = np.asarray(im.resize((40, 20), Image.Resampling.BILINEAR).crop((12, 2, 28, 18)), dtype=np.float32)
    np.testing.assert_array_equal(load_npz(tmp_path / "crop.npz")["x"][0, 0], want.transpose(2, 0, 1))
    res = run("data", model, tmp_path / "imgs", "-o", tmp_path / "lb.npz", "--resize", "letterbox",
              "--pad-value", "7")
    assert res.exit_code == 0, res.output
    got = load_npz(tmp_path / "lb.npz")["x"][0, 0].transpose(1, 2, 0)
    inner = np.asarray(im.resize((16, 8), Image.Resampling.BILINEAR), dtype=np.float32)
    np.testing.assert_array_equal(got[4:12], inner)
    assert (got[:4] == 7).all() and (got[12:] == 7).all()


def test_images_dynamic_size_fixed_batch_and_grayscale(tmp_path: Path) -> None:
    save_images(tmp_path / "imgs", [(20, 20)] * 5)
    dyn = identity_model(tmp_path / "dyn.onnx", [("x", ["N", 3, "H", "W"], TensorProto.FLOAT)])
    res = run("data", dyn, tmp_path / "imgs", "-o", tmp_path / "a.npz")
    assert res.exit_code == 2 and "give --size H,W" in res.output
    res = run("data", dyn, tmp_path / "imgs", "-o", tmp_path / "a.npz", "--size", "12,10")
    assert res.exit_code == 0 and load_npz(tmp_path / "a.npz")["x"].shape == (5, 1, 3, 12, 10)
    b2 = identity_model(tmp_path / "b2.onnx", [("x", [2, 1, 8, 8], TensorProto.FLOAT)])
    res = run("data", b2, tmp_path / "imgs", "-o", tmp_path / "b.npz")
    assert res.exit_code == 0, res.output
    x = load_npz(tmp_path / "b.npz")["x"]
    assert x.shape == (2, 2, 1, 8, 8)  # 5 images -> 2 batches of 2 (the fifth left out)
    gray = np.asarray(Image.open(tmp_path / "imgs" / "img03.png").convert("L").resize((8, 8), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(x[1, 1, 0], gray.astype(np.float32))
    amb = identity_model(tmp_path / "amb.onnx", [("x", ["N", "C", "H", "W"], TensorProto.FLOAT)])
    res = run("data", amb, tmp_path / "imgs", "-o", tmp_path / "c.npz", "--size", "8,8")
    assert res.exit_code == 2 and "give --layout" in res.output
    res = run("data", amb, tmp_path / "imgs", "-o", tmp_path / "c.npz", "--size", "8,8", "--layout", "nhwc")
    assert res.exit_code == 0 and load_npz(tmp_path / "c.npz")["x"].shape == (5, 1, 8, 8, 3)


# ---------------------------------------------------------------------------------------------- audio
def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> None:
    """``samples``: [n, channels] integers in the PCM range of ``width`` bytes."""
    s = np.asarray(samples)
    if width == 1:
        raw = (s + 128).astype(np.uint8).tobytes()
    elif width == 3:
        v = s.astype(np.int32).reshape(-1) & 0xFFFFFF
        raw = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], -1).astype(np.uint8).tobytes()
    else:
        raw = s.astype("<i2" if width == 2 else "<i4").tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(s.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def tone(rate: int, seconds: float, hz: float, amp: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    x = np.round(amp * np.sin(2 * np.pi * hz * t)).astype(np.int64)
    return np.stack([x if c == 0 else x // 2 for c in range(channels)], -1)


def test_resample_matches_scipy_resample_poly() -> None:
    signal = pytest.importorskip("scipy.signal")  # scipy comes with scikit-image, a test dependency
    rng = np.random.default_rng(3)
    for src, dst, n in [(44100, 16000, 9000), (8000, 16000, 501), (48000, 16000, 4800), (22050, 16000, 777)]:
        x = rng.standard_normal(n)
        np.testing.assert_allclose(resample(x, src, dst), signal.resample_poly(x, dst, src), rtol=0, atol=1e-12)


def test_audio_stereo_44k_resampled_mono_frames(tmp_path: Path) -> None:
    signal = pytest.importorskip("scipy.signal")
    (tmp_path / "wavs").mkdir()
    st = tone(44100, 0.5, 440.0, 12000, channels=2)
    write_wav(tmp_path / "wavs" / "a.wav", st, 44100)
    write_wav(tmp_path / "wavs" / "b.wav", tone(16000, 0.1, 1000.0, 3000), 16000)  # 1600 samples: one padded frame
    model = identity_model(tmp_path / "w.onnx", [("wave", ["N", 4000], TensorProto.FLOAT)])
    res = run("data", model, tmp_path / "wavs", "-o", tmp_path / "a.npz", "--hop", "2000")
    assert res.exit_code == 0, res.output
    x = load_npz(tmp_path / "a.npz")["wave"]
    mono = (st[:, 0] / 32768 + st[:, 1] / 32768) / 2
    ref = signal.resample_poly(mono, 160, 441)  # 8000 samples -> frames at 0, 2000, 4000
    assert x.shape == (4, 1, 4000) and x.dtype == np.float32
    for i in range(3):
        np.testing.assert_allclose(x[i, 0], ref[i * 2000:i * 2000 + 4000].astype(np.float32), rtol=0, atol=1e-6)
    b = tone(16000, 0.1, 1000.0, 3000)[:, 0] / 32768
    np.testing.assert_allclose(x[3, 0, :1600], b.astype(np.float32), rtol=0, atol=1e-7)
    assert (x[3, 0, 1600:] == 0).all()
    assert "first: a.wav#0, a.wav#1, a.wav#2, ... (+1)" in res.output
    # peak of the 440 Hz tone survives resampling
    spec = np.abs(np.fft.rfft(x[0, 0]))
    assert abs(np.argmax(spec) * 16000 / 4000 - 440) <= 4


def test_audio_8_and_24_bit_and_dynamic_time_axis(tmp_path: Path) -> None:
    (tmp_path / "wavs").mkdir()
    s8 = tone(16000, 0.05, 300.0, 100)
    s24 = tone(16000, 0.05, 300.0, 4_000_000)
    write_wav(tmp_path / "wavs" / "a8.wav", s8, 16000, width=1)
    write_wav(tmp_path / "wavs" / "b24.wav", s24, 16000, width=3)
    model = identity_model(tmp_path / "w.onnx", [("x", ["N", 1, "T"], TensorProto.FLOAT)])
    res = run("data", model, tmp_path / "wavs", "-o", tmp_path / "a.npz")
    assert res.exit_code == 2 and "give --frame N" in res.output
    res = run("data", model, tmp_path / "wavs", "-o", tmp_path / "a.npz", "--frame", "800")
    assert res.exit_code == 0, res.output
    x = load_npz(tmp_path / "a.npz")["x"]
    assert x.shape == (2, 1, 1, 800)
    np.testing.assert_allclose(x[0, 0, 0], (s8[:800, 0] / 128).astype(np.float32), rtol=0, atol=1e-7)
    np.testing.assert_allclose(x[1, 0, 0], (s24[:800, 0] / 2**23).astype(np.float32), rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------------- text
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", ",", "!", "world", "un", "##aff", "##able", "##a", "a",
         "the", "cat", "##s", "sat", "."]


def ref_tokens(text: str, vocab: list[str]) -> list[str]:
    """Reference for ASCII text: words / punctuation by regex, then for each word the longest vocabulary entry
    that prefixes the rest, tried over every possible length."""
    out: list[str] = []
    for word in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()):
        pieces, rest, first = [], word, True
        while rest:
            cands = [rest[:n] for n in range(1, len(rest) + 1)
                     if (rest[:n] if first else "##" + rest[:n]) in vocab]
            if not cands:
                pieces = ["[UNK]"]
                break
            best = max(cands, key=len)
            pieces.append(best if first else "##" + best)
            rest, first = rest[len(best):], False
        out.extend(pieces)
    return out


def text_model(path: Path, seq: int | str = "S") -> Path:
    i64 = TensorProto.INT64
    return identity_model(path, [("input_ids", ["N", seq], i64), ("attention_mask", ["N", seq], i64),
                                 ("token_type_ids", ["N", seq], i64)])


def test_wordpiece_against_reference() -> None:
    tok = WordPiece({t: i for i, t in enumerate(VOCAB)})
    assert tok.tokenize("Hello, unaffable world!") == ["hello", ",", "un", "##aff", "##able", "world", "!"]
    assert tok.tokenize("Héllo\tthe  CATS sat.") == ["hello", "the", "cat", "##s", "sat", "."]
    assert tok.tokenize("dog unaffa") == ["[UNK]", "un", "##aff", "##a"]
    for line in ["the cats sat.", "unaffable, unaff! world", "a aa cat!s", "xyz the", "hello hello,world"]:
        assert tok.tokenize(line) == ref_tokens(line, VOCAB)


def test_text_lines_vocab_txt_and_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tj = {"model": {"type": "WordPiece", "vocab": {t: i for i, t in enumerate(VOCAB)}, "unk_token": "[UNK]",
                    "continuing_subword_prefix": "##", "max_input_chars_per_word": 100},
          "normalizer": {"type": "BertNormalizer", "lowercase": True, "strip_accents": None}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj))
    (tmp_path / "text").mkdir()
    lines = ["Hello, world!", "", "the cats sat.", "unaffable cat hello world the cats sat"]
    (tmp_path / "text" / "a.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "text" / "b.txt").write_text("xyz\n")
    model = text_model(tmp_path / "bert.onnx")
    res = run("data", model, tmp_path / "text", "-o", tmp_path / "t.npz", "--vocab", tmp_path / "vocab.txt")
    assert res.exit_code == 2 and "give --seq-len N" in res.output
    res = run("data", model, tmp_path / "text", "-o", tmp_path / "t.npz", "--vocab", tmp_path / "vocab.txt",
              "--seq-len", "8")
    assert res.exit_code == 0, res.output
    z = load_npz(tmp_path / "t.npz")
    assert sorted(z) == ["attention_mask", "input_ids", "token_type_ids"]
    ids = {t: i for i, t in enumerate(VOCAB)}
    texts = [lines[0], lines[2], lines[3], "xyz"]
    assert z["input_ids"].shape == (4, 1, 8) and z["input_ids"].dtype == np.int64
    for k, text in enumerate(texts):
        toks = ["[CLS]", *ref_tokens(text, VOCAB)[:6], "[SEP]"]
        want = [ids[t] for t in toks] + [0] * (8 - len(toks))
        assert z["input_ids"][k, 0].tolist() == want
        assert z["attention_mask"][k, 0].tolist() == [1] * len(toks) + [0] * (8 - len(toks))
        assert z["token_type_ids"][k, 0].tolist() == [0] * 8
    assert "first: a.txt:1, a.txt:3, a.txt:4, ... (+1)" in res.output
    res = run("data", model, tmp_path / "text", "-o", tmp_path / "j.npz", "--vocab", tmp_path / "tokenizer.json",
              "--seq-len", "8")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "j.npz").read_bytes() == (tmp_path / "t.npz").read_bytes()
    fixed = text_model(tmp_path / "bert16.onnx", 16)
    res = run("data", fixed, tmp_path / "text", "-o", tmp_path / "f.npz", "--vocab", tmp_path / "vocab.txt",
              "--seq-len", "8")
    assert res.exit_code == 2 and "fixed length of 16" in res.output
    tj["model"]["type"] = "BPE"
    (tmp_path / "bpe.json").write_text(json.dumps(tj))
    res = run("data", model, tmp_path / "text", "-o", tmp_path / "f.npz", "--vocab", tmp_path / "bpe.json",
              "--seq-len", "8")
    assert res.exit_code == 2 and "only WordPiece tokenizers are supported (this one is BPE)" in res.output


# --------------------------------------------------------------------------------------------- arrays
def test_npy_folders_single_and_per_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    single = identity_model(tmp_path / "s.onnx", [("x", ["N", 4], TensorProto.FLOAT)])
    (tmp_path / "a").mkdir()
    arrs = [rng.standard_normal(4).astype(np.float32) for _ in range(3)]
    for i, a in enumerate(arrs):
        np.save(tmp_path / "a" / f"{i}.npy", a if i != 1 else a[None])  # with and without the batch axis
    res = run("data", single, tmp_path / "a", "-o", tmp_path / "a.npz")
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(load_npz(tmp_path / "a.npz")["x"], np.stack(arrs)[:, None])
    two = identity_model(tmp_path / "t.onnx", [("x", ["N", 4], TensorProto.FLOAT), ("k", [2], TensorProto.INT64)])
    for name in ("x", "k"):
        (tmp_path / "b" / name).mkdir(parents=True)
    for i in range(2):
        np.save(tmp_path / "b" / "x" / f"s{i}.npy", arrs[i])
        np.save(tmp_path / "b" / "k" / f"s{i}.npy", np.array([i, i + 1]))
    res = run("data", two, tmp_path / "b", "-o", tmp_path / "b.npz")
    assert res.exit_code == 0, res.output
    z = load_npz(tmp_path / "b.npz")
    np.testing.assert_array_equal(z["k"], [[0, 1], [1, 2]])
    np.testing.assert_array_equal(z["x"], np.stack(arrs[:2])[:, None])
    np.save(tmp_path / "b" / "x" / "s2.npy", arrs[2])
    res = run("data", two, tmp_path / "b", "-o", tmp_path / "c.npz")
    assert res.exit_code == 2 and "no 's2.npy'" in res.output and "k" in res.output
    np.save(tmp_path / "a" / "9.npy", np.zeros(5, np.float32))
    res = run("data", single, tmp_path / "a", "-o", tmp_path / "d.npz")
    assert res.exit_code == 2 and "9.npy" in res.output and "needs 4" in res.output
    assert not (tmp_path / "c.npz").exists() and not (tmp_path / "d.npz").exists()


# ------------------------------------------------------------------------------------ limit and split
def test_split_disjoint_deterministic_and_byte_identical(tmp_path: Path) -> None:
    save_images(tmp_path / "imgs", [(10, 10)] * 12)
    args = ["data", CBR, tmp_path / "imgs", "--split", "calib:5,eval:4", "--scale", "1/255"]
    r1 = run(*args, "-o", tmp_path / "r1" / "d.npz")
    r2 = run(*args, "-o", tmp_path / "r2" / "d.npz")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output
    assert sorted(p.name for p in (tmp_path / "r1").iterdir()) == ["d.calib.npz", "d.eval.npz"]
    for n in ("d.calib.npz", "d.eval.npz"):
        assert (tmp_path / "r1" / n).read_bytes() == (tmp_path / "r2" / n).read_bytes()
    all_imgs = np.stack([ref_image(p, 32, 32, scale=1 / 255) for p in sorted((tmp_path / "imgs").iterdir())])
    calib = load_npz(tmp_path / "r1" / "d.calib.npz")["input"][:, 0]
    ev = load_npz(tmp_path / "r1" / "d.eval.npz")["input"][:, 0]

    def which(x: np.ndarray) -> list[int]:
        return [int(np.argmin(np.abs(all_imgs - s).reshape(len(all_imgs), -1).max(1))) for s in x]

    ci, ei = which(calib), which(ev)
    assert len(ci) == 5 and len(ei) == 4 and not set(ci) & set(ei)
    assert ci == sorted(ci) and ei == sorted(ei)
    assert ci + ei != list(range(9))  # shuffled, not the first nine
    expect = select(12, splits=[("calib", 5), ("eval", 4)], seed=0)
    assert ci == expect["calib"] and ei == expect["eval"]
    other = select(12, splits=[("calib", 5), ("eval", 4)], seed=1)
    assert other != expect
    res = run("data", CBR, tmp_path / "imgs", "-o", tmp_path / "lim.npz", "--limit", "3", "--seed", "1",
              "--scale", "1/255")
    assert res.exit_code == 0, res.output
    assert which(load_npz(tmp_path / "lim.npz")["input"][:, 0]) == select(12, limit=3, seed=1)[""]
    res = run(*args[:-2], "-o", tmp_path / "x.npz", "--split", "calib:10,eval:4")
    assert res.exit_code == 2 and "asks for 14 samples" in res.output
    res = run(*args[:-2], "-o", tmp_path / "x.npz", "--split", "calib=10")
    assert res.exit_code == 2 and "NAME:COUNT" in res.output
    assert not list(tmp_path.glob("x*.npz"))


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("case", ["broken-image", "no-files", "mixed", "output-is-input", "missing-model",
                                  "bad-mean"])
def test_bad_input_exit_2_one_line_nothing_written(tmp_path: Path, case: str) -> None:
    src = tmp_path / "src"
    save_images(src, [(12, 12)] * 3)
    model = CBR
    out = tmp_path / "o.npz"
    extra: list[object] = []
    if case == "broken-image":
        (src / "img01.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        key = "img01.png: not a readable image"
    elif case == "no-files":
        src = tmp_path / "empty"
        src.mkdir()
        (src / "notes.md").write_text("x")
        key = "no data files"
    elif case == "mixed":
        write_wav(src / "a.wav", tone(16000, 0.01, 100.0, 10), 16000)
        key = "holds 3 images, 1 .wav files; give --kind"
    elif case == "output-is-input":
        model = tmp_path / "model.npz"  # a model file whose name ends in .npz, given as the output too
        model.write_bytes(CBR.read_bytes())
        out = model
        key = "is one of the inputs"
    elif case == "missing-model":
        model = tmp_path / "nope.onnx"
        key = "nope.onnx"
    else:
        extra = ["--mean", "1,2"]
        key = "--mean: 2 values for an input with 3 channels"
    before = tree_digest(tmp_path)
    res = run("data", model, src, "-o", out, *extra)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1 and key in res.output
    assert "Traceback" not in res.output
    assert tree_digest(tmp_path) == before


# --------------------------------------------------------------------------------------- end to end
def test_end_to_end_data_then_compile_validates(tmp_path: Path) -> None:
    save_images(tmp_path / "imgs", [(48, 64)] * 10 + [(32, 32)] * 6, seed=5)
    res = run("data", CBR, tmp_path / "imgs", "-o", tmp_path / "feeds.npz", "--scale", "1/255",
              "--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD)), "--split", "calib:10,eval:6")
    assert res.exit_code == 0, res.output
    res = run("compile", CBR, "-o", tmp_path / "q.onnx", "--calib", tmp_path / "feeds.calib.npz",
              "--validate-data", tmp_path / "feeds.eval.npz", "--min-sqnr", "15", "-q")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "q.onnx").is_file()
    res = run("validate", CBR, tmp_path / "q.onnx", "--data", tmp_path / "feeds.eval.npz", "--min-sqnr", "15")
    assert res.exit_code == 0, res.output
    assert "6 sample" in res.output


def test_text_vocab_inside_the_folder_is_not_text_and_cased(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (tmp_path / "t" / "lines.txt").write_text("Hello world\n")
    model = text_model(tmp_path / "bert.onnx", 6)
    res = run("data", model, tmp_path / "t", "-o", tmp_path / "a.npz", "--vocab", tmp_path / "t" / "vocab.txt")
    assert res.exit_code == 0, res.output
    assert load_npz(tmp_path / "a.npz")["input_ids"].tolist() == [[[2, 4, 7, 3, 0, 0]]]
    res = run("data", model, tmp_path / "t" / "lines.txt", "-o", tmp_path / "b.npz", "--vocab",
              tmp_path / "t" / "vocab.txt", "--cased")
    assert res.exit_code == 0, res.output
    assert load_npz(tmp_path / "b.npz")["input_ids"].tolist() == [[[2, 1, 7, 3, 0, 0]]]  # "Hello" -> [UNK]
    res = run("data", model, tmp_path / "t", "-o", tmp_path / "c.npz")
    assert res.exit_code == 2 and "give --vocab" in res.output
