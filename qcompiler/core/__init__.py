"""The core (layer 0): errors, the pass base classes (``Pass``, ``GraphPass``, ``Sequential``), the pass manager,
the registry of passes and targets, the compile context, the one configuration schema, node tags, numbers and
the step profiler. It imports nothing else of qcompiler; every other layer builds on it."""

# First, before anything else of qcompiler loads: its import time starts the clock of `--profile`'s import step.
from qcompiler.core import profile as _profile  # noqa: F401
