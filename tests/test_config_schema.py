"""One configuration schema: :mod:`qcompiler.core.config` validates pass, target and algorithm options and the
plan's specs with the callers' own error texts, and the published plan JSON Schema (``qcompiler plan-schema``,
``docs/plan.schema.json``) is generated from the same declarations and accepts every shipped plan."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from qcompiler.cli import cli
from qcompiler.core.config import (
    OPTION_MESSAGES,
    SPEC_MESSAGES,
    TARGET_MESSAGES,
    check_settings,
    json_schema,
    parse_text,
    parse_text_options,
    setting,
    settings_of,
    settings_of_table,
)
from qcompiler.core.errors import UserError
from qcompiler.plan import Plan
from qcompiler.plan.json_schema import plan_json_schema, plan_json_schema_text
from qcompiler.plan.presets import names, preset_path
from qcompiler.plan.spec import SPEC_SETTINGS
from qcompiler.quant import dtypes

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE = ROOT / "docs" / "plan.schema.json"
EXAMPLES = sorted((ROOT / "docs" / "plans").glob("*.yaml"))


@dataclass
class _Opts:
    count: int = setting(3, positive=True, doc="how many")
    ratio: float = setting(0.5, interval=(0.0, 1.0, False, False))
    mode: str = setting("a", choices=("a", "b"))
    flag: bool = True
    limit: int | None = None
    names: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------ the mechanism
def test_settings_read_dataclass_fields_with_types_and_constraints():
    s = settings_of(_Opts)
    assert list(s) == ["count", "ratio", "mode", "flag", "limit", "names"]
    assert s["count"].base is int and s["count"].positive and s["count"].doc == "how many"
    assert s["limit"].optional and s["limit"].base is int
    assert s["mode"].choices == ("a", "b")
    assert settings_of(int) == {}


def test_text_options_are_coerced_with_pipeline_messages():
    s = settings_of(_Opts)
    got = parse_text_options({"count": "4", "ratio": "0.25", "flag": "off", "limit": "none", "names": "x;y"},
                             s, "pass 'p'")
    assert got == {"count": 4, "ratio": 0.25, "flag": False, "limit": None, "names": ("x", "y")}
    with pytest.raises(UserError, match=r"^pass 'p': unknown option 'bogus' \(known: count, flag, limit, mode, "):
        parse_text_options({"bogus": "1"}, s, "pass 'p'")
    with pytest.raises(UserError, match=r"^pass 'p' option 'count': expected int, got 'x'$"):
        parse_text_options({"count": "x"}, s, "pass 'p'")
    with pytest.raises(UserError, match=r"^w: expected true/false, got 'maybe'$"):
        parse_text("maybe", bool, "w")
    assert parse_text("7", "int | None", "w") == 7  # unresolved annotations read by name


def test_typed_options_one_mechanism_three_wordings():
    s = settings_of(_Opts)
    assert check_settings({"ratio": 1, "limit": None}, s, "a.yaml: algorithms.x") == {"ratio": 1.0, "limit": None}
    with pytest.raises(UserError, match=r"^a: option 'ratio' must be float, got 'high'$"):
        check_settings({"ratio": "high"}, s, "a", OPTION_MESSAGES)
    with pytest.raises(UserError, match=r"^a: unknown option 'x-y' \(known: count, "):
        check_settings({"x-y": 1}, s, "a", normalize=True)
    table = settings_of_table({"on": (True, "doc"), "k": (1.5, "")})
    assert check_settings({"on": False}, table, "p.yaml: targets.t", TARGET_MESSAGES) == {"on": False}
    with pytest.raises(UserError, match=r"^p\.yaml: targets\.t\.k: expected float, got 1$"):
        check_settings({"k": 1}, table, "p.yaml: targets.t", TARGET_MESSAGES)  # exact type
    with pytest.raises(UserError, match=r"^p: unknown option 'z' \(known: none\)$"):
        check_settings({"z": 1}, {}, "p", TARGET_MESSAGES)


@pytest.mark.parametrize("values, message", [
    ({"mode": "c"}, "w: bad mode 'c' (one of: a, b)"),
    ({"count": 0}, "w: count must be a positive integer, got '0'"),
    ({"count": True}, "w: count must be a positive integer, got 'True'"),
    ({"ratio": 2}, "w: ratio must be in [0, 1], got '2'"),
    ({"flag": "yes"}, "w: flag must be true or false, got 'yes'"),
    ({"zzz": 1, "aaa": 2}, "w: unknown key 'aaa' (known: count, flag, limit, mode, names, ratio)"),
])
def test_spec_wording(values, message):
    with pytest.raises(UserError) as e:
        check_settings(values, settings_of(_Opts), "w", SPEC_MESSAGES)
    assert str(e.value) == message


def test_plan_spec_errors_come_from_the_quantspec_declaration():
    with pytest.raises(UserError) as e:
        Plan.from_dict({"rules": [{"match": {"op_type": "Conv"}, "skip": False}, {"match": {"name": "a"}, "skip": True},
                                  {"match": {"name": "b"}, "weight": {"dtype": "int3"}}]}, source="plan.yaml")
    assert str(e.value) == ("plan.yaml: rules[2].weight: bad dtype 'int3' (one of: int8, uint8, int16, uint16, "
                            "int4, uint4, fp8e4m3, fp8e5m2, float)")
    with pytest.raises(UserError, match=r"^plan\.yaml: defaults\.weight: block_size must be a power of two >= 2, "
                                        r"got 24$"):
        Plan.from_dict({"defaults": {"weight": {"block_size": 24}}}, source="plan.yaml")
    with pytest.raises(UserError, match=r"percentile must be in \(50, 100\], got '40'"):
        Plan.from_dict({"defaults": {"activation": {"percentile": 40}}}, source="plan.yaml")


def test_one_dtype_table():
    assert SPEC_SETTINGS["dtype"].choices == dtypes.DTYPES
    assert set(dtypes.DTYPES) == set(dtypes.QDTYPES) | {"float"}
    assert dtypes.int_bits("int4") == 4 and dtypes.int_bits("uint16") == 16
    assert dtypes.int_bits("fp8e4m3") is None and dtypes.int_bits("float") is None


def test_json_schema_of_a_setting_set():
    js = json_schema(settings_of(_Opts))
    assert js["additionalProperties"] is False
    assert js["properties"]["count"] == {"description": "how many", "type": "integer", "minimum": 1, "default": 3}
    assert js["properties"]["ratio"]["minimum"] == 0.0 and js["properties"]["ratio"]["maximum"] == 1.0
    assert js["properties"]["mode"]["enum"] == ["a", "b"]
    assert js["properties"]["limit"]["type"] == ["integer", "null"]
    assert js["properties"]["names"] == {"type": "array", "items": {"type": "string"}, "default": []}


# ----------------------------------------------------------------------------------- the plan JSON Schema
def test_committed_schema_is_the_generated_one():
    assert SCHEMA_FILE.read_text(encoding="utf-8") == plan_json_schema_text(), (
        "docs/plan.schema.json is stale: run `qcompiler plan-schema -o docs/plan.schema.json`")


def test_plan_schema_command_prints_it(tmp_path):
    res = CliRunner().invoke(cli, ["plan-schema"])
    assert res.exit_code == 0, res.output
    assert res.output == plan_json_schema_text()
    out = tmp_path / "s.json"
    res = CliRunner().invoke(cli, ["plan-schema", "-o", str(out)])
    assert res.exit_code == 0 and json.loads(out.read_text()) == plan_json_schema()


def _is_type(value: Any, name: str) -> bool:
    return {"object": isinstance(value, dict), "array": isinstance(value, list), "string": isinstance(value, str),
            "boolean": isinstance(value, bool), "null": value is None,
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool)}[name]


def _errors(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str = "$") -> list[str]:
    """A tiny JSON Schema checker for the keywords the plan schema uses (when ``jsonschema`` is absent)."""
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/")
        return _errors(value, root["$defs"][ref.split("/")[-1]], root, path)
    errs: list[str] = []
    types = schema.get("type")
    if types is not None and not any(_is_type(value, t) for t in ([types] if isinstance(types, str) else types)):
        return [f"{path}: {value!r} is not of type {types}"]
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path}: {value!r} != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: {value!r} not in {schema['enum']}")
    if "oneOf" in schema and sum(not _errors(value, s, root, path) for s in schema["oneOf"]) != 1:
        errs.append(f"{path}: {value!r} matches not exactly one of oneOf")
    if _is_type(value, "number"):
        for key, bad in (("minimum", lambda v, b: v < b), ("maximum", lambda v, b: v > b),
                         ("exclusiveMinimum", lambda v, b: v <= b), ("exclusiveMaximum", lambda v, b: v >= b)):
            if key in schema and bad(value, schema[key]):
                errs.append(f"{path}: {value!r} breaks {key} {schema[key]}")
    if isinstance(value, str) and len(value) < schema.get("minLength", 0):
        errs.append(f"{path}: too short")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errs.append(f"{path}: too few items")
        for i, item in enumerate(value):
            errs += _errors(item, schema.get("items", {}), root, f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if len(value) < schema.get("minProperties", 0):
            errs.append(f"{path}: too few properties")
        errs += [f"{path}: '{k}' is required" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                errs += _errors(v, props[k], root, f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                errs.append(f"{path}: unexpected key '{k}'")
            elif isinstance(schema.get("additionalProperties"), dict):
                errs += _errors(v, schema["additionalProperties"], root, f"{path}.{k}")
    return errs


def _validate(data: Any) -> list[str]:
    schema = plan_json_schema()
    try:
        import jsonschema
    except ImportError:  # the optional third-party validator; the tiny checker otherwise
        return _errors(data, schema, schema)
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(data)]


SHIPPED = [preset_path(n) for n in names()] + EXAMPLES


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED if p is not None])
def test_every_shipped_plan_validates_against_the_schema(path):
    assert path is not None
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    Plan.from_dict(data, source=str(path))  # the parser takes it too
    assert _validate(data) == []


@pytest.mark.parametrize("data", [
    {"version": 2},
    {"defaults": {"weight": {"dtype": "int3"}}},
    {"defaults": {"activation": {"percentile": 40}}},
    {"rules": [{"match": {}, "skip": True}]},
    {"rules": [{"weight": {"dtype": "int8"}}]},
    {"algorithms": {"cle": True}},
    {"algorithms": {"smooth": {"beta": 1}}},
    {"targets": {"ort": {"requantize_conv_outputs": "no"}}},
    {"bogus": 1},
])
def test_the_schema_rejects_what_the_parser_rejects(data):
    assert _validate(data)
    with pytest.raises(UserError):
        p = Plan.from_dict(data, source="p.yaml")
        from qcompiler.core.registry import get_target

        get_target("ort").check_options(p.target_options, p.source)
