"""Bounded fuzzing of the CLI with hypothesis (issue 6): mutated ONNX protobufs, random plans and random pipeline
texts. Whatever the input, ``qcompiler compile`` either succeeds (exit 0, a model that passes the ONNX checker)
or refuses it (exit 2, exactly one ``error:`` line, nothing written) — never a crash (exit 1) and never a
traceback. Derandomized (the same examples on every run) and bounded: ~60 s in all on this machine.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _robust_cases as C

from qcompiler.cli import cli

set_hypothesis_home_dir(tempfile.mkdtemp(prefix="qcompiler-hypothesis-"))  # no .hypothesis/ in the repo
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SEEDS = {name: C.fixture_bytes(name) for name in ("gemm_head", "conv_bn_relu", "depthwise")}
SEEDS["matmul"] = C.matmul_model().SerializeToString()


def run_and_check(args: list[str], out: Path) -> int:
    res = CliRunner().invoke(cli, args)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    text = res.stdout + res.stderr
    assert "Traceback" not in text
    assert res.exit_code in (0, 2), (res.exit_code, res.stderr)
    event(f"exit {res.exit_code}")
    if res.exit_code == 2:
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
        assert len(errors) == 1, res.stderr
        assert not out.exists() and not any(out.parent.glob(".qcompiler-*"))
    else:
        onnx.checker.check_model(onnx.load(str(out)))
    return res.exit_code


# ------------------------------------------------------------------------------------ mutated protobufs
mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(0)),
    st.tuples(st.just("duplicate"), st.integers(0, 1 << 20), st.integers(1, 256)),
)


def mutate(data: bytes, ops: list[tuple[str, int, Any]]) -> bytes:
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
            b[i:i] = arg
        elif op == "truncate":
            del b[i:]
        else:
            b[i:i] = b[i:i + arg]
    return bytes(b)


@settings(FUZZ, max_examples=250)
@given(seed=st.sampled_from(sorted(SEEDS)), ops=st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_mutated_models(seed: str, ops: list[tuple[str, int, Any]]) -> None:
    data = mutate(SEEDS[seed], ops)
    with tempfile.TemporaryDirectory() as td:
        model = Path(td) / "m.onnx"
        model.write_bytes(data)
        out = Path(td) / "out" / "q.onnx"
        run_and_check(["compile", str(model), "-o", str(out), "--calib", "random", "--calib-samples", "2"], out)
        assert model.read_bytes() == data


# ------------------------------------------------------------------------------------------ random plans
KEYS = ["dtype", "granularity", "symmetric", "axis", "block_size", "calibration", "percentile", "range", "scheme",
        "scale", "bits", "threshold", "junk"]
VALUES = st.one_of(
    st.sampled_from(["int8", "uint8", "int4", "uint4", "int16", "fp8e4m3", "float", "int3", "per_tensor",
                     "per_channel", "block", "minmax", "percentile", "entropy", "mse", "int", "ternary", "binary",
                     "shift", "pow2", ""]),
    st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.lists(st.integers(0, 3), max_size=2),
)
SPEC = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4)
MATCH = st.dictionaries(st.sampled_from(["op_type", "name_regex", "name", "other"]),
                        st.one_of(st.sampled_from(["Conv", "Gemm", "MatMul", "Relu", "[", "^/", ".*", "conv"]),
                                  st.lists(st.sampled_from(["Conv", "Gemm", "MatMul"]), max_size=2),
                                  st.integers(0, 2)), max_size=2)
RULE = st.fixed_dictionaries({}, optional={"match": MATCH, "weight": SPEC, "activation": SPEC,
                                           "skip": st.one_of(st.booleans(), st.sampled_from(["yes", 1])),
                                           "comment": st.text(max_size=8)})
PLAN = st.fixed_dictionaries({}, optional={"version": st.sampled_from([1, 1, 1, 2, "1"]),
                                           "defaults": st.fixed_dictionaries({}, optional={"weight": SPEC,
                                                                                          "activation": SPEC}),
                                           "rules": st.lists(RULE, max_size=3),
                                           "extra": st.integers()})


@settings(FUZZ, max_examples=150)
@given(plan=PLAN, as_json=st.booleans(), seed=st.sampled_from(["gemm_head", "conv_bn_relu", "matmul"]))
def test_fuzz_plans(plan: dict[str, Any], as_json: bool, seed: str) -> None:
    with tempfile.TemporaryDirectory() as td:
        model = Path(td) / "m.onnx"
        model.write_bytes(SEEDS[seed])
        p = Path(td) / ("plan.json" if as_json else "plan.yaml")
        p.write_text(json.dumps(plan) if as_json else yaml.safe_dump(plan), encoding="utf-8")
        out = Path(td) / "out" / "q.onnx"
        run_and_check(["compile", str(model), "-o", str(out), "--plan", str(p), "--calib", "random",
                       "--calib-samples", "2"], out)


PASSES = ["cleanup", "fold-batchnorm", "resolve-plan", "calibrate", "insert-qdq", "lower", "nope", ""]
OPTS = st.sampled_from(["", "{method=percentile}", "{samples=1}", "{percentile=99}", "{x=1}", "{", "}",
                        "{method=}", "{fold_shapes=true}", "{=}"])


@settings(FUZZ, max_examples=60)
@given(items=st.lists(st.tuples(st.sampled_from(PASSES), OPTS), min_size=0, max_size=6),
       sep=st.sampled_from([",", ", ", ",,"]))
def test_fuzz_pipelines(items: list[tuple[str, str]], sep: str) -> None:
    text = sep.join(a + b for a, b in items)
    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "out" / "q.onnx"
        run_and_check(["compile", str(C.MODELS / "gemm_head.onnx"), "-o", str(out), "--pipeline", text, "--calib",
                       "random", "--calib-samples", "2"], out)
