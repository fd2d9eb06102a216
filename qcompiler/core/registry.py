"""Where passes come from, and the textual pipeline.

Passes are found in three places, in this order (a later one may not shadow an earlier name):

1. built-ins: every :class:`Pass` subclass with a ``name`` in the modules of ``qcompiler.passes``, then the
   lowering passes of the built-in runtime targets (the modules of ``qcompiler.runtime_targets.<target>``;
   the ``lower`` pass runs a target's own, and each can be named in pipeline text too);
2. installed plugins: the entry-point group ``qcompiler.passes`` (each entry point loads a Pass class);
3. ``--plugin module:Class`` or ``--plugin path/to/file.py[:Class]`` named by the user.

Plugins are imported only when the user names them or installs an entry point, never from a string inside a
model or plan.

Pipeline text (MLIR-like): ``fold-batchnorm,resolve-plan,calibrate{method=percentile,percentile=99.9},insert-qdq``.
Option values are coerced to the types of the pass's ``Options`` dataclass; tuples are ``;``-separated.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import pkgutil
import re
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from qcompiler.core.errors import UserError
from qcompiler.core.pass_base import Pass

if TYPE_CHECKING:  # types only: the core finds targets at run time, by name
    from qcompiler.runtime_targets import Target

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@dataclass
class Registry:
    passes: dict[str, type[Pass]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)

    def add(self, cls: type[Pass], origin: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, Pass)):
            raise UserError(f"{origin}: '{getattr(cls, '__name__', cls)}' is not a qcompiler Pass subclass")
        if not cls.name or not _NAME_RE.match(cls.name):
            raise UserError(f"{origin}: pass class {cls.__name__} needs a kebab-case 'name' (got '{cls.name}')")
        if cls.name in self.passes and self.passes[cls.name] is not cls:
            raise UserError(f"{origin}: pass name '{cls.name}' is already taken by {self.origin[cls.name]}")
        self.passes[cls.name] = cls
        self.origin[cls.name] = origin

    def get(self, name: str) -> type[Pass]:
        try:
            return self.passes[name]
        except KeyError:
            close = [n for n in self.passes if n.startswith(name[:3])]
            hint = f" (did you mean {', '.join(sorted(close))}?)" if close else ""
            raise UserError(f"pipeline: unknown pass '{name}'{hint}; `qcompiler passes` lists them") from None

    def load_plugin(self, spec: str) -> list[str]:
        """Load ``module:Class``, ``path.py`` or ``path.py:Class``; returns the pass names added."""
        target, _, clsname = spec.partition(":") if not re.match(r"^[A-Za-z]:[\\/]", spec) else (spec, "", "")
        if target.endswith(".py") or "/" in target or "\\" in target:
            path = Path(target)
            if not path.is_file():
                raise UserError(f"--plugin {spec}: no such file '{path}'")
            mod_name = "qcompiler_plugin_" + re.sub(r"\W", "_", path.stem)
            loaded = sys.modules.get(mod_name)
            if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
                module = loaded  # the same file again (e.g. a second compile in one process): same classes
            else:
                module_spec = importlib.util.spec_from_file_location(mod_name, path)
                if module_spec is None or module_spec.loader is None:
                    raise UserError(f"--plugin {spec}: cannot import '{path}'")
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[mod_name] = module
                try:
                    module_spec.loader.exec_module(module)
                except Exception as e:
                    del sys.modules[mod_name]
                    raise UserError(f"--plugin {spec}: importing failed: {type(e).__name__}: {e}") from None
        else:
            try:
                module = importlib.import_module(target)
            except Exception as e:
                raise UserError(f"--plugin {spec}: cannot import module '{target}': {e}") from None
        if clsname:
            cls = getattr(module, clsname, None)
            if cls is None:
                raise UserError(f"--plugin {spec}: module has no attribute '{clsname}'")
            classes = [cls]
        else:
            classes = [c for _, c in inspect.getmembers(module, inspect.isclass)
                       if issubclass(c, Pass) and c is not Pass and c.__module__ == module.__name__ and c.name]
            if not classes:
                raise UserError(f"--plugin {spec}: no Pass subclass with a name found")
        for c in classes:
            self.add(c, f"plugin {spec}")
        return [c.name for c in classes]


_REGISTRY: Registry | None = None


_PASSES_PACKAGE = "qcompiler.passes"


def _add_module_passes(reg: Registry, module_name: str, origin: str) -> None:
    module = importlib.import_module(module_name)
    for _, c in inspect.getmembers(module, inspect.isclass):
        if issubclass(c, Pass) and c.__module__ == module.__name__ and c.name:
            reg.add(c, origin)


def _load_builtins(reg: Registry) -> None:
    """The passes of ``qcompiler.passes``, then the built-in targets' lowering passes (modules not starting
    with ``_``; found by walking the packages, never imported by name)."""
    pkg = importlib.import_module(_PASSES_PACKAGE)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            _add_module_passes(reg, f"{pkg.__name__}.{info.name}", "built-in")
    tpkg = importlib.import_module(_TARGETS_PACKAGE)
    for target in sorted(pkgutil.iter_modules(tpkg.__path__), key=lambda i: i.name):
        if target.name.startswith("_") or not target.ispkg:
            continue
        sub = importlib.import_module(f"{tpkg.__name__}.{target.name}")
        for info in sorted(pkgutil.iter_modules(sub.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                _add_module_passes(reg, f"{sub.__name__}.{info.name}", "built-in")


def _load_entry_points(reg: Registry) -> None:
    for ep in entry_points(group="qcompiler.passes"):
        try:
            cls = ep.load()
        except Exception as e:
            log.warning("entry point %s (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        reg.add(cls, f"entry point {ep.value}")


def registry() -> Registry:
    """The process-wide registry (built-ins + entry points), created on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        reg = Registry()
        _load_builtins(reg)
        _load_entry_points(reg)
        _REGISTRY = reg
    return _REGISTRY


