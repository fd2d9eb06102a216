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
(weight-only). Normalization, Softmax, element-wise ops and activation×activation
MatMul stay float unless a rule names them (by ``op_type``, ``name_regex`` or ``name``): quantizing those by
default is what wrecks real models with onnxruntime's quantizer. An op named by a rule that has no weight gets
its float activation inputs quantized with the rule's ``activation`` spec.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import yaml

from qcompiler.core.errors import UserError

log = logging.getLogger(__name__)

PLAN_VERSION = 1
WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
#: recurrent ops: weight-only (W and R quantized, activations float — no integer kernel to gain)
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
DTYPES = ("int8", "uint8", "int16", "uint16", "int4", "uint4", "fp8e4m3", "fp8e5m2", "float")
GRANULARITIES = ("per_tensor", "per_channel", "block")
CALIBRATIONS = ("minmax", "percentile", "entropy", "mse", "auto", "dynamic")
#: the methods ``calibration: auto`` chooses among (the calibrate pass measures each on the whole model)
AUTO_CALIBRATIONS = ("minmax", "percentile", "entropy", "mse")
SCHEMES = ("int", "binary", "ternary", "shift", "uniform")
#: activations: int/fp8 dtypes (scheme int) or binary (sign with a per-tensor scale, for XNOR layers)
ACTIVATION_SCHEMES = ("int", "binary")
#: shift scheme: sign bit + bits-1 exponent bits (2**(bits-1) exponents, at most 8)
SHIFT_BITS = (2, 3, 4)
#: uniform scheme (mid-rise, 2^bits levels symmetric around zero: int3 / int2 candidates of the planner)
UNIFORM_BITS = (2, 3)
RANGES = ("minmax", "mse")
SCALES = ("float", "pow2")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a weight or an activation) is quantized."""

    dtype: str = "int8"
    granularity: str = "per_tensor"
    symmetric: bool = True
    axis: int | None = None  # per-channel / block axis; derived from the op when None
    block_size: int = 32
    calibration: str = "minmax"  # activations: how the range is calibrated
    percentile: float = 99.99
    range: str = "minmax"  # weights: how the clipping range is chosen
    scheme: str = "int"  # int | binary | ternary | shift | uniform (low-bit weight schemes)
    scale: str = "float"  # float | pow2 (power-of-two scales)
    bits: int = 4  # shift scheme: sign + 2**(bits-1) exponents; uniform: 2**bits levels
    threshold: float = 0.7  # ternary: delta = threshold * mean|W|

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


_SPEC_KEYS = {f.name for f in fields(QuantSpec)}
_RULE_KEYS = {"match", "weight", "activation", "skip", "comment"}
_MATCH_KEYS = {"op_type", "name_regex", "name"}
_TOP_KEYS = {"version", "defaults", "rules", "comment", "description", "algorithms", "targets"}
#: PTQ algorithms a plan may turn on (``algorithms:`` key) -> the pass that implements each
ALGORITHMS = {"fold_bias": "fold-bias", "equalize": "equalize", "smooth": "smooth", "gptq": "gptq",
              "bias_correct": "bias-correct"}


def _check_spec(d: Any, where: str) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = sorted(set(d) - _SPEC_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(_SPEC_KEYS))})")
    allowed = {"dtype": DTYPES, "granularity": GRANULARITIES, "calibration": CALIBRATIONS, "scheme": SCHEMES,
               "range": RANGES, "scale": SCALES}
    for key, values in allowed.items():
        if key in d and d[key] not in values:
            raise UserError(f"{where}: bad {key} '{d[key]}' (one of: {', '.join(values)})")
    if "symmetric" in d and not isinstance(d["symmetric"], bool):
        raise UserError(f"{where}: symmetric must be true or false, got '{d['symmetric']}'")
    for key in ("block_size", "bits"):
        if key in d and (not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] <= 0):
            raise UserError(f"{where}: {key} must be a positive integer, got '{d[key]}'")
    if "block_size" in d and (d["block_size"] < 2 or d["block_size"] & (d["block_size"] - 1)):
        raise UserError(f"{where}: block_size must be a power of two >= 2, got {d['block_size']}")
    if "axis" in d and d["axis"] is not None and (not isinstance(d["axis"], int) or isinstance(d["axis"], bool)):
        raise UserError(f"{where}: axis must be an integer, got '{d['axis']}'")
    if "percentile" in d:
        p = d["percentile"]
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not (50.0 < float(p) <= 100.0):
            raise UserError(f"{where}: percentile must be in (50, 100], got '{p}'")
    if "threshold" in d:
        t = d["threshold"]
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (0.0 < float(t) < 2.0):
            raise UserError(f"{where}: threshold must be in (0, 2), got '{t}'")
    return dict(d)


@dataclass
class Rule:
    index: int
    op_types: tuple[str, ...] = ()
    name_regex: re.Pattern[str] | None = None
    name: str | None = None
    weight: dict[str, Any] = field(default_factory=dict)
    activation: dict[str, Any] = field(default_factory=dict)
    skip: bool | None = None
    comment: str = ""

    @property
    def precedence(self) -> int:
        return 2 if self.name is not None else (1 if self.name_regex is not None else 0)

    def describe(self) -> str:
        if self.name is not None:
            what = f"name={self.name}"
        elif self.name_regex is not None:
            what = f"name_regex={self.name_regex.pattern}"
        else:
            what = f"op_type={','.join(self.op_types)}"
        return f"rules[{self.index}] ({what})"

    def matches(self, node: gs.Node) -> bool:
        if self.op_types and node.op not in self.op_types:
            return False
        if self.name_regex is not None and not self.name_regex.search(node.name or ""):
            return False
        return not (self.name is not None and node.name != self.name)

    def to_dict(self) -> dict[str, Any]:
        m: dict[str, Any] = {}
        if self.op_types:
            m["op_type"] = list(self.op_types)
        if self.name_regex is not None:
            m["name_regex"] = self.name_regex.pattern
        if self.name is not None:
            m["name"] = self.name
        d: dict[str, Any] = {"match": m}
        if self.weight:
            d["weight"] = dict(self.weight)
        if self.activation:
            d["activation"] = dict(self.activation)
        if self.skip is not None:
            d["skip"] = self.skip
        return d


DEFAULT_WEIGHT = {"dtype": "int8", "granularity": "per_channel", "symmetric": True}
DEFAULT_ACTIVATION = {"dtype": "uint8", "granularity": "per_tensor", "symmetric": False, "calibration": "minmax"}


@dataclass
class Plan:
    """A parsed, validated precision plan."""

    weight_defaults: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_WEIGHT))
    activation_defaults: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ACTIVATION))
    rules: list[Rule] = field(default_factory=list)
    source: str = "<default plan>"
    #: PTQ algorithms turned on (``algorithms:`` key): name in :data:`ALGORITHMS` -> pass options
    algorithms: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: algorithms the plan turns off (``algorithms: {fold_bias: false}``): their passes leave the pipeline, the
    #: target's default pipeline included
    disabled_algorithms: set[str] = field(default_factory=set)
    #: per-target options (``targets: {ort: {requantize_conv_outputs: false}}``): target name -> options; a
    #: target reads only its own section, checked against its ``options`` by ``resolve-plan``
    target_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------------- parsing
    @classmethod
    def default(cls) -> Plan:
        return cls()

    @classmethod
    def from_file(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: no such plan file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: cannot read plan: {e}") from None
        return cls.from_text(text, source=str(p))

    @classmethod
    def from_text(cls, text: str, source: str = "<plan>") -> Plan:
        try:
            data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{source}: not valid YAML/JSON: {first}") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<plan>") -> Plan:
        if not isinstance(data, dict):
            raise UserError(f"{source}: a plan must be a mapping with 'version', 'defaults', 'rules'")
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise UserError(f"{source}: unknown top-level key '{unknown[0]}' (known: {', '.join(sorted(_TOP_KEYS))})")
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise UserError(f"{source}: unsupported plan version '{version}' (this qcompiler reads version 1)")
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise UserError(f"{source}: 'defaults' must be a mapping")
        bad = sorted(set(defaults) - {"weight", "activation"})
        if bad:
            raise UserError(f"{source}: defaults: unknown key '{bad[0]}' (known: activation, weight)")
        plan = cls(source=source)
        plan.weight_defaults = {**DEFAULT_WEIGHT, **_check_spec(defaults.get("weight"), f"{source}: defaults.weight")}
        plan.activation_defaults = {**DEFAULT_ACTIVATION,
                                    **_check_spec(defaults.get("activation"), f"{source}: defaults.activation")}
        rules = data.get("rules") or []
        if not isinstance(rules, list):
            raise UserError(f"{source}: 'rules' must be a list")
        for i, r in enumerate(rules):
            plan.rules.append(_parse_rule(r, i, source))
        # Specs must be constructible (catches e.g. conflicting combinations early).
        _make_spec(plan.weight_defaults, f"{source}: defaults.weight")
        _check_activation_scheme(plan.activation_defaults, f"{source}: defaults.activation")
        _activation_spec(plan.activation_defaults, f"{source}: defaults.activation")
        plan.algorithms = _parse_algorithms(data.get("algorithms"), source)
        plan.disabled_algorithms = {str(k).replace("-", "_") for k, v in (data.get("algorithms") or {}).items()
                                    if v is False}
        plan.target_options = _parse_target_options(data.get("targets"), source)
        return plan

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "defaults": {"weight": dict(self.weight_defaults), "activation": dict(self.activation_defaults)},
            "rules": [r.to_dict() for r in self.rules],
            **({"algorithms": {**{k: (dict(v) if v else True) for k, v in self.algorithms.items()},
                               **{k: False for k in sorted(self.disabled_algorithms)}}}
               if self.algorithms or self.disabled_algorithms else {}),
            **({"targets": {k: dict(v) for k, v in self.target_options.items()}} if self.target_options else {}),
        }

    def dtypes_used(self) -> set[tuple[str, str]]:
        """(granularity, dtype) pairs a plan may produce (for the opset upgrade decision)."""
        specs = [self.weight_defaults, self.activation_defaults]
        for r in self.rules:
            specs += [{**self.weight_defaults, **r.weight}, {**self.activation_defaults, **r.activation}]
        return {(str(s.get("granularity", "per_tensor")), str(s.get("dtype", "int8"))) for s in specs}

    # ---------------------------------------------------------------------------------------- resolution
    def resolve(self, graph: gs.Graph, *, warn: bool = True) -> ResolvedPlan:
        return resolve(self, graph, warn=warn)


def _parse_rule(r: Any, i: int, source: str) -> Rule:
    where = f"{source}: rules[{i}]"
    if not isinstance(r, dict):
        raise UserError(f"{where}: a rule must be a mapping with 'match'")
    unknown = sorted(set(r) - _RULE_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(_RULE_KEYS))})")
    match = r.get("match")
    if not isinstance(match, dict) or not match:
        raise UserError(f"{where}: 'match' must be a non-empty mapping of op_type / name_regex / name")
    bad = sorted(set(match) - _MATCH_KEYS)
    if bad:
        raise UserError(f"{where}: match: unknown key '{bad[0]}' (known: name, name_regex, op_type)")
    rule = Rule(index=i, comment=str(r.get("comment", "")))
    if "op_type" in match:
        ops = match["op_type"]
        ops = [ops] if isinstance(ops, str) else ops
        if not isinstance(ops, list) or not ops or not all(isinstance(o, str) and o for o in ops):
            raise UserError(f"{where}: match.op_type must be an op name or a list of op names")
        rule.op_types = tuple(ops)
    if "name_regex" in match:
        if not isinstance(match["name_regex"], str):
            raise UserError(f"{where}: match.name_regex must be a string")
        try:
            rule.name_regex = re.compile(match["name_regex"])
        except re.error as e:
            raise UserError(f"{where}: bad name_regex '{match['name_regex']}': {e}") from None
    if "name" in match:
        if not isinstance(match["name"], str):
            raise UserError(f"{where}: match.name must be a string")
        rule.name = match["name"]
    rule.weight = _check_spec(r.get("weight"), f"{where}.weight")
    rule.activation = _check_spec(r.get("activation"), f"{where}.activation")
    _check_activation_scheme(rule.activation, f"{where}.activation")
    if "skip" in r:
        if not isinstance(r["skip"], bool):
            raise UserError(f"{where}: skip must be true or false")
        rule.skip = r["skip"]
    if not (rule.weight or rule.activation or rule.skip is not None):
        raise UserError(f"{where}: rule sets nothing (give weight, activation or skip)")
    return rule


def _parse_target_options(data: Any, source: str) -> dict[str, dict[str, Any]]:
    """``targets: {ort: {requantize_conv_outputs: false}}`` -> ``{target: {option: value}}``. The target names
    and option values are checked by ``resolve-plan`` against the target in use (:meth:`Target.check_options`);
    here only the shape."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: 'targets' must be a mapping of target name -> options")
    out: dict[str, dict[str, Any]] = {}
    for name, opts in data.items():
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise UserError(f"{source}: targets.{name}: expected a mapping of option -> value")
        out[str(name)] = {str(k).replace("-", "_"): v for k, v in opts.items()}
    return out


