"""The contract every fuzz case is held to (issue 16), the case runner, the fuzz profiles, and tests of the
checker itself.

A fuzz *case* is a category name plus JSON-able ``params``; the category's builder (registered with
:func:`builder` by the ``test_robustness_fuzz*.py`` modules) writes every input file under a fresh folder and
returns the command line. :func:`run_case` runs ``qcompiler`` in-process (click's CliRunner), snapshots the whole
folder before and after (sha256 + mtime of every file, external data, calibration data, plans, bundles, links
included) and returns the violations of the contract:

* exit 0 or 2, never 1 or an uncaught exception, never a traceback;
* exit 2: exactly one ``error:`` line; nothing written anywhere (no output, no side file, no staging folder, no
  output folder) and nothing replaced;
* always: every input file byte-identical (and its mtime unchanged) afterwards, no ``.qcompiler-*`` leftovers;
* exit 0: the output exists (a compiled model passes the ONNX checker; a bundle has its manifest).

Profiles: the default one is bounded for CI; ``QCOMPILER_FUZZ_PROFILE=long`` multiplies the examples (run by
``python benchmarks/fuzz_long.py``). With ``QCOMPILER_FUZZ_RECORD=FILE`` a case's outcome is appended to FILE
(JSON lines) instead of failing the test, so that a long run sees every violation, not only the first.
A failing case names its category and a reproducer: ``python benchmarks/fuzz_long.py --replay '<json>'``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from qcompiler.cli import cli

set_hypothesis_home_dir(tempfile.mkdtemp(prefix="qcompiler-hypothesis-"))  # no .hypothesis/ in the repo


def _examples_from_the_test_file_alone() -> None:
    """Hypothesis mixes constants found in every *local* module loaded so far (the repository's, qcompiler
    included: an editable install) into its draws, so the derandomized examples of a fuzz file run alone and of
    the same file after the rest of the suite (which loads other modules) differ. Draw from hypothesis' global
    constants only: then a case list depends on the test file and the hypothesis version, nothing else."""
    try:
        from hypothesis.internal.conjecture import providers  # internal: checked, left alone if it moved
    except ImportError:
        return
    if callable(getattr(providers, "_get_local_constants", None)) and hasattr(providers, "Constants"):
        empty = providers.Constants()
        providers._get_local_constants = lambda: empty


_examples_from_the_test_file_alone()
PROFILE = os.environ.get("QCOMPILER_FUZZ_PROFILE", "default")
RECORD = os.environ.get("QCOMPILER_FUZZ_RECORD")
LONG_FACTOR = 4
# No shrinking: a failing case's message already names its category and a reproducer, and shrinking would
# multiply the run time while a known finding is open.
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def examples(n: int) -> settings:
    """Hypothesis settings for ``n`` examples in the default profile (``LONG_FACTOR`` times more in the long)."""
    return settings(FUZZ, max_examples=n * LONG_FACTOR if PROFILE == "long" else n)


# ------------------------------------------------------------------------------------------ the cases
@dataclass
class Call:
    """What a builder returns: the argv, what success must have produced, which pre-existing paths (relative to
    the case folder) a successful run may replace, and whether the command may write at all."""
    argv: list[str]
    output: Path | None = None
    output_kind: str = "model"  # model | bundle | none
    replaceable: set[str] = field(default_factory=set)


Builder = Callable[[dict[str, Any], Path], Call]
BUILDERS: dict[str, Builder] = {}


def builder(category: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        BUILDERS[category] = fn
        return fn
    return deco


@dataclass
class Outcome:
    category: str
    params: dict[str, Any]
    exit_code: int
    error: str
    violations: list[str]

    def reproducer(self) -> str:
        case = json.dumps({"category": self.category, "params": self.params}, sort_keys=True)
        return f"python benchmarks/fuzz_long.py --replay {shlex.quote(case)}"


Entry = tuple[str, ...]


def snapshot(root: Path) -> dict[str, Entry]:
    """Every entry under ``root`` (symlinks not followed): files by sha256, size and mtime; links by target."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st_ = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), str(st_.st_size),
                            str(st_.st_mtime_ns))
    return out


