"""How one tensor is quantized: :class:`QuantSpec`, its allowed values, and the checks across its fields.

:class:`QuantSpec` declares every key of a plan's ``weight:`` / ``activation:`` mappings once, with its type,
default, allowed values and one-line doc (:func:`qcompiler.core.config.setting`): the plan parser validates
against it and the published JSON Schema is generated from it. :func:`make_spec` and :func:`activation_spec`
build specs and refuse combinations no single field rules out; :func:`required_opset` says which opset a set
of specs needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

from qcompiler.core.config import setting, settings_of
from qcompiler.core.errors import UserError
from qcompiler.quant.dtypes import DTYPES, FP8_DTYPES, SHIFT_BITS, UNIFORM_BITS

__all__ = ["ACTIVATION_SCHEMES", "AUTO_CALIBRATIONS", "CALIBRATIONS", "DEFAULT_ACTIVATION", "DEFAULT_WEIGHT",
           "DTYPES", "GRANULARITIES", "MAX_BLOCK_SIZE", "PER_TOKEN_KINDS", "PLAN_VERSION", "RANGES", "RECURRENT_OPS",
           "SCALES", "SCHEMES",
           "SHIFT_BITS", "SPEC_CHECK_ORDER", "SPEC_SETTINGS", "TABLE_MIN_BYTES", "TABLE_OPS", "UNIFORM_BITS",
           "WEIGHT_OPS", "QuantSpec", "activation_spec", "check_activation_scheme", "check_block_size", "make_spec",
           "replace_spec", "required_opset"]

#: the plan file format version this qcompiler reads and writes
PLAN_VERSION = 1
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: lookup ops on a constant table (an embedding): weight-only, the table quantized per row (``per_channel``: one
#: scale per row, axis 0) or per row-block (``block``: blocks along axis 1); the indices stay integers
TABLE_OPS = ("Gather",)
#: the defaults quantize a Gather table only from this size up (64 KiB: a 128 x 128 float table); a rule that sets
#: the node's ``weight:`` quantizes a smaller one too
TABLE_MIN_BYTES = 64 * 1024
#: recurrent ops: weight-only (W and R quantized, activations float — no integer kernel to gain)
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
GRANULARITIES = ("per_tensor", "per_channel", "block", "per_token")
#: ``granularity: per_token`` (activations, ``calibration: dynamic``): one run-time scale per row of a MatMul / Gemm
#: input (every axis but the last), with these (dtype, symmetric) pairs
PER_TOKEN_KINDS = (("uint8", False), ("int8", True))
CALIBRATIONS = ("minmax", "percentile", "entropy", "mse", "auto", "dynamic")
#: the methods ``calibration: auto`` chooses among (the calibrate pass measures each on the whole model)
AUTO_CALIBRATIONS = ("minmax", "percentile", "entropy", "mse")
SCHEMES = ("int", "binary", "ternary", "shift", "uniform")
#: activations: int/fp8 dtypes (scheme int) or binary (sign with a per-tensor scale, for XNOR layers)
ACTIVATION_SCHEMES = ("int", "binary")
RANGES = ("minmax", "mse")
#: the largest ``block_size`` a plan may give (real plans use 16 ... 256; a block longer than the weight's
#: reduction axis is one block, so nothing needs more)
MAX_BLOCK_SIZE = 1 << 16
SCALES = ("float", "pow2", "float16")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a weight or an activation) is quantized."""

    dtype: str = setting("int8", choices=DTYPES, doc="element type of the codes; float keeps the tensor float")
    granularity: str = setting("per_tensor", choices=GRANULARITIES,
                               doc="one scale per tensor, per output channel, per block of block_size, or (activations "
                                   "with calibration dynamic) per token: per row of a MatMul / Gemm input, at run "
                                   "time")
    symmetric: bool = setting(True, doc="zero point 0 (false: asymmetric, the range widened to contain 0)")
    axis: int | None = setting(None, doc="per-channel / block axis; derived from the op when null")
    block_size: int = setting(32, positive=True, power_of_two=True,
                              doc="granularity block: elements per scale along the axis (a power of two)")
    calibration: str = setting("minmax", choices=CALIBRATIONS, doc="activations: how the range is calibrated")
    percentile: float = setting(99.99, interval=(50.0, 100.0, True, False),
                                doc="calibration percentile: the percentile of |x| kept")
    range: str = setting("minmax", choices=RANGES, doc="weights: how the clipping range is chosen")
    scheme: str = setting("int", choices=SCHEMES, doc="int | binary | ternary | shift | uniform (low-bit weight "
                                                      "schemes; activations: int or binary)")
    scale: str = setting("float", choices=SCALES, doc="float | pow2 (power-of-two scales) | float16 (weights, scheme "
                                                      "int: scales stored as float16, cast to float in the graph)")
    bits: int = setting(4, positive=True, doc="shift scheme: sign + 2**(bits-1) exponents (2, 3 or 4); uniform: "
                                              "2**bits levels (2 or 3)")
    threshold: float = setting(0.7, interval=(0.0, 2.0, True, True), doc="ternary: delta = threshold * mean|W|")

    @property
    def is_float(self) -> bool:
        return self.dtype == "float"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        default = QuantSpec()
        # keep the readable core, drop knobs left at their defaults that do not apply
        keep = {"dtype", "granularity", "symmetric"}
        out = {k: v for k, v in d.items() if k in keep or v != getattr(default, k)}
        return out


