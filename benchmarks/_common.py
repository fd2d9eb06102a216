"""Shared pieces of the benchmarks and the real-model tests: tasks, metrics, onnxruntime's quantizer, latency.

* :func:`load_task` -- a real model (``tests/realdata.py``) with its calibration feeds (``calib`` split) and
  held-back evaluation feeds (``eval`` split, disjoint sources), and how to score it.
* :func:`score` -- float vs quantized outputs over the evaluation feeds: per-output SQNR (dB, summed over all
  samples: ``10 log10(sum ref^2 / sum (ref - q)^2)``) and the task agreement (top-1 for the angle classifier,
  per-position argmax and whole-line greedy CTC decode for the recognizer, speech decision ``p > 0.5`` for
  the VAD; held out: top-1 for magika, and for nudenet's YOLOv8n the detections agreement with the SQNR of the
  score rows 4: alone, :func:`nudenet_metrics`).
* :func:`ort_quantize` -- onnxruntime's ``quantize_static`` the way a user runs it on these models: opset
  upgraded to 13 when lower (per-channel needs it: onnxruntime refuses per-channel QDQ models below 13),
  ``quant_pre_process(skip_symbolic_shape=True)`` (symbolic shape inference fails on them), then QDQ with
  int8 per-channel weights and uint8 activations.
* :func:`latency_ms` -- onnxruntime CPU latency, ``threads`` intra-op threads, sequential, after warm-up,
  median over interleaved rounds (so background load hits every model alike).
* :func:`write_feeds` -- a folder of ``.npz`` feeds (what ``qcompiler compile --calib`` reads).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

import realdata  # noqa: E402  (tests/realdata.py: the pinned real models and their realistic inputs)
import realdata_heldout  # noqa: E402  (tests/realdata_heldout.py: the held-out models' inputs)

Feed = dict[str, np.ndarray]
REAL_MODELS = ("ppocr_cls", "ppocr_rec", "silero_vad")
#: the zoo's probability-map models (tests/realdata.py): scored by the IoU of their thresholded maps
MAP_MODELS = ("ppocr_det", "vit_focus")
#: never tuned on (tests/realdata_heldout.py): reported apart from the zoo
HELDOUT_MODELS = ("magika", "nudenet", "espcn", "minilm")
#: the keys :func:`load_task` and :func:`score` know (task metric and all)
SCORED_MODELS = (*REAL_MODELS, *MAP_MODELS, *HELDOUT_MODELS)
#: the probability above which a map pixel counts as "on" (PP-OCR det's DB binarization threshold; the ViT's
#: importance map at even odds)
MAP_THRESHOLDS = {"ppocr_det": 0.3, "vit_focus": 0.5}
ORT_METHODS = ("MinMax", "Entropy", "Percentile")


# ============================================================================================== tasks
@dataclass
class Task:
    """A model, its calibration and evaluation feeds, and the name of its task metric."""

    key: str
    model: Path
    calib: list[Feed]
    eval: list[Feed]
    agreement_name: str
    labels: np.ndarray | None = None  # cls: 1 = rotated 180 degrees
    extra: dict[str, Any] = field(default_factory=dict)


def task_inputs(key: str, n: int, split: str) -> tuple[list[Feed], np.ndarray | None]:
    """``n`` realistic feeds of real model ``key`` from ``split`` (and labels where the task has them)."""
    if key == "ppocr_cls":
        feeds, labels = realdata.ppocr_cls_inputs(n, split)
        return feeds, labels
    if key == "ppocr_rec":
        return realdata.ppocr_rec_inputs(n, split), None
    if key == "silero_vad":
        return realdata.silero_vad_inputs(n, split), None
    if key == "ppocr_det":
        return list(realdata.ppocr_det_inputs(n, split)), None
    if key == "vit_focus":
        return list(realdata.vit_focus_inputs(n, split)), None
    if key == "magika":
        return realdata_heldout.magika_inputs(n, split), None
    if key == "nudenet":
        return realdata_heldout.nudenet_inputs(n, split), None
    if key == "espcn":
        return realdata_heldout.espcn_inputs(n, split), None
    if key == "minilm":
        return realdata_heldout.minilm_inputs(n, split), None
    raise KeyError(f"unknown real model {key!r}; known: {', '.join(SCORED_MODELS)}")


def zoo_feeds(key: str, n: int, split: str) -> list[Feed]:
    """``n`` realistic feeds of any zoo model (the five of ``tests/realdata.py``, and the held-out models of
    ``tests/realdata_heldout.py``) from ``split``, without labels."""
    return task_inputs(key, n, split)[0]


AGREEMENT = {
    "ppocr_cls": "top-1 agreement",
    "ppocr_rec": "per-position argmax agreement",
    "silero_vad": "speech-decision agreement (p > 0.5)",
    "ppocr_det": "text-mask IoU (p > 0.3)",
    "vit_focus": "importance-mask IoU (p > 0.5)",
    "magika": "top-1 agreement",
    "nudenet": "detections agreement (IoU of score > 0.25 sets)",
    "espcn": "8-bit pixels within one level",
    "minilm": "nearest-neighbour agreement (sentence embeddings)",
}


def load_task(key: str, n_calib: int = 64, n_eval: int = 48) -> Task:
    calib, _ = task_inputs(key, n_calib, "calib")
    ev, labels = task_inputs(key, n_eval, "eval")
    return Task(key=key, model=realdata.fetch_model(key), calib=calib, eval=ev, agreement_name=AGREEMENT[key],
                labels=labels)


def write_feeds(feeds: Sequence[Feed], folder: str | os.PathLike[str]) -> Path:
    """One ``.npz`` per feed, ``00000.npz``, ``00001.npz``, ... (``--calib FOLDER`` format)."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(d / f"{i:05d}.npz", **feed)  # type: ignore[arg-type]
    return d


