"""``qcompiler data``: calibration / validation feeds (.npz) from raw images, audio, text or .npy arrays.

The work is :func:`qcompiler.calib.make.make_data`; this module parses the options and prints the preview.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import click

from qcompiler.calib.make import (
    KINDS,
    AudioOptions,
    ImageOptions,
    MakeOptions,
    MakeResult,
    TextOptions,
    make_data,
)
from qcompiler.core.errors import UserError

#: File names shown per output in the preview.
PREVIEW_NAMES = 3


def _number(flag: str, text: str) -> float:
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise UserError(f"{flag}: '{text}' is not a number (e.g. 0.5 or 1/255)") from None


def _numbers(flag: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    return tuple(_number(flag, t) for t in text.split(","))


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UserError(f"--size: '{text}' is not H,W (e.g. 224,224)")
    return int(parts[0]), int(parts[1])


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def print_preview(res: MakeResult) -> None:
    src = res.source
    click.echo(f"read {src.description} ({src.kind})")
    for f in res.files:
        label = f" [{f.split}]" if f.split else ""
        click.echo(f"wrote {f.path}{label}: {len(f.data)} samples")
        for s in f.summary:
            shape = "[" + ", ".join(str(d) for d in s.shape) + "]"
            click.echo(f"  {s.name}: {shape} {s.dtype}  min {_fmt(s.min)}  mean {_fmt(s.mean)}  max {_fmt(s.max)}")
        names = f.data.names
        more = f", ... (+{len(names) - PREVIEW_NAMES})" if len(names) > PREVIEW_NAMES else ""
        click.echo(f"  first: {', '.join(names[:PREVIEW_NAMES])}{more}")


def register(cli: click.Group) -> None:
    @cli.command("data")
    @click.argument("model", type=click.Path(path_type=Path))
    @click.argument("source", type=click.Path(path_type=Path))
    @click.option("-o", "--output", "output", required=True, type=click.Path(path_type=Path),
                  help="The .npz to write (with --split: OUT.NAME.npz per split).")
    @click.option("--kind", type=click.Choice(["auto", *KINDS]), default="auto", show_default=True,
                  help="What SOURCE holds (auto: by file suffix).")
    @click.option("--limit", type=int, help="At most N samples (drawn by the seeded shuffle, written in name order).")
    @click.option("--split", help="Disjoint splits NAME:COUNT,... (e.g. calib:64,eval:48), one file each.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shuffle for --limit / --split.")
    @click.option("--size", help="Images: H,W when the model's are dynamic.")
    @click.option("--layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
                  help="Images: when the model's input shape does not tell.")
    @click.option("--bgr", is_flag=True, help="Images: BGR channel order.")
    @click.option("--scale", default="1", show_default=True, help="Images: multiply pixels (0..255) by this, "
                                                                  "e.g. 1/255.")
    @click.option("--mean", help="Images: subtract per channel (after --scale), e.g. 0.485,0.456,0.406.")
    @click.option("--std", help="Images: divide per channel (after --mean), e.g. 0.229,0.224,0.225.")
    @click.option("--resize", type=click.Choice(["stretch", "center-crop", "letterbox"]), default="stretch",
                  show_default=True, help="Images: how to reach H×W.")
    @click.option("--crop-pct", default="1", show_default=True,
                  help="Images, center-crop: the crop's share of the resized image (0.875: resize 256, crop 224).")
    @click.option("--pad-value", type=click.IntRange(0, 255), default=114, show_default=True,
                  help="Images, letterbox: the border's pixel value.")
    @click.option("--interp", type=click.Choice(["nearest", "bilinear", "bicubic", "lanczos"]), default="bilinear",
                  show_default=True, help="Images: resize filter (Pillow's).")
    @click.option("--rate", type=int, default=16000, show_default=True, help="Audio: resample to this rate (Hz).")
    @click.option("--frame", type=int, help="Audio: samples per frame (default: the model's fixed time axis).")
    @click.option("--hop", type=int, help="Audio: samples between frame starts (default: --frame).")
    @click.option("--vocab", type=click.Path(path_type=Path), help="Text: WordPiece vocab.txt or tokenizer.json.")
    @click.option("--seq-len", type=int, help="Text: sequence length when the model's is dynamic.")
    @click.option("--cased", is_flag=True, help="Text: keep case and accents (default: as the tokenizer file says; "
                                                "vocab.txt: uncased).")
    @click.option("--quiet", "-q", is_flag=True, help="Print nothing on success.")
    def data_cmd(model: Path, source: Path, output: Path, kind: str, limit: int | None, split: str | None,
                 seed: int, size: str | None, layout: str | None, bgr: bool, scale: str, mean: str | None,
                 std: str | None, resize: str, crop_pct: str, pad_value: int, interp: str, rate: int,
                 frame: int | None, hop: int | None, vocab: Path | None, seq_len: int | None, cased: bool,
                 quiet: bool) -> None:
        """Make calibration / validation feeds for MODEL from the raw files in SOURCE (a folder of images,
        .wav files, .txt files or .npy arrays, or one such file) and write them as one stacked .npz, the
        format --calib and --validate-data read. Nothing is written when anything is wrong (exit 2)."""
        opts = MakeOptions(
            kind=kind, limit=limit, split=split, seed=seed,
            image=ImageOptions(size=_size(size), layout=layout.upper() if layout else None, bgr=bgr,
                               scale=_number("--scale", scale), mean=_numbers("--mean", mean),
                               std=_numbers("--std", std), resize=resize, crop_pct=_number("--crop-pct", crop_pct),
                               pad_value=pad_value, interp=interp),
            audio=AudioOptions(rate=rate, frame=frame, hop=hop),
            text=TextOptions(vocab=vocab, seq_len=seq_len, lowercase=False if cased else None),
        )
        res = make_data(model, source, output, opts)
        if not quiet:
            print_preview(res)
