"""The precision plan: which node is quantized how.

A plan is YAML or JSON, versioned::

    version: 1
    defaults:
      weight: {dtype: int8, granularity: per_channel, symmetric: true}
      activation: {dtype: uint8, granularity: per_tensor, symmetric: false, calibration: minmax}
    rules:                      # precedence: op_type < name_regex < name; later rule wins a tie
      - match: {op_type: [MatMul, Gemm]}
        weight: {dtype: int4, granularity: block, block_size: 32}
      - match: {name_regex: '^/head/'}
        skip: true              # keep float

Resolution, per node of the graph: start from ``defaults``; apply every matching rule, op_type rules first,
then name_regex rules, then exact-name rules, each in file order, each overriding only the keys it sets. A
``skip: true`` keeps the node float; ``skip: false`` re-enables it.

**What the defaults quantize.** Only the compute ops with a constant weight (Conv, ConvTranspose, Gemm,
MatMul) and the activations feeding them; recurrent ops (LSTM, GRU, RNN) get their W and R weights quantized
(weight-only), and so does the constant table of a Gather (an embedding lookup) of at least 64 KiB, per row. Normalization, Softmax, element-wise ops and activation×activation
MatMul stay float unless a rule names them (by ``op_type``, ``name_regex`` or ``name``): quantizing those by
default is what wrecks real models with onnxruntime's quantizer. An op named by a rule that has no weight gets
its float activation inputs quantized with the rule's ``activation`` spec.

The package: :mod:`~qcompiler.plan.spec` (``QuantSpec``, the allowed values, cross-field checks, opsets),
:mod:`~qcompiler.plan.schema` (the plan's keys, parsing and validation, ``load_plan``),
:mod:`~qcompiler.plan.resolve` (``resolve(plan, graph) -> ResolvedPlan``), :mod:`~qcompiler.plan.json_schema`
(the published JSON Schema) and :mod:`~qcompiler.plan.presets` (the shipped plans). This module re-exports
their public names.
"""

from __future__ import annotations

from qcompiler.plan.resolve import NodePlan, ResolvedPlan, resolve, weight_input_index, weight_input_indices
from qcompiler.plan.schema import (
    ALGORITHMS,
    DEFAULT_PLAN_NAME,
    GUARDS,
    Plan,
    Rule,
    check_algorithm_options,
    check_spec,
    load_plan,
    parse_algorithms,
    parse_rule,
    parse_target_options,
)
from qcompiler.plan.spec import (
    ACTIVATION_SCHEMES,
    AUTO_CALIBRATIONS,
    CALIBRATIONS,
    DEFAULT_ACTIVATION,
    DEFAULT_WEIGHT,
    DTYPES,
    GRANULARITIES,
    PLAN_VERSION,
    RANGES,
    RECURRENT_OPS,
    SCALES,
    SCHEMES,
    SHIFT_BITS,
    TABLE_MIN_BYTES,
    TABLE_OPS,
    UNIFORM_BITS,
    WEIGHT_OPS,
    QuantSpec,
    activation_spec,
    check_activation_scheme,
    make_spec,
    replace_spec,
    required_opset,
)

#: the old private name of :func:`make_spec` (``qcompiler.api`` and ``qcompiler.autoplan`` import it until
#: they switch)

__all__ = ["ACTIVATION_SCHEMES", "ALGORITHMS", "AUTO_CALIBRATIONS", "CALIBRATIONS", "DEFAULT_ACTIVATION",
           "DEFAULT_PLAN_NAME",
           "DEFAULT_WEIGHT", "DTYPES", "GRANULARITIES", "GUARDS", "PLAN_VERSION", "RANGES", "RECURRENT_OPS", "SCALES",
           "SCHEMES", "SHIFT_BITS", "TABLE_MIN_BYTES", "TABLE_OPS", "UNIFORM_BITS", "WEIGHT_OPS", "NodePlan", "Plan", "QuantSpec", "ResolvedPlan",
           "Rule", "activation_spec", "check_activation_scheme", "check_algorithm_options", "check_spec",
           "load_plan", "make_spec", "parse_algorithms", "parse_rule", "parse_target_options", "replace_spec",
           "required_opset", "resolve", "weight_input_index", "weight_input_indices"]
