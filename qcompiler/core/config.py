"""One configuration schema for every typed setting: declare it once, validate it, publish it as JSON Schema.

Settings are declared as the fields of a dataclass (a pass's ``Options``, the plan's ``QuantSpec``; constraints
go in the field's ``metadata``, see :func:`setting`) or as a table ``{option: (default, doc)}`` (a runtime
target's ``options``, whose values must have the default's type). :func:`settings_of` and
:func:`settings_of_table` read either into :class:`Setting` records, and everything else works on those:

* :func:`parse_text` turns the text of a pipeline option (``calibrate{samples=8}``) into the setting's type;
* :func:`check_settings` validates a mapping read from YAML / JSON (a plan's ``algorithms:`` and ``targets:``
  sections, its ``weight:`` / ``activation:`` specs): unknown keys, types, choices, ranges, each error one line
  in the caller's words (:class:`Messages`);
* :func:`json_schema` writes the JSON Schema of a setting set (``qcompiler plan-schema``).
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qcompiler.core.errors import UserError

#: type names as pipeline text / error messages spell them
_TEXT_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}
_JSON_TYPES: dict[Any, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


@dataclass(frozen=True)
class Setting:
    """One typed setting: its name, type, default and constraints."""

    name: str
    annotation: Any  # the declared type, as written (``int | None``, ``tuple[str, ...]``, a string if unresolved)
    default: Any = None
    doc: str = ""
    #: the allowed values (``dtype: int8 | uint8 | ...``)
    choices: tuple[Any, ...] | None = None
    #: integers: at least 1
    positive: bool = False
    #: integers: a power of two >= 2
    power_of_two: bool = False
    #: numbers: (low, high, low is excluded, high is excluded)
    interval: tuple[float, float, bool, bool] | None = None
    #: the value must have exactly the default's type (a target's options): no int for a float
    exact: bool = False

    @property
    def base(self) -> Any:
        """The type without ``None`` (``int | None`` -> ``int``); the first member of a union."""
        args = [a for a in typing.get_args(self.annotation) if a is not type(None)]
        return args[0] if _is_union(self.annotation) and args else self.annotation

    @property
    def members(self) -> tuple[Any, ...]:
        """The types a value may have, ``None`` left out (``float | str`` -> ``(float, str)``)."""
        if _is_union(self.annotation):
            return tuple(a for a in typing.get_args(self.annotation) if a is not type(None))
        return (self.annotation,)

    @property
    def optional(self) -> bool:
        return _is_union(self.annotation) and type(None) in typing.get_args(self.annotation)

    @property
    def expect(self) -> str:
        """What a valid value is, in words (``true or false``, ``a positive integer``, ``in (50, 100]``)."""
        if self.interval is not None:
            lo, hi, lo_open, hi_open = self.interval
            return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        if self.base is bool:
            return "true or false"
        if self.base is int:
            return "a positive integer" if self.positive else "an integer"
        return f"a {type_name(self.base)}"


def described(doc: str = "", *, choices: Iterable[Any] | None = None, positive: bool = False,
              power_of_two: bool = False, interval: tuple[float, float, bool, bool] | None = None) -> dict[str, Any]:
    """The ``metadata`` of a dataclass field that declares a setting's doc and constraints
    (``field(default=None, metadata=described("free text"))``)."""
    return {"qcompiler": {"doc": doc, "choices": tuple(choices) if choices is not None else None,
                          "positive": positive, "power_of_two": power_of_two, "interval": interval}}


def setting(default: Any, *, doc: str = "", choices: Iterable[Any] | None = None, positive: bool = False,
            power_of_two: bool = False, interval: tuple[float, float, bool, bool] | None = None) -> Any:
    """A dataclass field with its doc and constraints (``dtype: str = setting("int8", choices=DTYPES)``)."""
    return dataclasses.field(default=default, metadata=described(doc, choices=choices, positive=positive,
                                                                 power_of_two=power_of_two, interval=interval))


def _is_union(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return origin is typing.Union or (sys.version_info >= (3, 10) and origin is getattr(types, "UnionType", None))


def type_name(t: Any) -> str:
    return getattr(t, "__name__", str(t))


def settings_of(cls: Any) -> dict[str, Setting]:
    """The settings a dataclass declares (none for a class that is not one), in field order."""
    if not dataclasses.is_dataclass(cls):
        return {}
    fields = dataclasses.fields(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:
        hints = {f.name: f.type for f in fields}
    out: dict[str, Setting] = {}
    for f in fields:
        meta = dict(f.metadata.get("qcompiler", {}))
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        out[f.name] = Setting(f.name, hints.get(f.name, f.type), default, **meta)
    return out


def settings_of_table(table: Mapping[str, tuple[Any, str]]) -> dict[str, Setting]:
    """The settings of a ``{option: (default, doc)}`` table: each value must have its default's type."""
    return {k: Setting(k, type(d), d, doc=doc, exact=True) for k, (d, doc) in table.items()}


