"""A BERT-style WordPiece tokenizer in plain Python (no ``transformers``).

The vocabulary comes from a ``vocab.txt`` (one token per line, id = line number) or from a HuggingFace
``tokenizer.json`` whose model is ``WordPiece`` (its ``vocab``, ``unk_token``, ``continuing_subword_prefix``,
``max_input_chars_per_word`` and the ``lowercase`` / ``strip_accents`` of a ``BertNormalizer``).

Tokenizing a text, as BERT's ``BasicTokenizer`` + ``WordpieceTokenizer``:

1. clean: drop NUL, U+FFFD and control characters; every whitespace character becomes a space;
2. put spaces around CJK ideographs;
3. split on whitespace; per word: lowercase and strip accents (NFD, drop combining marks) when uncased, then
   split every punctuation character (ASCII 33-47, 58-64, 91-96, 123-126 and Unicode ``P*``) into its own word;
4. per word: greedy longest match from the left against the vocabulary, pieces after the first prefixed with
   ``##``; a word with an unmatched rest, or longer than 100 characters, becomes ``[UNK]``.

:meth:`WordPiece.encode` adds ``[CLS]`` ... ``[SEP]``, truncates to the sequence length and pads with ``[PAD]``.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from qcompiler.core.errors import UserError

SPECIAL = ("[CLS]", "[SEP]", "[PAD]", "[UNK]")


def _is_control(ch: str) -> bool:
    if ch in "\t\n\r":
        return False
    return unicodedata.category(ch).startswith("C")


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class WordPiece:
    """Vocabulary + the BERT tokenization rules (see the module docstring)."""

    def __init__(self, vocab: dict[str, int], *, lowercase: bool = True, strip_accents: bool | None = None,
                 unk: str = "[UNK]", prefix: str = "##", max_chars: int = 100, source: str = "vocabulary") -> None:
        self.vocab = vocab
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.unk = unk
        self.prefix = prefix
        self.max_chars = max_chars
        self.source = source
        for tok in ("[CLS]", "[SEP]", "[PAD]", unk):
            if tok not in vocab:
                raise UserError(f"{source}: the vocabulary has no '{tok}' token")

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: Path, *, lowercase: bool | None = None) -> WordPiece:
        """A ``vocab.txt`` or a ``tokenizer.json``; ``lowercase`` None: uncased unless the file says otherwise."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read the tokenizer file ({type(e).__name__}: {e})") from None
        if path.suffix.lower() == ".json":
            return cls._from_json(path, text, lowercase)
        vocab: dict[str, int] = {}
        for i, line in enumerate(text.split("\n")):
            tok = line.rstrip("\r")
            if tok and tok not in vocab:
                vocab[tok] = i
        if not vocab:
            raise UserError(f"{path}: an empty vocabulary")
        return cls(vocab, lowercase=True if lowercase is None else lowercase, source=str(path))

    @classmethod
    def _from_json(cls, path: Path, text: str, lowercase: bool | None) -> WordPiece:
        try:
            data = json.loads(text)
        except ValueError as e:  # bad JSON, or an int over 4300 digits
            raise UserError(f"{path}: not valid JSON ({e})") from None
        except RecursionError:
            raise UserError(f"{path}: not valid JSON (nested too deeply)") from None
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict) or model.get("type") != "WordPiece":
            kind = model.get("type") if isinstance(model, dict) else None
            raise UserError(f"{path}: only WordPiece tokenizers are supported (this one is {kind or 'unknown'})")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()):
            raise UserError(f"{path}: model.vocab is not a {{token: id}} mapping")
        norm = data.get("normalizer")
        lower, strip = True, None
        if isinstance(norm, dict) and norm.get("type") == "BertNormalizer":
            lower = bool(norm.get("lowercase", True))
            sa = norm.get("strip_accents")
            strip = None if sa is None else bool(sa)
        if lowercase is not None:
            lower, strip = lowercase, None
        return cls(dict(vocab), lowercase=lower, strip_accents=strip, unk=str(model.get("unk_token", "[UNK]")),
                   prefix=str(model.get("continuing_subword_prefix", "##")),
                   max_chars=int(model.get("max_input_chars_per_word", 100)), source=str(path))

    # ------------------------------------------------------------------------------------ tokenizing
    def basic_tokens(self, text: str) -> list[str]:
        """Steps 1-3: words and punctuation."""
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD or _is_control(ch):
                continue
            if _is_whitespace(ch):
                chars.append(" ")
            elif _is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        out: list[str] = []
        for word in "".join(chars).split():
            if self.lowercase:
                word = word.lower()
            if self.strip_accents:
                word = "".join(c for c in unicodedata.normalize("NFD", word) if unicodedata.category(c) != "Mn")
            cur = ""
            for ch in word:
                if _is_punctuation(ch):
                    if cur:
                        out.append(cur)
                    out.append(ch)
                    cur = ""
                else:
                    cur += ch
            if cur:
                out.append(cur)
        return out

    def pieces(self, word: str) -> list[str]:
        """Step 4 for one word."""
        if len(word) > self.max_chars:
            return [self.unk]
        out: list[str] = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                sub = word[start:end] if start == 0 else self.prefix + word[start:end]
                if sub in self.vocab:
                    found = sub
                    break
                end -= 1
            if found is None:
                return [self.unk]
            out.append(found)
            start = end
        return out

    def tokenize(self, text: str) -> list[str]:
        return [p for w in self.basic_tokens(text) for p in self.pieces(w)]

    def encode(self, text: str, seq_len: int) -> tuple[list[int], list[int]]:
        """(input ids, attention mask), each ``seq_len`` long: [CLS] tokens [SEP] [PAD]..."""
        if seq_len < 2:
            raise UserError(f"--seq-len must be at least 2 (room for [CLS] and [SEP]), got {seq_len}")
        toks = ["[CLS]", *self.tokenize(text)[: seq_len - 2], "[SEP]"]
        ids = [self.vocab[t] for t in toks]
        pad = seq_len - len(ids)
        return ids + [self.vocab["[PAD]"]] * pad, [1] * len(ids) + [0] * pad
