"""Reading a plan: the keys a plan file may have, parsing YAML / JSON into a :class:`Plan`, and validation.

Every key is declared once (:class:`PlanKeys`, :class:`DefaultsKeys`, :class:`RuleKeys`, :class:`MatchKeys`
here; the ``weight:`` / ``activation:`` keys by :class:`~qcompiler.plan.spec.QuantSpec`; an algorithm's options
by its pass's ``Options``; a target's by its ``options`` table) and checked with
:mod:`qcompiler.core.config`, whose errors are one line naming the file and the key
(``plan.yaml: rules[2].weight: bad dtype 'int3' (one of: ...)``). The same declarations give the plan's JSON
Schema (:mod:`qcompiler.plan.json_schema`). :func:`load_plan` reads a preset name or a file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx_graphsurgeon as gs
import yaml

from qcompiler.core.config import (
    OPTION_MESSAGES,
    SPEC_MESSAGES,
    Messages,
    check_keys,
    check_settings,
    described,
    setting,
    settings_of,
)
from qcompiler.core.errors import UserError
from qcompiler.core.files import regular_file
from qcompiler.core.registry import registry
from qcompiler.plan.checks import Check, parse_plan_checks, plan_checks_to_dict
from qcompiler.plan.presets import preset_path
from qcompiler.plan.resolve import resolve
from qcompiler.plan.spec import (
    DEFAULT_ACTIVATION,
    DEFAULT_WEIGHT,
    PLAN_VERSION,
    SPEC_CHECK_ORDER,
    SPEC_SETTINGS,
    activation_spec,
    check_activation_scheme,
    check_block_size,
    make_spec,
)

if TYPE_CHECKING:
    from qcompiler.plan.resolve import ResolvedPlan

#: PTQ algorithms a plan may turn on (``algorithms:`` key) -> the pass that implements each
#: a plan file larger than this is refused before it is read
MAX_PLAN_BYTES = 64 << 20
#: mappings / lists nested deeper than this are refused (real plans are 4 levels deep)
MAX_PLAN_DEPTH = 32

ALGORITHMS = {"fold_bias": "fold-bias", "equalize": "equalize", "smooth": "smooth", "gptq": "gptq",
              "bias_correct": "bias-correct"}
#: ``algorithms: {guard: measure}``: keep each algorithm the plan turns on (and percentile clipping) only where it
#: measures at least as good as without it on held-back calibration samples (:mod:`qcompiler.recipe`);
#: ``off`` (the default for a plan that does not say): the algorithms run as written
GUARDS = ("off", "measure")


@dataclass
class PlanKeys:
    """A precision plan (qcompiler): which node is quantized how."""

    version: int = setting(PLAN_VERSION, doc="plan format version (1)")
    defaults: dict[str, Any] | None = field(
        default=None, metadata=described("weight / activation specs of every quantized node"))
    rules: list[Any] | None = field(default=None, metadata=described(
        "rules overriding the defaults for the nodes they match; precedence op_type < name_regex < name, a later "
        "rule wins a tie"))
    algorithms: dict[str, Any] | None = field(
        default=None, metadata=described("PTQ algorithms: true / false or a mapping of the pass's options"))
    targets: dict[str, Any] | None = field(
        default=None, metadata=described("per runtime target options: target name -> options"))
    checks: list[Any] | None = field(default=None, metadata=described(
        "validation checks on graph outputs or slices of them, each with its own thresholds; a check that fails "
        "fails the compile's validation gate"))
    comment: str | None = field(default=None, metadata=described("free text"))
    description: str | None = field(default=None, metadata=described("free text"))


@dataclass
class DefaultsKeys:
    weight: dict[str, Any] | None = field(default=None, metadata=described("how constant weights are quantized"))
    activation: dict[str, Any] | None = field(
        default=None, metadata=described("how activations feeding quantized ops are quantized"))


@dataclass
class RuleKeys:
    match: dict[str, Any] | None = field(
        default=None, metadata=described("which nodes: op_type, name_regex and / or name"))
    weight: dict[str, Any] | None = field(default=None, metadata=described("weight keys overriding the defaults"))
    activation: dict[str, Any] | None = field(
        default=None, metadata=described("activation keys overriding the defaults"))
    skip: bool | None = field(default=None, metadata=described("true: keep the node float; false: re-enable it"))
    comment: str | None = field(default=None, metadata=described("free text"))


@dataclass
class MatchKeys:
    op_type: list[str] | None = field(default=None, metadata=described("an op type or a list of op types"))
    name_regex: str | None = field(default=None, metadata=described("a regular expression searched in the node name"))
    name: str | None = field(default=None, metadata=described("the exact node name"))


PLAN_SETTINGS = settings_of(PlanKeys)
DEFAULTS_SETTINGS = settings_of(DefaultsKeys)
RULE_SETTINGS = settings_of(RuleKeys)
MATCH_SETTINGS = settings_of(MatchKeys)
_TOP_MESSAGES = Messages(unknown="{where}: unknown top-level key '{key}' (known: {known})", wrong_type="")


def check_spec(d: Any, where: str) -> dict[str, Any]:
    """A ``weight:`` / ``activation:`` mapping, its keys and values checked (``None``: empty)."""
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a mapping, got {type(d).__name__}")
    checked = check_settings(d, SPEC_SETTINGS, where, SPEC_MESSAGES, order=SPEC_CHECK_ORDER)
    check_block_size(checked, where)
    return checked


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
    #: validation checks (``checks:`` key), one per threshold
    checks: list[Check] = field(default_factory=list)
    #: ``algorithms: {guard: measure}`` (one of :data:`GUARDS`)
    guard: str = "off"

    # ------------------------------------------------------------------------------------------- parsing
    @classmethod
    def default(cls) -> Plan:
        return cls()

    @classmethod
    def from_file(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.exists() and not p.is_symlink():
            raise UserError(f"{p}: no such plan file")
        regular_file(p, what="a plan file", max_bytes=MAX_PLAN_BYTES)
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
        except ValueError as e:  # a value the parser cannot build: an int over 4300 digits, a 13th month
            raise UserError(f"{source}: not valid YAML/JSON: {str(e).splitlines()[0] if str(e) else e!r}") from None
        except RecursionError:
            raise UserError(f"{source}: nested too deeply to parse (a plan is at most {MAX_PLAN_DEPTH} levels "
                            "deep)") from None
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<plan>") -> Plan:
        if not isinstance(data, dict):
            raise UserError(f"{source}: a plan must be a mapping with 'version', 'defaults', 'rules'")
        check_depth(data, source)
        check_keys(data, PLAN_SETTINGS, source, _TOP_MESSAGES)
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise UserError(f"{source}: unsupported plan version '{version}' (this qcompiler reads version 1)")
        defaults = data.get("defaults") or {}
        if not isinstance(defaults, dict):
            raise UserError(f"{source}: 'defaults' must be a mapping")
        check_keys(defaults, DEFAULTS_SETTINGS, f"{source}: defaults")
        plan = cls(source=source)
        plan.weight_defaults = {**DEFAULT_WEIGHT, **check_spec(defaults.get("weight"), f"{source}: defaults.weight")}
        plan.activation_defaults = {**DEFAULT_ACTIVATION,
                                    **check_spec(defaults.get("activation"), f"{source}: defaults.activation")}
        rules = data.get("rules") or []
        if not isinstance(rules, list):
            raise UserError(f"{source}: 'rules' must be a list")
        for i, r in enumerate(rules):
            plan.rules.append(parse_rule(r, i, source))
        # Specs must be constructible (catches e.g. conflicting combinations early).
        make_spec(plan.weight_defaults, f"{source}: defaults.weight")
        check_activation_scheme(plan.activation_defaults, f"{source}: defaults.activation")
        activation_spec(plan.activation_defaults, f"{source}: defaults.activation")
        plan.algorithms = parse_algorithms(data.get("algorithms"), source)
        plan.guard = parse_guard(data.get("algorithms"), source)
        plan.disabled_algorithms = {str(k).replace("-", "_") for k, v in (data.get("algorithms") or {}).items()
                                    if v is False and str(k) != "guard"}
        plan.target_options = parse_target_options(data.get("targets"), source)
        plan.checks = parse_plan_checks(data.get("checks"), source)
        check_string_keys(data, source)
        return plan

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "defaults": {"weight": dict(self.weight_defaults), "activation": dict(self.activation_defaults)},
            "rules": [r.to_dict() for r in self.rules],
            **({"algorithms": {**{k: (dict(v) if v else True) for k, v in self.algorithms.items()},
                               **{k: False for k in sorted(self.disabled_algorithms)},
                               **({"guard": self.guard} if self.guard != "off" else {})}}
               if self.algorithms or self.disabled_algorithms or self.guard != "off" else {}),
            **({"targets": {k: dict(v) for k, v in self.target_options.items()}} if self.target_options else {}),
            **({"checks": plan_checks_to_dict(self.checks)} if self.checks else {}),
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


def _children(value: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
    if isinstance(value, list):
        return [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    return []


def check_depth(data: Any, source: str) -> None:
    """Refuse a plan nested deeper than :data:`MAX_PLAN_DEPTH` (walked without recursion, so a hostile file
    cannot exhaust the stack of a later step)."""
    stack = [(data, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_PLAN_DEPTH:
            raise UserError(f"{source}: {path or 'the plan'} is nested deeper than {MAX_PLAN_DEPTH} levels")
        stack.extend((v, p, depth + 1) for p, v in _children(value, path))


def check_string_keys(data: Any, source: str) -> None:
    """Every mapping key of a plan is a name: a YAML key like ``1:`` or ``true:`` that no other check looked at
    (e.g. in another target's ``targets:`` section) is refused, naming where it is."""
    stack = [(data, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for k in value:
                if not isinstance(k, str):
                    where = f"{source}: {path}" if path else source
                    raise UserError(f"{where}: key {k!r} ({type(k).__name__}) is not a name; plan keys are strings")
        stack.extend((v, p) for p, v in _children(value, path))


def parse_rule(r: Any, i: int, source: str) -> Rule:
    """Rule ``i`` of a plan's ``rules:`` list, checked."""
    where = f"{source}: rules[{i}]"
    if not isinstance(r, dict):
        raise UserError(f"{where}: a rule must be a mapping with 'match'")
    check_keys(r, RULE_SETTINGS, where)
    match = r.get("match")
    if not isinstance(match, dict) or not match:
        raise UserError(f"{where}: 'match' must be a non-empty mapping of op_type / name_regex / name")
    check_keys(match, MATCH_SETTINGS, f"{where}: match")
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
    rule.weight = check_spec(r.get("weight"), f"{where}.weight")
    rule.activation = check_spec(r.get("activation"), f"{where}.activation")
    check_activation_scheme(rule.activation, f"{where}.activation")
    if "skip" in r:
        if not isinstance(r["skip"], bool):
            raise UserError(f"{where}: skip must be true or false")
        rule.skip = r["skip"]
    if not (rule.weight or rule.activation or rule.skip is not None):
        raise UserError(f"{where}: rule sets nothing (give weight, activation or skip)")
    return rule


def parse_target_options(data: Any, source: str) -> dict[str, dict[str, Any]]:
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


def parse_algorithms(data: Any, source: str) -> dict[str, dict[str, Any]]:
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
        if name == "guard":
            continue  # parse_guard
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
        out[name] = check_algorithm_options(ALGORITHMS[name], opts, f"{where}.{name}")
    return out


def parse_guard(data: Any, source: str) -> str:
    """``algorithms: {guard: measure}`` -> ``"measure"``; absent -> ``"off"``."""
    if not isinstance(data, dict) or "guard" not in data:
        return "off"
    value = data["guard"]
    if value is False:
        value = "off"
    if value not in GUARDS:
        raise UserError(f"{source}: algorithms.guard: expected one of {', '.join(GUARDS)}, got '{value}'")
    return str(value)


def check_algorithm_options(pass_name: str, opts: dict[str, Any], where: str) -> dict[str, Any]:
    """The options of an ``algorithms:`` entry, checked against the pass's ``Options`` (and its ``validate``)."""
    cls = registry().get(pass_name)
    checked = check_settings(opts, settings_of(cls.Options), where, OPTION_MESSAGES, normalize=True)
    try:
        inst = cls(**checked)
        validate = getattr(inst.options, "validate", None)
        if callable(validate):
            validate(pass_name)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return checked


#: the plan name that asks for the plain default plan (``--plan default``): what ``compile`` compiled without a
#: plan before the measured default became the default (a file of that name in the working folder wins)
DEFAULT_PLAN_NAME = "default"


def load_plan(arg: str | Path | None) -> Plan:
    """``None`` or ``"default"`` -> the plain default plan; a preset name (see ``qcompiler plan show``) or a file
    path."""
    if arg is None:
        return Plan.default()
    s = str(arg)
    if s == DEFAULT_PLAN_NAME and not Path(s).exists():
        return Plan.default()
    pp = preset_path(s)
    if pp is not None and not Path(s).exists():
        return Plan.from_file(pp)
    return Plan.from_file(s)
