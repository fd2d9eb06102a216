"""Small helpers shared by several test modules (validation's float runs counted, feed folders written)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qcompiler.report.validate import compare


def count_float_runs(monkeypatch) -> list[int]:
    """From now on, the samples validation runs the float model's graph outputs on, in order (its per-layer runs
    are not counted)."""
    runs: list[int] = []
    real = compare._run_checked

    def counted(runner, feed, sample, names, which, label):
        if which == "float":
            runs.append(sample)
        return real(runner, feed, sample, names, which, label)

    monkeypatch.setattr(compare, "_run_checked", counted)
    return runs


def npz_folder(folder: Path, n: int, seed: int) -> Path:
    """``n`` feeds ``x`` of shape [2, 6] (standard normal from ``seed``) as ``000.npz``, ``001.npz``, ... in
    ``folder`` (created)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        np.savez(folder / f"{i:03d}.npz", x=rng.standard_normal((2, 6)).astype(np.float32))
    return folder