# --------------------------------------------------------------------------------------------- messages
@dataclass(frozen=True)
class Messages:
    """How a caller words the errors (``{where}``, ``{key}``, ``{value}``, ``{type}``, ``{expect}`` filled in)."""

    unknown: str = "{where}: unknown option '{key}' (known: {known})"
    #: the value has the wrong type
    wrong_type: str = "{where}: option '{key}' must be {type}, got '{value}'"
    #: the value is not one of the setting's choices
    choice: str = "{where}: bad {key} '{value}' (one of: {choices})"
    #: the value breaks a constraint (range, positive, ...)
    invalid: str = "{where}: {key} must be {expect}, got '{value}'"
    #: the value is not a power of two >= 2
    power_of_two: str = "{where}: {key} must be a power of two >= 2, got {value}"
    #: the word for an empty ``known`` list
    none_known: str = "none"


#: a plan's ``algorithms:`` options (the pass's ``Options``)
OPTION_MESSAGES = Messages()
#: a plan's ``targets: {<target>: {...}}`` options
TARGET_MESSAGES = Messages(wrong_type="{where}.{key}: expected {type}, got {value!r}")
#: a plan's ``weight:`` / ``activation:`` specs: every constraint worded by what it wants
SPEC_MESSAGES = Messages(unknown="{where}: unknown key '{key}' (known: {known})", wrong_type="", none_known="")


def _fail(template: str, where: str, s: Setting | None, key: str, value: Any, **extra: Any) -> UserError:
    kw: dict[str, Any] = {"where": where, "key": key, "value": value}
    if s is not None:
        kw.update(type=type_name(s.base), expect=s.expect,
                  choices=", ".join(map(str, s.choices or ())))
    kw.update(extra)
    return UserError(template.format(**kw))


def unknown_key(settings: Mapping[str, Setting], key: str, where: str, messages: Messages) -> UserError:
    known = ", ".join(sorted(settings)) or messages.none_known
    return _fail(messages.unknown, where, None, key, None, known=known)


def check_keys(values: Mapping[str, Any], settings: Mapping[str, Setting], where: str,
               messages: Messages = SPEC_MESSAGES) -> None:
    """Fail on the alphabetically first key of ``values`` that ``settings`` does not declare."""
    unknown = sorted(set(map(str, values)) - set(settings))
    if unknown:
        raise unknown_key(settings, unknown[0], where, messages)


def _has_type(value: Any, s: Setting) -> bool:
    if s.exact:
        return type(value) is type(s.default)
    if value is None:
        return s.optional
    if len(s.members) > 1:  # a union of types (``alpha: float | str``): any member's type will do
        return any(_has_type(value, Setting(s.name, m)) for m in s.members)
    base = s.base
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    return True  # other types (tuples, enums, unresolved annotations): the owner's ``validate`` judges


def _type_failure(s: Setting, where: str, messages: Messages, key: str, value: Any) -> UserError:
    template = messages.wrong_type or (messages.choice if s.choices else messages.invalid)
    return _fail(template, where, s, key, value)


