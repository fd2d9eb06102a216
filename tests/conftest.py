"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qcompiler.calib import reset_stats_cache


@pytest.fixture
def fresh_stats_cache() -> Iterator[None]:
    """An empty process-wide statistics cache before and after the test (tests count its hits and misses)."""
    reset_stats_cache()
    yield
    reset_stats_cache()