def _parse_algorithms(data: Any, source: str) -> dict[str, dict[str, Any]]:
    """``algorithms: {equalize: true, smooth: {alpha: 0.5}, gptq: false}`` -> ``{name: options}`` of those on.

    Names may be written with ``_`` or ``-``. A value is ``true`` / ``false`` or a mapping of the pass's options
    (checked against the pass's ``Options`` dataclass: known key, type, and the pass's own ``validate``).
    """
    if data is None:
        return {}
    where = f"{source}: algorithms"
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping like {{equalize: true, smooth: {{alpha: 0.5}}}}")
    out: dict[str, dict[str, Any]] = {}
    for raw_name, value in data.items():
        name = str(raw_name).replace("-", "_")
        if name not in ALGORITHMS:
            raise UserError(f"{where}: unknown algorithm '{raw_name}' (known: {', '.join(sorted(ALGORITHMS))})")
        if value is False or value is None:
            continue
        if value is True:
            opts: dict[str, Any] = {}
        elif isinstance(value, dict):
            opts = dict(value)
        else:
            raise UserError(f"{where}.{name}: expected true, false or a mapping of options, got '{value}'")
        out[name] = _check_algorithm_options(ALGORITHMS[name], opts, f"{where}.{name}")
    return out


def _check_algorithm_options(pass_name: str, opts: dict[str, Any], where: str) -> dict[str, Any]:
    import dataclasses
    import typing

    from qcompiler.core.registry import registry

    cls = registry().get(pass_name)
    fields_ = {f.name: f for f in dataclasses.fields(cls.Options)} if dataclasses.is_dataclass(cls.Options) else {}
    try:
        hints = typing.get_type_hints(cls.Options)
    except Exception:
        hints = {}
    checked: dict[str, Any] = {}
    for key, value in opts.items():
        norm = str(key).replace("-", "_")
        if norm not in fields_:
            raise UserError(f"{where}: unknown option '{key}' (known: {', '.join(sorted(fields_)) or 'none'})")
        want = hints.get(norm)
        args = [a for a in typing.get_args(want) if a is not type(None)] or [want]
        optional = type(None) in typing.get_args(want)
        base = args[0]
        ok = (value is None and optional) or (
            base is bool and isinstance(value, bool)) or (
            base is int and isinstance(value, int) and not isinstance(value, bool)) or (
            base is float and isinstance(value, (int, float)) and not isinstance(value, bool)) or (
            base is str and isinstance(value, str)) or base not in (bool, int, float, str)
        if not ok:
            tname = getattr(base, "__name__", str(base))
            raise UserError(f"{where}: option '{key}' must be {tname}, got '{value}'")
        checked[norm] = float(value) if base is float and value is not None else value
    try:
        inst = cls(**checked)
        validate = getattr(inst.options, "validate", None)
        if callable(validate):
            validate(pass_name)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return checked