def _in_interval(value: Any, s: Setting) -> bool:
    if s.interval is None:
        return True
    lo, hi, lo_open, hi_open = s.interval
    v = float(value)
    return not ((v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi))


def _is_power_of_two(value: Any) -> bool:
    return bool(value >= 2 and not value & (value - 1))


def check_value(value: Any, s: Setting, where: str, messages: Messages, key: str | None = None) -> Any:
    """``value`` read from YAML / JSON for setting ``s``: its type (an int for a float setting becomes a float),
    then the setting's constraints. Raises :class:`UserError` worded by ``messages``."""
    key = s.name if key is None else key
    if not _has_type(value, s):
        raise _type_failure(s, where, messages, key, value)
    if value is None:
        return None
    if s.choices is not None and value not in s.choices:
        raise _fail(messages.choice, where, s, key, value)
    if (s.positive and value <= 0) or not _in_interval(value, s):
        raise _fail(messages.invalid, where, s, key, value)
    if s.power_of_two and not _is_power_of_two(value):
        raise _fail(messages.power_of_two, where, s, key, value)
    if s.base is float and not s.exact and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _check_phased(keyed: Mapping[str, tuple[str, Any]], settings: Mapping[str, Setting], where: str,
                  messages: Messages, order: Sequence[str]) -> None:
    """The constraints phase by phase across the mapping, each phase in ``order`` (then the settings' order):
    every choice, then the booleans, the positive integers, the powers of two, the other integers, the ranges."""
    names = [*order, *(n for n in settings if n not in order)]

    def present(pred: Callable[[Setting], bool]) -> list[tuple[Setting, str, Any]]:
        return [(settings[n], *keyed[n]) for n in names if n in keyed and pred(settings[n])]

    for s, key, value in present(lambda s: s.choices is not None):
        if not _has_type(value, s) or value not in (s.choices or ()):
            raise _fail(messages.choice, where, s, key, value)
    for s, key, value in present(lambda s: s.base is bool and s.choices is None):
        if not _has_type(value, s):
            raise _type_failure(s, where, messages, key, value)
    for s, key, value in present(lambda s: s.positive):
        if not _has_type(value, s) or (value is not None and value <= 0):
            raise _fail(messages.invalid, where, s, key, value)
    for s, key, value in present(lambda s: s.power_of_two):
        if value is not None and not _is_power_of_two(value):
            raise _fail(messages.power_of_two, where, s, key, value)
    for s, key, value in present(lambda s: s.base is int and not (s.positive or s.power_of_two or s.choices)):
        if not _has_type(value, s):
            raise _type_failure(s, where, messages, key, value)
    for s, key, value in present(lambda s: s.interval is not None):
        if not _has_type(value, s) or (value is not None and not _in_interval(value, s)):
            raise _fail(messages.invalid, where, s, key, value)


def check_settings(values: Mapping[str, Any], settings: Mapping[str, Setting], where: str,
                   messages: Messages = OPTION_MESSAGES, *, normalize: bool = False,
                   order: Sequence[str] = ()) -> dict[str, Any]:
    """Validate a mapping read from YAML / JSON against ``settings``; returns the checked values.

    With ``normalize``, ``-`` in keys reads as ``_`` and the result uses the field names.

    Typed options (``messages.wrong_type`` set: pass and target options) are checked key by key, the key then
    its value, and come back converted (an int given for a float option becomes a float). Specs
    (``wrong_type`` empty) fail first on the alphabetically first unknown key, then run the checks phase by
    phase (:func:`_check_phased`; ``order``: the settings checked first within a phase), and come back as
    given."""
    keyed: dict[str, tuple[str, Any]] = {}
    checked: dict[str, Any] = {}
    for key, value in values.items():
        norm = str(key).replace("-", "_") if normalize else str(key)
        if messages.wrong_type:
            if norm not in settings:
                raise unknown_key(settings, str(key), where, messages)
            checked[norm] = check_value(value, settings[norm], where, messages, str(key))
        keyed[norm] = (str(key), value)
    if messages.wrong_type:
        return checked
    check_keys(values, settings, where, messages)
    _check_phased(keyed, settings, where, messages, order)
    return {norm: value for norm, (_, value) in keyed.items()}