#: the keys of a ``weight:`` / ``activation:`` mapping, with their types and constraints
SPEC_SETTINGS = settings_of(QuantSpec)
#: the keys with choices in the order they are checked (an error names the first bad one): the names first
SPEC_CHECK_ORDER = ("dtype", "granularity", "calibration", "scheme", "range", "scale")

DEFAULT_WEIGHT = {"dtype": "int8", "granularity": "per_channel", "symmetric": True}
DEFAULT_ACTIVATION = {"dtype": "uint8", "granularity": "per_tensor", "symmetric": False, "calibration": "minmax"}


def check_block_size(d: dict[str, Any], where: str) -> None:
    """Refuse a ``block_size`` beyond :data:`MAX_BLOCK_SIZE` (its type and power of two are checked with the
    other keys)."""
    b = d.get("block_size")
    if isinstance(b, int) and not isinstance(b, bool) and b > MAX_BLOCK_SIZE:
        raise UserError(f"{where}: block_size {b} is beyond the {MAX_BLOCK_SIZE} limit (a block longer than "
                        "the weight's reduction axis is one block per channel)")


def make_spec(d: dict[str, Any], where: str) -> QuantSpec:
    """A :class:`QuantSpec` from checked keys; refuses scheme / dtype / granularity / bits combinations."""
    check_block_size(d, where)
    try:
        spec = QuantSpec(**d)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None
    # block-wise fp8 scales are allowed (DeepSeek-style)
    if spec.scheme != "int" and spec.dtype in FP8_DTYPES:
        raise UserError(f"{where}: scheme '{spec.scheme}' cannot use dtype {spec.dtype}")
    if spec.scheme != "int" and spec.granularity == "block":
        raise UserError(f"{where}: scheme '{spec.scheme}' scales per channel or per tensor, not block-wise")
    if spec.scheme == "shift" and spec.bits not in SHIFT_BITS:
        raise UserError(f"{where}: shift bits must be one of {', '.join(map(str, SHIFT_BITS))} "
                        f"(sign + 2**(bits-1) exponents), got {spec.bits}")
    if spec.granularity == "per_token" and (spec.calibration != "dynamic" or spec.scheme != "int"):
        raise UserError(f"{where}: granularity per_token is measured at run time, for activations: set calibration "
                        "dynamic (and scheme int)")
    if spec.scale == "float16" and spec.scheme != "int":
        raise UserError(f"{where}: scale float16 stores an int scheme's scales as float16; scheme '{spec.scheme}' "
                        "takes scale float or pow2")
    if spec.scheme == "uniform" and spec.bits not in UNIFORM_BITS:
        raise UserError(f"{where}: uniform bits must be one of {', '.join(map(str, UNIFORM_BITS))}, got {spec.bits}")
    return spec


def _check_activation_scale(d: dict[str, Any], where: str) -> None:
    if d.get("scale") == "float16":
        raise UserError(f"{where}: scale float16 is for weights (stored scales); an activation's scale is one "
                        "float32 per tensor: remove scale from the activation")


def check_activation_scheme(d: dict[str, Any], where: str) -> None:
    _check_activation_scale(d, where)
    if d.get("scheme", "int") not in ACTIVATION_SCHEMES:
        raise UserError(f"{where}: activation scheme '{d['scheme']}' is not supported "
                        f"(one of: {', '.join(ACTIVATION_SCHEMES)}; ternary and shift are weight schemes)")


def activation_spec(d: dict[str, Any], where: str) -> QuantSpec:
    """An activation spec. Binary activations take beta = mean|x| from the calibration histogram, so a
    ``minmax`` calibration (which keeps no histogram) becomes ``mse`` for them."""
    _check_activation_scale(d, where)
    spec = make_spec(d, where)
    if spec.scheme == "binary" and spec.calibration == "minmax":
        spec = replace(spec, calibration="mse")
    if spec.calibration == "dynamic" and not spec.is_float and spec.granularity == "per_token":
        if (spec.dtype, spec.symmetric) not in PER_TOKEN_KINDS:
            raise UserError(f"{where}: granularity per_token quantizes each row at run time as uint8 asymmetric "
                            "(DynamicQuantizeLinear's convention) or int8 symmetric: set dtype uint8 with symmetric "
                            "false, or int8 with symmetric true")
    elif spec.calibration == "dynamic" and not spec.is_float and (
            spec.dtype != "uint8" or spec.symmetric or spec.granularity != "per_tensor" or spec.scheme != "int"):
        raise UserError(f"{where}: calibration dynamic quantizes at run time with DynamicQuantizeLinear, which "
                        "writes uint8, asymmetric, per tensor: set dtype uint8, symmetric false, granularity "
                        "per_tensor (or per_token)")
    return spec


def required_opset(specs: Iterable[QuantSpec]) -> tuple[int, str]:
    """The lowest opset that can express ``specs`` and why."""
    need, why = 10, "QuantizeLinear/DequantizeLinear"
    for s in specs:
        if s.granularity == "per_channel" and need < 13:
            need, why = 13, "per-channel scales"
        if s.dtype in ("int16", "uint16") and need < 21:
            need, why = 21, "16-bit integer QDQ"
        if s.dtype in FP8_DTYPES and need < 19:
            need, why = 19, "fp8"
        if (s.dtype in ("int4", "uint4") or s.granularity == "block") and need < 21:
            need, why = 21, "int4 / block-wise scales"
        if s.scheme == "shift" and 2 ** (s.bits - 1) > 7 and need < 21:
            need, why = 21, "int16 shift codes (+-2^7 does not fit int8)"
    return need, why


def replace_spec(spec: QuantSpec, **kw: Any) -> QuantSpec:
    return replace(spec, **kw)