def _make_spec(d: dict[str, Any], where: str) -> QuantSpec:
    try:
        spec = QuantSpec(**d)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None
    if spec.dtype in ("fp8e4m3", "fp8e5m2") and spec.granularity == "block":
        pass  # block-wise fp8 scales are allowed (DeepSeek-style)
    if spec.scheme != "int" and spec.dtype in ("fp8e4m3", "fp8e5m2"):
        raise UserError(f"{where}: scheme '{spec.scheme}' cannot use dtype {spec.dtype}")
    if spec.scheme != "int" and spec.granularity == "block":
        raise UserError(f"{where}: scheme '{spec.scheme}' scales per channel or per tensor, not block-wise")
    if spec.scheme == "shift" and spec.bits not in SHIFT_BITS:
        raise UserError(f"{where}: shift bits must be one of {', '.join(map(str, SHIFT_BITS))} "
                        f"(sign + 2**(bits-1) exponents), got {spec.bits}")
    if spec.scheme == "uniform" and spec.bits not in UNIFORM_BITS:
        raise UserError(f"{where}: uniform bits must be one of {', '.join(map(str, UNIFORM_BITS))}, got {spec.bits}")
    return spec


def _check_activation_scheme(d: dict[str, Any], where: str) -> None:
    if d.get("scheme", "int") not in ACTIVATION_SCHEMES:
        raise UserError(f"{where}: activation scheme '{d['scheme']}' is not supported "
                        f"(one of: {', '.join(ACTIVATION_SCHEMES)}; ternary and shift are weight schemes)")


