"""The house rules of the package layout (docs/architecture.md), checked on the source with ``ast``.

Nothing is imported: every module of ``qcompiler/``, ``passes/`` (installed as ``qcompiler.passes``) and
``runtime_targets/`` (``qcompiler.runtime_targets``) is parsed and its import statements are classified as
module-level (run when the module is imported), ``if TYPE_CHECKING:`` (annotations only) or inside a function.
Each rule is its own test and its failure lists every violation as ``file:line``.

Layers (a module may import, at module level, only from its own layer or lower ones):

    L0  qcompiler.core (and the root qcompiler/__init__.py)
    L1  qcompiler.ir, qcompiler.quant, qcompiler.plan, qcompiler.calib    (acyclic among themselves)
    L2  qcompiler.passes, qcompiler.runtime_targets
    L3  qcompiler.report, qcompiler.session, ...                          (LAYERS below)
    L4  qcompiler.autoplan
    L5  qcompiler.api, qcompiler.cli
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
# package name -> source folder, as pyproject.toml's [tool.setuptools] package-dir maps them
ROOTS = {
    "qcompiler": REPO / "qcompiler",
    "qcompiler.passes": REPO / "passes",
    "qcompiler.runtime_targets": REPO / "runtime_targets",
}
FIRST_PARTY = "qcompiler"

# The one layer table: the longest matching prefix decides a module's layer. A new module directly under
# qcompiler/ (or a new sub-package) must be added here; test_every_module_has_a_layer says so.
LAYERS: dict[str, int] = {
    "qcompiler": 0,  # the root __init__ only: re-exports the errors and __version__
    "qcompiler.core": 0,  # pass base, pass manager, registry, context, config schema, numbers
    "qcompiler.ir": 1,  # the only protobuf / onnxruntime user
    "qcompiler.quant": 1,
    "qcompiler.plan": 1,
    "qcompiler.calib": 1,
    "qcompiler.passes": 2,
    "qcompiler.runtime_targets": 2,
    "qcompiler.report": 3,
    "qcompiler.session": 3,  # the pipeline-prefix runner
    "qcompiler.compile": 3,  # compile machinery below autoplan (if it lives in its own module)
    "qcompiler.compile_files": 3,  # the files a compile reads and writes (the driver's output-path policy)
    "qcompiler.autoplan": 4,
    "qcompiler.recipe": 4,  # the measured default (--plan auto) and the presets' algorithm guard
    "qcompiler.api": 5,
    "qcompiler.cli": 5,
}
LAYER1 = ("qcompiler.ir", "qcompiler.quant", "qcompiler.plan", "qcompiler.calib")
PLUGIN_PACKAGES = ("qcompiler.passes", "qcompiler.runtime_targets")
MAX_LINES = 600

# Modules outside qcompiler/ir/ allowed to import onnx / onnxruntime at run time, each with the reason.
# Add an entry only when the module truly needs protobuf or a session and qcompiler.ir cannot provide it.
PROTOBUF_ALLOWED: dict[str, str] = {}
PROTOBUF_PACKAGES = ("onnx", "onnxruntime")  # onnx_graphsurgeon is a different top-level package: fine


@dataclass(frozen=True)
class Import:
    src: str  # importing module
    target: str  # the module imported (a first-party submodule when `from pkg import submodule`)
    line: int
    where: str  # "module" | "type-checking" | "function"

    def at(self, modules: dict[str, Module]) -> str:
        return f"{modules[self.src].rel}:{self.line}"


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    lines: int

    @property
    def rel(self) -> str:
        return self.path.relative_to(REPO).as_posix()

    @property
    def package(self) -> str:
        return self.name if self.is_package else self.name.rpartition(".")[0]


def _discover() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for pkg, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if name in modules:  # qcompiler/passes/ would shadow passes/: not expected
                continue
            source = path.read_bytes()
            modules[name] = Module(name, path, path.name == "__init__.py",
                                   ast.parse(source, filename=str(path)), source.count(b"\n"))
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(mod: Module, known: set[str]) -> tuple[list[Import], list[Import]]:
    """(first-party imports, third-party imports) of ``mod``; targets resolved to absolute module names."""
    first: list[Import] = []
    third: list[Import] = []

    def add(target: str, line: int, where: str) -> None:
        (first if target.split(".")[0] == FIRST_PARTY else third).append(Import(mod.name, target, line, where))

    def visit(node: ast.AST, where: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno, where)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                sub = f"{prefix}.{alias.name}"
                add(sub if sub in known else prefix, node.lineno, where)
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            where = "function"
        if isinstance(node, ast.If) and _is_type_checking(node.test) and where == "module":
            for stmt in node.body:
                visit(stmt, "type-checking")
            for stmt in node.orelse:
                visit(stmt, where)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, where)

    visit(mod.tree, "module")
    return first, third


MODULES = _discover()
KNOWN = set(MODULES)
FIRST: list[Import] = []
THIRD: list[Import] = []
for _m in MODULES.values():
    _f, _t = _imports(_m, KNOWN)
    FIRST += _f
    THIRD += _t


def layer_of(name: str) -> int | None:
    """The layer of a module: the longest LAYERS prefix (the root ``qcompiler`` row matches only itself)."""
    best = None
    for prefix, layer in LAYERS.items():
        if name == prefix or (prefix != FIRST_PARTY and name.startswith(prefix + ".")):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, layer)
    return None if best is None else best[1]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _fail(title: str, violations: list[str]) -> None:
    unique = sorted(set(violations))  # `from m import a, b` is one import of m
    if unique:
        pytest.fail(f"{title} ({len(unique)}):\n  " + "\n  ".join(unique), pytrace=False)


def _runtime_edges() -> list[Import]:
    """Module-level imports, plus the package ``__init__``s each one runs on the way.

    ``import a.b.c`` runs ``a/__init__``, ``a/b/__init__`` and then ``a/b/c``; the packages the importer itself
    lives in are already being imported, so they add no edge: a package ``__init__`` re-exporting its submodules,
    which import each other by full name, makes no circle.
    """
    edges = []
    for imp in FIRST:
        if imp.where != "module":
            continue
        edges.append(imp)
        parts = imp.target.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in KNOWN and not _within(imp.src, parent):
                edges.append(Import(imp.src, parent, imp.line, "module"))
    return edges


# ==================================================================================================
# the rules
# ==================================================================================================


def test_discovers_the_package() -> None:
    for name in ("qcompiler", "qcompiler.core.registry", "qcompiler.ir", "qcompiler.passes",
                 "qcompiler.runtime_targets", "qcompiler.api", "qcompiler.cli"):
        assert name in MODULES, f"{name} not found: ROOTS out of date with pyproject.toml's package-dir?"
    assert any(i.where == "type-checking" for i in FIRST)
    assert any(i.where == "module" for i in FIRST)


def test_checker_classifies_imports() -> None:
    """The classifier itself, on a made-up module ``qcompiler.report.demo``."""
    src = (
        "from __future__ import annotations\n"
        "import typing\n"
        "from typing import TYPE_CHECKING\n"
        "import numpy as np\n"
        "from qcompiler import ir\n"
        "from . import cost\n"
        "from ..core.errors import UserError\n"
        "if TYPE_CHECKING:\n"
        "    from qcompiler.plan import QuantSpec\n"
        "else:\n"
        "    from qcompiler.quant import dtypes\n"
        "if typing.TYPE_CHECKING:\n"
        "    import onnx\n"
        "class C:\n"
        "    from qcompiler.calib import sources\n"
        "    def m(self):\n"
        "        import scipy\n"
        "        from qcompiler.api import compile_model\n"
        "        return lambda: scipy\n"
    )
    mod = Module("qcompiler.report.demo", REPO / "qcompiler/report/demo.py", False, ast.parse(src), 19)
    known = {"qcompiler", "qcompiler.ir", "qcompiler.report", "qcompiler.report.cost", "qcompiler.core",
             "qcompiler.core.errors", "qcompiler.plan", "qcompiler.quant", "qcompiler.calib", "qcompiler.api"}
    first, third = _imports(mod, known)
    got = {(i.target, i.where) for i in first}
    assert got == {("qcompiler.ir", "module"), ("qcompiler.report.cost", "module"),
                   ("qcompiler.core.errors", "module"), ("qcompiler.plan", "type-checking"),
                   ("qcompiler.quant", "module"), ("qcompiler.calib", "module"), ("qcompiler.api", "function")}, got
    assert ("onnx", "type-checking") in {(i.target, i.where) for i in third}
    assert ("scipy", "function") in {(i.target, i.where) for i in third}
    assert layer_of("qcompiler.newmodule") is None and layer_of("qcompiler.passes._layers") == 2


def test_every_module_has_a_layer() -> None:
    _fail("modules missing from the LAYERS table of tests/test_architecture.py",
          [f"{m.rel}: {m.name}" for m in MODULES.values() if layer_of(m.name) is None])


def test_layers() -> None:
    """(a) module-level first-party imports go to the same or a lower layer; L3+ never import passes / targets."""
    bad = []
    for imp in FIRST:
        src, tgt = layer_of(imp.src), layer_of(imp.target)
        if src is None or tgt is None:
            continue  # test_every_module_has_a_layer
        if imp.where == "module" and tgt > src:
            bad.append(f"{imp.at(MODULES)}: {imp.src} (L{src}) imports {imp.target} (L{tgt})")
        if src >= 3 and any(_within(imp.target, p) for p in PLUGIN_PACKAGES):
            bad.append(f"{imp.at(MODULES)}: {imp.src} (L{src}) imports {imp.target} ({imp.where}); "
                       "reach passes and targets through qcompiler.core.registry")
    _fail("imports against the layer order", bad)


def test_layer1_packages_acyclic() -> None:
    """(a) ir, quant, plan and calib depend on each other without a circle (as packages)."""
    deps: dict[str, dict[str, Import]] = defaultdict(dict)
    for imp in FIRST:
        if imp.where != "module":
            continue
        a = next((p for p in LAYER1 if _within(imp.src, p)), None)
        b = next((p for p in LAYER1 if _within(imp.target, p)), None)
        if a and b and a != b:
            deps[a].setdefault(b, imp)
    def reach(a: str) -> set[str]:
        seen, todo = set(), [a]
        while todo:
            for q in deps.get(todo.pop(), {}):
                if q not in seen:
                    seen.add(q)
                    todo.append(q)
        return seen

    reached = {p: reach(p) for p in LAYER1}
    bad = []
    for a in LAYER1:
        for b, imp in deps.get(a, {}).items():
            if a in reached[b]:  # a -> b and b reaches a: the edge lies on a circle
                bad.append(f"{imp.at(MODULES)}: {imp.src} imports {imp.target} ({a} -> {b}, and {b} reaches {a})")
    _fail("layer-1 packages importing each other in a circle", bad)


def test_no_import_cycles() -> None:
    """(b) no circle among first-party modules (module-level imports, TYPE_CHECKING excluded)."""
    graph: dict[str, dict[str, Import]] = defaultdict(dict)
    for e in _runtime_edges():
        graph[e.src].setdefault(e.target, e)
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, {}):
                sccs.append(sorted(comp))

    for v in sorted(KNOWN):
        if v not in index:
            strong(v)
    bad = []
    for comp in sccs:
        members = set(comp)
        edges = [f"{e.at(MODULES)} {e.src} -> {e.target}" for a in comp for e in graph[a].values()
                 if e.target in members]
        bad.append(f"circle among {', '.join(comp)}:\n      " + "\n      ".join(sorted(edges)))
    _fail("import circles", bad)


def test_no_first_party_imports_in_functions() -> None:
    """(c) first-party imports sit at module level (or under TYPE_CHECKING), never inside a function."""
    _fail("first-party imports inside a function (fix the dependency instead of hiding it)",
          [f"{i.at(MODULES)}: {i.src} imports {i.target}" for i in FIRST if i.where == "function"])


def test_module_size() -> None:
    """(d) no module over MAX_LINES lines."""
    _fail(f"modules over {MAX_LINES} lines (split by job)",
          [f"{m.rel}: {m.lines} lines" for m in MODULES.values() if m.lines > MAX_LINES])


def _private_owner(name: str) -> str | None:
    """The package a private module of passes / runtime_targets belongs to (None: not such a module)."""
    if not any(_within(name, p) for p in PLUGIN_PACKAGES):
        return None
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:i])
    return None


def test_plugin_packages_keep_to_themselves() -> None:
    """(e) private modules of passes/ and runtime_targets/<t>/ stay private; passes and targets are independent."""
    bad = []
    for imp in FIRST:
        owner = _private_owner(imp.target)
        if owner is not None and not _within(imp.src, owner):
            bad.append(f"{imp.at(MODULES)}: {imp.src} imports private {imp.target} (only {owner} may)")
        for a, b in (PLUGIN_PACKAGES, PLUGIN_PACKAGES[::-1]):
            if _within(imp.src, a) and _within(imp.target, b):
                bad.append(f"{imp.at(MODULES)}: {imp.src} imports {imp.target} ({imp.where}); "
                           f"{a} and {b} never import each other")
    _fail("imports across passes / runtime_targets boundaries", bad)


def test_only_ir_touches_protobuf() -> None:
    """(f) onnx (protobuf) and onnxruntime are imported at run time only in qcompiler/ir/."""
    bad = [f"{i.at(MODULES)}: {i.src} imports {i.target}" for i in THIRD
           if i.where != "type-checking" and i.target.split(".")[0] in PROTOBUF_PACKAGES
           and not _within(i.src, "qcompiler.ir") and i.src not in PROTOBUF_ALLOWED]
    _fail("onnx / onnxruntime imported outside qcompiler/ir/ (use qcompiler.ir's functions)", bad)


def test_allowlist_is_current() -> None:
    """Every PROTOBUF_ALLOWED entry names a module that exists and still needs it."""
    needs = {i.src for i in THIRD if i.target.split(".")[0] in PROTOBUF_PACKAGES and i.where != "type-checking"}
    _fail("stale PROTOBUF_ALLOWED entries", [m for m in PROTOBUF_ALLOWED if m not in needs])


def test_root_package_only_reexports() -> None:
    """qcompiler/__init__.py re-exports the errors and __version__, nothing that pulls in the rest."""
    _fail("qcompiler/__init__.py imports beyond qcompiler.core.errors",
          [f"{i.at(MODULES)}: {i.target}" for i in FIRST
           if i.src == "qcompiler" and i.target != "qcompiler.core.errors"])


def test_pyproject_lists_every_package() -> None:
    """setuptools installs only the packages pyproject names: a sub-package left out works in an editable
    install (as in the tests) and is missing from a wheel."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for dotted, root in ROOTS.items():
        for init in sorted(root.rglob("__init__.py")):
            rel = init.parent.relative_to(root).parts
            found.add(".".join((dotted, *rel)))
    assert found - listed == set(), f"packages missing from pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"pyproject.toml lists packages that do not exist: {sorted(listed - found)}"
