"""Text lines -> feeds of a BERT-style model (``input_ids`` / ``attention_mask`` / ``token_type_ids``).

One sample per non-empty line of the ``.txt`` files (sorted by name, lines in file order; names ``file.txt:LINE``),
tokenized by :class:`~qcompiler.calib.make.wordpiece.WordPiece`. Model inputs are matched by name: one containing
``mask`` gets the attention mask (1 for [CLS] tokens [SEP], 0 for padding), ``type`` or ``segment`` the token
type ids (all 0: one segment), ``position`` the positions 0..L-1, and the one remaining input with ``id`` or
``input`` in its name the token ids. The sequence length is the inputs' fixed length, else ``--seq-len``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompiler.calib.feeds import InputSig
from qcompiler.calib.make.samples import Arrays, Item, RawSource, batch_size
from qcompiler.calib.make.wordpiece import WordPiece
from qcompiler.core.errors import UserError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt",)
ROLES = ("ids", "mask", "types", "positions")


@dataclass(frozen=True)
class TextOptions:
    vocab: Path | None = None
    seq_len: int | None = None
    lowercase: bool | None = None  # None: as the tokenizer file says (vocab.txt: uncased)


def input_roles(sigs: list[InputSig]) -> dict[str, str]:
    """Model input name -> role (ids / mask / types / positions)."""
    roles: dict[str, str] = {}
    for s in sigs:
        n = s.name.lower()
        if "mask" in n:
            role = "mask"
        elif "type" in n or "segment" in n:
            role = "types"
        elif "position" in n:
            role = "positions"
        elif "id" in n or "input" in n:
            role = "ids"
        else:
            raise UserError(f"model input '{s.name}': not a text input (expected names like input_ids, "
                            "attention_mask, token_type_ids)")
        if role in roles.values():
            other = next(k for k, v in roles.items() if v == role)
            raise UserError(f"model inputs '{other}' and '{s.name}' both look like {role}; cannot tell which is "
                            "which")
        if not s.known_rank or len(s.shape) not in (1, 2):
            raise UserError(f"model input {s.describe()}: text inputs are [L] or [B, L]")
        if s.dtype.kind not in "iu":
            raise UserError(f"model input {s.describe()} is {s.dtype}; token inputs are integers")
        roles[s.name] = role
    if "ids" not in roles.values():
        raise UserError(f"the model has no token-id input (inputs: {', '.join(s.name for s in sigs)})")
    return roles


def sequence_length(sigs: list[InputSig], seq_len: int | None) -> int:
    fixed = {s.shape[-1] for s in sigs if isinstance(s.shape[-1], int) and s.shape[-1] > 0}
    if len(fixed) > 1:
        raise UserError(f"model inputs disagree on the sequence length ({', '.join(map(str, sorted(fixed)))})")
    if fixed:
        want = int(next(iter(fixed)))
        if seq_len is not None and seq_len != want:
            raise UserError(f"--seq-len {seq_len}: the model's inputs have a fixed length of {want}")
        return want
    if seq_len is None:
        raise UserError("the model's sequence length is dynamic; give --seq-len N")
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 (room for [CLS] and [SEP]), got {seq_len}")
    return seq_len


def text_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-empty lines."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    return [(i + 1, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]


def text_source(root: Path, files: list[Path], sigs: list[InputSig], opts: TextOptions) -> RawSource:
    if opts.vocab is None:
        raise UserError(f"{root}: text needs a tokenizer: give --vocab vocab.txt (or tokenizer.json)")
    if not opts.vocab.is_file():
        raise UserError(f"{opts.vocab}: no such tokenizer file")
    tok = WordPiece.from_file(opts.vocab, lowercase=opts.lowercase)
    roles = input_roles(sigs)
    length = sequence_length(sigs, opts.seq_len)
    per = batch_size(sigs[0], 1) or 1
    dtypes = {s.name: s.dtype for s in sigs}

    def item(p: Path, lineno: int, line: str) -> Item:
        def load() -> Arrays:
            ids, mask = tok.encode(line, length)
            values = {"ids": ids, "mask": mask, "types": [0] * length, "positions": list(range(length))}
            return {name: np.asarray(values[role], dtype=dtypes[name]) for name, role in roles.items()}
        rel = p.relative_to(root).as_posix() if p != root else p.name
        return Item(f"{rel}:{lineno}", load)

    items = [item(p, n, line) for p in files for n, line in text_lines(p)]
    if not items:
        raise UserError(f"{root}: no non-empty lines of text")
    log.info("text: %d lines from %d files, sequence length %d", len(items), len(files), length)
    return RawSource("text", items, f"{root} ({len(items)} lines)", per_feed=per, files=[*files, opts.vocab])