def _activation_spec(d: dict[str, Any], where: str) -> QuantSpec:
    """An activation spec. Binary activations take beta = mean|x| from the calibration histogram, so a
    ``minmax`` calibration (which keeps no histogram) becomes ``mse`` for them."""
    spec = _make_spec(d, where)
    if spec.scheme == "binary" and spec.calibration == "minmax":
        spec = replace(spec, calibration="mse")
    if spec.calibration == "dynamic" and not spec.is_float and (
            spec.dtype != "uint8" or spec.symmetric or spec.granularity != "per_tensor" or spec.scheme != "int"):
        raise UserError(f"{where}: calibration dynamic quantizes at run time with DynamicQuantizeLinear, which "
                        "writes uint8, asymmetric, per tensor: set dtype uint8, symmetric false, granularity "
                        "per_tensor")
    return spec


# ------------------------------------------------------------------------------------------ resolved plan
@dataclass
class NodePlan:
    """The decision for one node."""

    node: str
    op_type: str
    weight: QuantSpec | None  # None: weight stays float (or the op has none)
    activation: QuantSpec | None  # None: activations stay float
    rules: list[str] = field(default_factory=list)  # descriptions of matching rules, in application order
    weight_inputs: tuple[int, ...] = ()  # indices of the constant weight inputs
    activation_inputs: tuple[int, ...] = ()  # indices of activation inputs to quantize
    reason: str = ""
    #: a matching rule set ``activation:`` (a target's own defaults, e.g. ``ort`` keeping depthwise convs'
    #: activations float, give way to it)
    activation_ruled: bool = False

    @property
    def quantized(self) -> bool:
        return self.weight is not None or self.activation is not None

    @property
    def weight_input(self) -> int | None:
        return self.weight_inputs[0] if self.weight_inputs else None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"node": self.node, "op_type": self.op_type,
                             "rule": self.rules[-1] if self.rules else "defaults"}
        if len(self.rules) > 1:
            d["matched"] = list(self.rules)
        if self.weight is not None:
            d["weight"] = self.weight.to_dict()
        if self.activation is not None:
            d["activation"] = self.activation.to_dict()
        if not self.quantized:
            d["float"] = self.reason or "kept float"
        elif self.reason:
            d["note"] = self.reason
        return d


