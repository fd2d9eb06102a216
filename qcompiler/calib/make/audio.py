"""WAV audio -> frames of a raw-waveform model input.

Each ``.wav`` (PCM, 8 / 16 / 24 / 32 bit, read with the stdlib :mod:`wave`) becomes float samples in [-1, 1),
averaged to mono, resampled to ``--rate`` (default 16000) and cut into frames of ``--frame N`` samples every
``--hop H`` samples (default: the frame length; frame length default: the model input's fixed time axis). A
clip shorter than one frame is zero-padded to one frame; the tail after the last whole frame is dropped.

Resampling is **polyphase** (rational rate ``up/down`` after dividing by the gcd) with a Kaiser-windowed sinc
low-pass (beta 5, cut-off at the lower of the two Nyquist rates, 10 zero crossings on each side of the longer
period) — the filter and alignment of ``scipy.signal.resample_poly`` with its defaults, computed in numpy.
"""

from __future__ import annotations

import functools
import logging
import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompiler.calib.feeds import InputSig
from qcompiler.calib.make.samples import Arrays, Item, RawSource
from qcompiler.core.errors import UserError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav",)
KAISER_BETA = 5.0
#: Output samples computed per block (bounds the memory of the polyphase gather).
_BLOCK = 1 << 15


@dataclass(frozen=True)
class AudioOptions:
    rate: int = 16000
    frame: int | None = None
    hop: int | None = None


