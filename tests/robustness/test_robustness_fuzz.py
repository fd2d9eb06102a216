"""Bounded fuzzing of the CLI with hypothesis (issues 6 and 16): mutated ONNX protobufs, random plans (as data
and as mutated text: bad UTF-8, YAML / JSON syntax, anchors, nesting) and random pipeline texts. Every case is
held to the contract of ``test_robustness_fuzz_contract``: exit 0 (a model that passes the ONNX checker) or 2
(exactly one ``error:`` line, nothing written), never a crash or a traceback, every input byte-identical.
Derandomized (the same examples on every run) and bounded; ``QCOMPILER_FUZZ_PROFILE=long`` for more.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _robust_cases as C
import test_robustness_fuzz_contract as F

SEEDS = {name: C.fixture_bytes(name) for name in ("gemm_head", "conv_bn_relu", "depthwise")}
SEEDS["matmul"] = C.matmul_model().SerializeToString()


def _model(root: Path, seed: str) -> Path:
    (root / "in").mkdir()
    model = root / "in" / "m.onnx"
    model.write_bytes(SEEDS[seed])
    return model


def _compile(model: Path, root: Path, *extra: str) -> F.Call:
    out = root / "out" / "q.onnx"
    return F.Call(["compile", str(model), "-o", str(out), "--calib", "random", "--calib-samples", "2", *extra], out)


# ------------------------------------------------------------------------------------ mutated protobufs
@F.builder("model-bytes")
def build_model_bytes(p: dict[str, Any], root: Path) -> F.Call:
    model = _model(root, p["seed"])
    model.write_bytes(F.mutate(SEEDS[p["seed"]], p["ops"]))
    return _compile(model, root)


@F.examples(250)
@given(seed=st.sampled_from(sorted(SEEDS)), ops=F.MUTATIONS)
def test_fuzz_mutated_models(seed: str, ops: list[Any]) -> None:
    F.check_case("model-bytes", {"seed": seed, "ops": ops})


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



@F.builder("plan")
def build_plan(p: dict[str, Any], root: Path) -> F.Call:
    model = _model(root, p["seed"])
    plan = root / "in" / ("plan.json" if p["as_json"] else "plan.yaml")
    plan.write_text(json.dumps(p["plan"]) if p["as_json"] else yaml.safe_dump(p["plan"]), encoding="utf-8")
    return _compile(model, root, "--plan", str(plan))


@F.examples(150)
@given(plan=PLAN, as_json=st.booleans(), seed=st.sampled_from(["gemm_head", "conv_bn_relu", "matmul"]))
def test_fuzz_plans(plan: dict[str, Any], as_json: bool, seed: str) -> None:
    F.check_case("plan", {"plan": plan, "as_json": as_json, "seed": seed})


# ----------------------------------------------------------------------------------- plan files as text
PLAN_TEXTS = [
    "version: 1\ndefaults:\n  weight: {dtype: int8, granularity: per_channel}\n  activation: {dtype: uint8}\n"
    "rules:\n  - match: {op_type: [Gemm, Conv]}\n    weight: {dtype: int4, block_size: 32}\n"
    "  - match: {name_regex: '^/head'}\n    skip: true\n",
    json.dumps({"version": 1, "defaults": {"weight": {"dtype": "int8"}},
                "rules": [{"match": {"op_type": "MatMul"}, "activation": {"calibration": "percentile",
                                                                          "percentile": 99.9}}]}, indent=1),
    "# comment\nversion: 1\nrules: []\n",
]
WRAPS = {
    "none": lambda t: t,
    "bom": lambda t: b"\xef\xbb\xbf" + t,
    "utf16": lambda t: t.decode("utf-8", "replace").encode("utf-16"),
    "latin1": lambda t: t.replace(b"version", b"v\xe9rsion"),
    "nul": lambda t: t[: len(t) // 2] + b"\x00" + t[len(t) // 2:],
    "crlf": lambda t: t.replace(b"\n", b"\r\n"),
    "tabs": lambda t: t.replace(b"  ", b"\t"),
    "alias-bomb": lambda t: b"a: &a [x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b]\n"
                            b"d: [*c, *c, *c, *c, *c, *c]\n" + t,
    "deep": lambda t: b"[" * 5000 + b"]" * 5000,
    "huge-int": lambda t: b"version: 1" + b"0" * 5000 + b"\n",
    "dup-keys": lambda t: t + b"\nversion: 1\n",
    "merge-key": lambda t: b"base: &b {dtype: int8}\nversion: 1\ndefaults: {weight: {<<: *b, granularity: block}}\n",
    "binary-tag": lambda t: b"version: !!binary aGVsbG8=\n",
    "timestamp": lambda t: b"version: 2001-12-14t21:59:43.10-05:00\n",
    "float-key": lambda t: b"version: 1\n1.5: x\n",
}


@F.builder("plan-text")
def build_plan_text(p: dict[str, Any], root: Path) -> F.Call:
    model = _model(root, p["seed"])
    text = WRAPS[p["wrap"]](PLAN_TEXTS[p["base"]].encode())
    plan = root / "in" / f"plan{p['suffix']}"
    plan.write_bytes(F.mutate(text, p["ops"]) if p["ops"] else text)
    return _compile(model, root, "--plan", str(plan))


@F.examples(40)
@given(seed=st.sampled_from(["gemm_head", "matmul"]), base=st.integers(0, len(PLAN_TEXTS) - 1),
       wrap=st.sampled_from(sorted(WRAPS)), suffix=st.sampled_from([".yaml", ".json", ".yml", ".txt", ""]),
       ops=st.one_of(st.just([]), F.MUTATIONS))
def test_fuzz_plan_texts(seed: str, base: int, wrap: str, suffix: str, ops: list[Any]) -> None:
    F.check_case("plan-text", {"seed": seed, "base": base, "wrap": wrap, "suffix": suffix, "ops": ops})


# ------------------------------------------------------------------------------------------- pipelines
PASSES = ["cleanup", "fold-batchnorm", "resolve-plan", "calibrate", "insert-qdq", "lower", "nope", ""]
OPTS = st.sampled_from(["", "{method=percentile}", "{samples=1}", "{percentile=99}", "{x=1}", "{", "}",
                        "{method=}", "{fold_shapes=true}", "{=}"])



@F.builder("pipeline")
def build_pipeline(p: dict[str, Any], root: Path) -> F.Call:
    return _compile(_model(root, "gemm_head"), root, "--pipeline", p["text"])


@F.examples(60)
@given(items=st.lists(st.tuples(st.sampled_from(PASSES), OPTS), min_size=0, max_size=6),
       sep=st.sampled_from([",", ", ", ",,"]))
def test_fuzz_pipelines(items: list[tuple[str, str]], sep: str) -> None:
    F.check_case("pipeline", {"text": sep.join(a + b for a, b in items)})
