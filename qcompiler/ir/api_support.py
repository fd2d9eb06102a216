"""What the public API (:mod:`qcompiler.api`) needs from ir besides its functions: the ONNX model type, for
annotations, so that the API never imports protobuf itself."""

from __future__ import annotations

from onnx import ModelProto

__all__ = ["ModelProto"]