@dataclass
class ResolvedPlan:
    nodes: dict[str, NodePlan]
    unmatched_rules: list[str] = field(default_factory=list)
    source: str = ""
    #: the options of the plan's ``targets:`` section for the target in use (set by ``resolve-plan``)
    target_options: dict[str, Any] = field(default_factory=dict)

    def quantized(self) -> list[NodePlan]:
        return [n for n in self.nodes.values() if n.quantized]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "plan": self.source,
            "summary": {"nodes": len(self.nodes), "quantized": len(self.quantized()),
                        "unmatched_rules": list(self.unmatched_rules)},
            **({"target_options": dict(self.target_options)} if self.target_options else {}),
            "nodes": [n.to_dict() for n in self.nodes.values()],
        }

    def to_yaml(self) -> str:
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: ~10x faster on big graphs
        return yaml.dump(self.to_dict(), Dumper=dumper, sort_keys=False, width=120)


def _is_const(t: Any) -> bool:
    return isinstance(t, gs.Constant)


def _float_tensor(t: Any) -> bool:
    if isinstance(t, gs.Constant):
        return bool(np.issubdtype(t.values.dtype, np.floating))
    dt = getattr(t, "dtype", None)
    if dt is None:
        return True  # unknown: assume float activations (shape inference may not have run)
    try:
        return bool(np.issubdtype(np.dtype(dt), np.floating))
    except TypeError:
        return False


