"""The JSON Schema of plan files, for editor completion (``qcompiler plan-schema``, ``docs/plan.schema.json``).

Generated from the declarations the parser checks against (:mod:`qcompiler.plan.schema`, the ``QuantSpec``
fields, each algorithm pass's ``Options``, each runtime target's ``options``), so the two cannot drift apart.
The schema describes the shape and the allowed values; cross-field rules (a shift scheme's ``bits``, a dynamic
calibration's dtype) are still the parser's to report.
"""

from __future__ import annotations

import json
from typing import Any

from qcompiler.core.config import json_schema, json_schema_of, settings_of, settings_of_table
from qcompiler.core.registry import registry, targets
from qcompiler.plan.checks import CHECK_SETTINGS
from qcompiler.plan.schema import (
    ALGORITHMS,
    DEFAULTS_SETTINGS,
    GUARDS,
    MATCH_SETTINGS,
    PLAN_SETTINGS,
    RULE_SETTINGS,
    PlanKeys,
)
from qcompiler.plan.spec import PLAN_VERSION, SPEC_SETTINGS

_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _described(name: str, settings: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    doc = settings[name].doc
    return {"description": doc, **body} if doc else body


def _algorithm(pass_name: str) -> dict[str, Any]:
    cls = registry().get(pass_name)
    options = json_schema(settings_of(cls.Options), description=f"options of the '{pass_name}' pass")
    return {"description": cls.summary() or pass_name,
            "oneOf": [{"type": ["boolean", "null"]}, options]}


def _targets() -> dict[str, Any]:
    props = {}
    for name, cls in sorted(targets().items()):
        props[name] = {**json_schema(settings_of_table(cls.options), description=cls.description or name),
                       "type": ["object", "null"]}
    return {"type": "object", "properties": props, "additionalProperties": {"type": "object"}}


def plan_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a plan file."""
    spec = {**json_schema(SPEC_SETTINGS), "type": ["object", "null"]}
    match_props = {name: json_schema_of(s) for name, s in MATCH_SETTINGS.items()}
    match_props["op_type"] = _described("op_type", MATCH_SETTINGS, {
        "oneOf": [{"type": "string", "minLength": 1},
                  {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}]})
    rule_props: dict[str, Any] = {
        "match": _described("match", RULE_SETTINGS, {"type": "object", "properties": match_props,
                                                     "additionalProperties": False, "minProperties": 1}),
        "weight": _described("weight", RULE_SETTINGS, {"$ref": "#/$defs/spec"}),
        "activation": _described("activation", RULE_SETTINGS, {"$ref": "#/$defs/spec"}),
        "skip": json_schema_of(RULE_SETTINGS["skip"]),
        "comment": json_schema_of(RULE_SETTINGS["comment"]),
    }
    assert set(rule_props) == set(RULE_SETTINGS)
    props: dict[str, Any] = {
        "version": _described("version", PLAN_SETTINGS, {"const": PLAN_VERSION}),
        "description": json_schema_of(PLAN_SETTINGS["description"]),
        "comment": json_schema_of(PLAN_SETTINGS["comment"]),
        "defaults": _described("defaults", PLAN_SETTINGS, {
            "type": ["object", "null"],
            "properties": {k: _described(k, DEFAULTS_SETTINGS, {"$ref": "#/$defs/spec"}) for k in DEFAULTS_SETTINGS},
            "additionalProperties": False}),
        "rules": _described("rules", PLAN_SETTINGS, {"type": ["array", "null"], "items": {"$ref": "#/$defs/rule"}}),
        "algorithms": _described("algorithms", PLAN_SETTINGS, {
            "type": ["object", "null"],
            "properties": {**{name: _algorithm(p) for name, p in sorted(ALGORITHMS.items())},
                           "guard": {"enum": list(GUARDS), "description": "measure: keep each algorithm (and "
                                     "percentile clipping) only where it measures at least as good as without it "
                                     "on held-back calibration samples"}},
            "additionalProperties": False}),
        "targets": _described("targets", PLAN_SETTINGS, _targets()),
        "checks": _described("checks", PLAN_SETTINGS, {"type": ["array", "null"], "items": {"$ref": "#/$defs/check"}}),
    }
    assert set(props) == set(PLAN_SETTINGS)
    return {
        "$schema": _DRAFT,
        "title": "qcompiler precision plan",
        "description": (PlanKeys.__doc__ or "").strip(),
        "type": "object",
        "properties": {k: props[k] for k in PLAN_SETTINGS},
        "additionalProperties": False,
        "$defs": {"spec": spec, "rule": {"type": "object", "properties": rule_props, "required": ["match"],
                                         "additionalProperties": False},
                  "check": {**json_schema(CHECK_SETTINGS), "required": ["output"],
                            "anyOf": [{"required": [k]} for k in ("min_sqnr_db", "min_cosine", "max_abs", "min_top1")]}},
    }


def plan_json_schema_text() -> str:
    """:func:`plan_json_schema` as the text of ``docs/plan.schema.json`` (2-space indent, final newline)."""
    return json.dumps(plan_json_schema(), indent=2, ensure_ascii=False) + "\n"
