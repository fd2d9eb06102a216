"""Precision plans shipped with qcompiler (``qcompiler plan show NAME``; ``--plan NAME``)."""

from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.stem for p in _DIR.glob("*.yaml"))


def preset_path(name: str) -> Path | None:
    p = _DIR / f"{name}.yaml"
    return p if name in names() else None


def is_preset(source: str | Path | None) -> bool:
    """``source`` (a plan's ``source``) is one of the shipped preset files, or names one (``"w4a8"``, ``"w4a8
    without gptq"``: the planner's base plans and their ablations)."""
    if source is None:
        return False
    if str(source).split(" without ")[0] in names():
        return True
    try:
        return Path(source).resolve().parent == _DIR
    except (OSError, ValueError):
        return False