def weight_input_index(node: gs.Node) -> int | None:
    """Index of the constant weight input of a weight op, or None."""
    if node.op in WEIGHT_OPS + RECURRENT_OPS and len(node.inputs) >= 2:
        w = node.inputs[1]
        if _is_const(w) and _float_tensor(w) and w.values.ndim >= 2:
            return 1
    return None


def weight_input_indices(node: gs.Node) -> tuple[int, ...]:
    """All constant weight inputs: (1,) for Conv/Gemm/MatMul; W and R (1, 2) for LSTM/GRU/RNN."""
    first = weight_input_index(node)
    if first is None:
        return ()
    if node.op in RECURRENT_OPS:
        return tuple(i for i in (1, 2) if i < len(node.inputs) and _is_const(node.inputs[i])
                     and _float_tensor(node.inputs[i]))
    return (first,)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(over)
    # switching to a scheme / dtype that doesn't use a knob from the defaults is fine: knobs are ignored
    return out


def resolve(plan: Plan, graph: gs.Graph, *, warn: bool = True) -> ResolvedPlan:
    """Decide, for every node, what gets quantized and which rule said so."""
    ordered = sorted(plan.rules, key=lambda r: (r.precedence, r.index))
    used: set[int] = set()
    nodes: dict[str, NodePlan] = {}
    for node in graph.nodes:
        matching = [r for r in ordered if r.matches(node)]
        for r in matching:
            used.add(r.index)
        w = dict(plan.weight_defaults)
        a = dict(plan.activation_defaults)
        skip = False
        for r in matching:
            w = _merge(w, r.weight)
            a = _merge(a, r.activation)
            if r.skip is not None:
                skip = r.skip
        where = matching[-1].describe() if matching else f"{plan.source}: defaults"
        wi = weight_input_index(node)
        np_ = NodePlan(node=node.name, op_type=node.op, weight=None, activation=None,
                       rules=[r.describe() for r in matching], weight_inputs=weight_input_indices(node),
                       activation_ruled=any(r.activation for r in matching))
        named = bool(matching)
        if skip:
            np_.reason = "skip: true"
        elif wi is not None:
            wspec = _make_spec(w, f"{where}.weight")
            aspec = _activation_spec(a, f"{where}.activation")
            np_.weight = None if wspec.is_float else wspec
            act_idx = tuple(i for i, t in enumerate(node.inputs[:1]) if not _is_const(t) and _float_tensor(t))
            if node.op in RECURRENT_OPS and not any(r.activation for r in matching):
                act_idx = ()  # weight-only unless a rule asks for the activation
            if not aspec.is_float and act_idx:
                np_.activation = aspec
                np_.activation_inputs = act_idx
        elif node.op in WEIGHT_OPS and node.op in ("MatMul", "Gemm") and not named:
            np_.reason = "activation x activation (float unless a rule names it)"
        elif node.op in WEIGHT_OPS and not named:
            np_.reason = "weight is not a constant"
        elif named and any(r.activation or r.skip is False or r.weight for r in matching):
            aspec = _activation_spec(a, f"{where}.activation")
            act_idx = tuple(i for i, t in enumerate(node.inputs)
                            if t is not None and not _is_const(t) and bool(getattr(t, "name", "")) and _float_tensor(t))
            if node.op in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
                act_idx = act_idx[:2]
            elif node.op not in _ACT_OPS_ALL_INPUTS:
                act_idx = act_idx[:1]
            if not aspec.is_float and act_idx:
                np_.activation = aspec
                np_.activation_inputs = act_idx
            else:
                np_.reason = "no float activation input"
        else:
            np_.reason = "not a weight op (float unless a rule names it)"
        nodes[node.name] = np_
    unmatched = [r.describe() for r in plan.rules if r.index not in used]
    for d in unmatched if warn else ():
        log.warning("%s: %s matches no node", plan.source, d)
    return ResolvedPlan(nodes=nodes, unmatched_rules=unmatched, source=plan.source)