def read_feeds(folder: str | os.PathLike[str]) -> Iterator[Feed]:
    """Stream the feeds of a folder written by :func:`write_feeds` (sorted names), one at a time."""
    for p in sorted(Path(folder).glob("*.npz")):
        with np.load(p, allow_pickle=False) as z:
            yield {k: z[k] for k in z.files}


# ============================================================================================ metrics
def session(model: str | os.PathLike[str] | bytes, threads: int = 0) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def run_all(model: str | os.PathLike[str], feeds: Sequence[Feed]) -> list[dict[str, np.ndarray]]:
    sess = session(model)
    names = [o.name for o in sess.get_outputs()]
    return [dict(zip(names, sess.run(names, f))) for f in feeds]


def sqnr_db(ref: Sequence[np.ndarray], q: Sequence[np.ndarray]) -> float:
    """``10 log10(sum ref^2 / sum (ref - q)^2)`` over all samples (float64 accumulation)."""
    s = n = 0.0
    for r, x in zip(ref, q, strict=True):
        r64 = np.asarray(r, dtype=np.float64)
        d = r64 - np.asarray(x, dtype=np.float64)
        s += float(np.sum(r64 * r64))
        n += float(np.sum(d * d))
    if n == 0.0:
        return math.inf
    return 10.0 * math.log10(s / n) if s > 0.0 else -math.inf


def mask_iou(ref: Sequence[np.ndarray], q: Sequence[np.ndarray], threshold: float) -> float:
    """Intersection over union of the pixels above ``threshold`` in ``ref`` and in ``q``, over all samples (1.0
    when neither has any)."""
    inter = union = 0
    for r, x in zip(ref, q, strict=True):
        a, b = np.asarray(r) > threshold, np.asarray(x) > threshold
        inter += int(np.count_nonzero(a & b))
        union += int(np.count_nonzero(a | b))
    return inter / union if union else 1.0


def ctc_greedy(probs: np.ndarray) -> list[int]:
    """Greedy CTC decode of one [T, C] score map (blank = 0): argmax, merge repeats, drop blanks."""
    best = np.argmax(probs, axis=-1)
    out: list[int] = []
    prev = -1
    for c in best.tolist():
        if c != prev and c != 0:
            out.append(int(c))
        prev = c
    return out


