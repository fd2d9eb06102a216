"""Error types. A :class:`UserError` is the user's mistake (exit code 2, one line); anything else is a bug."""

from __future__ import annotations


class QCompilerError(Exception):
    """Base class of qcompiler's own exceptions."""


class UserError(QCompilerError):
    """Bad input: a missing or malformed file, a bad plan rule, a calibration array that does not fit.

    The message is one line that names the file / node / rule at fault. The CLI prints it and exits 2.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class PassFailure(QCompilerError):
    """A pass crashed (a bug, not a user error). Carries the pass name for the CLI's exit-1 message."""

    def __init__(self, pass_name: str, cause: BaseException) -> None:
        super().__init__(f"pass '{pass_name}' failed: {type(cause).__name__}: {cause}")
        self.pass_name = pass_name
        self.cause = cause
