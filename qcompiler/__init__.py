"""qcompiler: a pass pipeline that turns a float ONNX model into a quantized one and validates it."""

from __future__ import annotations

__version__ = "0.1.0"

from qcompiler.core.errors import PassFailure, QCompilerError, UserError

__all__ = ["PassFailure", "QCompilerError", "UserError", "__version__"]