@dataclass
class Score:
    sqnr: dict[str, float]  # per graph output
    primary: str  # the task output
    agreement: float  # task agreement on the primary output, in [0, 1]
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def primary_sqnr(self) -> float:
        return self.sqnr[self.primary]


def score(key: str, ref: Sequence[dict[str, np.ndarray]], q: Sequence[dict[str, np.ndarray]],
          labels: np.ndarray | None = None) -> Score:
    """Score quantized outputs ``q`` against float outputs ``ref`` (lists of {output name: array})."""
    names = list(ref[0])
    primary = "sentence_embedding" if key == "minilm" else names[0]
    sq = {n: sqnr_db([r[n] for r in ref], [x[n] for x in q]) for n in names}
    extra: dict[str, float] = {}
    if key == "nudenet":
        agreement, scores_db = nudenet_metrics(ref, q, primary)
        extra["score rows SQNR dB"] = scores_db
    elif key == "espcn":
        img = realdata_heldout.espcn_image_metrics([r[primary] for r in ref], [x[primary] for x in q])
        agreement = img["within1"]
        extra["PSNR dB (8-bit image)"] = img["psnr_db"]
        extra["max 8-bit level difference"] = img["max_levels"]
        r = np.concatenate([np.asarray(x[primary], np.float64) for x in ref])
        d = r - np.concatenate([np.asarray(x[primary], np.float64) for x in q])
        with np.errstate(divide="ignore"):
            extra["worst channel dB"] = float(np.min(10.0 * np.log10(np.sum(r * r, axis=(0, 2, 3))
                                                                     / np.sum(d * d, axis=(0, 2, 3)))))
    elif key == "minilm":
        emb = realdata_heldout.embedding_metrics([r[primary] for r in ref], [x[primary] for x in q])
        agreement = emb["nn_agreement"]
        extra["mean cosine"] = emb["mean_cos"]
        extra["lowest cosine"] = emb["min_cos"]
    elif key in MAP_THRESHOLDS:
        agreement = mask_iou([r[primary] for r in ref], [x[primary] for x in q], MAP_THRESHOLDS[key])
    elif key == "silero_vad":
        a = np.concatenate([r[primary].reshape(-1) for r in ref]) > 0.5
        b = np.concatenate([x[primary].reshape(-1) for x in q]) > 0.5
        agreement = float(np.mean(a == b))
        extra["speech frames (float)"] = float(np.mean(a))
    else:
        a = np.concatenate([np.argmax(r[primary], axis=-1).reshape(-1) for r in ref])
        b = np.concatenate([np.argmax(x[primary], axis=-1).reshape(-1) for x in q])
        agreement = float(np.mean(a == b))
        if key == "magika":
            extra["active classes worst dB"] = active_classes_worst_db(ref, q, primary)
        if key == "ppocr_rec":
            same = [ctc_greedy(r[primary][0]) == ctc_greedy(x[primary][0]) for r, x in zip(ref, q, strict=True)]
            extra["line agreement (greedy CTC)"] = float(np.mean(same))
        if labels is not None:
            extra["accuracy (float)"] = float(np.mean(a == labels))
            extra["accuracy (quantized)"] = float(np.mean(b == labels))
    return Score(sqnr=sq, primary=primary, agreement=agreement, extra=extra)


def active_classes_worst_db(ref: Sequence[dict[str, np.ndarray]], q: Sequence[dict[str, np.ndarray]], name: str,
                            p_min: float = 0.01) -> float:
    """The lowest per-class SQNR (dB, all samples pooled) of a ``[N, classes]`` probability output, among the
    classes whose float probability exceeds ``p_min`` on some sample: the worst slice a user can see (a class
    that never rises above 1e-5 has no signal to measure, yet ranks worst along the class axis)."""
    r = np.concatenate([np.asarray(x[name], dtype=np.float64).reshape(-1, x[name].shape[-1]) for x in ref])
    d = r - np.concatenate([np.asarray(x[name], dtype=np.float64).reshape(-1, x[name].shape[-1]) for x in q])
    active = r.max(axis=0) > p_min
    if not active.any():
        return math.inf
    noise = np.sum(d * d, axis=0)[active]
    signal = np.sum(r * r, axis=0)[active]
    with np.errstate(divide="ignore"):
        return float(np.min(10.0 * np.log10(signal / noise)))