def check_contract(res: Any, call: Call, root: Path, before: dict[str, Entry],
                   after: dict[str, Entry]) -> list[str]:
    v: list[str] = []
    code = res.exit_code
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        v.append(f"uncaught {type(res.exception).__name__}: {str(res.exception)[:200]}")
    text = res.stdout + res.stderr
    if "Traceback" in text:
        v.append("traceback printed")
    errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
    if code not in (0, 2):
        last = [ln for ln in res.stderr.splitlines() if ln.strip()]
        v.append(f"exit {code}: {(last[-1] if last else '')[:300]}")
    elif code == 2 and len(errors) != 1:
        v.append(f"exit 2 with {len(errors)} 'error:' lines: {res.stderr[-300:]!r}")
    elif code == 0 and errors:
        v.append(f"exit 0 with an error line: {errors[0][:200]}")
    for rel, entry in sorted(before.items()):
        if rel in call.replaceable and code == 0:
            continue
        now = after.get(rel)
        if now is None:
            v.append(f"input '{rel}' removed")
        elif now != entry:
            what = "replaced" if now[0] != entry[0] else "changed"
            v.append(f"input '{rel}' {what} ({entry[0]} -> {now[0]})")
    new = sorted(set(after) - set(before))
    staging = [r for r in new if any(part.startswith(".qcompiler-") for part in r.split("/"))]
    if staging:
        v.append(f"staging left behind: {staging[:3]}")
    if code != 0 and new:
        v.append(f"wrote on failure: {new[:4]}")
    if code == 0 and call.output is not None:
        if call.output_kind == "model":
            try:
                onnx.checker.check_model(str(call.output))
            except Exception as e:
                v.append(f"exit 0 but the output fails the ONNX checker: {type(e).__name__}: {str(e)[:150]}")
        elif call.output_kind == "bundle" and not (call.output / "manifest.json").is_file():
            v.append("exit 0 but no bundle manifest")
    if code == 0 and call.output_kind == "none" and new:
        v.append(f"a read-only command wrote {new[:4]}")
    return v


def run_case(category: str, params: dict[str, Any]) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="qcompiler-fuzz-") as td:
        root = Path(td)
        call = BUILDERS[category](params, root)
        before = snapshot(root)
        res = CliRunner().invoke(cli, call.argv)
        after = snapshot(root)
        violations = check_contract(res, call, root, before, after)
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        err = errors[0].replace(str(root), "<case>") if errors else ""
        return Outcome(category, params, res.exit_code, err, violations)


def check_case(category: str, params: dict[str, Any]) -> Outcome:
    """Run one case; record it (long profile) or fail the test with the category and a reproducer."""
    params = json.loads(json.dumps(params))  # what the reproducer replays is exactly what ran
    out = run_case(category, params)
    event(f"{category}: exit {out.exit_code}")
    if RECORD:
        with open(RECORD, "a", encoding="utf-8") as f:
            f.write(json.dumps({"category": category, "params": params, "exit": out.exit_code,
                                "error": out.error, "violations": out.violations}, sort_keys=True) + "\n")
        return out
    assert not out.violations, (f"fuzz [{category}] contract violated: {out.violations}\n"
                                f"  error line: {out.error}\n  reproduce: {out.reproducer()}")
    return out


# ------------------------------------------------------------------------------------- byte mutations
MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16).map(bytes.hex)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("duplicate"), st.integers(0, 1 << 20), st.integers(1, 256)),
)
MUTATIONS = st.lists(MUTATION, min_size=1, max_size=4)


def mutate(data: bytes, ops: list[Any]) -> bytes:
    b = bytearray(data)
    for op, pos, arg in ops:
        if not b:
            break
        i = pos % len(b)
        if op == "flip":
            b[i] ^= 1 << arg
        elif op == "set":
            b[i] = arg
        elif op == "delete":
            del b[i:i + arg]
        elif op == "insert":
            b[i:i] = bytes.fromhex(arg)
        elif op == "truncate":
            del b[i:]
        else:
            b[i:i] = b[i:i + arg]
    return bytes(b)