def wav_info(path: Path) -> tuple[int, int, int, int]:
    """(channels, sample width in bytes, rate, frames) from the header."""
    try:
        with wave.open(str(path), "rb") as w:
            info = (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        raise UserError(f"{path}: not a readable PCM .wav file ({type(e).__name__}: {e})") from None
    if info[1] not in (1, 2, 3, 4):
        raise UserError(f"{path}: {8 * info[1]}-bit samples are not supported (8, 16, 24 or 32-bit PCM)")
    if info[2] <= 0:
        raise UserError(f"{path}: sample rate {info[2]} in the header")
    return info


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(mono float64 samples in [-1, 1), sample rate)."""
    channels, width, rate, frames = wav_info(path)
    try:
        with wave.open(str(path), "rb") as w:
            raw = w.readframes(frames)
    except (wave.Error, EOFError, OSError) as e:
        raise UserError(f"{path}: not a readable PCM .wav file ({type(e).__name__}: {e})") from None
    n = len(raw) // (width * channels)
    if n < frames:
        raise UserError(f"{path}: truncated .wav ({n} of {frames} frames)")
    b = np.frombuffer(raw[: n * width * channels], dtype=np.uint8)
    if width == 1:
        x = (b.astype(np.float64) - 128.0) / 128.0
    elif width == 3:
        t = b.reshape(-1, 3).astype(np.int32)
        v = t[:, 0] | (t[:, 1] << 8) | (t[:, 2] << 16)
        x = np.where(v >= 1 << 23, v - (1 << 24), v).astype(np.float64) / float(1 << 23)
    else:
        dt = np.dtype("<i2") if width == 2 else np.dtype("<i4")
        x = np.frombuffer(b.tobytes(), dtype=dt).astype(np.float64) / float(1 << (8 * width - 1))
    return x.reshape(n, channels).mean(axis=1), rate


@functools.lru_cache(maxsize=16)
def _filter(up: int, down: int) -> tuple[np.ndarray, int]:
    """Kaiser-windowed sinc low-pass (gain ``up``) and its half length."""
    max_rate = max(up, down)
    half = 10 * max_rate
    cutoff = 1.0 / max_rate
    m = np.arange(2 * half + 1, dtype=np.float64) - half
    h = cutoff * np.sinc(cutoff * m) * np.kaiser(2 * half + 1, KAISER_BETA)
    return h / h.sum() * up, half


def resampled_length(n: int, src: int, dst: int) -> int:
    g = math.gcd(src, dst)
    up, down = dst // g, src // g
    return -(-n * up // down)


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Polyphase resampling of the 1-D ``x`` from ``src`` Hz to ``dst`` Hz (see the module docstring):
    ``y[m] = sum_n x[n] h[m*down - n*up + half]`` for ``m < ceil(len(x) * up / down)``."""
    g = math.gcd(src, dst)
    up, down = dst // g, src // g
    if up == down:
        return x.astype(np.float64, copy=True)
    h, half = _filter(up, down)
    n_in = len(x)
    n_out = resampled_length(n_in, src, dst)
    taps = (2 * half) // up + 2
    out = np.empty(n_out, dtype=np.float64)
    for start in range(0, n_out, _BLOCK):
        m = np.arange(start, min(n_out, start + _BLOCK), dtype=np.int64)
        t = m * down + half  # position of output m on the upsampled grid, shifted to the filter's center
        first = -(-(t - 2 * half) // up)  # smallest n with t - n*up <= 2*half
        n = first[:, None] + np.arange(taps, dtype=np.int64)[None, :]
        k = t[:, None] - n * up
        ok = (k >= 0) & (n >= 0) & (n < n_in)
        vals = np.where(ok, x[np.clip(n, 0, max(n_in - 1, 0))] if n_in else 0.0, 0.0)
        out[start:start + len(m)] = (vals * np.where(ok, h[np.clip(k, 0, 2 * half)], 0.0)).sum(axis=1)
    return out


def _time_axis(sig: InputSig) -> tuple[int, int | None, bool]:
    """(time axis within the item, fixed frame length or None, batched) for a waveform input:
    [T], [B, T], [B, 1, T] or [B, T, 1]."""
    if not sig.known_rank or not 1 <= len(sig.shape) <= 3:
        raise UserError(f"model input {sig.describe()} is not a waveform input ([T], [B, T] or [B, 1, T])")
    if len(sig.shape) == 1:
        d = sig.shape[0]
        return 0, d if isinstance(d, int) and d > 0 else None, False
    rest = sig.shape[1:]
    axes = [i for i, d in enumerate(rest) if d != 1]
    if len(axes) != 1:
        raise UserError(f"model input {sig.describe()} is not a waveform input ([T], [B, T] or [B, 1, T]); "
                        "this command feeds raw mono audio")
    d = rest[axes[0]]
    return axes[0], d if isinstance(d, int) and d > 0 else None, True


def audio_source(root: Path, files: list[Path], sigs: list[InputSig], opts: AudioOptions) -> RawSource:
    """One item per frame of every file (sorted); names ``file.wav#i``."""
    if len(sigs) != 1:
        raise UserError(f"{root}: audio feeds a single-input model; this one has {len(sigs)} inputs "
                        f"({', '.join(s.name for s in sigs)}): give per-input .npy subfolders instead")
    sig = sigs[0]
    if sig.dtype.kind != "f":
        raise UserError(f"model input {sig.describe()} is {sig.dtype}; audio frames are float")
    if opts.rate <= 0:
        raise UserError(f"--rate must be positive, got {opts.rate}")
    axis, fixed, batched = _time_axis(sig)
    if opts.frame is not None and opts.frame <= 0:
        raise UserError(f"--frame must be positive, got {opts.frame}")
    if opts.frame is not None and fixed is not None and opts.frame != fixed:
        raise UserError(f"--frame {opts.frame}: model input {sig.describe()} takes frames of {fixed} samples")
    frame = opts.frame or fixed
    if frame is None:
        raise UserError(f"model input {sig.describe()} has a dynamic time axis; give --frame N")
    hop = opts.hop if opts.hop is not None else frame
    if hop <= 0:
        raise UserError(f"--hop must be positive, got {hop}")
    per = 1
    if batched:
        b = sig.shape[0]
        per = b if isinstance(b, int) and b > 0 else 1
    item_shape = [1] * (len(sig.shape) - 1) if batched else [1]
    item_shape[axis] = frame

    @functools.lru_cache(maxsize=1)
    def decoded(p: Path) -> np.ndarray:
        x, rate = read_wav(p)
        return resample(x, rate, opts.rate) if rate != opts.rate else x

    def frame_item(p: Path, i: int) -> Item:
        def load() -> Arrays:
            y = decoded(p)[i * hop: i * hop + frame]
            if len(y) < frame:
                y = np.concatenate([y, np.zeros(frame - len(y))])
            return {sig.name: y.astype(np.float32).reshape(item_shape).astype(sig.dtype)}
        rel = p.relative_to(root).as_posix() if p != root else p.name
        return Item(f"{rel}#{i}", load)

    items: list[Item] = []
    for p in files:
        _ch, _w, rate, n = wav_info(p)
        if n == 0:
            raise UserError(f"{p}: the .wav holds no samples")
        m = resampled_length(n, rate, opts.rate) if rate != opts.rate else n
        count = 1 if m <= frame else 1 + (m - frame) // hop
        items.extend(frame_item(p, i) for i in range(count))
    log.info("audio: %d files -> %d frames of %d samples at %d Hz (hop %d)", len(files), len(items), frame,
             opts.rate, hop)
    return RawSource("audio", items, f"{root} ({len(files)} .wav files, {len(items)} frames)", per_feed=per,
                     files=list(files))