def nudenet_metrics(ref: Sequence[dict[str, np.ndarray]], q: Sequence[dict[str, np.ndarray]], name: str = "output0",
                    threshold: float = 0.25) -> tuple[float, float]:
    """``(detections agreement, score-rows SQNR dB)`` of a YOLOv8 head ``[1, 4 + classes, anchors]``.

    Detections agreement: per image, the set of (anchor, class) whose score exceeds ``threshold`` in the float
    output and in the quantized one, their intersection over union, averaged over the images where either set is
    non-empty (1.0 when no image has a detection). Score-rows SQNR: rows 4: only, all images pooled."""
    rows = realdata_heldout.NUDENET_BOX_ROWS
    ious = []
    for r, x in zip(ref, q, strict=True):
        a = realdata_heldout.nudenet_detections(r[name], threshold)
        b = realdata_heldout.nudenet_detections(x[name], threshold)
        if a or b:
            ious.append(len(a & b) / len(a | b))
    scores_db = sqnr_db([r[name][:, rows:] for r in ref], [x[name][:, rows:] for x in q])
    return (float(np.mean(ious)) if ious else 1.0), scores_db


# ======================================================================================= onnxruntime
class FolderReader:
    """onnxruntime ``CalibrationDataReader`` over a feed folder (streams one ``.npz`` at a time)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = folder
        self.it = read_feeds(folder)

    def get_next(self) -> Feed | None:
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = read_feeds(self.folder)


def ort_quantize(model: str | os.PathLike[str], output: str | os.PathLike[str], calib_folder: str | os.PathLike[str],
                 method: str = "MinMax", per_channel: bool = True, op_types: Sequence[str] | None = None,
                 workdir: str | os.PathLike[str] | None = None, weight_type: str = "QInt8",
                 quant_format: str = "QDQ", symbolic_shapes: bool = False) -> dict[str, float]:
    """onnxruntime's static quantizer (``quant_format`` QDQ by default, or QOperator; ``weight_type`` weights —
    QInt8 by default, QInt4 for int4 —, uint8 activations) with its pre-processing: ``quant_pre_process`` with
    ``skip_symbolic_shape=True`` (its symbolic shape inference fails on both PP-OCR models), or at its defaults
    with ``symbolic_shapes`` (works on silero-vad).

    Returns the seconds spent: ``upgrade`` (opset -> 13 when lower, 21 for 4-bit weights), ``preprocess``
    (``quant_pre_process``), ``quantize`` (calibration + rewrite) and ``total``."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.inner = FolderReader(calib_folder)

        def get_next(self) -> Feed | None:
            return self.inner.get_next()

        def rewind(self) -> None:
            self.inner.rewind()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as td:
        src = Path(model)
        m = onnx.load(str(src))
        opset = next((int(i.version) for i in m.opset_import if i.domain in ("", "ai.onnx")), 1)
        need = 21 if weight_type in ("QInt4", "QUInt4") else 13 if per_channel else 0
        if opset < need:
            m = version_converter.convert_version(m, need)
            src = Path(td) / "upgraded.onnx"
            onnx.save(m, str(src))
        del m
        t1 = time.perf_counter()
        pre = Path(td) / "preprocessed.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=not symbolic_shapes)
        t2 = time.perf_counter()
        quantize_static(str(pre), str(output), _Reader(), quant_format=getattr(QuantFormat, quant_format), per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=getattr(QuantType, weight_type),
                        op_types_to_quantize=list(op_types) if op_types else None,
                        calibrate_method=getattr(CalibrationMethod, method))
        t3 = time.perf_counter()
    return {"upgrade": t1 - t0, "preprocess": t2 - t1, "quantize": t3 - t2, "total": t3 - t0}