# ------------------------------------------------------------------------------------------ pipeline text
def _split_top(text: str, sep: str = ",") -> list[str]:
    parts: list[str] = []
    cur: list[str] = []
    depth = 0
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise UserError(f"pipeline: unbalanced '}}' in '{text}'")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise UserError(f"pipeline: unbalanced '{{' in '{text}'")
    parts.append("".join(cur))
    return parts


def parse_pipeline_text(text: str) -> list[tuple[str, dict[str, str]]]:
    """``"a,b{k=v}"`` -> ``[("a", {}), ("b", {"k": "v"})]``; raises :class:`UserError` on bad syntax."""
    items: list[tuple[str, dict[str, str]]] = []
    if not text or not text.strip():
        raise UserError("pipeline: empty pipeline")
    for raw in _split_top(text.strip()):
        item = raw.strip()
        m = re.fullmatch(r"([A-Za-z0-9_\-]+)\s*(\{(.*)\})?", item, flags=re.S)
        if not m:
            raise UserError(f"pipeline: cannot parse '{item}' (expected name or name{{key=value,...}})")
        name, body = m.group(1), m.group(3)
        opts: dict[str, str] = {}
        if body is not None and body.strip():
            for kv in _split_top(body):
                k, eq, v = kv.partition("=")
                if not eq or not k.strip():
                    raise UserError(f"pipeline: option '{kv.strip()}' of pass '{name}' is not key=value")
                opts[k.strip()] = v.strip()
        items.append((name, opts))
    return items


def build_pipeline(text: str, reg: Registry | None = None) -> list[Pass]:
    """Instantiate the passes named by pipeline ``text``."""
    reg = reg or registry()
    return [reg.get(name).from_text_options(opts) for name, opts in parse_pipeline_text(text)]


# Runtime targets are plug-ins like passes: the core finds them by name through this registry and never
# imports ``qcompiler.runtime_targets`` statically (targets import the core, not the other way round).
_TARGETS_PACKAGE = "qcompiler.runtime_targets"


def targets() -> dict[str, type[Target]]:
    """Every runtime target by name: the built-ins plus the entry-point group ``qcompiler.targets``."""
    found: dict[str, type[Target]] = importlib.import_module(_TARGETS_PACKAGE).targets()
    return found


def get_target(name: str) -> Target:
    """A fresh instance of the runtime target called ``name`` (``UserError`` naming the known ones if none)."""
    target: Target = importlib.import_module(_TARGETS_PACKAGE).get_target(name)
    return target
