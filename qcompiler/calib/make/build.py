"""``qcompiler data``: raw files -> stacked ``.npz`` feeds, the whole job.

:func:`make_data` reads the model's inputs, finds the raw files (:func:`discover`), opens them as items of
their modality, picks the samples of ``--limit`` / ``--split`` (:func:`~qcompiler.calib.make.samples.select`),
loads and checks them, and writes one ``.npz`` per split atomically; the result carries what the preview shows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from qcompiler.calib.make.arrays import ARRAY_SUFFIXES, array_source, per_input_folders
from qcompiler.calib.make.audio import AUDIO_SUFFIXES, AudioOptions, audio_source
from qcompiler.calib.make.images import IMAGE_SUFFIXES, ImageOptions, image_source
from qcompiler.calib.make.samples import (
    Dataset,
    InputSummary,
    RawSource,
    assemble,
    model_inputs,
    parse_split,
    select,
    summarize,
)
from qcompiler.calib.make.text import TEXT_SUFFIXES, TextOptions, text_source
from qcompiler.calib.make.writer import check_outputs, output_paths, write_outputs
from qcompiler.core.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("image", "audio", "text", "arrays")
SUFFIXES = {"image": IMAGE_SUFFIXES, "audio": AUDIO_SUFFIXES, "text": TEXT_SUFFIXES, "arrays": ARRAY_SUFFIXES}
_WORDS = {"image": "images", "audio": ".wav files", "text": ".txt files", "arrays": ".npy files"}


@dataclass(frozen=True)
class MakeOptions:
    """Everything ``qcompiler data`` takes besides the model, the source and the output."""

    kind: str = "auto"
    limit: int | None = None
    split: str | None = None
    seed: int = 0
    image: ImageOptions = field(default_factory=ImageOptions)
    audio: AudioOptions = field(default_factory=AudioOptions)
    text: TextOptions = field(default_factory=TextOptions)


@dataclass
class MadeFile:
    path: Path
    split: str  # "" without --split
    data: Dataset
    summary: list[InputSummary]


@dataclass
class MakeResult:
    source: RawSource
    files: list[MadeFile]


def _kind_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return next((k for k, s in SUFFIXES.items() if suffix in s), None)


def _visible(root: Path, p: Path) -> bool:
    return not any(part.startswith(".") for part in p.relative_to(root).parts)


def discover(root: Path, kind: str, exclude: tuple[Path, ...] = ()) -> tuple[str, list[Path]]:
    """(modality, files in sorted order) of ``root``: a file, or a folder searched recursively (``.npy``: the
    folder itself only); hidden files and folders are skipped."""
    if kind != "auto" and kind not in KINDS:
        raise UserError(f"--kind must be one of auto, {', '.join(KINDS)}, got '{kind}'")
    if not root.exists():
        raise UserError(f"{root}: no such file or folder")
    if root.is_file():
        k = _kind_of(root)
        if kind != "auto" and k != kind:
            raise UserError(f"{root}: not {_WORDS[kind].rstrip('s')} (by its suffix)")
        if k is None:
            raise UserError(f"{root}: unknown data file type (images: {', '.join(IMAGE_SUFFIXES)}; .wav; .txt; "
                            ".npy)")
        return k, [root]
    ex = {p.resolve() for p in exclude}
    found: dict[str, list[Path]] = {k: [] for k in KINDS}
    for p in sorted(root.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
        if not p.is_file() or not _visible(root, p) or p.resolve() in ex:
            continue
        k = _kind_of(p)
        if k is not None and (k != "arrays" or p.parent == root):
            found[k].append(p)
    if kind != "auto":
        return kind, found[kind]
    present = [k for k in KINDS if found[k]]
    if not present:
        raise UserError(f"{root}: no data files (images: {', '.join(IMAGE_SUFFIXES)}; .wav; .txt; .npy)")
    if len(present) > 1:
        detail = ", ".join(f"{len(found[k])} {_WORDS[k]}" for k in present)
        raise UserError(f"{root}: holds {detail}; give --kind")
    return present[0], found[present[0]]


def open_source(root: Path, sigs: list, opts: MakeOptions) -> RawSource:
    if root.is_dir() and opts.kind in ("auto", "arrays") and per_input_folders(root, sigs):
        return array_source(root, sigs)
    exclude = (opts.text.vocab,) if opts.text.vocab is not None else ()
    kind, files = discover(root, opts.kind, exclude)
    if not files and kind != "arrays":
        raise UserError(f"{root}: no {_WORDS[kind]}")
    folder = root if root.is_dir() else root.parent
    if kind == "image":
        return image_source(folder, files, sigs, opts.image)
    if kind == "audio":
        return audio_source(folder, files, sigs, opts.audio)
    if kind == "text":
        return text_source(folder, files, sigs, opts.text)
    if root.is_file():
        raise UserError(f"{root}: give the folder of .npy files, not one file")
    return array_source(root, sigs)


def make_data(model: Path, source: Path, out: Path, opts: MakeOptions) -> MakeResult:
    """Build and write the feeds (see the module docstring). Nothing is written on any error."""
    splits = parse_split(opts.split) if opts.split else []
    outputs = output_paths(out, [n for n, _ in splits])
    check_outputs(outputs.values(), [model, source])
    sigs = model_inputs(model)
    raw = open_source(source, sigs, opts)
    check_outputs(outputs.values(), raw.files)
    if raw.feeds == 0:
        raise UserError(f"{raw.description}: {len(raw.items)} samples, fewer than the model's batch of "
                        f"{raw.per_feed}")
    if raw.per_feed > 1 and len(raw.items) % raw.per_feed:
        log.warning("%s: the last %d samples do not fill a batch of %d and are left out", raw.description,
                    len(raw.items) % raw.per_feed, raw.per_feed)
    chosen = select(raw.feeds, limit=opts.limit, splits=splits, seed=opts.seed,
                    what="samples" if raw.per_feed == 1 else f"batches of {raw.per_feed}")
    made = []
    for name, idx in chosen.items():
        data = assemble(raw, sigs, idx)
        made.append(MadeFile(outputs[name], name, data, summarize(data)))
    write_outputs({m.path: m.data.arrays for m in made})
    return MakeResult(raw, made)