# =========================================================================================== latency
def latency_ms(models: dict[str, str | os.PathLike[str]], feed: Feed, threads: int = 1, warmup: int = 20,
               rounds: int = 15, per_round: int = 20, min_seconds: float = 0.0) -> dict[str, dict[str, float]]:
    """Median (and p10/p90) single-run latency in ms of each model on ``feed``.

    Every model gets ``warmup`` runs, then ``rounds`` rounds in which each model in turn runs ``per_round``
    times (interleaved, so load from other processes spreads over all models alike)."""
    sessions = {k: session(p, threads=threads) for k, p in models.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    t_start = time.perf_counter()
    r = 0
    while r < rounds or time.perf_counter() - t_start < min_seconds:
        for k, s in sessions.items():
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t)
        r += 1
    return {k: {"median": 1e3 * float(np.median(v)), "p10": 1e3 * float(np.percentile(v, 10)),
                "p90": 1e3 * float(np.percentile(v, 90)), "runs": float(len(v))} for k, v in times.items()}


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """``obj`` as indented JSON: numpy scalars as numbers, anything else JSON cannot hold as its ``str``."""
    def default(x: Any) -> Any:
        return x.item() if isinstance(x, (np.floating, np.integer)) else str(x)

    Path(path).write_text(json.dumps(obj, indent=2, default=default) + "\n", encoding="utf-8")


# ====================================================================================== subprocesses
@dataclass
class ChildResult:
    returncode: int
    seconds: float  # wall time of the whole child process
    polled_rss_mb: float  # largest VmRSS seen while polling (a lower bound of the peak)
    stdout: str
    stderr: str
    killed_for_memory: bool = False


def run_child(cmd: Sequence[str], mem_limit_mb: float | None = None, env: dict[str, str] | None = None,
              poll: float = 0.05) -> ChildResult:
    """Run ``cmd`` in its own process, polling its resident memory; with ``mem_limit_mb`` it is killed when
    its resident memory exceeds the limit.

    The exact peak comes from the child itself (``VmHWM`` in ``/proc/self/status``, see
    :func:`self_peak_rss_mb`): ``ru_maxrss`` from ``wait4`` / ``RUSAGE_CHILDREN`` is no good here, because
    Linux carries the high-water mark of the pre-``exec`` address space -- the parent's, after ``fork`` or
    ``vfork`` -- into the child's, so every child would report at least the parent's peak."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env)
        killed = False
        polled = 0.0
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = _rss_mb(proc.pid)
            polled = max(polled, rss)
            if mem_limit_mb is not None and rss > mem_limit_mb:
                proc.kill()
                killed = True
                pid, status, _ = os.wait4(proc.pid, 0)
                break
            time.sleep(poll)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildResult(returncode=proc.returncode, seconds=seconds, polled_rss_mb=polled,
                           stdout=out.read(), stderr=err.read(), killed_for_memory=killed)


def _proc_status_mb(pid: int | str, field: str) -> float | None:
    """``field`` (``VmRSS``, ``VmHWM``) of ``/proc/PID/status`` in MB; None when it cannot be read (the process
    is gone, or no /proc)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _rss_mb(pid: int) -> float:
    return _proc_status_mb(pid, "VmRSS") or 0.0


def self_peak_rss_mb() -> float:
    """Peak resident memory of this process so far (VmHWM), MB."""
    peak = _proc_status_mb("self", "VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ============================================================================================ machine
def machine() -> dict[str, str]:
    """CPU model, cores, OS, versions of Python and the libraries measured."""
    import onnx
    import onnxruntime

    import qcompiler

    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    flags = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = " ".join(x for x in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
                                     if x in have)
                    break
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "isa": flags,
        "os": platform.platform(),
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "qcompiler": qcompiler.__version__,
        "loadavg": load,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def fmt_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align_right: Callable[[int], bool] | None = None
              ) -> str:
    """A plain text table (Markdown-compatible pipes)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = align_right or (lambda i: i > 0)

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if right(i) else c.ljust(w) for i, (c, w) in
                                 enumerate(zip(r, widths, strict=True))) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if right(i) else (":" + "-" * (w + 1)) for i, w in
                         enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep, *[line(r) for r in cells[1:]]])