_ACT_OPS_ALL_INPUTS = {"Add", "Mul", "Sub", "Div", "Concat", "MatMul", "Gemm", "Sum", "Max", "Min"}


def load_plan(arg: str | Path | None) -> Plan:
    """``None`` -> default plan; a preset name (see ``qcompiler plan show``) or a file path."""
    if arg is None:
        return Plan.default()
    s = str(arg)
    from qcompiler.plan.presets import preset_path

    pp = preset_path(s)
    if pp is not None and not Path(s).exists():
        return Plan.from_file(pp)
    return Plan.from_file(s)


def required_opset(specs: Iterable[QuantSpec]) -> tuple[int, str]:
    """The lowest opset that can express ``specs`` and why."""
    need, why = 10, "QuantizeLinear/DequantizeLinear"
    for s in specs:
        if s.granularity == "per_channel" and need < 13:
            need, why = 13, "per-channel scales"
        if s.dtype in ("int16", "uint16") and need < 21:
            need, why = 21, "16-bit integer QDQ"
        if s.dtype in ("fp8e4m3", "fp8e5m2") and need < 19:
            need, why = 19, "fp8"
        if (s.dtype in ("int4", "uint4") or s.granularity == "block") and need < 21:
            need, why = 21, "int4 / block-wise scales"
        if s.scheme == "shift" and 2 ** (s.bits - 1) > 7 and need < 21:
            need, why = 21, "int16 shift codes (+-2^7 does not fit int8)"
    return need, why


def replace_spec(spec: QuantSpec, **kw: Any) -> QuantSpec:
    return replace(spec, **kw)