# ------------------------------------------------------------------------------ the checker's own tests
class _Res:
    def __init__(self, code: int, stdout: str = "", stderr: str = "", exception: Any = None) -> None:
        self.exit_code, self.stdout, self.stderr = code, stdout, stderr
        self.exception = exception if exception is not None else (SystemExit(code) if code else None)


def _tree(tmp: Path) -> dict[str, Entry]:
    (tmp / "in").mkdir()
    (tmp / "in" / "m.onnx").write_bytes(b"model")
    (tmp / "in" / "m.onnx.data").write_bytes(b"data")
    return snapshot(tmp)


def test_contract_accepts_a_clean_refusal(tmp_path: Path) -> None:
    before = _tree(tmp_path)
    res = _Res(2, stderr="WARNING x: y\nerror: m.onnx: bad\n")
    assert check_contract(res, Call([]), tmp_path, before, snapshot(tmp_path)) == []


def test_contract_flags_crash_traceback_and_error_lines(tmp_path: Path) -> None:
    before = _tree(tmp_path)
    v = check_contract(_Res(1, stderr="Traceback (most recent call last):\ninternal error: KeyError\n"), Call([]),
                       tmp_path, before, before)
    assert v == ["traceback printed", "exit 1: internal error: KeyError"]
    v = check_contract(_Res(2, stderr="error: a\nerror: b\n"), Call([]), tmp_path, before, before)
    assert v and v[0].startswith("exit 2 with 2 'error:' lines")
    v = check_contract(_Res(0, exception=ValueError("boom")), Call([]), tmp_path, before, before)
    assert v == ["uncaught ValueError: boom"]


def test_contract_flags_changed_input_external_data_and_leftovers(tmp_path: Path) -> None:
    before = _tree(tmp_path)
    os.utime(tmp_path / "in" / "m.onnx", ns=(1, 1))  # same bytes, rewritten: still a change
    (tmp_path / "in" / "m.onnx.data").write_bytes(b"DATA")
    (tmp_path / "out" / ".qcompiler-x").mkdir(parents=True)
    v = check_contract(_Res(2, stderr="error: x\n"), Call([]), tmp_path, before, snapshot(tmp_path))
    assert "input 'in/m.onnx' changed (file -> file)" in v
    assert "input 'in/m.onnx.data' changed (file -> file)" in v
    assert "staging left behind: ['out/.qcompiler-x']" in v
    assert "wrote on failure: ['out', 'out/.qcompiler-x']" in v


def test_contract_replaceable_only_on_success(tmp_path: Path) -> None:
    (tmp_path / "q.onnx").write_bytes(b"old output")
    before = snapshot(tmp_path)
    (tmp_path / "q.onnx").write_bytes(b"new output!")
    after = snapshot(tmp_path)
    call = Call([], replaceable={"q.onnx"}, output_kind="none")
    assert check_contract(_Res(0), call, tmp_path, before, after) == []
    assert check_contract(_Res(2, stderr="error: x\n"), call, tmp_path, before, after) == [
        "input 'q.onnx' changed (file -> file)"]


def test_mutate_is_deterministic_and_reproducible() -> None:
    ops = [["flip", 3, 1], ["insert", 100, "ff00"], ["delete", 7, 2], ["duplicate", 1, 3], ["truncate", 9, 0]]
    once = mutate(b"0123456789abcdef", ops)
    assert once == mutate(b"0123456789abcdef", json.loads(json.dumps(ops)))
    assert once == b"0121121\xff\x00"


def test_examples_do_not_depend_on_the_modules_loaded() -> None:
    """Measured before the fix: test_robustness_fuzz.py's 500 cases run alone and after importing every
    qcompiler module differed in 2 cases; with hypothesis' local constants off, in none."""
    from hypothesis.internal.conjecture import providers

    import qcompiler.cli.commands.plan_schema  # noqa: F401  (a local module full of constants)
    assert len(providers._get_local_constants()) == 0