# ----------------------------------------------------------------------------------------- pipeline text
def parse_text(value: str, annotation: Any, where: str) -> Any:
    """Turn the text of a pipeline option into the type ``annotation`` (``;``-separated items for tuples)."""
    if isinstance(annotation, str):
        annotation = _TEXT_TYPES.get(annotation.split("|")[0].strip(), str)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_union(annotation):
        non_none = [a for a in args if a is not type(None)]
        if value.lower() in ("none", "null", ""):
            return None
        for member in non_none[:-1]:  # ``float | str``: a number if the text reads as one, else the text
            try:
                return parse_text(value, member, where)
            except UserError:
                continue
        return parse_text(value, non_none[-1], where)
    if origin in (tuple, list):
        parts = [p for p in value.split(";") if p]
        item_t = args[0] if args else str
        return tuple(parse_text(p, item_t, where) for p in parts)
    if annotation is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{where}: expected true/false, got '{value}'")
    if annotation in (int, float):
        try:
            return annotation(value)
        except ValueError:
            raise UserError(f"{where}: expected {annotation.__name__}, got '{value}'") from None
    return value


def parse_text_options(text_options: Mapping[str, str], settings: Mapping[str, Setting], where: str,
                       messages: Messages = OPTION_MESSAGES) -> dict[str, Any]:
    """``{key: "text"}`` of a pipeline item -> ``{field: typed value}`` (``-`` in keys reads as ``_``)."""
    out: dict[str, Any] = {}
    for key, raw in text_options.items():
        norm = key.replace("-", "_")
        if norm not in settings:
            raise unknown_key(settings, key, where, messages)
        out[norm] = parse_text(raw, settings[norm].annotation, f"{where} option '{key}'")
    return out


# ------------------------------------------------------------------------------------------- JSON Schema
def _json_type(t: Any) -> dict[str, Any]:
    if typing.get_origin(t) in (tuple, list):
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        return {"type": "array", **({"items": _json_type(args[0])} if args else {})}
    name = _JSON_TYPES.get(t)
    return {"type": name} if name else {}


def json_schema_of(s: Setting) -> dict[str, Any]:
    """The JSON Schema of one setting (type, choices, range, default, description)."""
    out: dict[str, Any] = {}
    if s.doc:
        out["description"] = s.doc
    typ = _json_type(s.base)
    if len(s.members) > 1:
        names = [_json_type(m).get("type") for m in s.members]
        if all(isinstance(n, str) for n in names):
            typ = {"type": names}
    if s.optional and "type" in typ:
        typ["type"] = [*(typ["type"] if isinstance(typ["type"], list) else [typ["type"]]), "null"]
    out.update(typ)
    if s.choices is not None:
        out["enum"] = list(s.choices)
    if s.positive:
        out["minimum"] = 1
    if s.power_of_two:
        out["minimum"] = 2
    if s.interval is not None:
        lo, hi, lo_open, hi_open = s.interval
        out["exclusiveMinimum" if lo_open else "minimum"] = lo
        out["exclusiveMaximum" if hi_open else "maximum"] = hi
    if isinstance(s.default, (bool, int, float, str, tuple)):
        out["default"] = list(s.default) if isinstance(s.default, tuple) else s.default
    return out


def json_schema(settings: Mapping[str, Setting], *, description: str = "") -> dict[str, Any]:
    """The JSON Schema of a mapping of ``settings`` (no other keys)."""
    out: dict[str, Any] = {"type": "object"}
    if description:
        out["description"] = description
    out["properties"] = {name: json_schema_of(s) for name, s in settings.items()}
    out["additionalProperties"] = False
    return out
