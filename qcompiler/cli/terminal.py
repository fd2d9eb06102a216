"""What the command line shows on the terminal besides plain lines: progress bars (:class:`Progress`) and
aligned tables (:func:`table`), shared by the commands."""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm


class Progress:
    """tqdm bars for calibration / validation; pass names on one line."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        if stage.startswith("pass:"):
            self.close()
            return
        if stage != self.stage or self.bar is None:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="layer" if stage.endswith("layers") else "sample",
                            file=sys.stderr, leave=False)
        if total and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.stage = ""


def table(headers: list[str], rows: list[tuple[Any, ...]]) -> str:
    cols = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cols[1:]]
    return "\n".join(line.rstrip() for line in lines)


@contextlib.contextmanager
def collector_frozen() -> Iterator[None]:
    """What exists now (the imported modules) out of the garbage collector's reach while a command compiles: a full
    collection walks only what the compile makes (PP-OCR cls's measured default: 0.26 -> 0.11 s of collections);
    given back afterwards, for callers that run the command in their own process (tests, scripts)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
